"""The arithmetic precision of the engine's forward passes: bf16 autocast on CUDA, float32 on the CPU.

One rule, in its own module, because training (``engine.loop``) and scoring
(``engine.inference``) must agree: a model is validated and evaluated in the
precision it trained in. The loop imports the inference module, so the rule
cannot live in the loop without a cycle. bfloat16 keeps float32's exponent
range, so no loss scaling (``GradScaler``) is needed as it would be with
float16. On the CPU nothing changes: float32 throughout, the path the
bitwise-reproducibility tests pin.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from cnnpipe.compute.device import is_cuda


def autocast(device: str) -> contextlib.AbstractContextManager[Any]:
    """The context a forward pass (and its loss) runs in on ``device``: bf16 autocast on CUDA, a no-op elsewhere."""
    if is_cuda(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
