"""The params schema: pydantic owns every key of ``params.yaml``.

Top-level *training keys* (``lr``, ``batch_size``, ...) are search axes: one
value, a list of values (every one is tried: the grid is the Cartesian
product of the lists), or a range that ``grid.samples`` points are drawn from
(``{log_uniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{int_uniform: [lo,
hi]}``, ``{choice: [...]}``; drawn by :mod:`cnnpipe.search.space`). Everything
else lives in sections (``data``, ``eval``, ``mlflow``, ``grid``) or names
architectures (``models``). Every default equals the shipped ``params.yaml``
(a test walks every field), so deleting a key never changes the recipe.

Every problem becomes one ``ParamsError`` line: :func:`error_line` turns a
pydantic error into ``key must be ..., got ...`` from its ``loc`` and ``msg``
(and the offending ``input``) only. Only pydantic, yaml and the dataset/model
tables are imported here (no numpy, torch or mlflow) so ``cnnpipe validate``
answers in well under a second.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cnnpipe.data.registry import DATASETS, REGISTRY_SOURCE, DatasetSpec, folder_spec, get_dataset, is_archive_name
from cnnpipe.util.errors import ParamsError


def _bad(message: str) -> PydanticCustomError:
    """A validation error whose ``msg`` is ``message`` verbatim.

    :func:`error_line` puts the key before it (``lr`` + ``" is an empty list"``);
    a message starting with ``.``, ``[`` or ``:`` continues the key instead
    (``models`` + ``".tiny clashes ..."``), and one raised by a whole-file check
    (no key) must name its keys itself.
    """
    return PydanticCustomError("cnnpipe", message)


def _shown(value: Any) -> str:
    """A value as the user wrote it in YAML-ish JSON (strings quoted, booleans lowercase)."""
    if isinstance(value, (str, list, tuple, dict)):
        try:
            return json.dumps(value)
        except TypeError:
            return repr(value)
    return _fmt(value)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _no_bool(value: Any) -> Any:
    """YAML ``true`` is not a number (pydantic's lax float would take it as 1.0)."""
    if isinstance(value, bool):
        raise _bad("must be a number, got " + _fmt(value))
    return value


# ----------------------------------------------------------------- value types

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False), BeforeValidator(_no_bool)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False), BeforeValidator(_no_bool)]
UnitFloat = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False), BeforeValidator(_no_bool)]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
ModelName = Annotated[str, Field(min_length=1)]

