"""Honest numbers over seeds and samples: mean ± sd with a t-interval, paired tests, chance level.

Pure functions of plain numbers (no run folders, no torch):

    summarize([0.90, 0.92, 0.94])        {'mean': 0.92, 'sd': 0.02, 'ci95': [0.870, 0.970], 'values': [...], 'n': 3}
    mcnemar_exact(b=10, c=2)             0.0386   (two-sided exact binomial on the discordant pairs)
    paired_ttest([.9, .91], [.8, .83])   p of scipy.stats.ttest_rel, None below 2 shared seeds
    binomial_above_chance(12, 20, 0.5)   0.2517   (exact one-sided binomial, H1: accuracy > chance)
    comparison_sentence(...) / chance_sentence(...)  the plain statements a report prints

Conventions
- `sd` is the sample standard deviation (ddof=1). With one value there is no spread to
  estimate: `sd` and `ci95` are None (not 0), so a table shows the lone value and no interval.
- `ci95` is the Student-t interval mean ± t(0.975, n−1)·sd/√n: an interval for the mean over
  seeds (what another set of seeds would average to), not for a single run.
- A difference is called significant when p < ALPHA (0.05); the p-value is always printed, so a
  reader can apply another threshold.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

ALPHA = 0.05  # significance threshold used by the sentences


# --------------------------------------------------------------------------- over seeds

def summarize(values: Iterable[float], confidence: float = 0.95,
              bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict:
    """{'mean', 'sd', 'ci95', 'values', 'n'} of per-seed values.

    sd: sample sd (ddof=1); ci95: [lo, hi], the t-interval of the mean, clipped to `bounds`
    (the metric's possible range: an accuracy interval of [-0.27, 1.25] from 2 seeds says
    nothing a reader can use beyond [0, 1]). With n = 1 sd and ci95 are None; with n = 0
    the mean is None too.
    """
    vals = [float(v) for v in values]
    n = len(vals)
    out = {"mean": None, "sd": None, "ci95": None, "values": vals, "n": n}
    if n == 0:
        return out
    mean = math.fsum(vals) / n
    out["mean"] = mean
    if n >= 2:
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
        half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
        out["sd"], out["ci95"] = sd, [max(bounds[0], mean - half), min(bounds[1], mean + half)]
    return out


def t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t with df degrees of freedom (t_quantile(0.975, 2) = 4.303)."""
    from scipy.stats import t

    return float(t.ppf(q, df))


# --------------------------------------------------------------------------- paired tests

def discordant(correct_a: Sequence, correct_b: Sequence) -> tuple[int, int]:
    """(b, c) of two per-sample correctness vectors over the same samples:
    b = a right and b wrong, c = a wrong and b right."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired vectors differ in length: {len(correct_a)} vs {len(correct_b)}")
    b = sum(1 for x, y in zip(correct_a, correct_b) if bool(x) and not bool(y))
    c = sum(1 for x, y in zip(correct_a, correct_b) if not bool(x) and bool(y))
    return b, c


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar test: two-sided binomial test of b successes in b + c trials at p = 1/2.

    Only the discordant pairs (one model right, the other wrong) carry information. p = 1 when
    b = c or there are no discordant pairs.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative; got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    from scipy.stats import binom

    # two-sided: twice the smaller tail, capped at 1 (the usual exact McNemar; symmetric at p=1/2)
    return float(min(1.0, 2.0 * binom.cdf(min(b, c), n, 0.5)))


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided paired t-test (scipy.stats.ttest_rel) of per-seed values of two variants.

    None when fewer than 2 pairs, or when the test is undefined (every difference identical
    but not all zero: zero variance). 1.0 when every difference is zero.
    """
    if len(a) != len(b):
        raise ValueError(f"paired vectors differ in length: {len(a)} vs {len(b)}")
    if len(a) < 2:
        return None
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    if all(d == 0 for d in diffs):
        return 1.0
    if max(diffs) - min(diffs) <= 1e-12 * max(1.0, max(abs(d) for d in diffs)):  # rounding noise only
        return None
    from scipy.stats import ttest_rel

    p = float(ttest_rel(a, b).pvalue)
    return None if math.isnan(p) else p


# --------------------------------------------------------------------------- chance level

IMBALANCED = 1.5  # largest / smallest class at or above which a run is called imbalanced


def imbalance(counts: Sequence[int]) -> tuple[float, int, int] | None:
    """(largest / smallest count, index of the largest, index of the smallest) over the classes
    that have any images; None when none has."""
    present = [(n, i) for i, n in enumerate(counts) if n > 0]
    if not present:
        return None
    (hi, big), (lo, small) = max(present), min(present)
    return hi / lo, big, small


def chance_level(majority_rate: float, num_classes: int) -> float:
    """The accuracy to beat: max(always predicting the majority class, guessing uniformly)."""
    return max(float(majority_rate), 1.0 / num_classes)


