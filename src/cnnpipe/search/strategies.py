"""Which trials train how far: the exhaustive grid, or synchronous successive halving.

Successive halving (Jamieson & Talwalkar 2016; the building block of
Hyperband and ASHA): every trial trains to the first rung (``min_epochs``),
the best ``1/eta`` by the validation metric of ``select_by`` are promoted and
continue from their saved state to the next rung (``min_epochs * eta**k``,
capped by ``epochs``), and so on until one rung reaches ``epochs`` or a
single trial is left, which trains to its end. Rungs are synchronous:
promotion waits for the whole rung, and ranks with ``selection.rung_score``
(history only, ties by grid order), so the same params always select the
same run. Asynchronous ASHA would promote whoever finishes first, making
the choice depend on timing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cnnpipe.params.sections import GridParams
from cnnpipe.search.selection import RunRecord, rung_score


@dataclass(frozen=True)
class Exhaustive:
    """Every trial trains to its own end (``epochs`` or early stopping)."""

    name = "exhaustive"

    def rungs(self, max_epochs: int) -> list[int]:
        return [max_epochs]

    def keep(self, entering: int) -> int:
        return entering

    def planned_epochs(self, epochs: Sequence[int]) -> int:
        return sum(epochs)


@dataclass(frozen=True)
class SuccessiveHalving:
    settings: GridParams  # eta, min_epochs; ``GridParams.rungs`` is the one definition of the rungs
    name = "halving"

    @property
    def eta(self) -> int:
        return self.settings.eta

    def rungs(self, max_epochs: int) -> list[int]:
        """Epoch budgets: ``min_epochs * eta**k`` below ``max_epochs``, then ``max_epochs``."""
        return list(self.settings.rungs(max_epochs))

    def keep(self, entering: int) -> int:
        """How many of ``entering`` trials are promoted: the best ``1/eta``, at least one."""
        return max(1, entering // self.eta)

    def planned_epochs(self, epochs: Sequence[int]) -> int:
        """Epochs the search trains if no trial stops early (the progress bar's total)."""
        total, alive, done = 0, len(epochs), 0
        rungs = self.rungs(max(epochs, default=0))
        for number, budget in enumerate(rungs, start=1):
            last = number == len(rungs) or alive == 1
            until = max(epochs) if last else budget
            total += alive * (until - done)
            if last:
                break
            alive, done = self.keep(alive), budget
        return total


def make_strategy(settings: GridParams) -> Exhaustive | SuccessiveHalving:
    """The strategy ``grid.strategy`` names."""
    return SuccessiveHalving(settings) if settings.strategy == "halving" else Exhaustive()


def halving(eta: int = 3, min_epochs: int = 1) -> SuccessiveHalving:
    """Successive halving with these settings (benchmarks, tests)."""
    return SuccessiveHalving(GridParams(strategy="halving", eta=eta, min_epochs=min_epochs))


def promote(records: Sequence[RunRecord], keep: int, epoch: int, select_by: str) -> tuple[list[RunRecord], list[RunRecord]]:
    """(promoted, pruned) at a rung that ended at ``epoch``: the best ``keep`` by ``rung_score``."""
    ranked = sorted(records, key=lambda rec: rung_score(rec, epoch, select_by))
    return ranked[:keep], ranked[keep:]
