"""The modern training recipe's augmentations, on whole batches on the device (no per-image Python).

- `randaugment_batch`: RandAugment-style (Cubuk et al. 2020, as timm's `rand-mM`): each image gets `n`
  ops drawn uniformly from a list of colour and geometry ops, each at magnitude M/10 with a random sign.
  Every op is computed for the whole batch and kept where drawn (a mask), so a batch of B costs
  ~n × ops tensor operations whatever B. Works on [0, 1] pixels, before normalisation.
- `mix_batch`: MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019): one λ per batch, a shuffled
  partner per image; the loss is λ·CE(y) + (1 − λ)·CE(y_partner).

All randomness comes from the generator given (the run's augmentation generator, saved in checkpoints),
so runs repeat bit for bit and resume exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augment import affine_grid

GRAY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma weights


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (x * GRAY.to(x.device, x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: b + factor·(a − b), clipped to [0, 1]; factor (B,)."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp_(0, 1)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = affine_grid(theta.to(x.dtype), list(x.shape))
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _theta(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor,
           f: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.stack([a, b, c], 1), torch.stack([d, e, f], 1)], 1)


# Each op: (x in [0, 1] (B, C, H, W), m in [0, 1] (B,) signed strength) → x'. Ranges follow timm's RandAugment.
def _brightness(x, m):
    return _blend(x, torch.zeros_like(x), 1 + 0.9 * m)


def _contrast(x, m):
    mean = _luma(x).mean((1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), 1 + 0.9 * m)


def _color(x, m):
    return _blend(x, _luma(x).expand_as(x), 1 + 0.9 * m)


def _sharpness(x, m):
    c = x.shape[1]
    k = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3), groups=c)
    return _blend(x, smooth, 1 + 0.9 * m)


def _posterize(x, m):
    bits = (8 - (4 * m.abs()).round()).view(-1, 1, 1, 1)  # 8 → 4 bits
    step = 2 ** (8 - bits)
    return torch.floor(x * 255 / step) * step / 255


def _solarize(x, m):
    threshold = (1 - m.abs()).view(-1, 1, 1, 1)
    return torch.where(x >= threshold, 1 - x, x)


def _autocontrast(x, m):
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


def _rotate(x, m):
    a = math.radians(30) * m
    z = torch.zeros_like(a)
    return _affine(x, _theta(torch.cos(a), -torch.sin(a), z, torch.sin(a), torch.cos(a), z))


def _shear_x(x, m):
    one, z = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, _theta(one, 0.3 * m, z, z, one, z))


def _shear_y(x, m):
    one, z = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, _theta(one, z, z, 0.3 * m, one, z))


def _translate_x(x, m):
    one, z = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, _theta(one, z, 2 * 0.45 * m, z, one, z))


def _translate_y(x, m):
    one, z = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, _theta(one, z, z, z, one, 2 * 0.45 * m))


OPS = {"identity": lambda x, m: x, "brightness": _brightness, "contrast": _contrast, "color": _color,
       "sharpness": _sharpness, "posterize": _posterize, "solarize": _solarize, "autocontrast": _autocontrast,
       "rotate": _rotate, "shear_x": _shear_x, "shear_y": _shear_y, "translate_x": _translate_x,
       "translate_y": _translate_y}


def randaugment_batch(x: torch.Tensor, g: torch.Generator, n: int = 2, magnitude: float = 9.0) -> torch.Tensor:
    """x: (B, C, H, W) float in [0, 1] → the same, each image through `n` random ops at ±magnitude/10."""
    b, device = x.shape[0], x.device
    ops = list(OPS.values())
    for _ in range(n):
        choice = torch.randint(len(ops), (b,), generator=g, device=device)
        sign = torch.where(torch.rand(b, generator=g, device=device) < 0.5, -1.0, 1.0).to(x.dtype)
        m = sign * (magnitude / 10)
        out = x.clone()
        for k in choice.unique().tolist():
            pick = choice == k
            out[pick] = ops[k](x[pick], m[pick])
        x = out
    return x


def _beta(alpha: float, g: torch.Generator, device) -> float:
    """One Beta(α, α) draw from `g` (as the ratio of two Gamma draws, which torch's generators can make)."""
    a = torch._standard_gamma(torch.full((2,), float(alpha), device=device), generator=g)
    return float(a[0] / a.sum())


def mix_batch(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, mixup: float = 0.0,
              cutmix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mixed x, partner labels, λ): MixUp or CutMix of the batch with a shuffled copy of itself.

    With both on, each batch uses one of them (even odds). CutMix's λ is the kept area after clipping
    the box to the image, as timm corrects it.
    """
    b, device = x.shape[0], x.device
    perm = torch.randperm(b, generator=g, device=device)
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=g, device=device).item() < 0.5)
    if not use_cutmix:
        lam = _beta(mixup, g, device)
        return x * lam + x[perm] * (1 - lam), y[perm], lam
    lam = _beta(cutmix, g, device)
    h, w = x.shape[-2:]
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy = int(torch.randint(h, (1,), generator=g, device=device))
    cx = int(torch.randint(w, (1,), generator=g, device=device))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return x, y[perm], 1 - (y1 - y0) * (x1 - x0) / (h * w)
