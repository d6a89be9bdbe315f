"""Optimisers, learning-rate schedules and the papers' explicit L2 loss term."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import Registry

OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer", sort=False)
# An optimiser is one registered function (params, lr, options, fused_kw) → torch optimiser; `options` holds
# the optim section's momentum, nesterov, beta1, beta2, eps and weight_decay.


@OPTIMIZERS.register("sgd", doc="SGD with momentum (optim.momentum) and optional Nesterov", fused=True)
def _sgd(params, lr: float, o: dict, fused_kw: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=o["momentum"], nesterov=o["nesterov"] and o["momentum"] > 0,
                           weight_decay=o["weight_decay"], **fused_kw)


@OPTIMIZERS.register("adam", doc="Adam (optim.beta1, beta2, eps)", fused=True)
def _adam(params, lr: float, o: dict, fused_kw: dict) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                            weight_decay=o["weight_decay"], **fused_kw)


@OPTIMIZERS.register("adamw", doc="AdamW: Adam with decoupled weight decay", fused=True)
def _adamw(params, lr: float, o: dict, fused_kw: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                             weight_decay=o["weight_decay"], **fused_kw)


@OPTIMIZERS.register("rmsprop", doc="RMSprop with Keras' defaults (rho 0.9, no momentum)", fused=False)
def _rmsprop(params, lr: float, o: dict, fused_kw: dict) -> torch.optim.Optimizer:
    # Keras' RMSprop defaults: rho 0.9, no momentum; torch has no fused RMSprop step
    return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=o["eps"], momentum=0.0, weight_decay=o["weight_decay"])


def build_optimizer(params, name: str, lr: float, *, momentum: float = 0.9, nesterov: bool = False,
                    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-7,
                    weight_decay: float = 0.0, fused: bool = False) -> torch.optim.Optimizer:
    """A registered optimiser (sgd, adam, adamw, rmsprop…) over the trainable `params` (or over param groups,
    dicts with "params" and an optional "lr_scale", every parameter kept).

    weight_decay is the optimiser's own decay (decoupled for adamw). It is not the
    papers' L2 term λ/2·Σ‖W‖², which `l2_penalty` adds to the loss instead.
    fused: torch's fused step where the optimiser has one (the same update in one kernel).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS.list())}")
    params = list(params)
    if params and isinstance(params[0], dict):  # param groups (own lr_scale each): kept whole, frozen ones too,
        tensors = [p for g in params for p in g["params"]]  # so they can be unfrozen later
    else:
        params = tensors = [p for p in params if p.requires_grad]
    fused_kw = {"fused": True} if (fused and OPTIMIZERS.info[name].get("fused") and tensors
                                   and all(p.is_floating_point() for p in tensors)) else {}
    options = dict(momentum=momentum, nesterov=nesterov, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    return OPTIMIZERS.create(name, params, lr, options, fused_kw)


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

    names: the SCHEDULES registry (constant | step | exponential | cosine | cyclic | one-cycle | plateau).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, base_lr: float, steps_per_epoch: int,
                 epochs: int, *, warmup_epochs: float = 0.0, step_size: float = 10.0, gamma: float = 0.1,
                 min_lr: float = 0.0, cycle_epochs: float = 4.0, pct_start: float = 0.3, patience: int = 3):
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES.list())}")
        self.opt, self.name, self.base_lr = optimizer, name, base_lr
        self.steps_per_epoch, self.epochs = max(1, steps_per_epoch), epochs
        self.warmup, self.step_size, self.gamma = warmup_epochs, step_size, gamma
        self.min_lr, self.cycle, self.pct_start, self.patience = min_lr, cycle_epochs, pct_start, patience
        self.step_count = 0
        self.plateau_factor, self.plateau_best, self.plateau_bad = 1.0, None, 0
        self._apply()

    def lr_at(self, step: int) -> float:
        e = step / self.steps_per_epoch  # fractional epoch
        lr = SCHEDULES.create(self.name, self, e, float(self.epochs), self.base_lr)
        if self.warmup > 0 and e < self.warmup:
            lr *= (step + 1) / (self.warmup * self.steps_per_epoch)
        return lr

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for group in self.opt.param_groups:  # lr_scale: discriminative rates (a backbone's lower one)
            group["lr"] = lr * group.get("lr_scale", 1.0)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def step(self) -> None:
        """After each optimiser step."""
        self.step_count += 1
        self._apply()

    def epoch_end(self, monitored: float | None, mode: str = "min") -> None:
        """plateau: multiply the rate by gamma after `patience` epochs without improvement."""
        if not SCHEDULES.info[self.name].get("reacts_to_metric") or monitored is None:
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


SCHEDULES: Registry[float] = Registry("schedule", sort=False)
# A schedule is one registered formula (schedule, fractional epoch e, total epochs, base rate) → rate;
# warm-up is applied on top of any of them by LRSchedule.lr_at.


@SCHEDULES.register("constant", doc="the base rate throughout")
def _constant(s: LRSchedule, e: float, total: float, lr0: float) -> float:
    return lr0 * s.plateau_factor


@SCHEDULES.register("step", doc="× gamma every step_size epochs")
def _step(s: LRSchedule, e: float, total: float, lr0: float) -> float:
    return lr0 * s.gamma ** math.floor(e / s.step_size)


@SCHEDULES.register("exponential", doc="× gamma every epoch, continuously")
def _exponential(s: LRSchedule, e: float, total: float, lr0: float) -> float:
    return lr0 * s.gamma ** e


@SCHEDULES.register("cosine", doc="cosine from the base rate to min_lr over the run")
def _cosine(s: LRSchedule, e: float, total: float, lr0: float) -> float:
    return s.min_lr + (lr0 - s.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, e / total)))


@SCHEDULES.register("cyclic", doc="triangular between min_lr and the base rate, cycle_epochs long")
def _cyclic(s: LRSchedule, e: float, total: float, lr0: float) -> float:
    pos = (e / s.cycle) % 1.0
    return s.min_lr + (lr0 - s.min_lr) * (1 - abs(2 * pos - 1))


@SCHEDULES.register("one-cycle", doc="base/25 → base (pct_start), cosine → base/25e4 (torch's OneCycleLR defaults)")
def _one_cycle(s: LRSchedule, e: float, total: float, lr0: float) -> float:
    t = min(1.0, e / total)
    lo, end = lr0 / 25, lr0 / 25e4
    if t < s.pct_start:
        return lo + (lr0 - lo) * 0.5 * (1 - math.cos(math.pi * t / s.pct_start))
    u = (t - s.pct_start) / (1 - s.pct_start)
    return end + (lr0 - end) * 0.5 * (1 + math.cos(math.pi * u))


@SCHEDULES.register("plateau", doc="× gamma after `patience` epochs without improvement of the monitored metric",
                    reacts_to_metric=True)
def _plateau(s: LRSchedule, e: float, total: float, lr0: float) -> float:
    return lr0 * s.plateau_factor