Metric = Literal["val_loss", "val_top1"]
MonitorSetting = Literal["auto", "val_loss", "val_top1"]  # auto: the same metric as select_by
Optimizer = Literal["adam", "adamw", "sgd"]
Schedule = Literal["none", "cosine", "onecycle"]
Augment = Literal["auto", "none", "crop", "flip", "crop_flip"]
Device = Literal["auto", "cpu", "cuda"]
Finetune = Literal["full", "head", "gradual"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingValues(_Strict):
    """One value per training key: what a single run is trained with.

    Field order is the order grid names and tables use. The defaults are the
    first point of the shipped ``params.yaml`` grid (a test checks it).
    ``monitor`` is resolved here (``auto`` became ``select_by``); ``augment``
    may still say ``auto`` (the engine resolves it per dataset).
    """

    model: ModelName = "small_bn"
    lr: PositiveFloat = 0.01
    batch_size: PositiveInt = 100
    shuffle: StrictBool = True
    epochs: PositiveInt = 10
    patience: NonNegInt = 3
    min_delta: NonNegFloat = 0.0
    monitor: Metric = "val_loss"
    optimizer: Optimizer = "adam"
    momentum: UnitFloat = 0.9
    nesterov: StrictBool = False
    weight_decay: NonNegFloat = 0.0
    schedule: Schedule = "none"
    label_smoothing: UnitFloat = 0.0
    augment: Augment = "none"
    seed: NonNegInt = 42
    ema: UnitFloat = 0.0  # weight moving-average decay; 0 = off (cnnpipe.engine.ema)
    # Fine-tuning a torchvision model (cnnpipe.engine.finetune); inert for cnnpipe layer lists.
    finetune: Finetune = "full"  # full | head (linear probe on a frozen body) | gradual (head, then all)
    freeze_epochs: NonNegInt = 1  # gradual: epochs that train the head only
    body_lr_mult: PositiveFloat = 0.1  # gradual: the body's learning rate = lr * this, once unfrozen
    bn_frozen: StrictBool = True  # a frozen body's BatchNorm layers stay in eval mode (statistics kept)


TRAINING_KEYS: tuple[str, ...] = tuple(TrainingValues.model_fields)


# ----------------------------------------------------------------- axes: a value, a list, or a range

T = TypeVar("T")
RANGE_KINDS = ("log_uniform", "uniform", "int_uniform", "choice")
_FORMS = {
    "log_uniform": "{log_uniform: [lo, hi]}",
    "uniform": "{uniform: [lo, hi]}",
    "int_uniform": "{int_uniform: [lo, hi]}",
    "choice": "{choice: [v1, v2, ...]}",
}


def _check_pair(raw: Any, kind: str, *, positive: bool = False) -> Any:
    """A ``{kind: [lo, hi]}`` mapping holds two finite numbers, lo < hi (and lo > 0 on a log scale)."""
    pair = raw.get(kind) if isinstance(raw, dict) else None
    numbers = isinstance(pair, list) and len(pair) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
    if not numbers:
        raise _bad(f"{{{kind}: ...}} must hold two finite numbers [lo, hi], got {_shown(pair)}")
    lo, hi = pair
    if lo >= hi:
        raise _bad(f"{{{kind}: [{lo}, {hi}]}} needs lo < hi; swap them, or give one value instead of a range")
    if positive and lo <= 0:
        raise _bad(f"{{{kind}: [{lo}, {hi}]}} needs lo > 0 (a log scale never reaches 0); "
                   "raise lo, or use uniform to include 0")
    return raw


class _Interval(_Strict):
    """A ``{kind: [lo, hi]}`` range; the field is named after its kind so the YAML reads naturally."""

    kind: ClassVar[str]
    positive: ClassVar[bool] = False  # lo must be > 0 (a log scale)

    @model_validator(mode="before")
    @classmethod
    def _pair(cls, raw: Any) -> Any:
        return _check_pair(raw, cls.kind, positive=cls.positive)

    @property
    def bounds(self) -> tuple[Any, Any]:
        return getattr(self, self.kind)

    def __str__(self) -> str:
        lo, hi = self.bounds
        return f"{self.kind}[{_fmt(lo)}, {_fmt(hi)}]"


class LogUniform(_Interval, Generic[T]):
    """Draw ``exp(uniform(log lo, log hi))``: for scale-like keys (``lr``, ``weight_decay``)."""

    kind: ClassVar[str] = "log_uniform"
    positive: ClassVar[bool] = True
    log_uniform: tuple[T, T]


class Uniform(_Interval, Generic[T]):
    """Draw uniformly from [lo, hi]."""

    kind: ClassVar[str] = "uniform"
    uniform: tuple[T, T]


class IntUniform(_Interval, Generic[T]):
    """Draw a whole number from lo..hi, both included."""

    kind: ClassVar[str] = "int_uniform"
    int_uniform: tuple[T, T]


def _distinct(values: list[Any]) -> list[Any]:
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise _bad("lists a value twice; each value must be distinct")
    return values


def _non_empty_list(what: str):
    def check(raw: Any) -> Any:
        if isinstance(raw, list) and not raw:
            raise _bad(what)
        return raw

    return check


class Choice(_Strict, Generic[T]):
    """Draw one of the listed values (any key: ``model``, ``optimizer``, ``batch_size``, ...)."""

    kind: ClassVar[str] = "choice"
    choice: Annotated[list[T], BeforeValidator(_non_empty_list("is an empty list; give at least one value")),
                      AfterValidator(_distinct)]

    def __str__(self) -> str:
        return f"choice[{', '.join(map(_fmt, self.choice))}]"


Range = Union[LogUniform[Any], Uniform[Any], IntUniform[Any], Choice[Any]]
_RANGE_MODELS = {"log_uniform": LogUniform, "uniform": Uniform, "int_uniform": IntUniform, "choice": Choice}


def _plain_range(value: BaseModel) -> BaseModel:
    """The validated range as the plain class (``LogUniform``, not ``LogUniform[PositiveFloat]``): picklable."""
    return _RANGE_MODELS[value.kind].model_construct(**dict(value))  # type: ignore[attr-defined]


def _range_kind(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        key = next(iter(value))
        return key if key in RANGE_KINDS else None
    return None


def _axis_form(kinds: tuple[str, ...]):
    """The discriminator of an axis taking ``kinds``: a value, a list, one of those range kinds, or ``bad``."""

    def form(value: Any) -> str:
        if isinstance(value, list):
            return "list"
        if isinstance(value, dict):
            kind = _range_kind(value)
            return kind if kind in kinds else "bad"
        if isinstance(value, BaseModel):  # an already-validated range
            return getattr(value, "kind", "bad")
        return "value"

    return form


def _numeric_base(element: Any) -> type | None:
    while get_origin(element) is Annotated:
        element = get_args(element)[0]
    return element if element in (int, float) else None


class Axis:
    """``Axis[T]``: a training key's type: a ``T``, a non-empty list of distinct ``T``, or a range of ``T``.

    Which ranges a key takes follows from ``T``: floats take log_uniform and
    uniform, whole numbers int_uniform, every key choice. Anything else is
    refused in one line that names the forms the key does take. Pydantic
    errors carry the branch (``value``, ``list``, the range kind) as the second
    ``loc`` element; :func:`error_line` drops it.
    """

    def __class_getitem__(cls, element: Any) -> Any:
        base = _numeric_base(element)
        kinds = ("log_uniform", "uniform", "choice") if base is float else \
            ("int_uniform", "choice") if base is int else ("choice",)
        forms = [_FORMS[k] for k in kinds]
        allowed = " or ".join([", ".join(forms[:-1]), forms[-1]] if len(forms) > 1 else forms)

        def refuse(value: Any) -> Any:
            kind = _range_kind(value)
            if kind is not None:
                raise _bad(f"cannot be drawn from {kind}: use {allowed}, got {_shown(value)}")
            raise _bad(f"must be a value, a list of values or a range ({allowed}), got {_shown(value)}")

        branches: list[Any] = [
            Annotated[element, Tag("value")],
            Annotated[list[element],  # type: ignore[valid-type]
                      BeforeValidator(_non_empty_list("is an empty list; give at least one value (a list is a grid axis)")),
                      AfterValidator(_distinct), Tag("list")],
            Annotated[Any, PlainValidator(refuse), Tag("bad")],
        ]
        branches += [Annotated[_RANGE_MODELS[kind][element], AfterValidator(_plain_range), Tag(kind)]  # type: ignore[index]
                     for kind in kinds]
        return Annotated[Union[tuple(branches)], Discriminator(_axis_form(kinds))]


def _is_range(setting: Any) -> bool:
    return isinstance(setting, (LogUniform, Uniform, IntUniform, Choice))


def _candidates(setting: Any) -> list[Any]:
    """Every value an axis names outright: its value, its list, a choice's options, or a range's bounds."""
    if isinstance(setting, list):
        return list(setting)
    if isinstance(setting, Choice):
        return list(setting.choice)
    if _is_range(setting):
        return list(setting.bounds)
    return [setting]


# ----------------------------------------------------------------- sections


def _workers(value: Any) -> Any:
    if value == "auto" or (type(value) is int and value > 0):
        return value
    raise _bad(f"must be 'auto' or an integer > 0, got {_shown(value)}")


_MIRROR_SCHEMES = ("http://", "https://", "file://")


def _mirror(value: str) -> str:
    if "://" in value and not value.startswith(_MIRROR_SCHEMES):
        scheme = value.split("://", 1)[0]
        raise _bad(f"uses unsupported scheme {scheme!r} in {json.dumps(value)}; use http://, https://, file:// or a folder path")
    return value


def _sha256(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise _bad(f"must be a 64-character lowercase hex SHA-256, got {json.dumps(value)}")
    return value


class DownloadParams(_Strict):
    timeout: PositiveFloat = 30.0
    retries: NonNegInt = 3


class DataParams(_Strict):
    dataset: str = "fashion-mnist"
    val_fraction: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False), BeforeValidator(_no_bool)] = 0.1
    split_seed: NonNegInt = 0
    mirrors: list[Annotated[str, AfterValidator(_mirror)]] = Field(default_factory=list)
    checksums: dict[str, Annotated[str, AfterValidator(_sha256)]] = Field(default_factory=dict)
    download: DownloadParams = Field(default_factory=DownloadParams)
    # Your own images (dataset: folder); the benchmark datasets ignore these. See cnnpipe.data.folder.
    source: str = REGISTRY_SOURCE  # a class-per-folder tree, a .zip/.tar.gz of one, or an http(s) URL of that
    image_size: list[PositiveInt] = Field(default_factory=lambda: [64, 64])  # [height, width]
    channels: Literal[1, 3] = 3
    test_fraction: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False), BeforeValidator(_no_bool)] = 0.2
    sha256: Annotated[str, AfterValidator(_sha256)] | None = None  # pins an archive source
    strict: StrictBool = False  # refuse (instead of skip) unreadable or non-image files
    max_pixels: PositiveInt = 50_000_000  # refuse any image larger than this (decompression bombs)
    dedupe: StrictBool = True  # drop val/test images whose exact bytes are also in an earlier split

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in DATASETS:
            raise _bad(f"must be one of {list(DATASETS)}, got {json.dumps(name)}{suggest(name, DATASETS)}")
        return name

    @model_validator(mode="after")
    def _folder_source(self) -> "DataParams":
        """``dataset: folder`` needs a source of its own and a sane image size."""
        if not get_dataset(self.dataset).is_folder:
            return self
        source = self.source
        if source == REGISTRY_SOURCE:
            raise _bad(".dataset is folder but data.source still names the benchmark registry; set data.source "
                       "to your class-per-folder images (a folder, a .zip/.tar.gz, or an http(s) URL of one)")
        if "://" in source and not source.startswith(("http://", "https://")):
            raise _bad(f".source uses unsupported scheme {source.split('://', 1)[0]!r}; use a folder path, "
                       "an archive path or an http(s) URL")
        if len(self.image_size) != 2 or max(self.image_size) > 8192:
            raise _bad(f".image_size must be [height, width], each 1..8192, got {json.dumps(self.image_size)}")
        remote = source.startswith(("http://", "https://"))
        if self.sha256 and not (remote or is_archive_name(source)):
            raise _bad(".sha256 pins an archive, but data.source is a folder (DVC tracks a folder's content); "
                       "remove data.sha256 or point data.source at a .zip/.tar.gz")
        if remote and not is_archive_name(source):
            raise _bad(f".source {json.dumps(source)} must name a .zip, .tar, .tar.gz or .tgz archive")
        return self

    def spec(self) -> DatasetSpec:
        """The registry entry for ``dataset``; for ``folder``, at ``channels`` x ``image_size``."""
        spec = get_dataset(self.dataset)
        return folder_spec(self.image_size, self.channels) if spec.is_folder else spec


