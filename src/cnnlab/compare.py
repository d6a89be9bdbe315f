"""Studies: a base config × (grid and/or named variants) × seeds → one run folder each → table and tests.

A study file (YAML):

    name: my-study                  # optional; default: the file's stem
    base: alkhairi2023-cnn.yaml     # a run config; relative paths are relative to the study file
    overrides: {train.epochs: 50}   # applied to every run
    grid: {optim.name: [adam, rmsprop, sgd], data.augment: [off, on]}   # every combination
    variants:                       # and/or named variants, each setting several keys
      cnn-adam: {model.name: alkhairi-cnn, optim.name: adam, optim.lr: 0.001}
      mlp-sgd:  {base: alkhairi2023-mlp.yaml}          # a variant may bring its own base config
      tuned:    {model.weights: "@pretrain/other"}     # the best weights of a pretrain run
    pretrain:                       # runs made first, once, with the first seed
      other: {data.source: animal-shapes, data.classes: [bear, bird, dog, giraffe, zebra]}
    seeds: [0, 1, 2]                # default [0]

Semantics
- Precedence, lowest first: base config < overrides < grid values < variant settings. Keys are
  dotted config keys; a section written as a mapping ({train: {epochs: 5}}) means its dotted keys.
- grid only: one variant per combination, named from its values: a string value stands for itself,
  other values are "<last key part>-<value>" (`{optim.name: [adam], data.augment: [on]}` →
  "adam-augment-on"); if two combinations would get the same name, every name spells out
  key=value. variants only: one variant each. Both: every variant is crossed with every grid
  combination, named "<variant>-<combination>"; a key may not be both a grid axis and set by a
  variant. Neither: a single variant named "base".
- pretrain: named runs on base + overrides + their settings, trained before everything else with
  the first seed; a setting whose value is "@pretrain/<name>" is replaced by the path of that
  run's model.safetensors (its best weights). Variants that use it wait for it, and fail
  (recorded) if it fails.
- Every expanded config is validated with `cnnlab.config.load_config` before anything runs, so a
  typo fails at once, naming the variant.

The study folder (default studies/<study file stem>):

    study.yaml  plan.json                the study as given, and as expanded (read by `aggregate`)
    runs/<variant>/variant.yaml          the resolved config shared by the variant's seeds
    runs/<variant>/seed-<k>/             a normal run folder (`cnnlab train … --out`)
    runs/<variant>/seed-<k>.log          that run's console output (+ seed-<k>.failed.json if it failed)
    pretrain/<name>/ (+ <name>.yaml, <name>.log)
    summary.json  table.md  table.csv  table.tex  (+ what cnnlab.report writes)

Execution: each run is `python -m cnnlab train` in its own process (no memory creeps from run to
run), `jobs` at a time, each with train.threads = max(1, cores // jobs) unless the study sets it.
A run is finished when its metrics.json and model.safetensors exist; finished runs are skipped on
a rerun, but only if their config.yaml still matches the study (otherwise the study stops and
says which keys differ: results are never silently stale). An interrupted run with a checkpoint
is resumed exactly where it stopped (`cnnlab train --resume`); one without a checkpoint is removed
and run again. A failed run is recorded and the study goes on.

Statistics (see cnnlab.stats): per metric, mean ± sample sd with a 95 % t-interval over the seeds
(none for a single seed). Each variant is compared with the best (highest mean accuracy) on the
seeds both completed: the exact McNemar test on the per-image correctness of the same test
images, POOLED over those seeds (b and c summed; more power than one seed, but the pairs of
different seeds share images, so treat it as a test over images × seeds), and the paired t-test
of the per-seed accuracies (seed-to-seed variation; needs ≥ 2 seeds). The difference is the mean
accuracy difference over the same shared seeds, in points. The chance check uses each run's
metrics.json: accuracy against max(majority-class rate, 1/classes), exact one-sided binomial
test; a variant reports its largest (least significant) p over its seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import yaml

from . import stats
from .config import (RESULT_NEUTRAL, ConfigError, config_differences, dotted, find_recipe, load_config,
                     read_yaml)
from .proc import child_env
from .report.tables import render_markdown, write_tables  # the Markdown / CSV / LaTeX writers

STUDY_KEYS = ["name", "description", "base", "overrides", "grid", "variants", "pretrain", "seeds"]
SECTIONS = ["data", "model", "optim", "schedule", "regularization", "train"]
PRETRAIN_REF = "@pretrain/"
METRICS = ["accuracy", "loss", "best_epoch", "precision_macro", "recall_macro", "f1_macro", "training_seconds"]
# the possible range of each, to which a t-interval over few seeds is clipped
METRIC_BOUNDS = {"accuracy": (0.0, 1.0), "precision_macro": (0.0, 1.0), "recall_macro": (0.0, 1.0),
                 "f1_macro": (0.0, 1.0), "loss": (0.0, float("inf")), "best_epoch": (1.0, float("inf")),
                 "training_seconds": (0.0, float("inf"))}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


class StudyError(ConfigError):
    """A study file that cannot be run; the message names the key or variant and the fix."""


# --------------------------------------------------------------------------- expansion (pure)

def _flatten(settings: Any, where: str) -> dict:
    """{dotted key: value}; a section given as a mapping ({train: {epochs: 5}}) becomes dotted keys."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise StudyError(f"{where}: expected a mapping of dotted keys to values, e.g. "
                         f"{{optim.lr: 0.01}}; got {settings!r}")
    out = {}
    for k, v in settings.items():
        if not isinstance(k, str):
            raise StudyError(f"{where}: keys must be dotted config keys such as optim.lr; got {k!r}")
        if k in SECTIONS and isinstance(v, dict):
            out.update({f"{k}.{k2}": v2 for k2, v2 in v.items()})
        else:
            out[k] = v
    return out


