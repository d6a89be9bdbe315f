"""The first paper's conv block: the forward in one pass, the convolution's weight gradient from the block's
gradient row by row (issue 14).

    python benchmarks/conv_block_bench.py --write BENCHMARKS.md     # what `make bench-kernels` runs
    python benchmarks/conv_block_bench.py --rounds 4                # a quicker look, table only

The first paper's net starts conv 5×5 (1 → 32 channels, padding 2) → ReLU → batch norm → max-pool 2×2, and the
image batch needs no gradient. cnnlab's native path (`_NativeConvReLUBatchNormMaxPool` in
cnnlab/models/fused.py) runs torch's convolution and the native block forward; backward, `pool_backward_wgrad`
(native_kernels.c) computes the block's gradient an image at a time into a scratch buffer that stays in the
core's cache and multiplies it straight into the convolution's weight gradient — instead of `pool_backward`
writing the full-sized gradient (128×32×28×28 floats a batch) for torch's convolution backward to read. Two
measurements:

  kernels   the backward alone at batch 128, 28×28×1 → 32, in the CPU default's precision, with freed memory
            kept in the process as training keeps it: pool_backward + torch's convolution weight and bias
            gradients (through autograd) against pool_backward_wgrad (with the input's zero padding it applies)
  loop      cnnlab's training loop on the demo's task (animal-shapes, 28×28×1, batch 128, the CPU defaults,
            augmentation off) with and without the one-pass backward, epochs interleaved in one process (the
            order alternating each round): images/s and the per-round ratios' median and range. Off is a
            benchmark-only switch (`_NativeConvReLUBatchNormMaxPool.enabled = False`: the convolution as a module,
            then the native block).

Where the loop runs in bf16 and the CPU has AVX-512 BF16, both measurements also time pool_backward_wgrad's
products in bf16 dot products against float32 FMAs (`native.wgrad_dot_pays`; the switch `fused.WgradDot`), and the
block's forward in one native pass (`native.conv_pool_stats`: the convolution, ReLU, the pool and batch norm's sums,
y written once) against torch's convolution + `native.pool_stats` reading y back (`native.conv_pool_stats_pays`;
the switch `fused.ConvPoolStats`).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bench_common import (interleaved_median_ms, markers, measured_line, publish, round_ratio, rounds,  # on sys.path
                          switched_epochs)
from stem_bench import measure

START, END = markers("conv-block-bench")  # a section per CPU kind
ROOT = Path(__file__).resolve().parent.parent
TASK = ["recipes/demo.yaml", "data.augment=false"]


def kernels(repeats: int, dtype_name: str) -> dict[str, float]:
    """Median ms of the backward paths at batch 128, 28×28×1 → 32 (with the dot products where `dots`), and of the
    two forward paths where `one_pass`."""
    import torch
    import torch.nn.functional as F

    from cnnlab.models import native
    from cnnlab.training.runtime import keep_freed_memory

    if native.library() is None:
        raise SystemExit(f"no native kernels here: {native.why_not()}")
    keep_freed_memory()
    dtype = getattr(torch, dtype_name)
    cl = torch.channels_last
    torch.manual_seed(0)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=cl)
    # weights restrided as the model's are (`.contiguous(channels_last)` leaves a 1-channel tensor's plain
    # strides, and torch's convolution then writes an NCHW output whose weight gradient took 4× as long here)
    w = torch.nn.Conv2d(1, 32, 5, padding=2).weight.detach().to(memory_format=cl)
    y = F.conv2d(x.to(dtype), w.to(dtype), padding=2).contiguous(memory_format=cl)
    pooled, idx, _ = native.pool_stats(y, relu=True, stats=False)
    g = torch.randn(pooled.shape).to(dtype).contiguous(memory_format=cl)
    a, k, b = torch.rand(32) + 0.5, torch.randn(32) * 0.01, torch.randn(32) * 0.01
    wp, bp = w.to(dtype).requires_grad_(), torch.zeros(32, dtype=dtype, requires_grad=True)
    conv_out = F.conv2d(x.to(dtype), wp, bp, padding=2)  # its backward through autograd, as training runs it
    assert conv_out.stride(1) == 1, "the convolution's output should be channels-last, as in training"

    def torch_backward():
        dy = native.pool_backward(y, idx, g, a, k, b)
        torch.autograd.grad(conv_out, [wp, bp], dy, retain_graph=True)

    def native_backward(dot: bool):
        native.pool_backward_wgrad(y, idx, g, a, k, b, F.pad(x, (2, 2, 2, 2)), (5, 5), dot=dot)

    def torch_forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yt = F.conv2d(x, w, bp.detach(), padding=2).contiguous(memory_format=cl)
        native.pool_stats(yt, relu=True, stats=True)

    paths = {"torch backward": torch_backward, "native backward": lambda: native_backward(False)}
    if dots(dtype_name):
        paths["native backward, dot products"] = lambda: native_backward(True)
    if one_pass(dtype_name):
        paths["torch forward"] = torch_forward
        paths["one-pass forward"] = lambda: native.conv_pool_stats(x, w, bp.detach(), (2, 2))
    return interleaved_median_ms(paths, repeats)


def dots(dtype_name: str) -> bool:
    """Whether the bf16 dot products are measured here: a bf16 loop, and the library has them."""
    from cnnlab.models.native import wgrad_dot_available

    return dtype_name == "bfloat16" and wgrad_dot_available()


def one_pass(dtype_name: str) -> bool:
    """Whether the one-pass bf16 forward is measured here: a bf16 loop, and the library has it."""
    from cnnlab.models.native import conv_pool_stats_available

    return dtype_name == "bfloat16" and conv_pool_stats_available()


def loop(rounds: int) -> dict:
    """Epoch seconds of cnnlab's loop with and without the one-pass backward, interleaved (after warm-ups); in
    bf16 where the library has them, also with and without the weight gradient's dot products and with and without
    the one-pass forward (the one-pass backward on)."""
    import cnnlab.models.fused as fused

    config = [str(ROOT / TASK[0]), *TASK[1:]]
    r = switched_epochs(config, fused._NativeConvReLUBatchNormMaxPool, rounds)
    dtype_name = "bfloat16" if r["precision"].startswith("bf16") else "float32"
    fused._NativeConvReLUBatchNormMaxPool.enabled = True
    try:
        if dots(dtype_name):
            r["dot"] = switched_epochs(config, fused.WgradDot, rounds)
        if one_pass(dtype_name):
            r["one_pass"] = switched_epochs(config, fused.ConvPoolStats, rounds)
    finally:
        fused._NativeConvReLUBatchNormMaxPool.enabled = None
    return r


def switched_table(d: dict, n: int, intro: str, pays: bool, decision: str, cpu: str, words: tuple) -> list[str]:
    """The Markdown lines for a switch measured in cnnlab's loop: `d` its epoch seconds {True: on, False: off} from
    `switched_epochs`, `intro` the sentence before the table, `pays` whether on is the default on this CPU (`cpu`, its
    capability) by native.`decision`; `words`: the on and off rows' names, the ratio sentence's subject, and
    "They are" / "It is"."""
    on, off, subject, verb = words
    mark = {True: " (the default)" if pays else "", False: "" if pays else " (the default)"}
    not_ = "" if pays else " not"
    return ["", intro, "", "| path | images/s (median epoch) |", "|---|---:|",
            f"| {on}{mark[True]} | {n / statistics.median(d[True]):,.0f} |",
            f"| {off}{mark[False]} | {n / statistics.median(d[False]):,.0f} |", "",
            f"Within a round {subject} {round_ratio(d[False], d[True])} as fast "
            "(the epochs' medians above are not paired and move with the VM's speed between rounds). "
            f"{verb}{not_} the default on this CPU ({cpu}: `native.{decision}`)."]


def main() -> None:
    from cnnlab.models.native import conv_pool_stats_pays, stem_pays, wgrad_dot_pays

    a, m, r, k = measure(__doc__, loop, kernels)
    dtype = r["dtype"]
    n, cpu = r["images"], m["capability"]
    lines = [START, f"## The first paper's conv block: the forward in one pass, the convolution's weight gradient "
                    f"from the block's gradient (issue 14) — {cpu}",
             "", measured_line("conv_block_bench.py", a, m), "",
             f"The backward of conv 5×5 (1 → 32, padding 2) → ReLU → batch norm → max-pool 2×2 alone, batch 128 at "
             f"28×28×1, {dtype} (median of {a.repeats} interleaved calls):", "",
             "| path | ms |", "|---|---:|",
             f"| native pool_backward writes the full-sized gradient, torch's convolution weight and bias gradients "
             f"read it | {k['torch backward']:.2f} |",
             f"| pool_backward_wgrad: the gradient an image at a time, multiplied into the weight gradient in cache "
             f"(float32 FMAs) "
             f"| {k['native backward']:.2f} |"]
    if "native backward, dot products" in k:
        lines.append(f"| pool_backward_wgrad, the products in bf16 dot products (two positions each) "
                     f"| {k['native backward, dot products']:.2f} |")

    def again(what: str) -> str:
        return f"The same loop with the one-pass backward, {what}, {rounds(a.rounds)} interleaved:"

    lines += switched_table(r["seconds"], n, f"cnnlab's training loop on the first paper's net (animal-shapes, 28×28×1, batch "
                                  f"128, the CPU defaults: {r['precision']}; augmentation off), {rounds(a.rounds)} of "
                                  "one epoch per path, interleaved in one process:", stem_pays(), "stem_pays", cpu,
                            ("the one-pass backward", "the convolution as a module, then the native block",
                             "the one-pass backward was", "It is"))
    if "dot" in r:
        lines += switched_table(r["dot"]["seconds"], n,
                                again("its products in bf16 dot products against float32 FMAs"),
                                wgrad_dot_pays(), "wgrad_dot_pays", cpu,
                                ("bf16 dot products", "float32 FMAs", "the dot products were", "They are"))
    if "torch forward" in k:
        lines += ["", f"The block's forward alone, batch 128 at 28×28×1, bf16 under autocast (median of {a.repeats} "
                      "interleaved calls):", "",
                  "| path | ms |", "|---|---:|",
                  f"| torch's convolution (oneDNN) writes y, native pool_stats reads it back: ReLU, the 2×2 max and "
                  f"its position, batch norm's sums | {k['torch forward']:.2f} |",
                  f"| conv_pool_stats: all of it in one pass of bf16 dot products, y written once "
                  f"| {k['one-pass forward']:.2f} |"]
    if "one_pass" in r:
        lines += switched_table(r["one_pass"]["seconds"], n,
                                again("the forward in one pass against torch's convolution + pool_stats"),
                                conv_pool_stats_pays(), "conv_pool_stats_pays", cpu,
                                ("one-pass forward", "torch's convolution + pool_stats", "the one-pass forward was",
                                 "It is"))
    lines += ["", END]
    publish("\n".join(lines) + "\n", a.write, START, END)


if __name__ == "__main__":
    sys.exit(main())
