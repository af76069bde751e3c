"""Built-in architectures, loaded from ``presets.yaml`` (the one source of truth)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

import yaml


@lru_cache(maxsize=1)
def _load() -> dict[str, list[Any]]:
    text = resources.files("cnnpipe.models").joinpath("presets.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)



PRESETS: dict[str, list[Any]] = _load()
