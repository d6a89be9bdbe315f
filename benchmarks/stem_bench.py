"""The second paper's stem: one native pass forward, its weight gradient from the pooled gradient (issue 14).

    python benchmarks/stem_bench.py --write BENCHMARKS.md     # what `make bench-kernels` runs
    python benchmarks/stem_bench.py --rounds 4                # a quicker look, table only

The second paper's net starts conv 3×3 (3 → 10 channels, unpadded) → ReLU → max-pool 2×2, and the image batch
needs no gradient. cnnlab's native path (`_NativeConvMaxPoolReLU` in cnnlab/models/fused.py) computes it forward
in one pass that never writes the convolution's output (`conv_pool_forward` in native_kernels.c: the two
convolution rows under each pooled row summed in registers, pooled there), and backward forms the convolution's
weight gradient from the pooled gradient at each window's max (`conv_pool_wgrad`) instead of writing the
full-sized gradient (`pool_scatter`) for torch's convolution backward to read. Two measurements:

  kernels   each direction alone at batch 128, 64×64×3, in the CPU default's precision (bf16 on AVX-512 BF16 /
            AMX CPUs, fp32 elsewhere): forward, torch's convolution (under autocast) + the native pool against
            conv_pool_forward; backward, pool_scatter + torch's convolution weight gradient against
            conv_pool_wgrad
  loop      cnnlab's training loop on the bench's task (animal-shapes-5 at 64×64×3, batch 128, the CPU
            defaults) on three paths, epochs interleaved in one process (the order rotating each round) so the
            machine's slower minutes fall on all three: the native stem both ways; the stem with torch's
            convolution forward (its backward only; the default in bf16 on AMX CPUs, native.stem_forward_pays);
            no stem (the native ReLU → max-pool and torch's convolution backward). Images/s and the per-round
            ratios' median and range. The script replaces fused.conv_max_pool_relu, and sets
            _NativeConvMaxPoolReLU.native_forward, for each epoch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench_common import (interleaved_median_ms, machine, markers, measured_line, publish, round_ratio,  # on sys.path
                          rounds)

START, END = markers("stem-bench")  # a section per CPU kind
ROOT = Path(__file__).resolve().parent.parent
TASK = ["recipes/demo.yaml", "data.source=animal-shapes-5", "data.image_size=64", "data.channels=3",
        "model.name=alkhairi-cnn", "data.augment=false"]
PATHS = ("native", "torch forward", "off")


def kernels(repeats: int, dtype_name: str) -> dict[str, float]:
    """Median ms of each direction's two paths at batch 128, 64×64×3 → 10."""
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
    b = torch.randn(10)
    xd, wd = x.to(dtype), w.to(dtype)
    y = F.conv2d(xd, wd)
    pooled, idx, _ = native.pool_stats(y, relu=True, stats=False)
    g = torch.randn(pooled.shape).to(dtype).contiguous(memory_format=cl)

    def torch_forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = F.conv2d(x, w, b)
        native.pool_stats(out, relu=True, stats=False)

    def torch_backward():
        dy = native.pool_scatter(y.shape, idx, g, pooled)
        torch.ops.aten.convolution_backward(dy, xd, wd, [10], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                            [False, True, True])

    got = interleaved_median_ms({"torch forward": torch_forward,
                      "native forward": lambda: native.conv_pool_forward(x, w, b, dtype)}, repeats)
    got.update(interleaved_median_ms({"torch backward": torch_backward,
                           "native backward": lambda: native.conv_pool_wgrad(x, (3, 3), idx, g, pooled)}, repeats))
    return got


def loop(rounds: int) -> dict:
    """Epoch seconds of cnnlab's loop on each path, interleaved (after one warm-up epoch)."""
    import cnnlab.models.fused as fused
    from cnnlab.config import load_config
    from cnnlab.experiment import build_experiment
    from cnnlab.training.loop import train_one_epoch
    from cnnlab.training.progress import ProgressLogger

    b = build_experiment(load_config(str(ROOT / TASK[0]), TASK[1:]), ProgressLogger("none"))
    stem, function = fused.conv_max_pool_relu, fused._NativeConvMaxPoolReLU

    def epoch(path: str) -> float:
        fused.conv_max_pool_relu = stem if path != "off" else (lambda x, conv: None)
        function.native_forward, function.enabled = path == "native", True  # on every CPU: both are timed
        t = time.perf_counter()
        train_one_epoch(b.model, b.data.train, b.optimizer, b.schedule, b.runtime)
        return time.perf_counter() - t

    epoch("native")  # warm-up
    seconds: dict[str, list[float]] = {p: [] for p in PATHS}
    try:
        for i in range(rounds):
            for path in PATHS[i % 3:] + PATHS[:i % 3]:
                seconds[path].append(epoch(path))
    finally:
        fused.conv_max_pool_relu, function.native_forward, function.enabled = stem, None, None
    r = b.runtime.describe()
    return {"images": b.data.train.num_samples, "seconds": seconds, "precision": r["precision"]}


