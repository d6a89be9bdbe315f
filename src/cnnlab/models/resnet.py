"""ResNet-18 (torchvision's blocks) with a small-input stem below 64 px."""

from __future__ import annotations

import torchvision
from torch import nn

from .papers import Classifier
from .registry import MODELS


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32, *, dropout: float = 0.0) -> nn.Module:
    """torchvision ResNet-18; below 64 px a 3×3 stride-1 stem without max-pool (CIFAR-style) → GAP → classes."""
    net = torchvision.models.resnet18(weights=None)
    if image_size < 64:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()  # backbone ends in GAP + flatten: (B, 512)
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, num_classes)) if dropout > 0 else \
        nn.Sequential(nn.Linear(512, num_classes))
    model = Classifier(net, head)
    model.torchvision_arch = "resnet18"
    model.torchvision_prefix = ("", "backbone.")
    return model
