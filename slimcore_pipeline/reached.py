"""How sparse sparse-train made a model, from its sensitivity report (pure Python: no torch).

:func:`no_sparsity` is the criterion ``metrics/results.md`` (under each pruning table) and the
sensitivity stage (as a warning) use to say "sparse-train reached no sparsity" in one line,
instead of a 0% safe ratio beside an unchanged accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def no_sparsity(sensitivity: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether sparse-train reached no sparsity, and how much it reached, in words.

    The criterion: fewer of the sparse model's BN channels have |gamma| <= ``prune.warn_gamma``
    than the smallest ratio the sensitivity grid tries (``prune.sensitivity_step``), so not even
    that ratio can be met by negligible channels. It reads ``gammas_below_warn`` (the share of BN
    gammas at most ``warn_gamma``); a report without it (an older sensitivity stage) falls back on
    the grid: no ratio was slimmed at a |gamma| threshold at most ``warn_gamma``.
    """
    warn = float(sensitivity.get("warn_gamma", (sensitivity.get("policy") or {}).get("warn_gamma", 1e-2)))
    points = sensitivity.get("points", [])
    step = float(sensitivity.get("step") or min((float(p["ratio"]) for p in points), default=0.05))
    share = sensitivity.get("gammas_below_warn")
    if _finite(share):
        return float(share) < step, f"{100 * float(share):.1f}% of BN gammas below {warn:g}"
    thresholds = [p.get("threshold") for p in points]
    if not points or not all(_finite(t) for t in thresholds):
        return False, ""
    reached = max((float(p["ratio"]) for p in points if float(p["threshold"]) <= warn), default=0.0)
    if reached:
        return False, f"at least {100 * reached:.4g}% of BN channels scoring below {warn:g}"
    return True, f"fewer than {100 * step:.4g}% of BN channels scoring below {warn:g}"


__all__ = ["no_sparsity"]
