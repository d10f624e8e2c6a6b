"""Network slimming on torch-pruning's DependencyGraph: global |gamma| ranking, physical removal.

``slim(model, ratio, example_inputs, **policy)`` returns a physically smaller copy of ``model``
and a :class:`SlimReport`.  torch-pruning finds the groups of coupled channels (residual adds,
depthwise convolutions, concatenations, flatten into a linear) and performs the surgery; the
policy is ours:

* every channel group is scored by the |gamma| of the BatchNorm layers it holds (``max`` by
  default: a residual channel is removable only when all its branches are);
* one global ranking over the *prunable* channels, each group weighted by how many BN layers
  it holds, so that the true ratio (BN channels removed / prunable BN channels) lands on the
  requested one, within one rounding unit;
* a floor of channels per group and rounding of kept channels to a multiple of ``round_to``,
  both decided by |gamma| (lowest first, ties by index), never at random;
* the classifier's outputs are never pruned; a group the engine cannot prune safely is left
  intact and named in the report;
* a removed channel whose gamma is ~0 outputs a constant (beta through the activation): that
  constant is folded into the next layer's bias (or the running mean of the BN that follows)
  before the channel is removed, so the pruned network computes what the original did wherever
  the next layer sees no zero padding.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.ops import OPTYPE

from slimcore.models import PLAN_ATTR
from slimcore.plan import build_graph, plain_plan, replay_plan

GroupScore = Literal["max", "mean", "l2"]

# Operations whose channel bookkeeping torch-pruning handles and whose outputs we can reason about.
_SAFE_OPS = {OPTYPE.CONV, OPTYPE.DEPTHWISE_CONV, OPTYPE.BN, OPTYPE.LINEAR, OPTYPE.ELEMENTWISE,
             OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.RESHAPE, OPTYPE.PRELU}


class SlimError(RuntimeError):
    """Slimming could not produce a valid model."""


@dataclass(frozen=True)
class SlimPolicy:
    """How channels are chosen and removed.

    Attributes:
        round_to: kept channels per group are a multiple of this (hardware-friendly widths).
        min_channels: never keep fewer channels than this in a group.
        min_keep_fraction: never keep fewer than this fraction of a group's channels.
        fold_constants: fold removed channels' constant output into the next layer.
        group_score: how the |gamma| of a group's BN layers combine into one score per channel.
        inplace: prune ``model`` itself instead of a deep copy.
    """

    round_to: int = 1
    min_channels: int = 1
    min_keep_fraction: float = 0.0
    fold_constants: bool = True
    group_score: GroupScore = "max"
    inplace: bool = False

    def __post_init__(self) -> None:
        if self.round_to < 1 or self.min_channels < 1:
            raise ValueError("round_to and min_channels must be >= 1")
        if not 0 <= self.min_keep_fraction < 1:
            raise ValueError(f"min_keep_fraction must be in [0, 1), got {self.min_keep_fraction}")
        if self.group_score not in ("max", "mean", "l2"):
            raise ValueError(f"group_score must be max, mean or l2, got {self.group_score!r}")

    @classmethod
    def from_kwargs(cls, **policy: Any) -> SlimPolicy:
        allowed = {f.name for f in fields(cls)}
        unknown = set(policy) - allowed
        if unknown:
            raise TypeError(f"unknown slim policy option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**policy)


@dataclass
class GroupReport:
    """One group of coupled channels, before and after."""

    root: str
    bn_layers: list[str]
    channels_before: int
    channels_after: int
    bn_channels_before: int
    bn_channels_after: int
    at_floor: bool


@dataclass
class SlimReport:
    """What slimming did: the figures users check against what they asked for."""

    requested_ratio: float
    true_ratio: float
    threshold: float
    prunable_bn_channels: int
    removed_bn_channels: int
    total_bn_channels: int
    exact: bool
    bound_by: list[str]
    groups: list[GroupReport]
    skipped: list[dict[str, str]]
    policy: dict[str, Any]
    seconds: float = 0.0

    @property
    def channels_per_layer(self) -> dict[str, list[int]]:
        """``{bn_layer: [channels_before, channels_after]}`` for every prunable BN layer."""
        return {bn: [g.channels_before, g.channels_after] for g in self.groups for bn in g.bn_layers}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["channels_per_layer"] = self.channels_per_layer
        return out


@dataclass
class _Group:
    """A prunable group in the original model's index space."""

    root: nn.Module
    root_name: str
    channels: int
    bn_items: list[tuple[str, nn.BatchNorm2d, torch.Tensor, torch.Tensor]]  # name, bn, idxs, root_idxs
    consumers: list[tuple[nn.Module, torch.Tensor, torch.Tensor]]  # module, in_idxs, root_idxs
    scores: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    weights: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    prune_idxs: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    order: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    max_removable: int = 0


