"""Reading run and study folders as plain files (the report never imports `train` or `api`).

A run folder holds config.yaml + metrics.json (+ history.csv, predictions.csv, env.json,
bad_files.csv); a study folder holds summary.json (written by `cnnlab compare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .. import runs
from ..runs import is_finished, read_csv, read_history  # noqa: F401  (is_finished: this package's too)


class ReportError(ValueError):
    """A folder the report cannot read."""


def is_study(folder: Path) -> bool:
    return (folder / "summary.json").is_file()


def read_json(path: Path):
    try:
        return runs.read_json(path)
    except runs.RunError as e:
        raise ReportError(str(e)) from None


@dataclass
class RunFolder:
    """Everything a report shows about one run, read from its files."""

    path: Path
    config_text: str
    config: dict
    metrics: dict
    history: list[dict] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)
    bad_files: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @property
    def classes(self) -> list[str]:
        return list(self.metrics.get("classes") or [])


def load_run_folder(path: Path) -> RunFolder:
    path = Path(path)
    if not is_finished(path):
        raise ReportError(f"{path} is not a finished run folder (needs config.yaml, metrics.json and "
                          "model.safetensors)")
    text = (path / "config.yaml").read_text(encoding="utf-8")
    config = yaml.safe_load(text) or {}
    env = read_json(path / "env.json") if (path / "env.json").is_file() else {}
    return RunFolder(path, text, config, read_json(path / "metrics.json"), read_history(path / "history.csv"),
                     env, read_csv(path / "predictions.csv"), read_csv(path / "bad_files.csv"))


def load_summary(study: Path) -> dict:
    if not is_study(study):
        raise ReportError(f"{study} is not a study folder (no summary.json)")
    return read_json(study / "summary.json")


def eval_images(run: RunFolder, indices: list[int]) -> tuple[dict[int, np.ndarray] | None, str | None]:
    """The evaluated images at dataset `indices` as (C, H, W) uint8 arrays, or (None, why not).

    Rebuilds the dataset from config.yaml exactly as training did (data.load_data), then checks the labels
    against predictions.csv so a changed data source is caught, not drawn.
    """
    from ..config import load_config
    from ..data import load_data

    d = run.config.get("data") or {}
    try:
        ds = load_data(load_config(run.path / "config.yaml").data, progress=False)
    except Exception as e:  # a moved folder, a missing package: the figure is skipped, the report goes on
        return None, f"the data source {d.get('source')!r} could not be read again ({type(e).__name__}: {e})"
    by_index = {int(r["index"]): r for r in run.predictions}
    n = len(ds)
    for i in indices:
        r = by_index.get(i)
        if i >= n or (r is not None and (ds.classes[int(ds.labels[i])] != r["true"]
                                         or (ds.paths and r.get("file") and ds.paths[i] != r["file"]))):
            return None, (f"the data source {d.get('source')!r} has changed since training "
                          "(its images no longer match predictions.csv)")
    return {i: ds.images[i].numpy() for i in indices}, None
