"""The search space: the configs a ``params.yaml`` asks for.

List axes give their Cartesian product (in ``params.yaml`` key order); range
axes (``{log_uniform: ...}``, ``{uniform: ...}``, ``{int_uniform: ...}``,
``{choice: ...}``) give ``grid.samples`` points, every range key drawn jointly
per point by Optuna's ``RandomSampler`` seeded with ``grid.search_seed``
(through the same ask interface and distributions as a tpe search:
``search.optuna_space``). Each list combination is crossed with the same
drawn points, so a ``model`` list compares the models at the same sampled
learning rates. The result is a pure function of the params: same params,
same points, same run ids.

A tpe search (``search.ask_tell``) asks its points one batch at a time;
``TrialSpace`` turns each suggestion into a config the same way.

Drawn and suggested floats are rounded to 4 significant digits, so a value
shown in a run name can be pasted back with ``dvc exp run -S lr=0.002154``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from cnnpipe.util.errors import ParamsError
from cnnpipe.params.axes import _candidates
from cnnpipe.params.messages import error_line
from cnnpipe.params.run_config import RunConfig
from cnnpipe.params.schema import Params
from cnnpipe.params.values import TRAINING_KEYS, TrainingValues, resolve_augment
from cnnpipe.models.pinned_weights import pin_layers
from cnnpipe.search.optuna_space import SIGNIFICANT_DIGITS, as_value, distribution, new_study, round_sig

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

__all__ = ["SIGNIFICANT_DIGITS", "TrialSpace", "expand", "point_config", "round_sig", "sample_points"]


def sample_points(params: Params) -> list[dict[str, Any]]:
    """``grid.samples`` joint draws of every range key (one empty point when no key is a range)."""
    ranges = params.ranges
    if not ranges:
        return [{}]
    from optuna.samplers import RandomSampler  # only a sampled search needs it: a plain grid stays lean

    study = new_study(RandomSampler(seed=params.grid.search_seed))
    distributions = {key: distribution(spec) for key, spec in ranges.items()}
    points = []
    for _ in range(params.grid.samples):  # a random sampler learns nothing: nothing is told
        suggested = study.ask(distributions).params
        points.append({key: as_value(spec, suggested[key]) for key, spec in ranges.items()})
    return points


def expand(params: Params, weights_dir: str | os.PathLike[str] | None = None) -> list[RunConfig]:
    """Every config of the search: list combinations (outer, ``params.yaml`` order) x drawn points (inner).

    ``augment: auto`` and ``monitor: auto`` are resolved here (per dataset, and
    to ``select_by``), so the run ids say what is really trained. A drawn value
    that breaks its key's own rule, or two points that are the same run, stop
    with one ``ParamsError`` line before anything trains. ``weights_dir`` (the
    weights stage's output; the train stage passes it) pins a pretrained
    torchvision model's layer spec with its weights' SHA-256 and normalization.
    """
    fixed = params.training
    points = sample_points(params)
    runs: list[RunConfig] = []
    layers: dict[str, tuple[Any, ...]] = {}
    for combo in itertools.product(*fixed.values()):
        for drawn in points:
            runs.append(point_config(params, dict(zip(fixed, combo)) | drawn, layers, weights_dir))
    _check_distinct(runs, params)
    return runs


def point_config(params: Params, point: dict[str, Any], layers: dict[str, tuple[Any, ...]],
                 weights_dir: str | os.PathLike[str] | None = None, *, how: str = "drawn from") -> RunConfig:
    """One search point (a value for every training key) as a ``RunConfig``; ``layers`` memoizes pinned specs.

    ``augment: auto`` and ``monitor: auto`` are resolved here; a value that
    breaks its key's rule is one ``ParamsError`` line saying ``how`` it came
    from its range.
    """
    values = {key: point[key] for key in TRAINING_KEYS}
    values["augment"] = resolve_augment(values["augment"], params.data.dataset)
    if values["monitor"] == "auto":
        values["monitor"] = params.select_metric
    if values["model"] not in layers:
        layers[values["model"]] = params.layers_for(values["model"])
        if weights_dir is not None:
            layers[values["model"]] = pin_layers(layers[values["model"]], weights_dir)
    return RunConfig(values=_checked(values, params, how), layers=layers[values["model"]], axes=params.axes,
                     dataset=params.data.dataset,
                     weights_dir=str(Path(weights_dir).resolve()) if weights_dir is not None else None)


def _checked(values: dict[str, Any], params: Params, how: str = "drawn from") -> TrainingValues:
    try:
        return TrainingValues(**values)
    except ValidationError as exc:
        key = exc.errors(include_url=False)[0]["loc"][0]
        spec = params.ranges.get(key)
        where = f" ({how} {key}: {{{spec.kind}: {list(spec.bounds)}}}, rounded to {SIGNIFICANT_DIGITS} digits)" \
            if spec is not None and hasattr(spec, "bounds") else ""
        raise ParamsError(f"{error_line(exc)}{where}; narrow the range") from None


def _check_distinct(runs: list[RunConfig], params: Params) -> None:
    first: dict[str, int] = {}
    for index, run in enumerate(runs, start=1):
        seen = first.setdefault(run.run_id, index)
        if seen != index:
            why = (f"grid.samples={params.grid.samples} draws repeat a point; lower grid.samples, widen a range "
                   "or list the values instead") if params.ranges else \
                "an 'auto' (augment, or monitor = select_by) resolves to a value also listed; drop one"
            raise ParamsError(f"runs {seen} and {index} are the same config ({run.name}): {why}")


SUGGESTED = "suggested from"  # how a tpe trial's value came from its range, in a one-line error


class TrialSpace:
    """A tpe search's space: its searched keys, their distributions, and a suggestion -> ``RunConfig``.

    Every searched key (a list of 2+ values, or a range) is one dimension of
    ONE space: a list is a categorical choice, not crossed with the others as
    in a grid (a model learns which values pay off; crossing them would spend
    the budget on points it already knows are poor). Keys with one value are
    fixed. The sampler may suggest any value of a range; ``params.yaml``'s
    schema already refuses a range whose ends break their key's rule, but
    rounding can still push a suggestion over (``momentum: {uniform: [0.5,
    0.99999]}`` rounds up to 1.0, and a momentum is < 1), so the rounded ends
    are checked here, before anything trains: one line, never a failure
    half-way through a search.
    """

    def __init__(self, params: Params, weights_dir: str | os.PathLike[str] | None = None) -> None:
        self.params = params
        self.weights_dir = weights_dir
        self.keys: tuple[str, ...] = params.axes  # lists of 2+ values and ranges, in TrainingValues' order
        self._layers: dict[str, tuple[Any, ...]] = {}
        self._fixed = {key: values[0] for key, values in params.training.items() if key not in self.keys}
        self._check_ends()

    @property
    def longest(self) -> int:
        """The most epochs a trial may train (the progress bar's plan)."""
        return max(_candidates(self.params.epochs))

    @property
    def monitors(self) -> set[str]:
        """The early-stopping metrics trials may use (``auto`` is ``select_by``)."""
        return {self.params.select_metric if m == "auto" else m for m in _candidates(self.params.monitor)}

    def distributions(self) -> dict[str, "BaseDistribution"]:
        """Each searched key's Optuna distribution (a list is a categorical choice)."""
        return {key: distribution(getattr(self.params, key)) for key in self.keys}

    def config(self, suggested: Mapping[str, Any]) -> RunConfig:
        """The run a suggestion names: fixed keys as given, floats from a range rounded to 4 digits."""
        point = self._fixed | {key: as_value(getattr(self.params, key), suggested[key]) for key in self.keys}
        return point_config(self.params, point, self._layers, self.weights_dir, how=SUGGESTED)

    def _check_ends(self) -> None:
        """Every end of every range, rounded as a suggestion would be, is a valid value of its key."""
        base = self._fixed | {key: as_value(getattr(self.params, key), _candidates(getattr(self.params, key))[0])
                              for key in self.keys}
        for key, spec in self.params.ranges.items():
            for end in _candidates(spec):
                point_config(self.params, base | {key: as_value(spec, end)}, self._layers, self.weights_dir,
                             how=SUGGESTED)
