"""Numbers into words and rows: the chance sentence, misclassified.csv, the study's comparison table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

ALPHA = 0.05  # the level at which "significantly" is said


def part_name(evaluated_on: str | None) -> str:
    """'test' / 'validation' (the split the metrics were computed on)."""
    return {"val": "validation", "test": "test"}.get(str(evaluated_on), str(evaluated_on or "test"))


def fmt_p(p: float | None) -> str:
    """The one p-value format of cnnlab (stats.format_p): 'p = 0.42', 'p = 0.0040', 'p < 0.001'."""
    from ..stats import format_p

    return format_p(p)


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e6):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def chance_level(metrics: dict) -> float | None:
    """The accuracy the binomial test compares against: max(majority-class rate, 1/classes)."""
    ch = metrics.get("chance") or {}
    if "accuracy" not in ch:
        return None
    return max(float(ch["accuracy"]), float(ch.get("uniform") or 0.0))


def balance_sentence(metrics: dict, classes: list[str]) -> str:
    """How imbalanced the training classes are, and what (if anything) training did about it."""
    train = (metrics.get("class_counts") or {}).get("train") or []
    present = [(n, c) for n, c in zip(train, classes) if n > 0]
    if not present:
        return ""
    (hi, big), (lo, small) = max(present), min(present)
    bal = metrics.get("balancing") or {}
    done = [what for what, on in (("the loss weighted per class (data.class_weights=balanced)",
                                   bal.get("class_weights") is not None),
                                  ("a balanced sampler (data.sampler=balanced)", bal.get("sampler") == "balanced"))
            if on]
    if hi == lo:
        text = f"The classes are balanced ({hi} training images each)."
    else:
        text = f"The largest class ({big}, {hi}) has {hi / lo:.1f}× the training images of the smallest ({small}, {lo})."
    if done:
        return text + " Trained with " + " and ".join(done) + "."
    if hi / lo >= 1.5:
        return text + " No balancing was used (data.class_weights / data.sampler)."
    return text


def chance_sentence(metrics: dict) -> str | None:
    """E.g. 'validation accuracy 0.600 on 20 images is not significantly above chance 0.550
    (p = 0.42, exact binomial)', from metrics.json's chance block."""
    ch = metrics.get("chance") or {}
    level, p = chance_level(metrics), ch.get("p_value_above_chance")
    if level is None or p is None:
        return None
    from ..stats import chance_sentence as sentence

    return sentence(metrics["accuracy"], metrics["n"], level, p, part=metrics.get("evaluated_on") or "test")


def chance_explanation(metrics: dict) -> str:
    ch = metrics.get("chance") or {}
    k = len(metrics.get("classes") or []) or None
    parts = [f"Chance is the better of always answering the training split's most frequent class "
             f"'{ch.get('majority_class', '?')}' ({ch.get('accuracy', float('nan')):.3f} of these images)"]
    if ch.get("uniform") is not None:
        parts.append(f"and guessing uniformly among {k} classes ({ch['uniform']:.3f})")
    return " ".join(parts) + f"; one-sided exact binomial test, “significantly” means p < {ALPHA}."


# --------------------------------------------------------------------------- misclassified images

MISCLASSIFIED_COLUMNS = ["index", "file", "true", "predicted", "confidence"]


def misclassified(predictions: list[dict]) -> list[dict]:
    """predictions.csv's wrong rows, most confident first (ties keep the file's order)."""
    wrong = [r for r in predictions if r.get("true") != r.get("predicted")]
    return sorted(wrong, key=lambda r: -float(r["confidence"]))


def write_misclassified(path: Path, rows: list[dict]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=MISCLASSIFIED_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- runs

HISTORY_ORDER = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


def history_columns(history: list[dict]) -> list[str]:
    present = {k for row in history for k in row}
    return [c for c in HISTORY_ORDER if c in present] + sorted(present - set(HISTORY_ORDER))


def history_cell(key: str, v) -> str:
    if key == "epoch":
        return str(v)
    if key == "lr" and isinstance(v, float):
        return f"{v:.2e}"
    if key == "seconds" and isinstance(v, float):
        return f"{v:.1f}"
    return fmt(v, 4)


def average_rows(metrics: dict) -> list[tuple[str, float, float, float]]:
    """[("macro average", P, R, F1), ("weighted average", P, R, F1)] — each average named."""
    out = []
    for avg, label in (("macro", "macro average (each class counts equally)"),
                       ("weighted", "weighted average (by class support)")):
        if f"f1_{avg}" in metrics:
            out.append((label, metrics[f"precision_{avg}"], metrics[f"recall_{avg}"], metrics[f"f1_{avg}"]))
    return out


# --------------------------------------------------------------------------- studies

STUDY_METRICS = [("loss", "Test loss", 3), ("best_epoch", "Best epoch", 1), ("precision_{avg}", "Precision", 3),
                 ("recall_{avg}", "Recall", 3), ("f1_{avg}", "F1", 3), ("accuracy", "Accuracy", 3),
                 ("training_seconds", "Training (s)", 1)]


def mean_sd(stat: dict | None, digits: int) -> tuple[str, str]:
    """('0.912 ± 0.011', '[0.880, 0.944]') from {"mean", "sd", "ci95"}; sd/ci absent with one seed."""
    if not stat or stat.get("mean") is None:
        return "–", ""
    main = f"{stat['mean']:.{digits}f}"
    if stat.get("sd") is not None:
        main += f" ± {stat['sd']:.{digits}f}"
    ci = stat.get("ci95")
    return main, (f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def study_header(summary: dict) -> list[str]:
    avg = summary.get("averaging", "macro")
    part = part_name(eval_part(summary))
    names = []
    for key, label, _ in STUDY_METRICS:
        if "{avg}" in key:
            label = f"{label} ({avg})"
        if key == "loss":
            label = f"{part.capitalize()} loss"
        if key == "accuracy":
            label = f"{part.capitalize()} accuracy"
        names.append(label)
    return ["Variant", "Model", "Optimiser", "LR"] + names + ["Parameters"]


def eval_part(summary: dict) -> str:
    parts = {v.get("evaluated_on") for v in summary.get("variants", []) if v.get("evaluated_on")}
    return parts.pop() if len(parts) == 1 else "test"


def study_rows(summary: dict) -> list[dict]:
    """One row per variant, best accuracy first: {"name", "cells": [(main, sub)], "best": bool}."""
    avg = summary.get("averaging", "macro")
    variants = sorted(summary.get("variants", []),
                      key=lambda v: -(((v.get("metrics") or {}).get("accuracy") or {}).get("mean") or -1))
    rows = []
    for v in variants:
        m = v.get("metrics") or {}
        cells = [(str(v.get("model", "–")), ""), (str(v.get("optimizer", "–")), ""),
                 (f"{v['lr']:g}" if isinstance(v.get("lr"), (int, float)) else "–", "")]
        for key, _, digits in STUDY_METRICS:
            cells.append(mean_sd(m.get(key.format(avg=avg)), digits))
        done, failed = len(v.get("runs") or []), len(v.get("failed") or [])
        cells.append((fmt(v.get("parameters")), f"{done} runs" + (f", {failed} failed" if failed else "")))
        rows.append({"name": v["name"], "cells": cells, "best": v["name"] == summary.get("best")})
    return rows


def settings_text(settings: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (settings or {}).items())
