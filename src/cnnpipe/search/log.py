"""The parent's side of every trial: the ONLY writer to MLflow, the run cache and the state notes.

What each run records is ``search.payloads``; how a finished run is stored
and read back is ``store.run_cache``; its tables and histograms are ``reports``; this module
only orders the writes.

Events from ``search.trial`` (possibly from other processes or Ray) arrive
here in the parent's thread: a trial starting opens (or, after a kill,
reopens) its MLflow child run, each epoch is logged as it arrives, and a
trial's end completes the child with final metrics and artifacts, stores a
finished run in the run cache and drops its run state. Because all writes
come from one process in one thread, a sqlite store never sees concurrent
writers and a Ray worker on another machine needs no access to the store.

Events may arrive late or not at all (a process queue gives no ordering
guarantee against the result); ``finish`` logs any epoch the events did not
bring from the result's history, and late events for a finished trial are
ignored, so every child ends with its full per-epoch history, each epoch
exactly once. A promoted successive-halving trial keeps its child open
between rungs; a pruned one ends FINISHED with ``cnnpipe.pruned`` tags.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.search.backend import Event
from cnnpipe.params.run_config import RunConfig
from cnnpipe.search.search_progress import SearchProgress, run_line
from cnnpipe.search.selection import RunRecord, failure_reason
from cnnpipe.util.text import one_line
from cnnpipe.search.payloads import child_params, child_tags, epoch_metrics, final_metrics
from cnnpipe.search.trial import RunOutcome, TrainContext
from cnnpipe.tracking.runs import NullTracker
from cnnpipe.util.errors import debug_enabled
from cnnpipe.store.run_cache import cached_result, entry_record, HISTOGRAMS

if TYPE_CHECKING:
    from cnnpipe.engine.data import TrainData
    from cnnpipe.engine.records import RunResult
    from cnnpipe.engine.records import EpochRecord
    from cnnpipe.store.run_cache import CachedRun, GridCache
    from cnnpipe.store.states import RunStateStore

TRACEBACK_FILE = "traceback.txt"


def _quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Best-effort bookkeeping while another error is already on its way up."""
    with contextlib.suppress(Exception):
        fn(*args, **kwargs)


