"""Where one trial's time goes: its epochs vs the fixed cost around them, with MLflow on and off.

    python benchmarks/bench_trial_cost.py [--epochs 5] [--train 200] [--val 100] [--repeats 1] [--data auto]

A model-based search runs many short trials, so what a trial pays outside
its epochs bounds how fast it can search. This runs the train stage's own
search machinery the way ``stages/train.py`` does (``run_search`` with a
``TrainContext``, a real MLflow sqlite store through ``open_tracker``, the run
cache from ``open_grid_cache`` and a ``RunStateStore``) on the 9-point head
grid of issue 25 (``lr`` 0.03/0.01/0.003 x ``weight_decay`` 0/5e-4/5e-3,
``finetune: head``, ``bn_frozen: true``, ``augment: none``, batch 100) of
``torchvision:resnet18`` on cached body features, with ``grid.workers: 1``
(every trial in this process, so the timers below see all of it).

Data: ``--data real`` is a stratified seeded subset of Fashion-MNIST
(Debian's ``dataset-fashion-mnist`` at ``/usr/share/datasets/fashion-mnist``,
prepared by ``bench_features.prepared_subset``, i.e. cnnpipe's own
``write_prepared``); ``--data synthetic`` is ``tests/synthetic.py``'s recipe
(one fixed pattern per class plus seeded noise, 1x28x28, 10 classes) written
the same way; ``auto`` (default) takes the real images when they are there.
A trial's fixed cost does not depend on the pixel values.

Weights: a seeded randomly initialised resnet18 state dict placed as
``IMAGENET1K_V1`` in ``$TORCH_HOME/hub/checkpoints/`` (a temp folder) and
fetched by the weights stage's ``fetch_weights`` (nothing is downloaded).

How it measures: the real functions are wrapped with timers in this process
only (nothing in ``src/`` changes). Each timer counts its *own* time, minus
that of the timed functions it calls, so the rows of a trial add up to its
wall time; a trial is ``run_one`` (in this process, with its MLflow/progress
events) plus the parent's ``SearchLog.finish`` (final history, child end,
run cache put, state deletion) plus its run-cache lookup and state claim
before the first trial. A warm-up search (one trial, not timed) imports
everything and computes the body's features once, as an earlier experiment
would have; before each timed search the per-process memos a fresh stage
process starts without (the code identity, the parameter-count builds, the
weights files already hashed) are cleared. The compute turn (taken once per
search, not per trial) is off (``CNNPIPE_TAKE_TURNS=0``). Variants: MLflow on (the stage's defaults:
``log_layer_stats: true``) and MLflow off (``mlflow.enabled: false``: no
child runs, no layer norms or histograms), alternated when ``--repeats`` > 1.

Prints a per-trial table for each variant, the fixed cost per trial by
component (median over trials) ranked, and the MLflow API calls per trial;
writes ``benchmarks/out/bench_trial_cost.json``. Not a test: no assertions.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from summary import record

ROOT = Path(__file__).resolve().parents[1]
RAW = Path("/usr/share/datasets/fashion-mnist")
LRS = [0.03, 0.01, 0.003]
DECAYS = [0.0, 0.0005, 0.005]

# Components, in the order the tables show them: (group, component). Groups are the per-trial table's columns.
EPOCHS = "epochs"
COMPONENTS: list[tuple[str, str]] = [
    (EPOCHS, "train epoch (head steps on cached features)"),
    (EPOCHS, "validation (head on cached val features)"),
    ("build", "build network (random init + body weights loaded)"),
    ("build", "weights file: SHA-256 check + read"),
    ("mlflow", "child params/tags (payloads)"),
    ("mlflow", "parameter counts for child params (builds the net again)"),
    ("mlflow", "child start (create_run, params, dataset input)"),
    ("mlflow", "per-epoch metrics (log_batch per epoch, final history)"),
    ("mlflow", "layer norms (layer_stats: per step + per epoch)"),
    ("mlflow", "layer histogram snapshots (every epoch)"),
    ("mlflow", "histogram figure (PNG, at the end)"),
    ("mlflow", "child end (metrics, summary/history texts, histogram artifact, terminate)"),
    ("state", "run state: assemble + save (every epoch)"),
    ("state", "run state: read"),
    ("state", "run state: key, claim, note, delete"),
    ("cache", "run cache lookup (key + miss)"),
    ("cache", "run cache put (key + weights + result.json)"),
    ("features", "feature cache: code identity (per trial)"),
    ("features", "feature cache: load features"),
    ("rest", "early stopping: copy best weights"),
    ("rest", "rest (optimizer, loop, progress, search bookkeeping)"),
]
GROUPS = {"epochs": "epochs", "build": "build + load", "mlflow": "MLflow child", "state": "run state",
          "cache": "run cache", "features": "feature cache", "rest": "rest"}
REST = COMPONENTS[-1][1]
GROUP_OF = {component: group for group, component in COMPONENTS}


# --------------------------------------------------------------------------- the timers


@dataclass
class _Frame:
    component: str
    trial: int | None
    children: float = 0.0


class Ledger:
    """Own time per (trial, component): a timed call's time minus that of the timed calls inside it."""

    def __init__(self) -> None:
        self.seconds: dict[int | None, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # MLflow API: [count, seconds]
        self.bytes: dict[str, list[int]] = defaultdict(list)  # bytes written per save, by what
        self.stack: list[_Frame] = []
        self.index_of: dict[str, int] = {}  # run_id -> trial index (lookups before the trials run)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.bytes.clear()

    def wrap(self, fn: Callable[..., Any], component: str,
             trial_of: Callable[[tuple[Any, ...]], int | None] | None = None,
             after: Callable[[Any, tuple[Any, ...]], None] | None = None) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if trial_of is not None and not any(frame.trial is not None for frame in self.stack):
                trial = trial_of(args)
            else:
                trial = self.stack[-1].trial if self.stack else None
            frame = _Frame(component, trial)
            self.stack.append(frame)
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.stack.pop()
                self.seconds[trial][component] += elapsed - frame.children
                if self.stack:
                    self.stack[-1].children += elapsed
            if after is not None:
                after(result, args)
            return result

        timed.__wrapped_by_bench__ = fn  # type: ignore[attr-defined]
        return timed

    def count_call(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``CallPolicy.call`` counted per MLflow API name (inclusive; the component timers still attribute it)."""

        @functools.wraps(fn)
        def counted(tracker: Any, what: str, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(tracker, what, *args, **kwargs)
            finally:
                entry = self.calls[what]
                entry[0] += 1
                entry[1] += time.perf_counter() - start

        return counted


class Patches:
    """Replace attributes for the benchmark's lifetime; every target must exist (the search code is changing)."""

    def __init__(self) -> None:
        self.undo: list[tuple[Any, str, Any]] = []

    def replace(self, owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        own = isinstance(owner, type) and name in owner.__dict__
        raw = owner.__dict__[name] if own else getattr(owner, name, None)  # a class may inherit it
        if raw is None:
            where = getattr(owner, "__name__", repr(owner))
            raise SystemExit(f"bench_trial_cost: {where}.{name} is gone (src/cnnpipe is being changed); "
                             "update install() in this benchmark, or retry when the change is in")
        if isinstance(raw, staticmethod):
            setattr(owner, name, staticmethod(make(raw.__func__)))
        else:
            setattr(owner, name, make(raw))
        self.undo.append((owner, name, raw if own or not isinstance(owner, type) else None))

    def restore(self) -> None:
        for owner, name, raw in reversed(self.undo):
            if raw is None:
                delattr(owner, name)  # it was inherited
            else:
                setattr(owner, name, raw)
        self.undo.clear()


def install(ledger: Ledger) -> Patches:
    """Wrap the functions a head-grid trial runs with the ledger's timers (see the module docstring)."""
    from cnnpipe.engine import early_stopping, finetune, layer_stats, loop, resume
    from cnnpipe.models import build
    from cnnpipe.reports import layer_histograms
    from cnnpipe.search import log, runner
    from cnnpipe.store import features, run_cache, states
    from cnnpipe.tracking import runs

    patches = Patches()
    c = dict(enumerate(component for _, component in COMPONENTS))

    def timer(component: str, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return lambda fn: ledger.wrap(fn, component, **kw)

    # The trial's own frames (their own time is "the rest"): run_one(ctx, index, cfg, ...), the parent's finish,
    # and the run-cache lookup / state claim each trial gets before the first one trains.
    patches.replace(runner, "run_one", timer(REST, trial_of=lambda a: int(a[1])))
    patches.replace(log.SearchLog, "finish", timer(REST, trial_of=lambda a: int(a[1].record.index)))
    by_cfg = lambda a: ledger.index_of.get(a[1].run_id)
    patches.replace(log.SearchLog, "lookup", timer(c[15], trial_of=by_cfg))
    patches.replace(log.SearchLog, "claim_state", timer(c[14], trial_of=by_cfg))
    # epochs
    patches.replace(loop, "_train_epoch", timer(c[0]))
    for name in ("_head_logits", "_val_metrics", "evaluate_logits"):
        patches.replace(loop, name, timer(c[1]))
    # model build + weights
    patches.replace(loop, "build_model", timer(c[2]))
    patches.replace(build, "load_pinned", timer(c[3]))
    # MLflow child
    for name in ("child_params", "child_tags"):
        patches.replace(log, name, timer(c[4]))
    patches.replace(finetune, "_counts", timer(c[5]))
    patches.replace(runs.MlflowTracker, "start_child", timer(c[6]))
    for name in ("_epoch", "_history"):
        patches.replace(log.SearchLog, name, timer(c[7]))
    for name in ("__init__", "after_backward", "collect"):
        patches.replace(layer_stats.LayerStats, name, timer(c[8]))
    patches.replace(layer_histograms.LastSnapshot, "update", timer(c[9]))
    patches.replace(layer_histograms, "histogram_png", timer(c[10]))
    patches.replace(log.SearchLog, "_end_child", timer(c[11]))
    patches.replace(runs.MlflowTracker, "call", ledger.count_call)
    # run state
    def state_size(_: Any, args: tuple[Any, ...]) -> None:
        if args and args[0] is not None and args[1] is not None:
            path = resume.state_path(args[0])
            if path.is_file():
                ledger.bytes["run state file"].append(path.stat().st_size)

    patches.replace(loop, "save_run_state", timer(c[12], after=state_size))
    patches.replace(loop, "run_state", timer(c[12]))
    patches.replace(loop, "load_resume_state", timer(c[13]))
    patches.replace(resume, "load_resume_state", timer(c[13]))  # trial._usable_state imports it when called
    for name in ("folder", "claim", "write_note", "read_note", "discard", "saved_epoch"):
        patches.replace(states.RunStateStore, name, timer(c[14]))
    # run cache
    def entry_size(path: Any, _: tuple[Any, ...]) -> None:
        if path is not None and Path(path).is_dir():
            ledger.bytes["run cache entry"].append(sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file()))

    patches.replace(run_cache.GridCache, "store", timer(c[16], after=entry_size))
    # feature cache
    patches.replace(features, "code_identity", timer(c[17]))
    patches.replace(features.FeatureCache, "get_or_compute", timer(c[18]))
    # the rest's one named part
    for name in ("update", "restore"):
        patches.replace(early_stopping.EarlyStopping, name, timer(c[19]))
    return patches


def forget_process_memos() -> None:
    """What a fresh stage process computes again: the run cache's code identity, the parameter-count builds,
    the weights files already hashed."""
    from cnnpipe.engine import finetune
    from cnnpipe.models import pinned_weights
    from cnnpipe.store import outputs

    outputs.code_version.cache_clear()
    original = getattr(finetune._counts, "__wrapped_by_bench__", finetune._counts)
    original.cache_clear()
    getattr(pinned_weights, "_verified", set()).clear()


# --------------------------------------------------------------------------- data and weights


def synthetic_prepared(out: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """``tests/synthetic.py``'s recipe (a fixed pattern per class plus seeded noise) as prepared Fashion-MNIST."""
    from cnnpipe.data.prepared import write_prepared

    def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        patterns = np.random.default_rng(1234).uniform(0, 255, size=(10, 1, 28, 28))
        labels = np.arange(n, dtype=np.int64) % 10
        rng.shuffle(labels)
        pixels = patterns[labels] + rng.normal(0, 40.0, size=(n, 1, 28, 28))
        return np.clip(pixels, 0, 255).astype(np.uint8), labels

    splits = {"train": images(n_train, seed), "val": images(n_val, seed + 1), "test": images(100, seed + 2)}
    write_prepared(out, splits, dataset="fashion-mnist", classes=[f"class{i}" for i in range(10)], split_seed=seed)
    return out


def place_weights(arch: str, torch_home: Path) -> Path:
    """A seeded random ``arch`` state dict where torchvision caches ``IMAGENET1K_V1`` (what the weights stage reads)."""
    import torch
    import torchvision

    url = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"].url
    target = torch_home / "hub" / "checkpoints" / os.path.basename(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), target)
    return target


# --------------------------------------------------------------------------- one search, as stages/train.py runs it


def search(params: Any, configs: list[Any], prepared: Path, roots: Path, lines: list[str]) -> tuple[float, list[Any]]:
    """``stages/train.py``'s flow from ``preflight`` to the end of the parent run (publishing excepted)."""
    from cnnpipe.compute.device import resolve_device
    from cnnpipe.engine.data import TrainData
    from cnnpipe.search import payloads, runner, strategies
    from cnnpipe.search.backend_choice import make_executor
    from cnnpipe.search.selection import select_best
    from cnnpipe.search.trial import TrainContext
    from cnnpipe.store import run_cache
    from cnnpipe.store.states import RunStateStore
    from cnnpipe.tracking import connection, runs

    start = time.perf_counter()
    target = connection.preflight(params.mlflow, root=roots)
    device = resolve_device(params.device)
    executor = make_executor(params.grid, len(configs), device=device)
    executor.start()
    data = TrainData.load(prepared, splits=("train", "val"))
    runner.check_dataset(data, params)
    cache = run_cache.open_grid_cache(params.grid, root=roots / "runs")
    tracker = runs.open_tracker(params.mlflow, target=target, params=payloads.search_definition(params),
                                tags=payloads.parent_tags(params, data, device),
                                dataset=(params.data.dataset, data.fingerprint, str(prepared)))
    with tracker.running():
        states = RunStateStore(roots / "state")
        ctx = TrainContext(data=data, tracker=tracker, device=device,
                           layer_stats=params.mlflow.enabled and params.mlflow.log_layer_stats, progress=False,
                           prepared_dir=prepared.resolve(), state_root=states.root, samples=None)
        records = runner.run_search(configs, ctx, strategy=strategies.make_strategy(params.grid), executor=executor,
                                    select_by=params.select_by, cache=cache, states=states, report=lines.append)
        select_best([rec for rec in records if not rec.pruned], params.select_by)
    if tracker.lost:
        raise SystemExit(f"bench_trial_cost: MLflow logging stopped: {tracker.lost}")
    return time.perf_counter() - start, records


# --------------------------------------------------------------------------- tables


def trial_rows(ledger: Ledger, records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        own = ledger.seconds.get(rec.index, {})
        total = sum(own.values())
        groups = {group: sum(v for k, v in own.items() if GROUP_OF.get(k) == group) for group in GROUPS}
        unknown = {k: v for k, v in own.items() if k not in GROUP_OF}
        assert not unknown, unknown
        rows.append({"index": rec.index, "name": rec.cfg.name, "status": rec.result.status,
                     "epochs_run": rec.result.epochs_run, "total": total, "fixed": total - groups[EPOCHS],
                     "engine_epoch_seconds": sum(r.epoch_seconds for r in rec.result.history),
                     "groups": groups, "components": dict(own)})
    return rows


def print_trials(label: str, rows: list[dict[str, Any]], wall: float) -> None:
    cols = list(GROUPS)
    print(f"\n{label}: search wall {wall:.2f} s (preflight to the parent run's end), "
          f"{sum(r['total'] for r in rows):.2f} s of it in the {len(rows)} trials")
    print("seconds; epochs = own time of the train epochs and validations; engine = the epoch_seconds the run records "
          "(they include the per-step layer norms)")
    head = (f"{'trial':<34} {'total s':>8} {'epochs':>7} {'engine':>7} {'fixed':>7}  "
            + " ".join(f"{GROUPS[g]:>13}" for g in cols[1:]))
    print(head)
    for r in rows:
        print(f"{r['index']:>2} {r['name'][:31]:<31} {r['total']:>8.3f} {r['groups'][EPOCHS]:>7.3f} "
              f"{r['engine_epoch_seconds']:>7.3f} {r['fixed']:>7.3f}  "
              + " ".join(f"{r['groups'][g]:>13.3f}" for g in cols[1:]))
    mean = lambda key: statistics.mean(r[key] for r in rows)
    gmean = lambda g: statistics.mean(r["groups"][g] for r in rows)
    print(f"{'mean':<34} {mean('total'):>8.3f} {gmean(EPOCHS):>7.3f} {mean('engine_epoch_seconds'):>7.3f} "
          f"{mean('fixed'):>7.3f}  " + " ".join(f"{gmean(g):>13.3f}" for g in cols[1:]))
    gmed = lambda g: statistics.median(r["groups"][g] for r in rows)
    med = lambda key: statistics.median(r[key] for r in rows)
    print(f"{'median':<34} {med('total'):>8.3f} {gmed(EPOCHS):>7.3f} {med('engine_epoch_seconds'):>7.3f} "
          f"{med('fixed'):>7.3f}  " + " ".join(f"{gmed(g):>13.3f}" for g in cols[1:]))


def component_medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median own seconds per trial of each component (robust to a busy machine's spikes)."""
    return {component: statistics.median(r["components"].get(component, 0.0) for r in rows) for _, component in COMPONENTS}


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per trial (patience = epochs: all run)")
    parser.add_argument("--train", type=int, default=200, help="training images")
    parser.add_argument("--val", type=int, default=100, help="validation images")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--data", choices=("auto", "real", "synthetic"), default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="timed searches per variant, alternated (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "bench_trial_cost.json")
    return parser.parse_args()


def machine() -> dict[str, Any]:
    import torch

    return {"cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    args = parse_args()
    data_kind = args.data if args.data != "auto" else ("real" if (RAW / "train-images-idx3-ubyte.gz").is_file()
                                                       else "synthetic")
    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-trial-cost-") as tmp_name:
        tmp = Path(tmp_name)
        for name in ("MLFLOW_TRACKING_URI", "CNNPIPE_NO_CACHE", "CNNPIPE_FEATURES"):
            os.environ.pop(name, None)
        os.environ.update({"CNNPIPE_CACHE_DIR": str(tmp / "cache" / "runs"),  # the feature cache sits beside it
                           "TORCH_HOME": str(tmp / "torch_home"), "CNNPIPE_TAKE_TURNS": "0"})
        from cnnpipe.params.load import parse_params
        from cnnpipe.pretrained import fetch as pw
        from cnnpipe.search.space import expand

        prepared = tmp / "prepared"
        if data_kind == "real":
            from bench_features import prepared_subset

            prepared_subset(prepared, args.train, args.val)
        else:
            synthetic_prepared(prepared, args.train, args.val)
        place_weights(args.arch, tmp / "torch_home")

        def params_for(mlflow: bool) -> Any:
            return parse_params({
                "model": f"torchvision:{args.arch}", "finetune": "head", "bn_frozen": True, "augment": "none",
                "lr": LRS, "weight_decay": DECAYS, "batch_size": 100, "epochs": args.epochs,
                "patience": args.epochs, "data": {"dataset": "fashion-mnist"},
                "mlflow": {"enabled": mlflow, "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                           "experiment": "bench-trial-cost", "registered_model": None},
                "grid": {"workers": 1, "cache": True}})

        weights = tmp / "weights"
        pw.fetch_weights(params_for(True), weights, progress=False)
        variants = {"MLflow on": params_for(True), "MLflow off": params_for(False)}
        configs = {label: expand(p, weights_dir=weights) for label, p in variants.items()}
        before = machine()
        print(f"machine: {before['cores']} cores, torch {before['torch']} ({before['torch_threads']} threads), "
              f"load average {before['loadavg_1_5_15']}")
        print(f"grid: {len(configs['MLflow on'])} trials of torchvision:{args.arch}, finetune head, bn_frozen, "
              f"augment none, batch 100, {args.epochs} epochs each; {data_kind} Fashion-MNIST-shaped data, "
              f"{args.train} train / {args.val} val images; one worker (this process)")

        ledger = Ledger()
        patches = install(ledger)
        try:
            start = time.perf_counter()  # warm-up: imports, the MLflow schema, the body's features (not timed)
            search(variants["MLflow on"], configs["MLflow on"][:1], prepared, tmp / "warmup", [])
            print(f"warm-up (one trial; imports, sqlite schema, features computed once): "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
            results: dict[str, list[tuple[float, list[dict[str, Any]], dict[str, list[float]], dict[str, list[int]]]]] = \
                {label: [] for label in variants}
            order = [label for repeat in range(args.repeats)
                     for label in (list(variants) if repeat % 2 == 0 else list(variants)[::-1])]
            for number, label in enumerate(order):
                ledger.reset()
                forget_process_memos()
                ledger.index_of = {cfg.run_id: i for i, cfg in enumerate(configs[label], start=1)}
                lines: list[str] = []
                wall, records = search(variants[label], configs[label], prepared, tmp / f"search{number}", lines)
                assert all(rec.result.status == "finished" and not rec.cached for rec in records), lines
                rows = trial_rows(ledger, records)
                results[label].append((wall, rows, {k: list(v) for k, v in ledger.calls.items()},
                                       {k: list(v) for k, v in ledger.bytes.items()}))
                print(f"{label}: {wall:.1f} s", flush=True)
        finally:
            patches.restore()
        after = machine()

    for label, runs in results.items():
        wall, rows, _, _ = runs[0]
        print_trials(f"{label} (first repeat)", rows, wall)

    trials = {label: [r for _, rows, _, _ in runs for r in rows] for label, runs in results.items()}
    med = {label: component_medians(rows) for label, rows in trials.items()}
    totals = {label: statistics.median(r["total"] for r in rows) for label, rows in trials.items()}
    epochs = {label: statistics.median(r["groups"][EPOCHS] for r in rows) for label, rows in trials.items()}
    fixed = {label: statistics.median(r["fixed"] for r in rows) for label, rows in trials.items()}
    on, off = "MLflow on", "MLflow off"
    print(f"\nper trial, medians over {len(trials[on])} trials per variant ({args.repeats} search(es) each): "
          f"total {totals[on]:.3f} s on / {totals[off]:.3f} s off; epochs {epochs[on]:.3f} / {epochs[off]:.3f} s; "
          f"fixed {fixed[on]:.3f} / {fixed[off]:.3f} s (fixed / epochs: {fixed[on] / epochs[on]:.0f}x / "
          f"{fixed[off] / epochs[off]:.0f}x; MLflow on / off: {fixed[on] / fixed[off]:.2f}x)")
    print("components: median own time per trial; % of the median fixed cost (medians need not add up)")
    print(f"\n{'rank':>4} {'component (own time)':<86} {'on ms':>7} {'%fixed':>7} {'off ms':>7} {'%fixed':>7}")
    ranked = sorted((c for g, c in COMPONENTS if g != EPOCHS), key=lambda c: -med[on][c])
    for rank, component in enumerate(ranked, start=1):
        a, b = med[on][component], med[off][component]
        print(f"{rank:>4} {GROUPS[GROUP_OF[component]] + ': ' + component:<86} {1000 * a:>7.1f} "
              f"{100 * a / fixed[on]:>6.1f}% {1000 * b:>7.1f} {100 * b / fixed[off]:>6.1f}%")
    for _, component in COMPONENTS[:2]:
        print(f"{'':>4} {'(inside epochs) ' + component:<86} {1000 * med[on][component]:>7.1f} {'':>7} "
              f"{1000 * med[off][component]:>7.1f}")
    print(f"{'':>4} groups (median of each trial's group sum):")
    for group, name in GROUPS.items():
        a = statistics.median(r["groups"][group] for r in trials[on])
        b = statistics.median(r["groups"][group] for r in trials[off])
        share_on = "" if group == EPOCHS else f"{100 * a / fixed[on]:>6.1f}%"
        share_off = "" if group == EPOCHS else f"{100 * b / fixed[off]:>6.1f}%"
        print(f"{'':>4} {'  ' + name:<86} {1000 * a:>7.1f} {share_on:>7} {1000 * b:>7.1f} {share_off:>7}")

    n_trials = sum(len(rows) for _, rows, _, _ in results[on])
    calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for _, _, search_calls, _ in results[on]:
        for what, (count, seconds) in search_calls.items():
            calls[what][0] += count
            calls[what][1] += seconds
    print(f"\nMLflow API calls (MLflow on; the whole searches, the parent run's included; per trial = total / {n_trials})")
    print(f"{'call':<22} {'per trial':>10} {'ms per trial':>13} {'ms per call':>12}")
    for what, (count, seconds) in sorted(calls.items(), key=lambda kv: -kv[1][1]):
        print(f"{what:<22} {count / n_trials:>10.1f} {1000 * seconds / n_trials:>13.1f} {1000 * seconds / count:>12.1f}")
    sizes = {what: statistics.median(v) for _, _, _, b in results[on] for what, v in b.items()}
    print("bytes per write (median): " + ", ".join(f"{what} {size / 1e6:.1f} MB" for what, size in sizes.items()))
    print(f"(load average before {before['loadavg_1_5_15']}, after {after['loadavg_1_5_15']})")

    record("trial_cost", "head-grid trial, MLflow on: wall per trial", totals[on], "s (median)")
    record("trial_cost", "head-grid trial, MLflow on: fixed cost per trial", fixed[on], "s (median)",
           fixed[on] / epochs[on], "its epochs")
    record("trial_cost", "head-grid trial, MLflow off: fixed cost per trial", fixed[off], "s (median)",
           fixed[off] / epochs[off], "its epochs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine_before": before, "machine_after": after, "args": {k: str(v) for k, v in vars(args).items()},
        "data": data_kind, "component_medians_s": med, "totals_s": totals, "fixed_s": fixed, "epochs_s": epochs,
        "searches": {label: [{"wall": wall, "trials": rows, "mlflow_calls": c, "bytes": b} for wall, rows, c, b in runs]
                     for label, runs in results.items()}}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
