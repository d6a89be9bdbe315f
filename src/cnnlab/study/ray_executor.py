"""RayExecutor: a study's (or a tune's) runs as Ray tasks on a cluster, each still a fresh `cnnlab train` process.

    cnnlab compare STUDY.yaml --executor ray --address HEAD:6379 --cpus-per-run 4
    cnnlab tune TUNE.yaml --executor ray --address HEAD:6379

Each RunRequest becomes one Ray task reserving `cpus_per_run` CPUs (and `gpus_per_run` GPUs); the task runs
`executors.run_process` on whichever node Ray picks, i.e. `python -m cnnlab train …` as a child of the Ray
worker, writing the ordinary run folder (and its .log) at the request's path. So, on a cluster of several
machines:

- the study / tune folder must be on storage every node sees at the same path (NFS, a cluster file system):
  the runs write there and this process reads their metrics.json there; the run's data (data.source) must be
  readable at the same path on every node too;
- every node needs cnnlab installed, in the Python environment its `ray start` runs from (the task runs
  `sys.executable -m cnnlab` on the worker, and Ray unpickles this module there);
- run `cnnlab compare/tune` on a node of the cluster (the head, usually): `--address` is the head's
  GCS address (HOST:PORT as `ray start --head` prints it, or `auto`);
- a cluster with Ray's token authentication (recent Ray turns it on for `ray start` when ~/.ray/auth_token
  exists, and makes that file for a local `ray.init()`): with an explicit address, Ray sends the token only when
  RAY_AUTH_MODE=token is set in this process's environment (the token: ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH
  or RAY_AUTH_TOKEN).

Failures:
- a worker process or a node lost while a run is under way (a system failure): Ray runs the task again, up to
  `max_retries` times (the task's `max_retries`); it resumes the run folder from its checkpoint where there is one,
  starts it again where there is none, and takes a folder already finished as it is;
- a run that ends with a non-zero exit code (bad config, missing data, diverged training, a crash of its own
  such as SIGSEGV/SIGABRT) is not retried: its outcome is yielded and the caller records it as failed, as with the
  local executor;
- except a run killed from outside: an exit code < 0 from a signal other than the crash signals (SIGKILL from the
  kernel's out-of-memory killer, SIGTERM/SIGINT/SIGHUP/SIGQUIT…), 137 / 143 (128 + SIGKILL / SIGTERM, from a
  shell) and 130 (cnnlab train's clean stop on SIGTERM/SIGINT, with a checkpoint). It is submitted again (it
  resumes from its checkpoint where there is one) up to `max_retries` times; after that its failed outcome is
  yielded;
- Ctrl-C (KeyboardInterrupt) in this process — or the caller abandoning `run` — cancels the tasks in flight
  (`ray.cancel(force=True)`: the worker goes, its `cnnlab train` child gets SIGTERM and stops at the next step
  with a checkpoint, so running the same command again resumes it) and re-raises.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator

from ..runs import is_finished, training_pid
from .executors import Executor, RunOutcome, RunRequest, run_process

# signals a process raises itself when it crashes: a bug, not something done to it
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
RELEASE_WAIT = 120.0  # seconds a retried task waits for the previous attempt's process to let go of its folder


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached."""


def _ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable("the Ray executor needs Ray: pip install 'cnnlab[ray]'") from None
    return ray


def check_address(address: str, timeout: float = 10.0) -> None:
    """Fail fast when nothing listens at a HOST:PORT address (Ray itself keeps trying for many minutes)."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"--address {address!r}: expected HOST:PORT (the head's, as `ray start --head` "
                             "prints it) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayUnavailable(f"cannot connect to the Ray cluster at {address}: {e.strerror or e} (is `ray start "
                             f"--head --port {port}` running on {host}?)") from None


def killed_from_outside(exit_code: int | None) -> bool:
    """Whether a run's exit code says its process was stopped from outside (and is worth running again)."""
    if exit_code is None:
        return False
    if exit_code < 0:
        return -exit_code not in _CRASH_SIGNALS
    return exit_code in (128 + signal.SIGKILL, 128 + signal.SIGTERM, 130)


def _run_task(req: RunRequest, cwd: str | None = None) -> tuple[RunOutcome, str]:
    """The Ray task (on a worker): run one request as a `cnnlab train` child; returns its outcome and this host.

    Ray may run it again after a lost worker (and the driver after a run killed from outside): the run folder
    the earlier attempt left is resumed from its checkpoint, started again without one, or taken as it is
    when finished. `cwd`: the driver's working folder, where relative paths in a config point (when it exists
    here)."""
    host = socket.gethostname()
    run_dir = req.run_dir
    t0 = time.monotonic()
    while run_dir.exists() and training_pid(run_dir) is not None:  # the earlier attempt still checkpointing
        if time.monotonic() - t0 > RELEASE_WAIT:
            return RunOutcome(req, None, time.monotonic() - t0, f"{run_dir} is still held by pid "
                              f"{training_pid(run_dir)} (an earlier attempt of this run?)"), host
        time.sleep(0.5)
    if is_finished(run_dir):  # an earlier attempt finished it, then its worker was lost
        return RunOutcome(req, 0, 0.0), host
    if run_dir.exists() and not req.resume:  # what an earlier attempt left
        req.resume = (run_dir / "checkpoint.safetensors").is_file() and (run_dir / "config.yaml").is_file()
        if not req.resume:
            shutil.rmtree(run_dir)
    here = None
    if cwd and os.path.isdir(cwd):
        here = os.getcwd()
        os.chdir(cwd)
    try:
        return run_process(req), host
    finally:
        if here is not None:
            os.chdir(here)


