"""A decoded data set, and the transformations every source shares (resize, channels, class selection).

`Dataset` is what every source returns (sources.py, folder.py): the images as one uint8 tensor
(N, C, H, W), int64 labels and class names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .images import DataError


@dataclass
class Dataset:
    """Decoded images and labels; `predefined` holds a folder's own train/val/test membership."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64 in [0, len(classes))
    classes: list[str]
    name: str
    paths: list[str] | None = None  # folder sources: file paths relative to the folder
    predefined: dict[str, list[int]] | None = None
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        c = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, c))


def cache_dir() -> Path:
    """Where decoded data is cached: $CNNLAB_CACHE, else ~/.cache/cnnlab."""
    d = Path(os.environ.get("CNNLAB_CACHE") or Path.home() / ".cache" / "cnnlab")
    d.mkdir(parents=True, exist_ok=True)
    return d



# --------------------------------------------------------------------------- transformations

def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) uint8 → (N, C, size, size) uint8, antialiased bilinear."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for chunk in images.split(2048):
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """1 ↔ 3 channels (gray → RGB by repeating; RGB → gray with ITU-R 601 luma weights)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {c} channels to {channels}")


def subsample_per_class(ds: Dataset, per_class: int, seed: int) -> Dataset:
    """At most `per_class` images of each class, chosen with `seed` (order kept). Where the source has parts of
    its own (a folder's train/, val/, test/), a class's images are drawn from each part in proportion to its
    count there, every part that holds the class keeping at least one where `per_class` allows — drawn from
    the pool instead, a small `per_class` left some classes with no test image."""
    g = torch.Generator().manual_seed(seed)
    part = None
    if ds.predefined:
        part = torch.full((len(ds),), -1, dtype=torch.int64)
        for j, name in enumerate(sorted(ds.predefined)):
            part[torch.tensor(ds.predefined[name], dtype=torch.int64)] = j
    keep = []
    for c in range(len(ds.classes)):
        idx = (ds.labels == c).nonzero().flatten()
        if part is None or len(idx) <= per_class:
            keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
            continue
        groups = [idx[part[idx] == j] for j in sorted(set(part[idx].tolist()))]
        for group, quota in zip(groups, shares(per_class, [len(x) for x in groups])):
            keep.append(group[torch.randperm(len(group), generator=g)[:quota]])
    keep = torch.cat(keep).sort().values
    return _take(ds, keep)


def shares(k: int, sizes: list[int]) -> list[int]:
    """k split over groups of these (non-zero) sizes in proportion to them (largest remainders, a tie to the
    bigger group), each group at least 1 where k ≥ the number of groups, none above its size; k ≤ sum(sizes)."""
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    out = [min(s, int(e)) for s, e in zip(sizes, exact)]
    if k >= len(sizes):
        out = [max(1, q) for q in out]
    while sum(out) > k:  # the floor of 1 overshot: take from the group furthest above its share
        j = max((i for i in range(len(out)) if out[i] > 1), key=lambda i: out[i] - exact[i])
        out[j] -= 1
    while sum(out) < k:  # the largest remainders, where the group has images left
        j = max((i for i in range(len(out)) if out[i] < sizes[i]), key=lambda i: (exact[i] - out[i], sizes[i]))
        out[j] += 1
    return out


def select_classes(ds: Dataset, names: list[str]) -> Dataset:
    """Only the named classes, re-numbered in the given order."""
    unknown = [n for n in names if n not in ds.classes]
    if unknown:
        raise DataError(f"data.classes: {', '.join(map(repr, unknown))} not in {ds.name}; "
                        f"its classes: {', '.join(ds.classes)}")
    old = torch.tensor([ds.classes.index(n) for n in names])
    keep = torch.isin(ds.labels, old).nonzero().flatten()
    sub = _take(ds, keep)
    remap = torch.full((len(ds.classes),), -1, dtype=torch.int64)
    remap[old] = torch.arange(len(names))
    sub.labels = remap[sub.labels]
    sub.classes = list(names)
    return sub


def _take(ds: Dataset, idx: torch.Tensor) -> Dataset:
    idx_list = idx.tolist()
    pos = {old: new for new, old in enumerate(idx_list)}
    predefined = None
    if ds.predefined:
        predefined = {k: [pos[i] for i in v if i in pos] for k, v in ds.predefined.items()}
    return Dataset(ds.images[idx], ds.labels[idx], ds.classes, ds.name,
                   [ds.paths[i] for i in idx_list] if ds.paths else None, predefined, ds.bad_files)
