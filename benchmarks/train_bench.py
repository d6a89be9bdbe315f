"""Training speed: cnnlab against Keras 3 (TensorFlow), a plain PyTorch loop and PyTorch Lightning.

    make bench                                   # installs the extras, runs this, writes BENCHMARKS.md
    python benchmarks/train_bench.py --repeats 3 --write BENCHMARKS.md
    python benchmarks/train_bench.py --tools cnnlab,plain --repeats 1 --epochs 3   # a quick look
    python benchmarks/train_bench.py --from-json .bench-cache/train_bench.json --write BENCHMARKS.md
                                                 # re-render the section from the last run's raw results

Two tasks, the same model, data, split, batch size, optimiser, schedule and epochs for every tool:

  harahap   the first paper's net (conv 5×5×32 → BN → pool → dense 128 → dropout 0.2) on the built-in
            Animal-Shape silhouettes, 28×28×1, 10 classes, 7,000 training / 1,500 test images, batch 128,
            20 epochs of AdamW (peak lr 0.003, weight decay 5e-4) on a one-cycle schedule, with random
            flip / rotation ±5° / zoom ±5 % / shift ±5 % (the `make demo` recipe, 20 epochs instead of 15:
            with 15 its test accuracy peaks at 95.9 %). Measured: training
            images per second, and the training seconds until the test accuracy first reaches 96 %.
  alkhairi  the second paper's CNN on the five Animal-Shape classes at 64×64×3, batch 128, Adam 1e-3,
            no augmentation, 3 epochs: training images per second.

Each tool is written the way its own documentation teaches it:

  cnnlab     its training loop (`cnnlab.training`) on the splits `cnnlab train` builds, with its defaults
  keras      Keras 3 on TensorFlow: Sequential model with Random* preprocessing layers, model.fit on
             NumPy arrays, a LearningRateSchedule for the one-cycle
  plain      a torchvision-tutorial loop: a Dataset returning PIL images, per-sample transforms
             (RandomHorizontalFlip, RandomAffine, ToTensor, Normalize), DataLoader(num_workers=2),
             torch's OneCycleLR, the same nn.Module as cnnlab
  lightning  the same Dataset / DataLoader / nn.Module in a LightningModule, Trainer on the CPU

Every measurement runs in its own process (a fresh interpreter: peak RSS is its own), tools
interleaved within each repeat so a slower minute of the machine hits all of them; ratios are
computed within a repeat, then the median is taken. Test accuracy is measured after every
epoch, outside the timed training (the same 1,500 images for every tool).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from cnnlab.hardware import capability  # noqa: E402
from bench_common import (MATMUL_N, machine, machine_line, markers, matmul_gflops, peak_rss_mb, publish, spawn,  # on sys.path
                          spread, steady_median, synchronize)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOOLS = ("cnnlab", "keras", "plain", "lightning")
TARGET = 0.96
MATRIX_TARGET = 0.5  # issue 14: training at ≥ 50 % of the matrix-multiply rate in the precision used
TASKS = {
    "harahap": dict(source="animal-shapes", size=28, channels=1, model="harahap-cnn", epochs=20, batch=128,
                    optim="adamw", lr=0.003, weight_decay=5e-4, schedule="one-cycle", augment=True),
    "alkhairi": dict(source="animal-shapes-5", size=64, channels=3, model="alkhairi-cnn", epochs=3, batch=128,
                     optim="adam", lr=0.001, weight_decay=0.0, schedule="constant", augment=False),
}
AUG = dict(hflip=0.5, rotation=5.0, scale=0.05, translate=0.05)
START, END = markers("train-bench")  # a section per CPU kind
# products a sample after each epoch (~20 ms of bf16 512², ~0.4 s of fp32 2048²), after a 10 ms warm-up: the first
# epoch's sample may be cold, and steady_median drops it with that epoch
REF_REPEATS = {"bf16": 25, "fp32": 3}


# --------------------------------------------------------------------------- data (exported once)

def export_data(task: str, cache: Path) -> Path:
    """The split `cnnlab train` makes (stratified 70/15/15, split seed 0), as uint8 NCHW arrays.
    cnnlab's own worker rebuilds it from its config; the others read this file."""
    t = TASKS[task]
    path = cache / f"{task}.npz"
    if path.is_file():
        return path
    import numpy as np

    from cnnlab.data import load_source, stratified_split
    from cnnlab.data.stream import fit_normalizer

    ds = load_source(t["source"], image_size=t["size"], channels=t["channels"], progress=False)
    sp = stratified_split(ds.labels, 0.15, 0.15, 0)
    norm = fit_normalizer(ds.images, sp.train)  # the statistics cnnlab itself trains with
    x, y = ds.images.numpy(), ds.labels.numpy()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x[sp.train], y_train=y[sp.train], x_test=x[sp.test], y_test=y[sp.test],
             mean=np.array(norm.mean), std=np.array(norm.std), classes=len(ds.classes))
    return path


