"""Decoding one image file to a fixed-size uint8 array, and scanning class folders.

Every failure becomes a short, precise reason string so a run can skip the file
and list it (bad_files.csv) instead of dying mid-way; `on_bad_file: fail` turns
the first one into an error naming the file. The reasons are fixed phrases (plus
the few facts that matter: the link target, the pixel count), so they can be
compared, counted and cached (the last three are "transient", re-checked every run):

    empty file (0 bytes)
    not an image (content matches no known image format)
    truncated JPEG (the file ends before the image data does)
    corrupt PNG (image signature found but the header cannot be parsed)
    corrupt WEBP (could not create decoder object)
    decompression bomb: 1,600 pixels, over Pillow's limit of 1,000 (PIL.Image.MAX_IMAGE_PIXELS)
    permission denied
    broken symbolic link (target x.jpg does not exist)
    unsupported colour mode LAB
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}

EMPTY_FILE = "empty file (0 bytes)"
NOT_AN_IMAGE = "not an image (content matches no known image format)"
PERMISSION_DENIED = "permission denied"

# magic numbers of the formats a folder normally holds: tells "truncated/corrupt JPEG" from "not an image"
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"))


class DataError(ValueError):
    """Data that cannot be used; the message names the file or the setting."""


class BadImage(Exception):
    """One unusable image file; str() is the reason.

    transient: the cause lies outside the file's bytes (permissions, a missing link target, the
    pixel limit), so the decode cache must not remember it: a chmod does not change the file's
    size or mtime. These are cheap to re-check (no pixel data is decoded).
    """

    def __init__(self, reason: str, transient: bool = False):
        super().__init__(reason)
        self.transient = transient


@dataclass
class ImageInfo:
    """What the file header says, before any conversion: stored size (not EXIF-rotated), mode, format."""

    width: int
    height: int
    mode: str
    format: str | None


def sniff_format(head: bytes) -> str | None:
    """The image format a file's first bytes announce, or None."""
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def missing_file_reason(path: str | Path) -> str:
    """Why a listed path cannot be opened although the scan found it (transient)."""
    path = Path(path)
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"broken symbolic link (target {target} does not exist)"
    return "file disappeared after the folder was scanned"


def _bomb_reason(pixels: int | None, limit: int | None) -> str:
    what = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
    return f"decompression bomb: {what}, over Pillow's limit of {limit or 0:,} (PIL.Image.MAX_IMAGE_PIXELS)"


def _read_image(path: str | Path, draft_size: tuple[int, int] | None) -> tuple[Image.Image, ImageInfo]:
    """Open, check and fully decode one file (first frame, EXIF orientation applied). Raises BadImage.

    draft_size: for JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale while staying ≥ this size —
    a 512-px photo resized to 64 px decodes ~5× faster, and the bilinear resize that follows sees
    an image at least as large as its target, as before.
    """
    path = Path(path)
    try:
        st = path.stat()  # follows symbolic links
    except FileNotFoundError:
        raise BadImage(missing_file_reason(path), transient=True) from None
    except PermissionError:
        raise BadImage(PERMISSION_DENIED, transient=True) from None
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror or e})", transient=True) from None
    if st.st_size == 0:
        raise BadImage(EMPTY_FILE)
    fmt = None
    try:
        with open(path, "rb") as f:
            fmt = sniff_format(f.read(16))
            f.seek(0)
            with Image.open(f) as img:
                fmt = img.format or fmt
                info = ImageInfo(img.width, img.height, img.mode, img.format)
                # Pillow raises above 2× its limit and only warns between 1× and 2×: refuse both
                # (checked here rather than by turning the warning into an error, because
                # warnings.catch_warnings is process-global and decoding runs in threads).
                limit = Image.MAX_IMAGE_PIXELS
                pixels = max(1, img.width) * max(1, img.height)
                if limit and pixels > limit:  # transient: it depends on a setting, not only on the bytes
                    raise BadImage(_bomb_reason(pixels, limit), transient=True)
                img.seek(0)  # animated GIF / WebP: the first frame
                if draft_size and img.format == "JPEG":
                    img.draft(None, draft_size)
                img.load()  # decode now, so truncation surfaces here
                try:
                    ImageOps.exif_transpose(img, in_place=True)
                except Exception:  # noqa: BLE001, S110 — malformed EXIF: the pixels are fine, keep them as stored
                    pass
                return img, info
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise BadImage(_bomb_reason(int(m.group(1)) if m else None, Image.MAX_IMAGE_PIXELS), transient=True) from None
    except UnidentifiedImageError:
        if fmt is None:
            raise BadImage(NOT_AN_IMAGE) from None
        raise BadImage(f"corrupt {fmt} (image signature found but the header cannot be parsed)") from None
    except PermissionError:
        raise BadImage(PERMISSION_DENIED, transient=True) from None
    except MemoryError:
        raise BadImage("too large to decode (out of memory)") from None
    except Exception as e:  # noqa: BLE001 — any decoder failure is this file's problem, never the run's
        msg = str(e) or type(e).__name__
        if isinstance(e, EOFError) or "truncated" in msg.lower():
            raise BadImage(f"truncated {fmt or 'image'} (the file ends before the image data does)") from None
        raise BadImage(f"corrupt {fmt or 'image'} ({msg})") from None


