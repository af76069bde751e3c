"""The params schema: ``params.yaml`` is validated here before any work starts.

Top-level *training keys* (``lr``, ``batch_size``, ...) may each be a scalar
or a list; a list is a grid axis and the grid is the Cartesian product of the
axes. Everything else lives in sections (``data``, ``eval``, ``mlflow``,
``grid``) or names architectures (``models``). Every problem becomes one
``ParamsError`` line naming the key, the bad value and what is allowed.

Only pydantic, yaml and the dataset/model tables are imported here (no
torch, no mlflow) so ``cnnpipe validate`` answers in well under a second.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, TypeAdapter, ValidationError

from cnnpipe.data.registry import DATASETS, REGISTRY_SOURCE, DatasetSpec, folder_spec, get_dataset, is_archive_name
from cnnpipe.errors import ParamsError

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]

Augment = Literal["auto", "none", "crop", "flip", "crop_flip"]
Monitor = Literal["val_loss", "val_top1"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingValues(_Strict):
    """One value per training key: what a single run is trained with.

    Field order is the order grid names and tables use. Each field is also
    the element type of a grid axis of the same name.
    """

    model: str = "fashion_tutorial"
    lr: PositiveFloat = 0.001
    batch_size: PositiveInt = 100
    shuffle: StrictBool = True
    epochs: PositiveInt = 10
    patience: NonNegInt = 3
    min_delta: NonNegFloat = 0.0
    monitor: Monitor = "val_loss"
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: StrictBool = False
    weight_decay: NonNegFloat = 0.0
    schedule: Literal["none", "cosine", "onecycle"] = "none"
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    augment: Augment = "auto"
    seed: NonNegInt = 42


TRAINING_KEYS: tuple[str, ...] = tuple(TrainingValues.model_fields)


class DownloadParams(_Strict):
    timeout: PositiveFloat = 30.0
    retries: NonNegInt = 3


class DataParams(_Strict):
    dataset: str = "fashion-mnist"
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    split_seed: NonNegInt = 0
    mirrors: list[str] = Field(default_factory=list)
    checksums: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(default_factory=dict)
    download: DownloadParams = Field(default_factory=DownloadParams)
    # Your own images (dataset: folder); the benchmark datasets ignore these. See cnnpipe.data.folder.
    source: str = REGISTRY_SOURCE  # a class-per-folder tree, a .zip/.tar.gz of one, or an http(s) URL of that
    image_size: list[PositiveInt] = Field(default_factory=lambda: [64, 64])  # [height, width]
    channels: Literal[1, 3] = 3
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None  # pins an archive source
    strict: StrictBool = False  # refuse (instead of skip) unreadable or non-image files
    max_pixels: PositiveInt = 50_000_000  # refuse any image larger than this (decompression bombs)
    dedupe: StrictBool = True  # drop val/test images whose exact bytes are also in an earlier split

    def spec(self) -> DatasetSpec:
        """The registry entry for ``dataset``; for ``folder``, at ``channels`` x ``image_size``."""
        spec = get_dataset(self.dataset)
        return folder_spec(self.image_size, self.channels) if spec.is_folder else spec


class EvalParams(_Strict):
    top_k: list[PositiveInt] = Field(default_factory=lambda: [1, 5], min_length=1)
    batch_size: PositiveInt = 1000
    mistakes: NonNegInt = 25


class MlflowParams(_Strict):
    enabled: StrictBool = True
    tracking_uri: str | None = None
    experiment: Annotated[str, Field(min_length=1)] = "cnnpipe"
    registered_model: str | None = "cnnpipe-classifier"
    log_layer_stats: StrictBool = True


class GridParams(_Strict):
    workers: Union[Literal["auto"], PositiveInt] = "auto"
    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    max_runs: PositiveInt = 64
    cache: StrictBool = True


SECTION_MODELS: dict[str, type[_Strict]] = {
    "data": DataParams,
    "eval": EvalParams,
    "mlflow": MlflowParams,
    "grid": GridParams,
}
OTHER_KEYS = ("select_by", "device", "models")
KNOWN_KEYS: tuple[str, ...] = TRAINING_KEYS + tuple(SECTION_MODELS) + OTHER_KEYS


class RunConfig(_Strict):
    """One grid point: scalar training values plus the resolved architecture."""

    values: TrainingValues
    layers: tuple[Any, ...]  # the resolved layer spec of ``values.model`` (plain YAML data)
    axes: tuple[str, ...] = ()  # training keys that vary across the grid
    dataset: str = "fashion-mnist"

    @property
    def run_id(self) -> str:
        """Short stable id: hash of everything that changes what is trained."""
        payload = {"values": self.values.model_dump(mode="json"), "layers": list(self.layers), "dataset": self.dataset}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    @property
    def name(self) -> str:
        """Readable name from the grid axes, e.g. ``lr=0.01,batch_size=100``."""
        keys = self.axes or ("model",)
        return ",".join(f"{key}={_fmt(getattr(self.values, key))}" for key in keys)

    def flat(self) -> dict[str, Any]:
        """Training values as a flat dict (for tables and MLflow params)."""
        return self.values.model_dump(mode="json")


class Params(_Strict):
    """A validated ``params.yaml``."""

    training: dict[str, tuple[Any, ...]]  # every training key -> its values (len 1 unless an axis)
    axes: tuple[str, ...]
    select_by: Monitor = "val_loss"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    models: dict[str, tuple[Any, ...]] = Field(default_factory=dict)
    data: DataParams = Field(default_factory=DataParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)
    grid: GridParams = Field(default_factory=GridParams)

    @property
    def grid_size(self) -> int:
        size = 1
        for values in self.training.values():
            size *= len(values)
        return size

    def layers_for(self, model_name: str) -> tuple[Any, ...]:
        if model_name in self.models:
            return self.models[model_name]
        from cnnpipe.models.presets import PRESETS

        return tuple(PRESETS[model_name])


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# --------------------------------------------------------------------------- errors


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean lr?)`` when a close match exists, else ``''``."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f", did you mean {match[0]}?" if match else ""


def _loc(prefix: str, loc: Iterable[Any]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "constrained-str", "literal['auto']", "int", "lax-or-strict", "strict-int"):
            continue
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


_KIND = {
    "float": "a number",
    "int": "an integer",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
}


def _translate(error: Mapping[str, Any], key: str, known: Iterable[str] = ()) -> str:
    """One pydantic error -> ``key must be ..., got ...``."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = error.get("input")
    shown = json.dumps(got) if isinstance(got, (str, list, dict)) else _fmt(got)
    if kind == "extra_forbidden":
        parent, _, leaf = key.rpartition(".")
        where = f" in {parent}" if parent else ""
        return f"unknown key {leaf!r}{where}{suggest(leaf, known)}"
    if key.startswith("grid.workers"):
        return f"grid.workers must be 'auto' or an integer > 0, got {shown}"
    if kind == "missing":
        return f"{key} is required"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        ops = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
        bound = next(iter(ctx.values()))
        return f"{key} must be {ops[kind]} {bound}, got {shown}"
    if kind == "literal_error":
        return f"{key} must be one of {ctx.get('expected')}, got {shown}"
    if kind == "string_pattern_mismatch":
        return f"{key} must be a 64-character lowercase hex SHA-256, got {shown}"
    if kind in ("too_short", "too_long"):
        return f"{key} must not be empty" if kind == "too_short" else f"{key} is too long"
    for prefix, words in _KIND.items():
        if kind.startswith(prefix):
            return f"{key} must be {words}, got {shown}"
    if kind.startswith("int_from_float"):
        return f"{key} must be an integer, got {shown}"
    return f"{key}: {error.get('msg', 'invalid')}, got {shown}"


