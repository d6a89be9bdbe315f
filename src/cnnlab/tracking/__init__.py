"""Optional tracking outputs — MLflow and TensorBoard — fed only from what a run folder already holds.

Nothing here runs during training: a finished run folder (config.yaml, history.csv, metrics.json, env.json,
predictions.csv, model.safetensors, plots/, report.html) is read back and uploaded, so a run made months ago
is uploaded exactly as a fresh one (`cnnlab track`), and a tracker can never change or lose a result.

    log_run(RUN, mlflow="sqlite:///runs/mlflow.db", tensorboard=True)   # one run
    log_study(STUDY, mlflow="default")                                   # a parent run, every run its child
    log_tune(TUNE, mlflow="http://127.0.0.1:5000")                       # trials + re-validation as children

MLflow: params = the resolved config as dotted keys (track.* left out: a URI may hold a password); per-epoch
metrics from history.csv with step = epoch (loss, accuracy, val_loss, val_accuracy, lr, epoch_seconds); the
final metrics of metrics.json as test_* (eval_* when the run was evaluated on another split: a tune's trials);
tags; the run folder's files as artifacts. TensorBoard: RUN/tensorboard/ with the same scalars, the hparams
view and the confusion matrix as an image (`tensorboard --logdir runs` or a study/tune folder).

The store `default` (config `track.mlflow: default` or `true`, `cnnlab track … --mlflow default`) is
sqlite:///<parent>/mlflow.db, where <parent> holds the run folder (runs/mlflow.db for runs/demo), or the
study / tune folder the run belongs to (studies/mlflow.db, tunes/mlflow.db): one store for everything trained
side by side. Its artifacts go to <parent>/mlartifacts/. Plain paths and file: URIs are refused: MLflow's file
store is deprecated (sqlite is its default since 3.7); write sqlite:///PATH.db instead.

A tracker that fails (no extra installed, server down, bad URI) never fails the training, study or tune: one
warning line, and the error is recorded in FOLDER/tracking.json. tracking.json also remembers what was
uploaded where (store, experiment, run id, a fingerprint of the results), so tracking a folder again reuses
those MLflow runs instead of duplicating them. Runs of a study or a tune are uploaded once, by the study or
tune, as children of its parent run (never by each training process).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from .folders import (FINAL_METRICS, HISTORY_NAMES, MAX_RECORDS, RUN_FIGURES, TRACKING_FILE, _check_run_folder,
                      _config_tree, _failed, _finished, _fingerprint, _key, _number, _one_line, _plan_runs,
                      _read_json, _text, _warn_stderr, default_store, folder_kind, group_folder, resolve_store)
from .mlflow_store import (ARTIFACT_DIR, HTTP_DEFAULTS, QUIET_LOGGERS, RUN_ARTIFACTS, _client, _experiment,
                           _parent_run, _quiet, _upload_run, _where)
from .settings import DEFAULT_DB, SQL_SCHEMES, TrackingError, check_mlflow_uri, require, shown
from .tensorboard_events import TENSORBOARD_DIR, _tensorboard_run

__all__ = ["log_run", "log_study", "log_tune", "track_run", "track_study", "track_tune", "track_folder",
           "TrackingError", "check_mlflow_uri", "shown", "require", "group_folder", "default_store",
           "resolve_store", "folder_kind", "TRACKING_FILE", "TENSORBOARD_DIR", "DEFAULT_DB", "ARTIFACT_DIR",
           "RUN_ARTIFACTS", "STUDY_ARTIFACTS", "TUNE_ARTIFACTS", "HISTORY_NAMES", "FINAL_METRICS", "RUN_FIGURES",
           "SQL_SCHEMES", "HTTP_DEFAULTS", "QUIET_LOGGERS", "MAX_RECORDS"]

STUDY_ARTIFACTS = ["summary.json", "plan.json", "study.yaml", "table.md", "table.csv", "table.tex", "report.html"]
TUNE_ARTIFACTS = ["summary.json", "tune.json", "tune.yaml", "best.yaml", "revalidate.yaml", "report.html",
                  "revalidate/summary.json", "revalidate/table.md", "revalidate/table.csv", "revalidate/report.html"]


# --------------------------------------------------------------------------- the entry points

def log_run(run_dir, mlflow=None, experiment: str | None = None, tensorboard: bool = False,
            parent_run_id: str | None = None, *, info=None, warn=None) -> dict:
    """Upload one finished run folder: MLflow (mlflow: 'default', True or a URI) and/or TensorBoard.

    Returns {"mlflow": {uri, experiment, experiment_id, run_id, reused} | {error}, "tensorboard": {dir} | {error}}.
    A folder that is not a finished run is a TrackingError; a tracker's failure is not: it is recorded in
    RUN/tracking.json and warned about in one line (warn; default stderr). info: where progress lines go.
    """
    run_dir = Path(run_dir).resolve()
    _check_run_folder(run_dir)
    info = info or (lambda text: None)
    result, errors = {}, []
    experiment = experiment or str(_config_tree(run_dir).get("name") or run_dir.name)
    if tensorboard:
        with _recorded(result, errors, "tensorboard", lambda: {"dir": TENSORBOARD_DIR}):
            with _quiet():
                result["tensorboard"] = _tensorboard_run(run_dir)
            info(f"tensorboard: {result['tensorboard']['dir']}")
    if mlflow:
        uri = None
        with _recorded(result, errors, "mlflow", lambda: {"uri": shown(uri or str(mlflow)), "experiment": experiment}):
            uri = resolve_store(mlflow, run_dir)
            with _quiet(mlflow=True):
                client = _client(uri)
                exp_id = _experiment(client, uri, experiment)
                run_id, reused = _upload_run(client, uri, experiment, exp_id, run_dir, parent_run_id)
            result["mlflow"] = {"uri": shown(uri), "experiment": experiment, "experiment_id": exp_id,
                                "run_id": run_id, "reused": reused}
            info(f"mlflow: run {run_id} in experiment {experiment!r} at {_where(uri, exp_id, run_id)}"
                 + (" (uploaded before; unchanged)" if reused else ""))
    if errors:
        _failed(run_dir, errors, warn, _track_hint(run_dir, mlflow, tensorboard))
    return result


@contextlib.contextmanager
def _recorded(result: dict, errors: list, backend: str, where):
    """Run the block; if it fails, record the error under `backend` (with `where()`: what it was writing to)
    and go on — one tracking backend failing never stops the other, nor the training."""
    try:
        yield
    except Exception as e:
        result[backend] = {"error": _one_line(e)}
        errors.append((backend, _one_line(e), where()))


def _track_hint(folder: Path, mlflow, tensorboard: bool) -> str:
    parts = ["cnnlab track", str(folder)]
    if mlflow:
        parts += ["--mlflow", shown(str(mlflow))]
    if tensorboard:
        parts.append("--tensorboard")
    return " ".join(parts)


def _log_group(folder: Path, kind: str, name: str, runs: list[tuple[Path, str, dict, dict]], parent: dict,
               mlflow, experiment: str | None, tensorboard: bool, info, warn) -> dict:
    """A study or a tune: every finished run's TensorBoard folder; an MLflow parent run with each run as a child.
    runs: (run folder, MLflow run name, extra tags, extra metrics)."""
    info = info or (lambda text: None)
    experiment = experiment or name
    result, errors = {"runs": len(runs)}, []
    if tensorboard:
        with _recorded(result, errors, "tensorboard", lambda: {"dir": str(folder)}):
            with _quiet():
                for run_dir, *_ in runs:
                    _tensorboard_run(run_dir)
            result["tensorboard"] = {"dir": str(folder), "runs": len(runs)}
            info(f"tensorboard: {len(runs)} run(s) under {folder} (tensorboard --logdir {folder})")
    if mlflow:
        uri = None
        with _recorded(result, errors, "mlflow", lambda: {"uri": shown(uri or str(mlflow)), "experiment": experiment}):
            uri = resolve_store(mlflow, folder)
            with _quiet(mlflow=True):
                client = _client(uri)
                exp_id = _experiment(client, uri, experiment)
                parent_id = _parent_run(client, uri, experiment, exp_id, folder, kind, name, **parent)
                try:
                    children = [_upload_run(client, uri, experiment, exp_id, run_dir, parent_id, run_name, tags,
                                            metrics)[0] for run_dir, run_name, tags, metrics in runs]
                except BaseException:
                    with contextlib.suppress(Exception):
                        client.set_terminated(parent_id, "FAILED")
                    raise
                client.set_terminated(parent_id, "FINISHED")
            result["mlflow"] = {"uri": shown(uri), "experiment": experiment, "experiment_id": exp_id,
                                "run_id": parent_id, "children": children}
            info(f"mlflow: {kind} run {parent_id} with {len(children)} child run(s) in experiment {experiment!r} "
                 f"at {_where(uri, exp_id, parent_id)}")
    if errors:
        _failed(folder, errors, warn, _track_hint(folder, mlflow, tensorboard))
    return result


def _flat_stats(prefix: str, stats_: dict) -> dict:
    out = {}
    for metric, s in (stats_ or {}).items():
        if not isinstance(s, dict):
            continue
        for k in ("mean", "sd"):
            out[f"{prefix}{metric}_{k}"] = s.get(k)
        ci = s.get("ci95")
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            out[f"{prefix}{metric}_ci95_low"], out[f"{prefix}{metric}_ci95_high"] = ci
    return out


def _study_runs(study_dir: Path, group: str = "", extra_tags: dict | None = None) -> list:
    runs = []
    for rel, where in _plan_runs(study_dir).items():
        run_dir = study_dir / rel
        if not _finished(run_dir):
            continue
        name = rel[len("runs/"):] if rel.startswith("runs/") else rel
        tags = {"cnnlab.variant": str(where["variant"]), "cnnlab.group": group.strip("/") or where["group"],
                **({"cnnlab.seed": where["seed"]} if where["seed"] is not None else {}), **(extra_tags or {})}
        runs.append((run_dir, (group + name) if group else name, tags, {}))
    return runs


def _study_parent(study_dir: Path) -> tuple[str, dict]:
    plan = _read_json(study_dir / "plan.json")
    summary = _read_json(study_dir / "summary.json", {})
    params = {"study_file": str(plan.get("study_file", "")), "seeds": _text(plan.get("seeds")),
              "variants": _text([v.get("name") for v in plan.get("variants") or []])}
    for v in plan.get("variants") or []:
        for k, val in (v.get("settings") or {}).items():
            params[_key(f"variant.{v.get('name')}.{k}")] = _text(val)
    metrics = {}
    for v in summary.get("variants") or []:
        metrics.update(_flat_stats(f"{v.get('name')}/", v.get("metrics")))
    for c in summary.get("comparisons") or []:
        p = f"{c.get('variant')}/vs_{c.get('against')}/"
        for k in ("difference_points", "mcnemar_p", "ttest_p", "mcnemar_p_holm", "ttest_p_holm"):
            metrics[p + k] = c.get(k)
    tags = {"cnnlab.best": str(summary.get("best", "")), "cnnlab.reference": str(summary.get("reference", ""))}
    sentences = [c.get("sentence") for c in (summary.get("comparisons") or []) if c.get("sentence")]
    if sentences:
        tags["mlflow.note.content"] = "\n".join(f"- {s}" for s in sentences)
    name = str(plan.get("name") or study_dir.name)
    return name, {"fingerprint": _fingerprint(study_dir, ["plan.json"]), "params": params,
                  "metrics": {_key(k): v for k, v in metrics.items()}, "tags": tags, "artifacts": STUDY_ARTIFACTS}


def log_study(study_dir, mlflow=None, experiment: str | None = None, tensorboard: bool = False, *,
              info=None, warn=None) -> dict:
    """A study folder: a parent MLflow run (summary metrics, the tables, report.html) with every finished run
    folder as its child (nested; tags cnnlab.variant / cnnlab.seed), and/or each run's TensorBoard folder."""
    study_dir = Path(study_dir).resolve()
    if not (study_dir / "plan.json").is_file():
        raise TrackingError(f"{study_dir} is not a study folder (no plan.json)")
    name, parent = _study_parent(study_dir)
    return _log_group(study_dir, "study", name, _study_runs(study_dir), parent, mlflow, experiment, tensorboard,
                      info, warn)


