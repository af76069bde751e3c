"""Memory of ``prepare`` and of training against the dataset's size; mapped vs in-memory throughput.

    python benchmarks/bench_memory.py [--cache benchmarks/out/bench-memory] [--big 90000] [--small 2000]
        [--phases generate,prepare,train,cap,limited,throughput] [--limit-gb 2] [--repeats 5]

Issue 26. Phases (each prints its table and adds to ``benchmarks/out/bench_memory.json``):

* ``generate``: class-per-folder trees of real JPEG files (10 classes,
  128x128 RGB, smooth random content plus noise, so JPEG sizes are
  realistic: ~8 kB), ``--big`` and ``--small`` images, cached under
  ``--cache`` (made once, reused).
* ``prepare``: ``prepare_folder`` (image_size 128x128, 3 channels, the
  README's defaults) of each tree in a fresh process; its peak RSS
  (``VmHWM``) and peak anonymous RSS (``RssAnon`` sampled every 0.1 s by
  this process: memory that is the process's own, as opposed to page cache
  pages it maps) against the prepared size.
* ``train``: one epoch of a 2-run grid on 2 worker processes
  (``ProcessExecutor(2, 1)``, as ``grid.workers: 2``, through the engine's
  real ``PreparedSource``) of a small conv net, on each prepared tree; the
  same two peaks per worker, and the epoch's wall time. The mapped split's
  pages count in ``VmHWM`` when they are resident (they are the page
  cache's, shared by both workers and reclaimable), so ``RssAnon`` is the
  figure that shows what a worker holds of its own.
* ``cap``: the big tree's ``train`` phase ``--repeats`` times with the
  resident-page cap (``data.resident_pages``, cnnpipe's default budget) and
  without it (a budget no split reaches), interleaved: the cap's cost in
  epoch time and what it saves in peak RSS.
* ``limited``: the big tree's one-epoch run in one process inside a memory
  cgroup (v1 ``memory.limit_in_bytes``, ``--limit-gb``, default 2 GB,
  created under this process's own memory cgroup and removed after), so
  the train split is larger than the memory the process may use, page
  cache included; the epoch's wall time and peak.
* ``throughput``: one ``fashion_tutorial`` epoch (batch 100, as
  ``bench_engine.py``) on real Fashion-MNIST (``data/prepared``, else
  prepared from ``/usr/share/datasets/fashion-mnist`` into the cache),
  mapped split vs the split read into memory (``mmap=False``), interleaved,
  ``--repeats`` each, medians.

``limited`` needs root and a v1 memory cgroup; elsewhere it is skipped with
a line saying why. The 90,000-image tree takes ~0.35 GB of JPEG files and
4.4 GB prepared (twice that while ``prepare`` runs): ``--cache`` should be
on a disk with ~15 GB free.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from summary import record  # noqa: E402

SIZE = 128
CLASSES = 10
# Cheap on purpose (the epoch measures the data path, not a model): 128x128 -> 32x32 first.
NET = [{"avgpool": 4}, {"conv": 8, "kernel": 3, "padding": 1}, "relu", {"maxpool": 2}, "flatten", "linear"]
OUT = ROOT / "benchmarks" / "out" / "bench_memory.json"


# --------------------------------------------------------------------------- generate


def _make_images(args: tuple[str, int, int, int]) -> None:
    """Write images ``first..last-1`` of a tree (one process of the pool)."""
    import numpy as np
    from PIL import Image

    root, first, last, seed = args
    for i in range(first, last):
        label = i % CLASSES
        path = Path(root) / f"class{label}" / f"{i:06d}.jpg"
        if path.exists():
            continue
        rng = np.random.default_rng(seed * 1_000_003 + i)
        coarse = rng.uniform(0, 255, size=(6, 6, 3)).astype(np.float32)
        coarse[..., label % 3] = coarse[..., label % 3] * 0.5 + 120  # a class tint
        smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC), np.float32)
        pixels = np.clip(smooth + rng.normal(0, 6, size=smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=85)


def generate(root: Path, count: int, seed: int) -> dict[str, float]:
    """A cached tree of ``count`` JPEGs under ``root`` (made once)."""
    from multiprocessing import Pool

    done = root / ".complete"
    if done.exists() and int(done.read_text()) == count:
        files = list(root.rglob("*.jpg"))
        return {"images": len(files), "bytes": sum(f.stat().st_size for f in files), "seconds": 0.0}
    for label in range(CLASSES):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    step = 2000
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_make_images, [(str(root), s, min(s + step, count), seed) for s in range(0, count, step)])
    done.write_text(str(count))
    files = list(root.rglob("*.jpg"))
    return {"images": len(files), "bytes": sum(f.stat().st_size for f in files),
            "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- measuring a process


def _status(pid: int) -> dict[str, int]:
    """kB fields of /proc/<pid>/status (VmHWM, VmRSS, RssAnon, RssFile)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class Sampler:
    """Peak ``RssAnon`` and ``VmHWM`` of some processes, sampled every ``interval`` s (0.1) in a thread."""

    def __init__(self, pids: callable, interval: float = 0.1) -> None:  # type: ignore[valid-type]
        self.pids = pids
        self.interval = interval
        self.peaks: dict[int, dict[str, int]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for pid in self.pids():
                now = _status(pid)
                peak = self.peaks.setdefault(pid, {"RssAnon": 0, "VmHWM": 0})
                for key in peak:
                    peak[key] = max(peak[key], now.get(key, 0))
            self.stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _stage_pids() -> dict[int, str]:
    """Running ``stages/<name>.py`` processes: pid -> stage name."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        stage = re.search(r"stages/(\w+)\.py", command)
        if stage:
            found[int(entry)] = stage.group(1)
    return found


def watch_stages(out: Path) -> None:
    """Each pipeline stage's peak ``VmHWM`` and ``RssAnon`` (kB), sampled every second, rewritten to ``out`` every
    second until this process is killed (``fresh_clone_large_folder.sh`` runs it beside ``dvc exp run``)."""
    names: dict[int, str] = {}

    def pids() -> list[int]:
        current = _stage_pids()
        names.update(current)
        return list(current)

    with Sampler(pids, interval=1.0) as sampler:
        while True:
            time.sleep(1.0)
            peaks: dict[str, dict[str, int]] = {}
            for pid, peak in list(sampler.peaks.items()):
                entry = peaks.setdefault(names[pid], {"VmHWM_kB": 0, "RssAnon_kB": 0})
                for key in ("VmHWM", "RssAnon"):
                    entry[key + "_kB"] = max(entry[key + "_kB"], peak[key])
            out.with_suffix(".tmp").write_text(json.dumps(peaks, indent=1))
            out.with_suffix(".tmp").replace(out)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _gb(kb: float) -> float:
    return round(kb / 1024**2, 3)


# --------------------------------------------------------------------------- prepare


PREPARE = """
import sys, time
from pathlib import Path
from cnnpipe.data.folder_prepare import describe, prepare_folder
start = time.perf_counter()
result = prepare_folder(sys.argv[1], sys.argv[2], image_size=[128, 128], channels=3, val_fraction=0.1,
                        test_fraction=0.2, split_seed=0, samples_path=Path(sys.argv[2]).parent / "samples.png")
print("\\n".join(describe(result, sys.argv[1], True)), file=sys.stderr)
status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines())
print(int(status["VmHWM"].split()[0]), time.perf_counter() - start)
"""


def prepare(tree: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", PREPARE, str(tree), str(out)], env=env, stdout=subprocess.PIPE,
                            text=True)
    with Sampler(lambda: [proc.pid]) as sampler:
        stdout, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"prepare of {tree} failed")
    hwm, seconds = stdout.split()
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"prepared_gb": round(size / 1e9, 3), "peak_rss_gb": _gb(int(hwm)),
            "peak_anon_gb": _gb(sampler.peaks.get(proc.pid, {}).get("RssAnon", 0)), "seconds": round(float(seconds), 1)}


# --------------------------------------------------------------------------- train


def _train_one(lr: float, prepared: str, fingerprint: str, budget: int | None = None) -> dict[str, float]:
    """One run of one epoch in a worker process, as the grid runs it; its own peaks and epoch time.

    ``budget``: ``resident_pages.BUDGET_BYTES`` in this worker (None: cnnpipe's default).
    """
    from cnnpipe.search.trial_data import PreparedSource
    from cnnpipe.data import resident_pages

    if budget is not None:
        resident_pages.BUDGET_BYTES = budget
    from cnnpipe.engine.loop import train_run
    from cnnpipe.params.run_config import RunConfig
    from cnnpipe.params.values import TrainingValues

    data = PreparedSource(Path(prepared), fingerprint).load()
    cfg = RunConfig(values=TrainingValues(model="bench", epochs=1, batch_size=128, lr=lr), layers=tuple(NET),
                    dataset="folder")
    start = time.perf_counter()
    result = train_run(cfg, data, progress=False)
    status = _status(os.getpid())
    return {"pid": os.getpid(), "seconds": time.perf_counter() - start, "vmhwm_kb": status.get("VmHWM", 0),
            "val_top1": result.history[-1].val_top1 if result.history else float("nan"),
            "train_images": len(data.train)}


def train(prepared: Path, budget: int | None = None) -> dict[str, object]:
    from cnnpipe.search.backend_pool import ProcessExecutor
    from cnnpipe.data.prepared import load_stats

    fingerprint = load_stats(prepared).fingerprint
    executor = ProcessExecutor(2, 1)
    me = os.getpid()

    def workers() -> list[int]:  # the pool's processes (and the resource tracker, which stays tiny)
        return [pid for child in _children(me) for pid in [child, *_children(child)]]

    start = time.perf_counter()
    with Sampler(workers) as sampler:
        results = list(executor.map(_train_one, [(0.01, str(prepared), fingerprint, budget),
                                                    (0.003, str(prepared), fingerprint, budget)]))
    wall = time.perf_counter() - start
    out = []
    for r in results:
        peak = sampler.peaks.get(int(r["pid"]), {})
        out.append({"epoch_s": round(float(r["seconds"]), 1), "peak_rss_gb": _gb(max(int(r["vmhwm_kb"]), peak.get("VmHWM", 0))),
                    "peak_anon_gb": _gb(peak.get("RssAnon", 0)), "val_top1": round(float(r["val_top1"]), 4)})
    size = sum(f.stat().st_size for f in prepared.glob("*.safetensors"))
    return {"prepared_gb": round(size / 1e9, 3), "train_images": results[0]["train_images"], "wall_s": round(wall, 1),
            "workers": out}


# --------------------------------------------------------------------------- limited memory


LIMITED = """
import os, sys, time
from pathlib import Path
from cnnpipe.engine.data import TrainData
from cnnpipe.engine.loop import train_run
from cnnpipe.params.run_config import RunConfig
from cnnpipe.params.values import TrainingValues
data = TrainData.load(sys.argv[1], splits=("train", "val"))
cfg = RunConfig(values=TrainingValues(model="bench", epochs=1, batch_size=128, lr=0.01), layers=tuple(%r), dataset="folder")
start = time.perf_counter()
result = train_run(cfg, data, progress=False)
status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines())
print(time.perf_counter() - start, result.history[-1].epoch_seconds, int(status["VmHWM"].split()[0]),
      result.history[-1].val_top1, len(data.train))
