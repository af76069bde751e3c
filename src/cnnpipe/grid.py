"""Train every grid point, record each outcome, and pick the best run.

Three parts, kept apart so the backends stay interchangeable:

* ``run_one(ctx, index, cfg, emit)`` is the work for one grid point, wherever
  it runs (this process, a pool worker, a Ray task): ``engine.train_run``,
  with each epoch sent to ``emit`` as it ends. It never touches MLflow.
* ``GridLog`` is the parent's side of every run and the ONLY writer to
  MLflow: it opens a child run when a run starts, logs each epoch as the
  event arrives, ends the child with final metrics and artifacts, shows
  progress, and reads/writes the run cache. Because all writes come from one
  process in one thread, a sqlite store never sees concurrent writers and a
  Ray worker on another machine needs no access to the store.
* ``train_grid`` ties them together over an executor (``cnnpipe.executors``:
  sequential, local process pool, Ray), first reusing cached runs
  (``cnnpipe.runcache``) so an incremental grid trains only what changed.

``run_grid(items, train_fn, executor=...)`` is the plain generic loop (a
crash becomes a 'failed' record, the grid goes on). Selection
(``select_best``) only ever looks at *finished* runs, by the validation
metric in ``select_by``; the test split is never used here.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe import errors as _errors
from cnnpipe import executors
from cnnpipe.errors import CnnpipeError, DataError
from cnnpipe.executors import Emit, Event, Executor, SequentialExecutor
from cnnpipe.params import GridParams, Params, RunConfig
from cnnpipe.tracking import NullTracker

if TYPE_CHECKING:
    from torch import nn

    from cnnpipe.engine import RunResult, TrainData
    from cnnpipe.engine.records import EpochRecord
    from cnnpipe.layerstats import LayerSnapshot
    from cnnpipe.runcache import CachedRun, GridCache

__all__ = ["Executor", "SequentialExecutor", "make_executor"]


class GridFailed(CnnpipeError):
    """Every run of the grid failed, so there is no model to select."""


@dataclass
class RunRecord:
    """One grid point's outcome: its config, the engine's result and its MLflow child run."""

    index: int  # 1-based position in the grid
    cfg: RunConfig
    result: "RunResult"
    mlflow_run_id: str | None = None
    cached: bool = False  # reused from the run cache instead of trained
    reused_from: str | None = None  # the MLflow child run that trained it (when cached)

    @property
    def ok(self) -> bool:
        """Finished with a usable best epoch (diverged and crashed runs are not candidates)."""
        r = self.result
        return r.status == "finished" and r.best is not None and r.model is not None and math.isfinite(r.best.val_loss)

    def metric(self, name: str) -> float:
        return float(getattr(self.result.best, name)) if self.result.best is not None else math.nan


# --------------------------------------------------------------------------- executors


def make_executor(settings: GridParams, runs: int, report: Callable[[str], None] | None = print, *,
                  device: str = "cpu", cores: int | None = None) -> Executor:
    """The executor ``grid.workers`` / ``grid.backend`` ask for (see ``cnnpipe.executors.make_executor``)."""
    executor = executors.make_executor(settings, runs, device=device, cores=cores)
    if report is not None and executor.parallel:
        report(f"grid: {executor.description}")
    return executor


# --------------------------------------------------------------------------- bookkeeping


def _one_line(text: str, limit: int = 400) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _guarded(train_fn: Callable[[int, RunConfig], "RunRecord"], index: int, cfg: RunConfig) -> "RunRecord":
    """Call ``train_fn``; an unexpected crash becomes a 'failed' record, Ctrl-C and user errors propagate."""
    start = time.perf_counter()
    try:
        return train_fn(index, cfg)
    except (CnnpipeError, KeyboardInterrupt):
        raise
    except Exception as err:
        from cnnpipe.engine import RunResult

        reason = _one_line(f"{type(err).__name__}: {err}")
        return RunRecord(index, cfg, RunResult.failed(cfg.run_id, reason, seconds=time.perf_counter() - start))


def progress_line(rec: RunRecord, total: int, select_by: str = "val_top1") -> str:
    """``run 3/8 lr=0.01,batch_size=100: best val_top1 0.912 @ epoch 7, 41 s`` (``reused (trained in 41 s)``)."""
    r = rec.result
    head = f"run {rec.index}/{total} {rec.cfg.name}"
    if rec.ok:
        shown = f"best {select_by} {rec.metric(select_by):.4f}"
        if select_by != "val_top1":
            shown += f" (val_top1 {rec.metric('val_top1'):.4f})"
        took = f"reused (trained in {r.seconds:.0f} s)" if rec.cached else f"{r.seconds:.0f} s"
        return f"{head}: {shown} @ epoch {r.best_epoch}, {took}"
    return f"{head}: FAILED ({_one_line(failure_reason(r), 160)}), {r.seconds:.0f} s"


def epoch_line(cfg: RunConfig, record: "EpochRecord") -> str:
    """``[lr=0.01] epoch 2/8: train_loss 0.4123 val_loss 0.3921 val_top1 0.8571 (12.3 s)`` (parallel progress)."""
    return (f"[{cfg.name}] epoch {record.epoch}/{cfg.values.epochs}: train_loss {record.train_loss:.4f} "
            f"val_loss {record.val_loss:.4f} val_top1 {record.val_top1:.4f} ({record.epoch_seconds:.1f} s)")


def failure_reason(result: "RunResult") -> str:
    """``diverged: loss is nan at epoch 3 batch 17`` / ``failed: RuntimeError: ...`` (status named once)."""
    reason = result.stop_reason or "unknown"
    return reason if reason.startswith(result.status) else f"{result.status}: {reason}"


def run_grid(
    configs: Sequence[RunConfig],
    train_fn: Callable[[int, RunConfig], RunRecord],
    *,
    executor: Executor | None = None,
    select_by: str = "val_loss",
    report: Callable[[str], None] | None = print,
) -> list[RunRecord]:
    """Train every config via ``executor``; a failed run is recorded and the grid goes on.

    Returns the records in grid order. Never raises for failed runs (see
    ``select_best``); ``KeyboardInterrupt`` and ``CnnpipeError`` propagate.
    With a process or Ray executor ``train_fn`` must pickle.
    """
    executor = executor or SequentialExecutor()
    total = len(configs)
    guarded = functools.partial(_guarded, train_fn)
    records: list[RunRecord] = []
    with contextlib.closing(executor.map(guarded, list(enumerate(configs, start=1)))) as results:
        for rec in results:
            records.append(rec)
            if report is not None:
                report(progress_line(rec, total, select_by))
    return sorted(records, key=lambda rec: rec.index)


def select_best(records: Sequence[RunRecord], select_by: str) -> RunRecord:
    """The finished run with the best ``select_by`` (val_loss lowest, val_top1 highest).

    Ties go to the other validation metric, then to the earlier grid point, so
    the choice is deterministic. Raises ``GridFailed`` when no run finished.
    """
    if select_by not in ("val_loss", "val_top1"):
        raise ValueError(f"select_by must be val_loss or val_top1, got {select_by!r}")
    candidates = [rec for rec in records if rec.ok and math.isfinite(rec.metric(select_by))]
    if not candidates:
        first = next((rec for rec in records if not rec.ok), None)
        detail = f" (first: {first.cfg.name}: {_one_line(failure_reason(first.result), 160)})" if first else ""
        raise GridFailed(
            f"all {len(records)} grid runs failed{detail}; lower lr, check the data, or see the runs in MLflow"
        )

    def key(rec: RunRecord) -> tuple[float, float, int]:
        if select_by == "val_loss":
            return (rec.metric("val_loss"), -rec.metric("val_top1"), rec.index)
        return (-rec.metric("val_top1"), rec.metric("val_loss"), rec.index)

    return min(candidates, key=key)


# --------------------------------------------------------------------------- one run (any process)


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
    layer_stats: bool = False
    progress: bool = True
    num_threads: int | None = None
    samples: Path | None = None  # reports/samples.png, attached to every child run when present
    train_run: Callable[..., "RunResult"] | None = None  # None: cnnpipe.engine.train_run
    prepared_dir: Path | None = None  # where ``data`` came from: workers reload it instead of unpickling tensors
    source: Any = None  # an executors.DataSource (workers only)
    portable: bool = False  # pack the best weights as bytes (results cross a process boundary)

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

        model = rebuild_model(self.record.cfg, data, load(self.weights))
        return replace(self.record, result=replace(self.record.result, model=model))


def rebuild_model(cfg: RunConfig, data: "TrainData", state_dict: dict[str, Any]) -> "nn.Module":
    """``cfg``'s architecture with ``state_dict`` loaded: CPU, eval mode, like ``train_run`` returns it."""
    from cnnpipe.models.build import build_model

    model = build_model(list(cfg.layers), data.image_shape, data.num_classes, where=f"model {cfg.values.model}")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def run_one(ctx: TrainContext, index: int, cfg: RunConfig, emit: Emit | None = None) -> RunOutcome:
    """Train one grid point, sending ``("start", index)`` and ``("epoch", index, record)`` to ``emit``.

    A crash becomes a 'failed' result (the grid goes on); a ``CnnpipeError``
    (the user must fix something) becomes ``RunError`` and stops the grid;
    Ctrl-C propagates. No MLflow here: the parent logs from the events.
    """
    start = time.perf_counter()
    last = None
    try:
        data = ctx.get_data()
        train_run = ctx.train_run
        if train_run is None:
            from cnnpipe.engine import train_run
        if ctx.histograms:
            from cnnpipe.layerstats import LastSnapshot

            last = LastSnapshot()
        if emit is not None:
            emit(("start", index))

        def on_epoch(record: "EpochRecord", model: Any) -> None:
            if emit is not None:
                emit(("epoch", index, record))
            if last is not None:
                last.update(model, record.epoch)

        result = train_run(cfg, data, device=ctx.device, num_threads=ctx.num_threads, on_epoch=on_epoch,
                           progress=ctx.progress, layer_stats=ctx.layer_stats)
    except KeyboardInterrupt:
        raise
    except CnnpipeError as err:
        raise RunError(index, type(err).__name__, str(err), err.exit_code) from err
    except Exception as err:
        from cnnpipe.engine import RunResult

        reason = _one_line(f"{type(err).__name__}: {err}")
        result = RunResult.failed(cfg.run_id, reason, device=ctx.device, seconds=time.perf_counter() - start)
    outcome = RunOutcome(RunRecord(index, cfg, result),
                         layers=last.layers if last is not None and last.layers else None,
                         layers_epoch=last.epoch if last is not None else 0)
    return outcome.packed() if ctx.portable else outcome