def log_tune(tune_dir, mlflow=None, experiment: str | None = None, tensorboard: bool = False, *,
             info=None, warn=None) -> dict:
    """A tune folder: a parent MLflow run (the search's counts and best value, the re-validation's verdict,
    summary.json, best.yaml, report.html) with every finished trial and re-validation run as its child."""
    tune_dir = Path(tune_dir).resolve()
    if not (tune_dir / "tune.json").is_file():
        raise TrackingError(f"{tune_dir} is not a tune folder (no tune.json)")
    spec = _read_json(tune_dir / "tune.json")
    summary = _read_json(tune_dir / "summary.json", {})
    name = str(summary.get("name") or spec.get("name") or tune_dir.name)
    rows = {}
    for r in summary.get("trials") or []:
        if r.get("run") and (r["run"] not in rows or r.get("state") != "superseded"):
            rows[r["run"]] = r
    if not rows:  # no summary yet: the trial folders themselves
        rows = {f"trials/{p.name}": {} for p in sorted((tune_dir / "trials").glob("trial-*")) if p.is_dir()}
    runs = []
    for rel, r in sorted(rows.items()):
        run_dir = tune_dir / rel
        if not _finished(run_dir):
            continue
        tags = {"cnnlab.group": "trial", "cnnlab.tune": name}
        if r.get("number") is not None:
            tags.update({"cnnlab.trial": str(r["number"]), "cnnlab.trial_state": str(r.get("state"))})
        metrics = {"objective": r["value"]} if _number(r.get("value")) is not None else {}
        runs.append((run_dir, Path(rel).name, tags, metrics))
    if (tune_dir / "revalidate" / "plan.json").is_file():
        runs += _study_runs(tune_dir / "revalidate", "revalidate/", {"cnnlab.tune": name})
    params = {k: _text(spec.get(k)) for k in ("objective", "direction", "trials", "sampler", "pruner", "base",
                                              "overrides", "revalidate") if k in spec}
    for p in spec.get("space") or []:
        if isinstance(p, dict) and p.get("key"):
            params[_key(f"space.{p['key']}")] = _text({k: v for k, v in p.items() if k != "key" and v is not None
                                                       and v is not False and v != [] and v != {}})
    metrics = {f"trials_{k}": v for k, v in (summary.get("counts") or {}).items()}
    best = summary.get("best_trial") or {}
    tags = {}
    if best:
        metrics["best_value"], tags["cnnlab.best_trial"] = best.get("value"), str(best.get("number"))
    reval = summary.get("revalidation") or {}
    for k in ("difference_points", "p", "p_holm", "ttest_p"):
        metrics[f"revalidation/{k}"] = reval.get(k)
    for who, s in (reval.get("test_accuracy") or {}).items():
        metrics.update(_flat_stats(f"revalidation/{who}/", {"test_accuracy": s}))
    if reval.get("winner"):
        tags["cnnlab.winner"] = str(reval["winner"])
    if reval.get("sentence"):
        tags["mlflow.note.content"] = str(reval["sentence"])
    parent = {"fingerprint": _fingerprint(tune_dir, ["tune.json"]), "params": params,
              "metrics": {_key(k): v for k, v in metrics.items()}, "tags": tags, "artifacts": TUNE_ARTIFACTS}
    return _log_group(tune_dir, "tune", name, runs, parent, mlflow, experiment, tensorboard, info, warn)