def _cnnlab_config(task: str, epochs: int) -> dict:
    t = TASKS[task]
    return {"data": {"source": t["source"], "image_size": t["size"], "channels": t["channels"],
                     "batch_size": t["batch"], "augment": t["augment"], "aug_rotation": AUG["rotation"],
                     "aug_scale": AUG["scale"], "aug_translate": AUG["translate"], "aug_hflip": AUG["hflip"]},
            "model": {"name": t["model"]},
            "optim": {"name": t["optim"], "lr": t["lr"], "weight_decay": t["weight_decay"]},
            "schedule": {"name": t["schedule"]}, "train": {"epochs": epochs, "seed": 0, "progress": "none"}}


# --------------------------------------------------------------------------- one tool, one run

def run_cnnlab(task: str, epochs: int, data: Path, overrides: tuple[str, ...] = ()) -> dict:
    """`overrides`: config settings on top (gpu_bench.py: train.device=cuda, train.precision=…)."""
    from cnnlab.experiment import build_experiment
    from cnnlab.config import load_config
    from cnnlab.training.loop import evaluate, train_one_epoch
    from cnnlab.training.progress import ProgressLogger

    cfg = load_config(_cnnlab_config(task, epochs), list(overrides))
    b = build_experiment(cfg, ProgressLogger("none"))
    r = b.runtime.describe()
    # the matrix-multiply rate in the precision this run trains in, sampled after every epoch in this process
    # (its threads, the same minutes of the VM): the share of it is then taken run by run, paired
    ref = ("bf16" if r["precision"] == "bf16-mixed" else "fp32") if b.runtime.device.type == "cpu" else None
    epoch_s, acc, ref_gflops = [], [], []
    for _ in range(epochs):
        t = time.perf_counter()
        train_one_epoch(b.model, b.data.train, b.optimizer, b.schedule, b.runtime)
        synchronize(b.runtime.device)
        epoch_s.append(time.perf_counter() - t)
        acc.append(evaluate(b.model, b.data.test, b.runtime, prefix="")["accuracy"])
        if ref:
            ref_gflops.append(matmul_gflops(ref, repeats=REF_REPEATS[ref], warmup_s=0.01))
    return {"epoch_s": epoch_s, "test_acc": acc, "n_train": b.data.train.num_samples,
            **({"ref": {"precision": ref, "n": MATMUL_N[ref], "gflops": ref_gflops}} if ref else {}),
            "settings": f"threads {r['threads']}, channels_last {r['channels_last']}, precision {r['precision']}, "
                        f"fused {r['fused']}, native {r.get('native')}, reuse_memory {r['reuse_memory']}"}


def _torch_pipeline(task: str, data: Path, per_sample_aug: bool):
    """The tutorial pipeline: a Dataset of PIL images with per-sample transforms, DataLoaders."""
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    t = TASKS[task]
    d = np.load(data)
    mean, std = d["mean"].tolist(), d["std"].tolist()
    aug = [T.RandomHorizontalFlip(AUG["hflip"]),
           T.RandomAffine(AUG["rotation"], translate=(AUG["translate"],) * 2,
                          scale=(1 - AUG["scale"], 1 + AUG["scale"]))] if per_sample_aug else []
    train_tf = T.Compose(aug + [T.ToTensor(), T.Normalize(mean, std)])
    test_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    class ArrayImages(Dataset):
        def __init__(self, x, y, transform):
            self.x, self.y, self.transform = x, y, transform

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            a = self.x[i]
            img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
            return self.transform(img), int(self.y[i])

    torch.manual_seed(0)
    train = DataLoader(ArrayImages(d["x_train"], d["y_train"], train_tf), batch_size=t["batch"], shuffle=True,
                       num_workers=2)
    test = DataLoader(ArrayImages(d["x_test"], d["y_test"], test_tf), batch_size=1000, num_workers=2)
    from cnnlab.models import create_model

    model = create_model(t["model"], int(d["classes"]), t["channels"], t["size"])
    return model, train, test, len(d["y_train"])