class RayExecutor(Executor):
    """Runs each request as a Ray task (a fresh `cnnlab train` process on a worker node), `jobs` at a time.

    address: the cluster's address (HOST:PORT of the head's GCS, or "auto"); None starts a local Ray here.
    cpus_per_run / gpus_per_run: the resources Ray reserves for each run; each run also gets
      train.threads = cpus_per_run (at least 1) unless its config sets train.threads itself.
    max_retries: how often a run is tried again after a lost worker / node (Ray's task retries) and, separately,
      after its process was killed from outside (see killed_from_outside); other failures are never retried.
    jobs: runs in flight at once (default: the cluster's CPUs // cpus_per_run — and GPUs // gpus_per_run —
      when first asked, at least 1; give it for a cluster that grows later).

    The run folders must be on storage shared by every node, at the same path; every node needs cnnlab installed
    (see the module's docstring).
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_run: float = 1, gpus_per_run: float = 0,
                 max_retries: int = 2, jobs: int | None = None):
        if isinstance(cpus_per_run, bool) or not isinstance(cpus_per_run, (int, float)) or not cpus_per_run > 0:
            raise ValueError(f"--cpus-per-run must be a positive number; got {cpus_per_run!r}")
        if isinstance(gpus_per_run, bool) or not isinstance(gpus_per_run, (int, float)) or not gpus_per_run >= 0:
            raise ValueError(f"gpus_per_run must be a number ≥ 0; got {gpus_per_run!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer ≥ 0; got {max_retries!r}")
        if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
            raise ValueError(f"--jobs must be a positive integer; got {jobs!r}")
        self.address, self.cpus_per_run, self.gpus_per_run = address, cpus_per_run, gpus_per_run
        self.max_retries, self._jobs, self._started_ray = max_retries, jobs, False

    # ------------------------------------------------------------------ the cluster
    def connect(self):
        """Connect to the cluster (or start a local Ray) once; returns the `ray` module."""
        ray = _ray()
        if not ray.is_initialized():
            try:
                if self.address:
                    check_address(self.address)
                    ray.init(address=self.address)
                else:
                    ray.init(address=None, include_dashboard=False)
            except RayUnavailable:
                raise
            except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
                hint = ""
                if self.address and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
                    hint = (" (a cluster with token authentication needs RAY_AUTH_MODE=token here too, and its "
                            "token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)")
                raise RayUnavailable(f"cannot connect to {where}: {e}{hint}") from None
            self._started_ray = True
        return ray

    def close(self) -> None:
        """Disconnect from the cluster (a local Ray started here stops)."""
        if self._started_ray:
            _ray().shutdown()
            self._started_ray = False

    @property
    def jobs(self) -> int:
        if self._jobs is None:
            resources = self.connect().cluster_resources()
            n = int(resources.get("CPU", 0) // self.cpus_per_run)
            if self.gpus_per_run:
                n = min(n, int(resources.get("GPU", 0) // self.gpus_per_run))
            self._jobs = max(1, n)
        return self._jobs

    # ------------------------------------------------------------------ running
    def threads(self, req: RunRequest) -> int | None:
        """train.threads of a run: its config's own setting, else the CPUs Ray reserves for it (the caller's
        value was worked out from this machine's cores, not the node's share)."""
        if ((req.expected or {}).get("train") or {}).get("threads") is not None:
            return req.threads
        return max(1, int(self.cpus_per_run))

    def run(self, requests: Iterable[RunRequest],
            started: Callable[[RunRequest], None] = lambda r: None) -> Iterator[RunOutcome]:
        ray = self.connect()
        task = ray.remote(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run, max_retries=self.max_retries,
                          retry_exceptions=False)(_run_task)
        cwd, jobs = os.getcwd(), self.jobs

        def submit(req: RunRequest):
            return task.options(name=f"cnnlab {req.label}").remote(req, cwd), time.perf_counter()

        pending, more = iter(requests), True
        running: dict = {}  # ObjectRef → (request, times killed so far, submit time)
        try:
            while True:
                while more and len(running) < jobs:
                    req = next(pending, None)
                    if req is None:
                        more = False
                        break
                    req.threads = self.threads(req)
                    ref, t0 = submit(req)
                    running[ref] = (req, 0, t0)
                    started(req)
                if not running:
                    return
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)  # 1 s: Ctrl-C stays prompt
                if not ready:
                    continue
                req, kills, t0 = running.pop(ready[0])
                out, host = self._outcome(ray, ready[0], req, t0)
                if killed_from_outside(out.exit_code) and kills < self.max_retries:
                    print(f"ray: {req.label} was stopped from outside (exit code {out.exit_code}"
                          f"{' on ' + host if host else ''}): running it again ({kills + 1} of {self.max_retries})",
                          file=sys.stderr, flush=True)
                    req.resume = False  # the task decides from what the killed attempt left
                    ref, t0 = submit(req)
                    running[ref] = (req, kills + 1, t0)
                    continue
                yield out
        except BaseException:  # Ctrl-C, the caller stopping early, the request generator failing
            for ref in running:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # finished meanwhile, or the cluster is gone
                    pass
            raise

    @staticmethod
    def _outcome(ray, ref, req: RunRequest, t0: float) -> tuple[RunOutcome, str]:
        """The outcome of a finished task, with the caller's request; a task that failed as a Ray task (its
        worker or node lost after every retry, an exception) is a failed outcome without an exit code."""
        try:
            out, host = ray.get(ref)
        except ray.exceptions.RayError as e:
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            return RunOutcome(req, None, time.perf_counter() - t0,
                              f"the Ray task failed ({type(e).__name__}): " + "\n".join(lines[-15:])[-2000:]), ""
        return RunOutcome(req, out.exit_code, out.seconds, out.error), host
