"""MobileNetV3-Small/Large (torchvision's, and its ImageNet weights): the lightest ImageNet backbones here."""

from __future__ import annotations

from torch import nn

from .papers import Classifier
from .registry import IMAGENET_MEAN, IMAGENET_STD, MODELS


def _mobilenet(arch: str, num_classes: int, in_channels: int, dropout: float | None) -> nn.Module:
    import torchvision  # here, not at import: it costs ~1.3 s of every CLI start (torch._dynamo via its ops)

    net = getattr(torchvision.models, arch)(weights=None)
    if in_channels != 3:
        old = net.features[0][0]
        net.features[0][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                       bias=False)
    if dropout is not None:
        net.classifier[2].p = dropout
    width = net.classifier[3].in_features
    net.classifier[3] = nn.Identity()  # backbone: features → pool → dense + hardswish + dropout: (B, 1024 | 1280)
    model = Classifier(net, nn.Sequential(nn.Linear(width, num_classes)))
    model.pretrained_prefix = ("", "backbone.")
    model.pretrained_head = ("classifier.3.", "head.0.")
    return model


for _arch, _name, _doc in (("mobilenet_v3_small", "mobilenet-v3-small", "torchvision MobileNetV3-Small"),
                           ("mobilenet_v3_large", "mobilenet-v3-large", "torchvision MobileNetV3-Large")):
    def _builder(num_classes: int, in_channels: int = 3, image_size: int = 224, *, dropout: float | None = None,
                 _arch=_arch) -> nn.Module:
        return _mobilenet(_arch, num_classes, in_channels, dropout)

    _builder.__doc__ = f"{_doc} (its dense layer and dropout 0.2 kept in the backbone) → classes."
    MODELS.register(_name, input_size=224, min_imagenet_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    imagenet=("torchvision", _arch))(_builder)
