"""Optimisers, learning-rate schedules and the papers' explicit L2 loss term."""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ["sgd", "adam", "adamw", "rmsprop"]


def build_optimizer(params, name: str, lr: float, *, momentum: float = 0.9, nesterov: bool = False,
                    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-7,
                    weight_decay: float = 0.0, fused: bool = False) -> torch.optim.Optimizer:
    """sgd (momentum, nesterov) | adam | adamw | rmsprop, over the trainable `params`.

    weight_decay is the optimiser's own decay (decoupled for adamw). It is not the
    papers' L2 term λ/2·Σ‖W‖², which `l2_penalty` adds to the loss instead.
    fused: torch's fused step for sgd, adam and adamw (the same update in one kernel; rmsprop has none).
    """
    params = [p for p in params if p.requires_grad]
    kw = {"fused": True} if fused and params and all(p.is_floating_point() for p in params) else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay, **kw)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, **kw)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, **kw)
    if name == "rmsprop":
        # Keras' RMSprop defaults: rho 0.9, no momentum unless asked; momentum here is opt-in via sgd-style key
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=eps, momentum=0.0, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def l2_weights(model: nn.Module) -> list[torch.Tensor]:
    """Conv and dense weight matrices (not biases, not batch-norm scales): what λ/2·Σ‖W‖² covers."""
    return [m.weight for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.requires_grad]


def l2_penalty(weights: list[torch.Tensor], lam: float) -> torch.Tensor:
    """λ/2 · Σ‖W‖² (the papers' eq. 14), to be added to the cross-entropy."""
    return 0.5 * lam * torch.stack([w.pow(2).sum() for w in weights]).sum()


class LRSchedule:
    """Learning rate as a pure function of progress, stepped once per batch.

    Written by hand rather than chaining torch's schedulers because every schedule
    here is one formula of (step, epoch), so resuming needs only the step count,
    and warm-up composes with any of them. `plateau` is the exception: it reacts
    to the monitored metric at each epoch end.

    names: constant | step | exponential | cosine | cyclic | one-cycle | plateau.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, base_lr: float, steps_per_epoch: int,
                 epochs: int, *, warmup_epochs: float = 0.0, step_size: float = 10.0, gamma: float = 0.1,
                 min_lr: float = 0.0, cycle_epochs: float = 4.0, pct_start: float = 0.3, patience: int = 3):
        self.opt, self.name, self.base_lr = optimizer, name, base_lr
        self.steps_per_epoch, self.epochs = max(1, steps_per_epoch), epochs
        self.warmup, self.step_size, self.gamma = warmup_epochs, step_size, gamma
        self.min_lr, self.cycle, self.pct_start, self.patience = min_lr, cycle_epochs, pct_start, patience
        self.step_count = 0
        self.plateau_factor, self.plateau_best, self.plateau_bad = 1.0, None, 0
        self._apply()

    def lr_at(self, step: int) -> float:
        e = step / self.steps_per_epoch  # fractional epoch
        total = float(self.epochs)
        lr0, name = self.base_lr, self.name
        if name in ("constant", "plateau"):
            lr = lr0 * self.plateau_factor
        elif name == "step":
            lr = lr0 * self.gamma ** math.floor(e / self.step_size)
        elif name == "exponential":
            lr = lr0 * self.gamma ** e
        elif name == "cosine":
            lr = self.min_lr + (lr0 - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, e / total)))
        elif name == "cyclic":  # triangular between min_lr and lr0
            pos = (e / self.cycle) % 1.0
            lr = self.min_lr + (lr0 - self.min_lr) * (1 - abs(2 * pos - 1))
        elif name == "one-cycle":  # lr0/25 → lr0 (pct_start), cosine → lr0/25e4 (torch's defaults)
            t = min(1.0, e / total)
            lo, end = lr0 / 25, lr0 / 25e4
            if t < self.pct_start:
                lr = lo + (lr0 - lo) * 0.5 * (1 - math.cos(math.pi * t / self.pct_start))
            else:
                u = (t - self.pct_start) / (1 - self.pct_start)
                lr = end + (lr0 - end) * 0.5 * (1 + math.cos(math.pi * u))
        else:
            raise ValueError(f"unknown schedule {name!r}")
        if self.warmup > 0 and e < self.warmup:
            lr *= (step + 1) / (self.warmup * self.steps_per_epoch)
        return lr

    def _apply(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step_count)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def step(self) -> None:
        """After each optimiser step."""
        self.step_count += 1
        self._apply()

    def epoch_end(self, monitored: float | None, mode: str = "min") -> None:
        """plateau: multiply the rate by gamma after `patience` epochs without improvement."""
        if self.name != "plateau" or monitored is None:
            return
        better = self.plateau_best is None or (monitored < self.plateau_best if mode == "min"
                                               else monitored > self.plateau_best)
        if better:
            self.plateau_best, self.plateau_bad = monitored, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad >= self.patience:
                self.plateau_factor *= self.gamma
                self.plateau_bad = 0
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "plateau_factor": self.plateau_factor,
                "plateau_best": self.plateau_best, "plateau_bad": self.plateau_bad}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
        self._apply()
