"""Channel groups: the channels torch-pruning removes together, found on its DependencyGraph.

A :class:`ChannelGroup` is one group of coupled channels (residual adds, depthwise convolutions,
concatenations, flatten into a linear) in the original model's index space, rooted at a
conv/linear layer: its BN layers, the layers that consume its channels, and per channel the
score (combined |gamma|) and BN-layer weight that slimming ranks by.  :func:`collect_groups`
finds every prunable group of a graph and says why the others are held fixed; groups never
change once built (the channels chosen for removal are a :class:`slimcore.prune.selection.Selection`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.ops import OPTYPE

from slimcore.prune.policy import GroupScore
from slimcore.tp_compat import (
    UnmappableGroup,
    channel_slice,
    expands_channels_only_spatially,
    frozen_index_mapping,
    module_names,
)

# Operations whose channel bookkeeping torch-pruning handles and whose outputs we can reason about.
_SAFE_OPS = {OPTYPE.CONV, OPTYPE.DEPTHWISE_CONV, OPTYPE.BN, OPTYPE.LINEAR, OPTYPE.ELEMENTWISE,
             OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.RESHAPE, OPTYPE.PRELU}


class BNItem(NamedTuple):
    """A BN layer of a group: its channels ``idxs`` are the group's root channels ``root_idxs``."""

    name: str
    bn: nn.BatchNorm2d
    idxs: torch.Tensor
    root_idxs: torch.Tensor


