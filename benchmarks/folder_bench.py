"""Image folders at scale: cnnlab's decode-once cache against torchvision ImageFolder + DataLoader.

    python benchmarks/folder_bench.py /tmp/bench-jpegs --write BENCHMARKS.md   # 100,000 JPEGs, 3 runs
    python benchmarks/folder_bench.py /tmp/bench-jpegs --n 5000 --repeats 1   # a quick look

Generates DIR/images/<class>/<i>.jpg (10 classes, sides drawn from 64–512 px, quality 90) unless
already there, then runs each measurement in its own process (so each peak RSS is its own):

  decode        first load with an empty cache: decode + resize to SIZE, write the uint8 cache
  cached        second load: stat every file, map the cache
  epoch-memory  one pass over all images from the cache, in-memory loader (DeviceLoader)
  epoch-stream  the same through StreamingLoader (memory-mapped, sorted reads, prefetch)
  torchvision   ImageFolder + DataLoader(num_workers=2): decode + resize every epoch

An "epoch" here is the data pipeline alone — every image once, in shuffled batches of --batch,
normalised to float (B, C, SIZE, SIZE) — so the numbers compare loaders, not models.
Prints (and with --write, puts into BENCHMARKS.md) a Markdown table of medians, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cnnlab.hardware import capability  # noqa: E402
from bench_common import machine, machine_line, markers, publish  # benchmarks/ is on sys.path

CLASSES = [f"class{i}" for i in range(10)]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _children_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child


# --------------------------------------------------------------------------- the folder

def _make(args) -> None:
    i, path = args
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    w, h = (int(v) for v in rng.integers(64, 513, 2))
    label = i % len(CLASSES)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(x * (label + 1) * 2) % 256, (y * (10 - label)) % 256, ((x + y) * 1.5) % 256], -1)
    img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def generate(root: Path, n: int, workers: int) -> float:
    """root/<class>/<i>.jpg for i < n; skips files already there. Returns seconds."""
    from multiprocessing import Pool

    t = time.perf_counter()
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    todo = [(i, root / CLASSES[i % len(CLASSES)] / f"{i:06d}.jpg") for i in range(n)]
    todo = [a for a in todo if not a[1].exists()]
    if todo:
        with Pool(workers) as pool:
            for k, _ in enumerate(pool.imap_unordered(_make, todo, chunksize=64)):
                if k % 5000 == 0:
                    print(f"  generating: {k:,}/{len(todo):,}", file=sys.stderr, flush=True)
    return time.perf_counter() - t


# --------------------------------------------------------------------------- phases (one process each)

def _epochs(loader, epochs: int) -> dict:
    """Iterate `loader` `epochs` times: every epoch's seconds, and the fastest."""
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        for _batch in loader:
            pass
        times.append(time.perf_counter() - t)
    return {"epoch_s": min(times), "epoch_times": times}


def phase(name: str, a) -> dict:
    import torch

    import cnnlab.data.folder  # noqa: F401  (what every phase imports: the baseline below)

    torch.set_num_threads(a.threads)
    base = _rss_mb()
    root = Path(a.dir) / "images"
    if name in ("decode", "cached", "epoch-memory", "epoch-stream"):
        from cnnlab.data.folder import load_folder_cached

        t = time.perf_counter()
        ds, stats = load_folder_cached(root, a.size, 3, progress=False)
        load_s = time.perf_counter() - t
        out = {"images": len(ds), "load_s": load_s, "decoded": stats.decoded, "reused": stats.reused,
               "bad": len(ds.bad_files), "cache_mb": ds.images.numel() / 2**20}
        if name.startswith("epoch"):
            from cnnlab.data.loader import DeviceLoader
            from cnnlab.data.stream import StreamingLoader, fit_normalizer

            norm = fit_normalizer(ds.images)
            g = torch.Generator().manual_seed(0)
            if name == "epoch-memory":
                loader = DeviceLoader(ds.images.clone(), ds.labels, norm, a.batch, shuffle=True, generator=g)
            else:
                loader = StreamingLoader(ds.images, ds.labels, norm, a.batch, shuffle=True, generator=g)
            out.update(_epochs(loader, a.epochs))
        out["rss_mb"], out["base_rss_mb"] = _rss_mb(), base
        return out
    if name == "torchvision":
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.Resize((a.size, a.size)), transforms.PILToTensor(),
                                 transforms.ConvertImageDtype(torch.float32),
                                 transforms.Normalize([0.5] * 3, [0.25] * 3)])
        ds = datasets.ImageFolder(str(root), transform=tf)
        loader = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers,
                            generator=torch.Generator().manual_seed(0), persistent_workers=a.epochs > 1)
        return {"images": len(ds), **_epochs(loader, a.epochs), "rss_mb": _rss_mb(), "base_rss_mb": base,
                "worker_rss_mb": _children_rss_mb()}
    raise SystemExit(f"unknown phase {name}")


def _run_phase(name: str, a, env: dict) -> dict:
    epochs = a.tv_epochs if name == "torchvision" else a.epochs
    cmd = [sys.executable, __file__, a.dir, "--phase", name, "--size", str(a.size), "--batch", str(a.batch),
           "--epochs", str(epochs), "--workers", str(a.workers), "--threads", str(a.threads)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in res.items() if k != "epoch_times"), file=sys.stderr, flush=True)
    return res