def chance_of(metrics: dict) -> float | None:
    """chance_level of a metrics dict (metrics.classification_metrics' "chance" and "classes"; None without)."""
    ch = metrics.get("chance") or {}
    if "accuracy" not in ch:
        return None
    k = len(metrics.get("classes") or [])
    return chance_level(ch["accuracy"], k) if k else max(float(ch["accuracy"]), float(ch.get("uniform") or 0.0))


def binomial_above_chance(correct: int, n: int, chance: float) -> float:
    """Exact one-sided binomial test: P(X ≥ correct) for X ~ Binomial(n, chance)."""
    if not 0 <= correct <= n:
        raise ValueError(f"need 0 ≤ correct ≤ n; got correct={correct}, n={n}")
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(int(correct), int(n), float(chance), alternative="greater").pvalue)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of m p-values for testing m hypotheses at once (None stays None and is not
    counted). Controls the family-wise error rate without assuming independence:
    p_(i) adjusted = max over j ≤ i of min(1, (m − j + 1) · p_(j)), p sorted ascending.

        holm([0.01, 0.04, 0.03])   [0.03, 0.06, 0.06]
    """
    idx = sorted((i for i, p in enumerate(p_values) if p is not None), key=lambda i: p_values[i])
    m, out, running = len(idx), list(p_values), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


# --------------------------------------------------------------------------- wording

def format_p(p: float | None) -> str:
    """'p < 0.001' below 0.001, else two significant digits: 'p = 0.039', 'p = 0.41', 'p = 1.0'."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "p n/a"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:#.2g}".rstrip(".")


def _count(n: int) -> str:
    return f"{n:,}"


def comparison_sentence(variant: str, against: str, difference_points: float, p_value: float | None, *,
                        test: str = "McNemar", n_images: int | None = None, seeds: int | None = None,
                        ttest_p: float | None = None, part: str = "test", alpha: float = ALPHA,
                        adjusted_p: float | None = None, comparisons: int = 1) -> str:
    """'mlp-sgd is worse than cnn-adam: 3.1 points, p < 0.001 (McNemar, 1,500 paired test images, 5 seeds)'.

    difference_points: accuracy of `variant` minus that of `against`, in percentage points.
    n_images: paired images per seed; seeds: how many seeds were paired. Not significant
    (p ≥ alpha, or no p): '… no significant difference from … (p = 0.41) …'.
    adjusted_p / comparisons: with several comparisons made at once (comparisons > 1), `p_value` corrected for
    them (Holm); the verdict then follows the corrected p, and both are printed.
    """
    several = comparisons > 1 and adjusted_p is not None
    shown = format_p(p_value) + (f", Holm-corrected for {comparisons} comparisons {format_p(adjusted_p)}"
                                 if several else "")
    decisive = adjusted_p if several else p_value
    details = [test] if test else []
    if n_images is not None:
        details.append(f"{_count(n_images)} paired {part} images")
    if seeds is not None:
        details.append(f"{seeds} seed{'s' if seeds != 1 else ''}")
    tail = ", ".join(details)
    if ttest_p is not None:
        tail += ("; " if tail else "") + f"paired t-test over seeds {format_p(ttest_p)}"
    tail = f" ({tail})" if tail else ""
    if decisive is not None and decisive < alpha and difference_points != 0:
        word = "worse" if difference_points < 0 else "better"
        return f"{variant} is {word} than {against}: {abs(difference_points):.1f} points, {shown}{tail}"
    if round(difference_points, 1) == 0:
        diff = "the same accuracy to 0.1 points"
    else:
        diff = f"{abs(difference_points):.1f} points {'lower' if difference_points < 0 else 'higher'}"
    return f"{variant} vs {against}: no significant difference ({shown}); {diff}{tail}"


def chance_sentence(accuracy: float, n: int, chance: float, p_value: float, *, part: str = "test",
                    subject: str | None = None, seeds: int | None = None, alpha: float = ALPHA) -> str:
    """'validation accuracy 0.600 on 20 images is not significantly above chance 0.550 (p = 0.42, exact binomial)'.

    subject: a name to start with ('cnn-adam: …'); seeds: when the accuracy is a mean over
    several runs, p_value is the largest (least significant) of their p-values.
    """
    part_word = {"val": "validation", "test": "test"}.get(part, part)
    verdict = "is significantly above" if p_value < alpha else "is not significantly above"
    mean = f" (mean of {seeds} seeds)" if seeds and seeds > 1 else ""
    test = "exact binomial" + (f", largest p of {seeds} seeds" if seeds and seeds > 1 else "")
    text = (f"{part_word} accuracy {accuracy:.3f}{mean} on {_count(n)} images {verdict} chance {chance:.3f} "
            f"({format_p(p_value)}, {test})")
    return f"{subject}: {text}" if subject else text


def sentence(*, chance: float | None = None, **kw) -> str:
    """One plain statement: a chance-level one when `chance` is given (see `chance_sentence`),
    otherwise a comparison of two variants (see `comparison_sentence`)."""
    if chance is not None:
        return chance_sentence(chance=chance, **kw)
    return comparison_sentence(**kw)
