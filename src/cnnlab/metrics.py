"""Test metrics: accuracy with a Wilson interval, labelled P/R/F1 averages, confusion, chance level."""

from __future__ import annotations

import math

import numpy as np

from .stats import chance_level  # stats imports scipy only inside its functions

# Written here on numpy and scipy.special rather than imported from sklearn.metrics / scipy.stats: importing
# those two adds over a second to every run's start on 2 cores (see `python -X importtime -c "import torch,
# sklearn.metrics, scipy.stats"`), for a confusion matrix and four divisions. tests/test_metrics.py checks
# every figure against sklearn's precision_recall_fscore_support / confusion_matrix and scipy.stats'
# binomtest / norm.


def confusion_matrix(y_true, y_pred, k: int) -> np.ndarray:
    """k × k counts, rows the true class, columns the predicted one (sklearn's layout)."""
    codes = np.asarray(y_true, dtype=np.int64) * k + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(codes, minlength=k * k).reshape(k, k)


def _ratio(num, den) -> np.ndarray:
    """num / den, 0 where den is 0 (sklearn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def precision_recall_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix, 0 where undefined."""
    tp, predicted, support = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    return (_ratio(tp, predicted), _ratio(tp, support), _ratio(2 * tp, predicted + support), support)


def p_above(successes: int, n: int, p: float) -> float:
    """Exact one-sided binomial test (alternative: the rate is greater than p): P(X ≥ successes)."""
    from scipy.special import bdtrc

    return 1.0 if successes <= 0 else min(1.0, float(bdtrc(successes - 1, n, p)))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (good at small n and near 0 or 1)."""
    if n == 0:
        return (0.0, 1.0)
    from scipy.special import ndtri

    z = float(ndtri(0.5 + confidence / 2))  # the normal quantile
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
    correct = int((y_true == y_pred).sum())
    acc = correct / n if n else 0.0
    cm = confusion_matrix(y_true, y_pred, k)
    per = precision_recall_f1(cm)
    out = {
        "n": n,
        "loss": loss,
        "accuracy": acc,
        "accuracy_ci95": list(wilson_interval(correct, n)),
        "accuracy_ci_method": "Wilson score interval, 95 %",
    }
    support = per[3]
    for avg, w in (("macro", np.ones(k)), ("weighted", support)):
        p, r, f = (float(_ratio((v * w).sum(), w.sum())) for v in per[:3])
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = p, r, f
    out["per_class"] = {c: {"precision": float(per[0][i]), "recall": float(per[1][i]), "f1": float(per[2][i]),
                            "support": int(per[3][i])} for i, c in enumerate(classes)}
    out["confusion_matrix"] = cm.tolist()
    out["confusion_matrix_axes"] = "rows: true class, columns: predicted class (order of `classes`)"
    from_training = train_labels is not None and len(train_labels) > 0
    ref = np.asarray(train_labels) if from_training else y_true
    majority = int(np.bincount(ref, minlength=k).argmax())
    chance = float((y_true == majority).mean()) if n else 0.0
    out["chance"] = {"majority_class": classes[majority], "accuracy": chance, "uniform": 1.0 / k,
                     "majority_of": "the training split" if from_training else "these images"}
    if n:
        out["chance"]["p_value_above_chance"] = p_above(correct, n, chance_level(chance, k))
        out["chance"]["test"] = ("exact one-sided binomial test of accuracy against "
                                 "max(majority-class rate, 1/classes)")
    out["classes"] = list(classes)
    return out
