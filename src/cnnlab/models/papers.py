"""The two papers' networks and the back-propagation MLP baseline, as printed."""

from __future__ import annotations

import torch
from torch import nn

from .fused import FusedSequential, is_channels_last
from .registry import MODELS


class _FlattenKeepingFormat(torch.autograd.Function):
    """flatten(1) whose gradient comes back in the input's memory format.

    A channels-last input is copied into (C, H, W) order by flattening, so autograd's gradient
    arrives in NCHW order; torch's CPU max-pool backward, given a channels-last input and an NCHW
    gradient, converts both to NCHW and back: two extra copies of the first paper's 128×32×28×28
    activation every step. Returning the gradient channels-last avoids them (the unfused path:
    `train.fused=false`; the fused block takes it in either layout).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        ctx.channels_last = is_channels_last(x)
        return x.reshape(x.shape[0], -1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.reshape(ctx.shape)
        return grad.contiguous(memory_format=torch.channels_last) if ctx.channels_last else grad


class Flatten(nn.Flatten):
    """nn.Flatten (same (C, H, W) feature order, same state dict), channels-last friendly in backward."""

    def forward(self, x):
        if self.start_dim != 1 or self.end_dim != -1 or not torch.is_grad_enabled():
            return super().forward(x)
        return _FlattenKeepingFormat.apply(x)


class Classifier(nn.Module):
    """backbone → head; `features()` gives the backbone's flattened output."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):  # x: (B, C, H, W) float → logits (B, classes)
        return self.head(self.backbone(x))


def dense_head(in_features: int, hidden: list[int], num_classes: int, dropout: float) -> nn.Sequential:
    """flatten → [dense + ReLU]* → dropout → dense(classes): logits (softmax lives in the loss)."""
    layers: list[nn.Module] = [Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("harahap-cnn")
def harahap_cnn(num_classes: int, in_channels: int = 1, image_size: int = 28, *,
                batch_norm: bool = True, dropout: float = 0.2, hidden: list[int] = (128,)) -> nn.Module:
    """First paper: conv 5×5×32 'same' + ReLU → BN → max-pool 2 → dense 128 + ReLU → dropout 0.2 → classes."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(inplace=True)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(32))
    layers.append(nn.MaxPool2d(2))
    side = image_size // 2
    return Classifier(FusedSequential(*layers), dense_head(32 * side * side, list(hidden), num_classes, dropout))


@MODELS.register("alkhairi-cnn")
def alkhairi_cnn(num_classes: int, in_channels: int = 3, image_size: int = 64, *,
                 batch_norm: bool = False, dropout: float = 0.1, hidden: list[int] = (128,)) -> nn.Module:
    """Second paper: conv 3×3×10 valid + ReLU → max-pool 2 → conv 5×5×20 valid + ReLU → dense hidden → classes.

    Dropout 0.1 follows its Table 1; batch norm (off by default) goes after each conv.
    """
    side = (image_size - 2) // 2 - 4
    if side < 1:
        raise ValueError(f"alkhairi-cnn needs image_size ≥ 14 (two valid convs and a pool); got {image_size}")
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 10, 3), nn.ReLU(inplace=True)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(10))
    layers += [nn.MaxPool2d(2), nn.Conv2d(10, 20, 5), nn.ReLU(inplace=True)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(20))
    return Classifier(FusedSequential(*layers), dense_head(20 * side * side, list(hidden), num_classes, dropout))


@MODELS.register("mlp")
def mlp(num_classes: int, in_channels: int = 1, image_size: int = 28, *,
        batch_norm: bool = False, dropout: float = 0.0, hidden: list[int] = (128,)) -> nn.Module:
    """'Back-propagation' baseline: flatten → dense hidden + ReLU (BN optional) → classes."""
    layers: list[nn.Module] = [Flatten()]
    width = in_channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(width, h)] + ([nn.BatchNorm1d(h)] if batch_norm else []) + [nn.ReLU(inplace=True)]
        width = h
    head = [nn.Dropout(dropout)] if dropout > 0 else []
    return Classifier(nn.Sequential(*layers), nn.Sequential(*head, nn.Linear(width, num_classes)))
