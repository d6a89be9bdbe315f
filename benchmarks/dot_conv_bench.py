"""A few-channel convolution + ReLU with output columns as the vector lanes, against torch's oneDNN (issue 14).

    python benchmarks/dot_conv_bench.py --write BENCHMARKS.md     # what `make bench-kernels` runs
    python benchmarks/dot_conv_bench.py --rounds 4                # a quicker look, table only

The second paper's net ends conv 5×5 (10 → 20 channels, unpadded) → ReLU → flatten → dense. torch's oneDNN
kernels keep channels as the vector lanes, and 10 or 20 channels fill 62.5 % of their 16- or 32-channel blocks in
bf16 (in fp32 with AVX2, 10 channels fill 8 + 2 of two 8-lane registers); its channels-last output must then be
copied into the dense layer's (C, H, W) order, and the gradient back. cnnlab's native kernels (`conv_relu_forward`
/ `conv_relu_backward` in native_kernels.c, `_NativeConvReLU` in cnnlab/models/fused.py) put output columns in the
lanes and write the output in (C, H, W) order: in bf16 with two input channels in each dot-product pair (built
where the CPU has AVX-512 BF16, taken by default there unless it has AMX: `native.dot_conv_pays`), in float32 with
a broadcast weight feeding two output rows (built everywhere, taken by default on AVX2 CPUs without AVX-512:
`native.f32_conv_pays`). The bench measures the precision the CPU trains in by default (bf16-mixed where it has
native bf16, fp32 elsewhere). Two measurements:

  kernels   forward and backward alone at batch 128 for the second paper's shape and eleven others with few
            channels, in that precision: torch's convolution + ReLU (+ the copy to (C, H, W) order forward; the
            copy of the gradient back to channels-last, ReLU's backward and the convolution's backward) against
            the native pair; median of interleaved calls
  loop      cnnlab's training loop on the second paper's net (animal-shapes-5 at 64×64×3, batch 128, the CPU
            defaults) with and without it, epochs interleaved in one process (the order alternating each round)
            so the machine's slower minutes fall on both; the per-round ratios' median and range. The script sets
            _NativeConvReLU.enabled for each epoch.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bench_common import (interleaved_median_ms, markers, measured_line, publish, round_ratio, rounds,  # on sys.path
                          switched_epochs)
from stem_bench import measure

START, END = markers("dot-conv-bench")  # a section per CPU kind
ROOT = Path(__file__).resolve().parent.parent
TASK = ["recipes/demo.yaml", "data.source=animal-shapes-5", "data.image_size=64", "data.channels=3",
        "model.name=alkhairi-cnn", "data.augment=false"]
# (input channels, output channels, input side, kernel): the second paper's first, then at 32×32, 48×48 and 128×128
# images; a LeNet-like one; more channels, up to and past where it stops paying (bf16: 16 input channels not taken;
# float32: only ≤ 10 input and 20–24 output channels, rows of ≥ 16 output columns taken)
SHAPES = [(10, 20, 31, 5), (10, 20, 13, 5), (10, 20, 21, 5), (10, 20, 61, 5), (10, 24, 31, 5), (6, 16, 14, 5),
          (8, 8, 31, 5), (3, 16, 32, 3), (12, 24, 16, 3), (16, 20, 31, 5), (16, 32, 16, 3), (32, 64, 16, 3)]


def kernels(repeats: int, dtype_name: str) -> list[dict]:
    """Median ms of each direction's two paths at batch 128 for each of SHAPES."""
    import torch
    import torch.nn.functional as F

    from cnnlab.models import native

    cl, rows, dtype = torch.channels_last, [], getattr(torch, dtype_name)
    for ci, co, side, k in SHAPES:
        torch.manual_seed(0)
        n, out = 128, side - k + 1
        x = torch.randn(n, ci, side, side).to(dtype).contiguous(memory_format=cl)
        w, b = torch.randn(co, ci, k, k) * 0.1, torch.randn(co) * 0.1
        g = torch.randn(n, co * out * out).to(dtype)  # the dense layer's gradient, (C, H, W) order
        kept = {}

        def torch_forward():
            wb = w.to(dtype).contiguous(memory_format=cl)
            y = F.conv2d(x, wb, b.to(dtype)).relu_()
            kept["y"], kept["w"] = y, wb
            return y.reshape(n, -1)  # a copy: channels-last into (C, H, W) order

        def torch_backward():
            y, wb = kept["y"], kept["w"]
            gy = g.reshape(y.shape).contiguous(memory_format=cl)
            gy = torch.ops.aten.threshold_backward(gy, y, 0)
            torch.ops.aten.convolution_backward(gy, x, wb, [co], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                [True, True, True])

        y = native.conv_relu_forward(x, w, b, dtype)
        torch_forward()
        got = interleaved_median_ms({"torch forward": torch_forward,
                                     "native forward": lambda: native.conv_relu_forward(x, w, b, dtype),
                                     "torch backward": torch_backward,
                                     "native backward": lambda: native.conv_relu_backward(g, y, x, w, True, True)},
                                    repeats)
        rows.append({"shape": (ci, co, side, k), **got})
    return rows


