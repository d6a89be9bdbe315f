"""cnnlab.stats against hand-computed and textbook values."""

from __future__ import annotations

import math

import pytest
from scipy.stats import t as student_t

from cnnlab import stats


# --------------------------------------------------------------------------- mean, sd, interval

def test_summarize_three_seeds_matches_hand_computation():
    s = stats.summarize([0.90, 0.92, 0.94])
    assert s["n"] == 3 and s["values"] == [0.90, 0.92, 0.94]
    assert s["mean"] == pytest.approx(0.92)
    assert s["sd"] == pytest.approx(0.02)  # sample sd: sqrt((0.02² + 0 + 0.02²) / 2)
    half = 4.302653 * 0.02 / math.sqrt(3)  # t(0.975, df=2) = 4.3027
    assert s["ci95"] == pytest.approx([0.92 - half, 0.92 + half], abs=1e-6)


def test_summarize_two_values_uses_t_with_one_degree_of_freedom():
    s = stats.summarize([1.0, 3.0])
    assert s["mean"] == 2.0 and s["sd"] == pytest.approx(math.sqrt(2))
    half = 12.706205 * math.sqrt(2) / math.sqrt(2)
    assert s["ci95"] == pytest.approx([2.0 - half, 2.0 + half], abs=1e-5)


def test_summarize_single_and_empty():
    one = stats.summarize([0.7])
    assert one["mean"] == 0.7 and one["sd"] is None and one["ci95"] is None
    none = stats.summarize([])
    assert none["mean"] is None and none["sd"] is None and none["ci95"] is None and none["n"] == 0


def test_t_quantile():
    assert stats.t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)


# --------------------------------------------------------------------------- McNemar

def test_mcnemar_exact_known_values():
    # b=10, c=2: 2 · P(X ≤ 2), X ~ Bin(12, 1/2) = 2 · (1 + 12 + 66) / 4096
    assert stats.mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert stats.mcnemar_exact(10, 2) == pytest.approx(0.0386, abs=1e-4)
    assert stats.mcnemar_exact(2, 10) == stats.mcnemar_exact(10, 2)
    assert stats.mcnemar_exact(7, 7) == 1.0
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError):
        stats.mcnemar_exact(-1, 3)


def test_discordant_counts():
    a = [1, 1, 0, 0, 1, 1]
    b = [1, 0, 1, 0, 0, 1]
    assert stats.discordant(a, b) == (2, 1)
    with pytest.raises(ValueError):
        stats.discordant([1], [1, 0])


# --------------------------------------------------------------------------- paired t-test

def test_paired_ttest_against_hand_computation():
    a, b = [0.90, 0.92, 0.95], [0.85, 0.90, 0.91]
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    assert stats.paired_ttest(a, b) == pytest.approx(2 * student_t.sf(abs(t), 2))


def test_paired_ttest_degenerate_cases():
    assert stats.paired_ttest([0.9], [0.8]) is None  # one seed: no test
    assert stats.paired_ttest([], []) is None
    assert stats.paired_ttest([0.9, 0.8], [0.9, 0.8]) == 1.0  # no difference at all
    assert stats.paired_ttest([0.9, 0.8], [0.8, 0.7]) is None  # zero variance of the differences


# --------------------------------------------------------------------------- chance

def test_binomial_above_chance_known_value():
    hand = sum(math.comb(20, k) for k in range(12, 21)) / 2 ** 20
    assert stats.binomial_above_chance(12, 20, 0.5) == pytest.approx(hand)
    assert stats.binomial_above_chance(12, 20, 0.5) == pytest.approx(0.2517, abs=1e-4)
    assert stats.binomial_above_chance(0, 20, 0.5) == pytest.approx(1.0)
    assert stats.binomial_above_chance(20, 20, 0.5) == pytest.approx(0.5 ** 20)


def test_chance_level_is_majority_or_uniform():
    assert stats.chance_level(0.55, 2) == 0.55
    assert stats.chance_level(0.1, 5) == 0.2


# --------------------------------------------------------------------------- wording

@pytest.mark.parametrize("p, text", [(0.0386, "p = 0.039"), (0.41, "p = 0.41"), (0.2517, "p = 0.25"),
                                     (1.0, "p = 1.0"), (0.05, "p = 0.050"), (0.0009, "p < 0.001"),
                                     (1e-40, "p < 0.001"), (0.001, "p = 0.0010"), (None, "p n/a")])
def test_format_p(p, text):
    assert stats.format_p(p) == text


def test_sentence_significant_difference():
    s = stats.sentence(variant="mlp-sgd", against="cnn-adam", difference_points=-3.1, p_value=0.0002,
                       n_images=1500, seeds=5)
    assert s == "mlp-sgd is worse than cnn-adam: 3.1 points, p < 0.001 (McNemar, 1,500 paired test images, 5 seeds)"
    better = stats.comparison_sentence("a", "b", 2.04, 0.01, n_images=100, seeds=1)
    assert better.startswith("a is better than b: 2.0 points, p = 0.010 (McNemar, 100 paired test images, 1 seed)")


def test_sentence_no_significant_difference_and_t_test():
    s = stats.sentence(variant="cnn-rmsprop", against="cnn-adam", difference_points=-0.4, p_value=0.41,
                       n_images=1000, seeds=3, ttest_p=0.2)
    assert s == ("cnn-rmsprop vs cnn-adam: no significant difference (p = 0.41); 0.4 points lower "
                 "(McNemar, 1,000 paired test images, 3 seeds; paired t-test over seeds p = 0.20)")


def test_sentence_chance_single_run():
    p = stats.binomial_above_chance(12, 20, 0.55)
    s = stats.sentence(accuracy=0.60, n=20, chance=0.55, p_value=p, part="val")
    assert s == ("validation accuracy 0.600 on 20 images is not significantly above chance 0.550 "
                 f"({stats.format_p(p)}, exact binomial)")
    assert "p = 0.4" in s
    above = stats.chance_sentence(0.965, 1000, 0.2, 1e-300, subject="cnn-adam", seeds=3)
    assert above == ("cnn-adam: test accuracy 0.965 (mean of 3 seeds) on 1,000 images is significantly above chance 0.200 "
                     "(p < 0.001, exact binomial, largest p of 3 seeds)")


def test_interval_is_clipped_to_the_metric_range():
    s = stats.summarize([0.2, 0.9], bounds=(0.0, 1.0))
    half = 12.706 * (0.7 / 2 ** 0.5) / 2 ** 0.5  # t(0.975, 1) · sd / √n, far wider than [0, 1]
    assert s["mean"] == pytest.approx(0.55)
    assert 0.55 - half < 0 and 0.55 + half > 1
    assert s["ci95"] == [0.0, 1.0]
    unclipped = stats.summarize([0.90, 0.92, 0.94], bounds=(0.0, 1.0))["ci95"]
    assert unclipped == pytest.approx([0.92 - 4.303 * 0.02 / 3 ** 0.5, 0.92 + 4.303 * 0.02 / 3 ** 0.5], abs=1e-4)