def _raise_from(exc: ValidationError, prefix: str, known: Iterable[str]) -> None:
    errors = exc.errors(include_url=False)
    # A union (e.g. grid.workers) reports one error per branch: the last is the most specific.
    error = errors[-1] if len(errors) > 1 and all(len(e["loc"]) and e["loc"][0] == errors[0]["loc"][0] for e in errors) else errors[0]
    raise ParamsError(_translate(error, _loc(prefix, error["loc"]), known)) from None


_FIELD_ADAPTERS: dict[str, TypeAdapter[Any]] = {}


def _adapter(key: str) -> TypeAdapter[Any]:
    if key not in _FIELD_ADAPTERS:
        info = TrainingValues.model_fields[key]
        annotation: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        _FIELD_ADAPTERS[key] = TypeAdapter(annotation)
    return _FIELD_ADAPTERS[key]


# --------------------------------------------------------------------------- loading


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse ``path`` with ``safe_load``; syntax errors name the line."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"file not found; run from the project root or pass --params", source=str(path)) from None
    except UnicodeDecodeError:
        raise ParamsError("not UTF-8 text", source=str(path)) from None
    try:
        return yaml.safe_load(text) if text.strip() else {}
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
    try:
        return _parse(raw)
    except ParamsError as err:
        if err.source != source:
            raise ParamsError(str(err).split(": ", 1)[1], source=source) from None
        raise


