"""Global selection: which channels of which groups slimming removes, in one |gamma| ranking.

:func:`select` ranks every group's removal units (:func:`unit_table`: the next channels of a
group up to a cut its floor and ``round_to`` allow, weighted by the BN layers they hold) in one
global order and takes them until the requested share of the prunable BN channels is reached.
It returns a :class:`Selection` (the removed root channels of each group, and the figures the
report quotes); the groups themselves are never changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from slimcore.prune.groups import ChannelGroup
from slimcore.prune.policy import SlimPolicy


@dataclass(frozen=True)
class Selection:
    """The channels chosen for removal, group by group.

    Attributes:
        groups: the groups selected from, in order.
        removed_idxs: per group, the root channels removed (ascending; empty: none).
        max_removable: per group, the most channels its floor and ``round_to`` let go.
        prunable: BN channels of the groups that can be ranked (each BN layer counts).
        removed: BN channels removed.
        threshold: the highest score removed (0.0 when nothing is).
        bound_by: why ``removed`` misses the target, if it does.
    """

    groups: list[ChannelGroup]
    removed_idxs: list[torch.Tensor]
    max_removable: list[int]
    prunable: int
    removed: int
    threshold: float
    bound_by: list[str]

    def removals(self) -> list[tuple[ChannelGroup, torch.Tensor]]:
        """``(group, removed root channels)`` of every group that loses channels, in order."""
        return [(g, idxs) for g, idxs in zip(self.groups, self.removed_idxs) if len(idxs)]


def _floor(channels: int, policy: SlimPolicy, min_keep: int = 0) -> int:
    """Fewest channels a group may keep, as a multiple of ``round_to``."""
    need = max(policy.min_channels, math.ceil(policy.min_keep_fraction * channels), min_keep)
    return math.ceil(need / policy.round_to) * policy.round_to


def _atom_order(g: ChannelGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(atom scores ascending, channels in that atom order, channels removed after each atom).

    Atoms are single channels, or for grouped convs the channels that must go together; an
    atom scores the highest |gamma| score of its channels.  Ties: lower index first.
    """
    if g.atoms is None:
        sorted_scores, order = torch.sort(g.scores, stable=True)
        return sorted_scores, order, torch.arange(1, g.channels + 1)
    atom_scores = torch.stack([g.scores[a].max() for a in g.atoms])
    sorted_scores, atom_order = torch.sort(atom_scores, stable=True)  # atoms are sorted by first index
    order = torch.cat([g.atoms[i] for i in atom_order.tolist()])
    sizes = torch.tensor([len(g.atoms[i]) for i in atom_order.tolist()])
    return sorted_scores, order, torch.cumsum(sizes, 0)


@dataclass(frozen=True)
class UnitTable:
    """Every group's removal units, one entry per unit in each array, and per group its order.

    A unit is the next atoms of a group in ascending |gamma| order up to the next allowed cut
    (kept channels a multiple of ``round_to``, at or above the floor); its ``score`` is the
    highest |gamma| it removes, its ``weight`` the BN channels it removes, ``group`` the index
    of its group and ``cut`` the group's channels removed once it is taken.  ``orders[i]`` is
    group i's channels in removal order, ``max_removable[i]`` its most removable channels.
    """

    score: np.ndarray
    weight: np.ndarray
    group: np.ndarray
    cut: np.ndarray
    orders: list[torch.Tensor]
    max_removable: list[int]


