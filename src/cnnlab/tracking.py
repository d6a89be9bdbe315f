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

Longer than the project's ~400-line guide: the two trackers share the reading of the folders, the records in
tracking.json and the one-warning failure rule, and the task keeps them in this one module.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from ._version import __version__
from .configio import ConfigError

TRACKING_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
DEFAULT_DB = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
RUN_ARTIFACTS = ["config.yaml", "metrics.json", "history.csv", "env.json", "predictions.csv", "misclassified.csv",
                 "split.json", "bad_files.csv", "failure.json", "report.html", "model.safetensors"]
STUDY_ARTIFACTS = ["summary.json", "plan.json", "study.yaml", "table.md", "table.csv", "table.tex", "report.html"]
TUNE_ARTIFACTS = ["summary.json", "tune.json", "tune.yaml", "best.yaml", "revalidate.yaml", "report.html",
                  "revalidate/summary.json", "revalidate/table.md", "revalidate/table.csv", "revalidate/report.html"]
# history.csv column → (MLflow metric, TensorBoard tag)
HISTORY_NAMES = {"loss": ("loss", "train/loss"), "accuracy": ("accuracy", "train/accuracy"),
                 "val_loss": ("val_loss", "val/loss"), "val_accuracy": ("val_accuracy", "val/accuracy"),
                 "lr": ("lr", "train/lr"), "seconds": ("epoch_seconds", "time/epoch_seconds")}
FINAL_METRICS = ["accuracy", "loss", "precision_macro", "recall_macro", "f1_macro", "precision_weighted",
                 "recall_weighted", "f1_weighted", "n"]
RUN_FIGURES = ["best_epoch", "epochs_run", "training_seconds", "parameters", "trainable_parameters"]
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# unless set by the user: a dead server costs seconds, not MLflow's default of 7 retries with backoff (minutes);
# no "View run" lines per run on stdout (a study has dozens; the one line cnnlab prints has the run's address)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
QUIET_LOGGERS = ("mlflow", "alembic", "urllib3", "sqlalchemy", "databricks", "git")
MAX_RECORDS = 20


class TrackingError(ValueError):
    """A folder that cannot be tracked, or a tracker that is not installed."""


# --------------------------------------------------------------------------- settings

def check_mlflow_uri(uri: str, key: str = "track.mlflow") -> str:
    """A valid track.mlflow value: 'default', or a tracking URI (sqlite:///relative made absolute)."""
    text = str(uri).strip()
    if text in ("default", "true"):
        return "default"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    base = scheme.split("+")[0]
    hint = ("use 'default' (sqlite:///<parent folder>/mlflow.db), sqlite:///PATH.db, http(s)://HOST:PORT "
            "(an MLflow server), postgresql://…, mysql://… or databricks")
    if not text:
        raise ConfigError(f"{key}: empty; {hint}")
    if scheme in ("", "file") or (len(scheme) == 1 and text[1:2] == ":"):  # a path (or C:\…)
        where = parts.path if scheme == "file" else text
        raise ConfigError(f"{key}: {text!r} is a file path; MLflow's file store is deprecated and not used here: "
                          f"write sqlite:///{Path(where).expanduser() / DEFAULT_DB} (a SQLite store) or 'default'")
    if base == "sqlite":
        path = text.split(":///", 1)[1] if ":///" in text else ""
        if not path or path == ":memory:":
            raise ConfigError(f"{key}: {text!r}: a SQLite store needs a file, as sqlite:///PATH.db "
                              "(relative to the current folder) or sqlite:////ABSOLUTE/PATH.db")
        return f"{scheme}:///{Path(path).expanduser().resolve()}"
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ConfigError(f"{key}: {text!r} names no host; e.g. http://127.0.0.1:5000")
        return text
    if base in SQL_SCHEMES or scheme in ("databricks", "databricks-uc", "uc"):
        return text
    raise ConfigError(f"{key}: unknown tracking URI scheme {scheme!r} in {text!r}; {hint}")


def shown(uri: str) -> str:
    """A URI without its password (kept out of tracking.json and messages)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def require(mlflow: bool = False, tensorboard: bool = False) -> None:
    """TrackingError naming the extra to install when a tracker's package is missing (or cannot be imported)."""
    for wanted, module, extra in ((mlflow, "mlflow", "mlflow"), (tensorboard, "tensorboard", "tensorboard")):
        if wanted:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise TrackingError(f"{module} cannot be imported ({e}): pip install 'cnnlab[{extra}]'") from None