""" % (NET,)


def limited(prepared: Path, limit_gb: float) -> dict[str, object] | None:
    """One epoch in a v1 memory cgroup of ``limit_gb`` (page cache included) made under our own cgroup."""
    mine = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                 if line.split(":")[1] == "memory"), None)
    if os.geteuid() != 0 or mine is None or not Path("/sys/fs/cgroup/memory").is_dir():
        print("limited: skipped (needs root and a v1 memory cgroup at /sys/fs/cgroup/memory)", flush=True)
        return None
    group = Path("/sys/fs/cgroup/memory") / mine.lstrip("/") / f"bench-memory-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(int(limit_gb * 1024**3)))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CNNPIPE_PROGRESS_EVERY": "30"}
        # drop the split's clean pages from the page cache first, so the run starts cold
        subprocess.run(["dd", f"of={prepared / 'train.safetensors'}", "oflag=nocache", "conv=notrunc,fdatasync",
                        "count=0", "status=none"], check=False)
        proc = subprocess.Popen(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1" "$2"',
                                 sys.executable, LIMITED, str(prepared)], env=env, stdout=subprocess.PIPE, text=True)
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"the limited run failed (exit {proc.returncode})")
        total, epoch_s, hwm, top1, n = stdout.split()
        usage = int((group / "memory.max_usage_in_bytes").read_text())
        failcnt = int((group / "memory.failcnt").read_text())
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    size = (prepared / "train.safetensors").stat().st_size
    return {"limit_gb": limit_gb, "train_split_gb": round(size / 1e9, 3), "train_images": int(n),
            "run_s": round(float(total), 1), "epoch_s": round(float(epoch_s), 1), "peak_rss_gb": _gb(int(hwm)),
            "cgroup_max_usage_gb": round(usage / 1024**3, 3), "cgroup_limit_hits": failcnt, "val_top1": float(top1)}


# --------------------------------------------------------------------------- throughput


def throughput(prepared: Path, repeats: int) -> dict[str, object]:
    import torch

    from bench_engine import engine_epoch
    from cnnpipe.engine.data import TrainData

    threads = torch.get_num_threads()
    variants = {"mapped": TrainData.load(prepared), "in_memory": TrainData.load(prepared, mmap=False)}
    for data in variants.values():
        engine_epoch(data, threads)  # warm-up (and the mapped pages into the page cache)
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repeats):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in order:
            runs[name].append(engine_epoch(variants[name], threads))
            print(f"  repeat {rep + 1}: {name:<10} {runs[name][-1]:>8.0f} images/s", flush=True)
    med = {name: statistics.median(values) for name, values in runs.items()}
    return {"images_per_s": {k: round(v) for k, v in med.items()}, "runs": runs,
            "mapped_vs_in_memory": round(med["mapped"] / med["in_memory"], 4), "threads": threads,
            "loadavg": os.getloadavg()[0]}


def fashion_prepared(cache: Path) -> Path:
    """Real Fashion-MNIST prepared: ``data/prepared`` when it is that, else prepared under ``cache``."""
    import json as json_mod

    project = ROOT / "data" / "prepared"
    if (project / "stats.json").exists() and json_mod.loads((project / "stats.json").read_text()).get("dataset") == "fashion-mnist":
        return project
    out = cache / "fashion-mnist-prepared"
    if (out / "stats.json").exists():
        return out
    import shutil

    from cnnpipe.data.prepare import prepare_dataset
    from cnnpipe.data.registry import get_dataset

    raw = cache / "fashion-mnist-raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in Path("/usr/share/datasets/fashion-mnist").glob("*.gz"):
        shutil.copy(f, raw / f.name)
    prepare_dataset(get_dataset("fashion-mnist"), raw, out, val_fraction=0.1, split_seed=0)
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "out" / "bench-memory",
                        help="where the generated trees and prepared data live (made once, reused)")
    parser.add_argument("--big", type=int, default=90_000)
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--phases", default="generate,prepare,train,limited,throughput")
    parser.add_argument("--limit-gb", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--watch-stages", type=Path, metavar="FILE",
                        help="no phases: write each running pipeline stage's peak memory to FILE until killed")
    args = parser.parse_args()
    if args.watch_stages:
        watch_stages(args.watch_stages)
        return 0
    phases = set(args.phases.split(","))
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results["machine"] = {"cores": os.cpu_count(), "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
                          "loadavg_at_start": os.getloadavg()[0]}
    sizes = {"small": args.small, "big": args.big}

    def save() -> None:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2))

    for name, count in sizes.items():
        tree, prepared = args.cache / f"tree-{count}", args.cache / f"prepared-{count}" / "prepared"
        if "generate" in phases:
            results.setdefault("generate", {})[name] = info = generate(tree, count, seed=1)
            print(f"generate {name}: {info['images']:,} JPEGs, {info['bytes'] / 1e6:.0f} MB, {info['seconds']:.0f} s", flush=True)
        if "prepare" in phases:
            results.setdefault("prepare", {})[name] = info = prepare(tree, prepared)
            print(f"prepare {name}: {info}", flush=True)
            save()
        if "train" in phases:
            results.setdefault("train", {})[name] = info = train(prepared)
            print(f"train {name}: {info}", flush=True)
            save()
    if "cap" in phases:  # the big tree's train phase with cnnpipe's resident-page cap and without, interleaved
        prepared = args.cache / f"prepared-{args.big}" / "prepared"
        runs: dict[str, list[dict[str, object]]] = {"capped": [], "uncapped": []}
        for rep in range(args.repeats):
            for name in (["capped", "uncapped"] if rep % 2 == 0 else ["uncapped", "capped"]):
                info = train(prepared, budget=None if name == "capped" else 1 << 62)
                runs[name].append(info)
                print(f"cap {name} repeat {rep + 1}: {info}", flush=True)
        results["cap"] = runs
        save()
    if "limited" in phases:
        info = limited(args.cache / f"prepared-{args.big}" / "prepared", args.limit_gb)
        if info is not None:
            results["limited"] = info
            print(f"limited: {info}", flush=True)
            record("memory", f"epoch of a {info['train_split_gb']} GB split in {args.limit_gb} GB of memory",
                   info["epoch_s"], "s")
            save()
    if "throughput" in phases:
        results["throughput"] = info = throughput(fashion_prepared(args.cache), args.repeats)
        print(f"throughput: {info['images_per_s']} mapped/in-memory {info['mapped_vs_in_memory']}", flush=True)
        record("memory", "engine epoch, mapped split", info["images_per_s"]["mapped"], "images/s (median)",
               info["mapped_vs_in_memory"], "in-memory split")
        save()
    for name in ("prepare", "train"):
        for size, info in results.get(name, {}).items():
            peak = max(w["peak_rss_gb"] for w in info["workers"]) if name == "train" else info["peak_rss_gb"]
            record("memory", f"{name} peak RSS, {size} tree", peak, "GB")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
