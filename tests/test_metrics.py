"""Metrics: Wilson intervals, labelled averages (checked against scikit-learn), confusion, chance."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from cnnlab.metrics import classification_metrics, wilson_interval


# --------------------------------------------------------------------------- Wilson

@pytest.mark.parametrize("k,n,expected", [
    (8, 10, (0.4902, 0.9433)),
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (5, 10, (0.2366, 0.7634)),
    (81, 263, (0.2553, 0.3662)),  # Newcombe (1998), Stat Med 17:857, example 81/263
])
def test_wilson_known_values(k, n, expected):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-4)
    assert hi == pytest.approx(expected[1], abs=1e-4)


def test_wilson_formula_by_hand():
    k, n, z = 37, 120, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half), abs=1e-12)


def test_wilson_other_confidence_levels_nest():
    lo90, hi90 = wilson_interval(30, 50, 0.90)
    lo95, hi95 = wilson_interval(30, 50, 0.95)
    lo99, hi99 = wilson_interval(30, 50, 0.99)
    assert lo99 < lo95 < lo90 < 0.6 < hi90 < hi95 < hi99


def test_wilson_empty():
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("n", [1, 3, 10, 45, 300])
def test_wilson_contains_the_estimate_and_stays_in_unit_interval(n):
    """Also at 0 % and 100 %, where a careless formula lands an ulp inside (0.9999999999999999 < 1.0)."""
    for k in range(n + 1):
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)


# --------------------------------------------------------------------------- classification metrics

CLASSES = ["ant", "bee", "cat"]
Y_TRUE = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 2, 1, 1, 0, 2, 2, 2, 2, 2, 2, 2, 0, 0, 1, 2])


def test_averages_match_sklearn_and_are_labelled():
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES, loss=0.5)
    assert m["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    assert m["n"] == 20 and m["loss"] == 0.5
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(Y_TRUE, Y_PRED, average=avg, zero_division=0)
        assert m[f"precision_{avg}"] == pytest.approx(p)
        assert m[f"recall_{avg}"] == pytest.approx(r)
        assert m[f"f1_{avg}"] == pytest.approx(f)
    # unbalanced classes: the two averages really differ, so mixing them up would show
    assert abs(m["f1_macro"] - m["f1_weighted"]) > 0.01
    assert "precision" not in m and "f1" not in m  # no unlabelled average
    p, r, f, s = precision_recall_fscore_support(Y_TRUE, Y_PRED, zero_division=0)
    for i, c in enumerate(CLASSES):
        pc = m["per_class"][c]
        assert (pc["precision"], pc["recall"], pc["f1"]) == pytest.approx((p[i], r[i], f[i]))
        assert pc["support"] == s[i]
    assert m["classes"] == CLASSES


@pytest.mark.parametrize("seed", range(12))
def test_every_figure_matches_sklearn_and_scipy_on_random_labels(seed):
    """cnnlab computes these on numpy + scipy.special (sklearn.metrics / scipy.stats cost ~1.2 s of every
    run's start); they must agree with the libraries everywhere, also for classes never predicted or absent."""
    from scipy.stats import binomtest, norm

    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    n = int(rng.integers(1, 60))
    present = rng.choice(k, size=max(1, k - int(rng.integers(0, 3))), replace=False)  # some classes absent
    y_true = rng.choice(present, size=n)
    y_pred = np.where(rng.random(n) < rng.random(), y_true, rng.choice(present, size=n))
    classes = [f"c{i}" for i in range(k)]
    m = classification_metrics(y_true, y_pred, classes)
    labels = list(range(k))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    p, r, f, sup = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, c in enumerate(classes):
        assert m["per_class"][c] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i],
                                                   "support": sup[i]}, abs=1e-12)
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        assert (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]) == pytest.approx((p, r, f), abs=1e-12)
    correct = int((y_true == y_pred).sum())
    rate = max(m["chance"]["accuracy"], 1 / k)
    assert m["chance"]["p_value_above_chance"] == pytest.approx(
        binomtest(correct, n, rate, alternative="greater").pvalue, rel=1e-9, abs=1e-15)
    z = norm.ppf(0.975)
    phat = correct / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    assert sum(m["accuracy_ci95"]) / 2 == pytest.approx(centre, abs=1e-12) or phat in (0.0, 1.0)


