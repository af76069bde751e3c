"""``cnnpipe cache``: what the stores under ``.cnnpipe-cache/`` hold, and pruning them.

All live under ``<project root>/.cnnpipe-cache/`` (``runs/``: finished runs,
``state/``: unfinished or pruned runs that a later search continues,
``eval/`` and ``figures/``: evaluate's reports and plots' figures by their
inputs, ``cnnpipe.store.outputs``; ``features/``: a frozen body's cached
outputs, ``cnnpipe.store.features``). They grow with every new config; this
is how a user sees and bounds them.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cnnpipe.util.errors import CnnpipeError
from cnnpipe.store.location import default_cache_dir
from cnnpipe.store.outputs import OutputCache

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Entry:
    kind: str  # "run" (finished, in runs/), "state" (resumable, in state/), "eval", "figures" or "features"
    path: Path
    bytes: int
    modified: float
    name: str
    epochs: int | None


def parse_age(text: str) -> float:
    """``30m``, ``12h``, ``7d``, ``2w`` or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise CnnpipeError(f"--older-than {text!r} is not an age; use e.g. 30m, 12h, 7d or 2w")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _run_entries() -> list[Entry]:
    out = []
    root = default_cache_dir()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir():
            continue
        files = [p for p in folder.rglob("*") if p.is_file()]
        try:
            record = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        out.append(Entry("run", folder, sum(p.stat().st_size for p in files),
                         max((p.stat().st_mtime for p in files), default=folder.stat().st_mtime),
                         str(record.get("run_name", "?")), record.get("epochs_run")))
    return out


OUTPUT_KINDS = {"eval": "stored evaluate reports", "figures": "stored figures", "features": "cached backbone features"}


def _output_entries(kind: str) -> list[Entry]:
    """Stored outputs: the folder's time is its last use (a reuse touches it)."""
    root = OutputCache(kind).root
    out = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.is_dir() and not folder.name.startswith("."):
            files = [p for p in folder.iterdir() if p.is_file()]
            out.append(Entry(kind, folder, sum(p.stat().st_size for p in files),
                             max([folder.stat().st_mtime, *(p.stat().st_mtime for p in files)]), "-", None))
    return out


def entries() -> list[Entry]:
    from cnnpipe.store.states import RunStateStore

    states = [Entry("state", s.path, s.bytes, s.modified, s.name, s.epoch) for s in RunStateStore().entries()]
    return _run_entries() + states + [e for kind in OUTPUT_KINDS for e in _output_entries(kind)]


def select_prunable(items: list[Entry], *, older_than: float | None, keep_last: int | None,
                    now: float | None = None) -> list[Entry]:
    """Entries to delete: older than ``older_than`` seconds, or beyond the ``keep_last`` newest of their kind."""
    now = time.time() if now is None else now
    doomed = {e.path for e in items if older_than is not None and now - e.modified > older_than}
    if keep_last is not None:
        for kind in ("run", "state", *OUTPUT_KINDS):
            newest_first = sorted((e for e in items if e.kind == kind), key=lambda e: e.modified, reverse=True)
            doomed.update(e.path for e in newest_first[keep_last:])
    return [e for e in items if e.path in doomed]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def cache_command(args: argparse.Namespace) -> int:
    older = parse_age(args.older_than) if args.older_than else None
    if args.keep_last is not None and args.keep_last < 0:
        raise CnnpipeError("--keep-last must be >= 0")
    items = entries()
    now = time.time()
    for kind, label in (("run", "finished runs (run cache)"), ("state", "resumable run states"), *OUTPUT_KINDS.items()):
        mine = [e for e in items if e.kind == kind]
        print(f"{label}: {len(mine)}, {_size(sum(e.bytes for e in mine))}")
        if args.list:
            for e in sorted(mine, key=lambda e: e.modified, reverse=True):
                age = (now - e.modified) / 3600
                epochs = f"{e.epochs} epoch(s)" if e.epochs is not None else "-"
                print(f"  {e.path.name}  {e.name:<36} {epochs:>12} {_size(e.bytes):>9} {age:7.1f} h ago")
    if older is None and args.keep_last is None:
        return 0
    doomed = select_prunable(items, older_than=older, keep_last=args.keep_last, now=now)
    for e in doomed:
        shutil.rmtree(e.path, ignore_errors=True)
    print(f"pruned {len(doomed)} entr{'y' if len(doomed) == 1 else 'ies'} ({_size(sum(e.bytes for e in doomed))})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="show (and prune) the run cache and the resumable run states")
    p.add_argument("--list", action="store_true", help="one line per entry")
    p.add_argument("--older-than", metavar="AGE", help="delete entries not touched for AGE (30m, 12h, 7d, 2w)")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep only the N newest entries of each kind")
    p.set_defaults(func=cache_command)
