"""Executors: run a list of run requests, each a fresh `cnnlab train` process, and report each outcome.

The one interface between a study (or a tune) and the machines it runs on. An executor never plans
or aggregates: it is given RunRequests (a resolved config file, a seed, a run folder) and yields a
RunOutcome for each as it ends. Every run is an ordinary `cnnlab train` process writing an ordinary run
folder, so resume, report and compare work the same whichever executor made it. `LocalExecutor` runs
them as child processes of this one, N at a time; a cluster executor (Ray) implements the same `run`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from ..proc import child_env
from ..runs import is_finished


@dataclass
class RunRequest:
    """One run to make: train `config_file` with `seed` into `run_dir` (or resume it there)."""

    label: str                  # "cnn-adam seed 0" / "pretrain other"
    run_dir: Path               # the run folder to create (or resume)
    config_file: Path           # the resolved config it trains
    seed: int
    resume: bool = False        # an interrupted run with a checkpoint: continue it
    threads: int | None = None  # train.threads for the run (None: cnnlab's default)
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the process (a tune's trial link)
    # for the planner, not the executor:
    expected: dict = field(default_factory=dict)       # resolved config incl. the seed, to check a finished run
    needs: list[Path] = field(default_factory=list)    # run folders (pretrain) that must finish first
    ref_keys: set[str] = field(default_factory=set)    # keys holding @pretrain paths (may move with the folder)

    @property
    def log(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".log")

    @property
    def failed_file(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".failed.json")


@dataclass
class RunOutcome:
    request: RunRequest
    exit_code: int | None   # the process's exit status (None: it never ran)
    seconds: float          # wall time of the process
    error: str = ""         # the tail of its stderr

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and is_finished(self.request.run_dir)


def train_command(req: RunRequest) -> tuple[list[str], dict[str, str]]:
    """The `cnnlab train` command line and the environment variables (beyond the inherited ones) of a run."""
    if req.resume:  # interrupted earlier: go on from its checkpoint
        cmd = [sys.executable, "-m", "cnnlab", "train", "--resume", str(req.run_dir)]
    else:
        cmd = [sys.executable, "-m", "cnnlab", "train", str(req.config_file), f"train.seed={req.seed}"]
    env = dict(req.env)
    if req.threads:
        cmd.append(f"train.threads={req.threads}")
        env.update(OMP_NUM_THREADS=str(req.threads), MKL_NUM_THREADS=str(req.threads))
    if not req.resume:
        cmd += ["--out", str(req.run_dir)]
    cmd += ["--progress", "plain", "--no-report"]  # the study's report writes every run's page
    return cmd, env


def run_process(req: RunRequest, extra_env: dict | None = None) -> RunOutcome:
    """Run one request as a child process here; its stdout (and stderr) go to the run's .log file."""
    cmd, env = train_command(req)
    env = child_env({**os.environ, **env, **(extra_env or {})})  # the child stops cleanly if we die
    t0 = time.perf_counter()
    with open(req.log, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
        if proc.stderr:
            log.write(proc.stderr)
    lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    return RunOutcome(req, proc.returncode, time.perf_counter() - t0, "\n".join(lines[-15:])[-2000:])


class Executor(ABC):
    """Runs requests, each a fresh `cnnlab train` process, and yields each outcome as it ends."""

    name = "executor"
    jobs = 1  # runs at once

    @abstractmethod
    def run(self, requests: Iterable[RunRequest],
            started: Callable[[RunRequest], None] = lambda r: None) -> Iterator[RunOutcome]:
        """Run every request (none depends on another), calling `started` as each begins.

        `requests` is read lazily, one request when a slot is free: a tune passes a generator that asks its
        sampler for the next trial only then, after the outcomes already yielded were told to it."""


class LocalExecutor(Executor):
    """Child processes of this one, `jobs` at a time (threads wait on them; the processes do the work)."""

    name = "local"

    def __init__(self, jobs: int = 1):
        if not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"--jobs must be a positive integer; got {jobs!r}")
        self.jobs = jobs

    def run(self, requests: Iterable[RunRequest],
            started: Callable[[RunRequest], None] = lambda r: None) -> Iterator[RunOutcome]:
        pending, running, more = iter(requests), {}, True
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            while True:
                while more and len(running) < self.jobs:
                    req = next(pending, None)
                    if req is None:
                        more = False
                        break
                    running[pool.submit(run_process, req)] = req
                    started(req)
                if not running:
                    return
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    del running[fut]
                    yield fut.result()
