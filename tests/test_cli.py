"""The ``cnnpipe`` command: predict, runs, show-model, validate, and every error as one line.

A tiny real pipeline (train + evaluate stage scripts on synthetic prepared
data, MLflow off) gives a checkpoint and the evaluate stage's
``confusion.csv``; ``cnnpipe predict`` on PNGs of the same test images must
give the same classes. Error paths run ``cnnpipe.cli.main.main`` in-process (the
same ``run_entry_point`` as the console script), one real console-script
call checks the installed entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cnnpipe.cli.main import main
from project_builder import BIN, clean_env, run_stage, stage_project

N_TEST = 24
PICKED = [0, 3, 7, 12, 23]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``work/`` after the train and evaluate stages: models/best, reports/*.csv, data/prepared."""
    work, root = stage_project(tmp_path_factory.mktemp("cli"), stages=("train", "evaluate"), n_test=N_TEST,
                               epochs=1, mlflow={"enabled": False})
    for stage in ("train", "evaluate"):
        done = run_stage(work, root, stage=stage)
        assert done.returncode == 0, done.stderr[-3000:]
    return work


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``cnnpipe ARGV`` in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out, out.err


def held_out_images(work: Path) -> np.ndarray:
    """The prepared test split (uint8 N x 1 x 28 x 28), in confusion.csv's row order."""
    from cnnpipe.data.prepared import load_split

    return load_split(work / "data" / "prepared", "test").images.numpy()


