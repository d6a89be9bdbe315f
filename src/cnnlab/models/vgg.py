"""VGG-16/19 (torchvision's layers) adapted to small inputs, with the second paper's head.

torchvision's VGG halves the image five times (224 → 7). On 28×28 or 64×64
input that would shrink the map below one pixel, so pools that would do so are
replaced by identities (layer indices, and so weight names, stay torchvision's).
The head is Table 1's: global average pooling → dropout 10 % → dense(classes).
"""

from __future__ import annotations

import math

from torch import nn

from .papers import Classifier
from .registry import IMAGENET_MEAN, IMAGENET_STD, MODELS


def _vgg(arch: str, num_classes: int, in_channels: int, image_size: int, batch_norm: bool,
         dropout: float) -> nn.Module:
    tv_name = arch + ("_bn" if batch_norm else "")
    # only the conv stack: building torchvision's whole VGG would also allocate its 120 M-parameter
    # classifier (~2 s) just to discard it
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D" if arch == "vgg16" else "E"], batch_norm=batch_norm)
    if in_channels != 3:
        old = features[0]
        features[0] = nn.Conv2d(in_channels, old.out_channels, 3, padding=1)
    allowed_pools = max(0, int(math.log2(image_size)))  # each pool needs side ≥ 2
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    for i in pools[allowed_pools:]:
        features[i] = nn.Identity()
    backbone = nn.Sequential(*features)  # keys backbone.N ↔ torchvision features.N
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(512, num_classes))
    model = Classifier(backbone, head)
    model.pretrained_prefix = ("features.", "backbone.")  # ImageNet weights: the conv stack only
    model.imagenet_arch = tv_name  # with or without batch norm: which torchvision weights fit
    return model


def _info(arch: str) -> dict:
    return dict(input_size=224, min_imagenet_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                imagenet=("torchvision", arch))


@MODELS.register("vgg16", **_info("vgg16"))
def vgg16(num_classes: int, in_channels: int = 3, image_size: int = 64, *, batch_norm: bool = False,
          dropout: float = 0.1) -> nn.Module:
    """torchvision VGG-16 features (pools kept only while the map is ≥ 2 px) → GAP → dropout 0.1 → classes."""
    return _vgg("vgg16", num_classes, in_channels, image_size, batch_norm, dropout)


@MODELS.register("vgg19", **_info("vgg19"))
def vgg19(num_classes: int, in_channels: int = 3, image_size: int = 64, *, batch_norm: bool = False,
          dropout: float = 0.1) -> nn.Module:
    """torchvision VGG-19 features (the second paper's pre-trained baseline) → GAP → dropout 0.1 → classes."""
    return _vgg("vgg19", num_classes, in_channels, image_size, batch_norm, dropout)


@MODELS.register("vgg16-bn", **_info("vgg16_bn"))
def vgg16_bn(num_classes: int, in_channels: int = 3, image_size: int = 64, *, dropout: float = 0.1) -> nn.Module:
    """torchvision VGG-16 with batch norm (vgg16_bn): as vgg16, a BN after every conv."""
    return _vgg("vgg16", num_classes, in_channels, image_size, True, dropout)


@MODELS.register("vgg19-bn", **_info("vgg19_bn"))
def vgg19_bn(num_classes: int, in_channels: int = 3, image_size: int = 64, *, dropout: float = 0.1) -> nn.Module:
    """torchvision VGG-19 with batch norm (vgg19_bn): as vgg19, a BN after every conv."""
    return _vgg("vgg19", num_classes, in_channels, image_size, True, dropout)
