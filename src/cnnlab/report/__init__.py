"""Figures, tables and one self-contained HTML page for a run or a study folder.

    from cnnlab.report import write_report, plot_run, plot_study
    write_report("runs/demo")          # runs/demo/plots/*.png + runs/demo/report.html
    write_report("studies/alkhairi")   # the study's figures, every run's report, the study page

Reads run folders only (config.yaml, metrics.json, history.csv, predictions.csv, env.json,
bad_files.csv) and study folders (summary.json); never imports `train`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from . import plots as P
from . import tables as T
from .folders import (ReportError, RunFolder, eval_images, is_finished, is_study, load_run_folder, load_summary,
                      read_history, read_json)
from ..explain import grad_cam, last_conv, overlay
from ..fileio import atomic_write_text
from .html import run_page, study_page
from ..runs import training_pid

__all__ = ["write_report", "main_report", "plot_run", "plot_study", "ReportError"]

GRID_ROWS, GRID_COLUMNS = P.GRID_ROWS, P.GRID_COLUMNS
MOST_CONFUSED = 16
MANIFEST = "plots.json"  # which figures exist, why others do not, and the inputs they were drawn from
RUN_INPUTS = ("metrics.json", "history.csv", "predictions.csv", "config.yaml")


def _inputs(folder: Path, names) -> dict:
    """What the figures were drawn from: each file's (mtime, size), and the drawing code's version."""
    from .._version import __version__

    return {"cnnlab": __version__,
            **{n: [p.stat().st_mtime_ns, p.stat().st_size] for n in names if (p := folder / n).is_file()}}


def _write_manifest(plot_dir: Path, files: dict[str, Path], notes: list[str], inputs: dict) -> None:
    folder = plot_dir.parent
    manifest = {"files": {k: v.relative_to(folder).as_posix() for k, v in files.items()}, "notes": notes,
                "inputs": inputs}
    (plot_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _read_manifest(plot_dir: Path, inputs: dict) -> tuple[dict[str, Path], list[str]] | None:
    """The figures drawn earlier from exactly these inputs, or None (draw again)."""
    path = plot_dir / MANIFEST
    try:
        manifest = read_json(path)
    except (OSError, ValueError):
        return None
    files = {k: plot_dir.parent / v for k, v in manifest.get("files", {}).items()}
    if manifest.get("inputs") != inputs or not all(p.is_file() for p in files.values()):
        return None
    return files, list(manifest.get("notes", []))


# --------------------------------------------------------------------------- runs

def _grid_sample(predictions: list[dict], k: int) -> list[dict]:
    """A seeded random sample of k evaluated images (predictions.csv is in class order, so the first
    k would show one or two classes only)."""
    order = np.random.default_rng(0).permutation(len(predictions))[:k]
    return [predictions[i] for i in order]


def _draw_run(run: RunFolder) -> tuple[dict[str, Path], list[str]]:
    out = run.path / "plots"
    out.mkdir(exist_ok=True)
    m, files, notes = run.metrics, {}, []
    part = T.part_name(m.get("evaluated_on"))
    if run.history:
        files["curves"] = P.training_curves(run.history, out / "curves.png", best_epoch=m.get("best_epoch"),
                                            chance=T.chance_of(m), title=f"{run.name}: training curves")
    else:
        notes.append("history.csv is missing or empty: no training curves.")
    if m.get("class_counts") and run.classes:
        files["counts"] = P.class_counts(m["class_counts"], run.classes, out / "class_counts.png",
                                         title=f"{run.name}: images per class")
    if m.get("confusion_matrix") and run.classes:
        files["confusion"] = P.confusion(m["confusion_matrix"], run.classes, out / "confusion.png",
                                         title=f"{run.name}: confusion matrix ({part}, n = {m.get('n')})")
    if not run.predictions:
        notes.append("predictions.csv is missing: no image grids and no misclassified.csv.")
        return files, notes
    mistakes = T.misclassified(run.predictions)
    files["misclassified"] = T.write_misclassified(run.path / "misclassified.csv", mistakes)
    sample = _grid_sample(run.predictions, GRID_ROWS * GRID_COLUMNS)
    confused = mistakes[:MOST_CONFUSED]
    images, why = eval_images(run, sorted({int(r["index"]) for r in sample + confused}))
    if images is None:
        notes.append(f"Image grids skipped: {why}.")
        return files, notes

    cams, why_not = _heatmaps(run, images)
    if cams is None:
        notes.append(f"No Grad-CAM heatmaps: {why_not}.")

    def grid(rows, path, title):
        shown = [images[int(r["index"])] for r in rows]
        over = [overlay(images[int(r["index"])], cams[int(r["index"])]) for r in rows] if cams else None
        return P.image_grid(shown, [P.grid_title(r["true"], r["predicted"], float(r["confidence"])) for r in rows],
                            [r["true"] == r["predicted"] for r in rows], path, columns=GRID_COLUMNS,
                            title=title + (" · Grad-CAM of the predicted class" if cams else ""), overlays=over)

    right = sum(r["true"] == r["predicted"] for r in sample)
    files["predictions"] = grid(sample, out / "predictions.png",
                                f"{len(sample)} {part} images: true / predicted (confidence) — {right} right, "
                                f"{len(sample) - right} wrong")
    if confused:
        files["confused"] = grid(confused, out / "confused.png",
                                 f"The {len(confused)} most confidently wrong of {len(mistakes)} mistakes"
                                 if len(confused) < len(mistakes) else
                                 f"All {len(mistakes)} mistakes, most confident first")
    else:
        notes.append(f"All {len(run.predictions)} evaluated images were classified correctly: nothing to show "
                     "as most confidently wrong.")
    return files, notes


def _heatmaps(run: RunFolder, images: dict[int, np.ndarray]) -> tuple[dict[int, np.ndarray] | None, str]:
    """Grad-CAM of the predicted class for each image (by dataset index), or (None, why not)."""
    import torch

    from ..data.loader import Normalizer
    from ..runs import MODEL_FILE, build_saved_model

    try:
        model, meta = build_saved_model(run.path / MODEL_FILE)
        if last_conv(model) is None:
            return None, f"{meta['model']} has no convolution layer"
        keys = sorted(images)
        x = Normalizer(meta["mean"], meta["std"])(torch.from_numpy(np.stack([images[k] for k in keys])))
        cams, _ = grad_cam(model, x)
    except Exception as e:  # a figure problem never loses the report
        return None, f"{type(e).__name__}: {e}"
    return dict(zip(keys, cams.numpy())), ""


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw a run's figures into <run>/plots/ (curves, confusion, predictions, confused) and write
    <run>/misclassified.csv; returns the files written. Figures that cannot be drawn (no history,
    data source gone) are skipped with a note that the report shows."""
    run = load_run_folder(Path(run_dir))
    files, notes = _draw_run(run)
    _write_manifest(run.path / "plots", files, notes, _inputs(run.path, RUN_INPUTS))
    return list(files.values())


