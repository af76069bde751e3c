"""Search axes: a training key is one value, a list of values (a grid axis) or a range ``grid.samples`` points are drawn from."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, ClassVar, Generic, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Discriminator,
    PlainValidator,
    Tag,
    model_validator,
)

from cnnpipe.params.messages import _bad, _fmt, _shown
from cnnpipe.params.values import _Strict


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
