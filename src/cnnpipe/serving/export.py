"""``cnnpipe export``: the checkpoint as ONNX and TorchScript files that take raw pixels.

The normalization (``(x / 255 - mean) / std``) is baked into the exported
graph, so a consumer feeds ``N x C x H x W`` uint8 pixels and gets logits.
Each file is written to a temp name, loaded back with its own runtime
(onnxruntime, ``torch.jit.load``), compared with the PyTorch model on a batch
of test images, and only renamed into place when the logits agree within
``TOLERANCE`` and the top-1 class is the same on every image.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.util.errors import CnnpipeError
from cnnpipe.util.files import atomic_path
from cnnpipe.serving.classify import as_batch

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from cnnpipe.models.checkpoint import Checkpoint

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
TOLERANCE = 1e-4  # max abs difference of logits against the PyTorch model
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


@dataclass(frozen=True)
class Exported:
    format: str
    path: Path
    images: int
    max_abs_diff: float
    top1_same: int

    def describe(self) -> str:
        return (f"{self.format:<11} {self.path}  verified on {self.images} images: max |logit diff| "
                f"{self.max_abs_diff:.2e} (limit {TOLERANCE:.0e}), same top-1 on {self.top1_same}/{self.images}")


def raw_pixel_model(checkpoint: "Checkpoint") -> "nn.Module":
    """The network with its normalization in front: uint8 pixels in, float32 logits out (CPU, eval)."""
    import torch
    from torch import nn

    from cnnpipe.engine.augment import norm_constants, normalize

    class RawPixelClassifier(nn.Module):
        def __init__(self, net: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("scale", scale)
            self.register_buffer("shift", shift)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.net(normalize(pixels, self.scale, self.shift))

    side = checkpoint.sidecar
    scale, shift = norm_constants(side["mean"], side["std"], "cpu")
    net = checkpoint.model.to(memory_format=torch.contiguous_format).eval()
    return RawPixelClassifier(net, scale, shift).eval()


def _write_onnx(model: "nn.Module", example: "torch.Tensor", path: Path) -> None:
    import torch

    try:
        import onnx  # noqa: F401  (the exporter needs it; say so in one line rather than a traceback)
        import onnxscript  # noqa: F401
    except ImportError:
        raise CnnpipeError("ONNX export needs the onnx, onnxscript and onnxruntime packages: "
                           "pip install 'cnnpipe[export]' (or --format torchscript)") from None
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"pixels": {0: batch}}, external_data=False, verbose=False)
    program.save(str(path), external_data=False)


def _run_onnx(path: Path, images: "np.ndarray") -> "np.ndarray":
    try:
        import onnxruntime as ort
    except ImportError:
        raise CnnpipeError("verifying the ONNX file needs onnxruntime: pip install 'cnnpipe[export]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def _write_torchscript(model: "nn.Module", example: "torch.Tensor", path: Path) -> None:
    import torch

    with warnings.catch_warnings():  # torch.jit is deprecated upstream but still what TorchScript consumers load
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        traced.save(str(path))


def _run_torchscript(path: Path, images: "np.ndarray") -> "np.ndarray":
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")  # a TorchScript archive, not a pickle of our objects
        with torch.no_grad():
            return loaded(torch.from_numpy(images)).numpy()


WRITERS = {"onnx": (_write_onnx, _run_onnx), "torchscript": (_write_torchscript, _run_torchscript)}


def export_checkpoint(checkpoint: "Checkpoint", images: "np.ndarray", out_dir: str | os.PathLike[str], *,
                      formats: tuple[str, ...] = FORMATS, stem: str = "model") -> list[Exported]:
    """Write and verify each format; a file that fails verification is not written (CnnpipeError)."""
    import numpy as np
    import torch

    batch = np.ascontiguousarray(as_batch(images, tuple(checkpoint.sidecar["in_shape"])).astype(np.uint8))
    model = raw_pixel_model(checkpoint)
    with torch.no_grad():
        reference = model(torch.from_numpy(batch)).numpy()
    example = torch.from_numpy(batch[: min(2, len(batch))])  # export with another batch size than the check uses
    done = []
    for fmt in formats:
        write, run = WRITERS[fmt]
        target = Path(out_dir) / f"{stem}{SUFFIX[fmt]}"
        with atomic_path(target) as tmp:
            write(model, example, tmp)
            logits = run(tmp, batch)
            result = _agreement(fmt, target, reference, logits)
            if result.max_abs_diff > TOLERANCE or result.top1_same != result.images:
                raise CnnpipeError(f"{fmt} export disagrees with the PyTorch model ({result.describe()}); "
                                   "nothing written: report this with the model's layers")
        done.append(result)
    return done


def _agreement(fmt: str, path: Path, reference: Any, logits: Any) -> Exported:
    import numpy as np

    if logits.shape != reference.shape:
        return Exported(fmt, path, len(reference), float("inf"), 0)
    diff = float(np.abs(logits.astype(np.float64) - reference.astype(np.float64)).max()) if len(reference) else 0.0
    same = int((logits.argmax(axis=1) == reference.argmax(axis=1)).sum())
    return Exported(fmt, path, len(reference), diff, same)


def sample_images(prepared_dir: str | os.PathLike[str], count: int) -> "np.ndarray":
    """The first ``count`` test images (val when there is no test split), uint8."""
    from cnnpipe.data.prepared import load_split

    folder = Path(prepared_dir)
    split = "test" if (folder / "test.safetensors").is_file() else "val"
    return load_split(folder, split).images[:count].numpy()
