"""The learning-rate range test (Smith 2017; fastai's `lr_find`, Lightning's `Tuner.lr_find`).

`lr_find(config)` builds the experiment a real run of `config` would train — the same data, split, augmentation,
model, optimiser and precision — and takes `steps` optimiser steps while the rate grows exponentially from
`start_lr` to `end_lr`, recording the training loss at every step. The model's weights, the optimiser's state and
the random generators are put back afterwards: the test leaves the experiment as it found it.

Suggestion rule: the steepest descent of the smoothed loss against log(rate) — Lightning's default rule
(`suggestion(skip_begin=10, skip_end=1)`), searched only up to the minimum of the smoothed loss. The rate at the
minimum itself is reported too (a tenth of it is fastai's classic rule of thumb).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import Config, ConfigError, load_config
from .fileio import atomic_write_text

RULE = "steepest"
RULE_TEXT = ("steepest descent of the smoothed loss against log(rate), between the first few steps and the "
             "minimum of the smoothed loss (Lightning's rule)")
SKIP_BEGIN = 10  # as Lightning: the first points have (nearly) no smoothing history and the loss is flat there


def check_settings(start_lr: float, end_lr: float, steps: int, diverge: float = 4.0, smoothing: float = 0.98,
                   names: dict[str, str] | None = None) -> None:
    """A ConfigError for settings the test cannot run with; `names` shows each one as the caller knows it
    (the CLI: {"start_lr": "--start", …})."""
    n = {"start_lr": "start_lr", "end_lr": "end_lr", "steps": "steps", "diverge": "diverge",
         "smoothing": "smoothing", **(names or {})}
    if not (isinstance(start_lr, (int, float)) and math.isfinite(start_lr) and start_lr > 0):
        raise ConfigError(f"{n['start_lr']}={start_lr}: the starting learning rate must be a finite number > 0 "
                          "(e.g. 1e-7)")
    if not (isinstance(end_lr, (int, float)) and math.isfinite(end_lr) and end_lr > start_lr):
        raise ConfigError(f"{n['end_lr']}={end_lr}: the final learning rate must be a finite number greater than "
                          f"{n['start_lr']}={start_lr} (the rate grows from one to the other; e.g. 10)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 10:
        raise ConfigError(f"{n['steps']}={steps}: at least 10 steps are needed to draw a curve (e.g. 100)")
    if not (isinstance(diverge, (int, float)) and math.isfinite(diverge) and diverge > 1):
        raise ConfigError(f"{n['diverge']}={diverge}: the divergence threshold is a multiple of the minimum loss, "
                          "a number > 1 (e.g. 4)")
    if not (isinstance(smoothing, (int, float)) and 0 <= smoothing < 1):
        raise ConfigError(f"{n['smoothing']}={smoothing}: the smoothing factor must lie in [0, 1) (e.g. 0.98)")


def rates(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    """The rate at each step: start_lr at the first, end_lr at the last, evenly spaced on a log scale."""
    return start_lr * (end_lr / start_lr) ** (np.arange(steps) / (steps - 1))


def smooth(losses, beta: float) -> list[float]:
    """The exponential moving average of `losses`, bias-corrected (Adam-style: divided by 1 − βᵏ), so the first
    values are not pulled towards zero."""
    out, avg = [], 0.0
    for k, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** k))
    return out


def suggest(lrs, smoothed, skip_begin: int = SKIP_BEGIN) -> tuple[int | None, int | None]:
    """(index of the suggested rate, index of the minimum smoothed loss); the suggestion is None when the loss
    never fell after the first few steps.

    Why the steepest descent: it is the rate at which one step lowers the loss most per factor of rate, i.e. still
    well inside the stable region (the minimum itself lies at the edge of divergence, and the smoothed curve
    lags the raw one, which pushes the minimum further right). Lightning uses the same rule; fastai's 'valley'
    is a close alternative but depends on a longest-decreasing-run heuristic that is harder to explain in one line.
    Searching only up to the minimum keeps noise on the diverging tail from being picked.
    """
    s = np.asarray(smoothed, dtype=float)
    finite = np.isfinite(s)
    if not finite.any():
        return None, None
    i_min = int(np.nanargmin(np.where(finite, s, np.nan)))
    begin = min(skip_begin, len(s) // 5)  # short tests (10–50 steps) keep most of their points
    if i_min - begin < 2:
        return None, i_min
    end = int(np.flatnonzero(finite)[-1]) + 1  # the test stops at the first non-finite value: only the last
    # central differences over the whole finite curve (as Lightning), so the point before the minimum is judged by
    # both neighbours rather than by a one-sided difference that always favours the minimum on short tests
    grad = np.gradient(s[begin:end], np.log(np.asarray(lrs, dtype=float)[begin:end]))[:i_min + 1 - begin]
    if not np.isfinite(grad).any() or np.nanmin(grad) >= 0:
        return None, i_min
    return begin + int(np.nanargmin(grad)), i_min


@contextlib.contextmanager
def restored(exp):
    """Put the experiment's weights (and which of them train), optimiser state, loss scale and random generators
    back as they were, however the block ends."""
    model, trained = exp.model, exp.trained
    weights = copy.deepcopy(model.state_dict())
    head = copy.deepcopy(trained.state_dict()) if trained is not model else None
    grads = [(p, p.requires_grad) for p in list(model.parameters()) + list(trained.parameters())]
    modes = [(m, m.training) for m in list(model.modules()) + list(trained.modules())]
    frozen = getattr(model, "frozen_backbone", None)
    optim = copy.deepcopy(exp.optimizer.state_dict())
    scaler = copy.deepcopy(exp.runtime.precision.state_dict())
    generators = [g for loader in (exp.data.train,) for g in (getattr(loader, "generator", None),
                                                              getattr(loader, "aug_generator", None))
                  if isinstance(g, torch.Generator)]
    gen_states = [g.get_state() for g in generators]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        model.load_state_dict(weights)
        if head is not None:
            trained.load_state_dict(head)
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag
        if frozen is not None:
            model.frozen_backbone = frozen
        exp.optimizer.load_state_dict(optim)
        exp.runtime.precision.load_state_dict(scaler)
        for g, state in zip(generators, gen_states):
            g.set_state(state)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _batches(loader):
    """Training batches without end: epoch after epoch, each in a fresh order, as training draws them."""
    while True:
        empty = True
        for batch in loader.iterate(loader.new_order()):
            empty = False
            yield batch
        if empty:
            raise ConfigError("the training loader yields no batches")


def range_test(exp, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100, diverge: float = 4.0,
               smoothing: float = 0.98, progress: bool = True) -> dict:
    """Run the range test on a built experiment (restoring it afterwards); returns the rows and the result.

    A step is the loop's (training/loop.py): autocast forward and loss (class weights, label smoothing, MixUp /
    CutMix as configured, plus the papers' L2 term when on), the precision's backward / unscale_ / step, gradient
    clipping when configured. The recorded loss is the cross-entropy, as history.csv reports it.
    """
    from .training.loop import batch_loss
    from .training.optim import l2_penalty, l2_weights

    check_settings(start_lr, end_lr, steps, diverge, smoothing)
    cfg: Config = exp.cfg
    model, runtime, optimizer = exp.trained, exp.runtime, exp.optimizer
    precision = runtime.precision
    opts = exp.fit_options()
    l2, clip = opts["l2"], opts["clip_grad_norm"]
    class_weights, label_smoothing, mix = opts["class_weights"], opts["label_smoothing"], opts["mix"]
    scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]  # optim.backbone_lr_scale's ratios
    lrs = rates(start_lr, end_lr, steps)
    rows: list[dict] = []
    stopped = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="lr-find", unit="step", leave=False, file=sys.stderr, dynamic_ncols=True,
                   disable=None)  # None: a bar on a terminal only
    t0 = time.perf_counter()
    with restored(exp):
        exp.before_epoch(1)  # gradual unfreezing: the first epoch's frozen backbone
        model.train()
        if getattr(model, "frozen_backbone", False):
            model.backbone.eval()
        weights = l2_weights(model) if l2 > 0 else []
        params = [p for p in model.parameters() if p.requires_grad]
        batches = _batches(exp.data.train)
        avg, best = 0.0, math.inf
        for i in range(steps):
            lr = float(lrs[i])
            for g, scale in zip(optimizer.param_groups, scales):
                g["lr"] = lr * scale
            x, y = next(batches)
            _, loss, _, _ = batch_loss(model, x, y, runtime, mix, class_weights, label_smoothing)
            value = loss.item()
            if math.isfinite(value):
                avg = smoothing * avg + (1 - smoothing) * value
                smoothed = avg / (1 - smoothing ** (i + 1))
            else:
                smoothed = value
            rows.append({"step": i + 1, "lr": lr, "loss": value, "smoothed_loss": smoothed})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(lr=f"{lr:.1e}", loss=f"{smoothed:.4f}", refresh=False)
            if not math.isfinite(smoothed):
                stopped = f"the loss became non-finite ({value}) at step {i + 1} (rate {lr:.3g})"
                break
            best = min(best, smoothed)
            if smoothed > diverge * best:
                stopped = (f"the smoothed loss {smoothed:.4g} exceeded {diverge:g} × its minimum {best:.4g} at step "
                           f"{i + 1} (rate {lr:.3g})")
                break
            if i == steps - 1:
                break  # the last rate's loss is measured; no update needed after it
            objective = loss + l2_penalty(weights, l2) if weights else loss
            optimizer.zero_grad(set_to_none=True)
            precision.backward(objective)
            precision.unscale_(optimizer)
            if clip is not None:
                nn.utils.clip_grad_norm_(params, clip)
            precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    if bar is not None:
        bar.close()
    taken = [r["lr"] for r in rows]
    i_sug, i_min = suggest(taken, [r["smoothed_loss"] for r in rows])
    return {
        "suggested_lr": taken[i_sug] if i_sug is not None else None,
        "suggested_step": i_sug + 1 if i_sug is not None else None,
        "min_loss_lr": taken[i_min] if i_min is not None else None,
        "min_loss_step": i_min + 1 if i_min is not None else None,
        "min_smoothed_loss": rows[i_min]["smoothed_loss"] if i_min is not None else None,
        "rule": RULE, "rule_description": RULE_TEXT,
        "steps_taken": len(rows), "last_lr": taken[-1], "stopped_early": stopped,
        "settings": {"start_lr": start_lr, "end_lr": end_lr, "steps": steps, "diverge": diverge,
                     "smoothing": smoothing, "skip_begin": min(SKIP_BEGIN, len(rows) // 5),
                     "param_group_lr_scales": scales},
        "config": {"name": cfg.name, "model": cfg.model.name, "optimizer": cfg.optim.name, "optim.lr": cfg.optim.lr,
                   "batch_size": cfg.data.batch_size, "precision": str(precision),
                   "device": str(runtime.device)},
        "seconds": round(time.perf_counter() - t0, 3),
        "rows": rows,
    }


def lr_find(config=None, overrides=None, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
            out: str | Path | None = None, diverge: float = 4.0, smoothing: float = 0.98, progress: bool = True,
            experiment=None) -> dict:
    """The learning-rate range test for `config` (a YAML path, a dict, a Config or None) with `overrides`.

    The rate grows exponentially from start_lr to end_lr over `steps` optimiser steps (the training loader is
    cycled when it has fewer batches; every param group keeps its configured ratio, e.g. optim.backbone_lr_scale).
    The test stops early once the smoothed loss (EMA with factor `smoothing`, bias-corrected) exceeds `diverge` ×
    its minimum or becomes non-finite.

    Suggested rate: the steepest descent of the smoothed loss against log(rate), skipping the first 10 points (fewer
    on short tests) and searching only up to the minimum — Lightning's rule. The rate at the minimum smoothed loss is
    reported as well. None for either when the loss never fell.

    experiment: an already built Experiment to test instead of building one (config and overrides are then
    ignored); its weights, optimiser state and generators are restored afterwards.
    Writes lr_find.csv (step, lr, loss, smoothed_loss), lr_find.json and lr_find.png to `out`
    (default lr-find/<config name>) and returns lr_find.json's content plus the three paths ("csv", "json", "png").
    """
    check_settings(start_lr, end_lr, steps, diverge, smoothing)  # before any work
    if experiment is None:
        from .experiment import build_experiment
        from .training.progress import ProgressLogger

        cfg = load_config(config, overrides)
        experiment = build_experiment(cfg, ProgressLogger("auto" if progress else "none", stream=sys.stderr))
    cfg = experiment.cfg
    out = Path(out) if out is not None else Path("lr-find") / (cfg.name or "defaults")
    result = range_test(experiment, start_lr=start_lr, end_lr=end_lr, steps=steps, diverge=diverge,
                        smoothing=smoothing, progress=progress)
    rows = result.pop("rows")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "lr_find.csv", "json": out / "lr_find.json", "png": out / "lr_find.png"}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "lr", "loss", "smoothed_loss"])
    for r in rows:
        w.writerow([r["step"], repr(r["lr"]), repr(r["loss"]), repr(r["smoothed_loss"])])
    atomic_write_text(paths["csv"], buf.getvalue())
    result["override"] = f"optim.lr={result['suggested_lr']:.1e}" if result["suggested_lr"] is not None else None
    atomic_write_text(paths["json"], json.dumps(result, indent=2, allow_nan=False) + "\n")
    plot(rows, result, paths["png"], title=f"Learning-rate range test: {cfg.name or 'defaults'} "
                                           f"({cfg.model.name}, {cfg.optim.name})")
    return {**result, **{k: str(v) for k, v in paths.items()}}


def plot(rows: list[dict], result: dict, path: Path, *, title: str = "") -> Path:
    """The raw (faint) and smoothed loss against the rate on a log axis, the suggestion and the minimum marked."""
    import matplotlib

    from .report.plots import TRAIN, VAL, _figure, _save, _style, drawable

    lr = np.array([r["lr"] for r in rows])
    raw = np.array([r["loss"] for r in rows])
    sm = np.array([r["smoothed_loss"] for r in rows])
    with matplotlib.rc_context(_style()):
        fig = _figure(7.5, 4.2)
        ax = fig.add_subplot()
        ok = np.isfinite(raw)
        ax.plot(lr[ok], raw[ok], color=VAL, alpha=0.3, linewidth=1, label="loss")
        ok = np.isfinite(sm)
        ax.plot(lr[ok], sm[ok], color=VAL, linewidth=2, label="smoothed loss")
        ax.set_xscale("log")
        shown = np.concatenate([raw[np.isfinite(raw)], sm[ok]])
        if shown.size:  # a diverging tail would flatten the curve: show from the lowest loss to the early ones
            i_min = result.get("min_loss_step") or len(rows)
            early = raw[:i_min][np.isfinite(raw[:i_min])]
            lo = float(shown.min())
            top = float(max(early.max() if early.size else lo, sm[ok][0] if ok.any() else lo))
            span = max(top - lo, 1e-3)
            ax.set_ylim(lo - 0.05 * span, top + 0.1 * span)
        if result.get("min_loss_step"):
            i = result["min_loss_step"] - 1
            ax.plot([lr[i]], [sm[i]], marker="o", markersize=7, color="#444", linestyle="none",
                    label=f"minimum of the smoothed loss: {lr[i]:.1e}")
        if result.get("suggested_step"):
            i = result["suggested_step"] - 1
            ax.axvline(lr[i], color=TRAIN, linestyle="--", linewidth=1.2)
            ax.plot([lr[i]], [sm[i]], marker="*", markersize=15, color=TRAIN, markeredgecolor="black",
                    markeredgewidth=0.6, linestyle="none", zorder=5, label=f"suggested: {lr[i]:.1e} (steepest)")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.legend(loc="lower left")
        if result.get("stopped_early"):
            ax.text(0.99, 0.02, "stopped early: diverged", transform=ax.transAxes, ha="right", va="bottom",
                    fontsize=8, color="#666")
        if title:
            ax.set_title(drawable(title), loc="left")
        return _save(fig, path)
