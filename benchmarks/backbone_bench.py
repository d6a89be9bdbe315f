"""Pretrained backbones on the CPU: feature extraction throughput, and a whole head-only run on real photos.

1. Features per second of each backbone whose ImageNet weights are offline here, and of resnet18/50
   (torchvision downloads theirs: where they are not cached, timed with random weights — the same speed),
   at its default input size, batch 32: the plain way (NCHW fp32 `model(x)` under no_grad, in a loop)
   against cnnlab's feature path (features.compute_features: channels-last, the run's precision), in fp32
   and, where the CPU has native bf16 (AVX-512 BF16 / AMX), in bf16-mixed, and its other engine, ONNX
   Runtime on the backbone exported once (fp32; the export timed apart, into an empty cache). Medians of
   --repeats timed batches after a warm-up batch. The best engine's GFLOP/s (the forward's FLOPs counted by
   torch's FlopCounterMode) is set against the machine's matrix-multiply rate in its precision, measured
   right before and after each backbone's row (a 2048² product in fp32, 512² in bf16; a shared VM's speed
   drifts within minutes): how far the figure is from the CPU's limit.
2. `cnnlab train` head-only EfficientNet-Lite0 on ../shared/data/flowers12 (960 photos), from an empty
   cache (decode, features, head, report), medians of --runs runs: wall seconds and test accuracy.

    python benchmarks/backbone_bench.py [--repeats 5] [--runs 3] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import MATMUL_N, machine, machine_line, markers, matmul_gflops, publish  # noqa: E402

START, END = markers("backbone-bench")  # a section per CPU kind
ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "data" / "flowers12"


TIMED_ANYWAY = ("resnet18", "resnet50")  # issue 14's other backbones, timed with or without weights


def throughput(name: str, repeats: int, batch: int = 32) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cnnlab.data.loader import DeviceLoader, Normalizer
    from cnnlab.features import OnnxFeatures, compute_features
    from cnnlab.models import MODELS, create_model, load_weights
    from cnnlab.models.weights import imagenet_offline
    from cnnlab.training import Runtime

    size = MODELS.info[name]["input_size"]
    model = create_model(name, 10, 3, size)
    weights = imagenet_offline(name)
    if weights:
        load_weights(model, "imagenet")
    backbone = model.backbone.eval()
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    norm = Normalizer([0.5] * 3, [0.25] * 3)

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return batch / statistics.median(times)

    def plain():
        with torch.no_grad():
            backbone(norm(x))

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        backbone(norm(x[:1]))
    rates = {"fp32": [matmul_gflops("fp32")], "bf16": [matmul_gflops("bf16")]}
    out = {"model": name, "size": size, "weights": weights, "flops": fc.get_total_flops(), "rates": rates,
           "plain": timed(plain)}
    backbone.to(memory_format=torch.channels_last)
    for precision in ("32", "bf16-mixed"):
        runtime = Runtime("cpu", precision=precision, channels_last=True)
        loader = DeviceLoader(x, torch.zeros(batch, dtype=torch.int64), norm, batch, channels_last=True)
        out[precision] = timed(lambda: compute_features(backbone, loader, runtime))
    runtime = Runtime("cpu", precision="32", channels_last=True)
    with tempfile.TemporaryDirectory() as tmp:  # an empty cache: the one-off export is timed
        saved, os.environ["CNNLAB_CACHE"] = os.environ.get("CNNLAB_CACHE"), tmp
        try:
            t = time.perf_counter()
            engine = OnnxFeatures(backbone, 3, size, runtime.threads)
            out["onnx_export_s"] = time.perf_counter() - t
        finally:
            os.environ.pop("CNNLAB_CACHE") if saved is None else os.environ.update(CNNLAB_CACHE=saved)
    out["onnxruntime"] = timed(lambda: compute_features(backbone, loader, runtime, engine))
    backbone.to(memory_format=torch.contiguous_format)
    rates["fp32"].append(matmul_gflops("fp32"))
    rates["bf16"].append(matmul_gflops("bf16"))
    return out


def head_only_run(runs: int) -> dict:
    """`cnnlab train transfer`, head only, each run with an empty cache: decode + features + head + report."""
    seconds, acc, engines = [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "CNNLAB_CACHE": str(Path(tmp) / "cache")}
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cnnlab", "train", str(ROOT / "recipes" / "transfer.yaml"),
                            f"data.source=folder:{FLOWERS}", "model.unfreeze_after=null", "data.augment=false",
                            "train.tta=none", "optim.lr=0.003", "train.epochs=15", "--out", str(Path(tmp) / "run"),
                            "--progress", "none"], check=True, env=env, cwd=tmp)
            seconds.append(time.perf_counter() - t)
            acc.append(json.loads((Path(tmp) / "run" / "metrics.json").read_text())["accuracy"])
            engines.append(json.loads((Path(tmp) / "run" / "env.json").read_text()).get("feature_engine"))
    return {"seconds": seconds, "accuracy": acc, "engines": engines}


def best_engine(r: dict) -> tuple[str, float]:
    """(precision, images/s) of the row's fastest cnnlab engine."""
    return max((("bf16", r["bf16-mixed"]), ("fp32", r["32"]), ("fp32", r["onnxruntime"])), key=lambda e: e[1])