# --------------------------------------------------------------------------- hooks (train, study, tune)

def _asked(track) -> tuple:
    if track is None:
        return None, None, False
    get = track.get if isinstance(track, dict) else (lambda k, d=None: getattr(track, k, d))
    return get("mlflow"), get("experiment"), bool(get("tensorboard"))


def track_run(run_dir, track, log=None) -> dict | None:
    """After a training (api.train, main process): upload the run when its config's `track` asks, unless it
    belongs to a study or tune (uploaded by them, as children). Never raises."""
    try:
        mlflow, experiment, tensorboard = _asked(track)
        if not (mlflow or tensorboard) or group_folder(run_dir) is not None:
            return None
        return log_run(run_dir, mlflow, experiment, tensorboard,
                       info=getattr(log, "message", None) or (lambda text: None))
    except Exception as e:  # never lose a finished run to its tracker
        _warn_stderr(f"cnnlab: warning: tracking failed ({_one_line(e)}); {run_dir} is intact")
        return None


def _first_track(configs) -> dict | None:
    for tree in configs:
        track = (tree or {}).get("track") if isinstance(tree, dict) else None
        if isinstance(track, dict) and (track.get("mlflow") or track.get("tensorboard")):
            return track
    return None


def track_study(study_dir, log=None) -> dict | None:
    """After run_study: log_study when the study's runs ask for tracking (their config's `track`); a tune's
    re-validation study is left to the tune. Never raises."""
    try:
        study_dir = Path(study_dir).resolve()
        if (study_dir.parent / "tune.json").is_file():
            return None
        plan = _read_json(study_dir / "plan.json", {})
        track = _first_track(v.get("config") for v in (plan.get("variants") or []) + (plan.get("pretrain") or []))
        if track is None:
            return None
        mlflow, experiment, tensorboard = _asked(track)
        return log_study(study_dir, mlflow, experiment, tensorboard, info=log)
    except Exception as e:
        _warn_stderr(f"cnnlab: warning: tracking failed ({_one_line(e)}); {study_dir} is intact")
        return None


