"""Stage `weights`: the pretrained weights of every torchvision model in params.yaml -> data/weights/.

torchvision weights names are looked up where torchvision caches them
($TORCH_HOME/hub/checkpoints/) and downloaded there when absent; files, URLs
and cnnpipe checkpoints are read from pretrained.weights, pinned by
pretrained.sha256. Everything is verified and converted to safetensors, with
a manifest; nothing is unpickled (cnnpipe.pretrained.fetch). With no
torchvision model (or pretrained.weights: none) the folder holds an empty
manifest. The train stage reads this folder and never downloads.
"""

from __future__ import annotations

import sys

from cnnpipe.codegraph.stage_deps import check_code_deps
from cnnpipe.util.errors import answer_help, run_entry_point


def main() -> int:
    check_code_deps(__file__)  # dvc.yaml must declare every package this stage runs
    from cnnpipe.models.pinned_weights import WEIGHTS_DIR
    from cnnpipe.pretrained.fetch import fetch_weights
    from cnnpipe.params.load import load_params

    params = load_params()
    manifest = fetch_weights(params, WEIGHTS_DIR, progress=sys.stderr.isatty())
    entries = manifest["weights"]
    if not entries:
        print(f"weights: no pretrained torchvision model in params.yaml; wrote an empty {WEIGHTS_DIR}/")
    for arch, entry in entries.items():
        print(f"weights: torchvision:{arch} {entry['weights']} from {entry['source']} "
              f"(SHA-256 {entry['sha256'][:16]}...) -> {WEIGHTS_DIR / entry['file']}")
    return 0


if __name__ == "__main__":
    answer_help(__file__, __doc__)
    run_entry_point(main)