class SearchLog:
    """MLflow children, progress lines, run cache and run-state notes for every trial of one search."""

    def __init__(self, ctx: TrainContext, tracker: NullTracker, configs: dict[int, RunConfig], *, select_by: str,
                 progress: SearchProgress, cache: "GridCache | None" = None, states: "RunStateStore | None" = None,
                 samples: Path | None = None, total: int | None = None) -> None:
        if ctx.data is None:
            raise ValueError("SearchLog needs the parent's TrainData")
        self.ctx = ctx
        self.data: "TrainData" = ctx.data
        self.tracker = tracker
        self.cfgs = dict(configs)
        self.total = len(configs) if total is None else total  # the N of "run i/N": trials planned in all
        self.select_by = select_by
        self.progress = progress
        self.cache = cache
        self.states = states
        self.samples = samples  # reports/samples.png, attached to every child run when present
        self.children: dict[int, str | None] = {}
        self.logged: dict[int, set[int]] = {}
        self.active: set[int] = set()  # trials whose current rung is in flight
        self.done: set[int] = set()  # trials whose child run has ended
        self.shared: set[str] = set()  # state keys another live search holds: trained here without state
        self._summaries: dict[str, str] = {}

    def add(self, configs: dict[int, RunConfig]) -> None:
        """More trials of the same search (a model-based search's next batch), under their global indices."""
        self.cfgs.update(configs)

    # ---- events from run_one

    def handle(self, event: Event) -> None:
        kind, index = event[0], int(event[1])
        if index in self.done or index not in self.cfgs:
            return
        if kind == "note":
            self.say(f"{self.cfgs[index].name}: {event[2]}")
        elif kind == "start":
            resumed = int(event[2]) if len(event) > 2 else 0
            promoted = index in self.children  # a rung of this search ended there: no "resumed" line
            child = self._open(index, resumed=resumed)
            folder = self.state_folder(self.cfgs[index])
            if folder is not None and self.states is not None and child:  # a later resume reopens this child
                with contextlib.suppress(OSError):
                    self.states.write_note(folder, {"mlflow_run_id": child, "run_name": self.cfgs[index].name,
                                                    "epoch": resumed})
            if resumed and not promoted and index not in self.active:
                cfg = self.cfgs[index]
                self.say(f"resumed {cfg.name} at epoch {resumed}/{cfg.values.epochs}")
            if index not in self.active:
                self.active.add(index)
                self.progress.start(index, self.cfgs[index], resumed, self.cfgs[index].values.epochs)
        elif kind == "epoch":
            self._epoch(index, event[2], live=True)

    def state_folder(self, cfg: RunConfig) -> Path | None:
        """The trial's run-state folder; None without a store or while another search holds it."""
        if self.states is None:
            return None
        folder = self.states.folder(cfg, self.data.fingerprint, self.ctx.device)
        return None if folder.name in self.shared else folder

    def claim_state(self, cfg: RunConfig) -> Path | None:
        """Claim the trial's state folder for this search; None (and one line) if another search trains it now."""
        folder = self.state_folder(cfg)
        if folder is None or self.states is None or self.states.claim(folder):
            return folder
        self.shared.add(folder.name)
        self.say(f"{cfg.name}: another train is running this trial right now; "
                 "this one trains it without saving run state (no resume for it)")
        return None

    def _open(self, index: int, tags: dict[str, str] | None = None, resumed: int = 0) -> str | None:
        if index in self.children:
            return self.children[index]
        cfg = self.cfgs[index]
        folder = self.state_folder(cfg)
        note = self.states.read_note(folder) if self.states is not None and folder is not None and resumed else {}
        previous = str(note.get("mlflow_run_id") or "")
        child, logged = None, set()
        if previous and self.tracker.enabled:
            reopened = self.tracker.reopen_child(previous, tags={"cnnpipe.resumed_at_epoch": str(resumed)})
            if reopened is not None:
                child, logged = previous, reopened
        if child is None:
            extra = dict(tags or {})
            if resumed:
                extra.update({"cnnpipe.resumed_at_epoch": str(resumed), "cnnpipe.resumed_from": previous})
            child = self.tracker.start_child(cfg.name, params=child_params(cfg, self.data),
                                             tags={**child_tags(cfg, self.data, self.ctx.device), **extra})
        self.children[index] = child
        self.logged[index] = logged
        return child

    def _epoch(self, index: int, record: "EpochRecord", live: bool) -> None:
        child = self._open(index)
        if record.epoch in self.logged[index]:
            return
        self.tracker.log_epoch(child, record.epoch, epoch_metrics(record, self.ctx.layer_stats))
        self.logged[index].add(record.epoch)
        if live:
            self.progress.epoch(index, self.cfgs[index], record)

    def _history(self, index: int, records: Sequence["EpochRecord"]) -> None:
        """The epochs of ``records`` not logged yet, in one MLflow call (finished or reused runs)."""
        child = self._open(index)
        new = [record for record in records if record.epoch not in self.logged[index]]
        self.tracker.log_epochs(child, [(r.epoch, epoch_metrics(r, self.ctx.layer_stats)) for r in new])
        self.logged[index].update(record.epoch for record in new)

    # ---- a trial's end (of a rung, or of the search)

    def finish(self, outcome: RunOutcome, *, final: bool, rung: int = 0) -> RunRecord:
        """Record a trial's outcome at halving's rung ``rung`` (0: exhaustive); ``final``: its child ends
        (else it stays open for the next rung)."""
        rec = outcome.unpacked(self.data)
        rec.rung = rung  # before the child ends: its tags say which rung it reached
        index = rec.index
        rec.mlflow_run_id = self._open(index, resumed=rec.resumed_at or 0)
        self._history(index, rec.result.history)
        self.active.discard(index)
        self.progress.finish(index)
        if rec.result.status == "failed" and rec.result.traceback and debug_enabled():
            self.say(f"{rec.cfg.name} crashed:\n{rec.result.traceback.rstrip()}")
        if final:
            self.end(rec, outcome)
        return rec

    def end(self, rec: RunRecord, outcome: RunOutcome | None = None) -> None:
        """End the trial's child run; cache a finished run and drop its state."""
        histograms = None
        if outcome is not None and outcome.layers:
            from cnnpipe.reports.layer_histograms import histogram_png

            histograms = histogram_png(outcome.layers, f"{rec.cfg.name}: weights and gradients after epoch {outcome.layers_epoch}")
        self._end_child(rec, histograms)
        complete = rec.ok and rec.result.status in ("finished", "diverged") and not rec.pruned
        if self.cache is not None and complete and rec.result.model is not None and not rec.cached:
            try:
                self.cache.store(rec.cfg, entry_record(rec, self.tracker), rec.result.model.state_dict(),
                                 fingerprint=self.data.fingerprint, device=self.ctx.device,
                                 files={HISTOGRAMS: histograms} if histograms else None)
            except OSError as err:  # a full disk costs the next grid a retrain, not this grid its result
                self.say(f"cache: could not store {rec.cfg.name} ({one_line(str(err), 160)}); it will train again next time")
        # A finished trial's state is dropped (the run cache holds what it needs); a pruned one's is
        # kept for a later search to continue, unless caching is off (then nothing is reused).
        if self.states is not None and (complete or self.cache is None or not self.cache.reuse):
            folder = self.state_folder(rec.cfg)
            if folder is not None:
                self.states.discard(folder)
        self.done.add(rec.index)
        self.say(run_line(rec, self.total, self.select_by))

    def lookup(self, cfg: RunConfig) -> "tuple[CachedRun, RunResult] | None":
        """The cached result for ``cfg`` (model rebuilt), or None: train it."""
        if self.cache is None:
            return None
        hit = self.cache.lookup(cfg, fingerprint=self.data.fingerprint, device=self.ctx.device)
        if hit is None:
            return None

        result = cached_result(hit, cfg, self.data, self.ctx.device)
        if result is None:
            self.say(f"cache: entry {hit.key} for {cfg.name} is unusable; retraining it")
            return None
        return hit, result

    def reuse(self, index: int, cfg: RunConfig, hit: "CachedRun", result: "RunResult") -> RunRecord:
        """A cached run, logged as a child tagged ``cnnpipe.reused`` with its full per-epoch history."""
        original = str(hit.record.get("mlflow_run_id") or "")
        tags = {"cnnpipe.reused": "true", "cnnpipe.reused_from": original, "cnnpipe.cache_key": hit.key}
        rec = RunRecord(index, cfg, result, mlflow_run_id=self._open(index, tags=tags), cached=True,
                        reused_from=original or None)
        self._history(index, result.history)
        return rec

    def end_reused(self, rec: RunRecord, hit: "CachedRun") -> None:
        histograms = hit.path / HISTOGRAMS
        self._end_child(rec, histograms.read_bytes() if histograms.is_file() else None)
        self.done.add(rec.index)
        self.say(run_line(rec, self.total, self.select_by))

    def _end_child(self, rec: RunRecord, histograms: bytes | None) -> None:
        if not self.tracker.enabled:
            return
        from cnnpipe.reports import train_files

        result = rec.result
        tags = {"status": rec.status, "stop_reason": one_line(result.stop_reason, 5000)}
        if rec.pruned:
            tags.update({"cnnpipe.pruned": "true", "cnnpipe.pruned_at_epoch": str(result.epochs_run)})
        if rec.rung:  # a halving trial: pruned or promoted to the end, so the UI can filter either
            tags.update({"cnnpipe.rung": str(rec.rung), "cnnpipe.pruned": "true" if rec.pruned else "false"})
        texts = {"model_summary.txt": self._summary(rec.cfg) + "\n", "history.csv": train_files.history_csv_text(rec)}
        if result.traceback:
            texts[TRACEBACK_FILE] = result.traceback
        with tempfile.TemporaryDirectory(prefix="cnnpipe-child-") as tmp:
            files = [self.samples] if self.samples is not None else []
            if histograms:
                path = Path(tmp) / HISTOGRAMS
                path.write_bytes(histograms)
                files.append(path)
            self.tracker.end_child(
                rec.mlflow_run_id,
                status="FINISHED" if rec.ok or rec.pruned else "FAILED",
                reason=failure_reason(result),
                metrics=final_metrics(result),
                tags=tags,
                texts=texts,
                files=files,
            )

    def _summary(self, cfg: RunConfig) -> str:
        from cnnpipe.models.build import model_summary

        if cfg.values.model not in self._summaries:
            self._summaries[cfg.values.model] = model_summary(cfg.values.model, cfg.layers, self.data.image_shape,
                                                              self.data.num_classes)
        return self._summaries[cfg.values.model]

    def say(self, line: str) -> None:
        self.progress.write(line)

    # ---- the search stops early

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
        self.progress.close()
        if self.states is not None:
            self.states.release()
