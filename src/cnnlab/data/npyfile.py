"""uint8 image rows in .npy files: written sequentially, read back memory-mapped copy-on-write.

The decode cache's storage (data/folder.py): a file is appended row by row with plain writes (no mapping
grows the process's memory), its header is fixed once the row count is known, and it is read back as a
copy-on-write map, whose pages the streaming loader can drop from the resident set after reading.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

NPY_MAGIC = b"\x93NUMPY\x01\x00"


def npy_header(shape: tuple[int, ...], total: int | None = None) -> bytes:
    """A version-1.0 .npy header for uint8 `shape`, padded to `total` bytes (default: next multiple of 64).

    Padding to a fixed length lets a file be written with room for `max_rows` rows and its
    header rewritten in place once the real row count is known (only ever smaller).
    """
    d = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {tuple(int(s) for s in shape)!r}, }}"
    need = len(NPY_MAGIC) + 2 + len(d) + 1
    total = total or -(-need // 64) * 64
    if total < need:
        raise ValueError("npy header does not fit")
    return NPY_MAGIC + struct.pack("<H", total - len(NPY_MAGIC) - 2) + (d + " " * (total - need) + "\n").encode()


class NpyWriter:
    """Appends uint8 rows to a new .npy file sequentially (plain writes: no mapping grows the RSS)."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], max_rows: int):
        self.path, self.row_shape, self.rows = path, tuple(row_shape), 0
        self.header_len = len(npy_header((max_rows, *row_shape)))
        self.f = open(path, "wb")  # noqa: SIM115 — held until finish() or discard()
        self.f.write(npy_header((max_rows, *row_shape)))

    def append(self, data) -> None:
        a = np.ascontiguousarray(data, dtype=np.uint8)
        self.f.write(memoryview(a).cast("B"))
        self.rows += len(a) if a.shape != self.row_shape else 1

    def write_raw(self, data: bytes, rows: int) -> None:
        self.f.write(data)
        self.rows += rows

    def finish(self) -> None:
        self.f.seek(0)
        self.f.write(npy_header((self.rows, *self.row_shape), self.header_len))
        self.f.truncate(self.header_len + self.rows * int(np.prod(self.row_shape)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def npy_shape(path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, data offset) from an .npy header; raises ValueError / OSError if it is not a uint8 .npy."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        if fortran or dtype != np.uint8:
            raise ValueError(f"{path}: not a C-order uint8 array")
        return tuple(shape), f.tell()


def open_rows(path: Path, rows: int, row_shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array, memory-mapped copy-on-write, or None if missing / not the expected shape."""
    try:
        if rows == 0:  # a zero-row array cannot be mapped; check the header only
            return np.zeros((0, *row_shape), np.uint8) if npy_shape(path)[0] == (0, *row_shape) else None
        a = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return a if a.dtype == np.uint8 and a.shape == (rows, *row_shape) else None


# The memory maps behind Dataset.images, by data pointer, so the streaming loader can drop pages
# it has read from its resident set (madvise) — never done to memory that is not such a map.
MAPS: weakref.WeakValueDictionary[int, np.memmap] = weakref.WeakValueDictionary()


def memmap_of(images: torch.Tensor) -> np.memmap | None:
    """The cache file mapping a tensor returned by load_folder views (None for any other tensor)."""
    m = MAPS.get(images.data_ptr()) if images.numel() else None
    return m if m is not None and m.nbytes == images.numel() * images.element_size() else None


def page_releaser(images: torch.Tensor) -> Callable[[], None] | None:
    """A function dropping the cache file's pages from this process' resident set, or None when
    `images` is not a view of a cache file (then nothing may be dropped: it would be data)."""
    m = memmap_of(images)
    mm = getattr(m, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    return lambda: mm.madvise(mmap.MADV_DONTNEED)  # read-only private map: pages re-read from the file


def release_pages(images: torch.Tensor) -> bool:
    """Drop the pages of a cache-file view from this process' resident set (e.g. after the in-memory
    loader has copied its splits out of it); they stay in the OS page cache. False if not a cache view."""
    release = page_releaser(images)
    if release is not None:
        release()
    return release is not None


def copy_rows(dst: NpyWriter, src_path: Path, runs: list[tuple[int, int]], row_bytes: int) -> None:
    """Append rows [a, b) of each run from an .npy file with positioned reads (page cache, not our RSS)."""
    offset = npy_shape(src_path)[1]
    with open(src_path, "rb") as f:
        fd = f.fileno()
        chunk = max(1, (64 << 20) // row_bytes)
        for a, b in runs:
            for s in range(a, b, chunk):
                e = min(b, s + chunk)
                data = os.pread(fd, (e - s) * row_bytes, offset + s * row_bytes)
                if len(data) != (e - s) * row_bytes:  # never let missing rows become zeros in the new file
                    raise OSError(f"{src_path}: rows {s}–{e} are beyond the end of the file")
                dst.write_raw(data, e - s)


def row_runs(seq: list[int]) -> list[tuple[int, int]]:
    """[3,4,5,9,10] → [(3, 6), (9, 11)]"""
    out: list[tuple[int, int]] = []
    for r in seq:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out
