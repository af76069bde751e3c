"""One run's training values: the value types of every training key and ``TrainingValues``."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
)

from cnnpipe.data.registry import get_dataset
from cnnpipe.params import reads
from cnnpipe.params.messages import _bad, _fmt, _shown, suggest


def _no_bool(value: Any) -> Any:
    """YAML ``true`` is not a number (pydantic's lax float would take it as 1.0)."""
    if isinstance(value, bool):
        raise _bad("must be a number, got " + _fmt(value))
    return value


PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False), BeforeValidator(_no_bool)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False), BeforeValidator(_no_bool)]
UnitFloat = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False), BeforeValidator(_no_bool)]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
ModelName = Annotated[str, Field(min_length=1)]

Metric = Literal["val_loss", "val_top1"]
# What a network costs, counted from its architecture (``models.cost``): a search may trade a metric against one.
Cost = Literal["params", "macs"]
METRICS: tuple[str, ...] = get_args(Metric)
COSTS: tuple[str, ...] = get_args(Cost)
MEASURED_COSTS: tuple[str, ...] = ("latency_ms",)  # measured, so noisy: reported beside the front, never selected by
MonitorSetting = Literal["auto", "val_loss", "val_top1"]  # auto: the same metric as select_by
Optimizer = Literal["adam", "adamw", "sgd"]
Schedule = Literal["none", "cosine", "onecycle"]
Augment = Literal["auto", "none", "crop", "flip", "crop_flip"]
Device = Literal["auto", "cpu", "cuda"]
Finetune = Literal["full", "head", "gradual"]



class _Strict(BaseModel):
    """A params model: unknown keys refused, values frozen, each field read noted (``params.reads``) when recording.

    ``_KEY_PREFIX`` is where the model sits in ``params.yaml`` (``data.``,
    ``data.download.``; training values and the file itself: the top level);
    None for a model that is not a part of the file (``RunConfig``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    _KEY_PREFIX: ClassVar[str | None] = ""

    if reads.READ is not None:  # only a recording process pays for the hook
        def __getattribute__(self, name: str) -> Any:
            value = object.__getattribute__(self, name)
            cls = object.__getattribute__(self, "__class__")
            if cls._KEY_PREFIX is not None and name in cls.model_fields and not isinstance(value, _Strict):
                # a section's fields are noted by the section, under its own prefix
                reads.note(cls._KEY_PREFIX + name)
            return value

        def model_dump(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            """A whole section read at once (e.g. hashed into a key): every key under it counts as read."""
            prefix = (type(self)._KEY_PREFIX or "").rstrip(".")
            if prefix:
                reads.note(prefix)
            return super().model_dump(*args, **kwargs)


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



def resolve_augment(augment: str, dataset: str) -> str:
    """``auto`` means crop+flip for photos and clothes, nothing for handwriting."""
    if augment != "auto":
        return augment
    return "none" if get_dataset(dataset).digits else "crop_flip"


def _select_by(value: Any) -> Any:
    """``val_loss`` / ``val_top1``, or ``[METRIC, COST]``: a metric traded against a counted cost."""
    usage = f"must be one of {' or '.join(map(repr, METRICS))}, or [METRIC, COST] with COST {' or '.join(COSTS)} " \
            "(e.g. [val_top1, macs])"
    if isinstance(value, str):
        if value in METRICS:
            return value
        raise _bad(f"{usage}, got {_shown(value)}{suggest(value, METRICS)}")
    if not isinstance(value, (list, tuple)) or len(value) != 2 or value[0] not in METRICS:
        raise _bad(f"{usage}, got {_shown(value)}")
    cost = value[1]
    if cost in MEASURED_COSTS:
        raise _bad(f": {cost} is measured, so it changes from run to run: it is reported beside the Pareto front but "
                   f"never selected by; use [{value[0]}, macs] or [{value[0]}, params]")
    if cost not in COSTS:
        close = suggest(str(cost), COSTS + MEASURED_COSTS).removeprefix(", ").rstrip("?")
        raise _bad(f": unknown cost {_shown(cost)}{f' ({close}?)' if close else ''}; use {' or '.join(COSTS)}")
    return (value[0], cost)


SelectBy = Annotated[Union[Metric, tuple[Metric, Cost]], BeforeValidator(_select_by)]


def objectives(select_by: str | tuple[str, str]) -> tuple[str, str | None]:
    """(the metric, the cost or None) that ``select_by`` names."""
    return (select_by, None) if isinstance(select_by, str) else (select_by[0], select_by[1])


MaxCost = Annotated[Union[float, None], Field(gt=0, allow_inf_nan=False), BeforeValidator(_no_bool)]

# Top-level keys that are plain values, not axes: declared once here for ``Params`` and for the stages that
# validate only what they read (``params.stage_sections``).
PLAIN_FIELDS: dict[str, tuple[Any, Any]] = {"select_by": (SelectBy, "val_loss"), "max_cost": (MaxCost, None),
                                            "device": (Device, "auto")}
