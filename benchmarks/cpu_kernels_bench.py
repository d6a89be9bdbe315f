"""The figures behind two CPU choices for pretrained backbones (issue 14), measured on this machine:

1. Depthwise convolutions train in fp32 under bf16 autocast (`models.fused.CpuConv2d`): the time of a
   depthwise layer's input and weight gradients in bf16 and in fp32, for EfficientNet-Lite0's layer kinds at
   batch 32 (channels-last); then a whole training step (batch 32, 224 px, bf16 autocast, AdamW) of
   EfficientNet-Lite0 and MobileNet-v3-large with CpuConv2d on (`train.fused` default) and off.
2. Inference in passes under glibc's 32 MiB mmap threshold (`training.runtime.inference_chunk`):
   EfficientNet-Lite0 feature images/s at 224 px in bf16 and fp32 by pass size, freed memory kept in the
   process (cnnlab's default), and the pass size cnnlab picks.

Medians of --repeats timings after a warm-up; bf16 rows only where the CPU has native bf16.

    python benchmarks/cpu_kernels_bench.py [--repeats 5] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine, machine_line, markers, median_ms, publish  # noqa: E402

START, END = markers("cpu-kernels-bench")  # a section per CPU kind
# (channels, side, kernel, stride): EfficientNet-Lite0's depthwise layer kinds at 224 px (TF "same" padding)
LAYERS = [(96, 113, 3, 2), (144, 56, 3, 1), (144, 59, 5, 2), (240, 28, 5, 1)]


def layer_times(repeats: int) -> list[dict]:
    import torch

    rows = []
    for c, side, k, s in LAYERS:
        row = {"layer": f"{c}×{side}², {k}×{k} stride {s}"}
        for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            x = torch.randn(32, c, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c, 1, k, k, dtype=dtype).contiguous(memory_format=torch.channels_last)
            g = torch.randn_like(torch.nn.functional.conv2d(x, w, None, s, 0, 1, c))

            def grads(which):
                return lambda: torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [0, 0], [1, 1], False,
                                                                   [0, 0], c, which)
            row[f"fwd_{tag}"] = median_ms(lambda: torch.nn.functional.conv2d(x, w, None, s, 0, 1, c), repeats)
            row[f"gi_{tag}"] = median_ms(grads([True, False, False]), repeats)
            row[f"gw_{tag}"] = median_ms(grads([False, True, False]), repeats)
        rows.append(row)
    return rows


def step_rate(name: str, fused: bool, repeats: int) -> float:
    import torch
    import torch.nn.functional as F

    from cnnlab.models import create_model, set_fusion

    torch.manual_seed(0)
    model = create_model(name, 12, 3, 224).train().to(memory_format=torch.channels_last)
    set_fusion(model, None if fused else False)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, fused=True)
    x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 12, (32,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return 32 / (median_ms(step, repeats) / 1000)


def pass_sizes(repeats: int) -> dict:
    """{precision: ({pass size: images/s}, the pass size cnnlab picks)} for Lite0 features on 64 images."""
    import torch

    from cnnlab.models import create_model
    from cnnlab.training import Runtime
    from cnnlab.training.runtime import inference_chunk

    model = create_model("efficientnet-lite0", 10, 3, 224).backbone.eval().to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    out = {}
    for precision in ("bf16-mixed", "32"):
        runtime = Runtime("cpu", precision=precision, channels_last=True)  # keeps freed memory (the default)
        rates = {}
        for n in (4, 8, 16, 32, 64):
            def run():
                with torch.no_grad(), runtime.autocast():
                    for part in x.split(n):
                        model(part)
            rates[n] = 64 / (median_ms(run, repeats) / 1000)
        out[precision] = (rates, inference_chunk(model, x, runtime))
    return out


def render(m: dict, layers: list[dict], steps: dict, sweeps: dict, repeats: int) -> str:
    lines = [START, f"## CPU kernels for pretrained backbones (issue 14) — {m['capability']}", "",
             f"Machine: {machine_line(m)}. `python benchmarks/cpu_kernels_bench.py --repeats {repeats}`; medians.",
             "", "A depthwise layer's gradients at batch 32, channels-last, ms (torch's CPU kernels):", "",
             "| layer | forward bf16 | input grad bf16 | weight grad bf16 | forward fp32 | input grad fp32 | "
             "weight grad fp32 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in layers:
        lines.append(f"| {r['layer']} | {r['fwd_bf16']:.1f} | {r['gi_bf16']:.1f} | {r['gw_bf16']:.1f} | "
                     f"{r['fwd_fp32']:.1f} | {r['gi_fp32']:.1f} | {r['gw_fp32']:.1f} |")
    lines += ["", "A training step (batch 32, 224 px, bf16 autocast, AdamW), images/s — depthwise layers in fp32 "
              "(`CpuConv2d`, the default) against torch's bf16 kernels (`train.fused=false`):", "",
              "| model | CpuConv2d on | off | gain |", "|---|---:|---:|---:|"]
    for name, (on, off) in steps.items():
        lines.append(f"| {name} | {on:.1f} | {off:.1f} | {on / off:.2f}× |")
    lines += ["", "EfficientNet-Lite0 features at 224 px, images/s by images per forward pass (64 images, freed "
              "memory kept; cnnlab's own pass size, from `inference_chunk`, in the last column):", "",
              "| precision | " + " | ".join(str(n) for n in next(iter(sweeps.values()))[0]) + " | cnnlab picks |",
              "|---|" + "---:|" * (len(next(iter(sweeps.values()))[0]) + 1)]
    for precision, (rates, picked) in sweeps.items():
        lines.append(f"| {precision} | " + " | ".join(f"{r:.0f}" for r in rates.values()) + f" | {picked} |")
    lines += [END, ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write", help="put the section into this Markdown file")
    a = p.parse_args()
    import torch

    from cnnlab.hardware import native_bf16
    from cnnlab.training.runtime import keep_freed_memory

    if not native_bf16():  # not an error: `make bench` goes on with the other benchmarks
        print("this CPU computes bf16 in software: cnnlab trains in fp32 here and CpuConv2d never applies; "
              "nothing to measure", file=sys.stderr)
        return
    keep_freed_memory()
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    layers = layer_times(a.repeats)
    steps = {name: (step_rate(name, True, a.repeats), step_rate(name, False, a.repeats))
             for name in ("efficientnet-lite0", "mobilenet-v3-large")}
    publish(render(machine(), layers, steps, pass_sizes(a.repeats), a.repeats), a.write, START, END)


if __name__ == "__main__":
    main()
