"""`folder:PATH` sources: decode every image once (in threads), keep the uint8 result in an incremental cache.

One cache directory per (folder, image size, channels, resize, CACHE_VERSION) under `cache_dir()`:

    folders/<key>/index.json        {relative path: [row, size, mtime_ns]} for decoded files,
                                    [null, size, mtime_ns, reason] for bad ones
    folders/<key>/images-<id>.npy   (rows, C, H, W) uint8, rows in the dataset's order (memory-mapped)
    folders/<key>/lock              serialises processes loading the same folder (POSIX)

A load stats every file and re-decodes only new files and files whose size or mtime changed;
removed files are dropped, the rest reused. Bad files are remembered with their reason, so they
are not decoded again until they change (reasons outside the bytes — permissions, a missing link
target, Pillow's pixel limit — are re-checked every time, which costs no pixel decoding).
Updates are atomic: new data goes to new files, fsynced, then index.json is swapped in with
os.replace; the index names its data file, so a crash at any point leaves either the old cache
or the new one, never a half-written one that is trusted. A run stopped part-way (Ctrl-C, or
`on_bad_file: fail` meeting a bad file) commits what it had decoded, and the next run goes on
from there. A moved or renamed folder is a new cache (the key holds its resolved path).

The returned Dataset's images are a torch view of the memory-mapped file (copy-on-write, so the
cache can never be modified through it): nothing is read until used, and a split that does not
fit in memory can be streamed from it (data/stream.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..hardware import cpu_cores
from . import images as _images
from .images import IMAGE_EXTENSIONS, BadImage, DataError, missing_file_reason, scan_folder
from .dataset import Dataset, cache_dir
from .npyfile import (MAPS, NpyWriter, copy_rows, memmap_of, npy_shape, open_rows,  # noqa: F401
                      page_releaser, release_pages, row_runs)

CACHE_VERSION = 2  # 2: per-file incremental cache; JPEG decoded at reduced DCT scale (draft)
INDEX = "index.json"

# Threads, not processes. Measured on this project's 2-core machine, 800 JPEGs of 64–512 px →
# 64×64 RGB with decode_image: serial 1,400 img/s; 2 threads 2,020–2,060; 4 threads 1,910;
# a 2-process pool 2,310–2,330 — 12 % more, but only with fork from a bare interpreter. cnnlab
# has torch loaded (fork after torch has started threads is unsafe), and a spawned worker needs
# ~2.7 s to import cnnlab, which a 5,000-image folder (2.5 s of decoding) never earns back.
# Pillow releases the GIL while decoding and resizing, so threads get most of the second core.
def _default_workers() -> int:
    return min(16, cpu_cores())


@dataclass
class LoadStats:
    """What a load did: files seen, decoded now, reused from the cache, remembered-bad, removed."""

    files: int = 0
    decoded: int = 0          # decode_image calls made by this load
    reused: int = 0           # good rows taken from the cache
    bad_cached: int = 0       # bad files known from the cache, not decoded again
    removed: int = 0          # cache entries whose file is gone
    wrote_images: bool = False
    wrote_index: bool = False
    seconds: float = 0.0
    cache: Path | None = None


def folder_cache_dir(root: Path, size: int, channels: int, resize: str) -> Path:
    key = f"v{CACHE_VERSION}|{Path(root).resolve()}|{size}|{channels}|{resize}"
    return cache_dir() / "folders" / hashlib.sha256(key.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- cache index

def _read_index(cdir: Path, row_shape: tuple[int, ...]) -> tuple[dict, Path | None, int]:
    """(file entries, images file, its row count) of a valid cache, else ({}, None, 0)."""
    try:
        idx = json.loads((cdir / INDEX).read_text(encoding="utf-8"))
        if idx.get("version") != CACHE_VERSION or tuple(idx["row_shape"]) != row_shape:
            return {}, None, 0
        path, rows = cdir / idx["images"], int(idx["rows"])
        shape, offset = npy_shape(path)
        if shape != (rows, *row_shape) or path.stat().st_size != offset + rows * int(np.prod(row_shape)) \
                or not isinstance(idx["files"], dict):
            return {}, None, 0  # truncated or foreign data file: distrust it all
        return idx["files"], path, rows
    except (OSError, ValueError, KeyError, TypeError):
        return {}, None, 0


def _write_index(cdir: Path, root: Path, row_shape, images_name: str, rows: int, entries: dict) -> None:
    tmp = cdir / f"{INDEX}.{uuid.uuid4().hex[:8]}.tmp"
    body = {"version": CACHE_VERSION, "root": str(root.resolve()), "row_shape": list(row_shape),
            "images": images_name, "rows": rows, "files": entries}
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(body, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, cdir / INDEX)
    with contextlib.suppress(OSError, AttributeError):  # make the rename itself durable
        fd = os.open(cdir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock between processes (fcntl; a no-op where there is none, e.g. Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _cleanup(cdir: Path, keep: set[str]) -> None:
    """Remove every file the index no longer names. Runs under the lock, so no writer is active;
    a reader's open mapping of a removed file stays valid (POSIX); on Windows the delete fails
    and is retried by a later load."""
    for p in cdir.iterdir():
        if p.name not in keep and p.name not in (INDEX, "lock"):
            with contextlib.suppress(OSError):
                p.unlink()


# --------------------------------------------------------------------------- decoding

def _decode_ordered(root: Path, rels: list[str], size: int, channels: int, resize: str, workers: int):
    """Yields (rel, uint8 array | BadImage) in the order of `rels`, decoding ahead in threads.

    At most a few batches are in flight, so memory stays bounded however slow the consumer; when
    the consumer stops (fail on a bad file, Ctrl-C) the remaining work is cancelled.
    """
    def work(rel: str):
        try:
            return _images.decode_image(root / rel, size, channels, resize)
        except BadImage as e:
            return e

    window = max(8, 16 * workers)
    ex = ThreadPoolExecutor(workers, thread_name_prefix="cnnlab-decode")
    pending: deque = deque()
    it = iter(rels)
    try:
        for rel in it:
            pending.append((rel, ex.submit(work, rel)))
            if len(pending) >= window:
                break
        while pending:
            rel, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(work, nxt)))
            yield rel, fut.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _bad_error(root: Path, rel: str, reason: str) -> DataError:
    return DataError(f"bad image {root / rel}: {reason} (data.on_bad_file=skip skips such files and lists them)")


# --------------------------------------------------------------------------- load

def load_folder_cached(root: Path, size: int, channels: int, resize: str = "stretch", on_bad_file: str = "skip",
                       progress: bool = True, workers: int | None = None) -> tuple[Dataset, LoadStats]:
    """Decode `root` into a Dataset, reusing every unchanged file's cached pixels; also returns LoadStats."""
    t0 = time.perf_counter()
    root = Path(root)
    classes, files, skipped = scan_folder(root)
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in its class folders")
    cdir = folder_cache_dir(root, size, channels, resize)
    stats = LoadStats(files=len(files), cache=cdir)
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        with _locked(cdir / "lock"):
            arr, kept, bad = _update(root, cdir, (channels, size, size), resize, files, on_bad_file, progress,
                                     workers or _default_workers(), stats)
    except OSError as e:  # the cache's own files: an unreadable image never raises, it becomes a BadImage
        raise DataError(f"cannot write the decode cache in {cdir}: {e}; free some space or point "
                        "CNNLAB_CACHE elsewhere") from e
    stats.seconds = time.perf_counter() - t0
    return _dataset(root, classes, kept, arr, skipped, bad), stats