def render(m: dict, rows: list[dict], head: dict | None, repeats: int) -> str:
    lines = [START, f"## Pretrained backbones on the CPU (issue 13) — {m['capability']}", "",
             f"Machine: {machine_line(m)}.", "",
             f"Feature extraction at each backbone's ImageNet input size, batch 32, images/s (median of {repeats} "
             "batches after a warm-up; `python benchmarks/backbone_bench.py`). *plain*: NCHW fp32 `model(x)` under "
             "`no_grad`; *cnnlab*: `features.compute_features` (channels-last) at train.precision 32 and "
             "bf16-mixed with torch (`train.feature_engine=torch`), and in fp32 with ONNX Runtime "
             "(`train.feature_engine=onnxruntime`: the backbone exported to ONNX once — the export's seconds, "
             "into an empty cache, in brackets — and run by ONNX Runtime's CPU kernels). *best's share*: the "
             "fastest cnnlab engine's GFLOP/s (the forward's FLOPs per image, counted by torch's "
             "FlopCounterMode, × its images/s) against the matrix-multiply rate in its precision: the mean of "
             f"a {MATMUL_N['fp32']}² fp32 product's (or a {MATMUL_N['bf16']}² bf16 one's) GFLOP/s measured right before and after "
             "the row, in brackets (a shared VM's speed drifts within minutes). Above 100 %: torch's matrix "
             "multiply is not the CPU's limit.", "",
             "| backbone | input | GFLOP / image | plain NCHW fp32 | cnnlab fp32, torch | cnnlab bf16-mixed, torch | "
             "cnnlab fp32, ONNX Runtime (export) | best vs plain | best's share of the matmul rate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        precision, best = best_engine(r)
        gflops = r["flops"] * best / 1e9
        name = r["model"] + ("" if r["weights"] else " (random weights)")
        rate = r["rates"][precision]
        lines.append(f"| {name} | {r['size']} | {r['flops'] / 1e9:.2f} | {r['plain']:.1f} | {r['32']:.1f} | "
                     f"{r['bf16-mixed']:.1f} | {r['onnxruntime']:.1f} ({r['onnx_export_s']:.1f} s) | "
                     f"{best / r['plain']:.2f}× | {gflops:,.0f} GFLOP/s, {gflops / statistics.mean(rate):.0%} of "
                     f"{precision}'s ({' → '.join(f'{v:,.0f}' for v in rate)}) |")
    if head:
        s, a = head["seconds"], head["accuracy"]
        lines += ["", f"Head-only EfficientNet-Lite0 on flowers12 (960 photos, 12 species; `cnnlab train transfer` "
                  "with the head alone, 15 epochs, `train.feature_engine=auto`), each run from an empty cache — "
                  "decoding, the ONNX export where auto probes it, features, head and report — "
                  f"median of {len(s)} runs: **{statistics.median(s):.1f} s** wall "
                  f"(runs: {', '.join(f'{v:.1f}' for v in s)}), test accuracy "
                  f"{', '.join(f'{v:.3f}' for v in a)}; the features computed by "
                  f"{', '.join(str(e) for e in head.get('engines', []))}. Target: ≥ 90 % in under 60 s on 2 cores."]
    lines += [END, ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--runs", type=int, default=3, help="whole head-only runs (0: skip)")
    p.add_argument("--write", help="put the section into this Markdown file")
    a = p.parse_args()
    from cnnlab.models.weights import offline_choices

    names = offline_choices()
    rows = [throughput(name, a.repeats) for name in names + [n for n in TIMED_ANYWAY if n not in names]]
    head = head_only_run(a.runs) if a.runs and FLOWERS.is_dir() else None
    publish(render(machine(), rows, head, a.repeats), a.write, START, END)


if __name__ == "__main__":
    main()