def measure(doc: str, loop, kernels) -> tuple[argparse.Namespace, dict, dict, dict]:
    """The command line (--rounds, --repeats, --write), then `loop(rounds)` and `kernels(repeats, dtype)` in the
    loop's precision, on 2 threads: (the arguments, the machine, the loop's results with that precision's
    dtype name, the kernels' ms)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9, help="rounds of one epoch per path in the loop (default 9)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per kernel path (default 30)")
    p.add_argument("--write", help="put the Markdown section into this file (e.g. BENCHMARKS.md)")
    a = p.parse_args()
    if a.rounds < 1 or a.repeats < 1:
        p.error("--rounds and --repeats must be at least 1")
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    m = machine()
    r = loop(a.rounds)
    r["dtype"] = "bfloat16" if r["precision"].startswith("bf16") else "float32"
    return a, m, r, kernels(a.repeats, r["dtype"])


def main() -> None:
    import torch

    a, m, r, k = measure(__doc__, loop, kernels)
    dtype = r["dtype"]
    s, n = r["seconds"], r["images"]

    def ratio(slow: str) -> str:
        return round_ratio(s[slow], s["native"])

    from cnnlab.models.native import stem_forward_pays, stem_pays

    default_path = ("off" if not stem_pays() else
                    "native" if stem_forward_pays(getattr(torch, dtype)) else "torch forward")

    def row(path: str, what: str) -> str:
        mark = " (the default)" if path == default_path else ""
        return f"| {what}{mark} | {n / statistics.median(s[path]):,.0f} |"

    title = (f"## The second paper's stem: one native pass forward, its weight gradient from the pooled one "
             f"(issue 14) — {m['capability']}")
    lines = [START, title,
             "", measured_line("stem_bench.py", a, m), "",
             f"conv 3×3 (3 → 10) → ReLU → max-pool 2×2 alone, batch 128 at 64×64×3, {dtype} (median of "
             f"{a.repeats} interleaved calls):", "",
             "| direction | path | ms |", "|---|---|---:|",
             f"| forward | torch's convolution (under autocast in bf16) writes its output, the native pool reads it "
             f"| {k['torch forward']:.2f} |",
             f"| forward | the native stem: convolution, ReLU and pool in one pass (conv_pool_forward) | "
             f"{k['native forward']:.2f} |",
             f"| backward | native pool_scatter writes the full-sized gradient, torch's convolution weight "
             f"gradient reads it | {k['torch backward']:.2f} |",
             f"| backward | the native stem: the weight gradient from the pooled gradient (conv_pool_wgrad) | "
             f"{k['native backward']:.2f} |",
             "", f"cnnlab's training loop on the second paper's net (animal-shapes-5, 64×64×3, batch 128, the CPU "
             f"defaults: {r['precision']}), {rounds(a.rounds)} of one epoch per path, interleaved in one process:", "",
             "| path | images/s (median epoch) |", "|---|---:|",
             row("native", "the native stem, both directions"),
             row("torch forward", "the stem's backward only (torch's convolution forward)"),
             row("off", "no stem"), "",
             f"Within a round the native stem was {ratio('off')} as fast as no stem and {ratio('torch forward')} "
             "as fast as the stem with torch's convolution forward. "
             + {"native": "It is the default on this CPU (AVX2 or AVX-512: `native.stem_pays`).",
                "torch forward": f"In {dtype} on this CPU with AMX the default takes torch's convolution forward "
                                 "(oneDNN's AMX kernels) with the native backward (`native.stem_forward_pays`).",
                "off": "Without AVX2 or AVX-512 it is not the default (`native.stem_pays`)."}[default_path],
             "", END]
    publish("\n".join(lines) + "\n", a.write, START, END)


if __name__ == "__main__":
    sys.exit(main())
