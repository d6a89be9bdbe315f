"""The papers' conv blocks alone, forward + backward, three ways (issue 14): torch's modules, cnnlab's fused
block on torch's ops (`train.native=false`) and cnnlab's native kernels (`train.native`, the CPU default where
a C compiler is found) — what `cnnlab/models/native.py` was written for.

Blocks, at batch 128, channels-last, on the convolution's output as it arrives in training:
- the first paper's ReLU → BatchNorm2d → MaxPool2d(2) on 128×32×28×28;
- the second paper's ReLU → MaxPool2d(2) on 128×10×62×62.
In fp32, and in bf16 (the activation in bf16 under CPU autocast) where the CPU has native bf16. One read of
the activation (`tensor.sum()`) is the floor to compare with. Freed memory is kept in the process, as in
cnnlab's training. Medians of --repeats timings after a warm-up.

Also the augmentation's random affine warp for a batch (`cnnlab/data/augment.py`): torch's `F.affine_grid`
against cnnlab's `affine_grid`, each followed by the same `F.grid_sample`, on the first net's 128×1×28×28 and
the second's 128×3×64×64 batches.

    python benchmarks/block_bench.py [--repeats 30] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine, machine_line, markers, median_ms, publish  # noqa: E402

START, END = markers("block-bench")  # a section per CPU kind


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30, help="timings per cell (default 30)")
    p.add_argument("--write", help="put the Markdown section into this file (e.g. BENCHMARKS.md)")
    a = p.parse_args()

    import torch
    from torch import nn

    from cnnlab.hardware import native_bf16
    from cnnlab.models import native, set_fusion
    from cnnlab.models.fused import FusedSequential
    from cnnlab.training.runtime import keep_freed_memory

    keep_freed_memory()
    if native.library() is None:
        raise SystemExit(f"the native kernels cannot be built here: {native.why_not()}")
    blocks = {
        "ReLU → BatchNorm2d → MaxPool2d(2), 128×32×28×28 (the first paper's)":
            ((128, 32, 28, 28), lambda: FusedSequential(nn.ReLU(inplace=True), nn.BatchNorm2d(32), nn.MaxPool2d(2))),
        "ReLU → MaxPool2d(2), 128×10×62×62 (the second paper's)":
            ((128, 10, 62, 62), lambda: FusedSequential(nn.ReLU(inplace=True), nn.MaxPool2d(2))),
    }
    ways = {"torch's modules": (False, False), "fused on torch's ops": (True, False), "native kernels": (True, True)}
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16() else [])
    rows = []
    for name, (shape, make) in blocks.items():
        for dtype in dtypes:
            y = torch.randn(shape).contiguous(memory_format=torch.channels_last).to(dtype)
            cells = {"one read": median_ms(lambda: y.sum(), a.repeats, warmup=3)}
            for way, (fuse, use_native) in ways.items():
                if dtype == torch.bfloat16 and way == "fused on torch's ops":
                    cells[way] = None  # that path is fp32-only: under bf16 it is torch's modules
                    continue
                block = make()
                with torch.no_grad():
                    for m in block.modules():
                        if isinstance(m, nn.BatchNorm2d):
                            m.weight.uniform_(0.5, 1.5)
                set_fusion(block, fuse, use_native)

                def step(block=block):
                    x = y.detach().requires_grad_()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                        out = block(x.clone())  # the conv output, which the in-place ReLU may overwrite
                    out.backward(torch.ones_like(out))

                cells[way] = median_ms(step, a.repeats, warmup=3)
            rows.append((name, str(dtype).replace("torch.", ""), cells))
            print(rows[-1], file=sys.stderr, flush=True)

    import torch.nn.functional as F

    from cnnlab.data.augment import affine_grid

    warps = []
    for shape in ((128, 1, 28, 28), (128, 3, 64, 64)):
        x, size = torch.rand(shape), list(shape)
        theta = torch.eye(2, 3) + 0.05 * torch.randn(shape[0], 2, 3, generator=torch.Generator().manual_seed(0))

        def warp(grid, x=x):
            return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

        theirs = median_ms(lambda: warp(F.affine_grid(theta, size, align_corners=False)), a.repeats, warmup=3)
        ours = median_ms(lambda: warp(affine_grid(theta, size)), a.repeats, warmup=3)
        warps.append(("×".join(map(str, shape)), theirs, ours))
        print(warps[-1], file=sys.stderr, flush=True)

    m = machine()
    lines = [START, f"## The papers' conv blocks alone: torch's modules, fused on torch's ops, native kernels "
             f"(issue 14) — {m['capability']}", "",
             f"`python benchmarks/block_bench.py --repeats {a.repeats}` — measured {time.strftime('%Y-%m-%d')} on "
             f"{machine_line(m)}; {torch.get_num_threads()} threads, channels-last, forward + backward of the block "
             "(with a copy of its input, as the in-place ReLU needs), median ms. \"One read\" is `tensor.sum()` "
             "of the block's input: the floor for any pass over it. The fused torch-op path is fp32 only.", "",
             "| block | dtype | one read | torch's modules | fused on torch's ops | native kernels | native vs modules |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, dtype, c in rows:
        modules, torch_ops, ours = c["torch's modules"], c["fused on torch's ops"], c["native kernels"]
        fused = "–" if torch_ops is None else f"{torch_ops:.2f}"
        lines.append(f"| {name} | {dtype} | {c['one read']:.2f} | {modules:.2f} | {fused} | {ours:.2f} | "
                     f"{modules / ours:.2f}× |")
    lines += ["", "The augmentation's affine warp (grid + `F.grid_sample`, bilinear, border), median ms:", "",
              "| batch | torch's affine_grid | cnnlab's affine_grid | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {shape} | {theirs:.2f} | {ours:.2f} | {theirs / ours:.2f}× |" for shape, theirs, ours in warps]
    publish("\n".join(lines + ["", END]) + "\n", a.write, START, END)


if __name__ == "__main__":
    main()