def unit_table(groups: list[ChannelGroup], policy: SlimPolicy) -> UnitTable:
    """The removal units of ``groups`` under ``policy`` (see :class:`UnitTable`)."""
    scores, weights, group_ids, cuts_all = [], [], [], []
    orders: list[torch.Tensor] = []
    max_removable: list[int] = []
    for gi, g in enumerate(groups):
        atom_scores, order, ends = _atom_order(g)
        orders.append(order)
        n_max = g.channels - _floor(g.channels, policy, g.min_keep)
        # units that would remove a channel without BN (score inf, sorted last) are never offered
        allowed = (ends <= n_max) & ((g.channels - ends) % policy.round_to == 0) & torch.isfinite(atom_scores)
        cuts, unit_scores = ends[allowed], atom_scores[allowed]
        max_removable.append(int(cuts[-1]) if len(cuts) else 0)
        cum_w = torch.cumsum(g.weights[order], 0)
        unit_cum = cum_w[cuts - 1] if len(cuts) else cum_w[:0]
        scores.append(unit_scores.double().numpy())
        weights.append(torch.diff(unit_cum, prepend=unit_cum.new_zeros(1)).numpy())
        group_ids.append(np.full(len(cuts), gi))
        cuts_all.append(cuts.numpy())
    return UnitTable(_concat(scores, np.float64), _concat(weights, np.int64), _concat(group_ids, np.int64),
                     _concat(cuts_all, np.int64), orders, max_removable)


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)


def select(groups: list[ChannelGroup], ratio: float, policy: SlimPolicy) -> Selection:
    """Choose each group's removed channels so that ``ratio`` of the prunable BN channels go.

    Units are taken in one global order (score, then group, then cut; within a group scores
    never decrease, so a group's units come in order).  Where the next unit would overshoot
    the target by more than it falls short, its group is frozen and the scan goes on for
    smaller units of other groups that fill the gap.
    """
    prunable = int(sum(int(g.weights.sum()) for g in groups))
    target = round(ratio * prunable)
    table = unit_table(groups, policy)
    unit_score, unit_weight, unit_group, unit_cut = table.score, table.weight, table.group, table.cut
    removed_per_group = [0] * len(groups)
    removed, threshold, stopped_at = 0, 0.0, None
    if target > 0 and len(unit_score):
        keys = np.lexsort((unit_cut, unit_group, unit_score))
        # The prefix of units that fits under the target is taken as a whole (no group is frozen yet).
        taken = int(np.searchsorted(np.cumsum(unit_weight[keys]), target, side="right"))
        for u in keys[:taken]:
            removed_per_group[unit_group[u]] = int(unit_cut[u])
        removed = int(unit_weight[keys[:taken]].sum())
        threshold = float(unit_score[keys[taken - 1]]) if taken else 0.0
        frozen: set[int] = set()  # groups whose next unit was skipped: their later units must wait
        for u in keys[taken:].tolist() if removed < target else []:
            w, gi = int(unit_weight[u]), int(unit_group[u])
            if gi in frozen:
                continue
            if removed + w > target and not (stopped_at is None and removed + w - target < target - removed):
                stopped_at = u if stopped_at is None else stopped_at
                frozen.add(gi)  # keep scanning for smaller units that fill the gap
                continue
            removed += w  # fits, or overshoots by less than we would otherwise fall short
            removed_per_group[gi] = int(unit_cut[u])
            threshold = max(threshold, float(unit_score[u]))
            if removed >= target:
                break
    removed_idxs = [torch.sort(order[:n]).values for order, n in zip(table.orders, removed_per_group)]
    bound_by: list[str] = []
    available = int(unit_weight.sum())
    if available < target:
        bound_by.append(
            f"floor: at most {available} of {prunable} BN channels are removable with "
            f"min_channels={policy.min_channels}, min_keep_fraction={policy.min_keep_fraction}, "
            f"round_to={policy.round_to}; groups at their floor: "
            + ", ".join(g.root_name for g, n, most in zip(groups, removed_per_group, table.max_removable)
                        if n == most)
        )
    elif removed != target:
        if stopped_at is not None:
            nxt = (f"the next unit ({int(unit_weight[stopped_at])} BN channels, group "
                   f"{groups[unit_group[stopped_at]].root_name}) would overshoot")
        else:
            nxt = "the last unit taken overshoots by less than stopping short would miss"
        bound_by.append(
            f"granularity: channels go in units of round_to x (BN layers in the group), or whole "
            f"conv groups; {nxt}, so {removed} of the target {target} BN channels are removed"
        )
    return Selection(list(groups), removed_idxs, table.max_removable, prunable, removed, threshold, bound_by)


__all__ = ["Selection", "UnitTable", "select", "unit_table"]