def write_pngs(folder: Path, images: np.ndarray, indices: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        path = folder / f"test_{i:03d}.png"
        Image.fromarray(images[i][0], mode="L").save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- predict


@pytest.mark.slow
def test_predict_json_matches_the_evaluate_stage(trained: Path, tmp_path: Path) -> None:
    """The real console script, on PNGs of test images: same classes as reports/confusion.csv."""
    pngs = write_pngs(tmp_path / "pngs", held_out_images(trained), PICKED)
    done = subprocess.run([str(BIN / "cnnpipe"), "predict", *map(str, pngs), "--model", str(trained / "models" / "best"),
                           "--json", "--top-k", "3"], cwd=trained, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # same format and size as training: nothing converted
    results = [json.loads(line) for line in done.stdout.splitlines()]
    confusion = pd.read_csv(trained / "reports" / "confusion.csv")
    assert len(confusion) == N_TEST
    assert [r["image"] for r in results] == [str(p) for p in pngs]
    assert [r["predictions"][0]["class"] for r in results] == confusion["predicted"].iloc[PICKED].tolist()
    for r in results:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
        assert r["notes"] == []


@pytest.mark.slow
def test_predict_table_on_a_folder(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mine"
    write_pngs(folder, held_out_images(trained), PICKED[:3])
    (folder / "notes.txt").write_text("not an image, and not picked up: wrong suffix")
    code, out, err = cli(capsys, "predict", str(folder), "--model", str(trained / "models" / "best"), "--top-k", "2")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.startswith(str(folder / "test_")) for line in lines)
    assert all(line.count("%") == 2 for line in lines)  # "class0 93.1%  class4 2.0%"


@pytest.mark.slow
def test_predict_converts_colour_and_size_with_a_warning(trained: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """An RGB 56x56 copy of a test image: grayscale + resize warnings, and still the same class."""
    image = held_out_images(trained)[PICKED[0]][0]
    rgb = Image.fromarray(np.stack([image] * 3, axis=-1), mode="RGB").resize((56, 56), Image.Resampling.NEAREST)
    path = tmp_path / "big_rgb.png"
    rgb.save(path)
    code, out, err = cli(capsys, "predict", str(path), "--model", str(trained / "models" / "best"), "--json")
    assert code == 0
    assert err.splitlines() == [f"warning: {path}: converted RGB to grayscale",
                                f"warning: {path}: resized 56x56 to 28x28"]
    result = json.loads(out)
    expected = pd.read_csv(trained / "reports" / "confusion.csv")["predicted"].iloc[PICKED[0]]
    assert result["predictions"][0]["class"] == expected
    assert result["notes"] == ["converted RGB to grayscale", "resized 56x56 to 28x28"]


def test_predict_on_an_rgb_model_converts_grayscale_and_16_bit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 3x32x32 checkpoint (untrained: only the input handling matters here)."""
    from cnnpipe.models.checkpoint import save_checkpoint
    from cnnpipe.models.build import build_model
    from project_builder import TINY

    model = build_model(TINY, (3, 32, 32), 10)
    save_checkpoint(tmp_path / "rgb_model", model, {
        "model": "tiny", "layers": TINY, "in_shape": [3, 32, 32], "num_classes": 10,
        "classes": [f"c{i}" for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3,
    })
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((32, 32), 128, np.uint8), mode="L").save(gray)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(deep)
    code, out, err = cli(capsys, "predict", str(gray), str(deep), "--model", str(tmp_path / "rgb_model"), "--json")
    assert code == 0, err
    assert err.splitlines() == [f"warning: {gray}: converted L to RGB",
                                f"warning: {deep}: scaled 16-bit to 8-bit", f"warning: {deep}: converted L to RGB"]
    assert len(out.splitlines()) == 2

    from cnnpipe.cli.commands import load_image

    array, _ = load_image(deep, (1, 32, 32))
    assert array.shape == (1, 32, 32) and int(array.max()) == round(40000 / 257)  # rescaled, not clipped at 255


def test_predict_reads_every_readable_image_and_names_the_unreadable_ones(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated file among good PNGs: the good ones are predicted, the bad one is named, exit 1."""
    from cnnpipe.models.build import build_model
    from cnnpipe.models.checkpoint import save_checkpoint
    from project_builder import TINY

    model = tmp_path / "model"
    save_checkpoint(model, build_model(TINY, (1, 28, 28), 10), {
        "model": "tiny", "layers": TINY, "in_shape": [1, 28, 28], "num_classes": 10,
        "classes": [f"c{i}" for i in range(10)], "mean": [0.5], "std": [0.25],
    })
    photos = tmp_path / "my_photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "d.png"):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L").save(photos / name)
    whole = (photos / "a.png").read_bytes()
    (photos / "c.png").write_bytes(whole[: len(whole) // 2])  # truncated mid-stream
    good = [str(photos / name) for name in ("a.png", "b.png", "d.png")]

    code, out, err = cli(capsys, "predict", str(photos), "--model", str(model))
    assert code == 1
    assert [line.split()[0] for line in out.splitlines()] == good
    assert err.splitlines() == [f"error: 1 of 4 images are unreadable and were not predicted: {photos / 'c.png'} "
                                "(truncated); replace or remove them (the others were predicted)"]

    code, out, err = cli(capsys, "predict", str(photos), "--model", str(model), "--json")
    entries = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and [e["image"] for e in entries] == sorted([*good, str(photos / "c.png")])
    assert entries[2] == {"image": str(photos / "c.png"), "error": "not a readable image (truncated)"}
    assert all(len(e["predictions"]) == 3 and "error" not in e for i, e in enumerate(entries) if i != 2)
    assert len(err.splitlines()) == 1 and err.startswith("error: 1 of 4 images are unreadable")

    for i in range(6):  # many bad files: the first few by name, the rest counted
        (photos / f"z{i}.png").write_text("not a png")
    code, out, err = cli(capsys, "predict", str(photos), "--model", str(model))
    assert code == 1 and len(out.splitlines()) == 3
    (line,) = err.splitlines()
    assert line.startswith("error: 7 of 10 images are unreadable") and line.count(str(photos)) == 5
    assert f"{photos / 'z3.png'} (not an image) and 2 more;" in line and "z4.png" not in line


# --------------------------------------------------------------------------- one-line errors


def one_line_error(code: int, out: str, err: str) -> str:
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing file", "text as png", "folder without images", "top-k too large"])
def test_predict_input_errors_are_one_line(case: str, trained: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model = ["--model", str(trained / "models" / "best")]
    if case == "missing file":
        args, expected = [str(tmp_path / "nope.png")], f"{tmp_path / 'nope.png'}: no such file or folder"
    elif case == "text as png":
        fake = tmp_path / "fake.png"
        fake.write_text("this is text, not a PNG")
        args, expected = [str(fake)], f"{fake}: not a readable image"
    elif case == "folder without images":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.txt").write_text("hi")
        args, expected = [str(tmp_path / "empty")], f"{tmp_path / 'empty'}: folder has no images"
    else:
        png = write_pngs(tmp_path, held_out_images(trained), [0])[0]
        args, expected = [str(png), "--top-k", "11"], "--top-k must be between 1 and 10"
    line = one_line_error(*cli(capsys, "predict", *args, *model))
    assert line.startswith(f"error: {expected}"), line


@pytest.mark.slow
@pytest.mark.parametrize("case", ["random bytes as weights", "no model.json", "no such folder", "pickle as weights"])
def test_predict_refuses_checkpoints_that_are_not_ours(case: str, trained: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    png = write_pngs(tmp_path / "in", held_out_images(trained), [0])[0]
    bad = tmp_path / "bad_model"
    bad.mkdir()
    sidecar = (trained / "models" / "best" / "model.json").read_text()
    if case == "random bytes as weights":
        (bad / "model.json").write_text(sidecar)
        (bad / "model.safetensors").write_bytes(os.urandom(4096))
        expected = f"{bad / 'model.safetensors'} is "
    elif case == "pickle as weights":
        import pickle

        (bad / "model.json").write_text(sidecar)
        (bad / "model.safetensors").write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=4))
        expected = f"{bad / 'model.safetensors'} is a Python pickle, not safetensors"
    elif case == "no model.json":
        (bad / "model.safetensors").write_bytes((trained / "models" / "best" / "model.safetensors").read_bytes())
        expected = f"{bad / 'model.json'} is missing; this is not a cnnpipe checkpoint folder"
    else:
        bad = tmp_path / "nowhere"
        expected = f"{bad}: no such checkpoint folder"
    line = one_line_error(*cli(capsys, "predict", str(png), "--model", str(bad)))
    assert line.startswith(f"error: {expected}"), line


def test_runs_before_any_training_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(*cli(capsys, "runs", "--reports", str(tmp_path / "reports")))
    assert line == f"error: {tmp_path / 'reports' / 'grid.csv'} not found; run the train stage first (dvc repro train)"


def test_ui_before_any_training_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    line = one_line_error(*cli(capsys, "ui"))
    assert line.startswith(f"error: no MLflow store at {tmp_path / 'mlflow.db'} yet; run the pipeline first")


def test_ui_on_a_busy_port_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    (tmp_path / "mlflow.db").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(*cli(capsys, "ui", "--port", str(port)))
    assert line == (f"error: port {port} on 127.0.0.1 is in use (another MLflow UI?); "
                    f"open http://127.0.0.1:{port} or pass --port N")


def test_show_model_unknown_name_and_bad_params_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    line = one_line_error(*cli(capsys, "show-model", "resnet9000"))
    assert line.startswith("error: no model named 'resnet9000'; known: small_bn, fashion_tutorial")
    bad = tmp_path / "params.yaml"
    bad.write_text("lrate: 0.1\n")
    code, out, err = cli(capsys, "--params", str(bad), "validate")
    assert code == 2
    assert one_line_error(code, out, err).startswith(f"error: {bad}: unknown key 'lrate'")


# --------------------------------------------------------------------------- runs, show-model, validate


@pytest.mark.slow
def test_runs_prints_the_grid_with_the_selected_run_marked(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = pd.read_csv(trained / "reports" / "grid.csv", dtype={"run_id": str})
    selected = json.loads((trained / "reports" / "train.json").read_text())["run_id"]
    code, out, err = cli(capsys, "runs", "--reports", str(trained / "reports"))
    assert code == 0 and err == ""
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["best", "run_id", "run_name", "lr"]  # lr is the only grid axis
    assert len(rows) == len(grid) == 2
    marked = [row for row in rows if row.lstrip().startswith("*")]
    assert len(marked) == 1 and selected in marked[0]
    code, out, _ = cli(capsys, "runs", "--reports", str(trained / "reports"), "--all-columns")
    assert code == 0 and {"optimizer", "seed", "mlflow_run_id"} <= set(out.splitlines()[0].split())


def test_runs_keeps_all_digit_run_ids_as_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    pd.DataFrame([{"run_id": "0123456789", "run_name": "lr=0.01", "lr": 0.01, "status": "finished",
                   "val_loss": 0.5}]).to_csv(reports / "grid.csv", index=False)
    (reports / "train.json").write_text(json.dumps({"run_id": "0123456789"}))
    code, out, _ = cli(capsys, "runs", "--reports", str(reports))
    assert code == 0 and out.splitlines()[1].split()[:2] == ["*", "0123456789"]


def test_runs_shows_each_varying_axis_of_a_27_point_grid_uncut(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import itertools

    reports = tmp_path / "reports"
    reports.mkdir()
    grid = [{"run_id": f"{i:010x}", "run_name": f"lr={lr},batch_size={bs},weight_decay={wd}", "lr": lr,
             "batch_size": bs, "weight_decay": wd, "seed": 42, "status": "finished", "val_loss": 0.5}
            for i, (lr, bs, wd) in enumerate(itertools.product([0.03, 0.003, 0.0003], [16, 64, 256],
                                                               [0.0, 0.0001, 0.001]))]
    pd.DataFrame(grid).to_csv(reports / "grid.csv", index=False)
    code, out, _ = cli(capsys, "runs", "--reports", str(reports))
    header, *rows = out.splitlines()
    assert code == 0 and header.split()[:6] == ["best", "run_id", "run_name", "lr", "batch_size", "weight_decay"]
    assert "seed" not in header.split() and "..." not in out and len(rows) == 27
    for row, run in zip(rows, grid):
        assert row.split()[:2] == [run["run_id"], run["run_name"]]


def test_show_model_and_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from project_builder import write_params

    write_params(tmp_path)
    params = str(tmp_path / "params.yaml")
    code, out, err = cli(capsys, "--params", params, "show-model", "tiny")
    assert code == 0 and err == ""
    assert out.splitlines()[0] == "model tiny on fashion-mnist 1x28x28"
    assert "conv" in out and "linear" in out
    code, out, _ = cli(capsys, "--params", params, "show-model", "cifar_net", "--dataset", "cifar10")
    assert code == 0 and "3x32x32" in out.splitlines()[0]
    code, out, _ = cli(capsys, "--params", params, "validate")
    assert code == 0 and out.strip() == f"{params}: ok — dataset fashion-mnist, 2 run(s) (lr(2)), exhaustive"


def test_help_is_instant_and_lists_every_command() -> None:
    """``cnnpipe --help`` must not import torch or mlflow (it is the first thing a user types)."""
    code = ("import sys; from cnnpipe.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'mlflow', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("validate", "show-model", "predict", "runs", "ui"):
        assert command in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_a_broken_commands_module_is_shown_not_hidden(tmp_path: Path) -> None:
    """Only optional third-party imports may be guarded: an ImportError in our own commands.py must surface."""
    import shutil

    import cnnpipe

    shadow = tmp_path / "cnnpipe"
    shutil.copytree(Path(cnnpipe.__file__).parent, shadow, ignore=shutil.ignore_patterns("__pycache__"))
    (shadow / "cli" / "commands.py").write_text("raise ImportError('commands.py is broken')\n")
    env = clean_env(extra={"PYTHONPATH": str(tmp_path)})
    done = subprocess.run([sys.executable, "-m", "cnnpipe", "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "ImportError: commands.py is broken" in done.stderr, done.stdout + done.stderr
    assert "validate" not in done.stdout  # no help that silently lacks predict/runs/ui


# --------------------------------------------------------------------------- export-images


@pytest.mark.slow
def test_export_images_round_trips_pixels_and_feeds_predict(trained: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``cnnpipe export-images``: PNGs equal to the prepared pixels, true class in the name, predict reads them as-is."""
    from cnnpipe.data.prepared import load_split, load_stats

    out = tmp_path / "samples"
    prepared = str(trained / "data" / "prepared")
    code, stdout, err = cli(capsys, "export-images", str(out), "-n", "5", "--prepared", prepared)
    assert code == 0 and stdout.startswith(f"wrote 5 test image(s) to {out}/")
    files = sorted(out.glob("*.png"))
    split, classes = load_split(prepared, "test"), load_stats(prepared).classes
    assert [f.name for f in files] == [f"test_{i:05d}_{classes[int(split.labels[i])]}.png" for i in range(5)]
    for i, path in enumerate(files):
        assert np.array_equal(np.asarray(Image.open(path)), split.images[i, 0].numpy())
    code, stdout, err = cli(capsys, "predict", str(out), "--model", str(trained / "models" / "best"), "--json")
    assert code == 0 and err == ""  # same size and mode as training: nothing converted
    expected = pd.read_csv(trained / "reports" / "confusion.csv")["predicted"].iloc[:5].tolist()
    assert [json.loads(line)["predictions"][0]["class"] for line in stdout.splitlines()] == expected


def test_export_images_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(*cli(capsys, "export-images", str(tmp_path / "out"), "--prepared", str(tmp_path / "none")))
    assert line == f"error: {tmp_path / 'none'} has no prepared data; run the prepare stage first (dvc repro prepare)"
