"""Augmentation of whole batches on the device: one flip mask and one affine warp per batch.

Per-sample Python transforms (torchvision's usual pipeline) cost a Python call
per image; here a batch of B images costs a handful of tensor ops, whatever B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def affine_grid(theta: torch.Tensor, size: list[int]) -> torch.Tensor:
    """F.affine_grid(theta, size, align_corners=False), as one small matrix product: all B of theta's (2, 3) maps
    times the (3, H·W) pixel centres at once, returned as a (B, H, W, 2) view. Written by hand because torch's
    CPU affine_grid is a batched product with an inner size of 3: with the warp after it, 0.77 against 0.52 ms
    here for a batch of 128 28×28 images, 5.50 against 3.47 ms for 128 64×64×3 ones (`benchmarks/block_bench.py`,
    AMD EPYC, 2 threads); tests/test_data.py checks it against torch's grid and warp."""
    b, _, h, w = size
    xs = (torch.arange(w, dtype=theta.dtype, device=theta.device) * 2 + 1) / w - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(h, dtype=theta.dtype, device=theta.device) * 2 + 1) / h - 1
    base = torch.stack([xs.expand(h, w), ys.view(h, 1).expand(h, w), torch.ones_like(xs).expand(h, w)])
    return (theta.reshape(b * 2, 3) @ base.view(3, h * w)).view(b, 2, h, w).permute(0, 2, 3, 1)


def warps(rotation: float = 0.0, scale: float = 0.0, translate: float = 0.0, **_) -> bool:
    """Whether augment_batch with these settings warps the images (not only flips them)."""
    return rotation > 0 or scale > 0 or translate > 0


def augment_batch(x: torch.Tensor, g: torch.Generator, *, rotation: float = 0.0, hflip: float = 0.0,
                  scale: float = 0.0, translate: float = 0.0, native: bool = False) -> torch.Tensor:
    """Random flip / rotation (± degrees) / zoom (1 ± scale) / shift (± fraction of the side).

    x: (B, C, H, W) float. Each image gets its own parameters from generator `g`;
    areas that come from outside the image repeat its border pixels.
    native: flip and warp in cnnlab's compiled kernel (models/native.py's warp_affine) where it applies (a
    float32 CPU batch that is warped, not only flipped) — from the same draws, so the same images up to
    float rounding (~1e-6 of the pixels' range), in one pass instead of a dozen ops (`benchmarks/augment_bench.py`).
    """
    b, device = x.shape[0], x.device
    warped = warps(rotation, scale, translate)
    # the draws, one row of B each in this order: flip (when hflip > 0), then angle, zoom, x and y shift (when warped)
    u = torch.empty(5, b, dtype=torch.float32, device=device)
    for row in ([0] if hflip > 0 else []) + ([1, 2, 3, 4] if warped else []):
        torch.rand(b, generator=g, device=device, out=u[row])
    if native and warped:
        from ..models import native as kernels

        if kernels.warp_applies(x):
            return kernels.warp_affine(x, u, math.radians(rotation), scale, translate, hflip)
    if hflip > 0:
        x = torch.where((u[0] < hflip).view(b, 1, 1, 1), x.flip(3), x)
    if not warped:
        return x
    angle, zoom = (u[1] * 2 - 1) * math.radians(rotation), 1 + (u[2] * 2 - 1) * scale
    shift = (u[3:5] * 2 - 1) * translate  # (2, B): x, y
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # theta maps output coordinates (in [-1, 1]) to input coordinates: (B, 2, 3)
    theta = torch.stack([torch.stack([cos, -sin, 2 * shift[0]], 1),
                         torch.stack([sin, cos, 2 * shift[1]], 1)], 1).to(x.dtype)
    grid = affine_grid(theta, list(x.shape))
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class BatchAugment:
    """A run's batch augmentation: augment_batch with its generator and settings; `native` (set once the
    runtime has decided on cnnlab's compiled kernels: Runtime.native_warp) takes the kernel's warp."""

    enabled: bool | None = None  # None: each run's `native`; True / False: always / never (tests, benchmarks)

    def __init__(self, g: torch.Generator, **settings):
        self.g, self.settings, self.native = g, settings, False
        self.warps = warps(**settings)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        on = self.native if BatchAugment.enabled is None else BatchAugment.enabled
        return augment_batch(x, self.g, native=on, **self.settings)
