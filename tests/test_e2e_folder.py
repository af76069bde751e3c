"""Your own images end to end: `dvc add` a class-per-folder tree, `dvc repro`, predict; an added image re-runs prepare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fixtures_images import COLORS, image_bytes, make_tree
from project_builder import DVC, assert_reads_declared, commit_all, pipeline_project, run_ok
from synthetic import TINY

pytestmark = pytest.mark.long(30)


@pytest.mark.slow
def test_dvc_repro_trains_on_a_dvc_added_folder_and_reruns_prepare_when_it_changes(tmp_path: Path) -> None:
    project = pipeline_project(tmp_path / "project", "unused", {},
                               params={"model": "tiny", "models": {"tiny": TINY}, "lr": 0.05})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update({"mirrors": [], "checksums": {}, "val_fraction": 0.25, "test_fraction": 0.25})
    params["mlflow"]["enabled"] = False  # tracking is covered elsewhere; keep this test short
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(project, "pipeline")
    make_tree(project / "my_images", {"cat": 8, "dog": 8})
    (project / "my_images" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really")

    # The README's commands ("Your own images"), with a small image size for speed.
    run_ok([DVC, "add", "-q", "my_images"], project)
    reads = tmp_path / "reads"
    out = run_ok([DVC, "exp", "run", "-S", "data.dataset=folder", "-S", "data.source=my_images",
                  "-S", "data.image_size=[16,16]", "-S", "eval.top_k=[1,2]"], project, timeout=900,
                 env={"CNNPIPE_RECORD_PARAMS": str(reads)}).stdout
    recorded = assert_reads_declared(project, reads)  # the folder path reads its own keys: declared too
    assert {"data.source", "data.image_size"} <= recorded["prepare"]
    assert "skipped 1 unreadable image(s): dog/broken.jpg" in out
    stats = json.loads((project / "data/prepared/stats.json").read_text())
    assert stats["dataset"] == "folder" and stats["classes"] == ["cat", "dog"] and stats["image_shape"] == [3, 16, 16]
    assert sum(stats["sizes"].values()) == 16
    model = json.loads((project / "models/best/model.json").read_text())
    assert model["classes"] == ["cat", "dog"] and model["in_shape"] == [3, 16, 16] and model["dataset"] == "folder"
    assert "test_top1" in json.loads((project / "reports/metrics.json").read_text())

    photo = tmp_path / "photo.jpg"  # another size, RGB: resized like the training images, without a warning
    photo.write_bytes(image_bytes(COLORS["dog"], seed=4242, size=(90, 60), fmt="JPEG"))
    done = run_ok([str(Path(DVC).parent / "cnnpipe"), "predict", str(photo), "--top-k", "2"], project)
    assert done.stderr == "" and "dog" in done.stdout and "cat" in done.stdout

    (project / "my_images" / "cat" / "new.png").write_bytes(image_bytes(COLORS["cat"], seed=777))
    run_ok([DVC, "add", "-q", "my_images"], project)
    status = run_ok([DVC, "status", "download"], project).stdout
    assert "my_images" in status and "modified" in status
    again = run_ok([DVC, "repro", "prepare"], project, timeout=600).stdout
    assert "Running stage 'prepare'" in again
    assert sum(json.loads((project / "data/prepared/stats.json").read_text())["sizes"].values()) == 17


@pytest.mark.slow
def test_switching_to_a_folder_dataset_with_S_prints_no_missing_hash_warning(tmp_path: Path) -> None:
    """A committed dvc.lock of a benchmark dataset, then ``dvc exp run -S data.dataset=folder``.

    The download stage's out was ``data/raw/${data.dataset}``: the lock had no hash for
    ``data/raw/folder``, and DVC warned "No file hash info found for '.../data/raw/folder'.
    It won't be created." The out is now the fixed ``data/raw``.
    """
    import contextlib

    from fixtures_raw import make_idx_raw, serve
    from project_builder import run

    raw = make_idx_raw(tmp_path / "www", n_train=50, n_test=20)
    with contextlib.contextmanager(serve)(raw.folder) as server:
        project = pipeline_project(tmp_path / "project", server.url, raw.checksums, commit=True)
        run_ok([DVC, "repro", "download"], project)
    make_tree(project / "my_images", {"cat": 4, "dog": 4})
    run_ok([DVC, "add", "-q", "my_images"], project)
    commit_all(project, "baseline: the benchmark dataset downloaded")
    done = run([DVC, "exp", "run", "download", "-S", "data.dataset=folder", "-S", "data.source=my_images"], project,
               timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Running stage 'download'" in done.stdout and "8 files used in place" in done.stdout
    assert "No file hash info" not in done.stdout + done.stderr, done.stderr
    assert json.loads((project / "data/raw/folder/source.json").read_text())["files"] == 8
