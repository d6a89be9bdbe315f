"""Weight initialisation schemes of the first paper (conv and dense weights; biases → 0).

A scheme is one registered function that fills a weight tensor in place (INITS); `default` keeps
PyTorch's own initialisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import Registry

INITS: Registry[None] = Registry("init", sort=False)


@INITS.register("default", doc="PyTorch's own initialisation, left as it is")
def _default(w: torch.Tensor) -> None:
    raise AssertionError("never called: 'default' leaves the model as built")


@INITS.register("xavier-uniform", doc="Glorot / Xavier uniform")
def _xavier_uniform(w: torch.Tensor) -> None:
    nn.init.xavier_uniform_(w)


@INITS.register("he-normal", doc="He / Kaiming normal, for ReLU")
def _he_normal(w: torch.Tensor) -> None:
    nn.init.kaiming_normal_(w, nonlinearity="relu")


@INITS.register("he-uniform", doc="He / Kaiming uniform, for ReLU")
def _he_uniform(w: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(w, nonlinearity="relu")


@INITS.register("uniform-fan-in", doc="U(±1/√n), n = fan-in: the first paper's eq. (4)/(17)")
def _uniform_fan_in(w: torch.Tensor) -> None:
    bound = 1.0 / math.sqrt(w[0].numel())
    nn.init.uniform_(w, -bound, bound)


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str = "default") -> None:
    """Re-initialise every Conv/Linear weight with `scheme` (zeroing its bias); 'default' keeps PyTorch's."""
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; choose one of: {', '.join(INITS.list())}")
    if scheme == "default":
        return
    fill = INITS.get(scheme)
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        fill(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
