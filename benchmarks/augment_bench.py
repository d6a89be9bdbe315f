"""Batch augmentation's flip and affine warp: torch's ops against cnnlab's one-pass kernel (issue 14).

    python benchmarks/augment_bench.py --write BENCHMARKS.md     # what `make bench-kernels` runs
    python benchmarks/augment_bench.py --rounds 4                # a quicker look, table only

`data.augment=true` flips, rotates, zooms and shifts every training batch on the device (data/augment.py). With
torch's ops that is a dozen small ops for each image's θ, a flip, the sampling grid (affine_grid) and the warp
(grid_sample); cnnlab's kernel (`warp_affine` in native_kernels.c, taken on the CPU wherever the native kernels
build and train.native is not false: Runtime.native_warp) forms θ from the same random draws and samples the
batch in one pass. Two measurements:

  kernels   augment_batch alone, float32, on the first paper's batch (128 × 28×28×1), the second paper's
            (128 × 64×64×3, channels-last) and photos at 224 px (32 × 224×224×3, channels-last): torch's ops
            against the kernel, the same draws; median of interleaved calls
  loop      cnnlab's training loop on the first paper's net (`make demo`'s recipe: augmented batches, the CPU
            defaults) with and without the kernel's warp, epochs interleaved in one process (the order
            alternating each round); the per-round ratios' median and range. The script sets
            BatchAugment.enabled for each epoch.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bench_common import (interleaved_median_ms, markers, measured_line, publish, round_ratio, rounds,  # on sys.path
                          switched_epochs)
from stem_bench import measure

START, END = markers("augment-bench")  # a section per CPU kind
ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"rotation": 5.0, "hflip": 0.5, "scale": 0.05, "translate": 0.05}  # the demo recipe's (hflip: default)
# (what, batch, channels, side, channels-last)
SHAPES = [("the first paper's batch", 128, 1, 28, False), ("the second paper's batch", 128, 3, 64, True),
          ("photos at 224 px", 32, 3, 224, True)]


def kernels(repeats: int, dtype_name: str) -> list[dict]:
    """Median ms of augment_batch through torch's ops and through the kernel for each of SHAPES (float32
    whatever the loop's precision: batches are augmented before autocast)."""
    import torch

    from cnnlab.data.augment import augment_batch

    rows = []
    for what, n, c, side, cl in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(n, c, side, side)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        g = torch.Generator().manual_seed(0)
        got = interleaved_median_ms({"torch": lambda: augment_batch(x, g, **SETTINGS),
                                     "native": lambda: augment_batch(x, g, native=True, **SETTINGS)}, repeats)
        rows.append({"what": what, "shape": (n, c, side, cl), **got})
    return rows


def loop(rounds: int) -> dict:
    """Epoch seconds of cnnlab's loop on the demo recipe with and without the kernel's warp, interleaved."""
    from cnnlab.data.augment import BatchAugment
    from cnnlab.models.native import library, why_not

    if library() is None:  # not an error: `make bench-kernels` goes on with the next bench
        print(f"augment_bench: nothing to measure here — the native kernels do not build: {why_not()}",
              file=sys.stderr)
        raise SystemExit(0)
    return switched_epochs([str(ROOT / "recipes/demo.yaml")], BatchAugment, rounds)


def main() -> None:
    a, m, r, k = measure(__doc__, loop, kernels)
    s, n = r["seconds"], r["images"]

    def row(x: dict) -> str:
        b, c, side, cl = x["shape"]
        return (f"| {x['what']}: {b} × {side}×{side}×{c}{', channels-last' if cl else ''} | {x['torch']:.3f} | "
                f"{x['native']:.3f} | {x['torch'] / x['native']:.2f}× |")

    title = f"## Batch augmentation's flip and affine warp in one pass (issue 14) — {m['capability']}"
    lines = [START, title,
             "", measured_line("augment_bench.py", a, m), "",
             f"`augment_batch` alone (flip 50 %, rotation ±5°, zoom ±5 %, shift ±5 %), float32, ms (median of "
             f"{a.repeats} interleaved calls). torch: θ from the draws, the flip, affine_grid and grid_sample; native: "
             "the kernel `warp_affine`, from the same draws.", "",
             "| batch | torch | native | native is faster |", "|---|---:|---:|---:|",
             *[row(x) for x in k], "",
             f"cnnlab's training loop on the first paper's net (`make demo`'s recipe: animal-shapes, 28×28×1, batch "
             f"128, augmented batches; the CPU defaults: {r['precision']}), {rounds(a.rounds)} of one epoch each way, "
             "interleaved in one process:", "",
             "| warp | images/s (median epoch) |", "|---|---:|",
             f"| the native kernel (the default) | {n / statistics.median(s[True]):,.0f} |",
             f"| torch's ops | {n / statistics.median(s[False]):,.0f} |",
             "", f"Within a round the kernel's warp made the loop {round_ratio(s[False], s[True])} as fast.",
             "", END]
    publish("\n".join(lines) + "\n", a.write, START, END)


if __name__ == "__main__":
    sys.exit(main())