class EvalParams(_Strict):
    top_k: list[PositiveInt] = Field(default_factory=lambda: [1, 5], min_length=1)
    batch_size: PositiveInt = 1000
    mistakes: NonNegInt = 25
    tta: Literal["auto", "none", "flip"] = "auto"  # test-time augmentation (see cnnpipe.evaluation.score)


class MlflowParams(_Strict):
    enabled: StrictBool = True
    tracking_uri: str | None = None
    experiment: Annotated[str, Field(min_length=1)] = "cnnpipe"
    registered_model: str | None = "cnnpipe-classifier"
    log_layer_stats: StrictBool = True


class GridParams(_Strict):
    """How the search runs: where (workers, backend), how much (max_runs, samples) and which strategy."""

    workers: Annotated[Union[Literal["auto"], int], PlainValidator(_workers)] = "auto"
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    max_runs: PositiveInt = 64
    cache: StrictBool = True
    strategy: Literal["exhaustive", "halving"] = "exhaustive"  # exhaustive | halving (successive halving)
    eta: Annotated[StrictInt, Field(ge=2)] = 3  # halving: keep the best 1/eta of the trials at each rung
    min_epochs: PositiveInt = 1  # halving: epochs of the first rung; rungs at min_epochs*eta**k, capped by epochs
    samples: PositiveInt = 8  # points drawn when a training key is a range (<= max_runs)
    search_seed: NonNegInt = 0  # seeds the draws: same params -> same points
    spread_threads: StrictBool = False  # give idle workers' cores to a rung's fewer trials (not bitwise then)

    def rungs(self, epochs: int) -> tuple[int, ...]:
        """Halving's rungs for a run of ``epochs``: min_epochs * eta**k while below ``epochs``, then ``epochs``."""
        out: list[int] = []
        rung = self.min_epochs
        while rung < epochs:
            out.append(rung)
            rung *= self.eta
        return (*out, epochs)


