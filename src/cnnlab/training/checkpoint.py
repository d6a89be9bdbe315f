"""Checkpoints that resume a run exactly, written so that a crash at any moment loses nothing.

One file, `checkpoint.safetensors`, in the run folder: every tensor (model, best
model so far, optimiser state, RNG states, the epoch's sample order, the running
loss sums) as safetensors, and everything else (epoch, step, history, schedule,
early stopping, optimiser hyper-parameters, Python / NumPy RNG) as JSON in its
header. No pickle, so a checkpoint can be read without trusting it; a checksum of the tensors
(cnnlab.tensorfile) turns a damaged file into an error naming it, not a resume that "diverges".

Writing is atomic: bytes go to a temporary file in the same folder, which is
flushed and fsync'ed, then renamed over the previous checkpoint, then the folder
is fsync'ed. Until the rename, the previous checkpoint is intact; after it, the
new one is complete. A crash in between leaves one or the other, never a mix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ..tensorfile import TensorFileError, load_tensors, save_tensors

CHECKPOINT = "checkpoint.safetensors"
META_KEY = "cnnlab_checkpoint"
FORMAT = 1


@dataclass
class TrainState:
    """Where training stands: what `fit` needs, besides model and optimiser, to go on exactly."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # batches done in the epoch in progress (0 at an epoch boundary)
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_state: dict | None = None  # the best epoch's model state_dict (kept in memory)
    stopped_early: bool = False
    finished: bool = False
    order: torch.Tensor | None = None  # the sample order of the epoch in progress
    acc: dict = field(default_factory=dict)  # running sums of the epoch in progress
    seconds: float = 0.0  # training time so far, over all sessions


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        plain["state"][str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                plain["state"][str(pid)][key] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict = {int(pid): dict(v) for pid, v in plain["state"].items()}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = t
    return {"state": state, "param_groups": plain["param_groups"]}


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments, momentum buffers) its parameter's memory layout.

    Checkpoints store tensors contiguous, and `Optimizer.load_state_dict` restores dtype and device but
    not strides. torch's fused CPU steps walk a parameter and its state with the parameter's strides,
    so a channels-last conv weight (more than one input channel) paired with a contiguous moment is
    updated element-against-the-wrong-element: resumed runs then differed from uninterrupted ones.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _numpy_rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def save_checkpoint(run_dir: Path, state: TrainState, model, optimizer, schedule, stopper, loader,
                    config: dict, precision=None, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Everything needed to continue exactly where training stands. extra: more tensors (each process's own
    state when several train one run: training.distributed.Dist.rank_state)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}  # save_tensors makes them CPU, contiguous
    tensors.update(extra or {})
    if state.best_state is not None:
        tensors.update({f"best.{k}": v for k, v in state.best_state.items()})
    opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tensors["rng.order"] = loader.generator.get_state().cpu()
    if getattr(loader, "aug_generator", None) is not None:
        tensors["rng.augment"] = loader.aug_generator.get_state().cpu()
    if state.order is not None:
        tensors["order"] = state.order.detach().cpu()
    for k, v in state.acc.items():
        if isinstance(v, torch.Tensor):
            tensors[f"acc.{k}"] = v.detach().cpu().reshape(1)
    meta = {
        "format": FORMAT, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "history": state.history,
        "best_epoch": state.best_epoch, "stopped_early": state.stopped_early, "finished": state.finished,
        "seconds": state.seconds, "acc": {k: v for k, v in state.acc.items() if not isinstance(v, torch.Tensor)},
        "schedule": schedule.state_dict(), "stopper": stopper.state_dict(), "optimizer": opt_plain,
        "python_rng": _to_json(random.getstate()), "numpy_rng": _numpy_rng_state(),
        "scaler": precision.state_dict() if precision is not None else None, "config": config,
    }
    path = Path(run_dir) / CHECKPOINT
    save_tensors(path, tensors, META_KEY, meta, fault_point="checkpoint-write")
    return path


def _to_json(obj):
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(x) for x in obj]}
    return obj


def _from_json(obj):
    if isinstance(obj, dict) and "__tuple__" in obj:
        return tuple(_from_json(x) for x in obj["__tuple__"])
    if isinstance(obj, list):
        return [_from_json(x) for x in obj]
    return obj


class CheckpointError(TensorFileError):
    """A checkpoint that cannot be used."""


def read_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {CHECKPOINT} to resume from")
    try:
        tensors, meta = load_tensors(path, META_KEY, "checkpoint")
    except TensorFileError as e:
        raise CheckpointError(str(e)) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
    return tensors, meta


def restore_checkpoint(tensors: dict, meta: dict, model, optimizer, schedule, stopper, loader,
                       precision=None) -> TrainState:
    """Load a checkpoint into freshly built objects; returns the TrainState to continue from."""
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    _match_parameter_layouts(optimizer)
    schedule.load_state_dict(meta["schedule"])
    stopper.load_state_dict(meta["stopper"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    loader.generator.set_state(tensors["rng.order"].to(loader.generator.get_state().device))
    if "rng.augment" in tensors and getattr(loader, "aug_generator", None) is not None:
        loader.aug_generator.set_state(tensors["rng.augment"])
    random.setstate(_from_json(meta["python_rng"]))
    n = meta["numpy_rng"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if precision is not None:
        precision.load_state_dict(meta.get("scaler"))
    device = loader.labels.device
    acc = dict(meta.get("acc") or {})
    acc.update({k[4:]: v.reshape(()).to(device) for k, v in tensors.items() if k.startswith("acc.")})
    order = tensors.get("order")
    return TrainState(epoch=meta["epoch"], step_in_epoch=meta["step_in_epoch"], history=meta["history"],
                      best_epoch=meta["best_epoch"], best_state=best, stopped_early=meta["stopped_early"],
                      finished=meta["finished"], order=order.to(device) if order is not None else None,
                      acc=acc, seconds=meta.get("seconds", 0.0))
