"""TensorBoard: RUN/tensorboard/ written from the run folder (scalars per epoch, the final metrics, the hparams
view, the confusion matrix as an image). torch's TensorBoard writer is imported inside the function."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .folders import (FINAL_METRICS, HISTORY_NAMES, _config_tree, _fingerprint, _key, _now, _number, _read_json,
                      _record, _remember, _text, _times)
from .settings import TrackingError

TENSORBOARD_DIR = "tensorboard"


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
            from ..runs import read_csv

            rows = read_csv(run_dir / "predictions.csv")
            if not rows:
                return None
            classes = sorted({r["true"] for r in rows} | {r["predicted"] for r in rows})
            cm = np.zeros((len(classes), len(classes)), dtype=int)
            for r in rows:
                cm[classes.index(r["true"]), classes.index(r["predicted"])] += 1
        from ..report.plots import confusion

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
    from ..runs import read_history

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
        from ..config import RESULT_NEUTRAL, dotted

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
