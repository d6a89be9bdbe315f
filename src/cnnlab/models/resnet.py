"""ResNet-18/34/50 (torchvision's blocks, and its ImageNet weights), with a small-input stem below 64 px."""

from __future__ import annotations

from torch import nn

from .papers import Classifier
from .registry import IMAGENET_MEAN, IMAGENET_STD, MODELS


def _resnet(arch: str, num_classes: int, in_channels: int, image_size: int, dropout: float) -> nn.Module:
    import torchvision  # here, not at import: it costs ~1.3 s of every CLI start (torch._dynamo via its ops)

    net = getattr(torchvision.models, arch)(weights=None)
    if image_size < 64:  # CIFAR-style: a 7×7 stride-2 stem and a max-pool would leave too little of a small image
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    width = net.fc.in_features
    net.fc = nn.Identity()  # backbone ends in GAP + flatten: (B, 512) or (B, 2048)
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes)) if dropout > 0 else \
        nn.Sequential(nn.Linear(width, num_classes))
    model = Classifier(net, head)
    model.pretrained_prefix = ("", "backbone.")
    model.pretrained_head = ("fc.", "head.1." if dropout > 0 else "head.0.")
    return model


for _arch, _doc in (("resnet18", "torchvision ResNet-18"), ("resnet34", "torchvision ResNet-34"),
                    ("resnet50", "torchvision ResNet-50 (bottleneck blocks, 2048 features)")):
    def _builder(num_classes: int, in_channels: int = 3, image_size: int = 224, *, dropout: float = 0.0,
                 _arch=_arch) -> nn.Module:
        return _resnet(_arch, num_classes, in_channels, image_size, dropout)

    _builder.__doc__ = f"{_doc}; below 64 px a 3×3 stride-1 stem without max-pool (CIFAR-style) → GAP → classes."
    MODELS.register(_arch, input_size=224, min_imagenet_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    imagenet=("torchvision", _arch))(_builder)
