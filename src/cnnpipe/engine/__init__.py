"""The training engine: ``train_run`` trains one ``RunConfig`` on a ``TrainData``.

Small modules, one job each: ``data`` (whole splits as tensors), ``augment``
(batched crop/flip), ``optim`` (optimizer + per-step schedule),
``early_stopping``, ``resume`` (per-epoch state), ``records`` (what a run
reports) and ``loop`` (the loop itself, and ``evaluate_logits``).
"""

from cnnpipe.engine.data import TrainData
from cnnpipe.engine.loop import evaluate_logits, train_run
from cnnpipe.engine.records import EpochRecord, RunResult

__all__ = ["EpochRecord", "RunResult", "TrainData", "evaluate_logits", "train_run"]
