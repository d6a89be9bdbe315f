"""Data sources, each decoded once into a uint8 tensor (N, C, H, W) + int64 labels + class names.

- animal-shapes   : the 10-class Animal-Shape set (28×28 grayscale silhouettes) from
                    the `animal-mnist` package, read without importing it and with an
                    unpickler that can only rebuild numpy arrays; cached as .npz.
- animal-shapes-5 : its cat, cow, elephant, horse and sheep (the second paper's classes).
- random          : the first paper's synthetic set: random pixels, random labels (seeded).
- folder:PATH     : one sub-folder per class, or train/ val/ test/ each with class folders.
"""

from __future__ import annotations

import gzip
import io
import hashlib
import importlib.util
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import atomic_write_bytes
from .images import IMAGE_EXTENSIONS, DataError, decode_image, scan_folder


ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
ANIMAL5_CLASSES = ["cat", "cow", "elephant", "horse", "sheep"]

SOURCES = {
    "animal-shapes": "Animal-Shape: 10,000 28×28 grayscale animal silhouettes, 10 classes × 1,000 (animal-mnist)",
    "animal-shapes-5": "Animal-Shape's cat, cow, elephant, horse, sheep: the second paper's 5 classes (5,000 images)",
    "random": "the first paper's synthetic set: random_samples random images, random labels (seeded)",
    "folder:PATH": "your images: PATH/<class>/*.jpg|png|bmp|gif|webp, or PATH/{train,val,test}/<class>/…",
}


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


def list_datasets() -> dict[str, str]:
    return dict(SOURCES)


def cache_dir() -> Path:
    """Where decoded data is cached: $CNNLAB_CACHE, else ~/.cache/cnnlab."""
    d = Path(os.environ.get("CNNLAB_CACHE") or Path.home() / ".cache" / "cnnlab")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _atomic_save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- Animal-Shape

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: any other global is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
               ("_codecs", "encode")}  # protocol 2 stores bytes as latin-1 text

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are allowed")


def _animal_mnist_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ imports TensorFlow).
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in Animal-Shape data needs the animal-mnist package: "
                        "pip install --no-deps animal-mnist")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"


def read_animal_pickle(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            arr = _NumpyOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{path}: {e}") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: expected a numpy array, found {type(arr).__name__}")
    return arr


def load_animal_shapes() -> tuple[np.ndarray, np.ndarray]:
    """(10000, 28, 28) uint8 images and (10000,) int64 labels, cached as .npz after the first read."""
    src = _animal_mnist_dir()
    data_file, label_file = src / "animal_data_version_3.gz", src / "animal_label_version_3.gz"
    stamp = hashlib.sha256(f"{data_file.stat().st_size}:{label_file.stat().st_size}".encode()).hexdigest()[:12]
    cached = cache_dir() / f"animal-shapes-v3-{stamp}.npz"
    if cached.exists():
        with np.load(cached, allow_pickle=False) as z:
            return z["images"], z["labels"]
    images = read_animal_pickle(data_file).astype(np.uint8, copy=False)
    labels = read_animal_pickle(label_file).astype(np.int64, copy=False)
    if images.shape != (10000, 28, 28) or labels.shape != (10000,):
        raise DataError(f"unexpected Animal-Shape arrays {images.shape}, {labels.shape}")
    _atomic_save_npz(cached, images=images, labels=labels)
    return images, labels


# --------------------------------------------------------------------------- helpers

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
    """At most `per_class` images of each class, chosen with `seed` (order kept)."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(len(ds.classes)):
        idx = (ds.labels == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    keep = torch.cat(keep).sort().values
    return _take(ds, keep)


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


# --------------------------------------------------------------------------- sources

def _animal(classes: list[str], name: str, image_size: int | None, channels: int | None) -> Dataset:
    images, labels = load_animal_shapes()
    keep = np.isin(labels, [ANIMAL_CLASSES.index(c) for c in classes])
    remap = {ANIMAL_CLASSES.index(c): i for i, c in enumerate(classes)}
    x = torch.from_numpy(images[keep]).unsqueeze(1)
    y = torch.tensor([remap[int(v)] for v in labels[keep]], dtype=torch.int64)
    x = convert_channels(resize_uint8(x, image_size or 28), channels or 1)
    return Dataset(x, y, list(classes), name)


def _random(n: int, num_classes: int, image_size: int | None, channels: int | None, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    size, c = image_size or 28, channels or 1
    x = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return Dataset(x, y, [f"class{i}" for i in range(num_classes)], "random")


def _folder(root: Path, image_size: int | None, channels: int | None, resize: str, on_bad_file: str,
            progress: bool) -> Dataset:
    from .folder import load_folder  # decoding lives beside the cache

    return load_folder(root, image_size or 64, channels or 3, resize, on_bad_file, progress)


def load_source(source: str, *, image_size: int | None = None, channels: int | None = None,
                random_samples: int = 100, random_classes: int = 2, seed: int = 0,
                resize: str = "stretch", on_bad_file: str = "skip", max_per_class: int | None = None,
                classes: list[str] | None = None, progress: bool = True) -> Dataset:
    """Decode a source into a Dataset at the requested size and channels (None: the source's own)."""
    if source == "animal-shapes":
        ds = _animal(ANIMAL_CLASSES, source, image_size, channels)
    elif source == "animal-shapes-5":
        ds = _animal(ANIMAL5_CLASSES, source, image_size, channels)
    elif source == "random":
        ds = _random(random_samples, random_classes, image_size, channels, seed)
    elif source.startswith("folder:"):
        ds = _folder(Path(os.path.expanduser(source[len("folder:"):])), image_size, channels, resize,
                     on_bad_file, progress)
    else:
        raise DataError(f"unknown data source {source!r}; choose one of: {', '.join(SOURCES)}")
    if classes is not None:
        ds = select_classes(ds, classes)
    if max_per_class is not None:
        ds = subsample_per_class(ds, max_per_class, seed)
    return ds


__all__ = ["Dataset", "DataError", "load_source", "list_datasets", "IMAGE_EXTENSIONS", "decode_image",
           "scan_folder", "cache_dir"]
