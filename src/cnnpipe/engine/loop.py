"""The training loop: one run of one ``RunConfig`` on one device.

Design (after Keller Jordan's airbench): each split is one uint8 tensor (on
the CPU the memory-mapped split itself, on CUDA a copy on the GPU when it
fits); an epoch is a seeded ``torch.randperm``; a batch is an index
into it, augmented and normalized with a handful of batched tensor ops. No
DataLoader, no worker processes, no per-image Python. The same code runs on
CPU (tests, laptops) and CUDA (bf16 autocast, channels_last, cuDNN
autotuning).

Reproducibility: weights are initialised from ``cfg.values.seed`` (inside
``torch.random.fork_rng``, so the caller's global RNG is untouched), and
shuffling and augmentation draw from one CPU ``torch.Generator`` seeded from
it. On the CPU the same config twice gives bitwise-identical metrics, and an
interrupted run resumed from its ``resume_dir`` ends exactly like an
uninterrupted one.

Errors: a non-finite training or validation loss is not an exception but a
result (status 'diverged', with epoch and batch in ``stop_reason``): a grid
with one too-large learning rate must go on. Everything else raises: a bug
should be seen, not recorded as a metric. ``KeyboardInterrupt`` propagates
after the last finished epoch's resume state was saved.

The loop's parts with a job of their own live beside it: validation scores
through ``engine.inference.evaluate_logits`` (the evaluate stage's path too),
the forward passes run under ``engine.precision.autocast``, the per-layer
norms come from ``engine.layer_stats`` and the per-epoch state is assembled
and saved by ``engine.resume``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cnnpipe.compute.device import configure_backend, is_cuda, resolve_device, thread_limit
from cnnpipe.data.resident_pages import ResidentCap
from cnnpipe.engine.augment import augment, norm_constants, normalize
from cnnpipe.engine.data import TrainData, gather, on_device
from cnnpipe.engine.early_stopping import EarlyStopping, load_partial
from cnnpipe.engine.ema import make_ema
from cnnpipe.engine.finetune import fixed_keys, param_groups, set_phase
from cnnpipe.engine.inference import evaluate_logits, has_conv
from cnnpipe.engine.layer_stats import LayerStats
from cnnpipe.engine.metrics import topk_accuracy
from cnnpipe.engine.optim import build_optimizer, build_scheduler, current_lr
from cnnpipe.engine.precision import autocast
from cnnpipe.engine.progress import progress_every, progress_line
from cnnpipe.engine.records import EpochRecord, RunResult
from cnnpipe.engine.resume import (FixedTensors, load_resume_state, match_layouts, run_state, save_run_state,
                                  state_identity)
from cnnpipe.models.build import build_model
from cnnpipe.models.pinned_weights import WEIGHTS_DIR
from cnnpipe.models.torchvision_spec import run_normalization
from cnnpipe.params.run_config import RunConfig
from cnnpipe.params.values import resolve_augment
from cnnpipe.util.env import progress_bars
from cnnpipe.util.errors import CheckpointError, CnnpipeError

OnEpoch = Callable[[EpochRecord, nn.Module], None]


class BodyFeatures(Protocol):
    """A frozen body's outputs on the train and val splits (``train``, ``val`` tensors)."""

    train: torch.Tensor
    val: torch.Tensor


class FeatureSource(Protocol):
    """Where a head-only run gets its frozen body's outputs (``store.features.FeatureCache``: computed once, kept).

    Handed to ``train_run`` by the caller that decided the run qualifies
    (``store.features.applies``): the engine never imports the store above it.
    """

    def get_or_compute(self, cfg: RunConfig, data: TrainData, model: nn.Module, mean: Any, std: Any,
                       device: str) -> BodyFeatures: ...


# --------------------------------------------------------------------------- helpers


def use_channels_last(model: nn.Module, device: str) -> bool:
    """channels_last (NHWC) for every conv net, on CUDA and on the CPU.

    On a CPU (oneDNN) NHWC trained faster than NCHW for the BatchNorm VGG
    preset and even for the 6/12-channel tutorial net (figures in
    benchmarks/README.md).
    """
    del device  # same answer on both: kept in the signature for when they differ
    return has_conv(model)


# --------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def _head_logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Float32 CPU logits of a torchvision net's head on its body's cached outputs (eval mode, model untouched)."""
    head = model.head
    was_training = head.training
    head.eval()
    try:
        return head(features).float().cpu()
    finally:
        head.train(was_training)


def _val_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """Validation loss, top-1 and top-5 (top-k for fewer than 5 classes); an empty split's loss is NaN, not an error."""
    if labels.numel() == 0:
        return math.nan, 0.0, 0.0
    loss = float(F.cross_entropy(logits, labels))
    ks = (1, min(5, logits.shape[1]))
    acc = topk_accuracy(logits, labels, ks)
    return loss, acc[1], acc[ks[1]]


