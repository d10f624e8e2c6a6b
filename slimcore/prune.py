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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.ops import OPTYPE

from slimcore.models import PLAN_ATTR, ModelSpec

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
    max_removable: int = 0


# --------------------------------------------------------------------------------------------
# Graph analysis


def _find_classifier(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module | None:
    """The last Conv2d/Linear executed in a forward pass: the layer that emits the logits."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else None


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
            idxs = torch.as_tensor(item.idxs, dtype=torch.long)
            root_idxs = torch.as_tensor(item.root_idxs, dtype=torch.long)
            if isinstance(module, nn.BatchNorm2d) and module.affine:
                bn_items.append((names.get(module, "?"), module, idxs, root_idxs))
            elif dg.is_in_channel_pruning_fn(item.dep.handler) and isinstance(module, (nn.Conv2d, nn.Linear)) \
                    and not _is_depthwise(module):
                consumers.append((module, idxs, root_idxs))
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


def _select(groups: list[_Group], ratio: float, policy: SlimPolicy) -> tuple[int, int, float, list[str]]:
    """Choose each group's removed channels; returns (prunable, removed, threshold, bound_by)."""
    prunable = int(sum(int(g.weights.sum()) for g in groups))
    target = round(ratio * prunable)
    unit_score, unit_weight, unit_group, unit_cut = [], [], [], []
    orders = []
    for gi, g in enumerate(groups):
        sorted_scores, order = torch.sort(g.scores, stable=True)  # ties: lower index first
        orders.append(order)
        cum_w = torch.cumsum(g.weights[order], 0)
        cuts = _units(g, policy)
        g.max_removable = cuts[-1] if cuts else 0
        prev = 0
        for cut in cuts:
            unit_score.append(float(sorted_scores[cut - 1]))
            unit_weight.append(int(cum_w[cut - 1]) - prev)
            prev = int(cum_w[cut - 1])
            unit_group.append(gi)
            unit_cut.append(cut)
    removed_per_group = [0] * len(groups)
    removed, threshold, stopped_at = 0, 0.0, None
    if target > 0 and unit_score:
        # Global order: score, then group, then unit (within a group scores never decrease).
        keys = sorted(range(len(unit_score)), key=lambda u: (unit_score[u], unit_group[u], unit_cut[u]))
        blocked: set[int] = set()  # groups whose next unit was skipped: their later units must wait
        for u in keys:
            w, gi = unit_weight[u], unit_group[u]
            if gi in blocked:
                continue
            if removed + w > target:
                if stopped_at is None and (removed + w - target) < (target - removed):
                    pass  # overshooting by less than we would fall short: take it
                else:
                    stopped_at = u if stopped_at is None else stopped_at
                    blocked.add(gi)  # keep scanning for smaller units that fill the gap
                    continue
            removed += w
            removed_per_group[gi] = unit_cut[u]
            threshold = max(threshold, unit_score[u])
            if removed >= target:
                break
    for g, order, n in zip(groups, orders, removed_per_group):
        g.prune_idxs = torch.sort(order[:n]).values
    bound_by: list[str] = []
    available = sum(unit_weight)
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


def _missing_contribution(module: nn.Module, x: torch.Tensor, idxs: torch.Tensor) -> torch.Tensor:
    """What the inputs ``idxs`` of ``x`` add to ``module``'s output, averaged to one value per output.

    For a constant input this is exact for a linear or 1x1 layer, and for a padded KxK conv it
    is the best constant (mean over positions) of a map that is constant away from the borders.
    """
    masked = torch.zeros_like(x)
    masked[:, idxs] = x[:, idxs]
    if isinstance(module, nn.Linear):
        return nn.functional.linear(masked, module.weight).mean(0)
    out = module._conv_forward(masked, module.weight, None)  # type: ignore[operator]
    return out.mean(dim=(0, 2, 3))


@torch.no_grad()
def _fold_constants(model: nn.Module, dg: tp.DependencyGraph, groups: list[_Group],
                    example_inputs: torch.Tensor) -> None:
    """Fold the output of channels about to be removed into the layers that consume them.

    With the removed channels' gammas set to zero, each of them emits a constant (beta through
    the activation, and through any depthwise conv and BN in between).  A forward pass records,
    for every consuming conv or linear layer, what those inputs add to its output; that amount
    goes into the layer's bias (or the running mean of the BN right after it), so removing the
    inputs leaves the layer's output unchanged.
    """
    wanted: dict[nn.Module, list[torch.Tensor]] = defaultdict(list)
    for g in groups:
        if len(g.prune_idxs) == 0:
            continue
        removed = torch.zeros(g.channels, dtype=torch.bool)
        removed[g.prune_idxs] = True
        for _, bn, idxs, root_idxs in g.bn_items:
            bn.weight[idxs[removed[root_idxs]]] = 0.0
        for module, idxs, root_idxs in g.consumers:
            wanted[module].append(idxs[removed[root_idxs]])
    if not wanted:
        return
    in_idxs = {m: torch.unique(torch.cat(parts)) for m, parts in wanted.items()}
    deltas: dict[nn.Module, torch.Tensor] = {}

    def capture(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        deltas[module] = _missing_contribution(module, args[0].detach(), in_idxs[module])

    hooks = [m.register_forward_pre_hook(capture) for m in in_idxs]
    try:
        model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    for module, delta in deltas.items():
        kind, sink = _bias_sink(dg, module)
        if kind == "bias":
            sink.bias += delta.to(sink.bias.dtype)
        elif kind == "bn":
            sink.running_mean -= delta.to(sink.running_mean.dtype)  # BN(x + d) == BN'(x), mean' = mean - d
        else:
            sink.bias = nn.Parameter(delta.clone())


# --------------------------------------------------------------------------------------------
# Surgery


def _apply(dg: tp.DependencyGraph, groups: list[_Group]) -> None:
    """Remove the chosen channels, group by group (torch-pruning records the history)."""
    for g in groups:
        if len(g.prune_idxs) == 0:
            continue
        pruner = dg.get_pruner_of_module(g.root)
        dg.get_pruning_group(g.root, pruner.prune_out_channels, g.prune_idxs.tolist()).prune()


def _check_runs(model: nn.Module, example_inputs: torch.Tensor, expected: torch.Size) -> str | None:
    """None when the model runs and keeps its output shape, else what went wrong."""
    try:
        with torch.no_grad():
            out = model(example_inputs)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    if out.shape != expected:
        return f"output shape {tuple(out.shape)} != {tuple(expected)}"
    return None


def _build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)


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
    with torch.no_grad():
        expected = model(example_inputs).shape
    classifier = _find_classifier(model, example_inputs)
    total_bn = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    try:
        dg = _build_graph(model, example_inputs)
        groups, skipped = _collect_groups(model, dg, classifier, pol.group_score)
    except Exception as err:  # noqa: BLE001 - torch-pruning cannot model this graph at all
        reason = f"torch-pruning cannot trace the model: {type(err).__name__}: {err}"
        return _untouched_report(ratio, total_bn, pol, reason)
    skipped += [{"group": name, "reason": why} for name, why in excluded.items()]
    groups = [g for g in groups if g.root_name not in excluded]
    prunable, removed, threshold, bound_by = _select(groups, ratio, pol)
    if pol.fold_constants and removed:
        _fold_constants(model, dg, groups, example_inputs)
    reports = [_group_report(g) for g in groups]
    if removed:
        for batch in ([[g] for g in groups] if isolate else [groups]):
            _apply(dg, batch)
            problem = _check_runs(model, example_inputs, expected)
            if problem:
                raise _SurgeryFailed(problem, batch[0].root_name if isolate else None)
    history = [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in dg.pruning_history()]
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


def replay_plan(model: nn.Module, plan: Sequence[Sequence[Any]], spec: ModelSpec) -> nn.Module:
    """Re-apply a recorded pruning plan to a freshly built model (in place), for loading."""
    was_training = model.training
    model.eval()
    dg = _build_graph(model, spec.example_inputs())
    dg.load_pruning_history([[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in plan])
    setattr(model, PLAN_ATTR, [list(p) for p in plan])
    model.train(was_training)
    return model


__all__: list[str] = ["GroupReport", "SlimError", "SlimPolicy", "SlimReport", "replay_plan", "slim"]
