"""The model registry and `create_model`, with the options shared by all models."""

from __future__ import annotations

import inspect

from torch import nn

from ..registry import Registry
from .init import init_weights

MODELS: Registry[nn.Module] = Registry("model")


def create_model(name: str, num_classes: int, in_channels: int = 1, image_size: int = 28,
                 *, batch_norm: bool | None = None, dropout: float | None = None,
                 hidden: list[int] | None = None, init: str = "default") -> nn.Module:
    """Build a registered model for `num_classes` outputs on (in_channels, image_size²) input.

    batch_norm / dropout / hidden: None keeps the model's own default (see `cnnlab models`).
    init: default | xavier-uniform | he-normal | he-uniform | uniform-fan-in.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2; got {num_classes}")
    opts = {k: v for k, v in dict(batch_norm=batch_norm, dropout=dropout, hidden=hidden).items()
            if v is not None}
    accepted = inspect.signature(MODELS.get(name)).parameters
    unknown = [k for k in opts if k not in accepted]
    if unknown:
        own = [p for p, v in accepted.items() if v.kind == v.KEYWORD_ONLY]
        raise ValueError(f"model {name!r} has no option {', '.join(unknown)}; "
                         f"its options: {', '.join(own) or 'none'}")
    model = MODELS.create(name, num_classes=num_classes, in_channels=in_channels,
                          image_size=image_size, **opts)
    init_weights(model, init)
    return model


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.list(pattern)


def describe_model(name: str) -> str:
    return MODELS.describe(name)
