"""The Python API: `train(config) -> Run`, `evaluate(run)`, `predict(run, paths)`.

    import cnnlab
    run = cnnlab.train("recipes/demo.yaml", ["train.epochs=3"])
    run.metrics["accuracy"], run.history[-1]["val_loss"], run.model
    cnnlab.load_run(run.path).predict(["photo.jpg"])
"""

from __future__ import annotations

import contextlib
import datetime as dt
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import RESUME_IGNORED, Config, ConfigError, config_differences, load_config
from .data import DataError, load_source
from .data.loader import DeviceLoader, Normalizer, class_counts
from .data.split import check_saved_split
from .experiment import Experiment, build_experiment, environment
from .metrics import classification_metrics
from .runs import (MODEL_FILE, Run, RunError, load_run, new_run_dir, read_json, run_lock, save_model,
                   write_bad_files, write_config, write_history, write_json, write_predictions)
from .stats import chance_of, format_p
from .tensorfile import save_tensors
from .tracking import track_run
from .training import (Runtime, TrainingDiverged, TrainingInterrupted, TrainState, fit, predict_logits,
                       read_checkpoint, restore_checkpoint, save_checkpoint)
from .training.checkpoint import CHECKPOINT
from .training.progress import ProgressLogger


def _eval_metrics(model, loader, runtime, classes, train_labels, tta: bool = False) -> tuple[dict, torch.Tensor]:
    logits, y = predict_logits(model, loader, runtime, tta)
    m = classification_metrics(y.numpy(), logits.argmax(1).numpy(), classes,
                               loss=F.cross_entropy(logits, y).item(), train_labels=train_labels)
    return m, logits


def _resume_config(run_dir: Path, config, overrides, force: list[str]) -> Config:
    """The saved config, with `config`/`overrides` applied only where `force` allows a change."""
    if not (run_dir / "config.yaml").is_file():  # as eval and export say it
        raise RunError(f"{run_dir} is not a run folder (no config.yaml); nothing to resume")
    saved = load_config(run_dir / "config.yaml")
    cfg = load_config(config if config is not None else saved, overrides)
    changed = config_differences(saved, cfg, ignore=RESUME_IGNORED)
    refused = [line for key, line in changed if not ("all" in force or key in force)]
    if refused:
        raise ConfigError(f"cannot resume {run_dir} with a different config: " + "; ".join(refused)
                          + ". Allow a change with --force KEY (e.g. --force train.epochs), or start a new run")
    return cfg


def _start_run_folder(cfg: Config, x: Experiment, out, runs_root, log: ProgressLogger,
                      held: contextlib.ExitStack) -> Path:
    """A new run folder, locked by this process, with config.yaml, split.json (and bad_files.csv).
    If those cannot be written (disk full…) nothing is left behind: the folder is new, or was empty."""
    existed = out is not None and Path(out).is_dir()
    run_dir = new_run_dir(cfg.name, out, runs_root)
    held.enter_context(run_lock(run_dir))
    try:
        write_config(run_dir, cfg)
        write_json(run_dir / "split.json", x.split_json(), compact=True)
        if x.ds.bad_files:
            write_bad_files(run_dir / "bad_files.csv", x.ds.bad_files)
    except OSError:
        for f in run_dir.iterdir():
            f.unlink(missing_ok=True)
        if not existed:
            run_dir.rmdir()
        raise
    if x.ds.bad_files:
        log.message(f"skipped {len(x.ds.bad_files)} bad file(s)/folder(s), listed in {run_dir / 'bad_files.csv'}: "
                    + "; ".join(f"{p} ({r})" for p, r in x.ds.bad_files[:3])
                    + (" …" if len(x.ds.bad_files) > 3 else ""))
    return run_dir