# --------------------------------------------------------------------------- the parent's side


def model_summary(cfg: RunConfig, data: "TrainData") -> str:
    from cnnpipe.models.spec import normalize_layers, summary_text

    infos = normalize_layers(f"model {cfg.values.model}", list(cfg.layers), tuple(data.image_shape), data.num_classes)
    return summary_text(cfg.values.model, infos, tuple(data.image_shape))


def child_params(cfg: RunConfig, data: "TrainData") -> dict[str, Any]:
    return {**cfg.flat(), "dataset": cfg.dataset or data.dataset}


def child_tags(cfg: RunConfig, data: "TrainData", device: str) -> dict[str, str]:
    return {
        "cnnpipe.run_id": cfg.run_id,
        "dataset": cfg.dataset or data.dataset,
        "data_fingerprint": data.fingerprint,
        "device": device,
    }


def epoch_metrics(record: "EpochRecord", layer_stats: bool) -> dict[str, float]:
    metrics = {key: value for key, value in record.metrics().items() if key != "epoch"}
    if layer_stats:
        metrics.update(record.layer_stats)
    return metrics


def final_metrics(result: "RunResult") -> dict[str, float]:
    out: dict[str, float] = {"epochs_run": float(result.epochs_run), "run_seconds": float(result.seconds),
                             "run_images_per_s": float(result.images_per_s)}
    if result.best is not None:
        out.update({"best_epoch": float(result.best_epoch or 0), "best_val_loss": result.best.val_loss,
                    "best_val_top1": result.best.val_top1, "best_val_top5": result.best.val_top5})
    return out