class PretrainedParams(_Strict):
    """Where a torchvision model's starting weights come from (cnnpipe.models.pretrained_weights)."""

    weights: Annotated[str, Field(min_length=1)] = "IMAGENET1K_V1"  # a torchvision weights name, none, a path/URL, a checkpoint
    sha256: Annotated[str, AfterValidator(_sha256)] | None = None  # required for a file or URL; checked for all

    @model_validator(mode="after")
    def _pinned(self) -> "PretrainedParams":
        from cnnpipe.models.torchvision_spec import source_kind

        kind = source_kind(self.weights)
        if "://" in self.weights and kind not in ("url", "registry"):
            raise _bad(f".weights uses unsupported scheme {self.weights.split('://', 1)[0]!r}; use http(s)://, "
                       "models:/NAME@ALIAS, a file or checkpoint folder, a torchvision weights name or none")
        if kind in ("url", "file") and self.sha256 is None:
            raise _bad(f".weights {json.dumps(self.weights)} is a file or URL: pin it with pretrained.sha256 "
                       "(sha256sum FILE) so the run cannot silently start from other weights")
        return self


# ----------------------------------------------------------------- the file


def _section_or_empty(raw: dict[str, Any]) -> dict[str, Any]:
    """``data:`` with nothing under it is YAML null: treat an empty section as all defaults."""
    return {key: ({} if value is None and key in _MAPPINGS else value) for key, value in raw.items()}


