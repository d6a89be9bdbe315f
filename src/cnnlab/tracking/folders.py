"""Reading run, study and tune folders for the trackers (params, per-epoch and final metrics, fingerprints,
the default store beside them), and FOLDER/tracking.json: what was uploaded where, and the one-warning rule for
a tracker that fails."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import sys
from pathlib import Path

import yaml

from .settings import DEFAULT_DB, TrackingError, check_mlflow_uri, shown

TRACKING_FILE = "tracking.json"
# history.csv column → (MLflow metric, TensorBoard tag)
HISTORY_NAMES = {"loss": ("loss", "train/loss"), "accuracy": ("accuracy", "train/accuracy"),
                 "val_loss": ("val_loss", "val/loss"), "val_accuracy": ("val_accuracy", "val/accuracy"),
                 "lr": ("lr", "train/lr"), "seconds": ("epoch_seconds", "time/epoch_seconds")}
FINAL_METRICS = ["accuracy", "loss", "precision_macro", "recall_macro", "f1_macro", "precision_weighted",
                 "recall_weighted", "f1_weighted", "n"]
RUN_FIGURES = ["best_epoch", "epochs_run", "training_seconds", "parameters", "trainable_parameters"]
MAX_RECORDS = 20


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
    """sqlite:///<the folder that holds the run, study or tune>/mlflow.db (see cnnlab.tracking's docstring)."""
    folder = Path(folder).resolve()
    root = group_folder(folder) or folder
    return f"sqlite:///{root.parent / DEFAULT_DB}"


def resolve_store(mlflow, folder: Path) -> str:
    uri = check_mlflow_uri("default" if mlflow is True else mlflow, "--mlflow")
    return default_store(folder) if uri == "default" else uri


def _read_json(path: Path, default=None):
    from ..runs import read_json

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
    from ..runs import is_finished

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
    from ..config import dotted

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
    from ..runs import write_json

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
