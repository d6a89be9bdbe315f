"""The fast-path switches, measured: fused kernels, kept memory, channels-last, bf16-mixed, torch.compile.

    python benchmarks/switches_bench.py --profile --write BENCHMARKS.md   # what `make bench` runs
    python benchmarks/switches_bench.py --nets "harahap-cnn 28×28×1"      # one net, table only

Each row trains a few epochs with cnnlab's own loop (`cnnlab.experiment.build_experiment` + `train_one_epoch`) in
a fresh process and reports the median epoch after the first (which pays for warm-up / compiling).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_common import machine, machine_line, markers, publish, steady_median  # benchmarks/ is on sys.path

START, END = markers("switches-bench")  # a section per CPU kind
ROOT = Path(__file__).resolve().parent.parent
NETS = {
    "harahap-cnn 28×28×1": ["recipes/demo.yaml"],
    "alkhairi-cnn 64×64×3": ["recipes/demo.yaml", "data.source=animal-shapes-5", "data.image_size=64",
                             "data.channels=3", "model.name=alkhairi-cnn", "data.augment=false"],
    "resnet18 32×32×3": ["recipes/demo.yaml", "data.max_per_class=50", "data.image_size=32", "data.channels=3",
                         "model.name=resnet18"],
}
SWITCHES = {  # "default": cnnlab's CPU defaults (precision by the CPU's capability, channels-last, fused kernels,
    # freed memory kept)
    "the CPU default": [],
    "without fused kernels (train.fused=false)": ["train.fused=false"],
    "without native kernels (train.native=false)": ["train.native=false"],
    "without kept memory (train.reuse_memory=false)": ["train.reuse_memory=false"],
    "without either": ["train.fused=false", "train.reuse_memory=false"],
    "without either, NCHW (+ train.channels_last=false)": ["train.fused=false", "train.reuse_memory=false",
                                                           "train.channels_last=false"],
    "fp32 (train.precision=32)": ["train.precision=32"],
    "bf16-mixed (train.precision=bf16-mixed)": ["train.precision=bf16-mixed"],
    "torch.compile (train.compile=true)": ["train.compile=true"],
}


def measure(args: list[str], epochs: int, profile: bool) -> dict:
    from cnnlab.experiment import build_experiment
    from cnnlab.config import load_config
    from cnnlab.training.loop import train_one_epoch
    from cnnlab.training.progress import ProgressLogger

    cfg = load_config(args[0], args[1:])
    b = build_experiment(cfg, ProgressLogger("none"))
    times, faults = [], []
    for _ in range(epochs):
        t, f = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        train_one_epoch(b.model, b.data.train, b.optimizer, b.schedule, b.runtime)
        times.append(time.perf_counter() - t)
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f) / len(b.data.train))
    out = {"images": b.data.train.num_samples, "epoch_s": times, "faults_per_step": faults}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            train_one_epoch(b.model, b.data.train, b.optimizer, b.schedule, b.runtime)
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        out["steps"] = len(b.data.train)
    return out


def default_precision() -> str:
    from cnnlab.training.runtime import auto_precision

    import torch

    precision, why = auto_precision(torch.device("cpu"))
    return f"train.precision={precision} ({why})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="epochs per row (default 3; the first is not counted)")
    p.add_argument("--nets", default=",".join(NETS), help="comma-separated, of: " + ", ".join(NETS))
    p.add_argument("--profile", action="store_true", help="also profile one epoch of each net (the CPU default)")
    p.add_argument("--write", help="put the Markdown section into this file (e.g. BENCHMARKS.md)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(measure(json.loads(a.worker), a.epochs, a.profile)))
        return

    def run(args: list[str], profile: bool = False) -> dict:
        cmd = [sys.executable, __file__, "--worker", json.dumps(args), "--epochs", str(a.epochs)]
        proc = subprocess.run(cmd + (["--profile"] if profile else []), capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])

    lines = [START, f"## The fast-path switches (issue 4) — {machine()['capability']}", "",
             f"`python benchmarks/switches_bench.py{' --profile' if a.profile else ''}` — cnnlab's own loop, each row "
             f"a fresh process, median of epochs 2–{a.epochs}, measured {time.strftime('%Y-%m-%d')} on "
             f"{machine_line(machine())} (single runs: ±10 % between runs is usual on a shared machine). "
             f"The CPU default is {default_precision()}, channels-last, fused kernels (the optimiser's fused step; the papers' "
             "ReLU → batch norm → max-pool and ReLU → max-pool as one function each, `cnnlab/models/fused.py`, through "
             "cnnlab's native C kernels where they build, `cnnlab/models/native.py`) and freed memory kept in "
             "the process (`keep_freed_memory` in `cnnlab/training/runtime.py`); each other row switches "
             "something off or on. Page faults are the process's minor faults per training step.", "",
             "| net | setting | epoch (s) | images/s | vs the default | page faults / step |",
             "|---|---|---:|---:|---:|---:|"]
    for net in a.nets.split(","):
        base = None
        for name, switch in SWITCHES.items():
            r = run(NETS[net] + switch)
            epoch, faults = steady_median(r["epoch_s"]), steady_median(r["faults_per_step"])
            base = base or r["images"] / epoch
            lines.append(f"| {net} | {name} | {epoch:.2f} | {r['images'] / epoch:,.0f} | "
                         f"{r['images'] / epoch / base:.2f}× | {faults:,.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    for net in a.nets.split(",") if a.profile else []:
        r = run(NETS[net], profile=True)
        lines += ["", f"Where one epoch of {net} (the CPU default, {r['steps']} steps) spends its time:", "",
                  "```", r["profile"].strip("\n"), "```"]
    publish("\n".join(lines + ["", END]) + "\n", a.write, START, END)


if __name__ == "__main__":
    main()
