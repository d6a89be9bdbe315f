"""`folder:PATH` sources: decode every image once (in threads), cache the uint8 result.

The cache file's name is a hash of the file list (paths, sizes, modification
times) and the preprocessing settings, so any added, removed or changed file, or
a new image size, gives a fresh decode; an unchanged folder loads in a moment.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .images import BadImage, DataError, decode_image, scan_folder
from .sources import Dataset, _atomic_save_npz, cache_dir

CACHE_VERSION = 1


def _cache_key(root: Path, files, size: int, channels: int, resize: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{root.resolve()}|{size}|{channels}|{resize}".encode())
    for rel, label, split in files:
        try:
            st = (root / rel).stat()
            h.update(f"|{rel}|{label}|{split}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"|{rel}|missing".encode())
    return h.hexdigest()[:20]


def load_folder(root: Path, size: int, channels: int, resize: str = "stretch", on_bad_file: str = "skip",
                progress: bool = True) -> Dataset:
    root = Path(root)
    classes, files, skipped = scan_folder(root)
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(sorted({'.jpg', '.png', '.bmp', '.gif', '.webp'}))}) "
                        "in its class folders")
    cache = cache_dir() / f"folder-{_cache_key(root, files, size, channels, resize)}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            images, keep = z["images"], z["keep"].tolist()
            bad = [tuple(x) for x in json.loads(str(z["bad"]))]
    else:
        images = np.zeros((len(files), channels, size, size), np.uint8)
        ok = np.zeros(len(files), bool)
        bad = []

        def work(i: int):
            try:
                images[i] = decode_image(root / files[i][0], size, channels, resize)
                ok[i] = True
                return None
            except BadImage as e:
                return files[i][0], str(e)

        threads = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(threads) as pool:
            results = pool.map(work, range(len(files)))
            for res in tqdm(results, total=len(files), desc=f"decoding {root.name}", unit="img",
                            disable=not progress, leave=False):
                if res is not None:
                    if on_bad_file == "fail":
                        raise DataError(f"bad image {root / res[0]}: {res[1]} "
                                        "(data.on_bad_file=skip skips such files and lists them)")
                    bad.append(res)
        keep = np.flatnonzero(ok).tolist()
        images = images[keep]
        _atomic_save_npz(cache, images=images, keep=np.array(keep, np.int64), bad=np.array(json.dumps(bad)))
    if on_bad_file == "fail" and bad:
        raise DataError(f"bad image {root / bad[0][0]}: {bad[0][1]}")
    kept = [files[i] for i in keep]
    labels = torch.tensor([f[1] for f in kept], dtype=torch.int64)
    # classes whose every file was bad are dropped (and listed), labels re-numbered
    present = sorted(set(labels.tolist()))
    for c in range(len(classes)):
        if c not in present and not any(s[0].endswith(classes[c]) for s in skipped):
            skipped.append((classes[c], "no readable image in this class"))
    remap = torch.full((len(classes),), -1, dtype=torch.int64)
    remap[present] = torch.arange(len(present))
    labels = remap[labels]
    classes = [classes[c] for c in present]
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class(es) with readable images; need at least 2")
    predefined = None
    if kept and kept[0][2] is not None:
        predefined = {s: [i for i, f in enumerate(kept) if f[2] == s] for s in ("train", "val", "test")}
    return Dataset(torch.from_numpy(np.ascontiguousarray(images)), labels, classes, f"folder:{root}",
                   paths=[f[0] for f in kept], predefined=predefined, bad_files=list(skipped) + list(bad))
