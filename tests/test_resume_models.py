"""Resume is bit-identical for every registered model family, gray and RGB, with the fused CPU path on and off.

The uninterrupted run's folder is copied right after a mid-epoch checkpoint (what SIGKILL at that
moment would leave: the checkpoint on disk, nothing after it), that copy is resumed from its checkpoint in
a fresh model and optimiser, and compared with the uninterrupted run: final weights, the last training
state and the history must be equal. (The copy stands for a second run killed there: it is the same
seeded run up to that checkpoint, without training it a second time.)
The one-conv grayscale net alone could not catch layout bugs: its conv has one input channel, so
its weight is the same in memory whether contiguous or channels-last.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import cnnlab.api as api
from cnnlab.training.checkpoint import read_checkpoint
from cnnlab.models import list_models
from conftest import fit_run

# 24 px, not 16: at 16 px MobileNetV3's 5×5 depthwise convs see 1×1 maps, where torch 2.14's bf16 channels-last
# backward reads uninitialised memory (NaN or 1e34 gradients now and then; found by this test under bf16)
BASE = {"data.source": "random", "data.random_samples": 60, "data.random_classes": 3, "data.image_size": 24,
        "data.batch_size": 8, "train.epochs": 2, "train.checkpoint_every_steps": 8, "optim.name": "adam",
        "optim.lr": 0.003, "data.augment": True, "train.seed": 3}
STOP_AT = 2  # checkpoints (6 steps an epoch): the end of epoch 1, epoch 2 step 2 (global step 8): stop there


def _copy_after_checkpoint(monkeypatch, n: int, to) -> None:
    """Copy the run folder right after its n-th checkpoint write: the folder a SIGKILL there would leave.
    Hard links, not copies of the (for the VGGs, large) files: the run replaces its files by renaming new
    ones over them, never writing into them, so the linked ones keep this moment's contents (the test checks
    the copy's checkpoint is still this one's)."""
    real, calls = api.save_checkpoint, []

    def save_then_copy(*args, **kw):
        path = real(*args, **kw)
        calls.append(path)
        if len(calls) == n:
            shutil.copytree(path.parent, to, copy_function=os.link)
        return path

    monkeypatch.setattr(api, "save_checkpoint", save_then_copy)


def _checkpoint_step(run_dir) -> tuple[int, int]:
    """(epochs done, steps into the next) of the run folder's checkpoint, read as a resume reads it."""
    meta = read_checkpoint(run_dir)[1]
    return meta["epoch"], meta["step_in_epoch"]


def _last_state(run_dir) -> dict:
    ckpt = load_file(str(run_dir / "checkpoint.safetensors"))
    return {k: v for k, v in ckpt.items() if k.startswith(("model.", "optim."))}


def one_per_family() -> list[str]:
    """Every paper net, and the lightest member of each other family (the module its builder lives in:
    vgg, resnet, mobilenet, efficientnet…): a new family is covered as soon as it is registered."""
    from cnnlab.models import MODELS

    chosen, families = [], set()
    for name in list_models():
        family = MODELS.get(name).__module__
        if family.endswith(".papers") or family not in families:
            chosen.append(name)
            families.add(family)
    return chosen


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "rgb"])
@pytest.mark.parametrize("model", one_per_family())
def test_resume_is_bit_identical(model, channels, fused, tmp_path, monkeypatch):
    over = dict(BASE, **{"model.name": model, "data.channels": channels, "train.fused": fused})
    with monkeypatch.context() as m:
        _copy_after_checkpoint(m, STOP_AT, tmp_path / "run")
        ref = fit_run(over, out=tmp_path / "ref")
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file() and not (tmp_path / "run" / "metrics.json").exists()
    assert len(ref.history) == 2 and _checkpoint_step(tmp_path / "run") == (1, 2)  # mid-way through epoch 2
    resumed = fit_run(None, resume=tmp_path / "run")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in ref.history]
    a, b = load_file(str(ref.path / "model.safetensors")), load_file(str(resumed.path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "best weights differ"
    sa, sb = _last_state(ref.path), _last_state(resumed.path)
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"the last weights / optimiser state differ after resume: {differ[:5]}"
