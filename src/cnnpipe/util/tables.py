"""Writing tables: one CSV writer for every report file (atomic, NaN as an empty cell)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cnnpipe.util.files import atomic_path

if TYPE_CHECKING:
    import pandas as pd


def write_csv(path: str | os.PathLike[str], table: "pd.DataFrame | Sequence[Mapping[str, Any]]", *,
              columns: Sequence[str] | None = None, float_format: str | None = None) -> None:
    """Write ``table`` (a frame, or rows as mappings with ``columns``) to ``path`` atomically, without the index."""
    import pandas as pd

    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table), columns=list(columns or ()))
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=float_format)
