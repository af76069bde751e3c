"""Reading the whole ``params.yaml`` as ``Params``: every problem is one ``ParamsError`` line (``params.yaml_file`` reads the YAML)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import (
    ValidationError,
)

from cnnpipe.util.errors import ParamsError
from cnnpipe.params import reads
from cnnpipe.params.messages import error_line
from cnnpipe.params.yaml_file import read_yaml
from cnnpipe.params.schema import Params
from cnnpipe.params.values import TRAINING_KEYS


def load_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise ``ParamsError`` on the first problem."""
    return parse_params(read_yaml(path), source=str(path))


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate already-parsed YAML; ``None`` is an empty file and is refused."""
    try:
        with reads.paused():
            return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(error_line(exc, Params, TRAINING_KEYS), source=source) from None