def _run_plots(run: RunFolder, replot: bool) -> tuple[dict[str, Path], list[str]]:
    inputs = _inputs(run.path, RUN_INPUTS)
    cached = None if replot else _read_manifest(run.path / "plots", inputs)
    if cached is not None:
        return cached
    files, notes = _draw_run(run)
    _write_manifest(run.path / "plots", files, notes, inputs)
    return files, notes


def _write_run_report(folder: Path, replot: bool = False) -> Path:
    run = load_run_folder(folder)
    files, notes = _run_plots(run, replot)
    mistakes = T.misclassified(run.predictions)
    path = folder / "report.html"
    atomic_write_text(path, run_page(run, {k: v for k, v in files.items() if v.suffix == ".png"}, notes, mistakes))
    return path


# --------------------------------------------------------------------------- studies

def _variant_runs(study: Path, variant: dict) -> list[Path]:
    return [study / r for r in variant.get("runs") or [] if is_finished(study / r)]


def _study_chance(summary: dict, study: Path) -> float | None:
    levels = [c["chance"] for c in summary.get("chance", []) if c.get("chance") is not None]
    if levels:
        return max(levels)
    for v in summary.get("variants", []):
        for r in _variant_runs(study, v):
            return T.chance_of(read_json(r / "metrics.json"))
    return None