class LiveProgress:
    """Per-epoch progress of runs trained elsewhere: a tqdm bar per active run on a terminal, else a line per epoch."""

    def __init__(self, report: Callable[[str], None] | None, bars: bool) -> None:
        self.report = report
        self.use_bars = bars and report is not None
        self.bars: dict[int, Any] = {}
        self.slots: dict[int, int] = {}

    def start(self, index: int, cfg: RunConfig) -> None:
        if not self.use_bars or index in self.bars:
            return
        from tqdm.auto import tqdm

        slot = min(set(range(len(self.slots) + 1)) - set(self.slots.values()))
        self.slots[index] = slot
        self.bars[index] = tqdm(total=cfg.values.epochs, desc=cfg.name, position=slot, leave=False, unit="epoch",
                                dynamic_ncols=True)

    def epoch(self, index: int, cfg: RunConfig, record: "EpochRecord") -> None:
        bar = self.bars.get(index)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(val_loss=f"{record.val_loss:.4f}", val_top1=f"{record.val_top1:.4f}")
        elif self.report is not None and not self.use_bars:
            self.report(epoch_line(cfg, record))

    def finish(self, index: int) -> None:
        bar = self.bars.pop(index, None)
        self.slots.pop(index, None)
        if bar is not None:
            bar.close()

    def write(self, line: str) -> None:
        if self.report is None:
            return
        if self.bars:
            from tqdm.auto import tqdm

            tqdm.write(line)
        else:
            self.report(line)

    def close(self) -> None:
        for index in list(self.bars):
            self.finish(index)


