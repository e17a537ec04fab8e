"""Uncertainty of evaluation scores: pure functions (numpy only).

- :func:`wilson_interval`: the 95% Wilson score interval of an accuracy k/n (binomial). Unlike
  the normal approximation it stays inside [0, 1] and is not degenerate at 0% or 100%.
- :func:`paired_bootstrap_diff`: the bootstrap interval of mean(b) - mean(a) over the SAME
  samples scored by two models (resampling sample indices jointly), for "change vs base".
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """[low, high] of the Wilson score interval of ``successes / n`` (95% for the default z)."""
    if n <= 0:
        raise ValueError(f"wilson_interval needs n > 0 (got {n})")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}] (got {successes})")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # exact ends at 0 / n successes (the formula gives them up to rounding)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], *, resamples: int = 10000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float, float]:
    """(mean(b) - mean(a), low, high): the percentile bootstrap interval of the paired difference.

    ``a[i]`` and ``b[i]`` are the scores of sample i under two models; each resample draws n
    sample indices with replacement and takes the mean difference over them.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap_diff needs two equal-length non-empty 1-D score lists, got {a.shape}, {b.shape}")
    d = b - a
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(d.mean()), float(low), float(high)
