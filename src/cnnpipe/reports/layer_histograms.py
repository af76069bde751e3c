"""Per-layer weight and gradient histograms at the end of a run.

A histogram shows what a norm hides: dead layers (all-zero gradients),
exploding weights, a layer whose gradients are orders of magnitude smaller
than its neighbours'. The grid takes a cheap snapshot (histogram counts, not
tensors) after every epoch and keeps the last one, so the figure shows the
weights and the real training gradients of the final step, with no extra
forward/backward pass.

The figure is built with ``matplotlib.figure.Figure`` (Agg, no pyplot and no
global state), so it is safe in workers and headless machines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

BINS = 40
MAX_LAYERS = 12


@dataclass(frozen=True)
class Histogram:
    edges: np.ndarray  # BINS + 1
    counts: np.ndarray  # BINS
    norm: float
    nonfinite: int  # NaN/inf values left out of the counts


@dataclass(frozen=True)
class LayerSnapshot:
    name: str  # parameter name, e.g. "0.weight" (child 0 of the Sequential = spec layer 0)
    weight: Histogram
    grad: Histogram | None  # None when the parameter has no gradient yet


def _histogram(tensor: "torch.Tensor", bins: int) -> Histogram:
    import torch

    values = tensor.detach().float().flatten().cpu()
    nonfinite = 0
    lo, hi = (float(values.min()), float(values.max())) if values.numel() else (math.nan, math.nan)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        # min and max are NaN if any value is, and +-inf if one is: only then are values left out (a
        # mask over every value costs more than the histogram itself)
        finite = torch.isfinite(values)
        nonfinite = int((~finite).sum())
        values = values[finite]
        if values.numel() == 0:
            return Histogram(np.linspace(-1, 1, bins + 1), np.zeros(bins), math.nan, nonfinite)
        lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) + 1e-6), hi + 0.5 * (abs(hi) + 1e-6)
    counts = torch.histc(values, bins=bins, min=lo, max=hi).numpy()
    return Histogram(np.linspace(lo, hi, bins + 1), counts, float(values.norm()), nonfinite)


def _weights(model: "torch.nn.Module", max_layers: int) -> list[tuple[str, "torch.nn.Parameter"]]:
    """The weight matrices/kernels ``snapshot`` shows: all, or an evenly spaced selection (first and last kept)."""
    weights = [(name, p) for name, p in model.named_parameters() if p.ndim > 1]
    if len(weights) > max_layers:
        picks = np.unique(np.linspace(0, len(weights) - 1, max_layers).round().astype(int))
        weights = [weights[i] for i in picks]
    return weights


def snapshot(model: "torch.nn.Module", *, bins: int = BINS, max_layers: int = MAX_LAYERS) -> list[LayerSnapshot]:
    """Histograms of every weight matrix/kernel (conv, linear) and its current gradient.

    Biases and norm scales are skipped: they are small and tell little. With more
    than ``max_layers`` weights, an evenly spaced selection (first and last kept).
    """
    return [
        LayerSnapshot(name, _histogram(p, bins), _histogram(p.grad, bins) if p.grad is not None else None)
        for name, p in _weights(model, max_layers)
    ]


def _identity(tensor: "torch.Tensor") -> tuple[object, ...]:
    return (tensor.data_ptr(), tensor._version, tensor.dtype, tuple(tensor.shape), tensor.device)


class _Unchanged:
    """A frozen parameter's histogram, kept while the parameter provably holds the same values.

    Frozen: ``requires_grad`` False and no gradient, so no optimizer step
    wrote it (the engine's phases freeze a parameter for whole epochs, and
    once frozen at an epoch's end it was frozen since: ``engine.finetune``).
    The same storage at the same address (``data_ptr``; ``tensor`` holds the
    storage alive, so no other tensor gets its address meanwhile) and the
    same ``_version`` rule out ``copy_``/``load_state_dict`` and ``.to()``.
    ``_version`` alone would not do: fused optimizer steps and BatchNorm's
    running statistics write in place without bumping it.
    """

    __slots__ = ("tensor", "key", "histogram")

    def __init__(self, tensor: "torch.Tensor", histogram: Histogram) -> None:
        self.tensor = tensor.detach()
        self.key = _identity(tensor)
        self.histogram = histogram

    def holds(self, param: "torch.Tensor") -> bool:
        return not param.requires_grad and param.grad is None and _identity(param) == self.key


class LastSnapshot:
    """Epoch callback helper: keeps the snapshot of the most recent epoch only.

    A frozen weight that did not change since the previous epoch (a frozen
    body's, ``_Unchanged``) keeps its histogram instead of computing the same
    one again: the values are those ``snapshot`` computes.
    """

    def __init__(self, *, bins: int = BINS, max_layers: int = MAX_LAYERS) -> None:
        self.layers: list[LayerSnapshot] = []
        self.epoch = 0
        self.bins = bins
        self.max_layers = max_layers
        self._kept: dict[str, _Unchanged] = {}

    def _weight_histogram(self, name: str, param: "torch.Tensor") -> Histogram:
        kept = self._kept.get(name)
        if kept is not None and kept.holds(param):
            return kept.histogram
        histogram = _histogram(param, self.bins)
        self._kept[name] = _Unchanged(param, histogram)
        return histogram

    def update(self, model: "torch.nn.Module", epoch: int) -> None:
        weights = _weights(model, self.max_layers)
        self.layers = [
            LayerSnapshot(name, self._weight_histogram(name, p),
                          _histogram(p.grad, self.bins) if p.grad is not None else None)
            for name, p in weights
        ]
        shown = {name for name, _ in weights}
        for name in [name for name in self._kept if name not in shown]:
            del self._kept[name]
        self.epoch = epoch


def histogram_figure(layers: list[LayerSnapshot], title: str = "") -> "Figure":
    """One row per layer: weight histogram (left) and gradient histogram (right)."""
    from matplotlib.figure import Figure

    rows = max(1, len(layers))
    height = 1.6 * rows + 0.8
    # Fixed margins instead of constrained/tight layout: 2-3x faster to draw, same look here.
    fig = Figure(figsize=(9, height), dpi=90)
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 0.6 / height, bottom=0.35 / height, hspace=0.9, wspace=0.15)
    axes = fig.subplots(rows, 2, squeeze=False)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.15 / height)
    if not layers:
        axes[0][0].text(0.5, 0.5, "no weight tensors", ha="center", va="center")
    for row, layer in enumerate(layers):
        module = layer.name.removesuffix(".weight")
        for col, (kind, hist) in enumerate((("weight", layer.weight), ("gradient", layer.grad))):
            ax = axes[row][col]
            ax.tick_params(labelsize=7)
            if hist is None:
                ax.text(0.5, 0.5, "no gradient", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                ax.set_yticks([])
            else:
                ax.stairs(hist.counts, hist.edges, fill=True, color="tab:blue" if col == 0 else "tab:orange")
                extra = f", {hist.nonfinite} non-finite" if hist.nonfinite else ""
                ax.set_title(f"layer {module} {kind}  (L2 norm {hist.norm:.3g}{extra})", fontsize=8)
                ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    return fig


def histogram_png(layers: "list[LayerSnapshot]", title: str) -> bytes:
    """``histogram_figure`` rendered to PNG bytes (what the run cache keeps and MLflow shows)."""
    import io

    buffer = io.BytesIO()
    histogram_figure(layers, title).savefig(buffer, format="png")
    return buffer.getvalue()