def _bars_wanted(progress: bool) -> bool:
    return bool(progress) and sys.stderr.isatty() and os.environ.get("CNNPIPE_PROGRESS", "1") != "0"


class GridLog:
    """The parent's bookkeeping for every run: MLflow child runs, progress, and the run cache.

    Events may arrive late or not at all (a process queue gives no ordering
    guarantee against the result); ``finish`` logs any epoch the events did
    not bring from the result's history, and late events for a finished run
    are ignored, so every child ends with its full per-epoch history.
    """

    def __init__(self, ctx: TrainContext, configs: dict[int, RunConfig], *, total: int, select_by: str,
                 report: Callable[[str], None] | None, live: bool, cache: "GridCache | None" = None) -> None:
        if ctx.data is None:
            raise ValueError("GridLog needs the parent's TrainData")
        self.ctx = ctx
        self.data: "TrainData" = ctx.data
        self.tracker = ctx.tracker
        self.cfgs = dict(configs)
        self.total = total
        self.select_by = select_by
        self.report = report
        self.cache = cache
        self.children: dict[int, str | None] = {}
        self.logged: dict[int, int] = {}
        self.done: set[int] = set()
        self.progress = LiveProgress(report, _bars_wanted(ctx.progress)) if live else None
        self._summaries: dict[str, str] = {}

    # ---- events from run_one

    def handle(self, event: Event) -> None:
        kind, index = event[0], int(event[1])
        if index in self.done or index not in self.cfgs:
            return
        if kind == "start":
            self._open(index)
        elif kind == "epoch":
            self._epoch(index, event[2], live=True)

    def _open(self, index: int, tags: dict[str, str] | None = None, live: bool = True) -> str | None:
        if index not in self.children:
            cfg = self.cfgs[index]
            self.children[index] = self.tracker.start_child(
                cfg.name, params=child_params(cfg, self.data),
                tags={**child_tags(cfg, self.data, self.ctx.device), **(tags or {})})
            self.logged[index] = 0
            if live and self.progress is not None:
                self.progress.start(index, cfg)
        return self.children[index]

    def _epoch(self, index: int, record: "EpochRecord", live: bool) -> None:
        child = self._open(index, live=live)
        if record.epoch <= self.logged[index]:
            return
        self.tracker.log_epoch(child, record.epoch, epoch_metrics(record, self.ctx.layer_stats))
        self.logged[index] = record.epoch
        if live and self.progress is not None:
            self.progress.epoch(index, self.cfgs[index], record)

    # ---- a run's end

    def finish(self, outcome: RunOutcome) -> RunRecord:
        """Close a trained run: rebuild its model, complete and end its child run, store it in the cache."""
        rec = outcome.unpacked(self.data)
        index = rec.index
        rec.mlflow_run_id = self._open(index, live=False)
        for record in rec.result.history:
            self._epoch(index, record, live=False)
        histograms = None
        if outcome.layers:
            from cnnpipe.layerstats import histogram_figure

            figure = histogram_figure(outcome.layers, f"{rec.cfg.name}: weights and gradients after epoch {outcome.layers_epoch}")
            histograms = _png_bytes(figure)
        self._end(rec, histograms)
        if self.cache is not None and rec.ok and rec.result.model is not None:
            from cnnpipe.runcache import HISTOGRAMS

            try:
                self.cache.store(rec.cfg, cache_entry(rec, self.tracker), rec.result.model.state_dict(),
                                 fingerprint=self.data.fingerprint, device=self.ctx.device,
                                 files={HISTOGRAMS: histograms} if histograms else None)
            except OSError as err:  # a full disk costs the next grid a retrain, not this grid its result
                self._say(f"cache: could not store {rec.cfg.name} ({_one_line(str(err), 160)}); it will train again next time")
        self._close(rec)
        return rec

    def lookup(self, cfg: RunConfig) -> "tuple[CachedRun, RunResult] | None":
        """The cached result for ``cfg`` (model rebuilt), or None: train it."""
        if self.cache is None:
            return None
        hit = self.cache.lookup(cfg, fingerprint=self.data.fingerprint, device=self.ctx.device)
        if hit is None:
            return None
        result = result_from_cache(hit, cfg, self.data, self.ctx.device)
        if result is None:
            self._say(f"cache: entry {hit.key} for {cfg.name} is unusable; retraining it")
            return None
        return hit, result

    def reuse(self, index: int, cfg: RunConfig, hit: "CachedRun", result: "RunResult") -> RunRecord:
        """Record a cached run, logged as a child tagged ``cnnpipe.reused`` with its full per-epoch history."""
        original = str(hit.record.get("mlflow_run_id") or "")
        tags = {"cnnpipe.reused": "true", "cnnpipe.reused_from": original, "cnnpipe.cache_key": hit.key}
        rec = RunRecord(index, cfg, result, mlflow_run_id=self._open(index, tags=tags, live=False), cached=True,
                        reused_from=original or None)
        for record in result.history:
            self._epoch(index, record, live=False)
        histograms = hit.path / _histograms_name()
        self._end(rec, histograms.read_bytes() if histograms.is_file() else None)
        self._close(rec)
        return rec

    def _end(self, rec: RunRecord, histograms: bytes | None) -> None:
        if not self.tracker.enabled:
            return
        from cnnpipe import results

        result = rec.result
        with tempfile.TemporaryDirectory(prefix="cnnpipe-child-") as tmp:
            files = [self.ctx.samples] if self.ctx.samples is not None else []
            if histograms:
                path = Path(tmp) / _histograms_name()
                path.write_bytes(histograms)
                files.append(path)
            self.tracker.end_child(
                rec.mlflow_run_id,
                status="FINISHED" if rec.ok else "FAILED",
                reason=failure_reason(result),
                metrics=final_metrics(result),
                tags={"status": result.status, "stop_reason": _one_line(result.stop_reason, 5000)},
                texts={"model_summary.txt": self._summary(rec.cfg) + "\n", "history.csv": results.history_csv_text(rec)},
                files=files,
            )

    def _summary(self, cfg: RunConfig) -> str:
        if cfg.values.model not in self._summaries:
            self._summaries[cfg.values.model] = model_summary(cfg, self.data)
        return self._summaries[cfg.values.model]

    def _close(self, rec: RunRecord) -> None:
        self.done.add(rec.index)
        if self.progress is not None:
            self.progress.finish(rec.index)
        self._say(progress_line(rec, self.total, self.select_by))

    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress.write(line)
        elif self.report is not None:
            self.report(line)

    # ---- the grid stops early

    def abort(self, reason: str, *, failed: int | None = None, failed_reason: str = "") -> None:
        """End every open child: KILLED (Ctrl-C, or stopped because another run failed), FAILED for ``failed``."""
        for index, child in list(self.children.items()):
            if index in self.done:
                continue
            self.done.add(index)
            if index == failed:
                _quiet(self.tracker.end_child, child, status="FAILED", reason=failed_reason)
            else:
                _quiet(self.tracker.end_child, child, status="KILLED", reason=reason)
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


