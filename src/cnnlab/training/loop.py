"""The training loop: `fit` → `train_one_epoch` / `evaluate`, each readable top to bottom.

Resumable at any step: `TrainState` says which epoch and batch training stands at,
and `on_step` (called after every optimiser step) lets the caller checkpoint every N
steps or stop cleanly when a signal asked it to.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .callbacks import EarlyStopper
from .checkpoint import TrainState
from .optim import LRSchedule, l2_penalty, l2_weights
from .progress import ProgressLogger
from .runtime import Runtime, inference_chunk


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(RuntimeError):
    """A signal asked training to stop; a checkpoint was written at the step boundary."""


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int | None = None
    stopped_early: bool = False
    seconds: float = 0.0


def _diverged(what: str, value: float, step: int) -> TrainingDiverged:
    return TrainingDiverged(
        f"{what} is {value} at step {step}. The learning rate is probably too high for this model and data: "
        "lower optim.lr (e.g. by 10×), add a warm-up (schedule.warmup_epochs=1), or clip gradients "
        "(optim.clip_grad_norm=1.0)", step)


def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, runtime: Runtime, mix: Callable | None = None,
               class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0):
    """One training batch's forward: (logits, loss, the mixed-in labels, λ) — with MixUp / CutMix the loss is
    λ·CE(y) + (1 − λ)·CE(partner); without, the partner labels are y and λ is 1."""
    y2, lam = y, 1.0
    if mix is not None:
        x, y2, lam = mix(x, y)
    with runtime.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=class_weights, label_smoothing=label_smoothing)
        if lam < 1.0:
            loss = lam * loss + (1 - lam) * F.cross_entropy(logits.float(), y2, weight=class_weights,
                                                            label_smoothing=label_smoothing)
    return logits, loss, y2, lam


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, schedule: LRSchedule,
                    runtime: Runtime, *, l2: float = 0.0, clip_grad_norm: float | None = None,
                    progress: ProgressLogger | None = None, state: TrainState | None = None,
                    on_step: Callable[[TrainState], None] | None = None,
                    class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0,
                    mix: Callable | None = None, dist=None) -> dict:
    """One pass over `loader` (or the rest of it, when `state` says the epoch is under way).

    Returns the epoch's mean training loss and accuracy. The loss reported is the
    cross-entropy (as Keras prints it, on augmented batches in training mode); the
    L2 term, when on, is added to what is minimised and reported as `l2_penalty`.
    class_weights (K,) weights each class's loss (the reported loss is then that weighted mean).
    mix: (x, y) → (x mixed with a shuffled partner, the partner's labels, λ) — MixUp / CutMix; the loss is
    then λ·CE(y) + (1 − λ)·CE(partner), and a prediction counts as right on the larger share's label.
    Divergence (a non-finite loss or gradient norm) raises at the step it happens.
    dist: one process of several (training.distributed): `model` is the DDP module, `loader` this rank's
    ShardedLoader; the loss is scaled so the averaged gradient is the global batch's, and divergence is judged
    on the synchronised gradient (the same on every rank), so all processes stop together.
    """
    state = state or TrainState()
    model.train()
    inner = getattr(model, "module", model)  # under DDP: the wrapped model
    if getattr(inner, "frozen_backbone", False):
        inner.backbone.eval()  # keep frozen batch-norm statistics frozen
    weights = l2_weights(model) if l2 > 0 else []
    params = [p for p in model.parameters() if p.requires_grad]
    precision = runtime.precision
    if dist is not None:
        from .distributed import loss_scale

        loader.epoch = state.epoch  # the per-step seeds of augmentation and dropout count from it
    if state.step_in_epoch == 0:  # a fresh epoch: new order, zeroed sums
        state.order = loader.new_order()
        state.acc = {"loss_sum": torch.zeros((), device=runtime.device),
                     "correct": torch.zeros((), device=runtime.device, dtype=torch.int64), "seen": 0,
                     "penalty": 0.0}
    acc, steps = state.acc, len(loader)
    for x, y in loader.iterate(state.order, state.step_in_epoch):
        step = state.epoch * steps + state.step_in_epoch + 1  # global, 1-based
        logits, loss, y2, lam = batch_loss(model, x, y, runtime, mix, class_weights, label_smoothing)
        scaled = loss if dist is None else loss * loss_scale(dist, y, loader, class_weights)
        objective = scaled + l2_penalty(weights, l2) if weights else scaled
        sync = runtime.device.type == "cpu" or step % 50 == 0  # a sync per step is free on the CPU only
        if sync and dist is None and not math.isfinite(loss.item()):
            raise _diverged("the training loss", loss.item(), step)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(objective)
        precision.unscale_(optimizer)
        # the total gradient norm (clipped when asked); a non-finite one stops training before the update,
        # unless the precision's loss scaler owns overflows (it skips that step). Without clipping the norm is
        # computed only on the steps that check it: no extra pass on the others.
        check = (sync or dist is not None) and not precision.skips_overflow
        if clip_grad_norm is not None:
            norm = nn.utils.clip_grad_norm_(params, clip_grad_norm)
        elif check:
            norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if check and not math.isfinite(norm.item()):
            raise _diverged("the gradient norm", norm.item(), step)
        precision.step(optimizer)
        schedule.step()
        acc["loss_sum"] += loss.detach() * len(y)
        acc["correct"] += (logits.argmax(1) == (y if lam >= 0.5 else y2)).sum()
        acc["seen"] += len(y)
        if weights:
            acc["penalty"] = float(objective - loss)
        state.step_in_epoch += 1
        if progress is not None:
            progress.batch_end(state.step_in_epoch, loss)
        if on_step is not None and state.step_in_epoch < steps:
            on_step(state)  # may checkpoint, or raise TrainingInterrupted after checkpointing
    loss_sum, correct, seen = acc["loss_sum"], acc["correct"], acc["seen"]
    if dist is not None:  # the epoch's figures over every process's share
        total = dist.sum(torch.stack([loss_sum.float(), correct.float(),
                                      torch.tensor(float(seen), device=loss_sum.device)]))
        loss_sum, correct, seen = total[0], total[1], int(total[2].item())
    stats = {"loss": (loss_sum / max(1, seen)).item(), "accuracy": correct.item() / max(1, seen)}
    if weights:
        stats["l2_penalty"] = acc["penalty"]
    return stats


@torch.no_grad()
def predict_logits(model: nn.Module, loader, runtime: Runtime, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32 (N, classes), labels (N,)) on the CPU, in the loader's order.

    tta: test-time augmentation by flipping: the log of the mean of the image's and its mirror's softmax
    (valid logits: their softmax is that mean)."""
    model.eval()
    outs, ys = [], []
    for xb, y in loader:
        for x in xb.split(inference_chunk(model, xb, runtime)):  # big images: passes under glibc's mmap limit
            with runtime.autocast():
                out = model(x).float()
                if tta:
                    out = torch.log((out.softmax(1) + model(x.flip(3)).float().softmax(1)) / 2)
            outs.append(out.cpu())
        ys.append(y.cpu())
    return torch.cat(outs), torch.cat(ys)


def evaluate(model: nn.Module, loader, runtime: Runtime, prefix: str = "val_",
             class_weights: torch.Tensor | None = None, tta: bool = False, dist=None) -> dict:
    """Mean cross-entropy (weighted per class if `class_weights`) and accuracy of `model` on `loader`
    (eval mode, no gradients).

    dist: one process of several (training.distributed): each rank predicts its own block of the loader's
    batches and the predictions are gathered, so every rank gets the figures of the whole split."""
    if dist is None or dist.world == 1:
        logits, y = predict_logits(model, loader, runtime, tta)
    else:
        from .distributed import EvalShard

        shard = EvalShard(loader, dist)
        parts = [p for p in dist.gather(predict_logits(model, shard, runtime, tta) if len(shard) else None) if p]
        logits, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    w = class_weights.cpu() if class_weights is not None else None
    return {prefix + "loss": F.cross_entropy(logits, y, weight=w).item(),
            prefix + "accuracy": (logits.argmax(1) == y).float().mean().item()}


def fit(model: nn.Module, data, optimizer: torch.optim.Optimizer, schedule: LRSchedule, runtime: Runtime, *,
        epochs: int, stopper: EarlyStopper, l2: float = 0.0, clip_grad_norm: float | None = None,
        progress: ProgressLogger | None = None, state: TrainState | None = None,
        on_step: Callable[[TrainState], None] | None = None,
        on_epoch: Callable[[TrainState], None] | None = None,
        class_weights: torch.Tensor | None = None, val_class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0, mix: Callable | None = None, tta: bool = False,
        before_epoch: Callable[[int], None] | None = None, dist=None, trainer: nn.Module | None = None) -> FitResult:
    """Train for up to `epochs` (continuing from `state` if given); leave `model` holding the best
    epoch's weights.

    The best epoch is the one where `stopper.monitor` was best (val_* needs a validation
    split; without one it falls back to the training metric). on_epoch is called after
    every epoch (the caller checkpoints there), on_step after every other step; before_epoch(epoch)
    before each (1-based; gradual unfreezing uses it, so a resumed run unfreezes at the same epoch).
    dist / trainer: one process of several — `trainer` is the DDP module that trains `model`, whose batch-norm
    statistics are averaged over the processes after each epoch, before it is evaluated.
    """
    monitor = stopper.monitor if data.val is not None else stopper.monitor.replace("val_", "")
    state = state or TrainState()
    while state.epoch < epochs and not state.stopped_early:
        t0, epoch = time.perf_counter(), state.epoch + 1
        lr = schedule.lr_at(schedule.step_count - state.step_in_epoch)  # the rate the epoch started with
        if progress:
            progress.epoch_start(epoch, epochs, len(data.train), done=state.step_in_epoch)
        row = {"epoch": epoch}
        if before_epoch is not None:
            before_epoch(epoch)
        row.update(train_one_epoch(trainer or model, data.train, optimizer, schedule, runtime, l2=l2,
                                   clip_grad_norm=clip_grad_norm, progress=progress, state=state, on_step=on_step,
                                   class_weights=class_weights, label_smoothing=label_smoothing, mix=mix,
                                   dist=dist))
        if dist is not None:
            dist.average_buffers(model)
        if data.val is not None:
            row.update(evaluate(model, data.val, runtime, class_weights=val_class_weights, tta=tta, dist=dist))
        row.update(lr=lr, seconds=round(time.perf_counter() - t0, 3))
        state.history.append(row)
        state.epoch, state.step_in_epoch, state.order = epoch, 0, None
        state.seconds += time.perf_counter() - t0
        if stopper.update(epoch, row[monitor]):
            state.best_state, state.best_epoch = copy.deepcopy(model.state_dict()), epoch
        schedule.epoch_end(row[monitor], stopper.mode)
        state.stopped_early = stopper.should_stop
        state.finished = state.stopped_early or epoch >= epochs
        if progress:
            progress.epoch_end(row, is_best=state.best_epoch == epoch)
        if on_epoch is not None:
            on_epoch(state)
        if state.stopped_early and progress:
            progress.message(f"Early stopping: no {monitor} improvement > {stopper.min_delta:g} for "
                             f"{stopper.patience} epochs; restoring epoch {state.best_epoch}.")
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    return FitResult(state.history, state.best_epoch, state.stopped_early, round(state.seconds, 3))
