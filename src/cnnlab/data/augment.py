"""Augmentation of whole batches on the device: one flip mask and one affine warp per batch.

Per-sample Python transforms (torchvision's usual pipeline) cost a Python call
per image; here a batch of B images costs a handful of tensor ops, whatever B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, bound: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g, device=device) * 2 - 1) * bound


def augment_batch(x: torch.Tensor, g: torch.Generator, *, rotation: float = 0.0, hflip: float = 0.0,
                  scale: float = 0.0, translate: float = 0.0) -> torch.Tensor:
    """Random flip / rotation (± degrees) / zoom (1 ± scale) / shift (± fraction of the side).

    x: (B, C, H, W) float. Each image gets its own parameters from generator `g`;
    areas that come from outside the image repeat its border pixels.
    """
    b, device = x.shape[0], x.device
    if hflip > 0:
        flip = torch.rand(b, generator=g, device=device) < hflip
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    if rotation <= 0 and scale <= 0 and translate <= 0:
        return x
    angle = _uniform(b, math.radians(rotation), g, device)
    zoom = 1 + _uniform(b, scale, g, device)
    shift = torch.stack([_uniform(b, translate, g, device), _uniform(b, translate, g, device)], 1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # theta maps output coordinates (in [-1, 1]) to input coordinates: (B, 2, 3)
    theta = torch.stack([torch.stack([cos, -sin, 2 * shift[:, 0]], 1),
                         torch.stack([sin, cos, 2 * shift[:, 1]], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
