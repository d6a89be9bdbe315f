"""The run folder: the only contract between training and reporting.

    runs/<name>/
      config.yaml  split.json  history.csv  metrics.json  predictions.csv  model.safetensors  env.json
      [bad_files.csv]

Everything here reads and writes plain files (YAML, JSON, CSV, safetensors: no
pickle), so a run made elsewhere or months ago loads and reports the same way.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import Config, dump_config, load_config
from .fileio import atomic_write_bytes, atomic_write_text
from .tensorfile import TensorFileError, load_tensors, read_meta, save_tensors

MODEL_FILE = "model.safetensors"
MODEL_META_KEY = "cnnlab"


class RunError(ValueError):
    """A run folder that is missing or incomplete."""


def new_run_dir(name: str, out: str | Path | None = None, root: str | Path = "runs") -> Path:
    """`out` exactly (must be new or empty), else root/name, root/name-2, … (never overwrites a run)."""
    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunError(f"output folder {path} already exists and is not empty; "
                           "choose another --out (runs are never overwritten)")
    else:
        path, i = Path(root) / name, 2
        while path.exists():
            path, i = Path(root) / f"{name}-{i}", i + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, obj, compact: bool = False) -> None:
    """Indented JSON, written atomically; compact=True puts each top-level value on one line
    (split.json's long index lists)."""
    if compact and isinstance(obj, dict):
        text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, default=_json_default)}"
                                   for k, v in obj.items()) + "\n}"
    else:
        text = json.dumps(obj, indent=2, default=_json_default)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def read_json(path: Path) -> dict:
    """A run folder's JSON file; a missing, truncated or garbled one is a RunError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: unreadable JSON ({e}); the file is truncated or damaged") from None


HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


def _write_csv(path: Path, header: list[str], rows) -> None:
    """A CSV file, written atomically."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_history(path: Path, history: list[dict]) -> None:
    cols = HISTORY_COLUMNS + sorted({k for row in history for k in row} - set(HISTORY_COLUMNS))
    _write_csv(path, cols, ([repr(r[k]) if isinstance(r.get(k), float) else r.get(k, "") for k in cols]
                            for r in history))


