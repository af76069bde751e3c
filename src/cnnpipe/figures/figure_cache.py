"""Drawing a report figure, or copying it back when the same inputs were drawn before (``draw``).

Drawing is most of the plots stage, and an experiment whose runs all came
from the run cache changes none of its figures. So ``draw`` calls a figure
function (``fn(data..., path) -> Path``, from ``curve_figures``,
``search_figures`` or ``class_figures``) through the code-keyed figure store
(``figure_store``, a ``cnnpipe.store.outputs.OutputCache``): a figure whose
inputs (every argument but ``path``, less the columns no figure draws) and
code are unchanged is copied back instead of drawn again.

The code part of a figure's key is this module's import closure (how a PNG
is written and named: ``figure_style``) joined with that of the module that
defines the figure function, plus matplotlib's version: editing one figure
family redraws its figures only.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnnpipe.figures.figure_style import DPI
from cnnpipe.store.outputs import OutputCache

# What writes a figure: this module and everything it may import (codegraph.code_identity); each key adds the
# figure function's own module.
CODE_ENTRY = "cnnpipe.figures.figure_cache"
LIBRARIES = ("matplotlib",)  # its version is part of the code that draws
FIGURE_CACHE_KIND = "figures"
FIGURE_FILE = "figure.png"
# Table columns that no figure draws: they change with every execution (MLflow ids, timings, cache flags),
# so they are left out of a figure's cache key. A figure that starts drawing one must drop it from here.
UNDRAWN_COLUMNS = frozenset({"mlflow_run_id", "seconds", "images_per_s", "epoch_seconds", "cached", "resumed_at"})


def figure_store(root: str | os.PathLike[str] | None = None) -> OutputCache:
    """The stored figures, ``.cnnpipe-cache/figures/<key>/figure.png`` (``root``: another folder for every store)."""
    return OutputCache(FIGURE_CACHE_KIND, root, code_entry=CODE_ENTRY, libraries=LIBRARIES)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(value: Any) -> Any:
    """A JSON-able stand-in for a figure argument: equal values, equal stand-ins (tables hashed, not embedded)."""
    if isinstance(value, pd.DataFrame):
        frame = value.drop(columns=[c for c in value.columns if c in UNDRAWN_COLUMNS])
        rows = pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes() if len(frame.columns) else b""
        return {"frame": [str(c) for c in frame.columns], "dtypes": [str(t) for t in frame.dtypes],
                "index": str(frame.index.dtype), "rows": len(frame), "hash": _sha(rows)}
    if isinstance(value, pd.Series):
        return {"series": str(value.name), "dtype": str(value.dtype),
                "hash": _sha(pd.util.hash_pandas_object(value, index=True).to_numpy().tobytes())}
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {"array": list(array.shape), "dtype": str(array.dtype), "hash": _sha(array.tobytes())}
    if isinstance(value, Mapping):
        return {str(k): _fingerprint(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_fingerprint(v) for v in value]
    if isinstance(value, np.generic):
        return repr(value.item())
    return repr(value)


def _key(fn: Callable[..., Path], bound: inspect.BoundArguments) -> str:
    bound.apply_defaults()
    arguments = {name: _fingerprint(value) for name, value in bound.arguments.items() if name != "path"}
    store = figure_store()
    return store.key({"figure": f"{fn.__module__}.{fn.__qualname__}", "dpi": DPI, "arguments": arguments},
                     code=store.code(fn.__module__))


def figure_key(fn: Callable[..., Path], *args: Any, **kwargs: Any) -> str:
    """The entry of ``fn(*args, **kwargs)``: the function, its code, matplotlib's version, DPI, every argument but ``path``."""
    return _key(fn, inspect.signature(fn).bind(*args, **kwargs))


def draw(fn: Callable[..., Path], *args: Any, cache: OutputCache | None = None, **kwargs: Any) -> Path:
    """``fn(*args, **kwargs)``, or its stored PNG copied to ``path`` when the same inputs were drawn before.

    ``cache`` is the store to look in and fill (``figure_store()``); None draws without one.
    """
    if cache is None:
        return fn(*args, **kwargs)
    bound = inspect.signature(fn).bind(*args, **kwargs)
    path = Path(bound.arguments["path"])
    key = _key(fn, bound)
    entry = cache.get(key, [FIGURE_FILE])
    if entry is not None:
        return cache.restore(entry / FIGURE_FILE, path)
    fn(*args, **kwargs)
    cache.put(key, {FIGURE_FILE: path})
    return path
