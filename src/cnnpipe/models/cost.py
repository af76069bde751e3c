"""What a network costs to run: the costs a search may trade its metric against, and the one it only reports.

* ``params``: every parameter, frozen ones too (a phone stores them all).
* ``macs``: the multiply-accumulates of one forward pass on one image,
  counted by torch's own ``FlopCounterMode`` (a FLOP is half a MAC) on a
  network built on the meta device: shapes only, no arithmetic, no memory.
  The same architecture and input always count the same, so a search may
  select by it.
* ``latency_ms``: the measured CPU time of one image (batch 1, one thread,
  the median of repeats). It depends on the machine and on what else runs,
  so it is reported beside a Pareto front and never selected by.

Counts are kept per architecture and input shape (``lru_cache``), so a grid
over anything but the architecture counts once.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from cnnpipe.models.build import build_model


@dataclass(frozen=True)
class NetworkCost:
    """The counted costs of one architecture on one input shape."""

    params: int
    macs: int

    def get(self, name: str) -> int:
        """The cost ``select_by`` names: ``params`` or ``macs``."""
        return int(getattr(self, name))


def build_on_meta(layers: Sequence[Any], in_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The network on the meta device: its modules and shapes, no values and no RNG draws."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build_model(list(layers), tuple(int(d) for d in in_shape), int(num_classes))


@lru_cache(maxsize=128)
def _count(layers_json: str, in_shape: tuple[int, ...], num_classes: int) -> NetworkCost:
    from torch.utils.flop_counter import FlopCounterMode

    model = build_on_meta(json.loads(layers_json), in_shape, num_classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty((1, *in_shape), device="meta"))
    return NetworkCost(params=sum(p.numel() for p in model.parameters()), macs=counter.get_total_flops() // 2)


def network_cost(layers: Sequence[Any], in_shape: Sequence[int], num_classes: int) -> NetworkCost:
    """The parameters and multiply-accumulates of the network ``layers`` builds, for one image of ``in_shape``."""
    return _count(json.dumps(list(layers)), tuple(int(d) for d in in_shape), int(num_classes))


def latency_ms(layers: Sequence[Any], in_shape: Sequence[int], num_classes: int, *, repeats: int = 20,
               warmup: int = 3) -> float:
    """Median milliseconds of one image's forward pass on the CPU with one thread (eval mode, no autograd).

    The weights are a seeded random draw: the time depends on the shapes, not
    the values. One thread, because that is what a phone's or a small CPU's
    inference gives one request, and because it is the least noisy here.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(list(layers), tuple(int(d) for d in in_shape), int(num_classes)).eval()
    image = torch.zeros((1, *(int(d) for d in in_shape)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        with torch.inference_mode():
            for step in range(warmup + repeats):
                start = time.perf_counter()
                model(image)
                if step >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times) * 1000.0