def format_epoch(row: dict) -> str:
    """The Keras-style part of an epoch line: '2.6s - loss: 0.41 - accuracy: 0.86 - val_loss: … - lr: 1e-03'."""
    parts = [f"{row['seconds']:.1f}s"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if key in row:
            parts.append(f"{key}: {row[key]:.4f}")
    parts.append(f"lr: {row['lr']:.2e}")
    return " - ".join(parts)


def keras_log(history: list[dict], epochs: int | None = None) -> str:
    """The whole history as the Keras-style log `cnnlab train` printed (without step counts)."""
    total = epochs or (history[-1]["epoch"] if history else 0)
    return "\n".join(f"Epoch {int(r['epoch'])}/{total} - {format_epoch(r)}" for r in history)


def read_csv(path: Path) -> list[dict]:
    """Rows of a run folder's CSV file as dicts of strings ([] when the file is absent)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_history(path: Path) -> list[dict]:
    """history.csv → [{"epoch": int, "loss": float, …}] (empty cells dropped; a column that is not a number
    kept as text)."""
    out = []
    for row in read_csv(path):
        clean = {}
        for k, v in row.items():
            if k is None or v in ("", None):
                continue
            try:
                clean[k] = int(v) if k == "epoch" else float(v)
            except ValueError:
                clean[k] = v
        out.append(clean)
    return out


def is_finished(run_dir: Path) -> bool:
    """A finished run: its config, its test metrics and its best model are all written (metrics.json is
    written after model.safetensors, so a run killed while finishing is not taken for a finished one)."""
    run_dir = Path(run_dir)
    return all((run_dir / f).is_file() for f in ("config.yaml", "metrics.json", MODEL_FILE))


def write_bad_files(path: Path, bad: list[tuple[str, str]]) -> None:
    _write_csv(path, ["path", "reason"], bad)


def write_predictions(path: Path, indices: list[int], labels: torch.Tensor, logits: torch.Tensor,
                      classes: list[str], paths: list[str] | None) -> None:
    """One row per evaluated image: dataset index, file, true and predicted class, confidence, p(class)."""
    probs = torch.softmax(logits.float(), 1)
    conf, pred = probs.max(1)

    def rows():
        for j, i in enumerate(indices):
            t, p = int(labels[j]), int(pred[j])
            yield ([i, paths[i] if paths else "", classes[t], classes[p], int(t == p), f"{conf[j]:.6f}"]
                   + [f"{v:.6f}" for v in probs[j].tolist()])

    _write_csv(path, ["index", "file", "true", "predicted", "correct", "confidence"] + [f"p_{c}" for c in classes],
               rows())


def read_predictions(path: Path) -> list[dict]:
    return read_csv(path)


def save_model(path: Path, model: nn.Module, meta: dict) -> None:
    """Weights as safetensors; how to rebuild and feed the model as JSON in the header; a checksum of both."""
    save_tensors(path, model.state_dict(), MODEL_META_KEY, meta)


def read_model_meta(path: Path) -> dict:
    """The model file's JSON header alone (cheap: the weights are neither read nor verified)."""
    return read_meta(path, MODEL_META_KEY, "model file")


def build_saved_model(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild the architecture from the metadata and load the verified weights (no pickle, no code)."""
    from .models import create_model

    tensors, meta = load_tensors(path, MODEL_META_KEY, "model file")
    try:
        model = create_model(meta["model"], meta["num_classes"], meta["in_channels"], meta["image_size"],
                             **meta.get("options", {}))
        model.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise TensorFileError(f"{path}: its weights do not fit the model its header describes ({first})") from None
    model.eval()
    return model, meta


@dataclass
class Run:
    """A finished (or loaded) run: its folder and what it holds."""

    path: Path
    config: Config
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    _model: nn.Module | None = None
    _meta: dict | None = None

    @property
    def model(self) -> nn.Module:
        """The best epoch's model (loaded from model.safetensors on first use)."""
        if self._model is None:
            self._model, self._meta = build_saved_model(self.path / MODEL_FILE)
        return self._model

    @property
    def meta(self) -> dict:
        if self._meta is None:
            self._meta = read_model_meta(self.path / MODEL_FILE)
        return self._meta

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def split(self) -> dict:
        return read_json(self.path / "split.json")

    def data(self):
        """The run's images rebuilt from config.yaml as training built them (data.load_data), checked against
        split.json (data.split.check_saved_split): a DataError where they are no longer the run's."""
        from .data import load_data
        from .data.split import check_saved_split

        ds = load_data(self.config.data, progress=False)
        check_saved_split(self.split, ds.paths, len(ds), str(self.path))
        return ds

    def predict(self, paths, top_k: int = 3, device: str = "cpu") -> list[dict]:
        """Classify image files / folders; see `cnnlab.predict`."""
        from .inference import predict_files

        return predict_files(self, paths, top_k=top_k, device=device)

    def __repr__(self) -> str:
        acc = self.metrics.get("accuracy")
        return f"Run({str(self.path)!r}, accuracy={acc:.4f})" if acc is not None else f"Run({str(self.path)!r})"


def load_run(path: str | Path) -> Run:
    """Open a run folder written by `cnnlab train`."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise RunError(f"{path} is not a run folder (no config.yaml)")
    cfg = load_config(path / "config.yaml")
    run = Run(path, cfg)
    if (path / "history.csv").is_file():
        run.history = read_history(path / "history.csv")
    for name, attr in (("metrics.json", "metrics"), ("env.json", "env")):
        if (path / name).is_file():
            setattr(run, attr, read_json(path / name))
    return run


def write_config(path: Path, cfg: Config) -> None:
    atomic_write_text(path / "config.yaml", dump_config(cfg))


# --------------------------------------------------------------------------- in use

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder for one training process: a second (two `--resume` of one run) gets a RunError
    naming the holder's pid. An advisory lock (fcntl) on RUN/.lock, released by the OS if the holder dies,
    so a killed run never stays locked; a no-op where fcntl does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    f = open(Path(run_dir) / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 — held until the run ends
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunError(f"{run_dir} is in use by pid {f.read().strip() or '?'} (a training or resume of it is "
                           "still running); wait for it to end, or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # closing releases the lock


def training_pid(run_dir: Path) -> int | None:
    """The pid of the process training `run_dir` now, or None when nothing holds it."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        with open(Path(run_dir) / LOCK_FILE, encoding="utf-8") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = f.read().strip()
                return int(text) if text.isdigit() else -1
            return None
    except OSError:
        return None