# --------------------------------------------------------------------------- training


def _batch_plan(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) per batch; a final batch of one image is dropped (BatchNorm cannot train on it)."""
    plan = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(plan) > 1 and plan[-1][1] - plan[-1][0] == 1:
        plan.pop()
    return plan


def train_run(
    cfg: RunConfig,
    data: TrainData,
    *,
    device: str = "cpu",
    num_threads: int | None = None,
    on_epoch: OnEpoch | None = None,
    resume_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    layer_stats: bool = False,
    stop_after: int | None = None,
    features: FeatureSource | None = None,
) -> RunResult:
    """Train one run and return its history and best model (see the module docstring).

    ``device``: 'cpu', 'cuda', 'cuda:N' or 'auto'. ``num_threads`` caps torch's
    CPU threads for this call (restored after). ``on_epoch(record, model)`` is
    called after every epoch with the live model (in train mode, on the device).
    ``resume_dir``: a folder for this run's per-epoch resume state; a state for
    the same ``run_id`` and data found there is continued from. ``progress``:
    a tqdm bar per epoch when stderr is a terminal; without a bar (not a
    terminal, or a grid worker) an epoch running longer than
    ``CNNPIPE_PROGRESS_EVERY`` seconds (default 30) prints a flushed line
    that often (batches done, images/s, ETA). ``layer_stats``: per-module
    weight/gradient norms in each ``EpochRecord``. ``stop_after``: train at
    most up to this epoch (a successive-halving rung); a run that is not done
    by then returns status 'paused' and continues from ``resume_dir`` later,
    exactly as if it had never stopped (the schedule is defined over
    ``epochs``, not over the budget). ``features``: train the head on the
    frozen body's outputs from this source instead of running the body each
    batch (only for a run whose body never trains: ``store.features.applies``).
    """
    dev = resolve_device(device)
    configure_backend(dev)
    fork_devices = [torch.device(dev).index or 0] if is_cuda(dev) else []
    with thread_limit(num_threads), torch.random.fork_rng(devices=fork_devices):
        return _train(cfg, data, dev, on_epoch, resume_dir, progress, layer_stats, stop_after, features)


@dataclass
class _Epoch:
    """Result of one pass over the training split."""

    loss: float
    top1: float
    lr: float
    seconds: float
    images: int
    diverged: str | None


def _train_epoch(*, epoch: int, cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, generator: torch.Generator, train_x: torch.Tensor, train_y: torch.Tensor,
                 plan: list[tuple[int, int]], scale: torch.Tensor, shift: torch.Tensor, channels_last: bool,
                 dev: str, stats: LayerStats | None, show: bool, every: float | None = None,
                 on_features: bool = False) -> _Epoch:
    """One pass over the training split (``on_features``: ``train_x`` holds the frozen body's cached outputs)."""
    v = cfg.values
    aug_mode = resolve_augment(v.augment, cfg.dataset)
    start = time.perf_counter()
    model.train()
    set_phase(model, v, epoch)  # a torchvision body frozen or not in this epoch (engine.finetune)
    n = int(train_y.shape[0])
    if v.shuffle:
        order = torch.randperm(n, generator=generator).to(dev, non_blocking=True)
    else:
        order = torch.arange(n, device=dev)
    losses = torch.zeros(len(plan), device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    on_cpu = not is_cuda(dev)
    check_every = 32  # on a GPU, look for a non-finite loss every 32 steps: a host sync per step would stall it
    checked = 0
    step_lr = current_lr(optimizer)
    seen = 0
    bar = None
    next_line = start + every if every is not None and not show else math.inf
    pages = ResidentCap(train_x)  # a large mapped split: keep a budget of its pages mapped, not all
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc=f"{cfg.name} epoch {epoch}/{v.epochs}", leave=False, unit="batch", dynamic_ncols=True)
    try:
        for b, (lo, hi) in enumerate(plan):
            idx = order[lo:hi]
            x = gather(train_x, idx, dev)
            pages.read(hi - lo)
            y = train_y[idx]
            if on_features:
                with autocast(dev):
                    logits = model.head(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=v.label_smoothing)
            else:
                if aug_mode != "none":
                    x = augment(x, aug_mode, generator)
                x = normalize(x, scale, shift)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(dev):
                    logits = model(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=v.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if stats is not None:
                stats.after_backward()
            step_lr = current_lr(optimizer)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses[b] = loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += hi - lo
            if on_cpu:  # the value is there already: one cheap read, no extra kernels
                value = loss.item()
                if not math.isfinite(value):
                    reason = f"diverged: loss is {'nan' if math.isnan(value) else 'inf'} at epoch {epoch} batch {b + 1}"
                    return _Epoch(math.nan, 0.0, step_lr, time.perf_counter() - start, seen, reason)
            elif (b + 1) % check_every == 0 or b + 1 == len(plan):
                bad = ~torch.isfinite(losses[checked:b + 1])
                if bool(bad.any()):
                    first = checked + int(bad.nonzero()[0, 0])
                    what = "nan" if math.isnan(float(losses[first])) else "inf"
                    reason = f"diverged: loss is {what} at epoch {epoch} batch {first + 1}"
                    return _Epoch(math.nan, 0.0, step_lr, time.perf_counter() - start, seen, reason)
                checked = b + 1
            if time.perf_counter() >= next_line:  # one clock read a batch: no lines for short epochs
                now = time.perf_counter()
                print(progress_line(cfg.name, epoch, v.epochs, b + 1, len(plan), seen, now - start),
                      file=sys.stderr, flush=True)
                next_line = now + (every or math.inf)
            if bar is not None:
                bar.update(1)
                if b % 25 == 0:
                    bar.set_postfix(loss=f"{float(losses[:b + 1].mean()):.4f}")
    finally:
        if bar is not None:
            bar.close()
    mean_loss = float(losses.mean())
    top1 = float(correct) / max(1, seen)
    return _Epoch(mean_loss, top1, step_lr, time.perf_counter() - start, seen, None)


def _cpu_model(model: nn.Module) -> nn.Module:
    """The returned model: CPU, standard (contiguous) layout, eval mode."""
    model = model.to("cpu").to(memory_format=torch.contiguous_format)
    return model.eval()


def _train(cfg: RunConfig, data: TrainData, dev: str, on_epoch: OnEpoch | None,
           resume_dir: str | os.PathLike[str] | None, progress: bool, want_stats: bool,
           stop_after: int | None, features_from: FeatureSource | None) -> RunResult:
    v = cfg.values
    started = time.perf_counter()
    torch.manual_seed(v.seed)
    model = build_model(list(cfg.layers), data.image_shape, data.num_classes, where=f"model {v.model}",
                        weights_dir=cfg.weights_dir or WEIGHTS_DIR).to(dev)
    channels_last = use_channels_last(model, dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    train_x = on_device(data.train.images, dev)  # on the CPU: the mapped split itself, no copy
    train_y = data.train.labels.to(dev, non_blocking=True)
    val_x = on_device(data.val.images, dev)
    n = int(train_y.shape[0])
    if n == 0 or len(data.val) == 0:
        which = "training" if n == 0 else "validation"
        raise CnnpipeError(f"the {which} split is empty, so nothing can be trained or selected; re-run the prepare stage (check data.val_fraction)")
    plan = _batch_plan(n, v.batch_size)
    mean, std = run_normalization(cfg.layers, data.mean, data.std)  # a pretrained net's own, else the data's
    scale, shift = norm_constants(mean, std, dev)
    on_features = features_from is not None  # a linear probe on a frozen body: train the head on its cached outputs
    if features_from is not None:
        features = features_from.get_or_compute(cfg, data, model, mean, std, dev)
        train_x, val_x = features.train.to(dev), features.val.to(dev)

    optimizer = build_optimizer(model, v, param_groups(model, v))
    scheduler = build_scheduler(optimizer, v, v.epochs * len(plan))
    generator = torch.Generator().manual_seed(v.seed)
    stats = LayerStats(model, dev) if want_stats else None
    ema = make_ema(model, optimizer, v.ema)  # validate, early-stop and keep the averaged weights when on
    scored = ema.module if ema is not None else model
    # A body frozen for the whole run stays as built: states and best-weight copies leave it out (engine.resume).
    # The EMA copy's body is averaged in place (not provably the built one): its best weights are copied whole.
    frozen = fixed_keys(model, v)
    stopper = EarlyStopping(v.monitor, v.patience, v.min_delta, fixed=frozen if ema is None else frozenset())
    history: list[EpochRecord] = []
    prior_seconds = 0.0
    train_images = 0
    train_seconds = 0.0
    stop_reason: str | None = None
    status = "finished"

    state = load_resume_state(resume_dir, state_identity(cfg), data.fingerprint) if resume_dir is not None else None
    if state is not None:
        if state["model"] is not None:
            try:  # a frozen body's tensors are not in it: they stay as built (the pinned weights)
                load_partial(model, state["model"], frozen, "the run state's weights")
            except ValueError as err:
                raise CheckpointError(f"{resume_dir}: {err}; delete that folder to start the run afresh") from None
            optimizer.load_state_dict(state["optimizer"])
            match_layouts(optimizer)
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if is_cuda(dev) and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device=torch.device(dev))
        stopper.load_state_dict(state["early"], dev)
        if stopper.best_state is not None:
            missing = [k for k in model.state_dict() if k not in stopper.best_state and k not in stopper.fixed]
            if missing:
                raise CheckpointError(f"{resume_dir}: the run state's best weights lack {', '.join(missing[:3])}; "
                                      "delete that folder to start the run afresh")
        history = [EpochRecord.from_dict(r) for r in state["history"]]
        prior_seconds = float(state["seconds"])
        train_images = int(state["train_images"])
        train_seconds = float(state["train_seconds"])
        stop_reason = state["stop_reason"]
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if state.get("status") == "diverged":
            status = "diverged"
        elif stop_reason is None and stopper.should_stop and len(history) < v.epochs:
            stop_reason = "early_stopping"  # saved at the old last epoch; a longer run would have stopped there

    fixed = FixedTensors(model, frozen)  # from here on, none of them may change (checked at every save)
    resumed_at = len(history)

    def save(epoch: int, diverged_model: bool = False) -> None:
        if resume_dir is not None:
            save_run_state(resume_dir, run_state(cfg, data, epoch, model, optimizer, scheduler, generator, dev, stopper,
                                                 history, prior_seconds + time.perf_counter() - started, train_images,
                                                 train_seconds, stop_reason, status, ema, diverged_model=diverged_model,
                                                 fixed=fixed))

    show = progress_bars(progress)
    every = progress_every()
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    last = v.epochs if stop_after is None else max(0, min(v.epochs, stop_after))
    for epoch in range(len(history) + 1, last + 1):
        if stop_reason is not None:
            break
        try:
            ep = _train_epoch(epoch=epoch, cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler,
                              generator=generator, train_x=train_x, train_y=train_y, plan=plan, scale=scale,
                              shift=shift, channels_last=channels_last, dev=dev, stats=stats, show=show,
                              every=every, on_features=on_features)
        except Exception as err:
            if oom is not None and isinstance(err, oom):
                raise CnnpipeError(f"out of GPU memory training {cfg.name} (batch_size {v.batch_size}, model {v.model}); lower batch_size or use a smaller model") from None
            raise
        train_images += ep.images
        train_seconds += ep.seconds
        if ep.diverged:
            status, stop_reason = "diverged", ep.diverged
            save(epoch - 1, diverged_model=True)
            break
        eval_start = time.perf_counter()
        if on_features:
            logits = _head_logits(scored, val_x)
        else:
            logits = evaluate_logits(scored, val_x, mean=mean, std=std, batch_size=max(v.batch_size, 1000), device=dev)
        val_loss, val_top1, val_top5 = _val_metrics(logits, data.val.labels)
        if not math.isfinite(val_loss):
            status = "diverged"
            stop_reason = f"diverged: validation loss is {'nan' if math.isnan(val_loss) else 'inf'} at epoch {epoch}"
            save(epoch - 1, diverged_model=True)
            break
        record = EpochRecord(
            epoch=epoch, train_loss=ep.loss, train_top1=ep.top1, val_loss=val_loss, val_top1=val_top1,
            val_top5=val_top5, lr=ep.lr, epoch_seconds=ep.seconds + time.perf_counter() - eval_start,
            images_per_s=ep.images / ep.seconds if ep.seconds > 0 else 0.0,
            layer_stats=stats.collect() if stats is not None else {},
        )
        history.append(record)
        stopper.update(val_loss if v.monitor == "val_loss" else val_top1, epoch, scored)
        if stopper.should_stop and epoch < v.epochs:
            stop_reason = "early_stopping"
        save(epoch)
        if on_epoch is not None:
            on_epoch(record, model)

    if status == "finished" and stop_reason is None:
        if len(history) < v.epochs:  # the budget ran out first: continue from resume_dir later
            status, stop_reason = "paused", f"paused after epoch {len(history)} of {v.epochs}"
        else:
            stop_reason = "max_epochs"
    if status != "diverged":  # the best weights leave the frozen body out: it must be the one they were taken with
        fixed.check(model, trained=len(history) > resumed_at)
    stopper.restore(model)
    best = next((r for r in history if r.epoch == stopper.best_epoch), None)
    return RunResult(
        run_id=cfg.run_id,
        status=status,
        stop_reason=stop_reason or "max_epochs",
        best_epoch=stopper.best_epoch,
        best=best,
        history=history,
        epochs_run=len(history),
        seconds=prior_seconds + time.perf_counter() - started,
        images_per_s=train_images / train_seconds if train_seconds > 0 else 0.0,
        model=_cpu_model(model) if stopper.best_state is not None else None,
        device=dev,
    )