_MAPPINGS = ("data", "eval", "mlflow", "grid", "models", "pretrained")


class Params(_Strict):
    """A validated ``params.yaml``. Every default is the shipped file's value."""

    # Training keys: search axes (a value, a list, or a range); the order of TrainingValues.
    model: Axis[ModelName] = "small_bn"
    lr: Axis[PositiveFloat] = [0.01, 0.001]
    batch_size: Axis[PositiveInt] = [100, 1000]
    shuffle: Axis[StrictBool] = True
    epochs: Axis[PositiveInt] = 10
    patience: Axis[NonNegInt] = 3
    min_delta: Axis[NonNegFloat] = 0.0
    monitor: Axis[MonitorSetting] = "auto"
    optimizer: Axis[Optimizer] = "adam"
    momentum: Axis[UnitFloat] = 0.9
    nesterov: Axis[StrictBool] = False
    weight_decay: Axis[NonNegFloat] = 0.0
    schedule: Axis[Schedule] = "none"
    label_smoothing: Axis[UnitFloat] = 0.0
    augment: Axis[Augment] = "none"
    seed: Axis[NonNegInt] = 42
    ema: Axis[UnitFloat] = 0.0
    finetune: Axis[Finetune] = "full"
    freeze_epochs: Axis[NonNegInt] = 1
    body_lr_mult: Axis[PositiveFloat] = 0.1
    bn_frozen: Axis[StrictBool] = True
    # Not axes.
    select_by: Metric = "val_loss"
    device: Device = "auto"
    models: dict[str, tuple[Any, ...]] = Field(default_factory=dict)
    data: DataParams = Field(default_factory=DataParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)
    grid: GridParams = Field(default_factory=GridParams)
    pretrained: PretrainedParams = Field(default_factory=PretrainedParams)

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
        """Points in the search: the product of the list lengths, times ``grid.samples`` when a key is a range."""
        size = math.prod(len(values) for values in self.training.values())
        return size * (self.grid.samples if self.ranges else 1)

    def describe_grid(self) -> str:
        """``lr(2) x batch_size(2)``, ``model(2) x 8 samples of lr~log_uniform[0.0001, 0.1]``, or ``no grid axes``."""
        ranges = self.ranges
        parts = [f"{key}({len(values)})" for key, values in self.training.items() if len(values) > 1]
        if ranges:
            drawn = ", ".join(f"{key}~{spec}" for key, spec in ranges.items())
            parts.append(f"{self.grid.samples} samples of {drawn}")
        return " x ".join(parts) or "no grid axes"

    def layers_for(self, model_name: str) -> tuple[Any, ...]:
        """The layer spec of a model name; a ``torchvision:`` name gives its (unpinned) mapping."""
        if model_name in self.models:
            return self.models[model_name]
        from cnnpipe.models import torchvision_spec

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

    @field_validator("models", mode="before")
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
    def _consistent(self) -> "Params":
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

        from cnnpipe.models import torchvision_spec
        from cnnpipe.models.presets import PRESETS
        from cnnpipe.models.spec import check_layers

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
        from cnnpipe.models import torchvision_spec as tvs

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


