"""MLflow: the client and experiments of a store, one run folder uploaded as a run (reused while its results
are unchanged), a study's or tune's parent run; MLflow's own output kept quiet. mlflow is imported inside the
functions, never with the package."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
import warnings
from pathlib import Path

from .._version import __version__
from .folders import (HISTORY_NAMES, _config_tree, _final_metrics, _fingerprint, _key, _known_run, _now, _number,
                      _params, _read_json, _remember, _times)
from .settings import TrackingError, shown

ARTIFACT_DIR = "mlartifacts"
RUN_ARTIFACTS = ["config.yaml", "metrics.json", "history.csv", "env.json", "predictions.csv", "misclassified.csv",
                 "split.json", "bad_files.csv", "failure.json", "report.html", "model.safetensors"]
# unless set by the user: a dead server costs seconds, not MLflow's default of 7 retries with backoff (minutes);
# no "View run" lines per run on stdout (a study has dozens; the one line cnnlab prints has the run's address)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
QUIET_LOGGERS = ("mlflow", "alembic", "urllib3", "sqlalchemy", "databricks", "git")


@contextlib.contextmanager
def _quiet(mlflow: bool = False):
    """MLflow's own INFO lines, retry warnings and deprecation notes kept off the terminal; fast HTTP failures."""
    if mlflow:
        with contextlib.suppress(ImportError):
            importlib.import_module("mlflow")  # its import sets its loggers' levels: set ours after it
    levels = {}
    for name in QUIET_LOGGERS:
        lg = logging.getLogger(name)
        levels[name] = lg.level
        lg.setLevel(logging.CRITICAL)
    set_env = {k: v for k, v in HTTP_DEFAULTS.items() if k not in os.environ}
    os.environ.update(set_env)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for k in set_env:
            os.environ.pop(k, None)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("MLflow is not installed: pip install 'cnnlab[mlflow]'") from None
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _experiment(client, uri: str, name: str) -> str:
    """The experiment's id, created when missing (a SQLite store's artifacts in <its folder>/mlartifacts/)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "active":
        client.restore_experiment(exp.experiment_id)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / ARTIFACT_DIR).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={"cnnlab.version": __version__})
    except MlflowException:  # made by another process meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _log_batch(client, run_id: str, params: dict | None = None, metrics: list | None = None,
               tags: dict | None = None) -> None:
    """Params, metrics and tags in batches within MLflow's limits (100 params/tags, 1000 entities a call;
    a param value at most 6000 characters, a tag's 8000: longer ones are cut with '…')."""
    from mlflow.entities import Metric, Param, RunTag

    ps = [Param(k, v if len(v) <= 6000 else v[:5999] + "…") for k, v in (params or {}).items()]
    ts = [RunTag(k, v if len(v) <= 8000 else v[:7999] + "…") for k, v in (tags or {}).items()]
    ms = [Metric(k, v, t, s) for k, v, t, s in (metrics or [])]
    for i in range(0, len(ps), 100):
        client.log_batch(run_id, params=ps[i:i + 100])
    for i in range(0, len(ts), 100):
        client.log_batch(run_id, tags=ts[i:i + 100])
    for i in range(0, len(ms), 1000):
        client.log_batch(run_id, metrics=ms[i:i + 1000])


def _log_files(client, run_id: str, folder: Path, names, artifact_path: str | None = None) -> list[str]:
    """The files `names` (relative to folder: a/b.json goes to the artifacts' a/) and plots/ as artifacts."""
    done = []
    for name in names:
        if (folder / name).is_file():
            where = "/".join(filter(None, [artifact_path, Path(name).parent.as_posix().strip(".")]))
            client.log_artifact(run_id, str(folder / name), where or None)
            done.append(name)
    if (folder / "plots").is_dir() and any((folder / "plots").iterdir()):
        client.log_artifacts(run_id, str(folder / "plots"), "/".join(filter(None, [artifact_path, "plots"])))
        done.append("plots/")
    return done


