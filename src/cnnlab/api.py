"""The Python API: `train(config) -> Run`, `evaluate(run)`, `predict(run, paths)`.

    import cnnlab
    run = cnnlab.train("recipes/demo.yaml", ["train.epochs=3"])
    run.metrics["accuracy"], run.history[-1]["val_loss"], run.model
    cnnlab.load_run(run.path).predict(["photo.jpg"])
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__
from .config import Config, load_config
from .data import DataError, Dataset, load_source, prepare, stratified_split
from .metrics import classification_metrics
from .models import create_model, freeze_backbone, load_weights
from .runs import (MODEL_FILE, Run, load_run, new_run_dir, save_model, write_bad_files, write_config,
                   write_predictions,
                   write_history, write_json)
from .training import EarlyStopper, LRSchedule, Runtime, build_optimizer, fit, predict_logits
from .training.progress import ProgressLogger
from .training.runtime import seed_everything


def load_data(cfg: Config, progress: bool = True) -> Dataset:
    d = cfg.data
    return load_source(d.source, image_size=d.image_size, channels=d.channels, random_samples=d.random_samples,
                       random_classes=d.random_classes, seed=d.split_seed, resize=d.resize,
                       on_bad_file=d.on_bad_file, classes=d.classes, max_per_class=d.max_per_class,
                       progress=progress)


def split_fractions(cfg: Config) -> tuple[float, float]:
    """(val, test) fractions; Keras-style validation_split means no test part."""
    if cfg.data.validation_split is not None:
        return cfg.data.validation_split, 0.0
    return cfg.data.val_fraction, cfg.data.test_fraction


def _augment_kwargs(cfg: Config) -> dict:
    d = cfg.data
    return {"rotation": d.aug_rotation, "hflip": d.aug_hflip, "scale": d.aug_scale, "translate": d.aug_translate}


def build_model(cfg: Config, ds: Dataset, log=print) -> tuple[torch.nn.Module, dict]:
    """The configured model for this data (+ weights, + frozen backbone); returns (model, options)."""
    m = cfg.model
    options = {k: v for k, v in dict(batch_norm=m.batch_norm, dropout=m.dropout, hidden=m.hidden).items()
               if v is not None}
    c, size = ds.images.shape[1], ds.images.shape[-1]
    model = create_model(m.name, len(ds.classes), c, size, init=m.init, **options)
    if m.weights:
        report = load_weights(model, m.weights)
        log(f"weights: loaded {len(report['loaded'])} tensors from {m.weights}; "
            f"skipped {len(report['skipped'])}" + (f" ({', '.join(report['skipped'][:4])}…)"
                                                   if report["skipped"] else ""))
    if m.freeze == "backbone":
        n = freeze_backbone(model)
        log(f"backbone frozen: {n:,} trainable parameters left (the head)")
    return model, options


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(runtime: Runtime, seed: int) -> dict:
    import numpy
    import torchvision

    return {"cnnlab": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "seed": seed, **runtime.describe(), "git_revision": _git_revision(),
            "command": " ".join(sys.argv)}


def _eval_metrics(model, loader, runtime, classes, train_labels) -> tuple[dict, torch.Tensor]:
    logits, y = predict_logits(model, loader, runtime)
    m = classification_metrics(y.numpy(), logits.argmax(1).numpy(), classes,
                               loss=F.cross_entropy(logits, y).item(), train_labels=train_labels)
    return m, logits


def train(config: str | Path | dict | Config | None = None, overrides: list[str] | dict | None = None, *,
          out: str | Path | None = None, runs_root: str | Path = "runs", progress: str | None = None,
          quiet: bool = False, report: bool = True) -> Run:
    """Train one experiment end to end and write its run folder; returns the Run.

    config: a YAML path, a dict, a Config or None (defaults). overrides: ["optim.lr=0.01", …]
    or {"optim.lr": 0.01}. out: the run folder (new or empty); default runs_root/<name>[-N].
    progress: auto | bar | plain | none (default: the config's train.progress; 'none' if quiet).
    report: also write plots/ and report.html (a failure there is reported, never loses the run).
    """
    cfg = load_config(config, overrides)
    if cfg.name is None:
        cfg.name = "run"
    log = ProgressLogger("none" if quiet else (progress or cfg.train.progress))
    t_start, started = time.perf_counter(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    runtime = Runtime(cfg.train.device, cfg.train.precision, cfg.train.threads, cfg.train.channels_last)
    ds = load_data(cfg, progress=log.mode == "bar")
    val_f, test_f = split_fractions(cfg)
    split = stratified_split(ds.labels, val_f, test_f, cfg.data.split_seed, ds.predefined)
    if not split.train:
        raise DataError("the training split is empty; lower data.val_fraction / data.test_fraction")
    if not split.val and not split.test:
        raise DataError(f"no validation or test images: {len(ds)} images in {len(ds.classes)} classes with "
                        f"val_fraction={val_f:g}, test_fraction={test_f:g} leave none held out; raise a fraction "
                        "(or data.max_per_class)")
    seed_everything(cfg.train.seed)
    data = prepare(ds, split, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                   device=runtime.device, seed=cfg.train.seed, normalize=cfg.data.normalize,
                   augment=_augment_kwargs(cfg) if cfg.data.augment else None, expand=cfg.data.expand,
                   expand_seed=cfg.data.split_seed + 1, expand_augment=_augment_kwargs(cfg),
                   channels_last=cfg.train.channels_last)
    model, options = build_model(cfg, ds, log=log.message)
    model = model.to(runtime.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o, s = cfg.optim, cfg.schedule
    optimizer = build_optimizer(model.parameters(), o.name, o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay)
    schedule = LRSchedule(optimizer, s.name, o.lr, len(data.train), cfg.train.epochs,
                          warmup_epochs=s.warmup_epochs, step_size=s.step_size, gamma=s.gamma, min_lr=s.min_lr,
                          cycle_epochs=s.cycle_epochs, pct_start=s.pct_start, patience=s.patience)
    es = cfg.train.early_stopping
    stopper = EarlyStopper(es.monitor, es.patience, es.min_delta) if es else EarlyStopper(cfg.train.monitor)

    run_dir = new_run_dir(cfg.name, out, runs_root)
    write_config(run_dir, cfg)
    write_json(run_dir / "split.json", split.to_json(ds.paths, torch.cat([ds.labels, ds.labels[split.expanded_from]])
                                                     if split.expanded_from else ds.labels, ds.classes),
               compact=True)
    if ds.bad_files:
        write_bad_files(run_dir / "bad_files.csv", ds.bad_files)
        log.message(f"skipped {len(ds.bad_files)} bad file(s)/folder(s), listed in {run_dir / 'bad_files.csv'}: "
                    + "; ".join(f"{p} ({r})" for p, r in ds.bad_files[:3]) + (" …" if len(ds.bad_files) > 3 else ""))
    n_params = sum(p.numel() for p in model.parameters())
    log.message(f"{cfg.name}: {model.__class__.__name__ if cfg.model.name is None else cfg.model.name} "
                f"({n_params:,} parameters) on {ds.name} — {len(ds.classes)} classes, "
                f"train {data.train.num_samples} / val {len(split.val)} / test {len(split.test)} images "
                f"of {tuple(ds.images.shape[1:])}, {runtime.device} {runtime.precision}, "
                f"{runtime.threads} thread(s)")

    result = fit(model, data, optimizer, schedule, runtime, epochs=cfg.train.epochs, stopper=stopper,
                 l2=cfg.regularization.l2, clip_grad_norm=o.clip_grad_norm, progress=log)

    eval_loader = data.test if data.test is not None else data.val
    train_labels = ds.labels[split.train].numpy()
    metrics, logits = _eval_metrics(model, eval_loader, runtime, ds.classes, train_labels)
    eval_idx = split.test if data.eval_part == "test" else split.val
    write_predictions(run_dir / "predictions.csv", eval_idx, ds.labels[eval_idx], logits, ds.classes, ds.paths)
    metrics.update(evaluated_on=data.eval_part, best_epoch=result.best_epoch, epochs_run=len(result.history),
                   stopped_early=result.stopped_early, monitor=stopper.monitor, training_seconds=result.seconds,
                   parameters=n_params,
                   caution=("the best epoch was chosen on the same validation images these metrics come "
                            "from, so they are optimistic; keep a test split for an unbiased estimate")
                   if data.eval_part == "val" and stopper.monitor.startswith("val_") else None, trainable_parameters=sum(p.numel() for p in model.parameters()
                                                                 if p.requires_grad))
    meta = {"model": cfg.model.name, "options": {**options, "init": cfg.model.init},
            "num_classes": len(ds.classes), "in_channels": ds.images.shape[1], "image_size": ds.images.shape[-1],
            "classes": ds.classes, "mean": data.normalizer.mean, "std": data.normalizer.std,
            "resize": cfg.data.resize, "best_epoch": result.best_epoch, "source": ds.name}
    save_model(run_dir / MODEL_FILE, model, meta)
    write_history(run_dir / "history.csv", result.history)
    write_json(run_dir / "metrics.json", metrics)
    env = environment(runtime, cfg.train.seed)
    env.update(started_at=started, wall_seconds=round(time.perf_counter() - t_start, 3))
    write_json(run_dir / "env.json", env)
    _print_summary(log, metrics, run_dir)
    if report:
        _write_report(run_dir, log)
    run = Run(run_dir, cfg, result.history, metrics, env)
    run._model, run._meta = model.eval().cpu(), meta
    return run


def _write_report(run_dir: Path, log: ProgressLogger) -> None:
    try:
        from .report import write_report

        log.message(f"Report: {write_report(run_dir)}")
    except Exception as e:  # the run is saved; a figure problem must not lose it
        log.message(f"(report not written: {type(e).__name__}: {e}; retry with `cnnlab report {run_dir}`)")


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.0001" if p < 1e-4 else f"{p:.2g}"


def _print_summary(log: ProgressLogger, m: dict, run_dir: Path) -> None:
    lo, hi = m["accuracy_ci95"]
    part = "Test" if m["evaluated_on"] == "test" else "Validation (no test split)"
    log.message(f"{part}: loss {m['loss']:.4f} - accuracy {m['accuracy']:.4f} (95% CI {lo:.3f}–{hi:.3f}, "
                f"n={m['n']}) - macro F1 {m['f1_macro']:.4f} - chance {m['chance']['accuracy']:.3f} "
                f"(p above chance {_fmt_p(m['chance'].get('p_value_above_chance'))}) - "
                f"best epoch {m['best_epoch']}")
    log.message(f"Run folder: {run_dir}")


def evaluate(run: Run | str | Path, data: str | None = None, device: str = "cpu") -> dict:
    """Re-evaluate a saved model: on its own test split (default), or on every image of `data`
    (a source spec such as folder:PATH), whose class names must be among the model's."""
    run = run if isinstance(run, Run) else load_run(run)
    cfg, meta = run.config, run.meta
    runtime = Runtime(device)
    model = run.model.to(runtime.device)
    from .data.loader import DeviceLoader, Normalizer

    norm = Normalizer(meta["mean"], meta["std"])
    if data is None:
        ds = load_data(cfg, progress=False)
        split = run.split
        idx = split["test"] or split["val"]
        part = "test" if split["test"] else "val"
        train_labels = ds.labels[split["train"]].numpy()
    else:
        ds = load_source(data, image_size=meta["image_size"], channels=meta["in_channels"],
                         resize=meta.get("resize", "stretch"))
        missing = [c for c in ds.classes if c not in meta["classes"]]
        if missing:
            raise ValueError(f"{data}: classes {missing} are unknown to the model (it knows {meta['classes']})")
        ds.labels = torch.tensor([meta["classes"].index(ds.classes[i]) for i in ds.labels.tolist()])
        idx, part, train_labels = list(range(len(ds))), data, None
    t = torch.tensor(idx, dtype=torch.int64)
    loader = DeviceLoader(ds.images[t].to(runtime.device), ds.labels[t].to(runtime.device), norm,
                          cfg.data.eval_batch_size)
    metrics, _ = _eval_metrics(model, loader, runtime, meta["classes"], train_labels)
    metrics["evaluated_on"] = part
    return metrics


def predict(run: Run | str | Path, paths, top_k: int = 3, device: str = "cpu") -> list[dict]:
    """Top-k classes with probabilities for each image file (folders are searched)."""
    run = run if isinstance(run, Run) else load_run(run)
    return run.predict(paths, top_k=top_k, device=device)