# --------------------------------------------------------------------------------------------
# Graph analysis


@dataclass
class _Trace:
    """What one traced forward pass tells: the graph, the logits layer, the output shape, and
    (when folding) each conv/linear layer's mean input per kernel tap with every gamma at zero."""

    graph: tp.DependencyGraph
    classifier: nn.Module | None
    output_shape: torch.Size
    tap_means: dict[nn.Module, torch.Tensor]


def _trace(model: nn.Module, example_inputs: torch.Tensor, fold: bool) -> _Trace:
    """Build the DependencyGraph; its tracing pass also yields everything else slimming needs.

    The classifier is the last Conv2d/Linear executed.  With ``fold``, the pass runs with every
    BN gamma set to zero (tracing depends on the graph, not on values): each BN channel then
    emits the constant it would emit once removed, and every conv/linear records the mean of
    its inputs per kernel tap, from which the contribution of any set of removed inputs follows
    without another forward pass.  One forward pass serves all (it dominates the cost).
    """
    order: list[nn.Module] = []
    shapes: list[torch.Size] = []
    tap_means: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        order.append(module)
        if fold and isinstance(args[0], torch.Tensor) and getattr(module, "groups", 1) == 1:
            with torch.no_grad():
                tap_means[module] = _tap_means(module, args[0].detach())

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks.append(model.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape)))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine] if fold else []
    gammas = [bn.weight.detach().clone() for bn in bns]
    try:
        with torch.no_grad():
            for bn in bns:
                bn.weight.zero_()
        graph = build_graph(model, example_inputs)
    finally:
        with torch.no_grad():
            for bn, gamma in zip(bns, gammas):
                bn.weight.copy_(gamma)
        for h in hooks:
            h.remove()
    return _Trace(graph, order[-1] if order else None, shapes[-1], tap_means)


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding the convolution applies, as for ``F.pad``."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]  # "same"
        (th, tw) = totals
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def _tap_means(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean input per (channel, kernel tap) over the batch and every output position.

    A linear layer's output averaged over the batch is ``W @ mean(x)``; a convolution's output
    averaged over positions is ``sum(W * tap_means)`` with the padded input sampled the way the
    kernel samples it.  Shape: ``(in_features,)`` or ``(in_channels, kh, kw)``.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).float().mean(0)
    conv: nn.Conv2d = module  # type: ignore[assignment]
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    pads = _conv_padding(conv)
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and not any(pads):
        return x.float().mean(dim=(0, 2, 3)).reshape(-1, 1, 1)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = nn.functional.pad(x.float(), pads, mode=mode) if any(pads) else x.float()
    out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    taps = torch.empty(x.shape[1], kh, kw)
    for i in range(kh):
        rows = xp[:, :, i * dh: i * dh + (out_h - 1) * sh + 1: sh]
        for j in range(kw):
            taps[:, i, j] = rows[:, :, :, j * dw: j * dw + (out_w - 1) * sw + 1: sw].mean(dim=(0, 2, 3))
    return taps


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _unsafe_reason(group: Any, dg: tp.DependencyGraph) -> str | None:
    """Why torch-pruning's surgery on this group could yield a wrong model, or None."""
    for item in group:
        node, module = item.dep.target, item.dep.target.module
        if node.type not in _SAFE_OPS:
            return f"unsupported operation {node.type.name} ({type(module).__name__})"
        if isinstance(module, nn.Conv2d) and module.groups > 1 and not _is_depthwise(module):
            return f"grouped convolution {dg._module2name.get(module, '?')} (groups={module.groups})"
    return None