def _update(root: Path, cdir: Path, row_shape: tuple[int, int, int], resize: str, files, on_bad_file: str,
            progress: bool, workers: int, stats: LoadStats):
    """Under the lock: plan, decode what changed, commit, map; returns (rows, kept files, bad files)."""
    channels, size = row_shape[0], row_shape[1]
    old = _Cache(*_read_index(cdir, row_shape))
    plan = _plan(root, files, old.entries)
    stats.removed = len(set(old.entries) - set(plan))
    stats.reused = sum(p[0] == "old" for p in plan.values())
    stats.bad_cached = sum(p[0] == "bad" and p[2] is not None for p in plan.values())
    known_bad = [(rel, p[1]) for rel, p in plan.items() if p[0] == "bad"]
    if on_bad_file == "fail" and known_bad:  # before any decoding, also when known from the cache
        raise _bad_error(root, *known_bad[0])

    outcome: dict[str, tuple] = {}  # rel → ("row", row in the new file) | ("bad", reason, transient)
    to_decode = [rel for rel, p in plan.items() if p[0] == "new"]
    new = None
    if to_decode:
        new = NpyWriter(cdir / f"images-{uuid.uuid4().hex[:12]}.npy", row_shape, len(to_decode))
        failure: BaseException | None = None
        bar = tqdm(total=len(to_decode), unit="img", leave=False, disable=not progress,
                   desc=f"decoding {root.name}" + (f" ({stats.reused} cached)" if stats.reused else ""))
        try:
            for rel, res in _decode_ordered(root, to_decode, size, channels, resize, workers):
                stats.decoded += 1
                bar.update()
                if isinstance(res, BadImage):
                    outcome[rel] = ("bad", str(res), res.transient)
                    if on_bad_file == "fail":
                        failure = _bad_error(root, rel, str(res))
                        break
                else:  # pixels first, then the record: an interrupt between the two loses a row, never
                    row = new.rows  # points the index at one that was not written
                    new.append(res)
                    outcome[rel] = ("row", row)
        except BaseException as e:  # Ctrl-C or a crash mid-way: keep what was decoded
            failure = e
            raise
        finally:
            bar.close()
            new.finish()
            if failure is not None:  # commit the partial work, so the next run resumes from it
                with contextlib.suppress(Exception):
                    _commit(root, cdir, row_shape, files, plan, outcome, old, new, stats)
        if failure is not None:
            raise failure
    images_path, kept, bad = _commit(root, cdir, row_shape, files, plan, outcome, old, new, stats)
    arr = open_rows(images_path, len(kept), row_shape)  # mapped under the lock: no one replaces it meanwhile
    if arr is None:
        raise DataError(f"decode cache {images_path} is unreadable; delete {cdir} and retry")
    return arr, kept, bad


