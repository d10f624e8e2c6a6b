"""The ratio search behind FLOPs and parameter targets: which channel ratio keeps a given share.

:func:`search_ratio` finds the number of BN channels whose removal keeps :class:`Goal`'s
fraction of the model's FLOPs or parameters (within :data:`TARGET_TOLERANCE`), pruning each
candidate for real on one traced graph, measuring it and undoing it from a snapshot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from slimcore.flops import count_flops, count_params
from slimcore.prune.constant_folding import fold_constants
from slimcore.prune.groups import ChannelGroup
from slimcore.prune.policy import SlimError, SlimPolicy
from slimcore.prune.selection import select, unit_table
from slimcore.prune.surgery import Snapshot, apply_selection

TARGET_TOLERANCE = 0.01  # a FLOPs/params target is met when |kept - F| <= TARGET_TOLERANCE * F
_MAX_SEARCH_STEPS = 40


@dataclass
class Goal:
    """Keep ``fraction`` of the model's ``measure`` (``flops`` at ``input_shape``, or ``params``)."""

    measure: Literal["flops", "params"]
    fraction: float
    input_shape: tuple[int, ...]
    before: float = 0.0
    steps: int = 0

    def count(self, model: nn.Module) -> float:
        if self.measure == "flops":
            return count_flops(model, self.input_shape)
        return float(count_params(model))


def search_ratio(model: nn.Module, dg: tp.DependencyGraph, groups: list[ChannelGroup],
                 tap_means: dict[nn.Module, torch.Tensor], pol: SlimPolicy, goal: Goal,
                 snapshot: Snapshot, skipped: list[dict[str, Any]]) -> tuple[float, list[str]]:
    """The ratio whose pruned model keeps ``goal.fraction`` of the FLOPs/params, and why not when
    no ratio does (``bound_by``).

    Each candidate is pruned for real on the one traced graph (select, fold, surgery), measured
    as the profile stage measures it, and undone from ``snapshot``: no retrace, and no copy of
    the model to undo (``count_flops`` counts on a copy, as the profile stage does).
    The search runs over the number of BN channels removed (integers), by interpolation
    between a bracket that always holds the target, with a bisection step whenever
    interpolation stalls.
    """
    goal.before = goal.before or goal.count(model)
    prunable = int(sum(int(g.weights.sum()) for g in groups))
    table = unit_table(groups, pol)
    available = int(table.weight.sum())
    target, tol = goal.fraction, TARGET_TOLERANCE * goal.fraction
    cache: dict[int, float] = {0: 1.0}

    def kept(k: int) -> float:
        if k not in cache:
            selection = select(groups, k / prunable, pol)
            try:
                if pol.fold_constants:
                    fold_constants(dg, selection, tap_means)
                apply_selection(dg, selection)
                cache[k] = goal.count(model) / goal.before
            except Exception as err:
                raise SlimError(f"cannot measure a pruned candidate while searching for "
                                f"{goal.measure} {target:g}: {type(err).__name__}: {err}") from err
            finally:
                snapshot.restore(dg)
                goal.steps += 1
        return cache[k]

    what = "FLOPs" if goal.measure == "flops" else "parameters"
    lo, hi, f_lo, f_hi = 0, available, 1.0, 1.0
    # A first guess: a layer's FLOPs and weights scale with its input and output widths, so
    # removing a share s of the channels keeps about (1 - s)^2.  When the guess overshoots, the
    # bracket [0, guess] holds the target and the costliest candidate (all removable) is skipped.
    guess = min(available, max(1, round(prunable * (1 - math.sqrt(target))))) if available else 0
    if guess:
        f_guess = kept(guess)
        if f_guess <= target or guess == available:
            hi, f_hi = guess, f_guess
        else:
            lo, f_lo = guess, f_guess
            f_hi = kept(available)
    if f_hi > target + tol:
        held = sum(int(x.get("channels", 0)) for x in skipped)
        floors = [g.root_name for g, most in zip(groups, table.max_removable) if most < g.channels]
        return available / prunable, [
            f"floor: at most {available} of {prunable} prunable BN channels are removable with "
            f"min_channels={pol.min_channels}, min_keep_fraction={pol.min_keep_fraction}, "
            f"round_to={pol.round_to}, which keeps {f_hi:.2%} of the {what} for a target of {target:.2%}; "
            f"groups at their floor: {', '.join(floors)}"
            + (f"; {held} BN channels are held fixed in skipped groups (see skipped)" if held else "")]
    best = min(cache, key=lambda k: abs(cache[k] - target))
    last, same = "", 0  # which end moved last, and how many times in a row
    while abs(cache[best] - target) > tol and hi - lo > 1 and goal.steps < _MAX_SEARCH_STEPS:
        # the bracket: kept(lo) > target >= kept(hi); interpolate, or bisect when one end is stuck
        if same >= 2 or f_lo <= f_hi:
            k = (lo + hi) // 2
        else:
            k = lo + round((hi - lo) * (f_lo - target) / (f_lo - f_hi))
        k = min(max(k, lo + 1), hi - 1)
        f = kept(k)
        if abs(f - target) < abs(cache[best] - target):
            best = k
        moved = "lo" if f > target else "hi"
        if moved == "lo":
            lo, f_lo = k, f
        else:
            hi, f_hi = k, f
        same = same + 1 if moved == last else 1
        last = moved
    bound: list[str] = []
    if abs(cache[best] - target) > tol:
        bound.append(f"granularity: removing {lo} BN channels keeps {cache[lo]:.2%} of the {what} and "
                     f"removing {hi} keeps {cache[hi]:.2%}; no ratio lands within "
                     f"{TARGET_TOLERANCE:.0%} of the target {target:.2%} (round_to={pol.round_to}, grouped "
                     f"channels go together)")
    return best / prunable, bound


__all__ = ["TARGET_TOLERANCE", "Goal", "search_ratio"]
