"""Image folders at scale: cnnlab's decode-once cache against torchvision ImageFolder + DataLoader.

    python benchmarks/folder_bench.py /tmp/bench-jpegs            # 100,000 JPEGs (generated once)
    python benchmarks/folder_bench.py /tmp/bench-jpegs --n 5000   # a smaller folder

Generates DIR/images/<class>/<i>.jpg (10 classes, sides drawn from 64–512 px, quality 90) unless
already there, then runs each measurement in its own process (so each peak RSS is its own):

  decode        first load with an empty cache: decode + resize to SIZE, write the uint8 cache
  cached        second load: stat every file, map the cache
  epoch-memory  one pass over all images from the cache, in-memory loader (DeviceLoader)
  epoch-stream  the same through StreamingLoader (memory-mapped, sorted reads, prefetch)
  torchvision   ImageFolder + DataLoader(num_workers=2): decode + resize every epoch

An "epoch" here is the data pipeline alone — every image once, in shuffled batches of --batch,
normalised to float (B, C, SIZE, SIZE) — so the numbers compare loaders, not models.
Prints a Markdown table with the machine and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

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
            times = []
            for _ in range(a.epochs):
                t = time.perf_counter()
                for x, y in loader:
                    pass
                times.append(time.perf_counter() - t)
            out["epoch_s"] = min(times)
            out["epoch_times"] = times
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
        times = []
        for _ in range(a.epochs):
            t = time.perf_counter()
            for x, y in loader:
                pass
            times.append(time.perf_counter() - t)
        return {"images": len(ds), "epoch_s": min(times), "epoch_times": times, "rss_mb": _rss_mb(),
                "base_rss_mb": base, "worker_rss_mb": _children_rss_mb()}
    raise SystemExit(f"unknown phase {name}")


def _run_phase(name: str, a, env: dict) -> dict:
    cmd = [sys.executable, __file__, a.dir, "--phase", name, "--size", str(a.size), "--batch", str(a.batch),
           "--epochs", str(a.epochs), "--workers", str(a.workers), "--threads", str(a.threads)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    print(f"  {name}: {res}", file=sys.stderr, flush=True)
    return res


def _machine() -> str:
    import numpy
    import PIL
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {cores} cores, {ram:.0f} GiB RAM; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"Pillow {PIL.__version__}, numpy {numpy.__version__}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="working folder: images/ (generated once) and cache/ go here")
    p.add_argument("--n", type=int, default=100_000, help="number of JPEGs (default 100,000)")
    p.add_argument("--size", type=int, default=64, help="training resolution (default 64)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per loader; the fastest is reported (default 2)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for torchvision (default 2)")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch threads")
    p.add_argument("--skip-torchvision", action="store_true")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        print(json.dumps(phase(a.phase, a)))
        return

    root = Path(a.dir)
    gen_s = generate(root / "images", a.n, a.workers)
    print(f"folder: {a.n:,} JPEGs in {root / 'images'} (generated in {gen_s:.1f} s)", file=sys.stderr)
    cache = root / "cache"
    if cache.exists():
        import shutil

        shutil.rmtree(cache)  # the first decode must start empty
    env = dict(os.environ, CNNLAB_CACHE=str(cache))
    r = {name: _run_phase(name, a, env) for name in ("decode", "cached", "epoch-memory", "epoch-stream")}
    if not a.skip_torchvision:
        r["torchvision"] = _run_phase("torchvision", a, env)

    n = r["decode"]["images"]
    print(f"\n### Image folder: {n:,} JPEGs (64–512 px, 10 classes) → {a.size}×{a.size} RGB, batch {a.batch}\n")
    print(f"Machine: {_machine()}\n")
    print("| pipeline | what | time | images/s | peak RSS (above imports) |")
    print("|---|---|---:|---:|---:|")

    def rss(x):
        return f"{x['rss_mb']:,.0f} MB (+{x['rss_mb'] - x['base_rss_mb']:,.0f})"

    d = r["decode"]
    print(f"| cnnlab | first load: decode + resize + write cache ({d['cache_mb']:,.0f} MB) | {d['load_s']:.2f} s | "
          f"{n / d['load_s']:,.0f} | {rss(d)} |")
    c = r["cached"]
    print(f"| cnnlab | second load (stat {n:,} files, map the cache) | {c['load_s']:.2f} s | – | {rss(c)} |")
    for key, label in (("epoch-memory", "epoch from the cache, in memory (DeviceLoader)"),
                       ("epoch-stream", "epoch from the cache, streamed (StreamingLoader)")):
        e = r[key]
        print(f"| cnnlab | {label} | {e['epoch_s']:.2f} s | {n / e['epoch_s']:,.0f} | {rss(e)} |")
    if "torchvision" in r:
        t = r["torchvision"]
        print(f"| torchvision | ImageFolder + DataLoader({a.workers} workers): decode + resize, epoch | "
              f"{t['epoch_s']:.2f} s | {n / t['epoch_s']:,.0f} | {rss(t)} + {t['worker_rss_mb']:,.0f} MB "
              f"(largest worker) |")
        print(f"\nEpoch speed-up from the cache: {t['epoch_s'] / r['epoch-stream']['epoch_s']:.0f}× streamed, "
              f"{t['epoch_s'] / r['epoch-memory']['epoch_s']:.0f}× in memory; the first cnnlab load "
              f"(decode once) costs {d['load_s'] / t['epoch_s']:.1f} torchvision epochs.")
    print(f"\nPeak RSS is ru_maxrss of each measurement's own process; '+N' is what it added to the "
          f"{r['decode']['base_rss_mb']:,.0f} MB of importing torch and cnnlab.")
    print(f"\nEpochs: fastest of {a.epochs} (data pipeline only: every image once, shuffled, normalised float "
          f"batches). Command: python benchmarks/folder_bench.py DIR --n {a.n}")


if __name__ == "__main__":
    main()