def _index_pair(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A group item's channel indices in its own layer and in the group's root layer."""
    pairs = torch.from_numpy(np.array([item.idxs, item.root_idxs], dtype=np.int64))
    return pairs[0], pairs[1]


def _collect_groups(model: nn.Module, dg: tp.DependencyGraph, classifier: nn.Module | None,
                    score: GroupScore) -> tuple[list[_Group], list[dict[str, str]]]:
    """Prunable groups with per-channel scores and BN-layer weights; and the skipped ones."""
    names = dg._module2name
    ignored = [classifier] if classifier is not None else []
    groups: list[_Group] = []
    skipped: list[dict[str, str]] = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        root = group[0].dep.target.module
        root_name = names.get(root, "?")
        channels = dg.get_out_channels(root)
        bn_items, consumers = [], []
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.BatchNorm2d) and module.affine:
                bn_items.append((names.get(module, "?"), module, *_index_pair(item)))
            elif dg.is_in_channel_pruning_fn(item.dep.handler) and isinstance(module, (nn.Conv2d, nn.Linear)) \
                    and not _is_depthwise(module):
                consumers.append((module, *_index_pair(item)))
        if not bn_items:
            skipped.append({"group": root_name, "reason": "no BatchNorm2d (no gamma to rank)"})
            continue
        reason = _unsafe_reason(group, dg)
        if reason:
            skipped.append({"group": root_name, "reason": reason})
            continue
        g = _Group(root, root_name, channels, bn_items, consumers)
        g.scores, g.weights = _score_channels(g, score)
        if bool((g.weights == 0).any()):
            skipped.append({"group": root_name, "reason": "some channels have no BatchNorm2d"})
            continue
        groups.append(g)
    return groups, skipped


def _score_channels(g: _Group, how: GroupScore) -> tuple[torch.Tensor, torch.Tensor]:
    """Per root channel: combined |gamma| over the group's BN layers, and how many BN layers."""
    weights = torch.zeros(g.channels, dtype=torch.long)
    stacked = torch.full((len(g.bn_items), g.channels), float("nan"))
    for row, (_, bn, idxs, root_idxs) in enumerate(g.bn_items):
        stacked[row, root_idxs] = bn.weight.detach().abs().float().cpu()[idxs]
        weights[root_idxs] += 1
    if how == "max":
        scores = torch.nan_to_num(stacked, nan=-1.0).amax(0)
    elif how == "mean":
        scores = torch.nanmean(stacked, 0)
    else:
        scores = torch.nan_to_num(stacked, nan=0.0).pow(2).sum(0).sqrt()
    return torch.nan_to_num(scores, nan=math.inf), weights


# --------------------------------------------------------------------------------------------
# Selection


def _floor(channels: int, policy: SlimPolicy) -> int:
    """Fewest channels a group may keep, as a multiple of ``round_to``."""
    need = max(policy.min_channels, math.ceil(policy.min_keep_fraction * channels))
    return math.ceil(need / policy.round_to) * policy.round_to


def _units(g: _Group, policy: SlimPolicy) -> list[int]:
    """Allowed removal counts of a group, ascending (kept channels stay multiples of round_to)."""
    d = policy.round_to
    n_max = g.channels - _floor(g.channels, policy)
    first = g.channels % d or d
    return list(range(first, n_max + 1, d)) if n_max > 0 else []


def _unit_table(groups: list[_Group], policy: SlimPolicy) -> tuple[np.ndarray, ...]:
    """Every group's removal units: (score, BN-channel weight, group index, cut) per unit.

    A unit is the next ``round_to`` channels of a group in ascending |gamma| order; its score is
    the highest |gamma| it removes and its weight the BN channels it removes.  Also stores each
    group's ascending order of channels (``g.order``) and its most removable channels.
    """
    scores, weights, group_ids, cuts_all = [], [], [], []
    for gi, g in enumerate(groups):
        sorted_scores, g.order = torch.sort(g.scores, stable=True)  # ties: lower index first
        cum_w = torch.cumsum(g.weights[g.order], 0)
        cuts = torch.tensor(_units(g, policy), dtype=torch.long)
        g.max_removable = int(cuts[-1]) if len(cuts) else 0
        unit_cum = cum_w[cuts - 1] if len(cuts) else cum_w[:0]
        scores.append(sorted_scores[cuts - 1].double().numpy() if len(cuts) else np.empty(0))
        weights.append(torch.diff(unit_cum, prepend=unit_cum.new_zeros(1)).numpy())
        group_ids.append(np.full(len(cuts), gi))
        cuts_all.append(cuts.numpy())
    return (_concat(scores, np.float64), _concat(weights, np.int64), _concat(group_ids, np.int64),
            _concat(cuts_all, np.int64))


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)


