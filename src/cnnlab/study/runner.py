"""Running a study: load → plan → execute (pretrain first, then the variants) → aggregate → report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import find_recipe
from ..hardware import cores_each
from ..report.tables import render_markdown
from ..runs import read_json
from ..tracking import track_study
from .aggregate import aggregate
from .executors import Executor, LocalExecutor, RunOutcome, RunRequest
from .plan import make_plan, prepare_folder
from .spec import StudyError, load_study


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """The study's progress lines ([k/N] start / done / FAILED, with an ETA) and its failure records."""

    def __init__(self, total: int, done: int, jobs: int, log):
        self.total, self.done, self.jobs, self.log = total, done, jobs, log
        self.width, self.t0, self.seconds, self.left = len(str(total)), time.perf_counter(), [], 0
        self.failed: dict[Path, str] = {}

    def started(self, req: RunRequest) -> None:
        self.log(f"[{self.done:>{self.width}}/{self.total}] start  {req.label}")

    def fail(self, req: RunRequest, code: int | None, error: str, line: str) -> None:
        self.failed[req.run_dir] = error
        req.failed_file.write_text(json.dumps({"exit_code": code, "error": error}, indent=2) + "\n",
                                   encoding="utf-8")
        self.log(f"[{self.done:>{self.width}}/{self.total}] FAILED {req.label}{line}")

    def finished(self, out: RunOutcome) -> None:
        self.done += 1
        self.left -= 1
        self.seconds.append(out.seconds)
        req = out.request
        if out.ok:
            m = read_json(req.run_dir / "metrics.json")
            eta = (f", about {_fmt_time(sum(self.seconds) / len(self.seconds) * self.left / self.jobs)} left"
                   if self.left else "")
            self.log(f"[{self.done:>{self.width}}/{self.total}] done   {req.label} in {out.seconds:.1f} s: accuracy "
                     f"{m['accuracy']:.4f} (elapsed {_fmt_time(time.perf_counter() - self.t0)}{eta})")
        else:
            error = out.error or f"exit code {out.exit_code} without metrics.json"
            last = error.strip().splitlines()[-1] if error.strip() else ""
            self.fail(req, out.exit_code, f"exit code {out.exit_code}: {error}",
                      f" after {out.seconds:.1f} s (exit {out.exit_code}): {last[:200]} — see {req.log}")


def execute(todo: list[RunRequest], total: int, executor: Executor, log=print) -> dict[Path, str]:
    """Run `todo` through `executor`: the pretrain runs first, then every run whose pretrain runs finished
    (the others are recorded as failed without running). Returns {run_dir: error} of the failures."""
    progress = _Progress(total, total - len(todo), executor.jobs, log)
    progress.left = len(todo)
    pretrain_dirs = {d for r in todo for d in r.needs}
    stages = [[r for r in todo if r.run_dir in pretrain_dirs], [r for r in todo if r.run_dir not in pretrain_dirs]]
    for stage in stages:
        runnable = []
        for req in stage:
            broken = [d for d in req.needs if d in progress.failed]
            if broken:
                progress.done += 1
                progress.left -= 1
                progress.fail(req, None, f"not run: pretrain run {broken[0].name} failed",
                              f": pretrain run {broken[0].name} failed")
            else:
                runnable.append(req)
        for outcome in executor.run(runnable, progress.started):
            progress.finished(outcome)
    return progress.failed


def run_study(study_path: str | Path, jobs: int = 1, out: str | Path | None = None, quiet: bool = False,
              executor: Executor | None = None, overrides: list[str] | dict | None = None) -> Path:
    """Run every (variant, seed) of a study not yet finished, then aggregate; returns the study folder.

    jobs: runs at once, each in its own process (the local executor's). out: the study folder (default
    studies/<file stem>). executor: where the runs go (default: LocalExecutor(jobs)). overrides: key=value
    settings applied to every run (the command line's), e.g. ["data.source=folder:~/photos"].
    Writes summary.json, table.md/.csv/.tex and report.html.
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise StudyError(f"--jobs must be a positive integer; got {jobs!r}")
    executor = executor or LocalExecutor(jobs)
    log = (lambda *a, **k: None) if quiet else (lambda msg: print(msg, flush=True))
    study = load_study(study_path, overrides)  # validates everything before any work
    study_dir = Path(out) if out is not None else Path("studies") / Path(study_path).stem
    study_dir.mkdir(parents=True, exist_ok=True)
    study_dir = study_dir.resolve()
    plan = make_plan(study, study_dir)
    todo = prepare_folder(plan, Path(study_path))
    user_threads = "train.threads" in study["overrides"] or any(
        "train.threads" in v["settings"] for v in study["variants"] + study["pretrain"])
    threads = None if user_threads else cores_each(executor.jobs)
    for req in todo:
        req.threads = threads
    n = len(plan.requests)
    log(f"study {study['name']}: {len(study['variants'])} variant(s) × {len(study['seeds'])} seed(s)"
        + (f" + {len(study['pretrain'])} pretrain run(s)" if study["pretrain"] else "")
        + f" = {n} runs; {n - len(todo)} already finished; {len(todo)} to run, "
        f"{executor.jobs} at a time" + (f" with {threads} thread(s) each" if threads else "") + f" → {study_dir}")
    t0 = time.perf_counter()
    failed = execute(todo, n, executor, log)
    if todo:
        log(f"{len(todo) - len(failed)} run(s) finished, {len(failed)} failed in {_fmt_time(time.perf_counter() - t0)}")

    summary = aggregate(study_dir)
    log("")
    log(render_markdown(summary))
    for s in [c["sentence"] for c in summary["comparisons"]] + [c["sentence"] for c in summary["chance"]]:
        log("- " + s)
    if summary.get("selection_note"):
        log("- note: " + summary["selection_note"])
    from ..report import write_report

    log(f"report: {write_report(study_dir)}")
    track_study(study_dir, log)  # optional MLflow / TensorBoard outputs when the runs' config asks: never fails it
    log(f"study folder: {study_dir}")
    return study_dir


def resolve_study(arg: str) -> Path:
    """A study file's path, or a bare recipe name found in ./recipes."""
    path = find_recipe(arg)
    if path is None:
        raise StudyError(f"study file not found: {arg}")
    return path


def failed_runs(study_dir: Path) -> int:
    """How many runs of an aggregated study did not finish."""
    summary = read_json(study_dir / "summary.json")
    return sum(len(v["failed"]) for v in summary["variants"]) + sum(1 for p in summary["pretrain"] if p["failed"])
