"""Per-run result cache: an incremental grid retrains only what changed.

A finished run is stored under a key that hashes everything that can change
its result: the run's full config (training values, resolved layers,
dataset), the prepared data's fingerprint, the code that trains (the
identity of every module a trial may import, ``codegraph.code_identity``), the
torch version and the device. Change any
of them and the key changes, so a cached result is never stale; nothing is
ever looked up by run name alone.

Entries live at ``<project root>/.cnnpipe-cache/runs/<key>/`` (anchored at
``$DVC_ROOT`` so queued experiments share it): ``result.json`` (the run's
record and history), ``model.safetensors`` (the best weights) and, when
layer statistics were logged, ``layer_histograms.png``, written atomically as
one folder. Naming, finding and writing an entry go through the code-keyed
store API every store shares (``cnnpipe.store.outputs.OutputCache``); this
module adds what a run entry holds.

Policy (``open_grid_cache``): ``grid.cache: false`` turns the cache off (no
lookups, nothing stored). ``python stages/train.py --no-cache`` or
``CNNPIPE_NO_CACHE=1`` retrains every run but still stores the fresh
results, so a suspect entry is replaced rather than kept. Only *finished*
runs are stored; diverged and failed runs always train again. The thread
count is not part of the key: on a CPU, runs trained with a different number
of torch threads can differ in the last bits, which a reuse ignores.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.store.outputs import RUNS_KIND, OutputCache
from cnnpipe.engine.records import EpochRecord, RunResult

if TYPE_CHECKING:
    import torch

    from cnnpipe.engine.data import TrainData
    from cnnpipe.engine.records import RunResult
    from cnnpipe.params.run_config import RunConfig
    from cnnpipe.params.sections import GridParams
    from cnnpipe.search.selection import RunRecord
    from cnnpipe.tracking.runs import NullTracker

# What trains a run: a trial (search.trial.run_one) and everything it may import.
CODE_ENTRY = "cnnpipe.search.trial"
LIBRARIES = ("torch",)  # its version is part of the code that trains
FORMAT = "cnnpipe-runcache/2"
HISTOGRAMS = "layer_histograms.png"
RESULT_FILE = "result.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class CachedRun:
    key: str
    record: dict[str, Any]  # what the grid recorded for the run (status, history, metrics, ids)
    state_dict: dict[str, "torch.Tensor"]
    path: Path


def run_store(folder: str | os.PathLike[str] | None = None) -> OutputCache:
    """The run cache as a code-keyed store: ``folder`` (default ``.cnnpipe-cache/runs``) holds one entry per key."""
    return OutputCache(RUNS_KIND, folder=folder, code_entry=CODE_ENTRY, libraries=LIBRARIES)


def code_version() -> str:
    """The identity of the code that trains (``CODE_ENTRY``'s import closure) plus the torch version.

    Run states (``store.states``) key on it too: a state is resumable only by the code that wrote it.
    """
    return run_store().code()


def cache_key(cfg: "RunConfig", data_fingerprint: str, device: str, code: str | None = None) -> str:
    """The entry of one search point: its full config, the prepared data, the device kind and the code."""
    inputs = {
        "format": FORMAT,
        "values": cfg.values.model_dump(mode="json"),
        "layers": list(cfg.layers),
        "dataset": cfg.dataset,
        "data": data_fingerprint,
        "device": device.split(":")[0],
    }
    return run_store().key(inputs, code=code or code_version())


class RunCache:
    """Get and put finished runs by key. Corrupt entries are ignored, never trusted."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.store = run_store(root)
        self.root = self.store.root

    def get(self, key: str) -> CachedRun | None:
        """The stored run of ``key``; None when absent, incomplete, corrupt or filed under another key
        (and under ``CNNPIPE_NO_CACHE``, like every code-keyed store)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        entry = self.store.get(key, (RESULT_FILE, WEIGHTS_FILE))
        if entry is None:
            return None
        try:
            record = json.loads((entry / RESULT_FILE).read_text(encoding="utf-8"))
            if record.get("cache_format") != FORMAT or record.get("cache_key") != key:
                return None
            state = load_file(str(entry / WEIGHTS_FILE))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, ValueError):
            return None
        return CachedRun(key=key, record=record, state_dict=state, path=entry)

    def put(self, key: str, record: dict[str, Any], state_dict: Mapping[str, "torch.Tensor"],
            files: Mapping[str, bytes] | None = None) -> Path:
        """Store one run (``files``: extra artifacts by plain file name, e.g. its histogram figure).

        Unlike a stage output, a failed write raises: the caller decides whether losing the entry matters.
        """
        from safetensors.torch import save_file

        with self.store.writing(key) as tmp:
            tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            for name, blob in (files or {}).items():
                if Path(name).name != name or name in (RESULT_FILE, WEIGHTS_FILE):
                    raise ValueError(f"not a plain extra file name: {name!r}")
                (tmp / name).write_bytes(blob)
            body = {**record, "cache_format": FORMAT, "cache_key": key}
            (tmp / RESULT_FILE).write_text(json.dumps(body, indent=2, default=str) + "\n", encoding="utf-8")
        return self.root / key


# --------------------------------------------------------------------------- what an entry holds


def entry_record(rec: "RunRecord", tracker: "NullTracker") -> dict[str, Any]:
    """What the cache keeps of a finished run besides its weights (plain JSON)."""
    r = rec.result
    return {
        "run_id": rec.cfg.run_id,
        "run_name": rec.cfg.name,
        "params": rec.cfg.flat(),
        "status": r.status,
        "stop_reason": r.stop_reason,
        "best_epoch": r.best_epoch,
        "epochs_run": r.epochs_run,
        "seconds": r.seconds,
        "images_per_s": r.images_per_s,
        "device": r.device,
        "history": [epoch.to_dict() for epoch in r.history],
        "mlflow_run_id": rec.mlflow_run_id,
        "mlflow_experiment_id": tracker.experiment_id,
        "tracking_uri": tracker.uri,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cached_result(hit: CachedRun, cfg: "RunConfig", data: "TrainData", device: str) -> "RunResult | None":
    """The cached run as a ``RunResult`` with its model rebuilt; None if the entry does not fit."""
    from cnnpipe.models.build import rebuild_model

    try:
        raw = hit.record
        history = [EpochRecord.from_dict(epoch) for epoch in raw["history"]]
        best_epoch = raw["best_epoch"]
        best = next(epoch for epoch in history if epoch.epoch == best_epoch)
        model = rebuild_model(cfg.layers, data.image_shape, data.num_classes, hit.state_dict, where=f"model {cfg.values.model}")
        return RunResult(run_id=cfg.run_id, status=raw["status"], stop_reason=raw["stop_reason"], best_epoch=best_epoch,
                         best=best, history=history, epochs_run=int(raw["epochs_run"]), seconds=float(raw["seconds"]),
                         images_per_s=float(raw["images_per_s"]), model=model, device=str(raw.get("device", device)))
    except (KeyError, TypeError, ValueError, StopIteration, RuntimeError):
        return None


@dataclass
class GridCache:
    """The train stage's use of a ``RunCache``: look up before training (when ``reuse``), store after."""

    cache: RunCache
    reuse: bool = True

    def lookup(self, cfg: "RunConfig", *, fingerprint: str, device: str) -> CachedRun | None:
        if not self.reuse:
            return None
        return self.cache.get(cache_key(cfg, fingerprint, device))

    def store(self, cfg: "RunConfig", record: dict[str, Any], state_dict: Mapping[str, "torch.Tensor"], *,
              fingerprint: str, device: str, files: Mapping[str, bytes] | None = None) -> Path:
        return self.cache.put(cache_key(cfg, fingerprint, device), record, state_dict, files=files)


def open_grid_cache(settings: "GridParams", *, no_cache: bool = False,
                    root: str | os.PathLike[str] | None = None) -> GridCache | None:
    """None when ``grid.cache`` is false; a store-only cache for ``--no-cache`` / ``CNNPIPE_NO_CACHE=1``."""
    if not settings.cache:
        return None
    cache = RunCache(root)
    return GridCache(cache, reuse=not no_cache and cache.store.reusing)
