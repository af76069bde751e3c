"""Validating only the sections a stage reads (``data`` for download and prepare).

``Params`` checks the whole file against the dataset registry *and* the
model tables (layer grammar, presets, torchvision names); a stage that reads
only ``data`` and ``eval`` loads neither the model tables nor their code, so
editing the layer grammar never reruns it, and a typo in a training key is
reported by the stage that reads training keys (``train``, and ``cnnpipe
validate``), not by download. Each section validated here is the same class
``Params`` uses, so its checks and one-line errors are the same.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from cnnpipe.params import reads
from cnnpipe.params.messages import error_line
from cnnpipe.params.sections import DataParams, EvalParams, GridParams, MlflowParams
from cnnpipe.params.values import PLAIN_FIELDS, _Strict
from cnnpipe.params.yaml_file import read_yaml
from cnnpipe.util.errors import ParamsError

# The sections that need no model table, by their key in params.yaml (their ``_KEY_PREFIX``).
SECTIONS: dict[str, type[BaseModel]] = {cls._KEY_PREFIX.rstrip("."): cls
                                        for cls in (DataParams, EvalParams, GridParams, MlflowParams)}


class _Sections(_Strict):
    """Only some of the file: the other keys are another stage's to read and check."""

    model_config = ConfigDict(extra="ignore", frozen=True)


def load_sections(*names: str, path: str | os.PathLike[str] = "params.yaml") -> Any:
    """``params.yaml``'s ``names`` sections (or plain top-level keys: ``device``, ``select_by``), validated (other keys are left to the stages that read them).

    The result reads like ``Params`` (``params.data.dataset``); a problem in
    one of these sections is the same ``ParamsError`` line ``Params`` gives.
    """
    unknown = [name for name in names if name not in SECTIONS and name not in PLAIN_FIELDS]
    if unknown:
        raise ValueError(f"no section {unknown[0]!r} without the model tables; use load_params")
    fields = {name: PLAIN_FIELDS[name] if name in PLAIN_FIELDS else (SECTIONS[name], SECTIONS[name]()) for name in names}
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ParamsError("the top level must be a mapping of keys; restore it: git checkout params.yaml", source=str(path))
    model = create_model("StageSections", __base__=_Sections, **fields)
    try:
        with reads.paused():
            return model.model_validate({name: raw[name] if name in PLAIN_FIELDS else raw.get(name) or {}
                                     for name in names if name in raw or name in SECTIONS})
    except ValidationError as exc:
        raise ParamsError(error_line(exc, model), source=str(path)) from None
