"""``cnnpipe export``: ONNX and TorchScript files with the normalization baked in, checked against PyTorch.

A short-trained TINY checkpoint on synthetic data; the exported files are run
by their own runtimes (onnxruntime, ``torch.jit.load``) in this test too, on
raw uint8 pixels, so the consumer's path is what is checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnpipe.models.checkpoint import load_checkpoint, save_checkpoint
from cnnpipe.data.prepared import load_split
from cnnpipe.engine.inference import evaluate_logits
from cnnpipe.models.build import build_model
from cnnpipe.serving.export import TOLERANCE, export_checkpoint
from project_builder import clean_env
from synthetic import TINY, make_prepared

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("export")
    stats = make_prepared(base / "prepared", n_train=20, n_val=10, n_test=40)
    torch.manual_seed(0)
    model = build_model(TINY, (1, 28, 28), 10)
    save_checkpoint(base / "best", model, {"layers": TINY, "in_shape": [1, 28, 28], "num_classes": 10,
                                           "classes": list(stats.classes), "mean": list(stats.mean), "std": list(stats.std)})
    return base / "best", base / "prepared"


@pytest.mark.slow
def test_cli_writes_onnx_and_torchscript_that_agree_with_pytorch_on_raw_pixels(checkpoint_dir, tmp_path):
    import onnxruntime as ort

    best, prepared = checkpoint_dir
    out = tmp_path / "exports"
    done = subprocess.run([sys.executable, "-m", "cnnpipe", "export", "--model", str(best), "--out", str(out),
                           "--prepared", str(prepared), "-n", "40"], cwd=tmp_path, env=clean_env(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.torchscript.pt"]  # no temp or .data files
    for fmt in ("onnx", "torchscript"):
        line = re.search(rf"^{fmt}\s.*max \|logit diff\| (\S+) .* same top-1 on 40/40$", done.stdout, re.MULTILINE)
        assert line and float(line.group(1)) <= TOLERANCE, done.stdout

    # The consumer's side: raw uint8 pixels in, the checkpoint's logits out, any batch size.
    images = load_split(prepared, "test").images
    ckpt = load_checkpoint(best)
    expected = evaluate_logits(ckpt.model, images, mean=ckpt.sidecar["mean"], std=ckpt.sidecar["std"]).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    onnx_logits = session.run(["logits"], {"pixels": images[:7].numpy()})[0]
    scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    script_logits = scripted(images[:5]).detach().numpy()
    assert np.abs(onnx_logits - expected[:7]).max() <= TOLERANCE
    assert np.abs(script_logits - expected[:5]).max() <= TOLERANCE


def test_a_batch_of_the_wrong_shape_is_one_clear_error(checkpoint_dir, tmp_path):
    from cnnpipe.util.errors import CnnpipeError

    best, _ = checkpoint_dir
    with pytest.raises(CnnpipeError, match=r"images have shape \(3, 1, 32, 32\), the model needs N x 1 x 28 x 28"):
        export_checkpoint(load_checkpoint(best), np.zeros((3, 1, 32, 32), np.uint8), tmp_path, formats=("torchscript",))
    assert list(tmp_path.iterdir()) == []


def test_export_needs_prepared_images(checkpoint_dir, tmp_path):
    best, _ = checkpoint_dir
    done = subprocess.run([sys.executable, "-m", "cnnpipe", "export", "--model", str(best), "--out", str(tmp_path / "x"),
                           "--prepared", str(tmp_path / "nothing")], cwd=tmp_path, env=clean_env(ROOT),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nothing'} has no prepared data to verify the export on; run dvc repro prepare or pass --prepared DIR")
    assert not (tmp_path / "x").exists()
