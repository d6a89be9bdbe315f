"""Batch norm folded into the convolution before it at inference, against the two modules, in one process.

    python benchmarks/fold_bench.py [--repeats 9] [--write BENCHMARKS.md]

For each pretrained family's backbone at 224 px (EfficientNet-Lite0, ResNet-18/50, MobileNetV3-Large; random
weights — the speed is the same), a forward pass of a batch of 32 under no_grad in channels-last, in fp32 and,
where the CPU has native bf16 (AVX-512 BF16 / AMX), under bf16 autocast: with each batch norm folded into its
convolution (cnnlab's default at inference: `fused.pair_conv_bn`) against `unfolded_batch_norm()` (the
convolution and the batch norm as two modules, as torch runs them). The two are timed interleaved, call by call
(a shared VM's speed drifts within minutes); medians of --repeats calls after a warm-up call each. Also each
path's features' relative distance from the fp32 two-module forward's (rounding only).
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
             "paths are the same function in float64 for every family (`tests/test_fused.py`).", END]
    if not native_bf16():
        lines.insert(-1, "\nNo bf16 rows: this CPU has no native bf16 (AVX-512 BF16 or AMX), where cnnlab "
                         "computes in fp32.")
    publish("\n".join(lines) + "\n", a.write, START, END)


if __name__ == "__main__":
    main()
