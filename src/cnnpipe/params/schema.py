"""``Params``: a validated ``params.yaml``, every default the shipped file's value.

Its training keys are derived from ``TrainingValues`` (one declaration per key):
each becomes an ``Axis`` of the same value type, with the shipped grid's lists as
defaults (``AXIS_DEFAULTS``) and ``monitor`` also taking ``auto``.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import (
    Field,
    create_model,
    field_validator,
    model_validator,
)

from cnnpipe.data.registry import DatasetSpec
from cnnpipe.util.errors import ParamsError
from cnnpipe.params.messages import _bad, _fmt, _shown, suggest
from cnnpipe.params.values import PLAIN_FIELDS, MonitorSetting, TRAINING_KEYS, TrainingValues, _Strict, objectives
from cnnpipe.params.axes import Axis, Choice, Range, _candidates, _is_range
from cnnpipe.params.pretrained_section import PretrainedParams
from cnnpipe.params.sections import DataParams, EvalParams, GridParams, MlflowParams
from cnnpipe.models import torchvision_spec, torchvision_spec as tvs
from cnnpipe.models.spec import check_layers


def _section_or_empty(raw: dict[str, Any]) -> dict[str, Any]:
    """``data:`` with nothing under it is YAML null: treat an empty section as all defaults."""
    return {key: ({} if value is None and key in _MAPPINGS else value) for key, value in raw.items()}


_MAPPINGS = ("data", "eval", "mlflow", "grid", "models", "pretrained")


class _ParamsRules(_Strict):
    """The behaviour of ``Params`` (views, whole-file checks); its fields are declared below from their sources."""

    # ------------------------------------------------------------- views

    @property
    def training(self) -> dict[str, tuple[Any, ...]]:
        """Every training key that is not a range -> its values (one unless it is a list axis)."""
        out = {}
        for key in TRAINING_KEYS:
            setting = getattr(self, key)
            if not _is_range(setting):
                out[key] = tuple(setting) if isinstance(setting, list) else (setting,)
        return out

    @property
    def ranges(self) -> dict[str, Range]:
        """Training keys drawn from a range -> the range (``grid.samples`` joint draws)."""
        return {key: getattr(self, key) for key in TRAINING_KEYS if _is_range(getattr(self, key))}

    @property
    def axes(self) -> tuple[str, ...]:
        """Training keys that vary across the search: lists of two or more values, and ranges."""
        ranges = self.ranges
        return tuple(key for key in TRAINING_KEYS
                     if key in ranges or (isinstance(getattr(self, key), list) and len(getattr(self, key)) > 1))

    @property
    def grid_size(self) -> int:
        """Points in the search: the product of the list lengths, times ``grid.samples`` when a key is a range;
        a tpe search: ``grid.samples`` trials."""
        if self.grid.strategy == "tpe":
            return self.grid.samples
        size = math.prod(len(values) for values in self.training.values())
        return size * (self.grid.samples if self.ranges else 1)

    @property
    def select_metric(self) -> str:
        """The validation metric ``select_by`` names (the one early stopping's ``monitor: auto`` follows)."""
        return objectives(self.select_by)[0]

    @property
    def select_cost(self) -> str | None:
        """The counted cost ``select_by`` trades the metric against (``params`` | ``macs``), or None."""
        return objectives(self.select_by)[1]

    def describe_selection(self) -> str:
        """``val_loss``, or ``[val_top1, macs] (Pareto front: the most accurate within max_cost 2e+06)``."""
        if self.select_cost is None:
            return self.select_metric
        budget = f"within max_cost {self.max_cost:g}" if self.max_cost is not None else "of all"
        return f"[{self.select_metric}, {self.select_cost}] (Pareto front: the most accurate {budget})"

    def describe_grid(self) -> str:
        """``lr(2) x batch_size(2)``, ``model(2) x 8 samples of lr~log_uniform[0.0001, 0.1]``, or ``no grid axes``;
        a tpe search: ``tpe over lr~log_uniform[0.0001, 0.1], batch_size~choice[32, 64]`` (a list is a choice)."""
        ranges = self.ranges
        if self.grid.strategy == "tpe":
            axes = [f"{key}~{ranges[key]}" if key in ranges else
                    f"{key}~choice[{', '.join(_fmt(v) for v in getattr(self, key))}]" for key in self.axes]
            return "tpe over " + (", ".join(axes) or "nothing")
        parts = [f"{key}({len(values)})" for key, values in self.training.items() if len(values) > 1]
        if ranges:
            drawn = ", ".join(f"{key}~{spec}" for key, spec in ranges.items())
            parts.append(f"{self.grid.samples} samples of {drawn}")
        return " x ".join(parts) or "no grid axes"

    def layers_for(self, model_name: str) -> tuple[Any, ...]:
        """The layer spec of a model name; a ``torchvision:`` name gives its (unpinned) mapping."""
        if model_name in self.models:
            return self.models[model_name]

        if torchvision_spec.is_name(model_name):
            return torchvision_spec.layer_spec(torchvision_spec.arch_of(model_name), self.pretrained.weights,
                                               self.data.spec().image_shape[0])
        from cnnpipe.models.presets import PRESETS

        return tuple(PRESETS[model_name])

    # ------------------------------------------------------------- whole-file checks

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, raw: Any) -> Any:
        if raw is None:
            raise _bad("the file has no keys (it is empty or only comments); restore it: git checkout params.yaml")
        if not isinstance(raw, dict):
            raise _bad(f"the top level must be a mapping of keys, got {type(raw).__name__}")
        for key in raw:
            if not isinstance(key, str):
                raise _bad(f"keys must be strings, got {key!r}")
        return _section_or_empty(raw)

    @field_validator("models", mode="before", check_fields=False)
    @classmethod
    def _models(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise _bad(f"must map a model name to its list of layers, got {_shown(raw)}")
        from cnnpipe.models.presets import PRESETS

        for name, layers in raw.items():
            if not isinstance(name, str) or not name:
                raise _bad(f": model names must be non-empty strings, got {name!r}")
            if not isinstance(layers, list) or not layers:
                raise _bad(f".{name} must be a non-empty list of layers, got {_shown(layers)}")
            if name in PRESETS and layers != PRESETS[name]:
                raise _bad(f".{name} clashes with the built-in preset of that name (other layers); rename it")
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> "_ParamsRules":
        """Cross-key checks: names resolve, shapes fit, the search is well-formed and not absurd."""
        self._check_models()
        self._check_search()
        return self

    def _check_models(self) -> None:
        spec = self.data.spec()
        classes = spec.num_classes or 2  # a folder's classes are counted by prepare (which checks top_k then)
        for k in self.eval.top_k:
            if spec.classes and k > spec.num_classes:
                raise _bad(f"eval.top_k has {k}, more than the {spec.num_classes} classes of {spec.name}; use k <= {spec.num_classes}")

        from cnnpipe.models.presets import PRESETS
        known = list(self.models) + [name for name in PRESETS if name not in self.models]
        names = _candidates(self.model)
        self._check_torchvision(names, spec)
        for index, name in enumerate(names):
            if name not in known and not torchvision_spec.is_name(name):
                where = "model" if not isinstance(self.model, (list, Choice)) else \
                    f"model[{index}]" if isinstance(self.model, list) else f"model.choice[{index}]"
                raise _bad(f"{where}: unknown model {name!r}{suggest(name, known)}; "
                           f"define it under models: or use a preset ({', '.join(PRESETS)})")
        try:
            for name, layers in self.models.items():
                check_layers(f"models.{name}", list(layers), spec.image_shape, classes)
            for name in names:
                if name in PRESETS and name not in self.models:
                    check_layers(f"preset {name}", list(PRESETS[name]), spec.image_shape, classes)
        except ParamsError as err:
            raise _bad(err.message) from None

    def _check_torchvision(self, names: list[Any], spec: DatasetSpec) -> None:
        """torchvision: names exist, fit the image size, and fine-tuning strategies go only where a body is.

        torchvision is imported only when a ``torchvision:`` name is used.
        """
        torchvision_names = [name for name in names if tvs.is_name(name)]
        strategies = [s for s in _candidates(self.finetune) if s != "full"]
        others = [name for name in names if not tvs.is_name(name)]
        if strategies and others:
            raise _bad(f"finetune: {strategies[0]} needs a torchvision model, but model {others[0]} is a "
                       "cnnpipe layer list (nothing to freeze); use finetune: full or drop it from model")
        if not torchvision_names:
            return
        for name in self.models:
            if tvs.is_name(name):
                raise _bad(f"models.{name}: names starting with {tvs.PREFIX!r} are torchvision models; rename it")
        weights = self.pretrained.weights
        for name in torchvision_names:
            arch = tvs.arch_of(name)
            try:
                tvs.check_arch(arch, f"model {name}")
                tvs.check_image_size(arch, spec.image_shape, f"model {name}")
                if tvs.ENUM_NAME.fullmatch(weights) and weights != "none":
                    tvs.resolve_weights_name(arch, weights)
            except ValueError as err:
                raise _bad(str(err)) from None
        if spec.image_shape[0] not in (1, 3):
            raise _bad(f"torchvision models take 1- or 3-channel images, {spec.name} has {spec.image_shape[0]}")
        custom = weights != tvs.NO_WEIGHTS and not tvs.ENUM_NAME.fullmatch(weights)
        if custom and len(torchvision_names) > 1:
            raise _bad(f"pretrained.weights {json.dumps(weights)} is one state dict, but model lists "
                       f"{len(torchvision_names)} torchvision models; list one, or use a torchvision weights name")

    def _check_search(self) -> None:
        grid = self.grid
        self._check_objectives()
        if grid.prune != "none" and grid.strategy != "tpe":
            raise _bad(f"grid.prune: {grid.prune} prunes inside the batches of grid.strategy: tpe; for a grid use "
                       f"grid.strategy: halving, or set grid.prune: none")
        if grid.strategy == "tpe":
            self._check_tpe()
            return
        if grid.strategy == "halving":
            shortest = min(_candidates(self.epochs))
            if grid.min_epochs > shortest:
                raise _bad(f"grid.min_epochs={grid.min_epochs} is more than epochs={shortest}: halving's first rung "
                           "cannot be longer than a whole run; lower grid.min_epochs or raise epochs")
        ranges = self.ranges
        if ranges and grid.samples > grid.max_runs:
            raise _bad(f"grid.samples={grid.samples} is more than grid.max_runs={grid.max_runs}; "
                       "lower grid.samples or raise grid.max_runs")
        size = self.grid_size
        if size > grid.max_runs:
            fix = "shorten a list, lower grid.samples" if ranges else "shorten a list"
            raise _bad(f"the grid {self.describe_grid()} has {size} runs, more than grid.max_runs={grid.max_runs}; "
                       f"{fix} or raise grid.max_runs")
        if grid.strategy == "halving" and size < 2:
            raise _bad("grid.strategy halving needs at least 2 points to compare, the grid has 1; "
                       "give a key a list or a range (e.g. lr: [0.01, 0.001]) or use grid.strategy: exhaustive")

    def _check_objectives(self) -> None:
        """A cost in ``select_by`` needs a search that ranks by both (no rungs), and ``max_cost`` needs a cost."""
        metric, cost = objectives(self.select_by)
        if cost is None:
            if self.max_cost is not None:
                raise _bad(f"max_cost={self.max_cost:g} is a budget for a cost, but select_by names none; "
                           f"set select_by: [{metric}, macs] (or params), or max_cost: null")
            return
        if self.grid.strategy == "halving" or self.grid.prune == "halving":
            where = "grid.strategy: halving" if self.grid.strategy == "halving" else "grid.prune: halving"
            raise _bad(f"select_by [{metric}, {cost}] has two objectives, but {where} ranks trials by one metric; "
                       "use grid.strategy: tpe (or exhaustive) with grid.prune: none")

    def _check_tpe(self) -> None:
        """A tpe search needs something to search, a budget within ``max_runs``, and batches halving can rank."""
        grid = self.grid
        if not self.axes:
            raise _bad("grid.strategy tpe has nothing to search: no key is a list of 2+ values or a range; give one "
                       "(e.g. lr: {log_uniform: [1.0e-4, 1.0e-1]}) or use grid.strategy: exhaustive")
        if grid.samples > grid.max_runs:
            raise _bad(f"grid.samples={grid.samples} (tpe's trial budget) is more than grid.max_runs={grid.max_runs}; "
                       "lower grid.samples or raise grid.max_runs")
        if grid.prune == "halving":
            if grid.batch < 2:
                raise _bad("grid.prune: halving ranks the trials of a batch against each other, but grid.batch is 1; "
                           "raise grid.batch (e.g. 4) or set grid.prune: none")
            shortest = min(_candidates(self.epochs))
            if grid.min_epochs > shortest:
                raise _bad(f"grid.min_epochs={grid.min_epochs} is more than epochs={shortest}: halving's first rung "
                           "cannot be longer than a whole run; lower grid.min_epochs or raise epochs")


# ----------------------------------------------------------------- the fields, each declared once

# Training keys whose shipped default is not ``TrainingValues``' first grid point.
AXIS_DEFAULTS: dict[str, Any] = {"lr": [0.01, 0.001], "batch_size": [100, 1000], "monitor": "auto"}
# Training keys that take more in params.yaml than in one run: monitor's ``auto`` becomes select_by.
AXIS_TYPES: dict[str, Any] = {"monitor": MonitorSetting}


def _value_type(info: Any) -> Any:
    """A ``TrainingValues`` field's type with its constraints (pydantic keeps them apart, in ``metadata``)."""
    return Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation


def _axis_fields() -> dict[str, Any]:
    """Each training key as an ``Axis`` of its ``TrainingValues`` type, in ``TrainingValues``' order."""
    return {name: (Axis[AXIS_TYPES.get(name) or _value_type(info)], AXIS_DEFAULTS.get(name, info.default))
            for name, info in TrainingValues.model_fields.items()}


Params = create_model(
    "Params",
    __base__=_ParamsRules,
    __module__=__name__,
    __doc__="A validated ``params.yaml``. Every default is the shipped file's value.",
    **_axis_fields(),
    **PLAIN_FIELDS,
    models=(dict[str, tuple[Any, ...]], Field(default_factory=dict)),
    data=(DataParams, Field(default_factory=DataParams)),
    eval=(EvalParams, Field(default_factory=EvalParams)),
    mlflow=(MlflowParams, Field(default_factory=MlflowParams)),
    grid=(GridParams, Field(default_factory=GridParams)),
    pretrained=(PretrainedParams, Field(default_factory=PretrainedParams)),
)
