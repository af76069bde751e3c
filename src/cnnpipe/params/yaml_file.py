"""Reading a params file's YAML: syntax errors name the line and column, one ``ParamsError`` line each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from cnnpipe.util.errors import ParamsError


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
