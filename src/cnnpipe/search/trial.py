"""The worker side of one trial, wherever it runs (this process, a pool worker, a Ray task).

``run_one`` trains one config from its saved run state (if any) up to a
budget of epochs, sending ``("start", index, resumed_epoch)`` and
``("epoch", index, record)`` events to the parent as it goes. It never
touches MLflow: the parent (``search.log``) logs from the events. A crash
becomes a 'failed' result with its full traceback (the grid goes on); a
``CnnpipeError`` (the user must fix something) becomes ``RunError`` and stops
the grid; Ctrl-C propagates after the last finished epoch's state was saved.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.util import errors as _errors
from cnnpipe.util.errors import CheckpointError, CnnpipeError, DataError
from cnnpipe.search.backend import Emit
from cnnpipe.params.run_config import RunConfig
from cnnpipe.search.selection import RunRecord
from cnnpipe.util.text import one_line
from cnnpipe.tracking.runs import NullTracker
from cnnpipe.engine.records import RunResult

if TYPE_CHECKING:

    from cnnpipe.engine.data import TrainData
    from cnnpipe.engine.records import RunResult
    from cnnpipe.engine.records import EpochRecord
    from cnnpipe.reports.layer_histograms import LayerSnapshot


@dataclass
class TrainContext:
    """Everything ``run_one`` needs, as one picklable object (the seam for worker processes).

    In the parent ``data`` is the loaded ``TrainData``. ``for_workers`` makes
    the copy that travels: no tensors (``source`` reloads them in the
    worker), no progress bars (the parent shows progress), and results
    packed as safetensors bytes (``portable``).
    """

    data: "TrainData | None"
    tracker: NullTracker = field(default_factory=NullTracker)  # used by the parent only; pickles as plain strings
    device: str = "cpu"
    layer_stats: bool = False  # per-layer norms each epoch (and last-epoch histograms when they are logged)
    progress: bool = True
    num_threads: int | None = None
    train_run: Callable[..., "RunResult"] | None = None  # None: cnnpipe.engine.train_run
    prepared_dir: Path | None = None  # where ``data`` came from: workers reload it instead of unpickling tensors
    state_root: Path | None = None  # the run-state store (None: no per-epoch state, no resume)
    source: Any = None  # an trial_data.DataSource (workers only)
    portable: bool = False  # pack the best weights as bytes (results cross a process boundary)
    samples: Path | None = None  # reports/samples.png, attached to every child run when present

    @property
    def histograms(self) -> bool:
        """Take per-layer histogram snapshots (only worth it when they are logged)."""
        return self.layer_stats and self.tracker.enabled

    def get_data(self) -> "TrainData":
        if self.data is not None:
            return self.data
        if self.source is None:
            raise DataError("a grid worker got no training data; this is a bug, please report it")
        return self.source.load()

    def for_workers(self, source: Any) -> "TrainContext":
        return replace(self, data=None, source=source, progress=False, portable=True)


class RunError(Exception):
    """A user-fixable error (``CnnpipeError``) in one run, carried to the parent with the run's index.

    Plain ``args`` so it pickles across processes; ``rebuild`` gives back an
    error of the same class and message for the stage's one-line report.
    """

    def __init__(self, index: int, kind: str, message: str, exit_code: int = 1) -> None:
        super().__init__(index, kind, message, exit_code)
        self.index, self.kind, self.message, self.exit_code = index, kind, message, exit_code

    def __str__(self) -> str:
        return self.message

    def rebuild(self) -> CnnpipeError:
        if isinstance(self.__cause__, CnnpipeError):  # same process: the original, traceback and all
            return self.__cause__
        cls = getattr(_errors, self.kind, None)
        if not (isinstance(cls, type) and issubclass(cls, CnnpipeError)):
            cls = CnnpipeError
        err = cls.__new__(cls)
        Exception.__init__(err, self.message)
        err.exit_code = self.exit_code
        return err


@dataclass
class RunOutcome:
    """What ``run_one`` returns: the record, plus what the parent logs or caches with it."""

    record: RunRecord
    layers: "list[LayerSnapshot] | None" = None  # last epoch's weight/gradient histograms
    layers_epoch: int = 0
    weights: bytes | None = None  # the best state_dict as safetensors while ``record.result.model`` travels as None
    notes: list[str] = field(default_factory=list)

    def packed(self) -> "RunOutcome":
        """Replace the model object by safetensors bytes (no pickled modules, no torch shared memory)."""
        model = self.record.result.model
        if model is None:
            return self
        from safetensors.torch import save

        weights = save({key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()})
        record = replace(self.record, result=replace(self.record.result, model=None))
        return replace(self, record=record, weights=weights)

    def unpacked(self, data: "TrainData") -> RunRecord:
        """The record with its model rebuilt from ``weights`` (in the parent)."""
        if self.weights is None:
            return self.record
        from safetensors.torch import load

        from cnnpipe.models.build import rebuild_model

        cfg = self.record.cfg
        model = rebuild_model(cfg.layers, data.image_shape, data.num_classes, load(self.weights), where=f"model {cfg.values.model}")
        return replace(self.record, result=replace(self.record.result, model=model))


def _usable_state(folder: Path | None, notes: list[str]) -> int:
    """The epoch a saved state continues from (0: none); a bad state file is deleted with a note."""
    if folder is None:
        return 0
    from cnnpipe.engine.resume import load_resume_state, state_path

    try:
        state = load_resume_state(folder)
    except CheckpointError as err:
        notes.append(str(err))
        state_path(folder).unlink(missing_ok=True)
        return 0
    return int(state.get("epoch") or 0) if state is not None else 0


def run_one(ctx: TrainContext, index: int, cfg: RunConfig, budget: int | None = None, stateful: bool = True,
            emit: Emit | None = None) -> RunOutcome:
    """Train one trial up to ``budget`` epochs (None: to the end), continuing its saved state.

    ``stateful=False``: another search holds this trial's state folder, so
    train without reading or writing it.
    """
    start = time.perf_counter()
    last = None
    notes: list[str] = []
    try:
        data = ctx.get_data()
        train_run = ctx.train_run
        if train_run is None:
            from cnnpipe.engine.loop import train_run
        folder = None
        if ctx.state_root is not None and stateful:
            from cnnpipe.store.states import RunStateStore

            folder = RunStateStore(ctx.state_root).folder(cfg, data.fingerprint, ctx.device)
        resumed = _usable_state(folder, notes)
        if ctx.histograms:
            from cnnpipe.reports.layer_histograms import LastSnapshot

            last = LastSnapshot()
        if emit is not None:
            for note in notes:
                emit(("note", index, note))
            emit(("start", index, resumed))

        def on_epoch(record: "EpochRecord", model: Any) -> None:
            if emit is not None:
                emit(("epoch", index, record))
            if last is not None:
                last.update(model, record.epoch)

        from cnnpipe.store.features import FeatureCache, applies

        cached = {"features": FeatureCache()} if applies(cfg) else {}  # a head on a frozen body: its outputs, kept
        result = train_run(cfg, data, device=ctx.device, num_threads=ctx.num_threads, on_epoch=on_epoch,
                           progress=ctx.progress, layer_stats=ctx.layer_stats, resume_dir=folder, stop_after=budget,
                           **cached)
    except KeyboardInterrupt:
        raise
    except CnnpipeError as err:
        raise RunError(index, type(err).__name__, str(err), err.exit_code) from err
    except Exception as err:
        reason = one_line(f"{type(err).__name__}: {err}")
        result = RunResult.failed(cfg.run_id, reason, device=ctx.device, seconds=time.perf_counter() - start,
                                  traceback=traceback.format_exc())
        resumed = None
    record = RunRecord(index, cfg, result, resumed_at=resumed or None)
    outcome = RunOutcome(record, layers=last.layers if last is not None and last.layers else None,
                         layers_epoch=last.epoch if last is not None else 0, notes=notes)
    return outcome.packed() if ctx.portable else outcome