def _select(groups: list[_Group], ratio: float, policy: SlimPolicy) -> tuple[int, int, float, list[str]]:
    """Choose each group's removed channels; returns (prunable, removed, threshold, bound_by).

    Units are taken in one global order (score, then group, then cut; within a group scores
    never decrease, so a group's units come in order).  Where the next unit would overshoot
    the target by more than it falls short, its group is frozen and the scan goes on for
    smaller units of other groups that fill the gap.
    """
    prunable = int(sum(int(g.weights.sum()) for g in groups))
    target = round(ratio * prunable)
    unit_score, unit_weight, unit_group, unit_cut = _unit_table(groups, policy)
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
    for g, n in zip(groups, removed_per_group):
        g.prune_idxs = torch.sort(g.order[:n]).values
    bound_by: list[str] = []
    available = int(unit_weight.sum())
    if available < target:
        bound_by.append(
            f"floor: at most {available} of {prunable} BN channels are removable with "
            f"min_channels={policy.min_channels}, min_keep_fraction={policy.min_keep_fraction}, "
            f"round_to={policy.round_to}; groups at their floor: "
            + ", ".join(g.root_name for g, n in zip(groups, removed_per_group) if n == g.max_removable)
        )
    elif removed != target:
        where = groups[unit_group[stopped_at]].root_name if stopped_at is not None else "?"
        bound_by.append(
            f"granularity: channels go in units of round_to x (BN layers in the group); the next unit "
            f"({unit_weight[stopped_at] if stopped_at is not None else '?'} BN channels, group {where}) "
            f"would overshoot, so {removed} of the target {target} BN channels are removed"
        )
    return prunable, removed, threshold, bound_by


# --------------------------------------------------------------------------------------------
# Constant folding


def _bias_sink(dg: tp.DependencyGraph, module: nn.Module) -> tuple[str, nn.Module]:
    """Where a consumer's missing constant goes: its own bias, or the running mean of its BN."""
    if getattr(module, "bias", None) is not None:
        return "bias", module
    outputs = dg.module2node[module].outputs
    if len(outputs) == 1 and isinstance(outputs[0].module, nn.BatchNorm2d):
        return "bn", outputs[0].module
    return "new_bias", module


