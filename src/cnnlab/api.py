"""The Python API: `train(config) -> Run`, `evaluate(run)`, `predict(run, paths)`.

    import cnnlab
    run = cnnlab.train("recipes/demo.yaml", ["train.epochs=3"])
    run.metrics["accuracy"], run.history[-1]["val_loss"], run.model
    cnnlab.load_run(run.path).predict(["photo.jpg"])
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import stats
from ._version import __version__
from .config import RESUME_IGNORED, Config, ConfigError, config_differences, load_config
from .data import DataError, Dataset, load_source, prepare, stratified_split
from .data.loader import balance_sampling, balanced_class_weights, class_counts
from .data.stream import default_memory_budget, fits_in_memory, parse_bytes, prepare_streaming
from .metrics import classification_metrics
from .models import create_model, freeze_backbone, load_weights, set_fusion
from .tensorfile import save_tensors
from .runs import (MODEL_FILE, Run, RunError, load_run, new_run_dir, read_json, run_lock, save_model,
                   write_bad_files, write_config,
                   write_predictions,
                   write_history, write_json)
from .training.checkpoint import CHECKPOINT
from .training import (EarlyStopper, LRSchedule, Runtime, TrainingDiverged, TrainingInterrupted, TrainState,
                       build_optimizer, fit, predict_logits, read_checkpoint, restore_checkpoint, save_checkpoint)
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


def _resume_config(run_dir: Path, config, overrides, force: list[str]) -> Config:
    """The saved config, with `config`/`overrides` applied only where `force` allows a change."""
    saved = load_config(run_dir / "config.yaml")
    cfg = load_config(config if config is not None else saved, overrides)
    changed = config_differences(saved, cfg, ignore=RESUME_IGNORED)
    refused = [line for key, line in changed if not ("all" in force or key in force)]
    if refused:
        raise ConfigError(f"cannot resume {run_dir} with a different config: " + "; ".join(refused)
                          + ". Allow a change with --force KEY (e.g. --force train.epochs), or start a new run")
    return cfg


def _build_all(cfg: Config, log: ProgressLogger) -> SimpleNamespace:
    """Data, split, loaders, model, optimiser, schedule and stopper for `cfg` (seeded)."""
    t = cfg.train
    b = SimpleNamespace(runtime=Runtime(t.device, t.precision, t.threads, t.channels_last, t.fused, t.reuse_memory))
    b.ds = load_data(cfg, progress=log.mode == "bar")
    val_f, test_f = split_fractions(cfg)
    b.split = stratified_split(b.ds.labels, val_f, test_f, cfg.data.split_seed, b.ds.predefined)
    if not b.split.train:
        raise DataError("the training split is empty; lower data.val_fraction / data.test_fraction")
    if not b.split.val and not b.split.test:
        raise DataError(f"no validation or test images: {len(b.ds)} images in {len(b.ds.classes)} classes with "
                        f"val_fraction={val_f:g}, test_fraction={test_f:g} leave none held out; raise a fraction "
                        "(or data.max_per_class)")
    seed_everything(cfg.train.seed)
    d = cfg.data
    budget = parse_bytes(d.memory_budget) if d.memory_budget is not None else \
        default_memory_budget(b.runtime.device)
    c, h, w = b.ds.images.shape[1:]
    resident = len(b.split.train) * (1 + d.expand) + len(b.split.val) + len(b.split.test)
    b.streamed = not fits_in_memory(resident, c, h, w, budget)
    if b.streamed:
        log.message(f"{resident:,} images of {c}×{h}×{w} exceed data.memory_budget ({budget / 2**20:,.0f} MiB): "
                    "streaming batches from the memory-mapped cache")
    b.data = (prepare_streaming if b.streamed else prepare)(b.ds, b.split, batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
                     device=b.runtime.device, seed=cfg.train.seed, normalize=d.normalize,
                     augment=_augment_kwargs(cfg) if d.augment else None, expand=d.expand,
                     expand_seed=d.split_seed + 1, expand_augment=_augment_kwargs(cfg),
                     channels_last=b.runtime.channels_last)
    _balance(cfg, b, log)
    model, b.options = build_model(cfg, b.ds, log=log.message)
    b.model = model.to(b.runtime.device)
    if b.runtime.channels_last:
        b.model = b.model.to(memory_format=torch.channels_last)
    set_fusion(b.model, b.runtime.fused and not cfg.train.compile)  # compile fuses by itself
    if cfg.train.compile:
        b.model.compile()  # in place: state_dict keys (checkpoints, saved models) stay the eager module's
    o, s = cfg.optim, cfg.schedule
    b.optimizer = build_optimizer(b.model.parameters(), o.name, o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                  beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
                                  fused=b.runtime.fused)
    b.schedule = LRSchedule(b.optimizer, s.name, o.lr, len(b.data.train), cfg.train.epochs,
                            warmup_epochs=s.warmup_epochs, step_size=s.step_size, gamma=s.gamma, min_lr=s.min_lr,
                            cycle_epochs=s.cycle_epochs, pct_start=s.pct_start, patience=s.patience)
    es = cfg.train.early_stopping
    b.stopper = EarlyStopper(es.monitor, es.patience, es.min_delta) if es else EarlyStopper(cfg.train.monitor)
    return b


def _balance(cfg: Config, b, log: ProgressLogger) -> None:
    """data.class_weights / data.sampler = balanced, and a hint when the classes are imbalanced without them."""
    d, k, train = cfg.data, len(b.ds.classes), b.data.train
    b.class_weights = None
    if d.class_weights == "balanced":
        b.class_weights = balanced_class_weights(train.labels, k).to(b.runtime.device)
    if d.sampler == "balanced":
        balance_sampling(train, k)
    b.val_class_weights = None  # val_loss weights each class equally when training balances them
    if b.data.val is not None and (d.class_weights == "balanced" or d.sampler == "balanced"):
        b.val_class_weights = balanced_class_weights(b.data.val.labels, k)
    if d.class_weights == "balanced" and d.sampler == "balanced":
        log.message("note: data.class_weights=balanced and data.sampler=balanced together correct the imbalance "
                    "twice (rare classes end up over-weighted); one of them is usually enough")
        return
    ratio, big, small = stats.imbalance(class_counts(train.labels, k).tolist()) or (1.0, 0, 0)
    if ratio >= stats.IMBALANCED and d.class_weights == "none" and d.sampler == "shuffle":
        log.message(f"classes are imbalanced: {b.ds.classes[big]} has {ratio:.1f}× the training images of "
                    f"{b.ds.classes[small]}; consider data.class_weights=balanced or data.sampler=balanced")


def _split_json(b) -> dict:
    ds, split = b.ds, b.split
    labels = torch.cat([ds.labels, ds.labels[split.expanded_from]]) if split.expanded_from else ds.labels
    return split.to_json(ds.paths, labels, ds.classes)


def _start_run_folder(cfg: Config, b, out, runs_root, log: ProgressLogger, held: contextlib.ExitStack) -> Path:
    """A new run folder, locked by this process, with config.yaml, split.json (and bad_files.csv).
    If those cannot be written (disk full…) nothing is left behind: the folder is new, or was empty."""
    existed = out is not None and Path(out).is_dir()
    run_dir = new_run_dir(cfg.name, out, runs_root)
    held.enter_context(run_lock(run_dir))
    try:
        write_config(run_dir, cfg)
        write_json(run_dir / "split.json", _split_json(b), compact=True)
        if b.ds.bad_files:
            write_bad_files(run_dir / "bad_files.csv", b.ds.bad_files)
    except OSError:
        for f in run_dir.iterdir():
            f.unlink(missing_ok=True)
        if not existed:
            run_dir.rmdir()
        raise
    if b.ds.bad_files:
        log.message(f"skipped {len(b.ds.bad_files)} bad file(s)/folder(s), listed in {run_dir / 'bad_files.csv'}: "
                    + "; ".join(f"{p} ({r})" for p, r in b.ds.bad_files[:3])
                    + (" …" if len(b.ds.bad_files) > 3 else ""))
    return run_dir


def _resume_state(run_dir: Path, cfg: Config, b, log: ProgressLogger) -> TrainState:
    saved_split = read_json(run_dir / "split.json")
    if any(saved_split.get(k) != getattr(b.split, k) for k in ("train", "val", "test")):
        raise DataError(f"the data changed since {run_dir} started: its split no longer matches split.json; "
                        "start a new run")
    for stale in run_dir.glob(f".{CHECKPOINT}.*.tmp"):  # a write cut short by a crash: never trusted, removed
        stale.unlink(missing_ok=True)
    if not (run_dir / CHECKPOINT).is_file():  # killed before its first checkpoint: start over, same folder
        log.message(f"{run_dir} has no checkpoint yet; training it from the beginning")
        return TrainState()
    tensors, meta = read_checkpoint(run_dir)
    state = restore_checkpoint(tensors, meta, b.model, b.optimizer, b.schedule, b.stopper, b.data.train,
                               b.runtime.grad_scaler())
    if state.finished and state.epoch < cfg.train.epochs:  # --force train.epochs: go on
        state.finished, state.stopped_early, b.stopper.bad_epochs = False, False, 0
    if state.finished and (run_dir / "metrics.json").is_file():
        raise RunError(f"{run_dir} has already finished ({state.epoch} epochs); nothing to resume "
                       "(raise train.epochs with --force train.epochs to train on)")
    where = f"epoch {state.epoch + 1}, step {state.step_in_epoch}" if state.step_in_epoch else \
        f"the end of epoch {state.epoch}"
    log.message(f"Resuming {run_dir} from {where}")
    return state


class _StopRequest:
    """SIGINT / SIGTERM: the first asks for a clean stop at the next step boundary (with a
    checkpoint); a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested, self._old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: stopping at the next step with a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def train(config: str | Path | dict | Config | None = None, overrides: list[str] | dict | None = None, *,
          out: str | Path | None = None, runs_root: str | Path = "runs", progress: str | None = None,
          quiet: bool = False, report: bool = True, resume: str | Path | None = None,
          force: list[str] | tuple = ()) -> Run:
    """Train one experiment end to end and write its run folder; returns the Run.

    config: a YAML path, a dict, a Config or None (defaults). overrides: ["optim.lr=0.01", …]
    or {"optim.lr": 0.01}. out: the run folder (new or empty); default runs_root/<name>[-N].
    progress: auto | bar | plain | none (default: the config's train.progress; 'none' if quiet).
    report: also write plots/ and report.html (a failure there is reported, never loses the run).
    resume: a run folder to continue from its checkpoint (its config, unless `force` names the
    keys allowed to change, e.g. ["train.epochs"]).
    """
    cfg = _resume_config(Path(resume), config, overrides, list(force)) if resume else load_config(config, overrides)
    if cfg.name is None:
        cfg.name = "run"
    log = ProgressLogger("none" if quiet else (progress or cfg.train.progress))
    t_start, started = time.perf_counter(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with contextlib.ExitStack() as held:  # the run folder stays locked (runs.run_lock) until the run ends
        if resume:
            run_dir = Path(resume)
            held.enter_context(run_lock(run_dir))  # before any work: a second resume of it stops here
        b = _build_all(cfg, log)
        if resume:
            state = _resume_state(run_dir, cfg, b, log)
            write_config(run_dir, cfg)
        else:
            run_dir, state = _start_run_folder(cfg, b, out, runs_root, log, held), TrainState()
        try:
            result = _fit(cfg, b, run_dir, state, log)
            metrics, meta = _finish(cfg, b, result, run_dir)
        except OSError as e:  # disk full mid-run: the last checkpoint is intact; say how to go on
            if e.filename is None or isinstance(e, BrokenPipeError):
                raise
            raise OSError(e.errno, f"{e.strerror or e}; the run stopped. Free some space, then resume it with: "
                          f"cnnlab train --resume {run_dir}", e.filename) from e
        env = environment(b.runtime, cfg.train.seed)
        env.update(started_at=started, wall_seconds=round(time.perf_counter() - t_start, 3), resumed=bool(resume),
                   loader="streamed from the memory-mapped cache" if b.streamed else "in memory")
        write_json(run_dir / "env.json", env)
    _print_summary(log, metrics, run_dir)
    if report:
        _write_report(run_dir, log)
    run = Run(run_dir, cfg, result.history, metrics, env)
    run._model, run._meta = b.model.eval().cpu(), meta
    return run


def _fit(cfg: Config, b, run_dir: Path, state: TrainState, log: ProgressLogger):
    """The training loop with checkpoints (every epoch, every N steps, on a stop signal) and a clean stop."""
    def checkpoint(st: TrainState) -> None:
        save_checkpoint(run_dir, st, b.model, b.optimizer, b.schedule, b.stopper, b.data.train, cfg.to_dict(),
                        b.runtime.grad_scaler())

    with _StopRequest() as stop:
        n_params = sum(p.numel() for p in b.model.parameters())
        log.message(f"{cfg.name}: {cfg.model.name} ({n_params:,} parameters) on {b.ds.name} — "
                    f"{len(b.ds.classes)} classes, train {b.data.train.num_samples} / val {len(b.split.val)} / "
                    f"test {len(b.split.test)} images of {tuple(b.ds.images.shape[1:])}, {b.runtime.device} "
                    f"{b.runtime.precision}, {b.runtime.threads} thread(s)")

        def on_step(st: TrainState) -> None:
            every = cfg.train.checkpoint_every_steps
            if stop.requested or (every and (st.epoch * len(b.data.train) + st.step_in_epoch) % every == 0):
                checkpoint(st)
            if stop.requested:
                raise TrainingInterrupted(_interrupted_message(stop.requested, st, run_dir))

        def on_epoch(st: TrainState) -> None:
            checkpoint(st)
            if stop.requested and not st.finished:
                raise TrainingInterrupted(_interrupted_message(stop.requested, st, run_dir))

        try:
            return fit(b.model, b.data, b.optimizer, b.schedule, b.runtime, epochs=cfg.train.epochs,
                       stopper=b.stopper, l2=cfg.regularization.l2, clip_grad_norm=cfg.optim.clip_grad_norm,
                       progress=log, state=state, on_step=on_step, on_epoch=on_epoch,
                       class_weights=b.class_weights, val_class_weights=b.val_class_weights)
        except TrainingDiverged as e:
            _record_divergence(run_dir, state, e)
            raise


def _interrupted_message(signame: str, st: TrainState, run_dir: Path) -> str:
    return (f"stopped by {signame} at epoch {st.epoch + (1 if st.step_in_epoch else 0)}, step {st.step_in_epoch}; "
            f"checkpoint saved. Resume with: cnnlab train --resume {run_dir}")


def _record_divergence(run_dir: Path, state: TrainState, e: TrainingDiverged) -> None:
    """Keep what is good: the history so far and the best model; the last checkpoint is untouched."""
    write_history(run_dir / "history.csv", state.history)
    write_json(run_dir / "failure.json", {"error": "diverged", "message": str(e), "step": e.step,
                                          "epoch": state.epoch + 1, "best_epoch": state.best_epoch})
    if state.best_state is not None:
        save_tensors(run_dir / "best-before-divergence.safetensors", state.best_state, "cnnlab_best_before_divergence",
                     {"best_epoch": state.best_epoch})


def _finish(cfg: Config, b, result, run_dir: Path) -> tuple[dict, dict]:
    """Test metrics, predictions, the best model, history and metrics.json."""
    data, split, ds = b.data, b.split, b.ds
    eval_loader = data.test if data.test is not None else data.val
    metrics, logits = _eval_metrics(b.model, eval_loader, b.runtime, ds.classes, ds.labels[split.train].numpy())
    eval_idx = split.test if data.eval_part == "test" else split.val
    write_predictions(run_dir / "predictions.csv", eval_idx, ds.labels[eval_idx], logits, ds.classes, ds.paths)
    biased = data.eval_part == "val" and b.stopper.monitor.startswith("val_")
    metrics.update(evaluated_on=data.eval_part, best_epoch=result.best_epoch, epochs_run=len(result.history),
                   stopped_early=result.stopped_early, monitor=b.stopper.monitor, training_seconds=result.seconds,
                   parameters=sum(p.numel() for p in b.model.parameters()),
                   trainable_parameters=sum(p.numel() for p in b.model.parameters() if p.requires_grad),
                   caution=("the best epoch was chosen on the same validation images these metrics come "
                            "from, so they are optimistic; keep a test split for an unbiased estimate")
                   if biased else None)
    k = len(ds.classes)
    metrics["class_counts"] = {"train": class_counts(data.train.labels, k).tolist(),  # incl. offline copies
                               "val": class_counts(ds.labels[split.val], k).tolist(),
                               "test": class_counts(ds.labels[split.test], k).tolist()}
    metrics["balancing"] = {"class_weights": b.class_weights.tolist() if b.class_weights is not None else None,
                            "sampler": cfg.data.sampler}
    meta = {"model": cfg.model.name, "options": {**b.options, "init": cfg.model.init},
            "num_classes": len(ds.classes), "in_channels": ds.images.shape[1], "image_size": ds.images.shape[-1],
            "classes": ds.classes, "mean": data.normalizer.mean, "std": data.normalizer.std,
            "resize": cfg.data.resize, "best_epoch": result.best_epoch, "source": ds.name}
    save_model(run_dir / MODEL_FILE, b.model, meta)
    write_history(run_dir / "history.csv", result.history)
    write_json(run_dir / "metrics.json", metrics)
    return metrics, meta


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
