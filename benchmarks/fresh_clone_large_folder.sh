#!/usr/bin/env bash
# A photo folder larger than a quarter of RAM, prepared and trained from a fresh clone
# through the README's "Your own images" commands (issue 26's "done when").
#
#   bash benchmarks/fresh_clone_large_folder.sh [IMAGE_SIZE] [WORK]
#
# The tree is bench_memory.py's generated one (90,000 128x128 RGB JPEGs in
# 10 class folders, made once under CACHE, default benchmarks/out/bench-memory).
# At IMAGE_SIZE 192 (default) its prepared splits are 90,000 x 3 x 192 x 192
# bytes = 9.95 GB. WORK (default benchmarks/out/large-folder) gets a fresh
# clone of this repository's HEAD, set up with `bash scripts/setup.sh`; then,
# as a reader would, with a CPU-sized grid (one run, one epoch):
#   dvc add my_photos
#   dvc exp run -S data.dataset=folder -S data.source=my_photos -S 'data.image_size=[S,S]' ...
#   cnnpipe predict my_photos/class3/0000*.jpg
# Each command's wall time and peak RSS (GNU time: the largest process it
# waited for) go to WORK/summary.txt, with each stage's peak RSS and own
# memory (sampled every second), the prepared size, RAM, the train stage's
# epoch line and the test metrics. Needs ~3x the prepared size
# free on WORK's disk (prepare writes beside a scratch file; DVC caches the
# splits) and about an hour on 2 CPU cores.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${1:-192}
WORK=${2:-$REPO/benchmarks/out/large-folder}
CACHE=${CACHE:-$REPO/benchmarks/out/bench-memory}
PY=${PYTHON:-python3}
[ -x "$REPO/.venv/bin/python" ] && PY="$REPO/.venv/bin/python"

"$PY" "$REPO/benchmarks/bench_memory.py" --cache "$CACHE" --phases generate   # made once, reused

rm -rf "$WORK"
mkdir -p "$WORK"
SUMMARY="$WORK/summary.txt"
git clone -q "$REPO" "$WORK/cnnpipe"
cd "$WORK/cnnpipe"
{ echo "commit $(git rev-parse --short HEAD), image_size ${SIZE}x${SIZE}, $(date -u +%FT%TZ)";
  grep -E 'MemTotal|MemAvailable' /proc/meminfo; echo "cores $(nproc)"; } > "$SUMMARY"

timed() {  # timed LABEL COMMAND...: run it, append its wall time and peak RSS to the summary
  local label=$1; shift
  /usr/bin/time -f "$label: %e s wall, peak RSS %M kB" -a -o "$SUMMARY" "$@"
}

timed "setup (fresh clone)" bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
cp -r "$CACHE/tree-90000" my_photos && rm -f my_photos/.complete   # the generator's marker is not a photo
timed "dvc add my_photos" dvc add my_photos
# Each stage's peak RSS (VmHWM) and peak own memory (RssAnon), sampled every second while dvc runs them.
"$PY" "$REPO/benchmarks/bench_memory.py" --watch-stages "$WORK/stage-peaks.json" &
SAMPLER_PID=$!
timed "dvc exp run" dvc exp run -S data.dataset=folder -S data.source=my_photos -S "data.image_size=[$SIZE,$SIZE]" \
  -S epochs=1 -S lr=0.003 -S batch_size=100 2>&1 | tee "$WORK/exp-run.log"
kill "$SAMPLER_PID"
timed "cnnpipe predict" cnnpipe predict my_photos/class3/0000*.jpg | tee "$WORK/predict.log"

{ echo "prepared: $(du -sb data/prepared | cut -f1) bytes"; ls -l data/prepared;
  grep -E "^prepare: folder|larger than|read from disk|epoch 1/1: train_loss|^evaluate:" "$WORK/exp-run.log";
  echo "stage peaks (kB): $(cat "$WORK/stage-peaks.json")"; cat reports/metrics.json; } >> "$SUMMARY"
cat "$SUMMARY"
