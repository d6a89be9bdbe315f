"""The fast-path switches, measured: fused kernels, kept memory, channels-last, bf16-mixed, torch.compile.

    python benchmarks/switches_bench.py --rounds 3 --profile --write BENCHMARKS.md   # what `make bench` runs
    python benchmarks/switches_bench.py --nets "harahap-cnn 28×28×1"      # one net, one round, table only

Each row trains a few epochs with cnnlab's own loop (`cnnlab.experiment.build_experiment` + `train_one_epoch`) in
a fresh process and reports the median epoch after the first (which pays for warm-up / compiling). With
--rounds N every net's rows run N times, round by round (so a slow minute of the machine falls on one round of
each row, not on one row), and the table gives each row's median over the rounds with their range.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from bench_common import machine, machine_line, markers, publish, spawn, spread, steady_median  # benchmarks/ is on sys.path

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


PHASES = ("data", "forward", "loss and the rest", "backward", "gradient-norm check", "optimiser step")


def phase_times(b) -> dict[str, float]:
    """Seconds per training step in each phase of one epoch of cnnlab's loop, timed around the calls without a
    profiler (on the CPU every op has finished when its call returns): the next batch (drawn, normalised,
    augmented), the model's forward, its backward, the per-step gradient-norm check and the optimiser's step; the
    rest of the step (the loss, zeroing gradients, the schedule, the epoch's sums, Python) is what is left of
    the epoch's wall time. torch's profiler charges some small ops with time spent elsewhere (on the Zen 4 it
    put much of a step on a weight gradient's cast whose removal changed nothing measurable): these are the honest
    totals to read its table against."""
    from contextlib import ExitStack
    from unittest import mock

    import torch

    from cnnlab.training.loop import train_one_epoch

    spent = dict.fromkeys(PHASES, 0.0)
    loader, model, precision = b.data.train, b.model, b.runtime.precision
    iterate = loader.iterate

    def timed(phase, f):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - t
        return call

    def batches(order, start=0):
        it = iterate(order, start)
        while True:
            t = time.perf_counter()
            item = next(it, None)
            spent["data"] += time.perf_counter() - t
            if item is None:
                return
            yield item

    with ExitStack() as patches:  # every wrapper undone on the way out, however it ends
        for obj, name, new in ((loader, "iterate", batches), (model, "forward", timed("forward", model.forward)),
                               (precision, "backward", timed("backward", precision.backward)),
                               (precision, "step", timed("optimiser step", precision.step)),
                               (torch.nn.utils, "get_total_norm",
                                timed("gradient-norm check", torch.nn.utils.get_total_norm))):
            patches.enter_context(mock.patch.object(obj, name, new))
        t = time.perf_counter()
        train_one_epoch(model, loader, b.optimizer, b.schedule, b.runtime)
        total = time.perf_counter() - t
    missed = [k for k, v in spent.items() if k != "loss and the rest" and v == 0.0]
    if missed:  # the loop no longer calls what is wrapped: its time would hide in "the rest"
        raise RuntimeError(f"phase_times: nothing timed for {missed}; has training/loop.py changed its calls?")
    spent["loss and the rest"] = total - sum(spent.values())
    return {phase: v / len(loader) for phase, v in spent.items()}


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
        out["phases"] = phase_times(b)
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
    p.add_argument("--rounds", type=int, default=1, help="runs of every row, round by round (default 1)")
    p.add_argument("--write", help="put the Markdown section into this file (e.g. BENCHMARKS.md)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(measure(json.loads(a.worker), a.epochs, a.profile)))
        return

    if a.rounds < 1:
        p.error("--rounds must be at least 1")

    def run(args: list[str], profile: bool = False) -> dict:
        return spawn(__file__, ["--worker", json.dumps(args), "--epochs", str(a.epochs)]
                     + (["--profile"] if profile else []), ROOT)

    lines = [START, f"## The fast-path switches (issue 4) — {machine()['capability']}", "",
             f"`python benchmarks/switches_bench.py{f' --rounds {a.rounds}' if a.rounds > 1 else ''}"
             f"{' --profile' if a.profile else ''}` — cnnlab's own loop, each row a fresh process, median of epochs "
             f"2–{a.epochs}, measured {time.strftime('%Y-%m-%d')} on {machine_line(machine())} "
             + (f"(each row's median over {a.rounds} rounds of all the net's rows, the rows' order reversed every "
                "other round, the rounds' range in brackets; 'vs the default' is the median of the ratios to the "
                "default taken within each round, so a slower round of the machine falls on both). "
                if a.rounds > 1 else "(single runs: ±10–30 % between runs on a shared machine). ")
             +
             f"The CPU default is {default_precision()}, channels-last, fused kernels (the optimiser's fused step; the papers' "
             "ReLU → batch norm → max-pool and ReLU → max-pool as one function each, `cnnlab/models/fused.py`, through "
             "cnnlab's native C kernels where they build, `cnnlab/models/native.py`) and freed memory kept in "
             "the process (`keep_freed_memory` in `cnnlab/training/runtime.py`); each other row switches "
             "something off or on. Page faults are the process's minor faults per training step.", "",
             "| net | setting | epoch (s) | images/s | vs the default | page faults / step |",
             "|---|---|---:|---:|---:|---:|"]
    for net in a.nets.split(","):
        rows: dict[str, list[dict]] = {name: [] for name in SWITCHES}
        for i in range(a.rounds):
            order = list(SWITCHES) if i % 2 == 0 else list(reversed(SWITCHES))
            for name in order:
                rows[name].append(run(NETS[net] + SWITCHES[name]))
                r = rows[name][-1]
                print(f"[{i + 1}/{a.rounds}] {net} | {name}: {r['images'] / steady_median(r['epoch_s']):,.0f} images/s",
                      file=sys.stderr, flush=True)
        ips = {name: [r["images"] / steady_median(r["epoch_s"]) for r in rs] for name, rs in rows.items()}
        base = ips["the CPU default"]
        for name, rs in rows.items():
            med, images = statistics.median(ips[name]), rs[0]["images"]
            faults = statistics.median(steady_median(r["faults_per_step"]) for r in rs)
            ratios = [x / d for x, d in zip(ips[name], base)]  # within each round
            lines.append(f"| {net} | {name} | {images / med:.2f} | {spread(ips[name], ',.0f')} | "
                         f"{'1.00×' if name == 'the CPU default' else spread(ratios, '.2f', '×')} | {faults:,.0f} |")
    for net in a.nets.split(",") if a.profile else []:
        r = run(NETS[net], profile=True)
        step = sum(r["phases"].values())
        lines += ["", f"Where a training step of {net} (the CPU default) goes, timed around the calls without a "
                  f"profiler over one epoch of {r['steps']} steps (`phase_times`): {step * 1e3:.2f} ms a step", "",
                  "| phase | ms a step | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {v * 1e3:.2f} | {v / step:.0%} |" for k, v in r["phases"].items()]
        lines += ["", "And one epoch under torch's profiler (the same net; self CPU time per op, which for small "
                  "ops can include time spent elsewhere):", "", "```", r["profile"].strip("\n"), "```"]
    publish("\n".join(lines + ["", END]) + "\n", a.write, START, END)


if __name__ == "__main__":
    main()
