"""One-line errors: pydantic's ``loc`` + ``msg`` become ``key must be ..., got ...``, with a close-match hint.

Every problem in ``params.yaml`` becomes one ``ParamsError`` line; ``_bad``
makes a message of ours verbatim, ``error_line`` rewrites pydantic's own.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)
from pydantic_core import PydanticCustomError



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


def _keys_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """Field names of ``model``'s (sub)section at ``loc``, for "did you mean" suggestions."""
    if model is None:
        return []
    current: Any = model
    for part in loc:
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    return list(current.model_fields)


def _describe(error: Mapping[str, Any], model: type[BaseModel] | None = None, axis_keys: Collection[str] = ()) -> str:
    """One error as a line; ``model`` (the validated class) names the keys a typo may have meant, ``axis_keys``
    are the keys validated as an axis (a value, a list or a range) whose branch name the line drops."""
    loc = tuple(error["loc"])
    if len(loc) > 1 and loc[0] in axis_keys:
        loc = (loc[0], *loc[2:])  # drop the axis branch (value / list / the range kind)
    msg = error["msg"]
    if msg == "Extra inputs are not permitted":
        parent = _path(loc[:-1])
        where = f" in {parent}" if parent else ""
        return f"unknown key {loc[-1]!r}{where}{suggest(loc[-1], _keys_at(model, loc[:-1]))}"
    text, needs_input = _phrase(msg)
    if needs_input and "input" in error:
        text += f", got {_shown(error['input'])}"
    key = _path(loc)
    if not key:
        return text
    return f"{key}{text}" if text.startswith((".", "[", ":")) else f"{key} {text}"  # ours may continue the key


def error_line(exc: ValidationError, model: type[BaseModel] | None = None, axis_keys: Collection[str] = ()) -> str:
    """The one line a user sees for ``exc``: its first error (an unknown key first: a typo explains the rest)."""
    errors = exc.errors(include_url=False)
    extra = [e for e in errors if e["msg"] == "Extra inputs are not permitted"]
    return _describe((extra or errors)[0], model, axis_keys)
