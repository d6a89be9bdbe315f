"""The model registry and `create_model`, with the options shared by all models."""

from __future__ import annotations

import inspect

from torch import nn

from ..registry import Registry
from .fused import fold_batch_norms, use_cpu_depthwise
from .init import init_weights

MODELS: Registry[nn.Module] = Registry("model")
# A model is one builder (num_classes, in_channels, image_size, *, its options) registered here; its info may
# say input_size (the side its ImageNet weights were trained at), mean / std (their input normalisation, in
# [0, 1] pixel units), imagenet=("package" | "torchvision", name) (where those weights come from) and
# min_imagenet_size (the smallest input the weights make sense for).

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision's ImageNet statistics


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
    use_cpu_depthwise(model)  # depthwise convolutions: fp32 training under CPU bf16 autocast (fused.CpuConv2d)
    fold_batch_norms(model)  # torchvision's conv → batch norm pairs: one convolution at inference
    model.registry_name = name
    return model


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.list(pattern)


def describe_model(name: str) -> str:
    return MODELS.describe(name)
