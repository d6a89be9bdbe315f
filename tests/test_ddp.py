"""One run on two processes: torch.distributed with gloo on the CPU, launched by `cnnlab train --nproc 2`
(torchrun) — the same steps as one process, exact resume after a crash, a dead peer as a clear error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnlab.runs import read_history, read_json, training_pid
from conftest import finished

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO = str(RECIPES / "demo.yaml")
SMALL = ["data.max_per_class=30", "--no-report", "--progress", "plain"]
PLAIN_NET = ["model.batch_norm=false", "model.dropout=0", "data.augment=false", "train.precision=32"]


def start_training(cnnlab_bin, *args, **kw) -> subprocess.Popen:
    """`cnnlab train DEMO ARGS` started, not waited for: independent runs go at once, their start-ups overlapping
    (the results do not depend on it: each run's threads are its own, fixed by its config and --nproc)."""
    return subprocess.Popen([str(cnnlab_bin), "train", DEMO, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def train(cnnlab_bin, *args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return finished(start_training(cnnlab_bin, *args, **kw), timeout)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def test_two_processes_with_global_batch_b_take_the_steps_of_one_with_batch_b(tmp_path, cnnlab_bin):
    # 220 training images: 4 steps an epoch; 40 validation images in 3 batches, split 1 + 2 between the ranks
    opts = [*SMALL, *PLAIN_NET, "train.epochs=3", "data.batch_size=64", "data.eval_batch_size=16"]
    procs = [start_training(cnnlab_bin, *opts, "--out", tmp_path / "one"),
             start_training(cnnlab_bin, *opts, "--out", tmp_path / "two", "--nproc", 2)]
    one, two = (finished(p) for p in procs)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # 12 optimiser steps later: the same weights, to float rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    h1, h2 = read_history(tmp_path / "one" / "history.csv"), read_history(tmp_path / "two" / "history.csv")
    for r1, r2 in zip(h1, h2):  # the epoch's training figures count every process's share, once
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
        assert r2["accuracy"] == pytest.approx(r1["accuracy"], abs=1e-9)
        assert r2["val_accuracy"] == pytest.approx(r1["val_accuracy"], abs=1e-9)  # the whole split, gathered
        assert r2["val_loss"] == pytest.approx(r1["val_loss"], rel=1e-4)
    env = read_json(tmp_path / "two" / "env.json")
    assert env["world_size"] == 2 and env["distributed_backend"] == "gloo"
    assert read_json(tmp_path / "one" / "env.json")["world_size"] == 1
    # only rank 0 wrote: one run folder with one of each file, a single progress log
    assert two.stdout.count("Run folder:") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith(".")) == \
        sorted(p.name for p in (tmp_path / "one").iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("world", [2, 3, 5])
def test_each_rank_evaluates_its_own_block_of_the_validation_batches(world):
    """EvalShard: the ranks' batches, in rank order, are exactly one process's — each batch once — also where a
    rank has none (5 ranks, 3 batches)."""
    from cnnlab.data.loader import DeviceLoader
    from cnnlab.data.normalize import Normalizer
    from cnnlab.training.distributed import Dist, EvalShard

    images = torch.arange(40 * 4, dtype=torch.uint8).reshape(40, 1, 2, 2)
    loader = DeviceLoader(images, torch.arange(40), Normalizer([0.0], [1.0]), 16)
    whole = [y.tolist() for _, y in loader]
    shards = [[y.tolist() for _, y in EvalShard(loader, Dist(r, world, r, "gloo"))] for r in range(world)]
    assert [b for s in shards for b in s] == whole
    assert [len(EvalShard(loader, Dist(r, world, r, "gloo"))) for r in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_an_uneven_last_batch_cannot_hang(tmp_path, cnnlab_bin):
    # 220 training images in global batches of 73: a last batch of 1 image for 2 processes (merged into the one
    # before it, so no process gets an empty batch)
    p = train(cnnlab_bin, *SMALL, "train.epochs=1", "data.batch_size=73", "train.dist_timeout=30",
              "--out", tmp_path / "r", "--nproc", 2, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    (row,) = read_history(tmp_path / "r" / "history.csv")
    assert 0 <= row["accuracy"] <= 1 and row["loss"] == row["loss"]


def test_crash_then_resume_on_two_processes_is_exact(tmp_path, cnnlab_bin):
    """Batch norm, dropout and augmentation on: killed after its first epoch, resumed with --nproc 2, it ends
    where the uninterrupted two-process run ends, bit for bit."""
    opts = [*SMALL, "train.epochs=4", "data.batch_size=32"]
    reference = start_training(cnnlab_bin, *opts, "--out", tmp_path / "whole", "--nproc", 2)  # alongside the cut run
    try:
        run = tmp_path / "cut"
        proc = subprocess.Popen([str(cnnlab_bin), "train", DEMO, *opts, "--out", str(run), "--nproc", "2"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.time()
        while not (run / "checkpoint.safetensors").exists():
            assert proc.poll() is None and time.time() - t0 < 120
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and torchrun: the workers get SIGTERM from the kernel
        proc.wait()
        t0 = time.time()
        while training_pid(run) is not None:  # they stop at the next step, with a checkpoint
            assert time.time() - t0 < 60, "the training processes outlived their launcher"
            time.sleep(0.05)
        assert not (run / "metrics.json").exists()
    finally:
        whole = finished(reference)  # waited for (or killed) whatever happened above
    assert whole.returncode == 0, whole.stderr[-3000:]
    p = subprocess.run([str(cnnlab_bin), "train", "--resume", str(run), "--nproc", "2", "--no-report"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Resuming" in p.stdout
    a, b = weights(tmp_path / "whole"), weights(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_json(run / "metrics.json")["accuracy"] == read_json(tmp_path / "whole" / "metrics.json")["accuracy"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_peer_is_a_clear_error_not_a_hang(tmp_path, cnnlab_bin):
    port = _free_port()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    cmd = [str(cnnlab_bin), "train", DEMO, *SMALL, "train.epochs=200", "data.batch_size=16",
           "train.dist_timeout=10", "--out", str(tmp_path / "r")]
    procs = [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    t0 = time.time()
    while not (tmp_path / "r" / "checkpoint.safetensors").exists():  # training is under way
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
        assert time.time() - t0 < 120
        time.sleep(0.05)
    procs[1].kill()
    out, err = procs[0].communicate(timeout=60)  # not a hang: well within the test's patience
    assert procs[0].returncode == 2, err[-2000:]
    assert "lost contact" in err and "Traceback" not in err
    assert time.time() - t0 < 120


def test_torchrun_max_restarts_resumes_the_run_from_its_checkpoint(tmp_path):
    """A worker killed mid-run: torchrun starts both again, and they go on from the last checkpoint."""
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "cnnlab", "train", DEMO, *SMALL, "train.epochs=6", "data.batch_size=32", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    while not (run / "checkpoint.safetensors").exists() or training_pid(run) is None:
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.02)
    os.kill(training_pid(run), signal.SIGKILL)  # rank 0, the one that writes
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "Resuming" in out
    assert len(read_history(run / "history.csv")) == 6 and (run / "metrics.json").is_file()
    assert read_json(run / "env.json")["world_size"] == 2


def test_each_torchrun_attempt_keeps_its_keys_apart_in_the_agents_store(monkeypatch):
    """After a restart, the new ranks must not read the dead ones' gloo addresses: under torchrun's agent
    store every attempt writes under a prefix of its own; outside torchrun there is no such store."""
    import datetime as dt

    import torch.distributed as d

    from cnnlab.training.distributed import _attempt_store

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert _attempt_store(2, dt.timedelta(seconds=5)) is None
    port = _free_port()
    agent = d.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=dt.timedelta(seconds=10))  # the agent's server
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    for attempt, value in (("0", b"dead rank's address"), ("1", b"new rank's address")):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        _attempt_store(1, dt.timedelta(seconds=10)).set("rank0", value)
    assert agent.get("cnnlab/attempt_0/rank0") == b"dead rank's address"
    assert agent.get("cnnlab/attempt_1/rank0") == b"new rank's address"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert _attempt_store(1, dt.timedelta(seconds=10)).get("rank0") == b"new rank's address"
