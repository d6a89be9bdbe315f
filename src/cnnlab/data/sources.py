"""Data sources, each decoded once into a uint8 tensor (N, C, H, W) + int64 labels + class names.

- animal-shapes   : the 10-class Animal-Shape set (28×28 grayscale silhouettes) from
                    the `animal-mnist` package, read without importing it and with an
                    unpickler that can only rebuild numpy arrays; cached as .npz.
- animal-shapes-5 : its cat, cow, elephant, horse and sheep (the second paper's classes).
- random          : the first paper's synthetic set: random pixels, random labels (seeded).
- folder:PATH     : one sub-folder per class, or train/ val/ test/ each with class folders.

A new source is one function registered in SOURCES below (its test beside the others in
tests/test_data.py); the config's choices, `cnnlab datasets` and the error messages read the registry.
"""

from __future__ import annotations

import gzip
import io
import hashlib
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write_bytes
from ..registry import Registry
from .dataset import Dataset, cache_dir, convert_channels, resize_uint8, select_classes, subsample_per_class
from .images import IMAGE_EXTENSIONS, DataError, decode_image, scan_folder


ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
ANIMAL5_CLASSES = ["cat", "cow", "elephant", "horse", "sheep"]


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

# --------------------------------------------------------------------------- sources

SOURCES: Registry[Dataset] = Registry("data source", sort=False)
# A source is one decorated function: (argument or None, *, image_size, channels, seed, random_samples,
# random_classes, resize, on_bad_file, progress) → Dataset at that size (None: the source's own).
# Registered with arg="PATH" it is written `name:PATH`, and `normalize` makes the argument
# independent of the current directory when the config is checked.


@SOURCES.register("animal-shapes", doc="Animal-Shape: 10,000 28×28 grayscale animal silhouettes, 10 classes × "
                                       "1,000 (animal-mnist)")
def _animal_shapes(arg, *, image_size, channels, **_) -> Dataset:
    return _animal(ANIMAL_CLASSES, "animal-shapes", image_size, channels)


@SOURCES.register("animal-shapes-5", doc="Animal-Shape's cat, cow, elephant, horse, sheep: the second paper's 5 "
                                         "classes (5,000 images)")
def _animal_shapes_5(arg, *, image_size, channels, **_) -> Dataset:
    return _animal(ANIMAL5_CLASSES, "animal-shapes-5", image_size, channels)


@SOURCES.register("random", doc="the first paper's synthetic set: random_samples random images, random labels "
                                "(seeded)")
def _random(arg, *, image_size, channels, random_samples, random_classes, seed, **_) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    size, c = image_size or 28, channels or 1
    x = torch.randint(0, 256, (random_samples, c, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, random_classes, (random_samples,), generator=g)
    return Dataset(x, y, [f"class{i}" for i in range(random_classes)], "random")


@SOURCES.register("folder", doc="your images: PATH/<class>/*.jpg|png|bmp|gif|webp, or PATH/{train,val,test}/<class>/…",
                  arg="PATH", normalize=lambda path: os.path.abspath(os.path.expanduser(path)))
def _folder(arg, *, image_size, channels, resize, on_bad_file, progress, **_) -> Dataset:
    from .folder import load_folder  # decoding lives beside its cache

    return load_folder(Path(os.path.expanduser(arg)), image_size or 64, channels or 3, resize, on_bad_file, progress)


def _animal(classes: list[str], name: str, image_size: int | None, channels: int | None) -> Dataset:
    images, labels = load_animal_shapes()
    keep = np.isin(labels, [ANIMAL_CLASSES.index(c) for c in classes])
    remap = {ANIMAL_CLASSES.index(c): i for i, c in enumerate(classes)}
    x = torch.from_numpy(images[keep]).unsqueeze(1)
    y = torch.tensor([remap[int(v)] for v in labels[keep]], dtype=torch.int64)
    x = convert_channels(resize_uint8(x, image_size or 28), channels or 1)
    return Dataset(x, y, list(classes), name)


def list_datasets() -> dict[str, str]:
    """{source as written in a config: one line about it}."""
    return {spelled: SOURCES.describe(name) for name, spelled in zip(SOURCES.list(), SOURCES.spellings())}


def normalize_source(spec: str) -> str:
    """`spec` checked against the registry (DataError naming the choices) and made independent of the
    current directory (`folder:photos` → `folder:/home/me/photos`)."""
    if not SOURCES.accepts(spec):
        raise DataError(f"unknown data source {spec!r}; choose one of: {', '.join(SOURCES.spellings())}")
    name, arg = SOURCES.split(spec)
    fix = SOURCES.info[name].get("normalize")
    return f"{name}:{fix(arg) if fix else arg}" if arg is not None else name


def load_source(source: str, *, image_size: int | None = None, channels: int | None = None,
                random_samples: int = 100, random_classes: int = 2, seed: int = 0,
                resize: str = "stretch", on_bad_file: str = "skip", max_per_class: int | None = None,
                classes: list[str] | None = None, progress: bool = True) -> Dataset:
    """Decode a source into a Dataset at the requested size and channels (None: the source's own)."""
    if not SOURCES.accepts(source):
        raise DataError(f"unknown data source {source!r}; choose one of: {', '.join(SOURCES.spellings())}")
    name, arg = SOURCES.split(source)
    ds = SOURCES.create(name, arg, image_size=image_size, channels=channels, random_samples=random_samples,
                        random_classes=random_classes, seed=seed, resize=resize, on_bad_file=on_bad_file,
                        progress=progress)
    if classes is not None:
        ds = select_classes(ds, classes)
    if max_per_class is not None:
        ds = subsample_per_class(ds, max_per_class, seed)
    return ds


def load_data(d, progress: bool = True) -> Dataset:
    """The data a config's `data` section describes (a DataConfig, or anything with its attributes): the one
    way training, evaluation and the report rebuild a run's images."""
    return load_source(d.source, image_size=d.image_size, channels=d.channels, random_samples=d.random_samples,
                       random_classes=d.random_classes, seed=d.split_seed, resize=d.resize,
                       on_bad_file=d.on_bad_file, classes=d.classes, max_per_class=d.max_per_class,
                       progress=progress)


__all__ = ["Dataset", "DataError", "SOURCES", "load_source", "load_data", "list_datasets", "normalize_source",
           "IMAGE_EXTENSIONS", "decode_image", "scan_folder", "cache_dir"]
