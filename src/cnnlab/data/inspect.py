"""`cnnlab datasets inspect folder:PATH`: what a folder holds, before any training.

Classes and counts, image sizes and modes, class imbalance, exact duplicates (by content hash)
— within a class, across classes (a label conflict) and across the train / val / test parts
training would use (a leak that inflates test scores) — and every file training would skip,
with its reason. Each file is read once, in threads: hashed, its header parsed, and decoded
completely (JPEG at 1/8 scale) so truncation is caught exactly as training would catch it.
"""

from __future__ import annotations

import hashlib
import os
import statistics
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..display import printable
from ..hardware import cpu_cores
from .images import BadImage, probe_image, scan_folder
from .split import stratified_split
from .stream import default_memory_budget, fits_in_memory

DEFAULT_IMAGE_SIZE, DEFAULT_CHANNELS = 64, 3  # a folder's defaults when data.image_size / channels are null


def _digest(path: Path) -> str | None:
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def _examine(path: Path):
    try:
        info = probe_image(path)
    except BadImage as e:
        return None, str(e)
    return (info, _digest(path)), None


def inspect_folder(path: str | Path, image_size: int | None = None, *, channels: int | None = None,
                   val_fraction: float = 0.15, test_fraction: float = 0.15, split_seed: int = 0,
                   memory_budget: int | None = None, workers: int | None = None, progress: bool = False) -> dict:
    """A JSON-ready description of an image folder (see the module docstring).

    image_size / channels: the training resolution (default 64 px RGB), for the decoded size and
    whether it fits `memory_budget` (bytes; default a fraction of available RAM).
    val_fraction / test_fraction / split_seed: the split to check for leaks (the config defaults);
    a folder's own train/val/test parts are kept, as training keeps them.
    """
    root = Path(os.path.expanduser(str(path)))
    classes, files, skipped = scan_folder(root)
    workers = workers or min(16, cpu_cores())
    with ThreadPoolExecutor(workers) as ex:
        results = list(tqdm(ex.map(lambda f: _examine(root / f[0]), files), total=len(files), unit="img",
                            desc=f"inspecting {root.name}", disable=not progress, leave=False))
    kept, infos, digests, bad = [], [], [], []
    for f, (ok, reason) in zip(files, results):
        if ok is None:
            bad.append((f[0], reason))
        else:
            kept.append(f)
            infos.append(ok[0])
            digests.append(ok[1])

    # counts, and the same class re-numbering and split training would make
    files_per_class = Counter(classes[f[1]] for f in files)
    counts = {c: 0 for c in classes}
    for f in kept:
        counts[classes[f[1]]] += 1
    present = sorted({f[1] for f in kept})
    renumber = {c: i for i, c in enumerate(present)}
    labels = torch.tensor([renumber[f[1]] for f in kept], dtype=torch.int64)
    predefined = None
    if kept and kept[0][2] is not None:
        predefined = {s: [i for i, f in enumerate(kept) if f[2] == s] for s in ("train", "val", "test")}
    part_of: dict[int, str] = {}
    split_method = None
    if len(present) >= 2:
        split = stratified_split(labels, val_fraction, test_fraction, split_seed, predefined)
        split_method = split.method
        for part in ("train", "val", "test"):
            for i in getattr(split, part):
                part_of[i] = part

    nonzero = {c: n for c, n in counts.items() if n}
    imbalance = None
    if nonzero:
        big, small = max(nonzero, key=nonzero.get), min(nonzero, key=nonzero.get)
        imbalance = {"ratio": round(nonzero[big] / nonzero[small], 3), "largest": big, "smallest": small}

    widths, heights = [i.width for i in infos], [i.height for i in infos]

    def dist(v):
        return {"min": min(v), "median": statistics.median(v), "max": max(v)} if v else None

    groups = defaultdict(list)
    for i, d in enumerate(digests):
        if d is not None:
            groups[d].append(i)
    duplicates = []
    for d, members in groups.items():
        if len(members) < 2:
            continue
        cls = {classes[kept[i][1]] for i in members}
        parts = {part_of.get(i) for i in members} - {None}
        kinds = []
        if len(cls) > 1:
            kinds.append("label conflict")
        if len(parts) > 1:
            kinds.append("leak: " + " / ".join(p for p in ("train", "val", "test") if p in parts))
        if not kinds:
            kinds.append("duplicate")
        duplicates.append({"hash": d, "kinds": kinds,
                           "files": [{"path": kept[i][0], "class": classes[kept[i][1]], "part": part_of.get(i)}
                                     for i in members]})
    duplicates.sort(key=lambda g: (not any(k.startswith("leak") for k in g["kinds"]),
                                   "label conflict" not in g["kinds"], g["files"][0]["path"]))

    size, ch = image_size or DEFAULT_IMAGE_SIZE, channels or DEFAULT_CHANNELS
    budget = default_memory_budget() if memory_budget is None else memory_budget
    decoded = len(kept) * ch * size * size
    return {
        "root": str(root),
        "layout": "train/val/test folders" if predefined else "one folder per class",
        "classes": classes,
        "counts": counts,                                   # readable images per class
        "files_per_class": dict(files_per_class),           # image files found, bad ones included
        "images": len(kept),
        "files": len(files),
        "empty_classes": [c for c in classes if not counts[c]],
        "imbalance": imbalance,
        "width": dist(widths),
        "height": dist(heights),
        "common_sizes": [[w, h, n] for (w, h), n in Counter(zip(widths, heights)).most_common(5)],
        "modes": dict(Counter(i.mode for i in infos).most_common()),
        "formats": dict(Counter(i.format or "?" for i in infos).most_common()),
        "split": {"method": split_method, "val_fraction": val_fraction, "test_fraction": test_fraction,
                  "seed": split_seed,
                  "counts": {p: sum(1 for v in part_of.values() if v == p) for p in ("train", "val", "test")}},
        "duplicates": duplicates,
        "duplicate_summary": {
            "groups": len(duplicates),
            "redundant_files": sum(len(g["files"]) - 1 for g in duplicates),
            "label_conflicts": sum("label conflict" in g["kinds"] for g in duplicates),
            "leaks": sum(any(k.startswith("leak") for k in g["kinds"]) for g in duplicates)},
        "bad_files": [list(s) for s in skipped] + [list(b) for b in bad],
        "decoded": {"image_size": size, "channels": ch, "bytes": decoded, "memory_budget": budget,
                    "loader": "in memory" if fits_in_memory(len(kept), ch, size, size, budget)
                    else "streamed from the cache"},
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n < 2**30 else f"{n / 2**30:,.2f} GB"


def format_inspection(r: dict, max_list: int = 20) -> str:
    """The report of inspect_folder as plain text (what `cnnlab datasets inspect` prints)."""
    P = printable  # names and paths come from the folder: shown escaped (no terminal codes)
    out = [(f"{P(r['root'])}: {r['images']:,} readable images of {r['files']:,} files, {len(r['classes'])} classes "
            f"({r['layout']})")]
    width = max([len(P(c)) for c in r["classes"]] + [5])
    top = max(r["counts"].values(), default=0) or 1
    out.append("")
    out.append(f"  {'class':<{width}}  {'images':>7}  {'bad':>5}")
    for c in r["classes"]:
        n, bad = r["counts"][c], r["files_per_class"].get(c, 0) - r["counts"][c]
        out.append(f"  {P(c):<{width}}  {n:>7,}  {bad or '':>5}  {'█' * max(0, round(24 * n / top))}")
    if r["imbalance"] and r["imbalance"]["ratio"] == 1:
        out.append("class imbalance: none (every class with images has the same count)")
    elif r["imbalance"]:
        im = r["imbalance"]
        out.append(f"class imbalance: {im['ratio']:g}× (largest {P(im['largest'])}, smallest {P(im['smallest'])})"
                   + ("  — consider data.max_per_class or a balanced loss" if im["ratio"] >= 3 else ""))
    if r["empty_classes"]:
        out.append(f"classes with no readable image (dropped by training): {', '.join(map(P, r['empty_classes']))}")
    if r["width"]:
        w, h = r["width"], r["height"]
        out.append(f"width  min {w['min']:g} / median {w['median']:g} / max {w['max']:g} px;  "
                   f"height min {h['min']:g} / median {h['median']:g} / max {h['max']:g} px")
        out.append("most common sizes: " + ", ".join(f"{a}×{b} ({n:,})" for a, b, n in r["common_sizes"]))
        out.append("modes: " + ", ".join(f"{m} {n:,}" for m, n in r["modes"].items())
                   + ";  formats: " + ", ".join(f"{m} {n:,}" for m, n in r["formats"].items()))
    s = r["split"]
    if s["method"]:
        out.append(f"split ({s['method']}, val {s['val_fraction']:g} / test {s['test_fraction']:g}, seed {s['seed']}): "
                   + " / ".join(f"{p} {n:,}" for p, n in s["counts"].items()))
    d = r["decoded"]
    out.append(f"decoded at {d['channels']}×{d['image_size']}×{d['image_size']}: {_mb(d['bytes'])} "
               f"(memory budget {_mb(d['memory_budget'])}: {d['loader']})")

    ds = r["duplicate_summary"]
    out.append("")
    if not ds["groups"]:
        out.append("duplicates: none (no two files with identical content)")
    else:
        out.append(f"duplicates: {ds['groups']} group(s) of identical files ({ds['redundant_files']} redundant), "
                   f"{ds['leaks']} leak(s) across splits, {ds['label_conflicts']} label conflict(s)")
        for g in r["duplicates"][:max_list]:
            files = ", ".join(f"{P(f['path'])}" + (f" [{f['part']}]" if f["part"] else "") for f in g["files"])
            out.append(f"  {'; '.join(g['kinds'])}: {files}")
        if len(r["duplicates"]) > max_list:
            out.append(f"  … {len(r['duplicates']) - max_list} more")
    out.append("")
    if not r["bad_files"]:
        out.append("bad files: none")
    else:
        out.append(f"bad files: {len(r['bad_files'])} (training skips and lists them; data.on_bad_file=fail stops)")
        for p, reason in r["bad_files"][:max_list]:
            out.append(f"  {P(p)}: {P(reason)}")
        if len(r["bad_files"]) > max_list:
            out.append(f"  … {len(r['bad_files']) - max_list} more")
    return "\n".join(out)
