"""Reliability: exact resume after SIGKILL at any moment, clean SIGINT, divergence, safe files, bad configs.

The kill tests run real `cnnlab train` processes and kill them with SIGKILL at random
moments (seeded) and once in the middle of a checkpoint write, resume until the run
finishes, and compare the final weights, history and metrics with an uninterrupted
run of the same config: they must be identical, bit for bit.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CNNLAB = [sys.executable, "-m", "cnnlab"]
# ~22 steps an epoch, 3 epochs, a checkpoint after every step: kills land mid-epoch and mid-write
RUN = ["data.max_per_class=100", "data.batch_size=32", "train.epochs=3", "train.checkpoint_every_steps=1",
       "train.threads=1", "data.augment=true", "optim.lr=0.003"]
TIMING = {"seconds", "training_seconds", "wall_seconds"}


def _train(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(CNNLAB + ["train", *args, "--no-report", "--progress", "plain"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _run_to_end(args, env_extra=None, timeout=240) -> subprocess.CompletedProcess:
    p = _train(args, env_extra)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in m.items() if k not in TIMING}


def _assert_identical(run: Path, ref: Path) -> None:
    a, b = load_file(str(run / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ in {k}"
    assert _history(run) == _history(ref)
    assert _metrics(run) == _metrics(ref)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cnnlab_cache) -> Path:
    ref = tmp_path_factory.mktemp("ref") / "run"
    r = _run_to_end(["-", *RUN, "--out", str(ref)])
    assert r.returncode == 0, r.stderr
    return ref


def _resume_until_done(run: Path, limit: int = 12) -> int:
    """Resume (without kills) until metrics.json exists; returns how many resumes it took."""
    for i in range(limit):
        if (run / "metrics.json").is_file():
            return i
        r = _run_to_end(["--resume", str(run)])
        assert r.returncode == 0, r.stderr
    raise AssertionError("run never finished")


def _mtime(path: Path):
    return path.stat().st_mtime_ns if path.exists() else None


def test_sigkill_at_random_moments_then_resume_is_bit_identical(reference, tmp_path):
    rng = random.Random(int(os.environ.get("CNNLAB_KILL_SEED", "1234")))
    train_seconds = json.loads((reference / "metrics.json").read_text())["training_seconds"]
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint.safetensors"
    kills = 0
    while not (run / "metrics.json").is_file() and kills < 5:
        before = _mtime(ckpt)
        p = _train(["-", *RUN, "--out", str(run)] if not run.exists() else ["--resume", str(run)])
        while p.poll() is None and _mtime(ckpt) == before:  # wait until it is training (a fresh checkpoint)
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5 * train_seconds))  # then kill at a random moment of training
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate()
    assert kills >= 3, f"only {kills} kill(s) landed before the run finished"
    print(f"KILLS {kills}")
    _resume_until_done(run)
    _assert_identical(run, reference)
    assert not list(run.glob(".*.tmp")), "a temporary checkpoint file of a killed write was left behind"


@pytest.mark.parametrize("write", [1, 7, 20])
def test_sigkill_during_a_checkpoint_write_then_resume_is_bit_identical(reference, tmp_path, write):
    run = tmp_path / "run"
    r = _run_to_end(["-", *RUN, "--out", str(run)], env_extra={"CNNLAB_FAULT": f"checkpoint-write:{write}"})
    assert r.returncode == -signal.SIGKILL  # it really died in the write
    assert not (run / "metrics.json").exists() and list(run.glob(".*.tmp"))  # a half-written temporary file
    _resume_until_done(run)
    _assert_identical(run, reference)
    assert not list(run.glob(".*.tmp"))  # cleaned up on resume


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_at_a_step_with_a_checkpoint_and_resumes_identically(reference, tmp_path, sig):
    run = tmp_path / "run"
    p = _train(["-", *RUN, "--out", str(run)])
    deadline = time.time() + 60
    while not (run / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert f"Resume with: cnnlab train --resume {run}" in err
    assert "Traceback" not in err
    assert (run / "checkpoint.safetensors").is_file() and not (run / "metrics.json").exists()
    _resume_until_done(run)
    _assert_identical(run, reference)


def test_a_second_ctrl_c_stops_at_once_inside_a_step(tmp_path):
    """Both signals land inside the first step, which takes about 3 s (resnet18, 64×64, one batch of
    280, one thread): the first only asks for a stop at the step boundary; the second must end the
    process before that boundary is reached — no clean-stop message, no checkpoint."""
    run = tmp_path / "run"
    p = _train(["-", "data.max_per_class=40", "data.image_size=64", "data.channels=3", "model.name=resnet18",
                "data.batch_size=280", "train.epochs=2", "train.threads=1", "train.checkpoint_every_steps=null",
                "--out", str(run)])
    first = p.stdout.readline()  # printed once the stop handler is installed, just before training
    assert "parameters) on" in first, first
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    t0 = time.time()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "cnnlab: interrupted" in err and "stopped by SIGINT" not in err
    assert not (run / "checkpoint.safetensors").exists()  # it did not wait for the step boundary
    assert time.time() - t0 < 3
    assert "Epoch 1/1" not in out  # not one step finished reporting


def test_resume_with_a_changed_config_is_refused_unless_forced(reference, tmp_path):
    run = tmp_path / "run"
    r = _run_to_end(["-", *RUN, "--out", str(run)], env_extra={"CNNLAB_FAULT": "checkpoint-write:5"})
    assert r.returncode == -signal.SIGKILL
    refused = _run_to_end(["--resume", str(run), "optim.lr=0.1", "model.name=mlp"])
    assert refused.returncode == 2
    assert "model.name: 'harahap-cnn' → 'mlp'" in refused.stderr and "optim.lr: 0.003 → 0.1" in refused.stderr
    assert "--force" in refused.stderr
    ok = _run_to_end(["--resume", str(run), "train.epochs=4", "--force", "train.epochs"])
    assert ok.returncode == 0, ok.stderr
    assert len(_history(run)) == 4


def test_divergence_stops_within_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    r = _run_to_end(["-", "data.max_per_class=40", "data.batch_size=16", "train.epochs=3",
                     "train.checkpoint_every_steps=1", "train.threads=1", "optim.name=sgd", "optim.lr=10",
                     "optim.momentum=0", "--out", str(run)])
    assert r.returncode == 3
    assert "diverged" in r.stderr and "lower optim.lr" in r.stderr and "optim.clip_grad_norm" in r.stderr
    failure = json.loads((run / "failure.json").read_text())
    from safetensors import safe_open

    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["cnnlab_checkpoint"])
        weights = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
    steps_per_epoch = -(-len(json.loads((run / "split.json").read_text())["train"]) // 16)
    last_good = meta["epoch"] * steps_per_epoch + meta["step_in_epoch"]
    assert failure["step"] == last_good + 1  # detected at the very step it happened
    assert all(torch.isfinite(w.float()).all() for w in weights.values())  # the checkpoint is the good one
    assert not (run / "metrics.json").exists()


def test_checkpoint_write_failure_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    from cnnlab import fileio as ck

    path = tmp_path / "checkpoint.safetensors"
    ck.atomic_write_bytes(path, b"previous complete checkpoint")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ck.atomic_write_bytes(path, b"x" * 1000)
    assert path.read_bytes() == b"previous complete checkpoint"
    assert not list(tmp_path.glob(".*.tmp"))


def test_unwritable_output_folder_is_a_clean_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = _run_to_end(["-", "data.max_per_class=10", "train.epochs=1", "--out", str(blocker / "run")])
    assert r.returncode == 2
    assert r.stderr.startswith("cnnlab: error: cannot read or write") and "Traceback" not in r.stderr
    assert blocker.read_text() == "not a folder"
