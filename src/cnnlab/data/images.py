"""Decoding one image file to a fixed-size uint8 array, and scanning class folders.

Every failure becomes a short reason string so a run can skip the file and list
it (bad_files.csv) instead of dying mid-way; `on_bad_file: fail` turns the first
one into an error naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


class DataError(ValueError):
    """Data that cannot be used; the message names the file or the setting."""


class BadImage(Exception):
    """One unusable image file; str() is the reason."""


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode → 'L' or 'RGB'. Transparency is composited over black;
    16-bit and float images are scaled to 0–255 rather than clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def decode_image(path: str | Path, size: int, channels: int, resize: str = "stretch") -> np.ndarray:
    """(channels, size, size) uint8 from an image file, upright (EXIF), first frame of animations.

    Raises BadImage with a reason for anything unusable.
    """
    path = Path(path)
    try:
        if path.is_symlink() and not path.exists():
            raise BadImage("broken symbolic link")
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.seek(0)  # animated GIF/WebP: first frame
                img.load()  # decode now so truncation errors surface here
                img = ImageOps.exif_transpose(img)
                img = _to_mode(img, channels)
                if resize == "center-crop":
                    img = ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR)
                else:
                    img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
                arr = np.asarray(img, dtype=np.uint8)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unidentified format)") from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt data
        raise BadImage(f"corrupt or truncated image: {e}") from None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int, str | None]], list[tuple[str, str]]]:
    """Classes, files as (relative path, class index, split or None) and skipped entries.

    Layouts: root/<class>/* or root/{train,val,test}/<class>/* (val may be named 'valid'/'validation').
    Hidden files and files without an image extension are ignored (not errors).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    split_names = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
    top = _class_dirs(root)
    split_dirs = [d for d in top if d.name.lower() in split_names]
    if split_dirs and any(d.name.lower() == "train" for d in split_dirs):
        groups = [(d, split_names[d.name.lower()]) for d in split_dirs]
    else:
        groups = [(root, None)]
    classes = sorted({c.name for g, _ in groups for c in _class_dirs(g)})
    if not classes:
        raise DataError(f"{root}: no class sub-folders found; expected {root}/<class>/<image files> "
                        f"or {root}/train/<class>/…")
    files, skipped = [], []
    for group, split in groups:
        for cdir in _class_dirs(group):
            found = sorted(p for p in cdir.rglob("*") if (p.is_file() or p.is_symlink()) and _is_image(p))
            if not found:
                skipped.append((str(cdir.relative_to(root)), "empty class folder (no image files)"))
            for p in found:
                files.append((str(p.relative_to(root)), classes.index(cdir.name), split))
    return classes, files, skipped