# ----------------------------------------------------------------- errors: pydantic's loc + msg -> one line


def suggest(word: str, choices: Iterable[str]) -> str:
    """``, did you mean lr?`` when a close match exists, else ``''``."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f", did you mean {match[0]}?" if match else ""


# pydantic's own messages (stable across 2.x), rewritten to this project's phrasing.
_PHRASES: tuple[tuple[str, str], ...] = (
    (r"Input should be greater than or equal to (.+)", r"must be >= \1"),
    (r"Input should be greater than (.+)", r"must be > \1"),
    (r"Input should be less than or equal to (.+)", r"must be <= \1"),
    (r"Input should be less than (.+)", r"must be < \1"),
    (r"Input should be a finite number.*", "must be a finite number"),
    (r"Input should be a valid number.*", "must be a number"),
    (r"Input should be a valid integer.*", "must be an integer"),
    (r"Input should be a valid boolean.*", "must be true or false"),
    (r"Input should be a valid string.*", "must be a string"),
    (r"Input should be a valid (list|tuple|array).*", "must be a list"),
    (r"Input should be a valid dictionary.*", "must be a mapping"),
    (r"Input should be ('.*)", r"must be one of \1"),  # a Literal: 'adam', 'adamw' or 'sgd'
    (r"Input should be (.*)", r"must be \1"),
    (r"Field required", "is required"),
    (r"(List|String|Dictionary) should have at least 1 .*", "must not be empty"),
    (r"(List|Tuple) should have at (least|most) (\d+) items?.*", r"must have \2 \3 items"),
)


def _phrase(msg: str) -> tuple[str, bool]:
    """(our wording, whether it still needs ``, got <input>``)."""
    for pattern, replacement in _PHRASES:
        match = re.fullmatch(pattern, msg, flags=re.DOTALL)
        if match:
            return match.expand(replacement), True
    return msg, False  # one of ours (_bad): already complete


def _path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (sub)section at ``loc``, for "did you mean" suggestions."""
    current: Any = Params
    for part in loc:
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    return list(current.model_fields)


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    if len(loc) > 1 and loc[0] in TRAINING_KEYS:
        loc = (loc[0], *loc[2:])  # drop the axis branch (value / list / the range kind)
    msg = error["msg"]
    if msg == "Extra inputs are not permitted":
        parent = _path(loc[:-1])
        where = f" in {parent}" if parent else ""
        return f"unknown key {loc[-1]!r}{where}{suggest(loc[-1], _keys_at(loc[:-1]))}"
    text, needs_input = _phrase(msg)
    if needs_input and "input" in error:
        text += f", got {_shown(error['input'])}"
    key = _path(loc)
    if not key:
        return text
    return f"{key}{text}" if text.startswith((".", "[", ":")) else f"{key} {text}"  # ours may continue the key