def _torch_optim(task: str, model, steps: int):
    import torch

    t = TASKS[task]
    cls = torch.optim.AdamW if t["optim"] == "adamw" else torch.optim.Adam
    opt = cls(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"], eps=1e-7)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t["lr"], total_steps=steps) \
        if t["schedule"] == "one-cycle" else None
    return opt, sched


def run_plain(task: str, epochs: int, data: Path, device: str = "cpu") -> dict:
    """The tutorial loop; on a GPU (gpu_bench.py) each batch is copied to the card as the tutorials do."""
    import torch
    import torch.nn.functional as F

    model, train, test, n = _torch_pipeline(task, data, TASKS[task]["augment"])
    model = model.to(device)
    opt, sched = _torch_optim(task, model, epochs * len(train))
    epoch_s, acc = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for x, y in train:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        synchronize(device)
        epoch_s.append(time.perf_counter() - t0)
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in test:
                correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
                total += len(y)
        acc.append(correct / total)
    return {"epoch_s": epoch_s, "test_acc": acc, "n_train": n,
            "settings": f"threads {torch.get_num_threads()}, DataLoader num_workers 2"
                        + ("" if device == "cpu" else f", {device}, fp32, NCHW, a copy to the card per batch")}


def run_lightning(task: str, epochs: int, data: Path) -> dict:
    import lightning as L
    import torch
    import torch.nn.functional as F

    model, train, test, n = _torch_pipeline(task, data, TASKS[task]["augment"])
    timing = {"epoch_s": [], "test_acc": []}

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def on_validation_epoch_start(self):
            self._correct = self._total = 0

        def validation_step(self, batch, _):
            x, y = batch
            self._correct += (self.net(x).argmax(1) == y).sum().item()
            self._total += len(y)

        def on_validation_epoch_end(self):
            if not self.trainer.sanity_checking:
                timing["test_acc"].append(self._correct / self._total)

        def configure_optimizers(self):
            opt, sched = _torch_optim(task, self.net, epochs * len(train))
            if sched is None:
                return opt
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Timer(L.Callback):  # Lightning validates inside the training epoch: time up to validation
        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_validation_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                timing["epoch_s"].append(time.perf_counter() - self.t0)

    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Timer()])
    trainer.fit(Module(), train, test)
    return {**timing, "n_train": n, "settings": f"threads {torch.get_num_threads()}, DataLoader num_workers 2, "
                                                f"Lightning {L.__version__}"}


def run_keras(task: str, epochs: int, data: Path) -> dict:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import math

    import keras
    import numpy as np
    import tensorflow as tf
    from keras import layers

    t = TASKS[task]
    d = np.load(data)
    keras.utils.set_random_seed(0)

    def nhwc(x):  # the Keras way: float arrays in memory, normalised once
        return ((x.transpose(0, 2, 3, 1).astype("float32") / 255) - d["mean"]) / d["std"]

    x_train, x_test = nhwc(d["x_train"]).astype("float32"), nhwc(d["x_test"]).astype("float32")
    y_train, y_test = d["y_train"], d["y_test"]
    k = int(d["classes"])
    aug = [layers.RandomFlip("horizontal"), layers.RandomRotation(AUG["rotation"] / 360, fill_mode="nearest"),
           layers.RandomZoom(AUG["scale"], fill_mode="nearest"),
           layers.RandomTranslation(AUG["translate"], AUG["translate"], fill_mode="nearest")] if t["augment"] else []
    if t["model"] == "harahap-cnn":
        body = [layers.Conv2D(32, 5, padding="same", activation="relu"), layers.BatchNormalization(),
                layers.MaxPooling2D(2), layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dropout(0.2)]
    else:
        body = [layers.Conv2D(10, 3, activation="relu"), layers.MaxPooling2D(2), layers.Conv2D(20, 5, activation="relu"),
                layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dropout(0.1)]
    model = keras.Sequential([keras.Input(x_train.shape[1:]), *aug, *body, layers.Dense(k)])
    steps = epochs * math.ceil(len(y_train) / t["batch"])

    @keras.saving.register_keras_serializable()
    class OneCycle(keras.optimizers.schedules.LearningRateSchedule):  # torch's OneCycleLR, as cnnlab's
        def __call__(self, step):
            s = tf.cast(step, "float32") / steps
            lo, end, peak, pct = t["lr"] / 25, t["lr"] / 25e4, t["lr"], 0.3
            up = lo + (peak - lo) * 0.5 * (1 - tf.cos(math.pi * s / pct))
            down = end + (peak - end) * 0.5 * (1 + tf.cos(math.pi * (s - pct) / (1 - pct)))
            return tf.where(s < pct, up, down)

    lr = OneCycle() if t["schedule"] == "one-cycle" else t["lr"]
    opt = keras.optimizers.AdamW(lr, weight_decay=t["weight_decay"], epsilon=1e-7) if t["optim"] == "adamw" \
        else keras.optimizers.Adam(lr, epsilon=1e-7)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    timing = {"epoch_s": [], "test_acc": []}

    class Timer(keras.callbacks.Callback):  # validation runs inside the epoch: time up to it
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_test_begin(self, logs=None):
            timing["epoch_s"].append(time.perf_counter() - self.t0)

        def on_epoch_end(self, epoch, logs=None):
            timing["test_acc"].append(float(logs["val_accuracy"]))

    model.fit(x_train, y_train, batch_size=t["batch"], epochs=epochs, validation_data=(x_test, y_test),
              validation_batch_size=1000, verbose=0, callbacks=[Timer()])
    threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    return {**timing, "n_train": len(y_train),
            "settings": f"TensorFlow {tf.__version__}, Keras {keras.__version__}, intra-op threads {threads} "
                        f"(0 = all cores)"}


