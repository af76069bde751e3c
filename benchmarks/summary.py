"""One row per headline figure, for ``run_all.py``'s combined table.

A benchmark calls ``record(...)`` next to the table it prints; the row is
appended (JSON lines) to the file named by ``$CNNPIPE_BENCH_SUMMARY``, which
``run_all.py`` sets. Run alone, a benchmark records nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "CNNPIPE_BENCH_SUMMARY"


def record(benchmark: str, measurement: str, value: float, unit: str, ratio: float | None = None,
           versus: str = "") -> None:
    """Append one figure: ``value`` in ``unit``, and optionally ``ratio`` to the row named in ``versus``."""
    target = os.environ.get(ENV)
    if not target:
        return
    row = {"benchmark": benchmark, "measurement": measurement, "value": value, "unit": unit,
           "ratio": ratio, "versus": versus}
    with Path(target).open("a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")