def group_folder(folder: Path) -> Path | None:
    """The outermost study or tune folder that `folder` (a run, or a tune's re-validation study) belongs to."""
    folder = Path(folder).resolve()
    outer = None
    for up in list(folder.parents)[:5]:
        rel = folder.relative_to(up).as_posix()
        if (up / "tune.json").is_file() and rel.split("/")[0] in ("trials", "revalidate"):
            outer = up
        elif (up / "plan.json").is_file() and rel in _plan_runs(up):
            outer = up
    return outer


def default_store(folder: Path) -> str:
    """sqlite:///<the folder that holds the run, study or tune>/mlflow.db (see the module's docstring)."""
    folder = Path(folder).resolve()
    root = group_folder(folder) or folder
    return f"sqlite:///{root.parent / DEFAULT_DB}"


def resolve_store(mlflow, folder: Path) -> str:
    uri = check_mlflow_uri("default" if mlflow is True else mlflow, "--mlflow")
    return default_store(folder) if uri == "default" else uri


# --------------------------------------------------------------------------- reading folders

def _read_json(path: Path, default=None):
    from .runs import read_json

    if default is not None and not Path(path).is_file():
        return default
    return read_json(path)


def _plan_runs(study_dir: Path) -> dict[str, dict]:
    """{relative run folder: {variant, seed, group}} of a study's plan.json, pretrain runs first."""
    plan = _read_json(study_dir / "plan.json", {})
    out = {}
    for kind in ("pretrain", "variants"):
        for entry in plan.get(kind) or []:
            for rel in entry.get("runs") or []:
                seed = rel.rsplit("seed-", 1)[1] if "/seed-" in rel else None
                out[rel] = {"variant": entry.get("name"), "seed": seed, "group": kind.rstrip("s")}
    return out


