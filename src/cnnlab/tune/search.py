"""The search: Optuna asks, the study engine's executor trains each trial as an ordinary run, the run answers.

Every trial is a `cnnlab train` process writing TUNE_DIR/trials/trial-NNNN/ (config, history, model, metrics on
the validation split — the test split is withheld from every trial), started through the same Executor
interface as a study's runs; its per-epoch validation figures reach the pruner from inside the process
(tune.trial). The loop hands the executor a generator that asks Optuna for a trial only when a slot is free,
after every outcome so far has been told, so one worker with a seeded sampler repeats its trial sequence.

Crash safety, with several workers (processes, machines) on one storage:
- a trial's worker (host, pid, process start) and a heartbeat are recorded on it; a RUNNING trial whose worker
  is gone (same host: the process no longer exists; elsewhere: no heartbeat for STALE_AFTER s) is marked
  superseded and failed, and its parameters are queued again with the same run folder — the rerun resumes
  that folder from its checkpoint, or starts it again;
- the budget counts the trials that are not superseded, in trial-number order, so racing workers never make
  more than `trials` of them (one that overshoots is superseded at once, before any training);
- a failed trial (diverged, crashed, config refused) is recorded as FAIL with its reason, never as a score.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, load_config, config_differences, RESULT_NEUTRAL
from ..fileio import atomic_write_text
from ..runs import is_finished, read_history, read_json, training_pid
from ..study.executors import Executor, RunOutcome, RunRequest
from .spec import OBJECTIVES, Param, TuneError, TuneSpec
from .storage import StorageError, open_storage, shown
from .trial import TRIAL_ENV, best_so_far, make_pruner

WORKER, HEARTBEAT, SUPERSEDED = "cnnlab:worker", "cnnlab:heartbeat", "cnnlab:superseded"
RUN, RETRY_OF, FAIL_REASON = "run", "retry_of", "fail_reason"
SPEC_ATTR = "cnnlab:spec"
HEARTBEAT_EVERY, STALE_AFTER = 15.0, 120.0
WAIT_POLL = 2.0  # seconds between looks at other workers' trials, once this worker has none left


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (/proc), to tell a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_worker() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def worker_gone(worker: dict | None, heartbeat: float | None, now: float, stale_after: float = STALE_AFTER) -> str | None:
    """Why a RUNNING trial's worker is gone (None: it may still be working)."""
    if worker and worker.get("host") == socket.gethostname():
        pid = worker.get("pid")
        try:
            os.kill(int(pid), 0)
            alive = worker.get("start") is None or _start_time(int(pid)) == worker.get("start")
        except (OSError, ValueError, TypeError):
            alive = False
        return None if alive else f"its worker (pid {pid} on this host) is gone"
    if heartbeat is not None and now - heartbeat > stale_after:
        return f"no heartbeat from its worker {worker.get('host') if worker else '?'} for {now - heartbeat:.0f} s"
    return None


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial `number`: a function of the tune's seed and the trial's number (unique in the
    storage), so one worker repeats its sequence, and a rerun or a second worker never redraws the first trials'
    values (a sampler seeded once per process would start its sequence again)."""
    return (seed * 1_000_003 + number * 7919 + 1) % 2**32


def make_sampler(spec: TuneSpec, seed: int | None = None):
    import optuna

    s = spec.sampler
    seed = s["seed"] if seed is None else seed
    if s["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s["name"] == "qmc":  # its sequence position lives in the storage: one seed for the whole tune
        return optuna.samplers.QMCSampler(seed=s["seed"], scramble=True, warn_independent_sampling=False)
    # several trials at once (here or in other workers): constant liar keeps TPE from proposing the same
    # point to each of them
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def _identity(spec: TuneSpec) -> dict:
    """What must match for a rerun (or another worker) to continue a tune: not its name, budget or seeds."""
    d = spec.to_json()
    return {k: d[k] for k in ("space", "objective", "direction", "sampler", "pruner")} | {
        "base_config": {**spec.base_config, "name": None}}


def open_study(spec: TuneSpec, storage_url: str, jobs: int = 1):
    """Create the tune's Optuna study, or load it and check it is the same search; returns (the study, its
    storage, the study's id there) — Optuna's public storage API, not the study's private fields."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for attempt in range(5):  # workers started together race to create the database's tables: try again
        try:
            storage = open_storage(storage_url)
            study = optuna.create_study(study_name=spec.name, storage=storage,
                                        sampler=make_sampler(spec), pruner=make_pruner(spec.pruner),
                                        direction=spec.direction, load_if_exists=True)
            break
        except StorageError:
            raise
        except Exception as e:  # sqlalchemy's IntegrityError / ProgrammingError on a table made meanwhile
            if attempt == 4 or storage_url.startswith("journal:"):
                raise StorageError(f"--storage {shown(storage_url)}: cannot create the tune there: {e}") from None
            time.sleep(0.5 + attempt)
    mine = json.loads(json.dumps(_identity(spec)))
    sid = storage.get_study_id_from_name(spec.name)
    theirs = storage.get_study_system_attrs(sid).get(SPEC_ATTR)
    if theirs is None:
        storage.set_study_system_attr(sid, SPEC_ATTR, mine)
    elif theirs != mine:
        diffs = [k for k in mine if mine[k] != theirs.get(k)]
        detail = ""
        if "base_config" in diffs:
            changed = config_differences(load_config(theirs["base_config"] | {"name": "x"}),
                                         load_config(mine["base_config"] | {"name": "x"}), ignore=RESULT_NEUTRAL)
            detail = " (" + "; ".join(line for _, line in changed[:4]) + ")"
        raise TuneError(f"the tune {spec.name!r} in {shown(storage_url)} was started with another "
                        f"{', '.join(diffs)}{detail}; give this search another name or --out, or delete the old one")
    return study, storage, sid