def _parse(raw: Any) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"the top level must be a mapping of keys, got {type(raw).__name__}")
    for key in raw:
        if not isinstance(key, str):
            raise ParamsError(f"keys must be strings, got {key!r}")
        if key not in KNOWN_KEYS:
            raise ParamsError(f"unknown key {key!r}{suggest(key, KNOWN_KEYS)}")

    training: dict[str, tuple[Any, ...]] = {}
    axes: list[str] = []
    defaults = TrainingValues()
    for key in TRAINING_KEYS:
        value = raw.get(key, getattr(defaults, key))
        if isinstance(value, list):
            if not value:
                raise ParamsError(f"{key} is an empty list; give at least one value (a list is a grid axis)")
            values = [_validate_value(key, item, index) for index, item in enumerate(value)]
            if len(set(map(_canon, values))) != len(values):
                raise ParamsError(f"{key} lists a value twice; each grid value must be distinct")
            training[key] = tuple(values)
            if len(values) > 1:
                axes.append(key)
        elif isinstance(value, dict):
            raise ParamsError(f"{key} must be a value or a list of values, got a mapping")
        else:
            training[key] = (_validate_value(key, value, None),)

    sections: dict[str, Any] = {}
    for name, model in SECTION_MODELS.items():
        section = raw.get(name, {})
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ParamsError(f"{name} must be a mapping of keys, got {json.dumps(section)}")
        try:
            sections[name] = model.model_validate(section)
        except ValidationError as exc:
            _raise_from(exc, name, _section_keys(model, exc))

    select_by = raw.get("select_by", "val_loss")
    if select_by not in ("val_loss", "val_top1"):
        raise ParamsError(f"select_by must be one of 'val_loss', 'val_top1', got {json.dumps(select_by)}")
    device = raw.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise ParamsError(f"device must be one of 'auto', 'cpu', 'cuda', got {json.dumps(device)}")

    models = _parse_models(raw.get("models") or {})
    params = Params(
        training=training,
        axes=tuple(axes),
        select_by=select_by,
        device=device,
        models=models,
        **sections,
    )
    _check_consistency(params)
    return params


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _validate_value(key: str, value: Any, index: int | None) -> Any:
    where = key if index is None else f"{key}[{index}]"
    if isinstance(value, (list, dict)):
        raise ParamsError(f"{where} must be a single value, got {json.dumps(value)}")
    if isinstance(value, bool) and TrainingValues.model_fields[key].annotation in (int, float):
        raise ParamsError(f"{where} must be a number, got {_fmt(value)}")
    try:
        return _adapter(key).validate_python(value)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise ParamsError(_translate(error, where)) from None


def _section_keys(model: type[BaseModel], exc: ValidationError) -> list[str]:
    """Field names of the (sub)section an unknown key was found in, for suggestions."""
    loc = exc.errors()[0]["loc"]
    current: Any = model
    for part in loc[:-1]:
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        current = field.annotation
    return list(getattr(current, "model_fields", {}))


def _parse_models(raw_models: Any) -> dict[str, tuple[Any, ...]]:
    if not isinstance(raw_models, dict):
        raise ParamsError(f"models must map a model name to its list of layers, got {json.dumps(raw_models)}")
    from cnnpipe.models.presets import PRESETS

    out: dict[str, tuple[Any, ...]] = {}
    for name, layers in raw_models.items():
        if not isinstance(name, str) or not name:
            raise ParamsError(f"models: model names must be non-empty strings, got {name!r}")
        if name in PRESETS:
            raise ParamsError(f"models.{name} clashes with the built-in preset of that name; rename it")
        if not isinstance(layers, list) or not layers:
            raise ParamsError(f"models.{name} must be a non-empty list of layers, got {json.dumps(layers)}")
        out[name] = tuple(layers)
    return out


_MIRROR_SCHEMES = ("http://", "https://", "file://")


