"""What a training run reports: one ``EpochRecord`` per epoch and a ``RunResult``.

Plain dataclasses of floats and strings, so the grid runner can send them
between processes and the train stage can write them to CSV/JSON directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

STATUSES = ("finished", "diverged", "failed", "paused")


@dataclass
class EpochRecord:
    """Metrics of one epoch.

    ``train_loss``/``train_top1`` are averaged over the epoch's (augmented)
    batches while the weights moved; ``val_*`` are measured after the epoch on
    the untouched validation split with plain cross-entropy (no label
    smoothing), so runs with different smoothing compare fairly. ``lr`` is the
    rate of the epoch's last optimizer step. ``epoch_seconds`` covers training
    and validation; ``images_per_s`` is training images over training time.
    ``layer_stats`` (only with ``layer_stats=True``): ``weight_norm/<module>``
    is the L2 norm of that module's own parameters after the epoch,
    ``grad_norm/<module>`` the mean over the epoch's steps of the L2 norm of
    their gradients. ``<module>`` is the module path, e.g. ``0`` or ``4.conv1``
    (child ``i`` is spec layer ``i``).
    """

    epoch: int
    train_loss: float
    train_top1: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float
    epoch_seconds: float
    images_per_s: float
    layer_stats: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The scalar columns (no layer stats), for tables."""
        out = asdict(self)
        out.pop("layer_stats")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "EpochRecord":
        return cls(**{**raw, "layer_stats": dict(raw.get("layer_stats") or {})})


@dataclass
class RunResult:
    """Outcome of ``train_run``.

    ``status`` is 'finished' (ran to ``epochs`` or stopped early),
    'diverged' (a non-finite loss; ``stop_reason`` names epoch and batch; the
    best finite epoch, if any, is still ``best``/``model``) or 'paused' (the
    ``stop_after`` budget ended first; it continues from its run state).
    'failed' is never produced by ``train_run`` itself: real errors raise, and
    a grid runner that catches one records it with status 'failed' and the
    error text as ``stop_reason`` (see ``failed``).
    ``model`` is on the CPU in eval mode with the best epoch's weights (None
    when no epoch completed).
    """

    run_id: str
    status: str
    stop_reason: str
    best_epoch: int | None
    best: EpochRecord | None
    history: list[EpochRecord]
    epochs_run: int
    seconds: float
    images_per_s: float
    model: "nn.Module | None"
    device: str
    traceback: str | None = None  # a 'failed' run's full traceback (the one-line reason is ``stop_reason``)

    @classmethod
    def failed(cls, run_id: str, error: str, *, device: str = "cpu", seconds: float = 0.0,
               traceback: str | None = None) -> "RunResult":
        """A result for a run that raised (for grid runners that must go on)."""
        return cls(run_id=run_id, status="failed", stop_reason=error, best_epoch=None, best=None, history=[],
                   epochs_run=0, seconds=seconds, images_per_s=0.0, model=None, device=device, traceback=traceback)