@torch.no_grad()
def _fold_constants(dg: tp.DependencyGraph, groups: list[_Group], tap_means: dict[nn.Module, torch.Tensor]) -> None:
    """Fold the output of channels about to be removed into the layers that consume them.

    A removed channel, its gamma at zero, emits a constant (beta through the activation, and
    through any depthwise conv and BN of its group).  The traced pass recorded every consumer's
    mean input per kernel tap with all gammas at zero; what the removed inputs add to the
    consumer's output (``sum(W[:, removed] * taps[removed])``, exact for a linear or 1x1 layer,
    the mean over positions for a padded KxK conv) goes into the layer's bias, or the running
    mean of the BN right after it, so removing the inputs leaves the layer's output unchanged.
    """
    wanted: dict[nn.Module, list[torch.Tensor]] = defaultdict(list)
    for g in groups:
        if len(g.prune_idxs) == 0:
            continue
        removed = torch.zeros(g.channels, dtype=torch.bool)
        removed[g.prune_idxs] = True
        for module, idxs, root_idxs in g.consumers:
            wanted[module].append(idxs[removed[root_idxs]])
    for module, parts in wanted.items():
        if module not in tap_means:
            continue  # not reached by the traced pass (cannot happen for a consumer in the graph)
        idxs = torch.unique(torch.cat(parts))
        weight = module.weight.detach().float().index_select(1, idxs)
        taps = tap_means[module].index_select(0, idxs)
        delta = (weight * taps).reshape(weight.shape[0], -1).sum(1)
        kind, sink = _bias_sink(dg, module)
        if kind == "bias":
            sink.bias += delta.to(sink.bias.dtype)
        elif kind == "bn":
            sink.running_mean -= delta.to(sink.running_mean.dtype)  # BN(x + d) == BN'(x), mean' = mean - d
        else:
            sink.bias = nn.Parameter(delta.to(module.weight.dtype))


# --------------------------------------------------------------------------------------------
# Surgery


def _apply(dg: tp.DependencyGraph, groups: list[_Group]) -> None:
    """Remove the chosen channels, group by group (torch-pruning records the history)."""
    for g in groups:
        if len(g.prune_idxs) == 0:
            continue
        pruner = dg.get_pruner_of_module(g.root)
        dg.get_pruning_group(g.root, pruner.prune_out_channels, g.prune_idxs.tolist()).prune()


def _run_once(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Size | None, str | None]:
    """(output shape, None) when ``model`` runs on ``inputs``, else (None, what went wrong)."""
    try:
        with torch.no_grad():
            return model(inputs).shape, None
    except Exception as err:
        return None, f"{type(err).__name__}: {err}"