def _draw_study(study: Path, summary: dict) -> tuple[dict[str, Path], list[str]]:
    out = study / "plots"
    out.mkdir(exist_ok=True)
    files, notes = {}, []
    name = summary.get("name", study.name)
    variants = summary.get("variants", [])
    chance = _study_chance(summary, study)
    part = T.part_name(T.eval_part(summary))

    histories = {v["name"]: [h for r in _variant_runs(study, v) if (h := read_history(r / "history.csv"))]
                 for v in variants}
    histories = {k: v for k, v in histories.items() if v}
    if histories:
        files["curves"] = P.study_curves(histories, out / "curves.png", chance=chance,
                                         title=f"{name}: validation curves over seeds")
    bars = [{"name": v["name"], **{k: (v.get("metrics") or {}).get("accuracy", {}).get(k)
                                   for k in ("mean", "ci95", "values")}}
            for v in variants if ((v.get("metrics") or {}).get("accuracy") or {}).get("mean") is not None]
    if bars:
        n_seeds = len(summary.get("seeds", []))
        files["comparison"] = P.comparison_bars(bars, out / "comparison.png", chance=chance,
                                                metric_label=f"{part} accuracy",
                                                title=f"{name}: {part} accuracy per variant ({n_seeds} seeds)")
    ranked = sorted(bars, key=lambda b: -b["mean"])
    panels, classes = [], None
    for label, b in (("best", ranked[0] if ranked else None), ("worst", ranked[-1] if len(ranked) > 1 else None)):
        v = next((v for v in variants if b and v["name"] == b["name"]), None)
        runs = _variant_runs(study, v) if v else []
        if runs:
            m = read_json(runs[0] / "metrics.json")
            if m.get("confusion_matrix") and (classes is None or m.get("classes") == classes):
                classes = m.get("classes")
                panels.append((f"{label}: {P.short(v['name'], 24)} ({runs[0].name}, acc {m['accuracy']:.3f})",
                               m["confusion_matrix"]))
    if panels and classes:
        files["confusion"] = P.confusion_pair(panels, classes, out / "confusion.png",
                                              title=f"{name}: confusion matrices, best and worst variant")
    missing = [r for v in variants for r in v.get("runs") or [] if not is_finished(study / r)]
    if missing:
        notes.append(f"{len(missing)} run folder(s) listed in summary.json are missing: {', '.join(missing[:5])}"
                     + (" …" if len(missing) > 5 else ""))
    return files, notes


def plot_study(study_dir: str | Path) -> list[Path]:
    """Draw a study's figures into <study>/plots/ (curves with seed bands, the comparison bar chart, the
    best and worst variant's confusion matrices) and each variant's first run's own figures."""
    study = Path(study_dir)
    summary = load_summary(study)
    files, notes = _draw_study(study, summary)
    _write_manifest(study / "plots", files, notes, _inputs(study, ["summary.json"]))
    written = list(files.values())
    for v in summary.get("variants", []):
        runs = _variant_runs(study, v)
        if runs:
            written += plot_run(runs[0])
    return written


def _write_study_report(study: Path, replot: bool = False) -> Path:
    summary = load_summary(study)
    inputs = _inputs(study, ["summary.json"])
    cached = None if replot else _read_manifest(study / "plots", inputs)
    files, notes = cached if cached is not None else _draw_study(study, summary)
    if cached is None:
        _write_manifest(study / "plots", files, notes, inputs)
    links: dict[str, list[tuple[str, str]]] = {}
    for v in summary.get("variants", []):
        for r in _variant_runs(study, v):  # every run gets its own page, so every link works
            _write_run_report(r, replot)
            acc = read_json(r / "metrics.json").get("accuracy")
            label = f"{r.name} ({acc:.3f})" if isinstance(acc, (int, float)) else r.name
            links.setdefault(v["name"], []).append((label, (r / "report.html").relative_to(study).as_posix()))
    for p in summary.get("pretrain") or []:  # the runs whose weights fine-tuned variants start from
        r = study / str(p.get("run") or "")
        if p.get("run") and is_finished(r):
            _write_run_report(r, replot)
            links["pretrain/" + p["name"]] = [(r.name, (r / "report.html").relative_to(study).as_posix())]
    path = study / "report.html"
    atomic_write_text(path, study_page(summary, study, files, links, notes))
    return path


# --------------------------------------------------------------------------- entry points

def write_report(folder: str | Path, *, replot: bool = False) -> Path:
    """Write folder/report.html for a run folder (config.yaml + metrics.json) or a study folder
    (summary.json), drawing the figures first unless they are up to date (replot=True: always)."""
    folder = Path(folder)
    pid = training_pid(folder)
    if pid is not None and pid != os.getpid():  # (the training process itself reports once it has finished)
        raise ReportError(f"{folder} is still training (pid {pid}); write its report once the run has finished")
    if is_study(folder):
        return _write_study_report(folder, replot)
    if is_finished(folder):
        return _write_run_report(folder, replot)
    raise ReportError(f"{folder} is neither a run folder (config.yaml + metrics.json) "
                      "nor a study folder (summary.json)")


def main_report(args) -> int:
    """`cnnlab report FOLDER`: write the report and print where it is."""
    try:
        path = write_report(args.folder, replot=getattr(args, "replot", False))
    except ReportError as e:
        print(f"cnnlab: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0
