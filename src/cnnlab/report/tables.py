"""Numbers into words and rows: the chance sentence, misclassified.csv, the study's comparison table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..fileio import replacing
from ..stats import IMBALANCED, chance_of, imbalance

ALPHA = 0.05  # the level at which "significantly" is said


def part_name(evaluated_on: str | None) -> str:
    """'test' / 'validation' (the split the metrics were computed on)."""
    return {"val": "validation", "test": "test"}.get(str(evaluated_on), str(evaluated_on or "test"))


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


def balance_sentence(metrics: dict, classes: list[str]) -> str:
    """How imbalanced the training classes are, and what (if anything) training did about it."""
    train = (metrics.get("class_counts") or {}).get("train") or []
    measured = imbalance(train)
    if measured is None:
        return ""
    ratio, big, small = measured
    bal = metrics.get("balancing") or {}
    done = [what for what, on in (("the loss weighted per class (data.class_weights=balanced)",
                                   bal.get("class_weights") is not None),
                                  ("a balanced sampler (data.sampler=balanced)", bal.get("sampler") == "balanced"))
            if on]
    if ratio == 1:
        text = f"The classes are balanced ({train[big]} training images each)."
    else:
        text = (f"The largest class ({classes[big]}, {train[big]}) has {ratio:.1f}× the training images of the "
                f"smallest ({classes[small]}, {train[small]}).")
    if done:
        return text + " Trained with " + " and ".join(done) + "."
    if ratio >= IMBALANCED:
        return text + " No balancing was used (data.class_weights / data.sampler)."
    return text


def chance_sentence(metrics: dict) -> str | None:
    """E.g. 'validation accuracy 0.600 on 20 images is not significantly above chance 0.550
    (p = 0.42, exact binomial)', from metrics.json's chance block."""
    ch = metrics.get("chance") or {}
    level, p = chance_of(metrics), ch.get("p_value_above_chance")
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
    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=MISCLASSIFIED_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
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


# --------------------------------------------------------------------------- study tables (cnnlab compare)

def _columns(summary: dict) -> list[tuple[str, str, float, str]]:
    """(header, metric key, scale, number format) of the per-metric columns."""
    parts = {v["evaluated_on"] for v in summary["variants"] if v["evaluated_on"]}
    loss = "Test loss" if parts <= {"test"} else "Validation loss" if parts == {"val"} else "Evaluation loss"
    avg = summary["averaging"]
    return [(loss, "loss", 1, ".3f"), ("Best epoch", "best_epoch", 1, ".1f"),
            (f"Precision ({avg})", "precision_macro", 1, ".3f"), (f"Recall ({avg})", "recall_macro", 1, ".3f"),
            (f"F1 ({avg})", "f1_macro", 1, ".3f"), ("Accuracy (%)", "accuracy", 100, ".2f")]


def _cell(stat: dict, scale: float, fmt: str) -> str:
    if stat["mean"] is None:
        return "–"
    text = format(stat["mean"] * scale, fmt)
    if stat["sd"] is not None:
        lo, hi = (x * scale for x in stat["ci95"])
        text += f" ± {stat['sd'] * scale:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"
    return text


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the comparison table (one row per variant)."""
    cols = _columns(summary)
    header = (["Variant", "Model", "Optimiser", "Learning rate"] + [c[0] for c in cols]
              + ["Parameters", "Training time (s)"])
    rows = []
    for v in summary["variants"]:
        m = v["metrics"]
        name = v["name"] + (f" ({len(v['failed'])} failed)" if v["failed"] else "")
        rows.append([name, v["model"], v["optimizer"], f"{v['lr']:g}"]
                    + [_cell(m[key], scale, fmt) for _, key, scale, fmt in cols]
                    + [f"{v['parameters']:,}" if v["parameters"] is not None else "–",
                       _cell(m["training_seconds"], 1, ".1f")])
    return header, rows


def _note(summary: dict) -> str:
    n_seeds = len(summary["seeds"])
    parts = sorted({f"{v['evaluated_on']} split ({v['n_eval']:,} images)" for v in summary["variants"]
                    if v["evaluated_on"]})
    spread = (f"mean ± sd [95 % t-interval] over {n_seeds} seeds" if n_seeds > 1 else "one seed: no spread")
    return (f"{spread}; precision, recall and F1 {summary['averaging']}-averaged over classes; evaluated on the "
            f"{', '.join(parts) or '–'}" + (f"; best: {summary['best']}" if summary["best"] else ""))


def render_markdown(summary: dict) -> str:
    header, rows = table_rows(summary)
    right = {i for i, h in enumerate(header) if i >= 3}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + f"\n\n{_note(summary)}\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    """Escape LaTeX's special characters; ± and – become math / text dashes."""
    out = "".join(_TEX.get(ch, ch) for ch in text)
    return out.replace("±", r"$\pm$").replace("–", "--")


def render_latex(summary: dict) -> str:
    header, rows = table_rows(summary)
    lines = [f"% {tex_escape(summary['name'])}: {tex_escape(_note(summary))}",
             r"\begin{tabular}{llll" + "r" * (len(header) - 4) + "}", r"\hline",
             " & ".join(tex_escape(h) for h in header) + r" \\", r"\hline"]
    lines += [" & ".join(tex_escape(c) for c in row) + r" \\" for row in rows]
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_csv(summary: dict, path: Path) -> None:
    """Machine-readable table: numbers unformatted, each statistic its own column."""
    cols = _columns(summary) + [("Training time (s)", "training_seconds", 1, "")]
    header = ["Variant", "Model", "Optimiser", "Learning rate"]
    for h, *_ in cols:
        header += [f"{h} mean", f"{h} sd", f"{h} ci95 low", f"{h} ci95 high"]
    header += ["Parameters", "Seeds", "Failed runs"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for v in summary["variants"]:
            row = [v["name"], v["model"], v["optimizer"], v["lr"]]
            for _, key, scale, _ in cols:
                s = v["metrics"][key]
                lo, hi = s["ci95"] or (None, None)
                row += ["" if x is None else x * scale for x in (s["mean"], s["sd"], lo, hi)]
            row += ["" if v["parameters"] is None else v["parameters"], len(v["runs"]), len(v["failed"])]
            w.writerow(row)


def write_tables(summary: dict, study_dir: Path) -> None:
    """table.md, table.csv and table.tex in the study folder."""
    (study_dir / "table.md").write_text(render_markdown(summary), encoding="utf-8")
    write_csv(summary, study_dir / "table.csv")
    (study_dir / "table.tex").write_text(render_latex(summary), encoding="utf-8")