def _token(key: str, value: Any) -> str:
    last = key.split(".")[-1]
    if isinstance(value, bool):
        return f"{last}-{'on' if value else 'off'}"
    if isinstance(value, str):
        return value
    if value is None:
        return f"{last}-none"
    if isinstance(value, (list, tuple)):
        return f"{last}-" + "x".join(str(v) for v in value)
    if isinstance(value, dict):
        return f"{last}-" + "-".join(f"{k}-{v}" for k, v in value.items())
    if isinstance(value, float):
        return f"{last}-{value:g}"
    return f"{last}-{value}"


def safe_name(text: str) -> str:
    """A folder-safe name: letters, digits and . _ + = - only."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-.") or "variant"


def grid_combinations(grid: dict | None) -> list[tuple[str, dict]]:
    """[(name, {key: value})] for every combination of the grid's axes (first axis slowest)."""
    grid = _flatten(grid, "grid")
    if not grid:
        return []
    for key, values in grid.items():
        if key == "base":
            raise StudyError("grid: 'base' cannot be a grid axis; give each base its own named variant")
        if not isinstance(values, list):
            raise StudyError(f"grid: axis {key} must be a list of values, e.g. {key}: [{values!r}]; "
                             "a single value belongs in overrides")
        if not values:
            raise StudyError(f"grid: axis {key} has no values")
    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())]
    names = ["-".join(safe_name(_token(k, v)) for k, v in c.items()) for c in combos]
    if len(set(names)) < len(names):  # e.g. the same string on two axes: spell out the keys
        names = ["_".join(safe_name(f"{k}={_token(k, v) if not isinstance(v, str) else v}") for k, v in c.items())
                 for c in combos]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise StudyError(f"grid: two combinations are both named {dup!r}; is a value repeated on an axis?")
    return list(zip(names, combos))


