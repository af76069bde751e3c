"""``params.yaml``'s lists and ranges as Optuna distributions, and a suggested value back as a training value.

Every point a search does not list outright comes from an Optuna sampler
through the same ask interface: drawn points (``space.sample_points``,
``RandomSampler``) and a tpe search's trials (``search.ask_tell``,
``TPESampler``). This module is the one mapping between the two vocabularies:
``log_uniform`` -> ``FloatDistribution(log=True)``, ``uniform`` ->
``FloatDistribution``, ``int_uniform`` -> ``IntDistribution``, ``choice`` and
(in a tpe search) a list -> ``CategoricalDistribution``.

A suggested float is rounded to 4 significant digits (``round_sig``) before
it becomes a training value, so a value in a run name pastes back with
``dvc exp run -S lr=0.002154``. The sampler keeps its own unrounded value; it
only ever compares its own suggestions, so reproducibility is untouched.

optuna is imported inside the functions that need it: ``cnnpipe validate``
of a plain grid never imports it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from cnnpipe.params.axes import Choice, IntUniform, LogUniform, Uniform

if TYPE_CHECKING:
    from optuna import Study
    from optuna.distributions import BaseDistribution
    from optuna.samplers import BaseSampler

SIGNIFICANT_DIGITS = 4


def round_sig(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``value`` to ``digits`` significant digits (0.0021544 -> 0.002154)."""
    return float(f"{value:.{digits}g}")


def distribution(setting: Any) -> "BaseDistribution":
    """The distribution a sampler suggests a key's values from: a range, or a list (a categorical choice)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(setting, list):
        return CategoricalDistribution(list(setting))
    if isinstance(setting, Choice):
        return CategoricalDistribution(list(setting.choice))
    if isinstance(setting, LogUniform):
        return FloatDistribution(*map(float, setting.bounds), log=True)
    if isinstance(setting, Uniform):
        return FloatDistribution(*map(float, setting.bounds))
    if isinstance(setting, IntUniform):
        return IntDistribution(*map(int, setting.bounds))
    raise TypeError(f"neither a list nor a range: {setting!r}")


def as_value(setting: Any, suggested: Any) -> Any:
    """A suggested value as a training value: a float from a range rounded to 4 significant digits."""
    if isinstance(setting, (LogUniform, Uniform)):
        return round_sig(float(suggested))
    if isinstance(setting, IntUniform):
        return int(suggested)
    return suggested


def new_study(sampler: "BaseSampler", *directions: str) -> "Study":
    """A fresh in-memory study (one objective per direction, default: minimize one), without Optuna's INFO lines."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.create_study(directions=list(directions or ["minimize"]), sampler=sampler)
