"""The second paper's stem: its first convolution's weight gradient from the pooled gradient (issue 14).

    python benchmarks/stem_bench.py --write BENCHMARKS.md     # what `make bench-kernels` runs
    python benchmarks/stem_bench.py --pairs 4                 # a quicker look, table only

The second paper's net starts conv 3×3 (3 → 10 channels, unpadded) → ReLU → max-pool 2×2, and the image batch
needs no gradient, so cnnlab's native path forms that convolution's weight gradient from the pooled gradient at
each window's max (`_NativeConvMaxPoolReLU` in cnnlab/models/fused.py, `conv_pool_wgrad` in native_kernels.c)
instead of writing the full-sized gradient (`pool_scatter`) for torch's convolution backward to read. Two
measurements:

  kernels   that backward alone at batch 128, 64×64×3, bf16 (the CPU default on AVX-512 BF16 / AMX CPUs, fp32
            elsewhere): the native weight gradient against pool_scatter + torch's convolution weight gradient
  loop      cnnlab's training loop on the bench's task (animal-shapes-5 at 64×64×3, batch 128, the CPU
            defaults) with the stem on and off, epochs interleaved in one process (on, off, off, on, …) so
            the machine's slower minutes fall on both: images/s, and the per-pair ratio's median and range.
            Off is the path without the stem (the native ReLU → max-pool and torch's convolution backward),
            switched by replacing fused.conv_max_pool_relu for the epoch — a benchmark-only switch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench_common import machine, machine_line, markers, publish  # benchmarks/ is on sys.path

START, END = markers("stem-bench")  # a section per CPU kind
ROOT = Path(__file__).resolve().parent.parent
TASK = ["recipes/demo.yaml", "data.source=animal-shapes-5", "data.image_size=64", "data.channels=3",
        "model.name=alkhairi-cnn", "data.augment=false"]


def kernels(repeats: int, dtype_name: str) -> tuple[float, float]:
    """Median ms of (pool_scatter + torch's weight gradient, conv_pool_wgrad) at batch 128, 64×64×3 → 10."""
    import torch
    import torch.nn.functional as F

    from cnnlab.models import native

    if native.library() is None:
        raise SystemExit(f"no native kernels here: {native.why_not()}")
    dtype = getattr(torch, dtype_name)
    cl = torch.channels_last
    torch.manual_seed(0)
    x = torch.randn(128, 3, 64, 64).contiguous(memory_format=cl)
    w = torch.randn(10, 3, 3, 3).contiguous(memory_format=cl)
    xd, wd = x.to(dtype), w.to(dtype)
    y = F.conv2d(xd, wd)
    pooled, idx, _ = native.pool_stats(y, relu=True, stats=False)
    g = torch.randn(pooled.shape).to(dtype).contiguous(memory_format=cl)

    def torch_path():
        dy = native.pool_scatter(y.shape, idx, g, pooled)
        torch.ops.aten.convolution_backward(dy, xd, wd, [10], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                            [False, True, True])

    def native_path():
        native.conv_pool_wgrad(x, (3, 3), idx, g, pooled)

    times: dict[str, list[float]] = {"torch": [], "native": []}
    for f in (torch_path, native_path):
        f()
    for _ in range(repeats):  # interleaved
        for name, f in (("torch", torch_path), ("native", native_path)):
            t = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t) * 1e3)
    return statistics.median(times["torch"]), statistics.median(times["native"])


def loop(pairs: int) -> dict:
    """Epoch seconds of cnnlab's loop with the stem on and off, interleaved (after one warm-up epoch)."""
    import cnnlab.models.fused as fused
    from cnnlab.config import load_config
    from cnnlab.experiment import build_experiment
    from cnnlab.training.loop import train_one_epoch
    from cnnlab.training.progress import ProgressLogger

    b = build_experiment(load_config(str(ROOT / TASK[0]), TASK[1:]), ProgressLogger("none"))
    on = fused.conv_max_pool_relu

    def epoch(stem: bool) -> float:
        fused.conv_max_pool_relu = on if stem else (lambda x, conv: None)
        t = time.perf_counter()
        train_one_epoch(b.model, b.data.train, b.optimizer, b.schedule, b.runtime)
        return time.perf_counter() - t

    epoch(True)  # warm-up
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for i in range(pairs):
        for stem in ((True, False) if i % 2 == 0 else (False, True)):
            seconds[stem].append(epoch(stem))
    fused.conv_max_pool_relu = on
    r = b.runtime.describe()
    return {"images": b.data.train.num_samples, "on": seconds[True], "off": seconds[False],
            "precision": r["precision"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=8, help="on/off epoch pairs in the loop (default 8)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per kernel path (default 30)")
    p.add_argument("--write", help="put the Markdown section into this file (e.g. BENCHMARKS.md)")
    a = p.parse_args()
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    m = machine()
    r = loop(a.pairs)
    dtype = "bfloat16" if r["precision"].startswith("bf16") else "float32"
    k_torch, k_native = kernels(a.repeats, dtype)
    ratios = sorted(off / on for on, off in zip(r["on"], r["off"]))
    n = r["images"]
    title = f"## The second paper's stem: its weight gradient from the pooled one (issue 14) — {m['capability']}"
    lines = [START, title,
             "", f"`python benchmarks/stem_bench.py --pairs {a.pairs} --repeats {a.repeats}` — measured "
             f"{time.strftime('%Y-%m-%d')} on {machine_line(m)}; torch threads {torch.get_num_threads()}.", "",
             f"The backward of conv 3×3 (3 → 10) → ReLU → max-pool 2×2 alone, batch 128 at 64×64×3, {dtype} "
             f"(median of {a.repeats} interleaved calls):", "",
             "| path | ms |", "|---|---:|",
             f"| without the stem: native pool_scatter writes the full-sized gradient, torch's convolution weight "
             f"gradient reads it | {k_torch:.2f} |",
             f"| the native stem: the weight gradient from the pooled gradient (conv_pool_wgrad) | {k_native:.2f} |",
             "", f"cnnlab's training loop on the second paper's net (animal-shapes-5, 64×64×3, batch 128, the CPU "
             f"defaults: {r['precision']}), {a.pairs} pairs of epochs with the stem on and off, interleaved in "
             "one process:", "",
             "| stem | images/s (median epoch) |", "|---|---:|",
             f"| on (the default) | {n / statistics.median(r['on']):,.0f} |",
             f"| off | {n / statistics.median(r['off']):,.0f} |", "",
             f"Within each pair the stem made the epoch **{statistics.median(ratios):.2f}×** faster (median; range "
             f"{ratios[0]:.2f}–{ratios[-1]:.2f}×).", "", END]
    publish("\n".join(lines) + "\n", a.write, START, END)


if __name__ == "__main__":
    sys.exit(main())
