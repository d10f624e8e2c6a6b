"""How far an accuracy measured on a finite test set can be trusted (pure Python: no torch).

An accuracy is a proportion ``k / n`` of ``n`` test images. :func:`wilson_interval` is its 95%
Wilson score interval: unlike the textbook ``p +- 1.96 sqrt(p (1 - p) / n)`` it stays inside
[0, 1] and is not zero-width at 100%, which matters for the small test sets of the default run
(digits: 359 images, one image = 0.28 pt, a top-1 near 97.8% has the interval 95.7-98.9).

:func:`within_noise` compares two accuracies measured on the *same* test set. The evaluate stage
records the count of images, not which images each model got right, so a paired test (McNemar's)
is not available; the rule is the conservative one: two accuracies differ only when *each* lies
outside the other's 95% interval (the difference exceeds the larger of the two half-widths on
the side facing the other). Anything closer is reported as within noise (``~`` in
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
    95%: one of them lies inside the other's interval (see the module docstring)."""
    lo_a, hi_a = accuracy_interval(a, n, z)
    lo_b, hi_b = accuracy_interval(b, n, z)
    eps = 1e-12
    return lo_a - eps <= b <= hi_a + eps or lo_b - eps <= a <= hi_b + eps


def image_points(n: int) -> float:
    """What one test image is worth, in percentage points."""
    return 100.0 / n if n > 0 else math.nan


__all__ = ["Z95", "accuracy_interval", "image_points", "wilson_interval", "within_noise"]