RUNNERS = {"cnnlab": run_cnnlab, "keras": run_keras, "plain": run_plain, "lightning": run_lightning}


def worker(tool: str, task: str, epochs: int, data: Path) -> dict:
    t0 = time.perf_counter()
    r = RUNNERS[tool](task, epochs, data)
    r["wall_s"] = time.perf_counter() - t0
    r["rss_mb"] = peak_rss_mb()
    return r


# --------------------------------------------------------------------------- the machine's limit

def roofline() -> dict:
    """Matrix-multiply FLOP/s (fp32 and bf16) and the harahap net's training FLOPs per image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cnnlab.models import create_model

    out = {}
    for name, n in MATMUL_N.items():
        out[f"matmul_{name}_gflops"], out[f"matmul_{name}_n"] = matmul_gflops(name), n
    for task in TASKS:
        t = TASKS[task]
        model = create_model(t["model"], 10 if task == "harahap" else 5, t["channels"], t["size"])
        x = torch.randn(t["batch"], t["channels"], t["size"], t["size"])
        with FlopCounterMode(display=False) as fc:
            model(x).sum().backward()
        out[f"{task}_train_flops_per_image"] = fc.get_total_flops() / t["batch"]
    out["threads"] = torch.get_num_threads()
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return out


# --------------------------------------------------------------------------- the driver

def time_to(target: float, r: dict) -> float | None:
    """Training seconds until the test accuracy first reaches `target` (None: never)."""
    total = 0.0
    for s, a in zip(r["epoch_s"], r["test_acc"]):
        total += s
        if a >= target:
            return total
    return None


def throughput(r: dict) -> float:
    """Images per second of the median epoch after the first (the first pays for warm-up)."""
    return r["n_train"] / steady_median(r["epoch_s"])


def _fmt_s(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.1f} s"


def share(flops: float, images_per_s: float, gflops: float) -> float:
    """The share of a `gflops` matrix-multiply rate that training at `images_per_s` reaches (`flops` per image)."""
    return flops * images_per_s / (gflops * 1e9)


def _paired_share(runs: list[dict], flops: float) -> str:
    """The share of the matrix-multiply rate per cnnlab run with reference samples: each epoch's images/s against
    the product sampled after it (and the test evaluation), then the median over the epochs after the first, with
    that rate; runs from before the samples were recorded have none (then no text)."""
    with_ref = [r for r in runs if r.get("ref")]
    if not with_ref:
        return ""
    shares = [steady_median([share(flops, r["n_train"] / s, g) for s, g in zip(r["epoch_s"], r["ref"]["gflops"])])
              for r in with_ref]
    rates = [steady_median(r["ref"]["gflops"]) for r in with_ref]
    ref = with_ref[0]["ref"]
    return (f"Paired, run by run (each epoch against a {ref['n']}² {ref['precision']} product timed in the same process "
            f"after it, then the median over the epochs after the first): **{spread(shares, '.0%')}** of "
            f"the rate, which itself read {spread(rates, ',.0f')} GFLOP/s over the {len(with_ref)} runs"
            f" — {sum(x >= MATRIX_TARGET for x in shares)} of {len(shares)} runs at {MATRIX_TARGET:.0%} or more. ")


def _ref_memory_note(res: dict) -> str:
    """What the matrix-product samples add to cnnlab's peak RSS (its worker times them between epochs)."""
    refs = {(r["ref"]["precision"], r["ref"]["n"]) for runs in res["runs"].values() for r in runs.get("cnnlab", [])
            if r.get("ref")}
    if not refs:
        return ""
    mib = {f"{n}² {p}": 3 * n * n * (4 if p == "fp32" else 2) / 2 ** 20 for p, n in sorted(refs)}
    return (" cnnlab's peak RSS includes the matrix-product samples timed in its process (three "
            + " or ".join(f"{k} tensors, {v:.1f} MiB" for k, v in mib.items()) + ").")