def test_macro_by_hand():
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES)
    # recall per class: ant 3/6, bee 2/3, cat 8/11
    assert m["recall_macro"] == pytest.approx((3 / 6 + 2 / 3 + 8 / 11) / 3)
    assert m["recall_weighted"] == pytest.approx(13 / 20)  # weighted recall = accuracy
    assert m["accuracy"] == pytest.approx(13 / 20)


def test_confusion_matrix_rows_are_true_classes():
    y_true = np.array([0, 0, 0, 1, 2])
    y_pred = np.array([1, 1, 0, 1, 2])
    m = classification_metrics(y_true, y_pred, CLASSES)
    cm = m["confusion_matrix"]
    assert cm == [[1, 2, 0], [0, 1, 0], [0, 0, 1]]
    assert cm == confusion_matrix(y_true, y_pred).tolist()
    assert [sum(row) for row in cm] == [3, 1, 1]  # row sums = true class counts
    assert m["confusion_matrix_axes"].startswith("rows: true")


def test_confusion_matrix_keeps_absent_classes():
    m = classification_metrics(np.array([0, 0, 1]), np.array([0, 1, 1]), ["a", "b", "c", "d"])
    assert np.array(m["confusion_matrix"]).shape == (4, 4)
    assert m["per_class"]["d"]["support"] == 0


def test_no_warnings_for_classes_never_predicted():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(np.array([0, 1, 2, 2]), np.array([0, 0, 0, 0]), CLASSES)
    assert m["per_class"]["cat"]["precision"] == 0.0


def test_chance_is_the_training_majority_class():
    # the test set's majority is 'cat' (2) but training's is 'bee' (1)
    train = np.array([1] * 50 + [0] * 20 + [2] * 30)
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES, train_labels=train)
    assert m["chance"]["majority_class"] == "bee"
    assert m["chance"]["accuracy"] == pytest.approx(3 / 20)  # always answering 'bee' on this test set
    assert m["chance"]["uniform"] == pytest.approx(1 / 3)
    without = classification_metrics(Y_TRUE, Y_PRED, CLASSES)
    assert without["chance"]["majority_class"] == "cat"
    assert without["chance"]["accuracy"] == pytest.approx(11 / 20)


def test_binomial_p_value_against_known_value():
    # 7 of 10 right on a balanced 2-class problem: P(X ≥ 7 | n=10, p=0.5) = 176/1024
    y_true = np.array([0, 1] * 5)
    y_pred = y_true.copy()
    y_pred[:3] = 1 - y_pred[:3]
    m = classification_metrics(y_true, y_pred, ["a", "b"], train_labels=np.array([0, 1, 0, 1]))
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["chance"]["p_value_above_chance"] == pytest.approx(176 / 1024, rel=1e-9)


def test_binomial_p_value_uses_majority_rate_when_above_uniform():
    from scipy.stats import binomtest

    train = np.array([2] * 80 + [0] * 10 + [1] * 10)
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES, train_labels=train)
    expected = binomtest(13, 20, 11 / 20, alternative="greater").pvalue
    assert m["chance"]["p_value_above_chance"] == pytest.approx(expected)
    by_hand = sum(math.comb(20, j) * 0.55 ** j * 0.45 ** (20 - j) for j in range(13, 21))  # P(X ≥ 13)
    assert m["chance"]["p_value_above_chance"] == pytest.approx(by_hand, rel=1e-9)


def test_metrics_are_json_serialisable():
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES, loss=1.25, train_labels=Y_TRUE)
    again = json.loads(json.dumps(m))
    assert again["accuracy_ci95"] == pytest.approx(list(wilson_interval(13, 20)))
    assert again["confusion_matrix"] == m["confusion_matrix"]
