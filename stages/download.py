"""Stage `download`: put the dataset's verified raw files in data/raw/<dataset>/.

Sources, in order: data.mirrors, OS-packaged copies (e.g. Debian's
/usr/share/datasets), upstream. See cnnpipe.data.download for the rules.
For `data.dataset: folder` (your own images), data.source is fingerprinted in
place or, for an archive, fetched and unpacked: see cnnpipe.data.folder_source.
"""

from __future__ import annotations

import time
from pathlib import Path

from cnnpipe.codegraph.stage_deps import check_code_deps
from cnnpipe.util.errors import answer_help, run_entry_point


def main() -> int:
    check_code_deps(__file__)  # dvc.yaml must declare every package this stage runs
    from cnnpipe.params.stage_sections import load_sections

    params = load_sections("data")  # validates what this stage reads before anything is written
    from cnnpipe.data.download import download_dataset
    from cnnpipe.data.registry import get_dataset
    from cnnpipe.util.paths import project_root

    data = params.data
    spec = get_dataset(data.dataset)
    dest = Path("data/raw") / spec.name
    start = time.perf_counter()
    if spec.is_folder:
        from cnnpipe.data.folder_source import prepare_source

        done = prepare_source(data.source, dest, sha256=data.sha256, timeout=data.download.timeout,
                              retries=data.download.retries, echo=lambda line: print(f"download: {line}"))
        print(f"download: folder: {done.manifest['files']:,} files from {data.source} ({time.perf_counter() - start:.1f} s)")
        return 0
    fetched = download_dataset(
        spec,
        dest,
        mirrors=data.mirrors,
        checksums=data.checksums,
        timeout=data.download.timeout,
        retries=data.download.retries,
        base_dir=project_root(),  # relative mirrors are relative to the project, even in a queued experiment
    )
    size = sum((dest / f.name).stat().st_size for f in fetched)
    print(f"download: {spec.name}: {len(fetched)} files, {size / 1e6:.1f} MB in {dest} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    answer_help(__file__, __doc__)
    run_entry_point(main)
