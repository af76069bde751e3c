"""The search space: the configs a ``params.yaml`` asks for.

List axes give their Cartesian product (in ``params.yaml`` key order); range
axes (``{log_uniform: ...}``, ``{uniform: ...}``, ``{int_uniform: ...}``,
``{choice: ...}``) give ``grid.samples`` points, every range key drawn jointly
per point by numpy's ``Generator`` seeded with ``grid.search_seed``. Each list
combination is crossed with the same drawn points, so a ``model`` list
compares the models at the same sampled learning rates. The result is a pure
function of the params: same params, same points, same run ids.

Drawn floats are rounded to 4 significant digits, so a value shown in a run
name can be pasted back with ``dvc exp run -S lr=0.002154``.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from cnnpipe.util.errors import ParamsError
from cnnpipe.params.axes import Choice, IntUniform, LogUniform, Range, Uniform
from cnnpipe.params.messages import error_line
from cnnpipe.params.run_config import RunConfig
from cnnpipe.params.schema import Params
from cnnpipe.params.values import TRAINING_KEYS, TrainingValues, resolve_augment
from cnnpipe.models.pinned_weights import pin_layers

if TYPE_CHECKING:
    import numpy as np

SIGNIFICANT_DIGITS = 4


def round_sig(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``value`` to ``digits`` significant digits (0.0021544 -> 0.002154)."""
    return float(f"{value:.{digits}g}")


def draw(spec: Range, rng: np.random.Generator) -> Any:
    """One value from a range (one or two draws of ``rng``)."""
    if isinstance(spec, LogUniform):
        lo, hi = spec.log_uniform
        return round_sig(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    if isinstance(spec, Uniform):
        lo, hi = spec.uniform
        return round_sig(float(rng.uniform(lo, hi)))
    if isinstance(spec, IntUniform):
        lo, hi = spec.int_uniform
        return int(rng.integers(lo, hi, endpoint=True))
    if isinstance(spec, Choice):
        return spec.choice[int(rng.integers(len(spec.choice)))]
    raise TypeError(f"not a range: {spec!r}")


def sample_points(params: Params) -> list[dict[str, Any]]:
    """``grid.samples`` joint draws of every range key (one empty point when no key is a range)."""
    ranges = params.ranges
    if not ranges:
        return [{}]
    import numpy as np  # only a sampled search needs it: `cnnpipe validate` of a plain grid stays lean

    rng = np.random.default_rng(params.grid.search_seed)
    return [{key: draw(spec, rng) for key, spec in ranges.items()} for _ in range(params.grid.samples)]


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
            values = dict(zip(fixed, combo)) | drawn
            values = {key: values[key] for key in TRAINING_KEYS}
            values["augment"] = resolve_augment(values["augment"], params.data.dataset)
            if values["monitor"] == "auto":
                values["monitor"] = params.select_by
            if values["model"] not in layers:
                layers[values["model"]] = params.layers_for(values["model"])
                if weights_dir is not None:
                    layers[values["model"]] = pin_layers(layers[values["model"]], weights_dir)
            runs.append(RunConfig(values=_checked(values, params), layers=layers[values["model"]],
                                  axes=params.axes, dataset=params.data.dataset,
                                  weights_dir=str(Path(weights_dir).resolve()) if weights_dir is not None else None))
    _check_distinct(runs, params)
    return runs


def _checked(values: dict[str, Any], params: Params) -> TrainingValues:
    try:
        return TrainingValues(**values)
    except ValidationError as exc:
        key = exc.errors(include_url=False)[0]["loc"][0]
        spec = params.ranges.get(key)
        where = f" (drawn from {key}: {{{spec.kind}: {list(spec.bounds)}}}, rounded to {SIGNIFICANT_DIGITS} digits)" \
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