class Consumer(NamedTuple):
    """A conv/linear layer reading the group's channels: input ``idxs`` are root ``root_idxs``."""

    module: nn.Module
    idxs: torch.Tensor
    root_idxs: torch.Tensor


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """A prunable group of coupled channels, in the original model's index space.

    Attributes:
        root: the conv/linear layer whose output channels root the group.
        root_name: its name in the model (how reports name the group).
        channels: the root's output channels (the group's channel count).
        bn_items: the affine BN layers holding the group's channels.
        consumers: the (non-depthwise) conv/linear layers reading them (constant folding's targets).
        scores: per root channel, the combined |gamma| (``inf``: never removed).
        weights: per root channel, how many BN layers hold it (0: held fixed).
        atoms: channels removed together (grouped convs, equal splits); None: singletons.
        min_keep: channels the structure needs kept (e.g. 2 per conv group).
    """

    root: nn.Module
    root_name: str
    channels: int
    bn_items: list[BNItem]
    consumers: list[Consumer]
    scores: torch.Tensor
    weights: torch.Tensor
    atoms: list[torch.Tensor] | None = None
    min_keep: int = 0


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _is_grouped(module: nn.Module) -> bool:
    """A grouped (not depthwise) convolution: pruned by the same channel pattern in every group."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not _is_depthwise(module)


def _all_groups(dg: tp.DependencyGraph, ignored: list[nn.Module]) -> list[tuple[nn.Module, Any, str | None]]:
    """``(root, group or None, why not)`` for every conv/linear root, as torch-pruning's
    ``get_all_groups`` visits them, but a root whose group cannot be built is reported, not fatal."""
    visited: set[nn.Module] = set()
    out: list[tuple[nn.Module, Any, str | None]] = []
    with frozen_index_mapping(dg):  # once: nothing is pruned while groups are built
        _visit_roots(dg, ignored, visited, out)
    return out


def _visit_roots(dg: tp.DependencyGraph, ignored: list[nn.Module], visited: set[nn.Module],
                 out: list[tuple[nn.Module, Any, str | None]]) -> None:
    """torch-pruning's root visit, except where a group passes a channel slice: there a layer
    whose outputs the group covers only in part (DPN's ``c1x1_c``: its first ``num_1x1_c``
    outputs join the stage's residual path, the rest its own dense path) is visited again later
    as the root of its remaining outputs."""
    covered: dict[nn.Module, set[int]] = {}
    for m in list(dg.module2node.keys()):
        if m in ignored or not isinstance(m, (nn.Conv2d, nn.Linear)) or m in visited:
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        done = covered.get(m, set())
        try:
            group = dg.get_pruning_group(m, pruner.prune_out_channels,
                                         [i for i in range(pruner.get_out_channels(m)) if i not in done])
        except UnmappableGroup as err:
            visited.add(m)
            out.append((m, None, str(err)))
            continue
        sliced = any(channel_slice(item.dep.target) is not None for item in group)
        prunable = True
        for item in group:
            if dg.is_out_channel_pruning_fn(item.dep.handler):
                target = item.dep.target.module
                if target in ignored:
                    prunable = False
                if sliced and isinstance(target, (nn.Conv2d, nn.Linear)) and target is not m:
                    covered.setdefault(target, set()).update(int(i) for i in item.idxs)
                    if len(covered[target]) < dg.get_out_channels(target):
                        continue
                visited.add(target)
        visited.add(m)
        if prunable:
            out.append((m, group, None))


def _channel_count(dg: tp.DependencyGraph, item: Any) -> int | None:
    """Channels of an item's layer on the dimension the item prunes (None: not a layer)."""
    module = item.dep.target.module
    if not isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
        return None
    if dg.is_out_channel_pruning_fn(item.dep.handler):
        return dg.get_out_channels(module)
    return dg.get_in_channels(module)


def _fixed_slice_channels(group: Any) -> list[int]:
    """Root channels that reach a channel slice ending before the last channel
    (``x[:, :n]``, DPN's residual path ``x[:, :num_1x1_c]``): ``n`` is fixed in the model's
    code, so they are held fixed.  Channels after ``n`` (``x[:, n:]``, DPN's dense path) may go:
    the slice start stays valid while no channel before it is removed."""
    fixed: set[int] = set()
    for item in group:
        bounds = channel_slice(item.dep.target)
        if bounds is not None and bounds[1] < bounds[2]:
            fixed.update(int(i) for i in item.root_idxs)
    return sorted(fixed)


def _unsafe_reason(group: Any, dg: tp.DependencyGraph) -> str | None:
    """Why torch-pruning's surgery on this group could yield a wrong model, or None."""
    for item in group:
        node, module = item.dep.target, item.dep.target.module
        if node.type == OPTYPE.EXPAND and expands_channels_only_spatially(node):
            continue
        if node.type == OPTYPE.SLICE and channel_slice(node) is not None:
            continue  # channel slices: see _fixed_slice_channels
        if node.type not in _SAFE_OPS:
            return f"unsupported operation {node.type.name} ({type(module).__name__})"
        if node.type in (OPTYPE.CONCAT, OPTYPE.SPLIT) and getattr(module, "offsets", None) is None:
            return f"torch-pruning cannot map channels through {node.type.name.lower()} (unknown sizes)"
        n = _channel_count(dg, item)
        if n is not None and (len(item.idxs) != len(item.root_idxs) or any(not 0 <= i < n for i in item.idxs)):
            return (f"torch-pruning's channel index mapping is inconsistent at "
                    f"{module_names(dg).get(module, type(module).__name__)} (split/concat/slice)")
    return None


def _index_pair(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A group item's channel indices in its own layer and in the group's root layer."""
    pairs = torch.from_numpy(np.array([item.idxs, item.root_idxs], dtype=np.int64))
    return pairs[0], pairs[1]


def _grouped_atoms(group: Any, dg: tp.DependencyGraph,
                   channels: int) -> tuple[list[torch.Tensor] | None, int, str | None]:
    """Root channels that must go together so every grouped conv keeps its group structure.

    A grouped conv's weight is ``(out, in / groups, kh, kw)``: removing the same offsets in
    every group of its input (or output) channels keeps it a valid grouped conv with the same
    ``groups``.  Channels at the same offset are merged (union-find over root channels).
    Returns (atoms or None when there is no grouped conv, channels to keep at least, problem).
    """
    parent = list(range(channels))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    min_keep, found = 0, False
    for item in group:
        module = item.dep.target.module
        if getattr(module, "equal_chunks", False) and module.offsets is not None:
            # split(x, size) with the size from the model's code: every chunk keeps the same
            # channels (slimcore.plan.sync_split_sizes updates the size), one kept at least
            sizes = module.chunk_sizes
            if len(set(sizes)) != 1 or len(set(item.idxs)) != sum(sizes):
                return None, 0, "channel split into chunks of a fixed size only partly in the group"
            found = True
            first_chunk: dict[int, int] = {}
            for idx, root in zip(item.idxs, item.root_idxs):
                key = idx % sizes[0]
                if key in first_chunk:
                    parent[find(root)] = find(first_chunk[key])
                else:
                    first_chunk[key] = root
            min_keep = max(min_keep, len(sizes))
            continue
        if not _is_grouped(module):
            continue
        found = True
        out_side = dg.is_out_channel_pruning_fn(item.dep.handler)
        size = module.out_channels if out_side else module.in_channels
        if len(set(item.idxs)) != size:
            return None, 0, f"grouped convolution {module_names(dg).get(module, '?')} only partly in the group"
        width = size // module.groups
        first: dict[int, int] = {}
        for idx, root in zip(item.idxs, item.root_idxs):
            key = idx % width
            if key in first:
                parent[find(root)] = find(first[key])
            else:
                first[key] = root
        if out_side:  # one output channel per group would make it depthwise: keep 2
            min_keep = max(min_keep, 2 * module.groups)
    if not found:
        return None, 0, None
    classes: dict[int, list[int]] = defaultdict(list)
    for i in range(channels):
        classes[find(i)].append(i)
    atoms = [torch.tensor(sorted(c), dtype=torch.long) for c in classes.values()]
    return sorted(atoms, key=lambda a: int(a[0])), min_keep, None


def _bn_channels_of(group: Any) -> int:
    """BN channels of a group (each BN layer's channels in it), for the skipped list."""
    return sum(len(item.idxs) for item in group
               if isinstance(item.dep.target.module, nn.BatchNorm2d))


def collect_groups(model: nn.Module, dg: tp.DependencyGraph, classifier: nn.Module | None,
                   score: GroupScore) -> tuple[list[ChannelGroup], list[dict[str, Any]]]:
    """Prunable groups with per-channel scores and BN-layer weights; and the skipped ones.

    ``dg`` comes from :func:`slimcore.plan.build_graph` (its ``get_pruning_group`` bounded by
    :mod:`slimcore.tp_compat`); ``classifier`` (the logits layer) is never pruned.  Each skipped
    group is ``{"group": root name, "reason": why, "channels": BN channels it holds fixed}``.
    """
    names = module_names(dg)
    ignored = [classifier] if classifier is not None else []
    groups: list[ChannelGroup] = []
    skipped: list[dict[str, Any]] = []
    seen_bns: set[nn.Module] = set()
    for root, group, problem in _all_groups(dg, ignored):
        root_name = names.get(root, type(root).__name__)
        if group is None:
            skipped.append({"group": root_name, "reason": problem, "channels": 0})
            continue
        channels = dg.get_out_channels(root)
        bn_items, consumers = [], []
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.BatchNorm2d):
                seen_bns.add(module)
            if isinstance(module, nn.BatchNorm2d) and module.affine:
                bn_items.append(BNItem(names.get(module, type(module).__name__), module, *_index_pair(item)))
            elif dg.is_in_channel_pruning_fn(item.dep.handler) and isinstance(module, (nn.Conv2d, nn.Linear)) \
                    and not _is_depthwise(module):
                consumers.append(Consumer(module, *_index_pair(item)))
        held = _bn_channels_of(group)
        if not bn_items:
            reason = ("its BatchNorm2d layers have affine=False (no gamma to rank)" if held else
                      "no BatchNorm2d (no gamma to rank)")
            skipped.append({"group": root_name, "reason": reason, "channels": held})
            continue
        reason = _unsafe_reason(group, dg)
        atoms, min_keep, atom_problem = (None, 0, None) if reason else _grouped_atoms(group, dg, channels)
        reason = reason or atom_problem
        if reason:
            skipped.append({"group": root_name, "reason": reason, "channels": held})
            continue
        scores, weights = score_channels(bn_items, channels, score)
        fixed = _fixed_slice_channels(group)
        if fixed:
            skipped.append({"group": root_name, "channels": int(weights[fixed].sum()),
                            "reason": f"{len(fixed)} channels reach a channel slice of a size fixed in "
                                      "the model's code (x[:, :n]): held fixed, the rest of the group ranked"})
            scores[fixed], weights[fixed] = math.inf, 0
        if not bool((weights > 0).any()):
            skipped.append({"group": root_name, "reason": "no channel has a BatchNorm2d", "channels": held})
            continue
        groups.append(ChannelGroup(root, root_name, channels, bn_items, consumers, scores, weights,
                                   atoms=atoms, min_keep=min_keep))
    unreached = [(names.get(m, "?"), m.num_features) for m in model.modules()
                 if isinstance(m, nn.BatchNorm2d) and m not in seen_bns]
    if unreached:
        skipped.append({"group": "<BN layers in no group>", "channels": sum(n for _, n in unreached),
                        "reason": "not reached by any prunable group: " + ", ".join(n for n, _ in unreached[:8])
                        + (", ..." if len(unreached) > 8 else "")})
    return groups, skipped


def score_channels(bn_items: list[BNItem], channels: int, how: GroupScore) -> tuple[torch.Tensor, torch.Tensor]:
    """Per root channel: combined |gamma| over the group's BN layers (``how``: max, mean or l2;
    ``inf`` for a channel without BN, never removed), and how many BN layers hold it."""
    weights = torch.zeros(channels, dtype=torch.long)
    stacked = torch.full((len(bn_items), channels), float("nan"))
    for row, (_, bn, idxs, root_idxs) in enumerate(bn_items):
        stacked[row, root_idxs] = bn.weight.detach().abs().float().cpu()[idxs]
        weights[root_idxs] += 1
    if how == "max":
        scores = torch.nan_to_num(stacked, nan=-1.0).amax(0)
    elif how == "mean":
        scores = torch.nanmean(stacked, 0)
    else:
        scores = torch.nan_to_num(stacked, nan=0.0).pow(2).sum(0).sqrt()
    scores = torch.nan_to_num(scores, nan=math.inf)
    scores[weights == 0] = math.inf  # a channel without BN (no gamma) is never removed
    return scores, weights


__all__ = ["BNItem", "ChannelGroup", "Consumer", "collect_groups", "score_channels"]
