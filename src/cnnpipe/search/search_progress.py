"""What the user sees while a search runs, in every mode (sequential, parallel, Ray, queued).

Not a terminal (``dvc queue logs -f``, CI, a pipe): one flushed line per
epoch per trial, plus a line when a trial ends, a rung starts, or trials are
promoted. A terminal: a tqdm bar per active trial and one for the whole
search, counting epochs done of epochs planned, with tqdm's ETA.
``CNNPIPE_PROGRESS=0`` turns the bars off (lines instead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cnnpipe.params.run_config import RunConfig
from cnnpipe.search.selection import RunRecord, failure_reason
from cnnpipe.util.text import one_line

if TYPE_CHECKING:
    from cnnpipe.engine.records import EpochRecord

Report = Callable[[str], None]


def run_line(rec: RunRecord, total: int, select_by: str = "val_top1") -> str:
    """``run 3/8 lr=0.01,batch_size=100: best val_loss 0.2412 (val_top1 0.9120) @ epoch 7, 41 s``."""
    r = rec.result
    head = f"run {rec.index}/{total} {rec.cfg.name}"
    if rec.ok:
        shown = f"best {select_by} {rec.metric(select_by):.4f}"
        if select_by != "val_top1":
            shown += f" (val_top1 {rec.metric('val_top1'):.4f})"
        if rec.cached:
            took = f"reused (trained in {r.seconds:.0f} s)"
        elif rec.resumed_at:
            took = f"{r.seconds:.0f} s, resumed at epoch {rec.resumed_at}"
        else:
            took = f"{r.seconds:.0f} s"
        if r.status == "diverged":
            took += f"; {one_line(r.stop_reason, 120)}, best epoch kept"
        elif r.status == "paused":
            took += f"; {r.epochs_run}/{rec.cfg.values.epochs} epochs so far"
        return f"{head}: {shown} @ epoch {r.best_epoch}, {took}"
    return f"{head}: FAILED ({one_line(failure_reason(r), 160)}), {r.seconds:.0f} s"


def epoch_line(cfg: RunConfig, record: "EpochRecord") -> str:
    """``[lr=0.01] epoch 2/8: train_loss 0.4123 val_loss 0.3921 val_top1 0.8571 (12.3 s)``."""
    return (f"[{cfg.name}] epoch {record.epoch}/{cfg.values.epochs}: train_loss {record.train_loss:.4f} "
            f"val_loss {record.val_loss:.4f} val_top1 {record.val_top1:.4f} ({record.epoch_seconds:.1f} s)")


class SearchProgress:
    """Per-epoch progress of every trial, as bars on a terminal or as flushed lines."""

    def __init__(self, report: Report | None, bars: bool, planned_epochs: int = 0) -> None:
        self.report = report
        self.use_bars = bars and report is not None
        self.bars: dict[int, Any] = {}
        self.slots: dict[int, int] = {}
        self.total_bar: Any = None
        if self.use_bars:
            from tqdm.auto import tqdm

            self.total_bar = tqdm(total=planned_epochs, desc="search", position=0, unit="epoch", dynamic_ncols=True)

    def plan(self, planned_epochs: int) -> None:
        """Epochs planned in all (successive halving learns it rung by rung)."""
        if self.total_bar is not None:
            self.total_bar.total = planned_epochs
            self.total_bar.refresh()

    def start(self, index: int, cfg: RunConfig, done: int, until: int) -> None:
        if not self.use_bars or index in self.bars:
            return
        from tqdm.auto import tqdm

        slot = min(set(range(1, len(self.slots) + 2)) - set(self.slots.values()))
        self.slots[index] = slot
        self.bars[index] = tqdm(total=until, initial=done, desc=cfg.name, position=slot, leave=False, unit="epoch",
                                dynamic_ncols=True)

    def epoch(self, index: int, cfg: RunConfig, record: "EpochRecord") -> None:
        if self.total_bar is not None:
            self.total_bar.update(1)
        bar = self.bars.get(index)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(val_loss=f"{record.val_loss:.4f}", val_top1=f"{record.val_top1:.4f}")
        elif self.report is not None and not self.use_bars:
            self.report(epoch_line(cfg, record))

    def skip(self, epochs: int) -> None:
        """Planned epochs that will not be trained (early stopping, pruning, reuse)."""
        if self.total_bar is not None and epochs > 0:
            self.total_bar.total = max(self.total_bar.n, self.total_bar.total - epochs)
            self.total_bar.refresh()

    def finish(self, index: int) -> None:
        bar = self.bars.pop(index, None)
        self.slots.pop(index, None)
        if bar is not None:
            bar.close()

    def write(self, line: str) -> None:
        if self.report is None:
            return
        if self.use_bars:
            from tqdm.auto import tqdm

            tqdm.write(line)
        else:
            self.report(line)

    def close(self) -> None:
        for index in list(self.bars):
            self.finish(index)
        if self.total_bar is not None:
            self.total_bar.close()
            self.total_bar = None