def load_folder(root: Path, size: int, channels: int, resize: str = "stretch", on_bad_file: str = "skip",
                progress: bool = True) -> Dataset:
    """`folder:PATH` as a Dataset (see load_folder_cached)."""
    return load_folder_cached(root, size, channels, resize, on_bad_file, progress)[0]


@dataclass
class _Cache:
    entries: dict
    path: Path | None
    rows: int


def _plan(root: Path, files, entries: dict) -> dict[str, tuple]:
    """Per file: ("old", row, sig) reuse | ("bad", reason, cached entry or None) | ("new", sig) decode.

    sig = [size, mtime_ns]: a file is decoded again when either changes.
    """
    plan: dict[str, tuple] = {}
    for rel, _, _ in files:
        try:
            st = os.stat(root / rel)
        except FileNotFoundError:
            plan[rel] = ("bad", missing_file_reason(root / rel), None)
            continue
        except PermissionError:
            plan[rel] = ("bad", _images.PERMISSION_DENIED, None)
            continue
        except OSError as e:
            plan[rel] = ("bad", f"unreadable ({e.strerror or e})", None)
            continue
        sig = [st.st_size, st.st_mtime_ns]
        e = entries.get(rel)
        if isinstance(e, list) and len(e) >= 3 and e[1:3] == sig:
            plan[rel] = ("old", e[0], sig) if e[0] is not None else ("bad", e[3], e)
        else:
            plan[rel] = ("new", sig)
    return plan


