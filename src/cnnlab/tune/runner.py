"""Running a tune: load → search (until the budget is spent) → summary → re-validation → verdict → report."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..fileio import atomic_write_text
from ..study.executors import Executor, LocalExecutor
from ..study.runner import run_study
from .results import (FolderLock, importance, revalidation_study, top_trials, trial_rows, verdict,
                      write_best)
from ..hardware import cores_each
from .search import STALE_AFTER, Search, live_trials
from .spec import TuneError, load_tune
from ..tracking import track_tune
from .storage import check_url, journal_url, shown


def _search_complete(study, trials: int) -> bool:
    from optuna.trial import TrialState

    live = live_trials(study)
    return len(live) >= trials and all(t.state.is_finished() and t.state != TrialState.WAITING for t in live)


def write_summary(spec, study, tune_dir: Path, storage_url: str, reval: dict | None = None) -> dict:
    """summary.json from the storage as it is now. Workers sharing the tune folder write it one at a time, each
    reading the storage inside the lock, so the file never goes back to an older state than one written before
    (trials only settle); a write without a re-validation keeps the one in the file while the counts are the same."""
    with FolderLock(tune_dir, ".summary.lock", wait=True):
        rows = trial_rows(study)
        counted = [r for r in rows if r["state"] != "superseded"]
        done = [r for r in counted if r["state"] == "complete"]
        best = top_trials(rows, spec, 1)
        counts = {s: sum(1 for r in counted if r["state"] == s) for s in ("complete", "pruned", "fail", "running",
                                                                          "waiting")}
        path = tune_dir / "summary.json"
        if reval is None and path.is_file():
            try:
                before = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                before = {}
            if before.get("counts") == counts and before.get("trials_asked") == spec.trials:
                reval = before.get("revalidation")
        summary = {"name": spec.name, "spec": spec.to_json(), "storage": shown(storage_url),
                   "trials_asked": spec.trials, "counts": counts,
                   "best_trial": best[0] if best else None,
                   "importance": importance(study) if len(done) >= 3 else None,
                   "trials": rows, "revalidation": reval}
        atomic_write_text(path, json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def run_tune(tune_path: str | Path, *, trials: int | None = None, jobs: int = 1, storage: str | None = None,
             out: str | Path | None = None, timeout=None, executor: Executor | None = None, revalidate: bool = True,
             quiet: bool = False, stale_after: float = STALE_AFTER) -> Path:
    """Run (or continue) a tune; returns its folder (default tunes/<name>).

    trials / timeout: the budget (over the file's); jobs: trials at once on this worker; storage: an Optuna
    storage URL (default journal:TUNE_DIR/optuna.journal; postgresql://… to share the tune between machines).
    Kill it at any moment and run it again: finished trials are kept, interrupted ones re-run with the same
    parameters. When every trial is settled, the best few are re-validated (unless revalidate=False).
    """
    log = (lambda *a, **k: None) if quiet else (lambda msg: print(msg, flush=True))
    if not isinstance(jobs, int) or jobs < 1:
        raise TuneError(f"--jobs must be a positive integer; got {jobs!r}")
    spec = load_tune(tune_path, trials=trials, timeout=timeout)  # every check before any work
    tune_dir = Path(out) if out is not None else Path("tunes") / spec.name
    tune_dir.mkdir(parents=True, exist_ok=True)
    tune_dir = tune_dir.resolve()
    storage_url = check_url(storage) if storage else journal_url(tune_dir / "optuna.journal")
    if spec.path != (tune_dir / "tune.yaml"):
        shutil.copyfile(spec.path, tune_dir / "tune.yaml")
    atomic_write_text(tune_dir / "tune.json", json.dumps({**spec.to_json(), "storage": shown(storage_url)},
                                                         indent=1, default=str) + "\n")
    executor = executor or LocalExecutor(jobs)
    search = Search(spec, tune_dir, storage_url, executor, log, stale_after=stale_after,
                    threads=None if "train.threads" in spec.overrides else cores_each(executor.jobs))
    before = len([t for t in live_trials(search.study) if t.state.is_finished()])
    log(f"tune {spec.name}: {spec.trials} trials ({before} settled already), {executor.jobs} at a time; "
        f"{spec.sampler['name']} sampler (seed {spec.sampler['seed']}), {spec.pruner['name']} pruner; objective "
        f"{spec.objective} ({spec.direction}) on the validation split; storage {shown(storage_url)} → {tune_dir}")
    for p in spec.space:
        log(f"  {p.key}: {p.describe()}")
    t0 = time.perf_counter()
    search.run(spec.timeout)
    study = search.study
    summary = write_summary(spec, study, tune_dir, storage_url)
    c = summary["counts"]
    log(f"search: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed of {spec.trials} "
        f"in {time.perf_counter() - t0:.0f} s")
    if summary["best_trial"]:
        b = summary["best_trial"]
        log(f"best trial {b['number']}: {spec.objective} {b['value']:.4f} with "
            + ", ".join(f"{k}={v}" for k, v in b["params"].items()))
    reval = None
    if not _search_complete(study, spec.trials):
        log("the search is not complete (time budget, or other workers still running): run the same command "
            "again to go on; re-validation comes when every trial is settled")
    elif spec.revalidate and revalidate:
        reval = _revalidate(spec, study, tune_dir, executor, log)
        summary = write_summary(spec, study, tune_dir, storage_url, reval)
    from .report import write_tune_report

    log(f"report: {write_tune_report(tune_dir)}")
    track_tune(tune_dir, log)  # optional MLflow / TensorBoard outputs when the trials' config asks: never fails it
    log(f"tune folder: {tune_dir}")
    return tune_dir


def _revalidate(spec, study, tune_dir: Path, executor: Executor, log) -> dict | None:
    top = top_trials(trial_rows(study), spec, spec.revalidate["top"])
    if not top:
        log("no trial completed: nothing to re-validate")
        return None
    with FolderLock(tune_dir, ".revalidate.lock") as mine:
        if not mine:
            log("another worker is re-validating this tune; its report will have the verdict")
            return None
        log(f"re-validation: the base and the best {len(top)} trial(s) on fresh seeds "
            f"{spec.revalidate['seeds']}, each compared with the base on the test split")
        study_file = revalidation_study(spec, top, tune_dir)
        study_dir = run_study(study_file, out=tune_dir / "revalidate", executor=executor)
        from ..runs import read_json

        summary = read_json(study_dir / "summary.json")
        result = verdict(spec, summary, study_dir)
        if result.get("winner"):
            result["best_yaml"] = str(write_best(spec, tune_dir, study_dir, result["winner"]))
        log("")
        log(result["sentence"])
        if result.get("best_yaml"):
            log(f"best config: {result['best_yaml']}")
        return result