def _histograms_name() -> str:
    from cnnpipe.runcache import HISTOGRAMS

    return HISTOGRAMS


def _png_bytes(figure: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Best-effort bookkeeping while another error is already on its way up."""
    try:
        fn(*args, **kwargs)
    except Exception:
        pass


# --------------------------------------------------------------------------- the run cache glue


def cache_entry(rec: RunRecord, tracker: NullTracker) -> dict[str, Any]:
    """What the cache keeps of a finished run besides its weights (plain JSON)."""
    r = rec.result
    return {
        "run_id": rec.cfg.run_id,
        "run_name": rec.cfg.name,
        "params": rec.cfg.flat(),
        "status": r.status,
        "stop_reason": r.stop_reason,
        "best_epoch": r.best_epoch,
        "epochs_run": r.epochs_run,
        "seconds": r.seconds,
        "images_per_s": r.images_per_s,
        "device": r.device,
        "history": [epoch.to_dict() for epoch in r.history],
        "mlflow_run_id": rec.mlflow_run_id,
        "mlflow_experiment_id": tracker.experiment_id,
        "tracking_uri": tracker.uri,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def result_from_cache(hit: "CachedRun", cfg: RunConfig, data: "TrainData", device: str) -> "RunResult | None":
    """The cached run as a ``RunResult`` with its model rebuilt; None if the entry does not fit."""
    from cnnpipe.engine import EpochRecord, RunResult

    try:
        raw = hit.record
        history = [EpochRecord.from_dict(epoch) for epoch in raw["history"]]
        best_epoch = raw["best_epoch"]
        best = next(epoch for epoch in history if epoch.epoch == best_epoch)
        model = rebuild_model(cfg, data, hit.state_dict)
        return RunResult(run_id=cfg.run_id, status=raw["status"], stop_reason=raw["stop_reason"], best_epoch=best_epoch,
                         best=best, history=history, epochs_run=int(raw["epochs_run"]), seconds=float(raw["seconds"]),
                         images_per_s=float(raw["images_per_s"]), model=model, device=str(raw.get("device", device)))
    except (KeyError, TypeError, ValueError, StopIteration, RuntimeError):
        return None


# --------------------------------------------------------------------------- the grid


def train_one(ctx: TrainContext, index: int, cfg: RunConfig, *, total: int = 1, select_by: str = "val_loss",
              report: Callable[[str], None] | None = None) -> RunRecord:
    """Train one grid point in this process inside its own MLflow child run (FINISHED / FAILED / KILLED)."""
    log = GridLog(ctx, {index: cfg}, total=max(total, index), select_by=select_by, report=report, live=False)
    try:
        return log.finish(run_one(ctx, index, cfg, emit=log.handle))
    except RunError as err:
        log.abort(f"grid stopped: {err}", failed=index, failed_reason=str(err))
        raise err.rebuild() from None
    except BaseException:
        log.abort("interrupted (Ctrl-C)")
        raise


def train_grid(
    configs: Sequence[RunConfig],
    ctx: TrainContext,
    *,
    executor: Executor | None = None,
    select_by: str = "val_loss",
    report: Callable[[str], None] | None = print,
    cache: "GridCache | None" = None,
) -> list[RunRecord]:
    """Train every config (reusing cached runs), tracked in MLflow; records in grid order.

    A failed run is recorded and the grid goes on. A ``CnnpipeError`` in a run
    stops the grid (that child FAILED, the others still running KILLED) and
    propagates; so does Ctrl-C (every started child KILLED, pending runs never
    start).
    """
    executor = executor or SequentialExecutor()
    log = GridLog(ctx, dict(enumerate(configs, start=1)), total=len(configs), select_by=select_by, report=report,
                  live=executor.parallel, cache=cache)
    records: dict[int, RunRecord] = {}
    try:
        todo: list[tuple[int, RunConfig]] = []
        hits = []
        for index, cfg in enumerate(configs, start=1):
            found = log.lookup(cfg)
            if found is not None:
                hits.append((index, cfg, *found))
            else:
                todo.append((index, cfg))
        if cache is not None and report is not None:
            if cache.reuse:
                report(f"cache: {len(hits)} of {len(configs)} run(s) reused, {len(todo)} to train")
            else:
                report(f"cache: not reused (--no-cache or CNNPIPE_NO_CACHE=1); {len(todo)} run(s) to train")
        for index, cfg, hit, result in hits:
            records[index] = log.reuse(index, cfg, hit, result)
        if todo:
            work_ctx = ctx
            if executor.parallel:
                work_ctx = ctx.for_workers(executor.data_source(ctx.get_data(), ctx.prepared_dir))
                if report is not None:
                    report(f"grid: {len(todo)} run(s) on {executor.description}")
            work = functools.partial(run_one, work_ctx)
            with contextlib.closing(executor.map(work, todo, on_event=log.handle)) as outcomes:
                for outcome in outcomes:
                    rec = log.finish(outcome)
                    records[rec.index] = rec
    except RunError as err:
        original = err.rebuild()
        log.abort(f"grid stopped: {_one_line(str(original), 300)}", failed=err.index, failed_reason=str(original))
        raise original from None
    except KeyboardInterrupt:
        log.abort("interrupted (Ctrl-C)")
        raise
    except BaseException as err:
        log.abort(f"grid stopped: {type(err).__name__}: {_one_line(str(err), 300)}")
        raise
    finally:
        log.close()
    return [records[index] for index in sorted(records)]


# --------------------------------------------------------------------------- stage helpers


def check_dataset(data: "TrainData", params: Params) -> None:
    """Refuse to train on prepared data of another dataset than ``data.dataset`` names."""
    if data.dataset and data.dataset != params.data.dataset:
        raise DataError(
            f"data/prepared holds {data.dataset} but params.yaml has data.dataset: {params.data.dataset}; "
            "run dvc repro (or dvc repro prepare) first"
        )


def grid_definition(params: Params) -> dict[str, Any]:
    """The parent run's params: every training key (a list for grid axes) and the selection rule."""
    out: dict[str, Any] = {}
    for key, values in params.training.items():
        out[key] = list(values) if len(values) > 1 else values[0]
    out.update({"dataset": params.data.dataset, "select_by": params.select_by, "device": params.device,
                "grid_size": params.grid_size, "grid_axes": ",".join(params.axes) or "none"})
    return out


def parent_tags(params: Params, data: "TrainData", device: str) -> dict[str, str]:
    return {
        "dataset": params.data.dataset,
        "data_fingerprint": data.fingerprint,
        "device": device,
        "select_by": params.select_by,
        "grid_axes": ",".join(params.axes) or "none",
    }