def _commit(root: Path, cdir: Path, row_shape, files, plan, outcome, old: _Cache, new: NpyWriter | None,
            stats: LoadStats):
    """Assemble the images file in dataset order and swap in the index; returns (images file, kept, bad).

    Files neither reused nor decoded (after a failure) are left out, to be decoded next time.
    """
    seq: list[tuple[str, int]] = []  # ("old" | "new", source row) for each kept file, in dataset order
    kept, bad, entries = [], [], {}
    for f in files:
        rel = f[0]
        p = plan[rel]
        if p[0] == "bad":
            bad.append((rel, p[1]))
            if p[2] is not None:
                entries[rel] = p[2]
            continue
        if p[0] == "old":
            seq.append(("old", p[1]))
            sig = p[2]
        elif rel in outcome:
            o = outcome[rel]
            if o[0] == "bad":
                bad.append((rel, o[1]))
                if not o[2]:  # transient reasons (permissions, link targets) are re-checked each time
                    entries[rel] = [None, *p[1], o[1]]
                continue
            seq.append(("new", o[1]))
            sig = p[1]
        else:
            continue
        entries[rel] = [len(kept), *sig]
        kept.append(f)
    old_rows = [r for k, r in seq if k == "old"]
    new_rows = [r for k, r in seq if k == "new"]
    if old.path is not None and not new_rows and old_rows == list(range(old.rows)):
        images_path = old.path  # the same rows in the same order: keep the file
    elif new is not None and not old_rows and new_rows == list(range(new.rows)):
        images_path = new.path  # everything decoded now, already in dataset order
    else:  # merge reused and new rows in dataset order
        images_path = cdir / f"images-{uuid.uuid4().hex[:12]}.npy"
        w = NpyWriter(images_path, row_shape, len(seq))
        try:
            i = 0
            while i < len(seq):
                j = i
                while j < len(seq) and seq[j][0] == seq[i][0]:
                    j += 1
                src = old.path if seq[i][0] == "old" else new.path
                copy_rows(w, src, row_runs([r for _, r in seq[i:j]]), int(np.prod(row_shape)))
                i = j
            w.finish()
        except BaseException:
            w.discard()
            raise
    stats.wrote_images = images_path != old.path
    if stats.wrote_images or entries != old.entries:
        _write_index(cdir, root, row_shape, images_path.name, len(kept), entries)
        stats.wrote_index = True
    _cleanup(cdir, {images_path.name})
    return images_path, kept, bad


def _dataset(root: Path, classes: list[str], kept: list, arr: np.ndarray, skipped: list, bad: list) -> Dataset:
    """The Dataset of the kept files; classes with no readable image are dropped (and listed)."""
    skipped = list(skipped)
    labels = torch.tensor([f[1] for f in kept], dtype=torch.int64)
    present = sorted(set(labels.tolist()))
    empty_dirs = {Path(s[0]).name for s in skipped}
    tail = [(classes[c], "no readable image in this class") for c in range(len(classes))
            if c not in present and classes[c] not in empty_dirs]
    remap = torch.full((len(classes),), -1, dtype=torch.int64)
    remap[present] = torch.arange(len(present))
    labels = remap[labels]
    classes = [classes[c] for c in present]
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class(es) with readable images; need at least 2"
                        + (f" ({len(bad)} bad file(s), e.g. {bad[0][0]}: {bad[0][1]})" if bad else ""))
    predefined = None
    if kept and kept[0][2] is not None:
        predefined = {s: [i for i, f in enumerate(kept) if f[2] == s] for s in ("train", "val", "test")}
    if isinstance(arr, np.memmap):
        images = torch.from_numpy(arr)  # copy-on-write map: writes (never made) would not reach the file
        MAPS[images.data_ptr()] = arr
    else:
        images = torch.from_numpy(np.ascontiguousarray(arr))
    return Dataset(images, labels, classes, f"folder:{root}", paths=[f[0] for f in kept], predefined=predefined,
                   bad_files=skipped + bad + tail)
