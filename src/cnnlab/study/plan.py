"""A study's plan: the run requests (pretrain first), their resolved config files, and plan.json.

The study folder:

    study.yaml  plan.json                the study as given, and as expanded (read by `aggregate`)
    runs/<variant>/variant.yaml          the resolved config shared by the variant's seeds
    runs/<variant>/seed-<k>/             one run folder per seed (+ seed-<k>.log, seed-<k>.failed.json)
    pretrain/<name>/ (+ <name>.yaml, <name>.log)
    summary.json  table.md  table.csv  table.tex  report.html

A run is finished when runs.is_finished says so; finished runs are skipped on a rerun, but only if
their config.yaml still matches the study (otherwise the study stops and says which keys differ:
results are never silently stale). An interrupted run with a checkpoint is resumed exactly where it
stopped; one without a checkpoint is removed and run again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import RESULT_NEUTRAL, ConfigError, config_differences, dotted, load_config
from ..fileio import atomic_write_text
from ..runs import is_finished
from .executors import RunRequest
from .spec import PRETRAIN_REF, StudyError, resolve_refs


@dataclass
class Plan:
    study_dir: Path
    content: dict                    # plan.json: name, study file, seeds, variants and pretrain with their runs
    pretrain: list[RunRequest]       # the pretrain runs (made first)
    variants: list[RunRequest]       # the variants' runs, variant-major
    config_files: dict[Path, str]    # the resolved config files to write: {path: YAML text}

    @property
    def requests(self) -> list[RunRequest]:
        return self.pretrain + self.variants


def make_plan(study: dict, study_dir: Path) -> Plan:
    """Every run of a loaded study (spec.load_study) as a RunRequest under `study_dir`; writes nothing."""
    files: dict[Path, str] = {}
    requests: dict[str, list[RunRequest]] = {"pretrain": [], "variants": []}
    content = {"name": study["name"], "study_file": str(study["path"]), "seeds": study["seeds"],
               "description": study["description"], "variants": [], "pretrain": []}
    if study.get("reference"):
        content["reference"] = study["reference"]
    pre_dirs = {p["name"]: study_dir / "pretrain" / p["name"] for p in study["pretrain"]}

    def add(entry: dict, kind: str, config_file: Path, seeds: list[int]) -> None:
        config = resolve_refs(entry["config"], study_dir)
        files[config_file] = yaml.safe_dump(config, sort_keys=False)
        ref_keys = {k for k, v in dotted(entry["config"]).items()
                    if isinstance(v, str) and v.startswith(PRETRAIN_REF)}
        rel_runs = []
        for seed in seeds:
            run_dir = pre_dirs[entry["name"]] if kind == "pretrain" else config_file.parent / f"seed-{seed}"
            expected = json.loads(json.dumps(config))
            expected["train"]["seed"] = seed
            label = f"pretrain {entry['name']}" if kind == "pretrain" else f"{entry['name']} seed {seed}"
            requests[kind].append(RunRequest(label, run_dir, config_file, seed, expected=expected,
                                       needs=[pre_dirs[n] for n in entry["needs"]], ref_keys=ref_keys))
            rel_runs.append(run_dir.relative_to(study_dir).as_posix())
        content[kind].append({"name": entry["name"], "settings": entry["settings"], "config": config,
                              "runs": rel_runs})

    for p in study["pretrain"]:
        add(p, "pretrain", study_dir / "pretrain" / f"{p['name']}.yaml", study["seeds"][:1])
    for v in study["variants"]:
        add(v, "variants", study_dir / "runs" / v["name"] / "variant.yaml", study["seeds"])
    return Plan(study_dir, content, requests["pretrain"], requests["variants"], files)


def stale_keys(req: RunRequest) -> list[str]:
    """'key: old → new' for each key where a run folder's config.yaml differs from what the study asks."""
    try:
        actual = load_config(req.run_dir / "config.yaml")
    except ConfigError as e:
        return [f"config.yaml unreadable ({e})"]
    changed = config_differences(actual, load_config(req.expected), ignore=RESULT_NEUTRAL | req.ref_keys)
    return [line for _, line in changed]


def prepare_folder(plan: Plan, study_path: Path) -> list[RunRequest]:
    """Check the finished runs are not stale, write study.yaml, the config files and plan.json; returns the
    requests still to run (resumed where they have a checkpoint, started again where they have none)."""
    study_dir = plan.study_dir
    stale = [f"{r.run_dir.relative_to(study_dir)}: " + "; ".join(keys[:4]) + (" …" if len(keys) > 4 else "")
             for r in plan.requests if is_finished(r.run_dir) for keys in [stale_keys(r)] if keys]
    if stale:
        raise StudyError(f"{len(stale)} finished run(s) in {study_dir} were made with another config than the "
                         "study now asks for (delete them to rerun, or use another --out):\n  " + "\n  ".join(stale))
    if Path(study_path).resolve() != (study_dir / "study.yaml"):
        shutil.copyfile(study_path, study_dir / "study.yaml")
    for path, text in plan.config_files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    atomic_write_text(study_dir / "plan.json", json.dumps(plan.content, indent=2) + "\n")
    todo = []
    for r in plan.requests:
        if is_finished(r.run_dir):
            continue
        r.resume = (r.run_dir / "checkpoint.safetensors").is_file() and (r.run_dir / "config.yaml").is_file() \
            and not stale_keys(r)
        if r.run_dir.exists() and not r.resume:  # interrupted before its first checkpoint: start again
            shutil.rmtree(r.run_dir)
        r.failed_file.unlink(missing_ok=True)
        todo.append(r)
    return todo