def track_tune(tune_dir, log=None) -> dict | None:
    """After run_tune: log_tune when its trials' config asks for tracking. Never raises."""
    try:
        tune_dir = Path(tune_dir).resolve()
        configs = (_config_tree(p.parent) for p in sorted((tune_dir / "trials").glob("trial-*/config.yaml")))
        track = _first_track(configs)
        if track is None:
            return None
        mlflow, experiment, tensorboard = _asked(track)
        return log_tune(tune_dir, mlflow, experiment, tensorboard, info=log)
    except Exception as e:
        _warn_stderr(f"cnnlab: warning: tracking failed ({_one_line(e)}); {tune_dir} is intact")
        return None


def track_folder(folder, mlflow=None, experiment: str | None = None, tensorboard: bool = False, *,
                 info=None, warn=None) -> tuple[str, dict]:
    """`cnnlab track`: a run, study or tune folder made earlier → (its kind, the log_* result)."""
    folder = Path(folder)
    kind = folder_kind(folder)
    if mlflow:
        resolve_store(mlflow, folder)  # a bad URI: ConfigError before any work
    require(mlflow=bool(mlflow), tensorboard=tensorboard)
    fn = {"run": log_run, "study": log_study, "tune": log_tune}[kind]
    return kind, fn(folder, mlflow, experiment, tensorboard, info=info, warn=warn)