def markdown(res: dict) -> str:
    m, reps = res["machine"], res["repeats"]
    lines = [START, f"## Training throughput against Keras, a plain PyTorch loop and Lightning (issues 4, 14) — {res['machine'].get('capability', capability())}", "",
             f"`{res['command']}` — measured {res['date']}.", "",
             f"Machine: {machine_line(m)}; no GPU. "
             f"Medians of {reps} runs per tool (each a fresh process, tools interleaved), the runs' range in "
             "brackets; ratios are taken within each run, then their median."
             + _ref_memory_note(res), ""]
    for task in res["tasks"]:
        t = TASKS[task]
        runs = res["runs"][task]
        tools = [x for x in TOOLS if x in runs]
        lines += [f"### {t['model']} on {t['source']}, {t['size']}×{t['size']}×{t['channels']}, batch {t['batch']}, "
                  f"{res['epochs'][task]} epochs", ""]
        head = "| tool | training images/s | × cnnlab is faster |"
        sep = "|---|---:|---:|"
        if task == "harahap":
            head += f" s to {TARGET:.0%} test accuracy | × cnnlab is faster | best test accuracy |"
            sep += "---:|---:|---:|"
        head += " peak RSS | settings |"
        sep += "---:|---|"
        lines += [head, sep]
        for tool in tools:
            rs = runs[tool]
            ratio = [throughput(c) / throughput(r) for c, r in zip(runs["cnnlab"], rs)] if "cnnlab" in runs else []
            row = (f"| {tool} | {spread([throughput(r) for r in rs], ',.0f')} | "
                   f"{'–' if tool == 'cnnlab' or not ratio else spread(ratio, '.2f', '×')} |")
            if task == "harahap":
                tt = [time_to(TARGET, r) for r in rs]
                reached = [x for x in tt if x is not None]
                med = statistics.median(reached) if len(reached) * 2 > len(tt) else None
                ct = [time_to(TARGET, r) for r in runs["cnnlab"]]
                tr = [b / a for a, b in zip(ct, tt) if a is not None and b is not None]
                # a tool that never reached the target took longer than all its epochs: a lower bound
                lower = [sum(r["epoch_s"]) / a for a, r in zip(ct, rs) if a is not None and time_to(TARGET, r) is None]
                ratio_s = "–" if tool == "cnnlab" else (f"{statistics.median(tr):.2f}×" if tr and med else
                                                        f"> {statistics.median(lower):.1f}×" if lower else "–")
                best = statistics.median(max(r["test_acc"]) for r in rs)
                row += (f" {_fmt_s(med)} ({len(reached)}/{len(tt)} runs reached) | {ratio_s} | {best:.1%} |")
            rss = statistics.median(r["rss_mb"] for r in rs)
            row += f" {rss:,.0f} MB" + (" + 2 worker processes" if tool in ("plain", "lightning") else "")
            row += f" | {rs[0]['settings']} |"
            lines.append(row)
        lines.append("")
    rf = res["roofline"]
    lines += ["### How far from the machine's limit", ""]
    fp32, bf16 = rf["matmul_fp32_gflops"], rf["matmul_bf16_gflops"]
    lines.append(f"A {rf['matmul_fp32_n']}² matrix multiply runs at {fp32:,.0f} GFLOP/s in fp32, a "
                 f"{rf['matmul_bf16_n']}² one at {bf16:,.1f} GFLOP/s in bf16 "
                 f"on this CPU (torch's CPU capability: {rf['cpu_capability']}, {rf['threads']} threads; "
                 + ("no AVX-512 BF16 / AMX, so bf16 is emulated and slower: cnnlab keeps fp32 by default here). "
                    if bf16 < fp32 else "bf16 is faster here). "))
    for task in res["tasks"]:
        if "cnnlab" not in res["runs"][task]:
            continue
        flops = rf[f"{task}_train_flops_per_image"]
        ips = statistics.median(throughput(r) for r in res["runs"][task]["cnnlab"])
        used = "bf16" if "bf16" in res["runs"][task]["cnnlab"][0]["settings"] else "fp32"
        rate = bf16 if used == "bf16" else fp32  # the precision cnnlab trained in
        lines.append(f"- {TASKS[task]['model']}: {flops / 1e6:.1f} MFLOP per training image (forward + backward, "
                     f"counted by torch's FlopCounterMode) × {ips:,.0f} images/s = {flops * ips / 1e9:.1f} GFLOP/s, "
                     f"{share(flops, ips, rate):.0%} of the {used} matrix-multiply rate above"
                     + (f" (the precision it trained in; {share(flops, ips, fp32):.0%} of fp32's)" if used != "fp32" else "")
                     + ". " + _paired_share(res["runs"][task]["cnnlab"], flops)
                     + "The ceiling for these small layers is memory "
                     "traffic and per-op overhead (batch norm, pooling, ReLU and their backward passes touch every "
                     "activation), not arithmetic.")
    lines += ["", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: " + ", ".join(TOOLS))
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    p.add_argument("--repeats", type=int, default=3, help="runs per tool and task (default 3)")
    p.add_argument("--epochs", type=int, help="override every task's epochs (a quick look)")
    p.add_argument("--cache", default=str(ROOT / ".bench-cache"), help="exported splits go here")
    p.add_argument("--json", default=str(ROOT / ".bench-cache" / "train_bench.json"), help="raw results")
    p.add_argument("--from-json", metavar="FILE", help="no runs: render the section from FILE, the raw results "
                                                       "an earlier run saved (--json)")
    p.add_argument("--write", help="put the Markdown section into this file (e.g. BENCHMARKS.md)")
    p.add_argument("--worker", nargs=3, metavar=("TOOL", "TASK", "EPOCHS"), help=argparse.SUPPRESS)
    p.add_argument("--roofline", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    cache = Path(a.cache)
    if a.worker:
        tool, task, epochs = a.worker
        print(json.dumps(worker(tool, task, int(epochs), cache / f"{task}.npz")))
        return
    if a.roofline:
        print(json.dumps(roofline()))
        return

    if a.from_json:
        publish(markdown(json.loads(Path(a.from_json).read_text(encoding="utf-8"))), a.write, START, END)
        return
    tools = [t for t in a.tools.split(",") if t]
    tasks = [t for t in a.tasks.split(",") if t]
    bad = [t for t in tools if t not in TOOLS] + [t for t in tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"unknown tool/task {bad}; tools: {', '.join(TOOLS)}; tasks: {', '.join(TASKS)}")
    res = {"command": "python benchmarks/train_bench.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "machine": machine(), "repeats": a.repeats, "tasks": tasks,
           "epochs": {t: a.epochs or TASKS[t]["epochs"] for t in tasks}, "runs": {t: {} for t in tasks}}
    for task in tasks:
        export_data(task, cache)
    for rep in range(a.repeats):
        for task in tasks:
            for tool in tools:
                t0 = time.perf_counter()
                r = spawn(__file__, ["--worker", tool, task, str(res["epochs"][task]), "--cache", str(cache)], ROOT)
                res["runs"][task].setdefault(tool, []).append(r)
                extra = f", {TARGET:.0%} after {_fmt_s(time_to(TARGET, r))}" if task == "harahap" else ""
                print(f"[{rep + 1}/{a.repeats}] {task:8s} {tool:9s} {throughput(r):8,.0f} img/s, best test "
                      f"{max(r['test_acc']):.3f}{extra}, peak RSS {r['rss_mb']:,.0f} MB "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    res["roofline"] = spawn(__file__, ["--roofline"], ROOT)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1), encoding="utf-8")
    section = markdown(res)
    publish(section, a.write, START, END)


if __name__ == "__main__":
    main()