def _check_consistency(params: Params) -> None:
    """Cross-key checks: names resolve, shapes fit, the grid is not absurd."""
    data = params.data
    if data.dataset not in DATASETS:
        raise ParamsError(f"data.dataset must be one of {list(DATASETS)}, got {json.dumps(data.dataset)}{suggest(data.dataset, DATASETS)}")
    if get_dataset(data.dataset).is_folder:
        _check_folder(data)
    spec = data.spec()
    for index, mirror in enumerate(data.mirrors):
        if "://" in mirror and not mirror.startswith(_MIRROR_SCHEMES):
            scheme = mirror.split("://", 1)[0]
            raise ParamsError(
                f"data.mirrors[{index}] uses unsupported scheme {scheme!r} in {json.dumps(mirror)}; "
                "use http://, https://, file:// or a folder path"
            )
    for k in params.eval.top_k:
        if spec.classes and k > spec.num_classes:  # a folder's classes are counted by prepare
            raise ParamsError(f"eval.top_k has {k}, more than the {spec.num_classes} classes of {spec.name}; use k <= {spec.num_classes}")

    from cnnpipe.models.presets import PRESETS
    from cnnpipe.models.spec import check_layers

    known_models = list(params.models) + list(PRESETS)
    for index, name in enumerate(params.training["model"]):
        if name not in known_models:
            where = "model" if len(params.training["model"]) == 1 else f"model[{index}]"
            raise ParamsError(f"{where}: unknown model {name!r}{suggest(name, known_models)}; define it under models: or use a preset ({', '.join(PRESETS)})")
    for name, layers in params.models.items():
        check_layers(f"models.{name}", list(layers), spec.image_shape, spec.num_classes or 2)
    for name in params.training["model"]:
        if name in PRESETS:
            check_layers(f"preset {name}", list(PRESETS[name]), spec.image_shape, spec.num_classes or 2)

    size = params.grid_size
    if size > params.grid.max_runs:
        axes = " x ".join(f"{key}({len(params.training[key])})" for key in params.axes)
        raise ParamsError(f"the grid {axes} has {size} runs, more than grid.max_runs={params.grid.max_runs}; shorten a list or raise grid.max_runs")


def _check_folder(data: DataParams) -> None:
    """``dataset: folder`` needs a source of its own and a sane image size."""
    if data.source == REGISTRY_SOURCE:
        raise ParamsError("data.dataset is folder but data.source still names the benchmark registry; set data.source "
                          "to your class-per-folder images (a folder, a .zip/.tar.gz, or an http(s) URL of one)")
    if "://" in data.source and not data.source.startswith(("http://", "https://")):
        scheme = data.source.split("://", 1)[0]
        raise ParamsError(f"data.source uses unsupported scheme {scheme!r}; use a folder path, an archive path or an http(s) URL")
    if len(data.image_size) != 2 or max(data.image_size) > 8192:
        raise ParamsError(f"data.image_size must be [height, width], each 1..8192, got {json.dumps(data.image_size)}")
    remote = data.source.startswith(("http://", "https://"))
    if data.sha256 and not (remote or is_archive_name(data.source)):
        raise ParamsError("data.sha256 pins an archive, but data.source is a folder (DVC tracks a folder's content); "
                          "remove data.sha256 or point data.source at a .zip/.tar.gz")
    if remote and not is_archive_name(data.source):
        raise ParamsError(f"data.source {json.dumps(data.source)} must name a .zip, .tar, .tar.gz or .tgz archive")


# --------------------------------------------------------------------------- grid


def resolve_augment(augment: str, dataset: str) -> str:
    """``auto`` means crop+flip for photos and clothes, nothing for handwriting."""
    if augment != "auto":
        return augment
    return "none" if get_dataset(dataset).digits else "crop_flip"


def expand_grid(params: Params) -> list[RunConfig]:
    """The Cartesian product of every training axis, in ``params.yaml`` order."""
    keys = list(params.training)
    runs = []
    for combo in itertools.product(*(params.training[key] for key in keys)):
        values = dict(zip(keys, combo))
        values["augment"] = resolve_augment(values["augment"], params.data.dataset)
        runs.append(
            RunConfig(
                values=TrainingValues(**values),
                layers=params.layers_for(values["model"]),
                axes=params.axes,
                dataset=params.data.dataset,
            )
        )
    return runs
