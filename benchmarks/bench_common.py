"""What the benchmark scripts share: the machine's description and writing a section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path


def machine() -> dict:
    """CPU model, cores, RAM, OS and library versions."""
    import numpy
    import PIL
    import torch
    import torchvision

    from cnnlab.hardware import capability

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = info["model name"]
        if "cpu family" in info and "model" in info:  # "AMD EPYC" alone names both Zen 4 and Zen 5 machines
            cpu += f", family {info['cpu family']} model {info['model']}"
    except (OSError, KeyError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": cores, "ram_gib": round(ram), "os": f"{platform.system()} {platform.release()}",
            "capability": capability(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__, "numpy": numpy.__version__}


def peak_rss_mb() -> float:
    """This process's peak resident set in MB (VmHWM: unlike ru_maxrss, not inherited from the parent
    across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spawn(script: str, args: list[str], cwd: Path) -> dict:
    """Run `script` with `args` in a fresh Python process (a benchmark's worker); its last stdout line, as JSON."""
    import json
    import subprocess

    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False, cwd=cwd)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously) before reading a clock."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def steady_median(per_epoch: list[float]) -> float:
    """The median over the epochs after the first, which pays for warm-up (all of them if there is one)."""
    return statistics.median(per_epoch[1:] or per_epoch)


def spread(values: list[float], fmt: str, unit: str = "") -> str:
    """The median with `unit`, then the range when there are several values: '3.58× (2.39–3.91)'."""
    med = format(statistics.median(values), fmt) + unit
    return med if len(values) < 2 else f"{med} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def rounds(n: int) -> str:
    """'1 round', '3 rounds'."""
    return f"{n} round{'' if n == 1 else 's'}"


def round_ratio(slow: list[float], fast: list[float]) -> str:
    """How many times as fast the `fast` path ran as the `slow` one within a round, from their epoch seconds paired
    round by round (`switched_epochs`): '**1.16×** (the median over 9 rounds, range 1.12–1.20×)' or '**1.16×**
    (one round)'."""
    v = [s / f for s, f in zip(slow, fast, strict=True)]
    med = f"**{statistics.median(v):.2f}×**"
    return f"{med} (one round)" if len(v) < 2 else \
        f"{med} (the median over {len(v)} rounds, range {min(v):.2f}–{max(v):.2f}×)"


def machine_line(m: dict) -> str:
    return (f"{m['cpu']} ({m.get('capability', 'capability not recorded')}), {m['cores']} cores, {m['ram_gib']} GiB "
            f"RAM; {m['os']}; Python {m['python']}, "
            f"torch {m['torch']}, torchvision {m['torchvision']}, Pillow {m['pillow']}, numpy {m['numpy']}")


def measured_line(script: str, a, m: dict) -> str:
    """A kernels-and-loop bench's command and machine line (its arguments `a` from stem_bench.measure)."""
    import torch

    return (f"`python benchmarks/{script} --rounds {a.rounds} --repeats {a.repeats}` — measured "
            f"{time.strftime('%Y-%m-%d')} on {machine_line(m)}; torch threads {torch.get_num_threads()}.")


def markers(name: str, kind: str | None = None) -> tuple[str, str]:
    """The start and end markers of one benchmark's section for one CPU kind (default: this machine's). Each
    kind keeps its own section: a run on an AVX2 CPU replaces the AVX2 section and never an AVX-512 one."""
    from cnnlab.hardware import capability

    kind = kind or capability()
    return f"<!-- {name} [{kind}]:start -->", f"<!-- {name} [{kind}]:end -->"


def publish(section: str, path: str | None, start: str, end: str) -> None:
    """Print `section`; with a `path`, also put it there (write_section)."""
    print(section)
    if path:
        write_section(Path(path), section, start, end)
        print(f"written into {path}", file=sys.stderr)


def write_section(path: Path, section: str, start: str, end: str) -> None:
    """Replace the text between the `start` and `end` markers of `path` with `section` (which carries
    both markers), or append it (a CPU kind measured for the first time); the rest of the file is kept."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    if start in text and end in text:
        i, j = text.index(start), text.index(end) + len(end)
        text = text[:i] + section.rstrip("\n") + text[j:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in ms over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


# the square products whose rate the benches set training and inference against, per precision
MATMUL_N = {"fp32": 2048, "bf16": 512}


def matmul_gflops(dtype_name: str = "fp32", n: int | None = None, repeats: int = 5, warmup_s: float = 0.3) -> float:
    """The machine's n×n (default MATMUL_N) matrix-multiply rate (torch.mm, its threads) in GFLOP/s: median of
    `repeats` calls after `warmup_s` seconds of them (at least one). In a fresh process one warm-up call was not enough: a 512² bf16
    product read 278 GFLOP/s there and ~400 in the same minute after training had run (Zen 4, 2026-12-07)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    n = n or MATMUL_N[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = time.perf_counter()
    while True:
        torch.mm(a, b)
        if time.perf_counter() - t >= warmup_s:
            break
    return 2 * n ** 3 / median_ms(lambda: torch.mm(a, b), repeats, warmup=0) * 1000 / 1e9


def interleaved_median_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms per function, calls interleaved (after one warm-up call each)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def switched_epochs(config: list[str], switch, rounds: int) -> dict:
    """cnnlab's training loop on `config` (a recipe path, then overrides) with `switch.enabled` True and False,
    epochs interleaved in one process (the order alternating each round, after a warm-up epoch each) so the
    machine's slower minutes fall on both: {images, seconds: {True: [...], False: [...]}, precision}.
    `switch.enabled` is None (the CPU's default) afterwards."""
    from cnnlab.config import load_config
    from cnnlab.experiment import build_experiment
    from cnnlab.training.loop import train_one_epoch
    from cnnlab.training.progress import ProgressLogger

    b = build_experiment(load_config(config[0], config[1:]), ProgressLogger("none"))

    def epoch(on: bool) -> float:
        switch.enabled = on  # on every CPU: both are timed
        t = time.perf_counter()
        train_one_epoch(b.model, b.data.train, b.optimizer, b.schedule, b.runtime)
        return time.perf_counter() - t

    seconds: dict[bool, list[float]] = {True: [], False: []}
    try:
        epoch(True), epoch(False)  # warm-ups
        for i in range(rounds):
            for on in ((True, False) if i % 2 == 0 else (False, True)):
                seconds[on].append(epoch(on))
    finally:
        switch.enabled = None
    return {"images": b.data.train.num_samples, "seconds": seconds, "precision": b.runtime.describe()["precision"]}
