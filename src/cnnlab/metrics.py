"""Test metrics: accuracy with a Wilson interval, labelled P/R/F1 averages, confusion, chance level."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (good at small n and near 0 or 1)."""
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import norm

    z = norm.ppf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # rounding can push a bound past the estimate at 0/n or n/n: the interval must contain p
    return (0.0 if successes == 0 else min(lo, p), 1.0 if successes == n else max(hi, p))


def classification_metrics(y_true, y_pred, classes: list[str], *, loss: float | None = None,
                           train_labels=None) -> dict:
    """Everything metrics.json holds about one evaluation, each average labelled.

    chance: the accuracy of always predicting the training split's most frequent
    class (the majority-class baseline), with an exact one-sided binomial test of
    the model's accuracy against it.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n, k = len(y_true), len(classes)
    labels = list(range(k))
    correct = int((y_true == y_pred).sum())
    acc = correct / n if n else 0.0
    per = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {
        "n": n,
        "loss": loss,
        "accuracy": acc,
        "accuracy_ci95": list(wilson_interval(correct, n)),
        "accuracy_ci_method": "Wilson score interval, 95 %",
    }
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    out["per_class"] = {c: {"precision": float(per[0][i]), "recall": float(per[1][i]), "f1": float(per[2][i]),
                            "support": int(per[3][i])} for i, c in enumerate(classes)}
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    out["confusion_matrix_axes"] = "rows: true class, columns: predicted class (order of `classes`)"
    ref = np.asarray(train_labels) if train_labels is not None and len(train_labels) else y_true
    majority = int(np.bincount(ref, minlength=k).argmax())
    chance = float((y_true == majority).mean()) if n else 0.0
    out["chance"] = {"majority_class": classes[majority], "accuracy": chance, "uniform": 1.0 / k}
    if n:
        test = binomtest(correct, n, max(chance, 1.0 / k), alternative="greater")
        out["chance"]["p_value_above_chance"] = float(test.pvalue)
        out["chance"]["test"] = ("exact one-sided binomial test of accuracy against "
                                 "max(majority-class rate, 1/classes)")
    out["classes"] = list(classes)
    return out