def _config_tree(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TrackingError(f"{run_dir / 'config.yaml'}: unreadable ({e})") from None


def _check_run_folder(run_dir: Path) -> None:
    if not ((run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()):
        raise TrackingError(f"{run_dir} is not a finished run folder (it needs config.yaml and metrics.json)")


def folder_kind(folder: Path) -> str:
    """'tune' (tune.json), 'study' (plan.json) or 'run' (config.yaml + metrics.json); TrackingError otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrackingError(f"{folder}: no such folder")
    if (folder / "tune.json").is_file():
        return "tune"
    if (folder / "plan.json").is_file():
        return "study"
    if (folder / "config.yaml").is_file() and (folder / "metrics.json").is_file():
        return "run"
    raise TrackingError(f"{folder} is not a run folder (config.yaml + metrics.json), a study folder (plan.json) "
                        "or a tune folder (tune.json)")


def _fingerprint(folder: Path, names) -> str:
    h = hashlib.sha256()
    for name in names:
        p = folder / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"-") + b"\0")
    return h.hexdigest()[:16]


def _finished(run_dir: Path) -> bool:
    from .runs import is_finished

    return is_finished(run_dir)


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _key(name: str) -> str:
    """A metric / param name MLflow accepts (letters, digits, _ - . / and space)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", str(name))[:250]


def _times(run_dir: Path, env: dict, metrics: dict) -> tuple[int, int]:
    """(start, end) of the run in ms since the epoch, from env.json (else metrics.json's time)."""
    written = (run_dir / "metrics.json").stat().st_mtime
    wall = _number(env.get("wall_seconds"))
    try:
        start = dt.datetime.fromisoformat(str(env["started_at"])).timestamp()
    except (KeyError, TypeError, ValueError):
        start = written - (wall or _number(metrics.get("training_seconds")) or 0.0)
    end = start + wall if wall is not None else max(written, start)
    return int(start * 1000), int(end * 1000)


def _params(run_dir: Path) -> dict[str, str]:
    from .config import dotted

    out = {}
    for k, v in dotted(_config_tree(run_dir)).items():
        if k.startswith("track."):  # how it was tracked is no parameter (and a URI may hold a password)
            continue
        out[_key(k)] = _text(v)
    return out


def _final_prefix(metrics: dict) -> str:
    on = metrics.get("evaluated_on") or "test"
    return "test_" if on == "test" else "eval_"


def _final_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json's figures as {name: value}: test_* (or eval_*) plus the run's own figures."""
    p, out = _final_prefix(metrics), {}
    for k in FINAL_METRICS:
        if _number(metrics.get(k)) is not None:
            out[p + k] = _number(metrics[k])
    ci = metrics.get("accuracy_ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_number(x) is not None for x in ci):
        out[p + "accuracy_ci95_low"], out[p + "accuracy_ci95_high"] = float(ci[0]), float(ci[1])
    chance = metrics.get("chance") or {}
    for k, name in (("accuracy", "chance_accuracy"), ("p_value_above_chance", "p_value_above_chance")):
        if _number(chance.get(k)) is not None:
            out[p + name] = _number(chance[k])
    for cls, row in (metrics.get("per_class") or {}).items():
        for m in ("precision", "recall", "f1"):
            if _number((row or {}).get(m)) is not None:
                out[_key(f"{p}{m}/{cls}")] = _number(row[m])
    for k in RUN_FIGURES:
        if _number(metrics.get(k)) is not None:
            out[k] = _number(metrics[k])
    return out


# --------------------------------------------------------------------------- tracking.json

def _record(folder: Path) -> dict:
    try:
        rec = json.loads((folder / TRACKING_FILE).read_text(encoding="utf-8"))
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_record(folder: Path, rec: dict) -> None:
    from .runs import write_json

    write_json(folder / TRACKING_FILE, rec)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _remember(folder: Path, tracker: str, entry: dict, match=("uri", "experiment")) -> None:
    """Keep `entry` in FOLDER/tracking.json, replacing the earlier one for the same store and experiment."""
    rec = _record(folder)
    if tracker == "tensorboard":
        rec["tensorboard"] = entry
    else:
        old = [e for e in rec.get(tracker) or [] if any(e.get(m) != entry.get(m) for m in match)]
        rec[tracker] = (old + [entry])[-MAX_RECORDS:]
    _save_record(folder, rec)


def _known_run(folder: Path, uri: str, experiment: str) -> dict | None:
    for e in reversed(_record(folder).get("mlflow") or []):
        if e.get("uri") == shown(uri) and e.get("experiment") == experiment and e.get("run_id") \
                and not e.get("error"):
            return e
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:400]


def _warn_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _failed(folder: Path, errors: list[tuple[str, str, dict]], warn, hint: str) -> None:
    """Record each failure in FOLDER/tracking.json; ONE warning line for all of them."""
    for tracker, error, entry in errors:
        try:
            _remember(folder, tracker, {**entry, "error": error, "at": _now()})
        except OSError:
            pass
    what = "; ".join(f"{t}: {e}" for t, e, _ in errors)
    (warn or _warn_stderr)(f"cnnlab: warning: tracking failed ({what}); {folder} is intact — the error is in "
                           f"{folder / TRACKING_FILE}; upload it later with: {hint}")


# --------------------------------------------------------------------------- MLflow

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
    from .runs import read_history

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


# --------------------------------------------------------------------------- TensorBoard

def _hparam(v):
    if isinstance(v, (bool, int, float, str)):
        return v
    return "null" if v is None else _text(v)


def _confusion_image(run_dir: Path, m: dict):
    """The confusion-matrix figure as an H×W×3 uint8 array: plots/confusion.png, else drawn from metrics.json
    (or predictions.csv); None when neither has it."""
    import numpy as np
    from PIL import Image

    png = run_dir / "plots" / "confusion.png"
    if not png.is_file():
        cm, classes = m.get("confusion_matrix"), m.get("classes")
        if cm is None or not classes:
            from .runs import read_csv

            rows = read_csv(run_dir / "predictions.csv")
            if not rows:
                return None
            classes = sorted({r["true"] for r in rows} | {r["predicted"] for r in rows})
            cm = np.zeros((len(classes), len(classes)), dtype=int)
            for r in rows:
                cm[classes.index(r["true"]), classes.index(r["predicted"])] += 1
        from .report.plots import confusion

        with tempfile.TemporaryDirectory() as tmp:
            path = confusion(np.asarray(cm, dtype=int), list(classes), Path(tmp) / "confusion.png",
                             title=run_dir.name)
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
    with Image.open(png) as img:
        return np.asarray(img.convert("RGB"))


def _tensorboard_run(run_dir: Path) -> dict:
    """RUN/tensorboard/: scalars per epoch, the final metrics, the hparams view and the confusion matrix.
    Rewritten from the folder each time (skipped while the results it was made from are unchanged)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError:
        raise TrackingError("TensorBoard is not installed: pip install 'cnnlab[tensorboard]'") from None
    from .runs import read_history

    run_dir = Path(run_dir).resolve()
    out = run_dir / TENSORBOARD_DIR
    fp = _fingerprint(run_dir, ["config.yaml", "metrics.json", "history.csv"])
    rec = _record(run_dir).get("tensorboard") or {}
    if rec.get("fingerprint") == fp and not rec.get("error") and out.is_dir() and any(out.iterdir()):
        return {"dir": str(out), "reused": True}
    m = _read_json(run_dir / "metrics.json")
    env = _read_json(run_dir / "env.json", {})
    start, end = _times(run_dir, env, m)
    if out.exists():
        shutil.rmtree(out)
    w = SummaryWriter(log_dir=str(out))
    try:
        t = start / 1000
        history = read_history(run_dir / "history.csv")
        for row in history:
            step = int(row.get("epoch", 0))
            t += _number(row.get("seconds")) or 0.0
            for k, v in row.items():
                if k != "epoch" and _number(v) is not None:
                    w.add_scalar(HISTORY_NAMES.get(k, (k, f"extra/{_key(k)}"))[1], _number(v), step, walltime=t)
        last = int(m.get("epochs_run") or (history[-1].get("epoch", 0) if history else 0))
        part = m.get("evaluated_on") or "test"
        finals = {}
        for k in FINAL_METRICS[:-1]:
            if _number(m.get(k)) is not None:
                finals[f"{part}/{k}"] = _number(m[k])
        for tag, v in finals.items():
            w.add_scalar(tag, v, last, walltime=end / 1000)
        from .config import RESULT_NEUTRAL, dotted

        hp = {k: _hparam(v) for k, v in dotted(_config_tree(run_dir)).items()
              if not k.startswith("track.") and k not in RESULT_NEUTRAL}
        if finals:
            for summary in hparams(hp, finals):
                w.file_writer.add_summary(summary, walltime=end / 1000)
        image = _confusion_image(run_dir, m)
        if image is not None:
            w.add_image("confusion_matrix", image, int(m.get("best_epoch") or last), walltime=end / 1000,
                        dataformats="HWC")
    finally:
        w.close()
    _remember(run_dir, "tensorboard", {"dir": TENSORBOARD_DIR, "fingerprint": fp, "at": _now()})
    return {"dir": str(out), "reused": False}


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
        try:
            with _quiet():
                result["tensorboard"] = _tensorboard_run(run_dir)
            info(f"tensorboard: {result['tensorboard']['dir']}")
        except Exception as e:
            result["tensorboard"] = {"error": _one_line(e)}
            errors.append(("tensorboard", _one_line(e), {"dir": TENSORBOARD_DIR}))
    if mlflow:
        uri = None
        try:
            uri = resolve_store(mlflow, run_dir)
            with _quiet(mlflow=True):
                client = _client(uri)
                exp_id = _experiment(client, uri, experiment)
                run_id, reused = _upload_run(client, uri, experiment, exp_id, run_dir, parent_run_id)
            result["mlflow"] = {"uri": shown(uri), "experiment": experiment, "experiment_id": exp_id,
                                "run_id": run_id, "reused": reused}
            info(f"mlflow: run {run_id} in experiment {experiment!r} at {_where(uri, exp_id, run_id)}"
                 + (" (uploaded before; unchanged)" if reused else ""))
        except Exception as e:
            result["mlflow"] = {"error": _one_line(e)}
            errors.append(("mlflow", _one_line(e), {"uri": shown(uri or str(mlflow)), "experiment": experiment}))
    if errors:
        _failed(run_dir, errors, warn, _track_hint(run_dir, mlflow, tensorboard))
    return result


def _where(uri: str, exp_id: str, run_id: str) -> str:
    """The store; a server's page of the run."""
    if uri.startswith(("http://", "https://")):
        return f"{shown(uri).rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return shown(uri)


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
        try:
            with _quiet():
                for run_dir, *_ in runs:
                    _tensorboard_run(run_dir)
            result["tensorboard"] = {"dir": str(folder), "runs": len(runs)}
            info(f"tensorboard: {len(runs)} run(s) under {folder} (tensorboard --logdir {folder})")
        except Exception as e:
            result["tensorboard"] = {"error": _one_line(e)}
            errors.append(("tensorboard", _one_line(e), {"dir": str(folder)}))
    if mlflow:
        uri = None
        try:
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
        except Exception as e:
            result["mlflow"] = {"error": _one_line(e)}
            errors.append(("mlflow", _one_line(e), {"uri": shown(uri or str(mlflow)), "experiment": experiment}))
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