def _resume_state(run_dir: Path, cfg: Config, x: Experiment, log: ProgressLogger, dist=None) -> TrainState:
    saved_split = read_json(run_dir / "split.json")
    if any(saved_split.get(k) != getattr(x.split, k) for k in ("train", "val", "test")):
        raise DataError(f"the data changed since {run_dir} started: its split no longer matches split.json; "
                        "start a new run")
    check_saved_split(saved_split, x.ds.paths, len(x.ds), str(run_dir))
    for stale in run_dir.glob(f".{CHECKPOINT}.*.tmp"):  # a write cut short by a crash: never trusted, removed
        stale.unlink(missing_ok=True)
    if not (run_dir / CHECKPOINT).is_file():  # killed before its first checkpoint: start over, same folder
        log.message(f"{run_dir} has no checkpoint yet; training it from the beginning")
        return TrainState()
    tensors, meta = read_checkpoint(run_dir)
    state = restore_checkpoint(tensors, meta, x.trained, x.optimizer, x.schedule, x.stopper, x.data.train,
                               x.runtime.precision)
    if dist is not None:
        dist.restore_rank_state(tensors, x.trained, state.acc)
    if state.finished and state.epoch < cfg.train.epochs:  # --force train.epochs: go on
        state.finished, state.stopped_early, x.stopper.bad_epochs = False, False, 0
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
    dist = _start_distributed(cfg)  # one process of several (torchrun, --nproc): None otherwise
    main = dist is None or dist.is_main
    if dist is not None and not resume and out is not None and _restarted_with_checkpoint(Path(out)):
        resume = out  # torchrun --max-restarts started the processes again: go on from the checkpoint
    log = ProgressLogger("none" if quiet or not main else (progress or cfg.train.progress))
    t_start, started = time.perf_counter(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    try:
        with contextlib.ExitStack() as held:  # the run folder stays locked (runs.run_lock) until the run ends
            if resume:
                run_dir = Path(resume)
                if main:
                    held.enter_context(run_lock(run_dir))  # before any work: a second resume of it stops here
            x = build_experiment(cfg, log, dist)
            if resume:
                state = _resume_state(run_dir, cfg, x, log, dist)
                if main:
                    write_config(run_dir, cfg)
            else:
                run_dir, state = _shared_run_folder(cfg, x, out, runs_root, log, held, dist), TrainState()
            try:
                result = _fit(cfg, x, run_dir, state, log, dist)
                metrics, meta = _finish(cfg, x, result, run_dir) if main else (None, None)
            except OSError as e:  # disk full mid-run: the last checkpoint is intact; say how to go on
                if e.filename is None or isinstance(e, BrokenPipeError):
                    raise
                raise OSError(e.errno, f"{e.strerror or e}; the run stopped. Free some space, then resume it with: "
                              f"cnnlab train --resume {run_dir}", e.filename) from e
            env = environment(x.runtime, cfg.train.seed)
            env.update(started_at=started, wall_seconds=round(time.perf_counter() - t_start, 3), resumed=bool(resume),
                       loader="streamed from the memory-mapped cache" if x.streamed else "in memory",
                       world_size=dist.world if dist else 1, distributed_backend=dist.backend if dist else None)
            if main:
                write_json(run_dir / "env.json", env)
            if dist is not None:
                dist.barrier()  # the run folder is complete before any process reports success
    finally:
        if dist is not None:
            dist.close()
    if main:
        _print_summary(log, metrics, run_dir)
        if report:
            _write_report(run_dir, log)
        track_run(run_dir, cfg.track, log)  # optional MLflow / TensorBoard outputs: never fails the run
    run = Run(run_dir, cfg, result.history, metrics, env)
    run._model, run._meta = x.model.eval().cpu(), meta
    return run


def _start_distributed(cfg: Config):
    """The process group when this process is one of several (WORLD_SIZE > 1), else None."""
    from .training.distributed import Dist, launched

    if not launched():
        return None
    dist = Dist.start(cfg.train.device, cfg.train.dist_timeout)
    dist.seed = cfg.train.seed
    cfg.train.device = dist.device(cfg.train.device)
    if cfg.train.threads is None and dist.backend == "gloo":  # the cores shared by this machine's processes
        from .hardware import cores_each

        local = int(__import__("os").environ.get("LOCAL_WORLD_SIZE", dist.world))
        cfg.train.threads = cores_each(local)
    return dist


def _restarted_with_checkpoint(out: Path) -> bool:
    import os

    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and (out / CHECKPOINT).is_file()


def _shared_run_folder(cfg: Config, x: Experiment, out, runs_root, log: ProgressLogger,
                       held: contextlib.ExitStack, dist) -> Path:
    """The new run folder, made by rank 0 and told to the others (with its error, if it could not be made)."""
    if dist is None:
        return _start_run_folder(cfg, x, out, runs_root, log, held)
    made, error = None, None
    if dist.is_main:
        try:
            made = str(_start_run_folder(cfg, x, out, runs_root, log, held))
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            dist.broadcast({"dir": None, "error": error})
            raise
    told = dist.broadcast({"dir": made, "error": error})
    if told["error"]:
        raise RunError(f"rank 0 could not make the run folder: {told['error']}")
    return Path(told["dir"])


def _fit(cfg: Config, x: Experiment, run_dir: Path, state: TrainState, log: ProgressLogger, dist=None):
    """The training loop with checkpoints (every epoch, every N steps, on a stop signal) and a clean stop.
    With several processes (dist), rank 0 writes the checkpoints while the others wait, and every stop —
    a signal, the tune's pruner — is agreed on by all of them at the same step."""
    def checkpoint(st: TrainState) -> None:
        extra = dist.rank_state(x.trained, st.acc) if dist is not None else None  # every rank's own part
        if dist is None or dist.is_main:
            save_checkpoint(run_dir, st, x.trained, x.optimizer, x.schedule, x.stopper, x.data.train, cfg.to_dict(),
                            x.runtime.precision, extra=extra)
        if dist is not None:
            dist.barrier()

    def stopping() -> str | None:
        if dist is None:
            return stop.requested
        return (stop.requested or "SIGTERM") if dist.any(stop.requested is not None, x.runtime.device) else None

    from .tune.trial import reporter_from_env  # a tune's trial reports each epoch to the tune's storage

    reporter = reporter_from_env() if dist is None or dist.is_main else None
    trainer = dist.wrap(x.trained) if dist is not None else None
    with _StopRequest() as stop:
        n_params = sum(p.numel() for p in x.model.parameters())
        log.message(f"{cfg.name}: {cfg.model.name} ({n_params:,} parameters) on {x.ds.name} — "
                    f"{len(x.ds.classes)} classes, train {x.data.train.num_samples} / val {len(x.split.val)} / "
                    f"test {len(x.split.test)} images of {tuple(x.ds.images.shape[1:])}, {x.runtime.device} "
                    f"{x.runtime.precision}, {x.runtime.threads} thread(s)")

        def on_step(st: TrainState) -> None:
            every = cfg.train.checkpoint_every_steps
            requested = stopping()
            if requested or (every and (st.epoch * len(x.data.train) + st.step_in_epoch) % every == 0):
                checkpoint(st)
            if requested:
                raise TrainingInterrupted(_interrupted_message(requested, st, run_dir))

        def on_epoch(st: TrainState) -> None:
            prune = reporter is not None and reporter(st.history) and not st.finished  # a tune's pruner
            if dist is not None:
                prune = dist.broadcast(prune)
            if prune:
                st.finished = st.stopped_early = True
                x.pruned = True
                log.message(f"Pruned by the tune after epoch {st.epoch}: this trial cannot catch up with the others; "
                            f"keeping epoch {st.best_epoch}.")
            requested = stopping()
            checkpoint(st)
            if requested and not st.finished:
                raise TrainingInterrupted(_interrupted_message(requested, st, run_dir))

        try:
            return fit(x.trained, x.data, x.optimizer, x.schedule, x.runtime, epochs=cfg.train.epochs,
                       progress=log, state=state, on_step=on_step, on_epoch=on_epoch, dist=dist, trainer=trainer,
                       **x.fit_options())
        except TrainingDiverged as e:
            if dist is None or dist.is_main:
                _record_divergence(run_dir, state, e)
            raise
        except RuntimeError as e:  # a collective inside DDP's backward failed: a peer died or hung
            lost = dist.lost_contact(e) if dist is not None else None
            if lost is None:
                raise
            raise lost from None


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


def _finish(cfg: Config, x: Experiment, result, run_dir: Path) -> tuple[dict, dict]:
    """Test metrics, predictions, the best model, history and metrics.json."""
    data, split, ds = x.data, x.split, x.ds
    eval_loader = data.test if data.test is not None else data.val
    metrics, logits = _eval_metrics(x.trained, eval_loader, x.runtime, ds.classes, ds.labels[split.train].numpy(),
                                    tta=cfg.train.tta == "flip")
    eval_idx = split.test if data.eval_part == "test" else split.val
    write_predictions(run_dir / "predictions.csv", eval_idx, ds.labels[eval_idx], logits, ds.classes, ds.paths)
    biased = data.eval_part == "val" and x.stopper.monitor.startswith("val_")
    metrics.update(evaluated_on=data.eval_part, best_epoch=result.best_epoch, epochs_run=len(result.history),
                   stopped_early=result.stopped_early, pruned=x.pruned, monitor=x.stopper.monitor,
                   training_seconds=result.seconds,
                   parameters=sum(p.numel() for p in x.model.parameters()),
                   trainable_parameters=sum(p.numel() for p in x.model.parameters() if p.requires_grad),
                   caution=("the best epoch was chosen on the same validation images these metrics come "
                            "from, so they are optimistic; keep a test split for an unbiased estimate")
                   if biased else None)
    k = len(ds.classes)
    metrics["class_counts"] = {"train": class_counts(data.train.labels, k).tolist(),  # incl. offline copies
                               "val": class_counts(ds.labels[split.val], k).tolist(),
                               "test": class_counts(ds.labels[split.test], k).tolist()}
    metrics["balancing"] = {"class_weights": x.class_weights.tolist() if x.class_weights is not None else None,
                            "sampler": cfg.data.sampler}
    meta = {"model": cfg.model.name, "options": {**x.options, "init": cfg.model.init},
            "num_classes": len(ds.classes), "in_channels": ds.images.shape[1], "image_size": ds.images.shape[-1],
            "classes": ds.classes, "mean": data.normalizer.mean, "std": data.normalizer.std,
            "resize": cfg.data.resize, "best_epoch": result.best_epoch, "source": ds.name}
    save_model(run_dir / MODEL_FILE, x.model, meta)
    write_history(run_dir / "history.csv", result.history)
    write_json(run_dir / "metrics.json", metrics)
    return metrics, meta


def _write_report(run_dir: Path, log: ProgressLogger) -> None:
    try:
        from .report import write_report

        log.message(f"Report: {write_report(run_dir)}")
    except Exception as e:  # the run is saved; a figure problem must not lose it
        log.message(f"(report not written: {type(e).__name__}: {e}; retry with `cnnlab report {run_dir}`)")


def _print_summary(log: ProgressLogger, m: dict, run_dir: Path) -> None:
    lo, hi = m["accuracy_ci95"]
    part = "Test" if m["evaluated_on"] == "test" else "Validation (no test split)"
    log.message(f"{part}: loss {m['loss']:.4f} - accuracy {m['accuracy']:.4f} (95% CI {lo:.3f}–{hi:.3f}, "
                f"n={m['n']}) - macro F1 {m['f1_macro']:.4f} - "
                f"chance {chance_of(m):.3f} "
                f"(above chance: {format_p(m['chance'].get('p_value_above_chance'))}) - "
                f"best epoch {m['best_epoch']}")
    log.message(f"Run folder: {run_dir}")


def evaluate(run: Run | str | Path, data: str | None = None, device: str = "cpu") -> dict:
    """Re-evaluate a saved model: on its own test split (default), or on every image of `data`
    (a source spec such as folder:PATH), whose class names must be among the model's."""
    run = run if isinstance(run, Run) else load_run(run)
    cfg, meta = run.config, run.meta
    # the precision the run was evaluated with (env.json's, as resolved on the training machine): same numbers
    runtime = Runtime(device, run.env.get("precision") or cfg.train.precision)
    model = run.model.to(runtime.device)
    norm = Normalizer(meta["mean"], meta["std"])
    if data is None:
        ds, split = run.data(), run.split
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
    metrics, _ = _eval_metrics(model, loader, runtime, meta["classes"], train_labels, tta=cfg.train.tta == "flip")
    metrics["evaluated_on"] = part
    if data is not None:
        metrics.update(_training_overlap(run, ds.images))
    return metrics


def _training_overlap(run: Run, images: torch.Tensor) -> dict:
    """How many of `images` are the run's own training images, pixel for pixel at the model's input size
    (another source can hold them: animal-shapes-5 is part of animal-shapes, a folder may be the run's own):
    {overlap_with_training: count or None where the run's data cannot be loaded here, caution}."""
    import hashlib

    try:
        own = run.data()  # checked against split.json: its training images, not others at their positions
    except DataError as e:
        return {"overlap_with_training": None,
                "caution": f"not checked whether these images include the run's training images: its data "
                           f"could not be loaded here as it was ({e})"}
    train = run.split.get("train") or []
    if own.images.shape[1:] != images.shape[1:] or not train:  # other sizes: no image can be the same
        return {"overlap_with_training": 0, "caution": None}

    def digests(x: torch.Tensor) -> list[bytes]:
        return [hashlib.blake2b(im.numpy().tobytes(), digest_size=16).digest() for im in x]

    seen = set(digests(own.images[torch.tensor(train, dtype=torch.int64)]))
    n = sum(d in seen for d in digests(images))
    caution = (f"{n} of these {len(images)} images are the run's own training images (the same pixels); accuracy "
               f"on them does not measure how the model does on new images") if n else None
    return {"overlap_with_training": n, "caution": caution}


def predict(run: Run | str | Path, paths, top_k: int = 3, device: str = "cpu") -> list[dict]:
    """Top-k classes with probabilities for each image file (folders are searched)."""
    run = run if isinstance(run, Run) else load_run(run)
    return run.predict(paths, top_k=top_k, device=device)