def _alive(client, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # deleted store, another store: not ours to reuse
        return False


def _upload_run(client, uri: str, experiment: str, exp_id: str, run_dir: Path, parent_id: str | None = None,
                run_name: str | None = None, tags: dict | None = None, metrics: dict | None = None) -> tuple[str, bool]:
    """One run folder as an MLflow run (or the one uploaded before, when its results are unchanged):
    (run id, whether it was reused)."""
    run_dir = Path(run_dir).resolve()
    fp = _fingerprint(run_dir, ["config.yaml", "metrics.json", "history.csv"])
    known = _known_run(run_dir, uri, experiment)
    if known and known.get("fingerprint") == fp and _alive(client, known["run_id"]):
        if parent_id and known.get("parent_run_id") != parent_id:
            client.set_tag(known["run_id"], "mlflow.parentRunId", parent_id)
            _remember(run_dir, "mlflow", {**known, "parent_run_id": parent_id})
        return known["run_id"], True
    from ..runs import read_history

    m = _read_json(run_dir / "metrics.json")
    env = _read_json(run_dir / "env.json", {})
    cfg = _config_tree(run_dir)
    start, end = _times(run_dir, env, m)
    all_tags = {"cnnlab.kind": "run", "cnnlab.version": str(env.get("cnnlab") or __version__),
                "cnnlab.tracked_by": __version__, "cnnlab.run_dir": str(run_dir),
                "cnnlab.evaluated_on": str(m.get("evaluated_on") or "test"),
                "cnnlab.model": str((cfg.get("model") or {}).get("name", "")),
                "cnnlab.data_source": str((cfg.get("data") or {}).get("source", "")),
                "cnnlab.monitor": str(m.get("monitor", "")), "cnnlab.stopped_early": str(bool(m.get("stopped_early"))),
                "cnnlab.device": str(env.get("device", "")), "cnnlab.precision": str(env.get("precision", "")),
                **({"mlflow.parentRunId": parent_id} if parent_id else {}), **(tags or {})}
    if env.get("git_revision"):
        all_tags["mlflow.source.git.commit"] = str(env["git_revision"])
    run = client.create_run(exp_id, start_time=start, tags=all_tags, run_name=run_name or run_dir.name)
    run_id = run.info.run_id
    try:
        series, t = [], start
        for row in read_history(run_dir / "history.csv"):
            step = int(row.get("epoch", len(series) + 1))
            t += int(1000 * (_number(row.get("seconds")) or 0.0))
            for k, v in row.items():
                if k != "epoch" and _number(v) is not None:
                    series.append((_key(HISTORY_NAMES.get(k, (k,))[0]), _number(v), t, step))
        last = int(m.get("epochs_run") or (series[-1][3] if series else 0))
        finals = {**_final_metrics(m), **(metrics or {})}
        series += [(k, v, end, last) for k, v in finals.items()]
        _log_batch(client, run_id, params=_params(run_dir), metrics=series)
        _log_files(client, run_id, run_dir, RUN_ARTIFACTS)
        client.set_terminated(run_id, "FINISHED", end_time=end)
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        raise
    _remember(run_dir, "mlflow", {"uri": shown(uri), "experiment": experiment, "experiment_id": exp_id,
                                  "run_id": run_id, "parent_run_id": parent_id, "fingerprint": fp, "at": _now()})
    return run_id, False


def _parent_run(client, uri: str, experiment: str, exp_id: str, folder: Path, kind: str, name: str,
                fingerprint: str, params: dict, metrics: dict, tags: dict, artifacts: list[str]) -> str:
    """A study's / tune's own MLflow run: reused while its plan (fingerprint) is unchanged; metrics and
    artifacts brought up to date every time."""
    known = _known_run(folder, uri, experiment)
    now = int(time.time() * 1000)
    if known and known.get("fingerprint") == fingerprint and _alive(client, known["run_id"]):
        run_id = known["run_id"]
        _log_batch(client, run_id, tags=tags)
    else:
        run_id = client.create_run(exp_id, start_time=now, run_name=name,
                                   tags={"cnnlab.kind": kind, "cnnlab.version": __version__,
                                         f"cnnlab.{kind}_dir": str(folder), **tags}).info.run_id
        _log_batch(client, run_id, params=params)
    _log_batch(client, run_id, metrics=[(_key(k), v, now, 0) for k, v in metrics.items() if _number(v) is not None])
    _log_files(client, run_id, folder, artifacts)
    _remember(folder, "mlflow", {"uri": shown(uri), "experiment": experiment, "experiment_id": exp_id,
                                 "run_id": run_id, "fingerprint": fingerprint, "at": _now()})
    return run_id


def _where(uri: str, exp_id: str, run_id: str) -> str:
    """The store; a server's page of the run."""
    if uri.startswith(("http://", "https://")):
        return f"{shown(uri).rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return shown(uri)