def probe_image(path: str | Path) -> ImageInfo:
    """Header facts of a file after checking that it decodes completely (at 1/8 scale for JPEG)."""
    return _read_image(path, (1, 1))[1]


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode → 'L' or 'RGB'. Transparency is composited over black;
    16-bit and float images are scaled to 0–255 rather than clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
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

    Raises BadImage with a reason for anything unusable. Training, evaluation and prediction
    all decode through here, so a model sees the same pixels at every stage.
    """
    img, info = _read_image(path, (size, size))
    try:
        img = _to_mode(img, channels)
    except (ValueError, OSError) as e:
        raise BadImage(f"unsupported colour mode {info.mode} ({e})") from None
    if resize == "center-crop":
        img = ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR)
    else:
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------- folders

IGNORED_DIRS = {"__MACOSX"}  # macOS zip archives' resource forks: never a class


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_DIRS


def _image_files(cdir: Path) -> list[str]:
    """Image-extension files under `cdir` (recursively, symbolic links included — a broken one is
    reported later), skipping hidden files and folders; paths relative to `cdir`, in path order.

    os.scandir rather than Path.rglob: a folder of 100,000 files is listed in a fraction of the time.
    """
    out: list[tuple[str, ...]] = []
    stack = [()]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(cdir, *rel)))
        except OSError:
            continue
        for e in entries:
            if _hidden(e.name):
                continue
            if e.is_dir(follow_symlinks=False):
                stack.append(rel + (e.name,))
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and \
                    (e.is_symlink() or e.is_file(follow_symlinks=False)):
                out.append(rel + (e.name,))
    out.sort()  # part by part, as sorted(Path) orders them
    return [os.path.join(*parts) for parts in out]


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not _hidden(d.name))


def scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int, str | None]], list[tuple[str, str]]]:
    """Classes, files as (relative path, class index, split or None) and skipped entries.

    Layouts: root/<class>/* or root/{train,val,test}/<class>/* (val may be named 'valid'/'validation').
    Hidden files and folders (.DS_Store, ._x.jpg, .thumbs/), __MACOSX and files without an image
    extension are ignored (not errors); an empty class folder is listed as skipped.
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
            found = _image_files(cdir)
            prefix = str(cdir.relative_to(root))
            if not found:
                skipped.append((prefix, "empty class folder (no image files)"))
            label = classes.index(cdir.name)
            files += [(os.path.join(prefix, f), label, split) for f in found]
    return classes, files, skipped