def _check_runs(model: nn.Module, example_inputs: torch.Tensor, expected: torch.Size) -> str | None:
    """None when the pruned model runs and gives the original output shape, else what went wrong.

    A channel mismatch fails at any batch and image size, so the first try is one sample at a
    quarter of the resolution (several times cheaper on a large model); only when that does not
    pass (the model may need its full input size) is ``example_inputs`` itself the judge.
    """
    if example_inputs.dim() == 4 and min(example_inputs.shape[2:]) >= 128:
        h, w = example_inputs.shape[2:]
        shape, _ = _run_once(model, example_inputs[:1, :, : h // 4, : w // 4].contiguous())
        if shape is not None and shape[1:] == expected[1:]:
            return None
    shape, problem = _run_once(model, example_inputs)
    if problem is None and shape != expected:
        problem = f"output shape {tuple(shape)} != {tuple(expected)}"
    return problem


class _SurgeryFailed(Exception):
    def __init__(self, problem: str, group: str | None = None) -> None:
        super().__init__(problem)
        self.problem, self.group = problem, group


def _slim_once(model: nn.Module, ratio: float, example_inputs: torch.Tensor, pol: SlimPolicy,
               excluded: dict[str, str], isolate: bool) -> SlimReport:
    """One slimming pass on ``model`` (modified in place); raises _SurgeryFailed if it breaks.

    With ``isolate`` every group is applied and checked on its own, so the failure names the
    group that breaks the model.
    """
    total_bn = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    try:
        traced = _trace(model, example_inputs, fold=pol.fold_constants and ratio > 0)
        dg, expected = traced.graph, traced.output_shape
        groups, skipped = _collect_groups(model, dg, traced.classifier, pol.group_score)
    except Exception as err:  # torch-pruning cannot model this graph at all
        with torch.no_grad():
            model(example_inputs)  # a model that cannot run on example_inputs is the caller's error
        reason = f"torch-pruning cannot trace the model: {type(err).__name__}: {err}"
        return _untouched_report(ratio, total_bn, pol, reason)
    skipped += [{"group": name, "reason": why} for name, why in excluded.items()]
    groups = [g for g in groups if g.root_name not in excluded]
    prunable, removed, threshold, bound_by = _select(groups, ratio, pol)
    if pol.fold_constants and removed:
        _fold_constants(dg, groups, traced.tap_means)
    reports = [_group_report(g) for g in groups]
    if removed:
        for batch in ([[g] for g in groups] if isolate else [groups]):
            _apply(dg, batch)
            problem = _check_runs(model, example_inputs, expected)
            if problem:
                raise _SurgeryFailed(problem, batch[0].root_name if isolate else None)
    history = plain_plan(dg.pruning_history())
    setattr(model, PLAN_ATTR, list(getattr(model, PLAN_ATTR, [])) + history)
    return SlimReport(
        requested_ratio=float(ratio),
        true_ratio=removed / prunable if prunable else 0.0,
        threshold=float(threshold),
        prunable_bn_channels=prunable,
        removed_bn_channels=removed,
        total_bn_channels=total_bn,
        exact=removed == round(ratio * prunable),
        bound_by=bound_by,
        groups=reports,
        skipped=skipped,
        policy=asdict(pol),
    )


def _untouched_report(ratio: float, total_bn: int, pol: SlimPolicy, reason: str) -> SlimReport:
    """The report of a model left as it was because no group could be pruned safely."""
    return SlimReport(requested_ratio=float(ratio), true_ratio=0.0, threshold=0.0, prunable_bn_channels=0,
                      removed_bn_channels=0, total_bn_channels=total_bn, exact=ratio == 0,
                      bound_by=[reason] if ratio else [], groups=[],
                      skipped=[{"group": "<model>", "reason": reason}], policy=asdict(pol))


def slim(model: nn.Module, ratio: float, example_inputs: torch.Tensor,
         **policy: Any) -> tuple[nn.Module, SlimReport]:
    """Remove the ``ratio`` of prunable BN channels with the smallest |gamma|.

    Args:
        model: a CNN with BatchNorm2d layers (left untouched unless ``inplace=True``).
        ratio: fraction in [0, 1) of prunable BN channels to remove.
        example_inputs: a batch the model accepts (used to trace the graph and fold constants).
        **policy: :class:`SlimPolicy` fields.

    Returns:
        The physically smaller model (same train/eval mode as ``model``) and its report.  A
        group whose surgery would break the model is left intact and listed in
        ``report.skipped``; the returned model always runs.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    pol = SlimPolicy.from_kwargs(**policy)
    start = time.perf_counter()
    was_training = model.training
    excluded: dict[str, str] = {}
    isolate = False
    while True:
        work = model if pol.inplace else copy.deepcopy(model)
        work.eval()
        try:
            report = _slim_once(work, ratio, example_inputs, pol, excluded, isolate)
            break
        except _SurgeryFailed as failure:
            if pol.inplace:
                raise SlimError(f"pruned model fails to run ({failure.problem}); "
                                "retry with inplace=False to isolate the offending group") from None
            if failure.group is None:
                isolate = True  # find which group breaks it
            else:
                excluded[failure.group] = f"surgery breaks the model ({failure.problem})"
    work.train(was_training)
    model.train(was_training)
    report.seconds = time.perf_counter() - start
    return work, report


def _group_report(g: _Group) -> GroupReport:
    removed = torch.zeros(g.channels, dtype=torch.bool)
    removed[g.prune_idxs] = True
    return GroupReport(
        root=g.root_name,
        bn_layers=[name for name, *_ in g.bn_items],
        channels_before=g.channels,
        channels_after=g.channels - len(g.prune_idxs),
        bn_channels_before=int(g.weights.sum()),
        bn_channels_after=int(g.weights[~removed].sum()),
        at_floor=len(g.prune_idxs) == g.max_removable,
    )


__all__: list[str] = ["GroupReport", "SlimError", "SlimPolicy", "SlimReport", "replay_plan", "slim"]