def error_line(exc: ValidationError) -> str:
    """The one line a user sees for ``exc``: its first error (an unknown key first: a typo explains the rest)."""
    errors = exc.errors(include_url=False)
    extra = [e for e in errors if e["msg"] == "Extra inputs are not permitted"]
    return _describe((extra or errors)[0])


# ----------------------------------------------------------------- loading


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse ``path`` with ``safe_load`` (``None`` for an empty file); syntax errors name the line."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError("file not found; run from the project root or pass --params", source=str(path)) from None
    except UnicodeDecodeError:
        raise ParamsError("not UTF-8 text", source=str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ParamsError(f"YAML syntax error at {where}{err.problem}; fix the YAML", source=str(path)) from None
    except yaml.YAMLError as err:
        raise ParamsError(f"YAML error: {err}", source=str(path)) from None


def load_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise ``ParamsError`` on the first problem."""
    return parse_params(read_yaml(path), source=str(path))


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate already-parsed YAML; ``None`` is an empty file and is refused."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(error_line(exc), source=source) from None


# ----------------------------------------------------------------- one run


def resolve_augment(augment: str, dataset: str) -> str:
    """``auto`` means crop+flip for photos and clothes, nothing for handwriting."""
    if augment != "auto":
        return augment
    return "none" if get_dataset(dataset).digits else "crop_flip"


class RunConfig(_Strict):
    """One search point: scalar training values plus the resolved architecture."""

    values: TrainingValues
    layers: tuple[Any, ...]  # the resolved layer spec of ``values.model`` (plain YAML data)
    axes: tuple[str, ...] = ()  # training keys that vary across the search
    dataset: str = "fashion-mnist"
    # Where pinned pretrained weights are read from (the weights stage's output); not part of any key:
    # the layer spec pins the weights by SHA-256, and the engine checks the file against it.
    weights_dir: str | None = None

    @property
    def run_id(self) -> str:
        """Short stable id: hash of everything that changes what is trained."""
        from cnnpipe.util.hashing import digest

        return digest({"values": self.values.model_dump(mode="json"), "layers": list(self.layers),
                       "dataset": self.dataset}, length=10)

    @property
    def name(self) -> str:
        """Readable name from the search axes, e.g. ``lr=0.01,batch_size=100``."""
        keys = self.axes or ("model",)
        return ",".join(f"{key}={_fmt(getattr(self.values, key))}" for key in keys)

    def flat(self) -> dict[str, Any]:
        """Training values as a flat dict (for tables and MLflow params)."""
        return self.values.model_dump(mode="json")
