"""The training loop: `fit` → `train_one_epoch` / `evaluate`, each readable top to bottom."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .callbacks import EarlyStopper
from .optim import LRSchedule, l2_penalty, l2_weights
from .progress import ProgressLogger
from .runtime import Runtime


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int | None = None
    stopped_early: bool = False
    seconds: float = 0.0


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, schedule: LRSchedule,
                    runtime: Runtime, *, l2: float = 0.0, clip_grad_norm: float | None = None,
                    progress: ProgressLogger | None = None, first_step: int = 0) -> dict:
    """One pass over `loader`; returns the epoch's mean training loss and accuracy.

    The loss reported is the cross-entropy (as Keras prints it, on augmented batches
    in training mode); the L2 term, when on, is added to what is minimised and
    reported separately as `l2_penalty`.
    """
    model.train()
    if getattr(model, "frozen_backbone", False):
        model.backbone.eval()  # keep frozen batch-norm statistics frozen
    weights = l2_weights(model) if l2 > 0 else []
    scaler = runtime.grad_scaler()
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.int64)
    seen, penalty = 0, torch.zeros(())
    for i, (x, y) in enumerate(loader):
        with runtime.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        objective = loss + l2_penalty(weights, l2) if weights else loss
        if runtime.device.type == "cpu" or i % 50 == 0:  # a sync per step is free on the CPU only
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(
                    f"loss is {loss.item()} at step {first_step + i + 1} (epoch step {i + 1}); "
                    "the learning rate is probably too high: lower optim.lr or set optim.clip_grad_norm")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(objective).backward()
            scaler.unscale_(optimizer)
        else:
            objective.backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        schedule.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if weights:
            penalty = (objective - loss).detach()
        if progress is not None:
            progress.batch_end(i + 1, loss)
    stats = {"loss": (loss_sum / max(1, seen)).item(), "accuracy": correct.item() / max(1, seen)}
    if weights:
        stats["l2_penalty"] = float(penalty)
    return stats


@torch.no_grad()
def predict_logits(model: nn.Module, loader, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32 (N, classes), labels (N,)) on the CPU, in the loader's order."""
    model.eval()
    outs, ys = [], []
    for x, y in loader:
        with runtime.autocast():
            outs.append(model(x).float().cpu())
        ys.append(y.cpu())
    return torch.cat(outs), torch.cat(ys)


def evaluate(model: nn.Module, loader, runtime: Runtime, prefix: str = "val_") -> dict:
    """Mean cross-entropy and accuracy of `model` on `loader` (eval mode, no gradients)."""
    logits, y = predict_logits(model, loader, runtime)
    return {prefix + "loss": F.cross_entropy(logits, y).item(),
            prefix + "accuracy": (logits.argmax(1) == y).float().mean().item()}


def fit(model: nn.Module, data, optimizer: torch.optim.Optimizer, schedule: LRSchedule, runtime: Runtime, *,
        epochs: int, stopper: EarlyStopper, l2: float = 0.0, clip_grad_norm: float | None = None,
        progress: ProgressLogger | None = None) -> FitResult:
    """Train for up to `epochs`; leave `model` holding the best epoch's weights.

    The best epoch is the one where `stopper.monitor` was best (val_* needs a
    validation split; without one it falls back to the training metric).
    """
    monitor = stopper.monitor if data.val is not None else stopper.monitor.replace("val_", "")
    result, best_state, start = FitResult(), None, time.perf_counter()
    for epoch in range(1, epochs + 1):
        t0, lr = time.perf_counter(), schedule.lr
        if progress:
            progress.epoch_start(epoch, epochs, len(data.train))
        row = {"epoch": epoch}
        row.update(train_one_epoch(model, data.train, optimizer, schedule, runtime, l2=l2,
                                   clip_grad_norm=clip_grad_norm, progress=progress,
                                   first_step=(epoch - 1) * len(data.train)))
        if data.val is not None:
            row.update(evaluate(model, data.val, runtime))
        row.update(lr=lr, seconds=round(time.perf_counter() - t0, 3))
        result.history.append(row)
        if stopper.update(epoch, row[monitor]):
            best_state = copy.deepcopy(model.state_dict())
            result.best_epoch = epoch
        schedule.epoch_end(row[monitor], stopper.mode)
        if progress:
            progress.epoch_end(row, is_best=result.best_epoch == epoch)
        if stopper.should_stop:
            result.stopped_early = True
            if progress:
                progress.message(f"Early stopping: no {monitor} improvement > {stopper.min_delta:g} for "
                                 f"{stopper.patience} epochs; restoring epoch {result.best_epoch}.")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = round(time.perf_counter() - start, 3)
    return result
