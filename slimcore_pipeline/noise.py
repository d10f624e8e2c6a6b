"""How far an accuracy measured on a finite test set can be trusted (pure Python: no torch).

An accuracy is a proportion ``k / n`` of ``n`` test images. :func:`wilson_interval` is its 95%
Wilson score interval: unlike the textbook ``p +- 1.96 sqrt(p (1 - p) / n)`` it stays inside
[0, 1] and is not zero-width at 100%, which matters for the small test sets of the default run
(digits: 359 images, one image = 0.28 pt, a top-1 near 97.8% has the interval 95.7-98.9).

:func:`within_noise` compares two accuracies measured on the *same* test set. The evaluate stage
records the count of images, not which images each model got right, so a paired test (McNemar's)
is not available; the rule is the two-proportion test: two accuracies differ only when their
difference exceeds ``z * sqrt(p_a (1 - p_a) / n + p_b (1 - p_b) / n)`` (the 95% interval of the
difference excludes zero; about 1.4 times one accuracy's half-width). Two models scored on the same
images usually err on many of the same ones, which makes this test conservative (a paired test
would call more differences real). Anything closer is reported as within noise (``~`` in
``metrics/results.md``).
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (fractions) of ``correct`` successes out of ``n``; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(correct / n, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """:func:`wilson_interval` of an accuracy given as a fraction of ``n`` images."""
    return wilson_interval(round(accuracy * n), n, z)


def within_noise(a: float, b: float, n: int, z: float = Z95) -> bool:
    """Accuracies ``a`` and ``b`` (fractions, the same ``n`` test images) are indistinguishable at
    95%: their difference lies within ``z`` standard errors of a difference of two proportions
    (see the module docstring)."""
    if n <= 0:
        return True
    se = math.sqrt((a * (1 - a) + b * (1 - b)) / n)
    return abs(a - b) <= z * se + 1e-12


def image_points(n: int) -> float:
    """What one test image is worth, in percentage points."""
    return 100.0 / n if n > 0 else math.nan


__all__ = ["Z95", "accuracy_interval", "image_points", "wilson_interval", "within_noise"]
