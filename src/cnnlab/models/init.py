"""Weight initialisation schemes of the first paper (conv and dense weights; biases → 0)."""

from __future__ import annotations

import math

import torch
from torch import nn

INITS = ["default", "xavier-uniform", "he-normal", "he-uniform", "uniform-fan-in"]


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str = "default") -> None:
    """Re-initialise every Conv/Linear weight with `scheme`; 'default' keeps PyTorch's.

    uniform-fan-in is the paper's eq. (4)/(17): W ~ Uniform(-1/√n, 1/√n), n = fan-in.
    """
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; choose one of: {', '.join(INITS)}")
    if scheme == "default":
        return
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        w = m.weight
        if scheme == "xavier-uniform":
            nn.init.xavier_uniform_(w)
        elif scheme == "he-normal":
            nn.init.kaiming_normal_(w, nonlinearity="relu")
        elif scheme == "he-uniform":
            nn.init.kaiming_uniform_(w, nonlinearity="relu")
        elif scheme == "uniform-fan-in":
            fan_in = w[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