START, END = markers("folder-bench")  # a section per CPU kind


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def markdown(r: dict[str, list[dict]], a, n: int) -> str:
    reps = len(r["decode"])
    out = [START, f"## Image folders: decode once, then epochs from the cache (issue 5) — {capability()}", "",
           f"`python benchmarks/folder_bench.py DIR --n {a.n} --repeats {a.repeats}` — generates {n:,} JPEGs "
           "(sides 64–512 px, 10 classes), then compares cnnlab's decode-once cache with torchvision "
           f"`ImageFolder` + `DataLoader` ({a.workers} workers) decoding and resizing every epoch, at "
           f"{a.size}×{a.size} RGB, batch {a.batch}. An epoch here is the data pipeline alone (every image once, "
           "shuffled, normalised float batches), no model. Each figure is the median of "
           f"{reps} runs, each in its own process (the cache is deleted before every first load); an epoch "
           f"figure within a run is the fastest of {a.epochs} epochs for cnnlab and {a.tv_epochs} for "
           "torchvision.", "", f"Machine: {machine_line(machine())}. Measured {time.strftime('%Y-%m-%d')}.", "",
           "| pipeline | what | time | images/s | peak RSS (this process) |", "|---|---|---:|---:|---:|"]

    def rss(runs):
        return f"{_median(runs, 'rss_mb'):,.0f} MB"

    d = r["decode"]
    out.append(f"| cnnlab | first load: decode + resize + write the cache ({d[0]['cache_mb']:,.0f} MB) | "
               f"{_median(d, 'load_s'):.1f} s | {n / _median(d, 'load_s'):,.0f} | {rss(d)} |")
    c = r["cached"]
    out.append(f"| cnnlab | second load (stat {n:,} files, map the cache) | {_median(c, 'load_s'):.2f} s | – | "
               f"{rss(c)} |")
    for key, label in (("epoch-memory", "epoch from the cache, in memory"),
                       ("epoch-stream", "epoch from the cache, streamed (over data.memory_budget)")):
        e = r[key]
        out.append(f"| cnnlab | {label} | {_median(e, 'epoch_s'):.2f} s | {n / _median(e, 'epoch_s'):,.0f} | "
                   f"{rss(e)} |")
    if r.get("torchvision"):
        t = r["torchvision"]
        out.append(f"| torchvision | ImageFolder + DataLoader({a.workers} workers): decode + resize, one epoch | "
                   f"{_median(t, 'epoch_s'):.1f} s | {n / _median(t, 'epoch_s'):,.0f} | {rss(t)} + "
                   f"{_median(t, 'worker_rss_mb'):,.0f} MB (largest worker) |")
        sp_s = statistics.median(tv["epoch_s"] / st["epoch_s"] for tv, st in zip(t, r["epoch-stream"]))
        sp_m = statistics.median(tv["epoch_s"] / mm["epoch_s"] for tv, mm in zip(t, r["epoch-memory"]))
        out += ["", f"Epochs from the cache are {sp_s:.0f}× (streamed) and {sp_m:.0f}× (in memory) faster than "
                f"decoding every epoch (target ≥ 5×; ratios within each run, then the median); the first load, "
                f"which decodes once, costs {_median(d, 'load_s') / _median(t, 'epoch_s'):.1f} torchvision epochs. "
                f"The streamed run's peak RSS is {rss(r['epoch-stream'])} (target < 2 GB), of which "
                f"{_median(r['epoch-stream'], 'base_rss_mb'):,.0f} MB is importing torch and cnnlab."]
    out += ["", END]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="working folder: images/ (generated once) and cache/ go here")
    p.add_argument("--n", type=int, default=100_000, help="number of JPEGs (default 100,000)")
    p.add_argument("--size", type=int, default=64, help="training resolution (default 64)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--epochs", type=int, default=2, help="cnnlab epochs per run; the fastest counts (default 2)")
    p.add_argument("--tv-epochs", type=int, default=1, help="torchvision epochs per run (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="runs of every measurement; medians reported (default 3)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for torchvision (default 2)")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch threads")
    p.add_argument("--skip-torchvision", action="store_true")
    p.add_argument("--write", help="put the Markdown section into this file (e.g. BENCHMARKS.md)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        print(json.dumps(phase(a.phase, a)))
        return

    root = Path(a.dir)
    gen_s = generate(root / "images", a.n, a.workers)
    print(f"folder: {a.n:,} JPEGs in {root / 'images'} (generated in {gen_s:.1f} s)", file=sys.stderr)
    cache = root / "cache"
    env = dict(os.environ, CNNLAB_CACHE=str(cache))
    names = ["decode", "cached", "epoch-memory", "epoch-stream"] + ([] if a.skip_torchvision else ["torchvision"])
    r: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(a.repeats):
        print(f"run {rep + 1}/{a.repeats}", file=sys.stderr, flush=True)
        if cache.exists():
            import shutil

            shutil.rmtree(cache)  # every first load starts empty
        for name in names:
            r[name].append(_run_phase(name, a, env))
    section = markdown(r, a, r["decode"][0]["images"])
    publish(section, a.write, START, END)


if __name__ == "__main__":
    main()
