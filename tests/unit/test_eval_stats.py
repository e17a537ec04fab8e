"""Evaluation intervals against independent references: the Wilson interval as the inversion of
the score test (found by bisection), the paired bootstrap against its exact distribution."""

import itertools
import math

import numpy as np
import pytest

from megatron_longpo.evaluation.stats import Z95, paired_bootstrap_diff, wilson_interval


def _score_test_accepts(p: float, k: int, n: int) -> bool:
    return abs(k / n - p) <= Z95 * math.sqrt(p * (1 - p) / n) + 1e-15


def _invert(k: int, n: int, lo: float, hi: float, accept_at_lo: bool) -> float:
    """Bisection for the boundary of the score test's acceptance region between lo and hi."""
    for _ in range(200):
        mid = (lo + hi) / 2
        if _score_test_accepts(mid, k, n) == accept_at_lo:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (3, 64), (61, 64), (128, 256), (0, 1)])
def test_wilson_is_the_inverted_score_test(k, n):
    low, high = wilson_interval(k, n)
    p_hat = k / n
    want_low = 0.0 if k == 0 else _invert(k, n, 0.0, p_hat, accept_at_lo=False)
    want_high = 1.0 if k == n else _invert(k, n, p_hat, 1.0, accept_at_lo=True)
    assert math.isclose(low, want_low, abs_tol=1e-9) and math.isclose(high, want_high, abs_tol=1e-9)
    assert 0.0 <= low <= p_hat <= high <= 1.0


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError, match="n > 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)


def test_paired_bootstrap_matches_its_exact_distribution():
    a = np.array([1.0, 0.0, 1.0])
    b = np.array([1.0, 1.0, 0.0]) + np.array([0.0, 0.5, 0.0])
    d = b - a
    exact = sorted(float(np.mean(d[list(ix)])) for ix in itertools.product(range(3), repeat=3))  # 27 equally likely
    mean, low, high = paired_bootstrap_diff(a, b, resamples=200000, seed=1)
    assert math.isclose(mean, float(d.mean()), rel_tol=1e-12)
    q = np.quantile(np.array(exact), [0.025, 0.975])
    # the percentile interval lies on the exact distribution's support near its quantiles
    assert min(exact) <= low <= q[0] + 1e-9 + 0.5 and q[1] - 0.5 - 1e-9 <= high <= max(exact)
    assert low <= mean <= high


def test_paired_bootstrap_is_paired():
    """Identical per-sample changes give a zero-width interval, however noisy the samples are."""
    rng = np.random.default_rng(0)
    a = rng.random(300)
    mean, low, high = paired_bootstrap_diff(a, a + 0.1)
    assert math.isclose(mean, 0.1) and math.isclose(low, 0.1) and math.isclose(high, 0.1)
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap_diff(a, a[:3])