def live_trials(study) -> list:
    """The trials that count toward the budget (not superseded), by number."""
    return [t for t in study.get_trials(deepcopy=False) if SUPERSEDED not in t.system_attrs]


def suggest(trial, space: list[Param]) -> dict:
    """The trial's parameters, asked in the space's order; a conditional one only when its condition holds."""
    params: dict = {}
    for p in space:
        if any(params.get(k) not in values for k, values in p.when.items()):
            continue
        if p.kind == "categorical":
            params[p.key] = trial.suggest_categorical(p.key, p.choices)
        elif p.kind == "int":
            params[p.key] = trial.suggest_int(p.key, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            params[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
    return params


@dataclass
class Search:
    """One worker of a tune: asks, runs through the executor, tells — until the budget is spent."""

    spec: TuneSpec
    tune_dir: Path
    storage_url: str
    executor: Executor
    log: callable = print
    stale_after: float = STALE_AFTER
    threads: int | None = None
    study: object = None
    storage: object = None
    study_id: int = -1
    me: dict = field(default_factory=this_worker)
    pending: dict = field(default_factory=dict)        # run_dir → optuna Trial, for the trials this worker runs
    counts: dict = field(default_factory=lambda: {"complete": 0, "pruned": 0, "failed": 0, "interrupted": 0})

    def __post_init__(self):
        self.study, self.storage, self.study_id = open_study(self.spec, self.storage_url, self.executor.jobs)
        self.metric_col, self.metric_key, _ = OBJECTIVES[self.spec.objective]
        self.maximize = self.spec.direction == "maximize"
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ storage helpers
    def trial_id(self, trial) -> int:
        """The storage's id of a trial (optuna Trial or FrozenTrial), from its number."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)

    def _supersede(self, trial_id: int, number: int, params: dict, user_attrs: dict, reason: str, requeue: bool) -> bool:
        """Fail a trial that must not count, and (requeue) queue its parameters again with its run folder.
        False when another worker settled it first."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        self.storage.set_trial_system_attr(trial_id, SUPERSEDED, reason)
        try:
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except (UpdateFinishedTrialError, RuntimeError):
            return False
        if requeue:
            self.study.enqueue_trial(params, user_attrs={RUN: user_attrs.get(RUN),
                                                         RETRY_OF: user_attrs.get(RETRY_OF, number)})
        return True

    def recover(self) -> int:
        """Queue again the trials whose worker is gone (killed, powered off); returns how many."""
        from optuna.trial import TrialState

        n, now = 0, time.time()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if SUPERSEDED in t.system_attrs or t.system_attrs.get(WORKER) == self.me:
                continue
            beat = t.system_attrs.get(HEARTBEAT, t.datetime_start.timestamp() if t.datetime_start else None)
            why = worker_gone(t.system_attrs.get(WORKER), beat, now, self.stale_after)
            if why and self._supersede(self.trial_id(t), t.number, t.params, t.user_attrs,
                                       f"interrupted: {why}; re-run with the same parameters", requeue=True):
                self.log(f"trial {t.number} was interrupted ({why}): queued again with the same parameters"
                         + (f", resuming {t.user_attrs[RUN]}" if t.user_attrs.get(RUN) else ""))
                n += 1
        return n

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_EVERY):
            with self.lock:
                trials = list(self.pending.values())
            for trial in trials:
                try:
                    self.storage.set_trial_system_attr(self.trial_id(trial), HEARTBEAT, time.time())
                except Exception:  # a finished trial, a storage hiccup: the next beat tries again
                    pass

    # ------------------------------------------------------------------ the loop
    def _request(self, trial, params: dict) -> RunRequest | None:
        rel = trial.user_attrs.get(RUN) or f"trials/trial-{trial.number:04d}"
        trial.set_user_attr(RUN, rel)
        run_dir = self.tune_dir / rel
        try:
            config = self.spec.trial_config(params)
        except ConfigError as e:
            self._fail(trial, f"config refused: {e}")
            return None
        config_file = run_dir.with_name(run_dir.name + ".yaml")
        config_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_file, json.dumps(config, indent=1) + "\n")  # JSON is YAML
        link = {"storage": self.storage_url, "study": self.spec.name, "trial_id": self.trial_id(trial),
                "objective": self.metric_col, "direction": self.spec.direction, "pruner": self.spec.pruner}
        req = RunRequest(f"trial {trial.number}", run_dir, config_file, config["train"]["seed"], threads=self.threads,
                         expected=config, env={TRIAL_ENV: json.dumps(link)})
        if run_dir.exists():  # a queued-again trial: resume its folder where the config still matches
            _wait_released(run_dir, self.log)
            same = (run_dir / "config.yaml").is_file() and not config_differences(
                load_config(run_dir / "config.yaml"), load_config(config), ignore=RESULT_NEUTRAL)
            req.resume = same and (run_dir / "checkpoint.safetensors").is_file()
            if same and is_finished(run_dir):
                req.resume = None  # nothing to train: its folder already holds the answer
            elif not req.resume:
                shutil.rmtree(run_dir)
        return req

    def _requests(self, deadline: float | None):
        from optuna.trial import TrialState

        while True:
            if deadline is not None and time.time() > deadline:
                self.log("time budget reached: no new trials (run the same command again to go on)")
                return
            live = live_trials(self.study)
            waiting = any(t.state == TrialState.WAITING for t in live)
            if not waiting and len(live) >= self.spec.trials:
                return
            trial = self.study.ask()
            tid = self.trial_id(trial)
            self.storage.set_trial_system_attr(tid, WORKER, self.me)
            self.storage.set_trial_system_attr(tid, HEARTBEAT, time.time())
            if RETRY_OF not in trial.user_attrs:
                rank = sum(1 for t in live_trials(self.study) if t.number <= trial.number)
                if rank > self.spec.trials:  # another worker took the last slot meanwhile
                    self._supersede(tid, trial.number, {}, {}, "over budget (another worker took the "
                                    "last trial)", requeue=False)
                    return
            if self.spec.sampler["name"] != "qmc":  # values drawn from the trial's own seed (see trial_seed)
                self.study.sampler = make_sampler(self.spec, trial_seed(self.spec.sampler["seed"], trial.number))
            params = suggest(trial, self.spec.space)
            req = self._request(trial, params)
            if req is None:
                continue
            with self.lock:
                self.pending[req.run_dir] = trial
            if req.resume is None:  # finished before its worker died: read it
                self._settle(RunOutcome(req, 0, 0.0))
                continue
            yield req

    def _started(self, req: RunRequest) -> None:
        trial = self.pending[req.run_dir]
        what = "resume" if req.resume else "start "
        self.log(f"[{self._done()}/{self.spec.trials}] {what} trial {trial.number}: "
                 + ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items()))

    def _done(self) -> int:
        from optuna.trial import TrialState

        return sum(1 for t in live_trials(self.study) if t.state.is_finished() and t.state != TrialState.WAITING)

    def _fail(self, trial, reason: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr(FAIL_REASON, reason[:2000])
        self.study.tell(trial, state=TrialState.FAIL)
        self.counts["failed"] += 1
        self.log(f"[{self._done()}/{self.spec.trials}] FAILED trial {trial.number}: {reason.splitlines()[-1][:300]}")

    def _settle(self, out: RunOutcome) -> None:
        from optuna.trial import TrialState

        req = out.request
        with self.lock:
            trial = self.pending.pop(req.run_dir)
        if out.ok:
            m = read_json(req.run_dir / "metrics.json")
            history = read_history(req.run_dir / "history.csv")
            values = [row[self.metric_col] for row in history if row.get(self.metric_col) is not None]
            value = float(m[self.metric_key])
            steps = best_so_far(values, self.maximize)
            if not m.get("pruned"):  # epochs early stopping never ran are worth what the run kept
                steps += [value] * max(0, self.spec.base_config["train"]["epochs"] - len(steps))
            done = set(self.storage.get_trial(self.trial_id(trial)).intermediate_values)
            for epoch, v in enumerate(steps, start=1):
                if epoch not in done:
                    trial.report(float(v), epoch)
            trial.set_user_attr("epochs_run", len(history))
            trial.set_user_attr("seconds", round(out.seconds, 1))
            trial.set_user_attr("kept_epoch", m.get("best_epoch"))
            if m.get("pruned"):
                self.study.tell(trial, state=TrialState.PRUNED)
                self.counts["pruned"] += 1
                self.log(f"[{self._done()}/{self.spec.trials}] pruned trial {trial.number} after {len(history)} "
                         f"epoch(s) ({self.spec.objective} {value:.4f} kept)")
            else:
                self.study.tell(trial, value)
                self.counts["complete"] += 1
                best = self.study.best_trial
                self.log(f"[{self._done()}/{self.spec.trials}] done   trial {trial.number} in {out.seconds:.1f} s: "
                         f"{self.spec.objective} {value:.4f} (best so far {best.value:.4f}, trial {best.number})")
            return
        if out.exit_code in (130, -2, -15):  # stopped by Ctrl-C / SIGTERM: not the trial's fault
            self._supersede(self.trial_id(trial), trial.number, trial.params, trial.user_attrs,
                            "interrupted: its training was stopped; re-run with the same parameters", requeue=True)
            self.counts["interrupted"] += 1
            self.log(f"trial {trial.number} interrupted: queued again (its checkpoint is kept)")
            return
        failure = req.run_dir / "failure.json"
        reason = (read_json(failure).get("message") if failure.is_file() else None) or out.error or \
            f"exit code {out.exit_code} without metrics.json"
        self._fail(trial, ("diverged: " if failure.is_file() else f"exit code {out.exit_code}: ") + reason.strip())

    def run(self, timeout: float | None = None) -> dict:
        """Run trials until the budget (count, or this call's time) is spent and the search is settled: other
        workers' trials under way are waited for (and run here when their worker is gone), so every worker of a
        shared tune ends with the same settled search. Returns this worker's counts."""
        self.recover()
        deadline = time.time() + timeout if timeout else None
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(stop,), daemon=True)
        beat.start()
        try:
            while True:
                for outcome in self.executor.run(self._requests(deadline), self._started):
                    self._settle(outcome)
                if not self._wait_for_others(deadline):
                    break
        except BaseException:  # Ctrl-C, a crash: the trials under way are queued again for the next run
            for run_dir, trial in list(self.pending.items()):
                self._supersede(self.trial_id(trial), trial.number, trial.params, trial.user_attrs,
                                "interrupted: the tune stopped; re-run with the same parameters", requeue=True)
            raise
        finally:
            stop.set()
        return self.counts

    def _wait_for_others(self, deadline: float | None) -> bool:
        """After this worker's last trial, while other workers' trials are under way: wait, queueing again those
        whose worker is gone. True when a trial is queued for this worker to run; False when the search is
        settled or the time budget is spent."""
        from optuna.trial import TrialState

        told = None
        while deadline is None or time.time() < deadline:
            live = live_trials(self.study)
            if any(t.state == TrialState.WAITING for t in live):
                return True
            running = [t.number for t in live if t.state == TrialState.RUNNING]
            if not running:
                return False
            if running != told:
                self.log(f"waiting for trial{'s' * (len(running) > 1)} {', '.join(map(str, running))} of another "
                         "worker to finish …")
                told = running
            time.sleep(WAIT_POLL)
            self.recover()
        return False


def _wait_released(run_dir: Path, log, patience: float = 60.0) -> None:
    """A killed tune's trial process stops on its own (SIGTERM from the kernel, then a checkpoint): wait for it
    to let go of its run folder before resuming it."""
    t0 = time.time()
    while (pid := training_pid(run_dir)) is not None:
        if time.time() - t0 > patience:
            raise TuneError(f"{run_dir} is still held by pid {pid} (a training of it from an earlier run of this "
                            "tune?); stop it, then run the same command again")
        if time.time() - t0 < 0.3:
            log(f"waiting for pid {pid} to finish its checkpoint in {run_dir} …")
        time.sleep(0.25)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