def expand_variants(grid: dict | None = None, variants: dict | None = None) -> list[tuple[str, dict]]:
    """[(variant name, settings)] of a grid and/or named variants (see the module docstring)."""
    combos = grid_combinations(grid)
    if variants is not None and not isinstance(variants, dict):
        raise StudyError(f"variants: expected a mapping of names to settings; got {variants!r}")
    named = []
    for name, settings in (variants or {}).items():
        name = str(name)
        if not _NAME_OK.match(name):
            raise StudyError(f"variant {name!r}: names become folder names; use letters, digits and . _ + = - "
                             "(starting with a letter or digit)")
        named.append((name, _flatten(settings, f"variant {name!r}")))
    if named and combos:
        out = []
        for vname, vset in named:
            clash = sorted(set(vset) & set(combos[0][1]))
            if clash:
                raise StudyError(f"variant {vname!r} sets {', '.join(clash)}, which is also a grid axis; "
                                 "remove it from one of the two")
            out += [(f"{vname}-{cname}", {**cset, **vset}) for cname, cset in combos]
    else:
        out = named or combos or [("base", {})]
    names = [n for n, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise StudyError(f"two variants are both named {dup!r}; rename one")
    return out


def _seeds(seeds: Any) -> list[int]:
    if seeds is None:
        return [0]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise StudyError(f"seeds: a non-empty list of non-negative integers, e.g. [0, 1, 2]; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds: {seeds} repeats a seed")
    return list(seeds)


def expand_study(study: dict) -> list[tuple[str, dict, int]]:
    """[(variant name, settings, seed)] of a study mapping (its grid, variants and seeds), variant-major."""
    return [(name, settings, seed) for name, settings in expand_variants(study.get("grid"), study.get("variants"))
            for seed in _seeds(study.get("seeds"))]


# --------------------------------------------------------------------------- loading and validation

def _check_keys(study: dict, path: Path) -> None:
    for k in study:
        if k not in STUDY_KEYS:
            close = difflib.get_close_matches(str(k), STUDY_KEYS, n=1)
            raise StudyError(f"{path}: unknown study key {k!r}; valid keys: {', '.join(STUDY_KEYS)}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))


def _overrides(value: Any) -> dict:
    if isinstance(value, list):  # ["optim.lr=0.01", …] as on the command line
        from .config import _split_override

        return dict(_split_override(str(v)) for v in value)
    return _flatten(value, "overrides")


def _refs(settings: dict) -> list[str]:
    """Pretrain names referenced as '@pretrain/<name>' by any setting value."""
    return [v[len(PRETRAIN_REF):] for v in settings.values() if isinstance(v, str) and v.startswith(PRETRAIN_REF)]


def _resolve_refs(obj: Any, study_dir: Path | None) -> Any:
    """Replace '@pretrain/<name>' strings by <study>/pretrain/<name>/model.safetensors (absolute)."""
    if isinstance(obj, dict):
        return {k: _resolve_refs(v, study_dir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_refs(v, study_dir) for v in obj]
    if isinstance(obj, str) and obj.startswith(PRETRAIN_REF) and study_dir is not None:
        return str((study_dir / "pretrain" / obj[len(PRETRAIN_REF):] / "model.safetensors").resolve())
    return obj


def _resolved_config(label: str, name: str, base: Path | None, overrides: dict, settings: dict) -> dict:
    """The validated config (as a dict) of one variant; errors name the variant."""
    tree = read_yaml(base) if base is not None else {}
    tree["name"] = name
    try:
        return load_config(tree, {**overrides, **settings}).to_dict()
    except ConfigError as e:
        raise StudyError(f"{label}: {e}") from None


def _base_path(value: Any, study_path: Path, where: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise StudyError(f"{where}: base must be a path to a run config; got {value!r}")
    p = Path(os.path.expanduser(value))
    p = p if p.is_absolute() else study_path.parent / p
    if not p.is_file():
        raise StudyError(f"{where}: base config not found: {p}")
    return p.resolve()


def load_study(path: str | Path) -> dict:
    """Parse, validate and expand a study file; nothing runs.

    Returns {'name', 'path', 'description', 'base', 'overrides', 'seeds', 'variants': [{'name',
    'settings', 'base', 'config', 'needs'}], 'pretrain': [same], 'runs': expand_study(...)}, where
    'config' is the fully resolved run config (a dict; '@pretrain/…' references left as they are).
    """
    path = Path(path)
    raw = read_yaml(path)
    _check_keys(raw, path)
    name = raw.get("name") or path.stem
    if not isinstance(name, str) or not _NAME_OK.match(name):
        raise StudyError(f"{path}: name {name!r} must be folder-safe (letters, digits, . _ + = -)")
    base = _base_path(raw.get("base"), path, str(path))
    overrides = _overrides(raw.get("overrides"))
    seeds = _seeds(raw.get("seeds"))

    def entry(kind: str, vname: str, settings: dict, cfg_name: str) -> dict:
        shown, settings = dict(settings), dict(settings)  # shown: as written (a base path as given)
        own_base = _base_path(settings.pop("base"), path, f"{kind} {vname!r}") if "base" in settings else base
        return {"name": vname, "settings": shown,
                "base": own_base, "needs": _refs({**overrides, **settings}),
                "config": _resolved_config(f"{path}: {kind} {vname!r}", cfg_name, own_base, overrides, settings)}

    pre = raw.get("pretrain") or {}
    if not isinstance(pre, dict):
        raise StudyError(f"{path}: pretrain: a mapping of names to settings; got {pre!r}")
    pretrain = []
    for pname, psettings in pre.items():
        pname = str(pname)
        if not _NAME_OK.match(pname):
            raise StudyError(f"{path}: pretrain {pname!r}: use a folder-safe name (letters, digits, . _ + = -)")
        pretrain.append(entry("pretrain", pname, _flatten(psettings, f"pretrain {pname!r}"), f"pretrain-{pname}"))
    variants = [entry("variant", vname, settings, vname)
                for vname, settings in expand_variants(raw.get("grid"), raw.get("variants"))]
    known = {p["name"] for p in pretrain}
    for kind, entries in (("pretrain", pretrain), ("variant", variants)):
        for e in entries:
            missing = [r for r in e["needs"] if r not in known]
            if kind == "pretrain" and e["needs"]:
                problem = "a pretrain run cannot start from another pretrain run's weights"
            elif missing:
                problem = (f"no pretrain run named {missing[0]!r} "
                           f"(pretrain runs: {', '.join(sorted(known)) or 'none'})")
            else:
                continue
            raise StudyError(f"{path}: {kind} {e['name']!r}: @pretrain reference: {problem}")
    return {"name": name, "path": path.resolve(), "description": raw.get("description"), "base": base,
            "overrides": overrides, "seeds": seeds, "variants": variants, "pretrain": pretrain,
            "runs": [(v["name"], v["settings"], s) for v in variants for s in seeds]}


# --------------------------------------------------------------------------- execution

@dataclasses.dataclass
class _Job:
    label: str            # "cnn-adam seed 0" / "pretrain other"
    run_dir: Path         # the run folder to create
    config_file: Path     # the resolved config it trains
    seed: int
    expected: dict        # resolved config incl. the seed, to check a finished run against
    needs: list[Path]     # run folders (pretrain) that must finish first
    ref_keys: set[str]    # keys holding @pretrain paths (not compared on rerun: the folder may move)
    resume: bool = False  # an interrupted run with a checkpoint: continue it

    @property
    def log(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".log")

    @property
    def failed_file(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".failed.json")


def is_finished(run_dir: Path) -> bool:
    """A run counts as finished when its metrics.json and model.safetensors exist."""
    return (run_dir / "metrics.json").is_file() and (run_dir / "model.safetensors").is_file()


def _stale_keys(job: _Job) -> list[str]:
    try:
        actual = load_config(job.run_dir / "config.yaml")
    except ConfigError as e:
        return [f"config.yaml unreadable ({e})"]
    changed = config_differences(actual, load_config(job.expected), ignore=RESULT_NEUTRAL | job.ref_keys)
    return [line for _, line in changed]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _run_one(job: _Job, threads: int | None) -> tuple[int, float, str]:
    """Train one run in a child process; returns (exit code, seconds, stderr tail)."""
    if job.resume:  # interrupted earlier: go on from its checkpoint
        cmd = [sys.executable, "-m", "cnnlab", "train", "--resume", str(job.run_dir)]
    else:
        cmd = [sys.executable, "-m", "cnnlab", "train", str(job.config_file), f"train.seed={job.seed}"]
    env = child_env()  # the child stops (cleanly, with a checkpoint) if this process dies
    if threads:
        cmd.append(f"train.threads={threads}")
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if not job.resume:
        cmd += ["--out", str(job.run_dir)]
    cmd += ["--progress", "plain", "--no-report"]  # the study report writes every run's page
    t0 = time.perf_counter()
    with open(job.log, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                              env=env)
        if proc.stderr:
            log.write(proc.stderr)
    seconds = time.perf_counter() - t0
    lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    return proc.returncode, seconds, "\n".join(lines[-15:])[-2000:]


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _execute(jobs: list[_Job], todo: list[_Job], n_jobs: int, threads: int | None, log=print) -> dict[Path, str]:
    """Run `todo` (a subset of `jobs`, in order, respecting `needs`); returns {run_dir: error} of failures."""
    total, done = len(jobs), len(jobs) - len(todo)
    width = len(str(total))
    ok = {j.run_dir for j in jobs if j not in todo}
    failed: dict[Path, str] = {}
    pending, running = list(todo), {}
    t_start, run_seconds = time.perf_counter(), []

    def record_failure(job: _Job, code: int | None, error: str) -> None:
        failed[job.run_dir] = error
        job.failed_file.write_text(json.dumps({"exit_code": code, "error": error}, indent=2) + "\n",
                                   encoding="utf-8")

    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        while pending or running:
            for job in list(pending):
                if len(running) >= n_jobs:
                    break
                broken = [d for d in job.needs if d in failed]
                if broken:
                    pending.remove(job)
                    done += 1
                    record_failure(job, None, f"not run: pretrain run {broken[0].name} failed")
                    log(f"[{done:>{width}}/{total}] FAILED {job.label}: pretrain run {broken[0].name} failed")
                elif all(d in ok for d in job.needs):
                    pending.remove(job)
                    running[pool.submit(_run_one, job, threads)] = job
                    log(f"[{done:>{width}}/{total}] start  {job.label}")
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                code, seconds, err = fut.result()
                done += 1
                run_seconds.append(seconds)
                if code == 0 and is_finished(job.run_dir):
                    ok.add(job.run_dir)
                    m = json.loads((job.run_dir / "metrics.json").read_text(encoding="utf-8"))
                    left = len(pending) + len(running)
                    eta = (f", about {_fmt_time(sum(run_seconds) / len(run_seconds) * left / n_jobs)} left"
                           if left else "")
                    log(f"[{done:>{width}}/{total}] done   {job.label} in {seconds:.1f} s: accuracy "
                        f"{m['accuracy']:.4f} (elapsed {_fmt_time(time.perf_counter() - t_start)}{eta})")
                else:
                    error = err or f"exit code {code} without metrics.json"
                    record_failure(job, code, f"exit code {code}: {error}")
                    last = error.strip().splitlines()[-1] if error.strip() else ""
                    log(f"[{done:>{width}}/{total}] FAILED {job.label} after {seconds:.1f} s (exit {code}): "
                        f"{last[:200]} — see {job.log}")
    return failed


def _plan_jobs(study: dict, study_dir: Path) -> tuple[dict, list[_Job], dict[Path, str]]:
    """plan.json's content, the jobs (pretrain first) and {path: text} of the resolved config files."""
    files: dict[Path, str] = {}
    jobs, plan = [], {"name": study["name"], "study_file": str(study["path"]), "seeds": study["seeds"],
                      "description": study["description"], "variants": [], "pretrain": []}
    pre_dirs = {p["name"]: study_dir / "pretrain" / p["name"] for p in study["pretrain"]}

    def add(entry: dict, kind: str, config_file: Path, seeds: list[int]) -> None:
        config = _resolve_refs(entry["config"], study_dir)
        files[config_file] = yaml.safe_dump(config, sort_keys=False)
        ref_keys = {k for k, v in dotted(entry["config"]).items()
                    if isinstance(v, str) and v.startswith(PRETRAIN_REF)}
        rel_runs = []
        for seed in seeds:
            run_dir = pre_dirs[entry["name"]] if kind == "pretrain" else config_file.parent / f"seed-{seed}"
            expected = json.loads(json.dumps(config))
            expected["train"]["seed"] = seed
            label = f"pretrain {entry['name']}" if kind == "pretrain" else f"{entry['name']} seed {seed}"
            jobs.append(_Job(label, run_dir, config_file, seed, expected,
                             [pre_dirs[n] for n in entry["needs"]], ref_keys))
            rel_runs.append(run_dir.relative_to(study_dir).as_posix())
        plan[kind].append({"name": entry["name"], "settings": entry["settings"], "config": config,
                           "runs": rel_runs})

    for p in study["pretrain"]:
        add(p, "pretrain", study_dir / "pretrain" / f"{p['name']}.yaml", study["seeds"][:1])
    for v in study["variants"]:
        add(v, "variants", study_dir / "runs" / v["name"] / "variant.yaml", study["seeds"])
    return plan, jobs, files


def run_study(study_path: str | Path, jobs: int = 1, out: str | Path | None = None, quiet: bool = False) -> Path:
    """Run every (variant, seed) of a study not yet finished, then aggregate; returns the study folder.

    jobs: runs at once, each in its own process. out: the study folder (default studies/<file stem>).
    Writes summary.json, table.md/.csv/.tex (and the report, when cnnlab.report is available).
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise StudyError(f"--jobs must be a positive integer; got {jobs!r}")
    log = (lambda *a, **k: None) if quiet else (lambda msg: print(msg, flush=True))
    study = load_study(study_path)  # validates everything before any work
    study_dir = Path(out) if out is not None else Path("studies") / Path(study_path).stem
    study_dir.mkdir(parents=True, exist_ok=True)
    study_dir = study_dir.resolve()
    plan, all_jobs, config_files = _plan_jobs(study, study_dir)

    stale = [f"{j.run_dir.relative_to(study_dir)}: " + "; ".join(keys[:4]) + (" …" if len(keys) > 4 else "")
             for j in all_jobs if is_finished(j.run_dir) for keys in [_stale_keys(j)] if keys]
    if stale:
        raise StudyError(f"{len(stale)} finished run(s) in {study_dir} were made with another config than the "
                         "study now asks for (delete them to rerun, or use another --out):\n  " + "\n  ".join(stale))
    if Path(study_path).resolve() != (study_dir / "study.yaml"):
        shutil.copyfile(study_path, study_dir / "study.yaml")
    for path, text in config_files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (study_dir / "plan.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")

    todo = []
    for j in all_jobs:
        if is_finished(j.run_dir):
            continue
        j.resume = (j.run_dir / "checkpoint.safetensors").is_file() and (j.run_dir / "config.yaml").is_file() \
            and not _stale_keys(j)
        if j.run_dir.exists() and not j.resume:  # interrupted before its first checkpoint: start again
            shutil.rmtree(j.run_dir)
        j.failed_file.unlink(missing_ok=True)
        todo.append(j)
    user_threads = "train.threads" in study["overrides"] or any(
        "train.threads" in v["settings"] for v in study["variants"] + study["pretrain"])
    threads = None if user_threads else max(1, _cores() // jobs)
    log(f"study {study['name']}: {len(study['variants'])} variant(s) × {len(study['seeds'])} seed(s)"
        + (f" + {len(study['pretrain'])} pretrain run(s)" if study["pretrain"] else "")
        + f" = {len(all_jobs)} runs; {len(all_jobs) - len(todo)} already finished; {len(todo)} to run, "
        f"{jobs} at a time" + (f" with {threads} thread(s) each" if threads else "") + f" → {study_dir}")
    t0 = time.perf_counter()
    failed = _execute(all_jobs, todo, jobs, threads, log)
    if todo:
        log(f"{len(todo) - len(failed)} run(s) finished, {len(failed)} failed in {_fmt_time(time.perf_counter() - t0)}")

    summary = aggregate(study_dir)
    log("")
    log(render_markdown(summary))
    for s in [c["sentence"] for c in summary["comparisons"]] + [c["sentence"] for c in summary["chance"]]:
        log("- " + s)
    try:
        from cnnlab.report import write_report
    except ImportError:
        log("(no report: cnnlab.report is not available in this version)")
    else:
        write_report(study_dir)
        log(f"report: {study_dir / 'report.html'}")
    log(f"study folder: {study_dir}")
    return study_dir


# --------------------------------------------------------------------------- aggregation

def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _failure(study_dir: Path, rel: str) -> str:
    run_dir = study_dir / rel
    failed = run_dir.with_name(run_dir.name + ".failed.json")
    if failed.is_file():
        return _read_json(failed).get("error") or "failed"
    return "not finished (no metrics.json): interrupted, or not run yet"


def _correctness(run_dir: Path) -> dict[str, bool]:
    with open(run_dir / "predictions.csv", newline="", encoding="utf-8") as f:
        return {row["index"]: row["correct"] == "1" for row in csv.DictReader(f)}


def _compare(study_dir: Path, v: dict, best: dict, seeds: list[int]) -> dict:
    """The variant against the best: McNemar pooled over shared seeds, paired t-test over seeds."""
    runs_v, runs_b = v["_by_seed"], best["_by_seed"]
    shared = [s for s in seeds if s in runs_v and s in runs_b]
    acc_v = [runs_v[s][1]["accuracy"] for s in shared]
    acc_b = [runs_b[s][1]["accuracy"] for s in shared]
    diff = 100 * (sum(acc_v) - sum(acc_b)) / len(shared)
    b = c = n_pairs = 0
    paired, n_images = True, None
    for s in shared:
        try:
            cv, cb = _correctness(study_dir / runs_v[s][0]), _correctness(study_dir / runs_b[s][0])
        except (OSError, KeyError):
            paired = False
            break
        if set(cv) != set(cb):
            paired = False
            break
        keys = sorted(cv)
        bb, cc = stats.discordant([cv[k] for k in keys], [cb[k] for k in keys])
        b, c, n_pairs = b + bb, c + cc, n_pairs + len(keys)
        n_images = len(keys)
    p = stats.mcnemar_exact(b, c) if paired else None
    t = stats.paired_ttest(acc_v, acc_b)
    part = v["evaluated_on"] or "test"
    if paired:
        text = stats.comparison_sentence(v["name"], best["name"], diff, p, n_images=n_images, seeds=len(shared),
                                         ttest_p=t, part=part)
    else:  # different test images (other data settings): only the seed-level test applies
        text = stats.comparison_sentence(v["name"], best["name"], diff, t, test="paired t-test over seeds, "
                                         "no McNemar: different test images", seeds=len(shared), part=part)
    return {"variant": v["name"], "against": best["name"], "difference_points": diff, "mcnemar_p": p,
            "ttest_p": t, "n_pairs": n_pairs if paired else 0, "n_images": n_images if paired else None,
            "seeds": len(shared), "variant_right_best_wrong": b if paired else None,
            "variant_wrong_best_right": c if paired else None, "sentence": text}


def _chance(v: dict) -> dict:
    ms = [m for _, m in v["_by_seed"].values()]
    chance_lv = max(stats.chance_level(m["chance"]["accuracy"], len(m["classes"])) for m in ms)
    ps = []
    for m in ms:
        p = m["chance"].get("p_value_above_chance")
        if p is None:
            p = stats.binomial_above_chance(round(m["accuracy"] * m["n"]), m["n"],
                                            stats.chance_level(m["chance"]["accuracy"], len(m["classes"])))
        ps.append(float(p))
    acc = v["metrics"]["accuracy"]["mean"]
    p = max(ps)
    return {"variant": v["name"], "accuracy": acc, "chance": chance_lv, "p_value": p, "n": v["n_eval"],
            "seeds": len(ms), "sentence": stats.chance_sentence(acc, v["n_eval"], chance_lv, p,
                                                                part=v["evaluated_on"], subject=v["name"],
                                                                seeds=len(ms))}


def aggregate(study_dir: str | Path) -> dict:
    """Read a study folder (plan.json + run folders only) → summary.json and table.md/.csv/.tex.

    Returns the summary: {name, study_file, description, seeds, averaging: "macro",
    variants: [{name, settings, runs, failed: [{run, error}], model, optimizer, lr, parameters,
                metrics: {accuracy|loss|best_epoch|precision_macro|recall_macro|f1_macro|training_seconds:
                          {mean, sd, ci95, values}}, evaluated_on, n_eval}],
    best, comparisons: [{variant, against, difference_points, mcnemar_p, ttest_p, n_pairs, n_images, seeds,
                         variant_right_best_wrong, variant_wrong_best_right, sentence}],
    chance: [{variant, accuracy, chance, p_value, n, seeds, sentence}],
    pretrain: [{name, settings, run, accuracy, failed}], methods: {…}}.
    Unfinished runs are listed under `failed`; a variant with no finished run has null metrics.
    """
    study_dir = Path(study_dir)
    plan = _read_json(study_dir / "plan.json")
    seeds = plan["seeds"]
    variants = []
    for pv in plan["variants"]:
        by_seed, failed = {}, []
        for seed, rel in zip(seeds, pv["runs"]):
            if is_finished(study_dir / rel):
                by_seed[seed] = (rel, _read_json(study_dir / rel / "metrics.json"))
            else:
                failed.append({"run": rel, "error": _failure(study_dir, rel)})
        ms = [m for _, m in by_seed.values()]
        cfg = pv["config"]
        v = {"name": pv["name"], "settings": pv["settings"], "runs": [r for r, _ in by_seed.values()],
             "failed": failed, "model": cfg["model"]["name"], "optimizer": cfg["optim"]["name"],
             "lr": cfg["optim"]["lr"], "parameters": ms[0].get("parameters") if ms else None,
             "metrics": {}, "evaluated_on": ms[0].get("evaluated_on") if ms else None,
             "n_eval": ms[0].get("n") if ms else None, "_by_seed": by_seed}
        for key in METRICS:
            s = stats.summarize([m[key] for m in ms if m.get(key) is not None], bounds=METRIC_BOUNDS[key])
            v["metrics"][key] = {"mean": s["mean"], "sd": s["sd"], "ci95": s["ci95"], "values": s["values"]}
        variants.append(v)
    done = [v for v in variants if v["_by_seed"]]
    best = max(done, key=lambda v: v["metrics"]["accuracy"]["mean"]) if done else None
    comparisons = [_compare(study_dir, v, best, seeds) for v in done if v is not best]
    chance = [_chance(v) for v in done]
    pretrain = []
    for pp in plan.get("pretrain", []):
        rel = pp["runs"][0]
        ok = is_finished(study_dir / rel)
        pretrain.append({"name": pp["name"], "settings": pp["settings"], "run": rel,
                         "accuracy": _read_json(study_dir / rel / "metrics.json")["accuracy"] if ok else None,
                         "failed": None if ok else _failure(study_dir, rel)})
    for v in variants:
        del v["_by_seed"]
    summary = {"name": plan["name"], "study_file": plan["study_file"], "description": plan.get("description"),
               "seeds": seeds, "averaging": "macro", "variants": variants,
               "best": best["name"] if best else None, "comparisons": comparisons, "chance": chance,
               "pretrain": pretrain, "methods": METHODS}
    (study_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_tables(summary, study_dir)
    return summary


METHODS = {
    "spread": "mean ± sample sd (ddof = 1) over seeds; 95 % Student-t interval of the mean (none for one seed)",
    "averaging": "precision, recall and F1 are macro averages over classes (unweighted)",
    "mcnemar": "exact McNemar test (two-sided binomial on discordant pairs) of per-image correctness on the "
               "same test images against the best variant, pooled over the seeds both completed",
    "ttest": "paired t-test (scipy.stats.ttest_rel) of per-seed accuracies against the best variant; "
             "needs ≥ 2 shared seeds",
    "chance": "exact one-sided binomial test of accuracy against max(majority-class rate, 1/classes); "
              "the largest p over a variant's seeds",
}


# --------------------------------------------------------------------------- command line

def _resolve_study(arg: str) -> Path:
    path = find_recipe(arg)
    if path is None:
        raise StudyError(f"study file not found: {arg}")
    return path


def main_compare(args) -> int:
    """`cnnlab compare STUDY [--jobs N] [--out DIR]`: 0 when every run finished, 1 when some failed."""
    study_dir = run_study(_resolve_study(args.study), jobs=args.jobs, out=args.out)
    summary = _read_json(study_dir / "summary.json")
    failed = sum(len(v["failed"]) for v in summary["variants"]) + sum(1 for p in summary["pretrain"] if p["failed"])
    if failed:
        print(f"cnnlab: {failed} run(s) failed; see summary.json and the runs' .log files "
              "(run the same command again to retry them)", file=sys.stderr)
        return 1
    return 0
