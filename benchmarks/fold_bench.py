"""Batch norm folded into the convolution before it at inference, against the two modules, in one process.

    python benchmarks/fold_bench.py [--repeats 9] [--write BENCHMARKS.md]

For each pretrained family's backbone at 224 px (EfficientNet-Lite0, ResNet-18/50, MobileNetV3-Large; random
weights — the speed is the same), a forward pass of a batch of 32 under no_grad in channels-last, in fp32 and,
where the CPU has native bf16 (AVX-512 BF16 / AMX), under bf16 autocast: with each batch norm folded into its
convolution (cnnlab's default at inference: `fused.pair_conv_bn`) against `unfolded_batch_norm()` (the
convolution and the batch norm as two modules, as torch runs them). The two are timed interleaved, call by call
(a shared VM's speed drifts within minutes); medians of --repeats calls after a warm-up call each. Also each
path's features' relative distance from the fp32 two-module forward's (rounding only).

Then EfficientNet-Lite0 at cnnlab's own images per pass: its ReLU6s written into the stride-2 depthwise layers'
padded inputs and in place (`efficientnet.SameConv2d.relu6_input`, the default at inference) against
F.relu6 + F.pad, interleaved the same way (4 × --repeats calls).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import interleaved_median_ms, machine, machine_line, markers, publish  # noqa: E402

START, END = markers("fold-bench")  # a section per CPU kind
MODELS = ("efficientnet-lite0", "resnet18", "resnet50", "mobilenet-v3-large")
BATCH, SIZE = 32, 224


def measure(name: str, precision: str, repeats: int) -> dict:
    import torch

    from cnnlab.models import create_model
    from cnnlab.models.fused import unfolded_batch_norm

    net = create_model(name, 10, 3, SIZE).backbone.eval().to(memory_format=torch.channels_last)
    x = torch.randn(BATCH, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)

    def folded():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            return net(x).float()

    def unfolded():
        with unfolded_batch_norm():
            return folded()

    ms = interleaved_median_ms({"folded": folded, "unfolded": unfolded}, repeats)
    with torch.no_grad(), unfolded_batch_norm():
        exact = net(x)  # fp32, the two modules
    a, b = folded(), unfolded()
    rel = lambda t: float((t - exact).norm() / exact.norm())  # noqa: E731
    return {"folded": BATCH / ms["folded"] * 1e3, "unfolded": BATCH / ms["unfolded"] * 1e3,
            "diff": (rel(a), rel(b))}


def measure_padded_relu6(precision: str, repeats: int) -> dict:
    """EfficientNet-Lite0 at cnnlab's own pass size (`inference_chunk`, freed memory kept as a run keeps it):
    each MBConv's ReLU6 written into its stride-2 depthwise layer's padded input and the others in place
    (`SameConv2d.relu6_input`, the default at inference) against F.relu6 + F.pad's zero-filled copy, the two
    interleaved call by call; both with batch norm folded."""
    import torch

    import cnnlab.models.efficientnet as lite
    from cnnlab.models import create_model
    from cnnlab.training import Runtime
    from cnnlab.training.runtime import inference_chunk

    runtime = Runtime("cpu", precision=precision, channels_last=True)
    net = create_model("efficientnet-lite0", 10, 3, SIZE).backbone.eval().to(memory_format=torch.channels_last)
    x = torch.randn(BATCH, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    x = x[:inference_chunk(net, x, runtime)].contiguous(memory_format=torch.channels_last)
    eager = lite._eager_inference

    def run():
        with torch.no_grad(), runtime.autocast():
            return net(x)

    def padded():
        lite._eager_inference = eager
        return run()

    def plain():
        lite._eager_inference = lambda: False
        try:
            return run()
        finally:
            lite._eager_inference = eager

    ms = interleaved_median_ms({"padded": padded, "plain": plain}, repeats)
    return {"n": len(x), "padded": len(x) / ms["padded"] * 1e3, "plain": len(x) / ms["plain"] * 1e3,
            "same": bool(torch.equal(padded(), plain()))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9, help="timed calls per path (default 9)")
    p.add_argument("--write", help="put the Markdown section into this file (e.g. BENCHMARKS.md)")
    a = p.parse_args()

    import torch
    from tqdm.auto import tqdm

    from cnnlab.hardware import native_bf16

    torch.set_num_threads(min(2, torch.get_num_threads()))
    m = machine()
    precisions = ["32", "bf16-mixed"] if native_bf16() else ["32"]
    rows = []
    for name, precision in tqdm([(n, pr) for n in MODELS for pr in precisions], desc="fold-bench"):
        r = measure(name, precision, a.repeats)
        rows.append(f"| {name} | {precision} | {r['unfolded']:.1f} | {r['folded']:.1f} | "
                    f"**{r['folded'] / r['unfolded']:.2f}×** | {r['diff'][0]:.1e} / {r['diff'][1]:.1e} |")
    pads = []
    for precision in tqdm(precisions, desc="padded ReLU6"):
        r = measure_padded_relu6(precision, 4 * a.repeats)
        pads.append(f"| {precision} | {r['n']} | {r['plain']:.1f} | {r['padded']:.1f} | "
                    f"**{r['padded'] / r['plain']:.2f}×** | {'yes' if r['same'] else 'no'} |")
    lines = [START, f"## Batch norm folded into its convolution at inference (issue 14) — {m['capability']}", "",
             f"`python benchmarks/fold_bench.py --repeats {a.repeats}` — measured {time.strftime('%Y-%m-%d')} on "
             f"{machine_line(m)}; torch threads {torch.get_num_threads()}.", "",
             f"Backbone forward, batch {BATCH} at {SIZE} px, channels-last, no_grad (random weights), images/s "
             f"(median of {a.repeats} calls, the two paths interleaved):", "",
             "| backbone | precision | two modules (torch's way) | folded (cnnlab's default) | folded vs two | "
             "features' distance from fp32's two modules: folded / two |", "|---|---|---:|---:|---:|---:|", *rows, "",
             "The last column is the features' relative distance (‖a − b‖ / ‖b‖) from the fp32 two-module "
             "forward: rounding only (fp32: ~1e-7); in bf16, folded and unfolded are about as far from fp32 "
             "(random weights: bf16's error grows through a random net's blocks). A test checks that the two "
             "paths are the same function in float64 for every family (`tests/test_fused.py`).", "",
             "EfficientNet-Lite0's ReLU6s at inference, both paths folded, at the images per pass cnnlab picks "
             f"(`inference_chunk`), images/s (median of {4 * a.repeats} calls, interleaved): each block's ReLU6 "
             "written straight into its stride-2 depthwise layer's zero-bordered padded input and the others in "
             "place (`SameConv2d.relu6_input`, the default) against `F.relu6` then `F.pad`, which fills a new "
             "tensor with zeros and copies the input in:", "",
             "| precision | images per pass | F.relu6 + F.pad | ReLU6 into the padded input (default) | gain | "
             "the same features |", "|---|---:|---:|---:|---:|---|", *pads, END]
    if not native_bf16():
        lines.insert(-1, "\nNo bf16 rows: this CPU has no native bf16 (AVX-512 BF16 or AMX), where cnnlab "
                         "computes in fp32.")
    publish("\n".join(lines) + "\n", a.write, START, END)


if __name__ == "__main__":
    main()