def loop(rounds: int) -> dict:
    """Epoch seconds of cnnlab's loop with and without the native convolution, interleaved."""
    import cnnlab.models.fused as fused

    return switched_epochs([str(ROOT / TASK[0]), *TASK[1:]], fused._NativeConvReLU, rounds)


def main() -> None:
    import torch

    from cnnlab.models.native import (DOT_CONV_MAX_IN, DOT_CONV_MAX_OUT, F32_CONV_MAX_IN, F32_CONV_MIN_WIDTH,
                                      F32_CONV_OUT, conv_relu_shape, dot_conv_available, dot_conv_pays,
                                      f32_conv_pays, library, why_not)
    from cnnlab.training.runtime import auto_precision

    def available_loop(rounds: int) -> dict:
        bf16 = str(auto_precision(torch.device("cpu"))[0]).startswith("bf16")
        if library() is None or (bf16 and not dot_conv_available()):  # not an error: `make bench-kernels` goes on
            print("dot_conv_bench: nothing to measure here — "  # with the next bench
                  + (f"no native kernels ({why_not()})" if library() is None else
                     "this CPU trains in bf16 by default, and the bf16 dot-product convolution was not built (it "
                     "needs AVX-512 BF16 and GCC ≥ 10)"), file=sys.stderr)
            raise SystemExit(0)
        return loop(rounds)

    a, m, r, k = measure(__doc__, available_loop, kernels)
    s, n = r["seconds"], r["images"]
    bf16 = r["dtype"] == "bfloat16"
    taken = dot_conv_pays() if bf16 else f32_conv_pays()
    what = "bf16 dot-product" if bf16 else "float32"

    def row(x: dict) -> str:
        ci, co, side, kk = x["shape"]
        where = "taken" if taken and conv_relu_shape(ci, co, side - kk + 1, getattr(torch, r["dtype"])) else "not taken"
        t, nat = x["torch forward"] + x["torch backward"], x["native forward"] + x["native backward"]
        return (f"| {ci} → {co}, {side}×{side}, {kk}×{kk} ({where}) | {x['torch forward']:.2f} | "
                f"{x['native forward']:.2f} | {x['torch backward']:.2f} | {x['native backward']:.2f} | "
                f"{t / nat:.2f}× |")

    if taken:
        why = ("AVX-512 BF16 without AMX: `native.dot_conv_pays`" if bf16
               else "AVX2 without AVX-512: `native.f32_conv_pays`")
        verdict = (f"It is the default on this CPU ({why}), "
                   + (f"for convolutions with ≤ {DOT_CONV_MAX_IN} input and ≤ {DOT_CONV_MAX_OUT} output channels."
                      if bf16 else f"for convolutions with ≤ {F32_CONV_MAX_IN} input and {F32_CONV_OUT[0]}–"
                      f"{F32_CONV_OUT[1]} output channels and rows of ≥ {F32_CONV_MIN_WIDTH} output columns "
                      "(`native.conv_relu_shape`)."))
    elif bf16:
        verdict = "It is not the default on this CPU: with AMX torch's oneDNN has its tile kernels (`native.dot_conv_pays`)."
    else:
        verdict = ("It is not the default on this CPU: in float32 it is taken only on AVX2 CPUs without AVX-512, "
                   "where it was measured (`native.f32_conv_pays`).")
    title = f"## A few-channel convolution + ReLU, output columns as the lanes (issue 14) — {m['capability']}"
    lines = [START, title,
             "", measured_line("dot_conv_bench.py", a, m), "",
             f"Convolution (stride 1, unpadded) → ReLU alone, batch 128, {r['dtype']}, ms (median of {a.repeats} "
             "interleaved calls). torch: oneDNN's channels-last convolution + ReLU and the copy into the dense layer's "
             "(C, H, W) order forward; the gradient's copy back to channels-last, ReLU's backward and the "
             f"convolution's backward (input, weights, bias). native: the {what} conv_relu_forward / "
             "conv_relu_backward.", "",
             "| channels, input, kernel | torch forward | native forward | torch backward | native backward | "
             "native is faster |", "|---|---:|---:|---:|---:|---:|",
             *[row(x) for x in k], "",
             f"cnnlab's training loop on the second paper's net (animal-shapes-5, 64×64×3, batch 128, the CPU "
             f"defaults: {r['precision']}), {rounds(a.rounds)} of one epoch each way, interleaved in one process:", "",
             "| path | images/s (median epoch) |", "|---|---:|",
             f"| the native {what} convolution{' (the default)' if taken else ''} | "
             f"{n / statistics.median(s[True]):,.0f} |",
             f"| torch's convolution{'' if taken else ' (the default)'} | {n / statistics.median(s[False]):,.0f} |",
             "", f"Within a round the native convolution made the loop {round_ratio(s[False], s[True])} as fast. "
             + verdict, "", END]
    publish("\n".join(lines) + "\n", a.write, START, END)


if __name__ == "__main__":
    sys.exit(main())
