"""Stratified, shuffled, seeded train / validation / test splits (never "the last 20 %")."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Split:
    """Sample indices into a Dataset for each part, plus how they were made."""

    train: list[int]
    val: list[int]
    test: list[int]
    seed: int
    fractions: dict[str, float]
    method: str = "stratified"
    expanded_from: list[int] = field(default_factory=list)  # offline copies: source train index of each

    def to_json(self, paths: list[str] | None, labels: torch.Tensor, classes: list[str]) -> dict:
        out = {"method": self.method, "seed": self.seed, "fractions": self.fractions,
               "classes": classes, "counts": {}}
        for part in ("train", "val", "test"):
            idx = getattr(self, part)
            out["counts"][part] = torch.bincount(labels[idx], minlength=len(classes)).tolist() if idx else \
                [0] * len(classes)
            out[part] = idx
            if paths:
                out[part + "_files"] = [paths[i] for i in idx]
        if self.expanded_from:
            out["expanded"] = {"copies_per_image": len(self.expanded_from) // max(1, len(self.train)),
                               "copy_of": self.expanded_from,
                               "note": "offline augmented copies appended after the original training images"}
        return out


def check_saved_split(saved: dict, paths: list[str] | None, n: int, where: str) -> None:
    """A run's split.json against its data rebuilt from config.yaml (n images, a folder's relative paths): its
    indices in range and, where it names their files, the same files at those positions —
    else a DataError, instead of evaluating or resuming on other images than the run's (the folder's files
    changed, or the run was made by a cnnlab whose data.max_per_class drew from a folder's pooled images rather
    than from each of its own parts)."""
    from .images import DataError

    for part in ("train", "val", "test"):  # train: the original images (offline copies are listed apart)
        idx = saved.get(part) or []
        if idx and max(idx) >= n:
            raise DataError(f"the data changed since {where} was made: split.json's {part} indices go up to "
                            f"{max(idx)}, the data has {n} images now; start a new run")
        files = saved.get(part + "_files")
        if paths is not None and files is not None and files != [paths[i] for i in idx]:
            raise DataError(f"the data changed since {where} was made: split.json's {part} files are not the "
                            f"images at those positions now (the folder's files changed, or data.max_per_class "
                            f"drew other images: cnnlab now draws from each of a folder's own train/ and test/ "
                            f"parts); start a new run")


def _allocate(n: int, fractions: list[float]) -> list[int]:
    """Counts per part for one class: rounded, the rest to train, train kept ≥ 1 where possible."""
    counts = [int(round(n * f)) for f in fractions]
    while sum(counts) >= n and n > 0 and any(counts):  # leave at least one image to train on
        j = max(range(len(counts)), key=lambda i: counts[i])
        counts[j] -= 1
    return counts


def stratified_split(labels: torch.Tensor, val_fraction: float, test_fraction: float, seed: int,
                     predefined: dict[str, list[int]] | None = None) -> Split:
    """Per class: shuffle with `seed`, then take test, validation and the rest for training.

    `predefined` (a folder's own train/val/test) is kept; a missing val or test part is
    carved, stratified, from the folder's train part.
    """
    g = torch.Generator().manual_seed(seed)
    fractions = {"train": round(1 - val_fraction - test_fraction, 6), "val": val_fraction, "test": test_fraction}
    pool = torch.arange(len(labels)) if predefined is None else torch.tensor(predefined.get("train", []),
                                                                              dtype=torch.int64)
    want_val = val_fraction if predefined is None or not predefined.get("val") else 0.0
    want_test = test_fraction if predefined is None or not predefined.get("test") else 0.0
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    for c in range(num_classes):
        idx = pool[labels[pool] == c]
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        n_test, n_val = _allocate(len(idx), [want_test, want_val])
        parts["test"] += idx[:n_test]
        parts["val"] += idx[n_test:n_test + n_val]
        parts["train"] += idx[n_test + n_val:]
    method = "stratified"
    if predefined is not None:
        method = "folder" if not (want_val or want_test) else "folder + stratified"
        for part in ("val", "test"):
            if predefined.get(part):
                parts[part] = list(predefined[part])
        fractions = {k: round(len(v) / max(1, len(labels)), 4) for k, v in parts.items()}
    return Split(sorted(parts["train"]), sorted(parts["val"]), sorted(parts["test"]), seed, fractions, method)
