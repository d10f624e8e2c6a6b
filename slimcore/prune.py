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
import types
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group
from torch_pruning.ops import OPTYPE

from slimcore.errors import ModelError
from slimcore.fold import fold_constants as _fold_constants
from slimcore.fold import tap_means as _tap_means
from slimcore.models import PLAN_ATTR, batchnorm_problem, input_channels_problem
from slimcore.plan import build_graph, plain_plan, replay_plan
from slimcore.flops import count_flops, count_params
from slimcore.surgery import Snapshot as _Snapshot
from slimcore.surgery import apply_groups as _apply
from slimcore.surgery import breaking_groups as _breaking_groups
from slimcore.surgery import check_runs as _check_runs
from slimcore.surgery import probe_input as _probe_input
from slimcore.targets import Target, parse_target

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
        on_untraceable: when the model cannot be traced or no channel of it can be pruned:
            ``"error"`` raises :class:`SlimError` naming the cause, ``"warn"`` warns and returns
            the model untouched (its report says why).
        warn_gamma: report how many removed channels score above this (|gamma|, or the group
            score of coupled channels): channels that were not negligible
            (``SlimReport.nonnegligible_removed``).  It changes nothing that is removed.
    """

    round_to: int = 1
    min_channels: int = 1
    min_keep_fraction: float = 0.0
    fold_constants: bool = True
    group_score: GroupScore = "max"
    inplace: bool = False
    on_untraceable: Literal["error", "warn"] = "error"
    warn_gamma: float = 1e-2

    def __post_init__(self) -> None:
        if self.round_to < 1 or self.min_channels < 1:
            raise ValueError("round_to and min_channels must be >= 1")
        if not 0 <= self.min_keep_fraction < 1:
            raise ValueError(f"min_keep_fraction must be in [0, 1), got {self.min_keep_fraction}")
        if self.group_score not in ("max", "mean", "l2"):
            raise ValueError(f"group_score must be max, mean or l2, got {self.group_score!r}")
        if self.on_untraceable not in ("error", "warn"):
            raise ValueError(f"on_untraceable must be error or warn, got {self.on_untraceable!r}")
        if not self.warn_gamma >= 0:
            raise ValueError(f"warn_gamma must be >= 0, got {self.warn_gamma}")

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
    """What slimming did: the figures users check against what they asked for.

    ``true_ratio`` is removed / prunable BN channels (what the ranking controls);
    ``ratio_all_bn`` is removed / all BN channels of the model, which is lower whenever groups
    were held fixed.  ``skipped`` lists every group left intact: ``group`` (its root layer),
    ``reason`` and ``channels`` (the BN channels it holds fixed).  ``exact`` is True only when
    the requested ratio was met over *all* BN channels (within one rounding unit of the target
    and nothing held fixed); ``bound_by`` says what stopped it otherwise.

    ``nonnegligible_removed`` counts the removed channels (of the groups' root layers) whose
    score exceeds ``warn_gamma``.  :func:`slim_to` also fills ``target`` (its name, e.g.
    ``flops0.5``), ``requested_ratio`` (the ratio it resolved to), the FLOPs (thop's count, as
    :func:`slimcore.profile.count_flops`) and parameters before and after, and
    ``flops_fraction`` / ``params_fraction`` (after / before); for a FLOPs or parameters target,
    ``exact`` means the kept fraction is within 1% (relative) of the target, and
    ``search_steps`` counts the pruned candidates measured to find the ratio.
    """

    requested_ratio: float
    true_ratio: float
    threshold: float
    prunable_bn_channels: int
    removed_bn_channels: int
    total_bn_channels: int
    exact: bool
    bound_by: list[str]
    groups: list[GroupReport]
    skipped: list[dict[str, Any]]
    policy: dict[str, Any]
    ratio_all_bn: float = 0.0
    seconds: float = 0.0
    warn_gamma: float = 1e-2
    nonnegligible_removed: int = 0
    target: str = ""
    flops_before: float | None = None
    flops_after: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    flops_fraction: float | None = None
    params_fraction: float | None = None
    search_steps: int = 0

    @property
    def skipped_bn_channels(self) -> int:
        """BN channels held fixed (in skipped groups or in no group at all)."""
        return sum(int(s.get("channels", 0)) for s in self.skipped)

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
    atoms: list[torch.Tensor] | None = None  # channels removed together (grouped convs); None: singletons
    min_keep: int = 0  # channels the structure needs kept (e.g. 2 per conv group)


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


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _is_grouped(module: nn.Module) -> bool:
    """A grouped (not depthwise) convolution: pruned by the same channel pattern in every group."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not _is_depthwise(module)


class _Unmappable(Exception):
    """torch-pruning's channel propagation does not converge for this root (e.g. channel slices)."""


def _bounded_pruning_group(self: tp.DependencyGraph, module: nn.Module, pruning_fn: Any,
                           idxs: Any) -> Group:
    """torch-pruning's ``DependencyGraph.get_pruning_group`` with a bound on the propagation.

    Index mappings through channel slices (e.g. ReXNet's ``x[:, :c] += shortcut``) can make the
    original loop grow its group forever; here it stops after a number of steps proportional
    to the graph's size and raises :class:`_Unmappable`, so that group is skipped instead.
    """
    if module not in self.module2node:
        raise ValueError(f"Module {module} is not in the dependency graph.")
    if isinstance(module, tp.ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
        pruning_fn = tp.pruner.function.prune_depthwise_conv_out_channels
    if isinstance(idxs, (int, np.integer)):
        idxs = [int(idxs)]
    idxs = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
    if not getattr(self, "_slim_mapping_fresh", False):  # no surgery since the last update (see _all_groups)
        tp.dependency.index_mapping.update_index_mapping(self)
    group = Group()
    root_node = self.module2node[module]
    group.add_dep(dep=Dependency(pruning_fn, pruning_fn, source=root_node, target=root_node), idxs=idxs)
    # groups that converge take at most ~len(module2node) steps on timm's CNNs (DPN: 3 per node)
    limit = 3 * len(self.module2node) + 64
    widest = getattr(self, "_slim_widest", None)
    if widest is None:  # the widest layer's channels, once per graph
        widest = self._slim_widest = max(
            (max(getattr(m, "in_channels", 0), getattr(m, "out_channels", 0), getattr(m, "in_features", 0),
                 getattr(m, "out_features", 0)) for m in self.module2node if isinstance(m, (nn.Conv2d, nn.Linear))),
            default=0)
    visited: set[Any] = set()
    stack = [(group[0].dep, idxs)]
    steps = 0
    while stack:
        dep, cur = stack.pop(-1)
        steps += 1
        if steps > limit:
            raise _Unmappable(f"channel index propagation does not converge after {limit} steps")
        node, fn = dep.target, dep.handler
        visited.add(node)
        for new_dep in node.dependencies:
            if new_dep.is_triggered_by(fn):
                new_idxs = cur
                for mapping in new_dep.index_mapping:
                    if mapping is not None:
                        new_idxs = mapping(new_idxs)
                if len(new_idxs) == 0:
                    continue
                if len(new_idxs) > 2 * widest:  # more indices than any layer has: a mapping that multiplies
                    raise _Unmappable(f"channel index propagation explodes ({len(new_idxs)} indices at "
                                      f"{self._module2name.get(new_dep.target.module, new_dep.target.name)})")
                if new_dep.target in visited and group.has_pruning_op(new_dep, new_idxs):
                    continue
                group.add_dep(new_dep, new_idxs)
                stack.append((new_dep, new_idxs))
    merged = Group()
    for dep, item_idxs in group.items:
        if isinstance(dep.target.module, nn.Parameter) and any(dep.target.module is p for p in self.ignored_params):
            continue
        merged.add_and_merge(dep, item_idxs)
    merged._DG = self
    for i in range(len(merged)):
        hybrid = merged[i].idxs
        merged[i] = _helpers.GroupItem(merged[i].dep, _helpers.to_plain_idxs(hybrid))
        merged[i].root_idxs = _helpers.to_root_idxs(hybrid)
    return merged


def _all_groups(dg: tp.DependencyGraph, ignored: list[nn.Module]) -> list[tuple[nn.Module, Any, str | None]]:
    """``(root, group or None, why not)`` for every conv/linear root, as torch-pruning's
    ``get_all_groups`` visits them, but a root whose group cannot be built is reported, not fatal."""
    visited: set[nn.Module] = set()
    out: list[tuple[nn.Module, Any, str | None]] = []
    tp.dependency.index_mapping.update_index_mapping(dg)  # once: nothing is pruned while groups are built
    dg._slim_mapping_fresh = True
    try:
        _visit_roots(dg, ignored, visited, out)
    finally:
        dg._slim_mapping_fresh = False
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
        except _Unmappable as err:
            visited.add(m)
            out.append((m, None, str(err)))
            continue
        sliced = any(_channel_slice(item.dep.target) is not None for item in group)
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


def _expands_channels_only_spatially(node: Any) -> bool:
    """An ``expand``/``expand_as`` of a ``(N, C, 1, 1)`` tensor (ECA/SE-style gates): channel i
    stays channel i, so torch-pruning's identity index mapping through it is right."""
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    return sizes is not None and len(sizes) == 4 and int(sizes[1]) > 1 and int(sizes[2]) == int(sizes[3]) == 1


def _channel_slice(node: Any) -> tuple[int, int, int] | None:
    """(start, end, input channels) of a ``x[:, start:end]`` slice (step 1) of a 4D tensor, or None."""
    fn = node.grad_fn
    sizes = getattr(fn, "_saved_self_sym_sizes", None)
    if node.type != OPTYPE.SLICE or sizes is None or len(sizes) != 4 or int(fn._saved_dim) != 1 \
            or int(fn._saved_step) != 1:
        return None
    return int(fn._saved_start), min(int(fn._saved_end), int(sizes[1])), int(sizes[1])


def _fixed_slice_channels(group: Any) -> list[int]:
    """Root channels that reach a channel slice ending before the last channel
    (``x[:, :n]``, DPN's residual path ``x[:, :num_1x1_c]``): ``n`` is fixed in the model's
    code, so they are held fixed.  Channels after ``n`` (``x[:, n:]``, DPN's dense path) may go:
    the slice start stays valid while no channel before it is removed."""
    fixed: set[int] = set()
    for item in group:
        bounds = _channel_slice(item.dep.target)
        if bounds is not None and bounds[1] < bounds[2]:
            fixed.update(int(i) for i in item.root_idxs)
    return sorted(fixed)


def _unsafe_reason(group: Any, dg: tp.DependencyGraph) -> str | None:
    """Why torch-pruning's surgery on this group could yield a wrong model, or None."""
    for item in group:
        node, module = item.dep.target, item.dep.target.module
        if node.type == OPTYPE.EXPAND and _expands_channels_only_spatially(node):
            continue
        if node.type == OPTYPE.SLICE and _channel_slice(node) is not None:
            continue  # channel slices: see _fixed_slice_channels
        if node.type not in _SAFE_OPS:
            return f"unsupported operation {node.type.name} ({type(module).__name__})"
        if node.type in (OPTYPE.CONCAT, OPTYPE.SPLIT) and getattr(module, "offsets", None) is None:
            return f"torch-pruning cannot map channels through {node.type.name.lower()} (unknown sizes)"
        n = _channel_count(dg, item)
        if n is not None and (len(item.idxs) != len(item.root_idxs) or any(not 0 <= i < n for i in item.idxs)):
            return (f"torch-pruning's channel index mapping is inconsistent at "
                    f"{dg._module2name.get(module, type(module).__name__)} (split/concat/slice)")
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
            return None, 0, f"grouped convolution {dg._module2name.get(module, '?')} only partly in the group"
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


def _collect_groups(model: nn.Module, dg: tp.DependencyGraph, classifier: nn.Module | None,
                    score: GroupScore) -> tuple[list[_Group], list[dict[str, Any]]]:
    """Prunable groups with per-channel scores and BN-layer weights; and the skipped ones."""
    names = dg._module2name
    dg.get_pruning_group = types.MethodType(_bounded_pruning_group, dg)  # type: ignore[method-assign]
    ignored = [classifier] if classifier is not None else []
    groups: list[_Group] = []
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
                bn_items.append((names.get(module, type(module).__name__), module, *_index_pair(item)))
            elif dg.is_in_channel_pruning_fn(item.dep.handler) and isinstance(module, (nn.Conv2d, nn.Linear)) \
                    and not _is_depthwise(module):
                consumers.append((module, *_index_pair(item)))
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
        g = _Group(root, root_name, channels, bn_items, consumers, atoms=atoms, min_keep=min_keep)
        g.scores, g.weights = _score_channels(g, score)
        fixed = _fixed_slice_channels(group)
        if fixed:
            skipped.append({"group": root_name, "channels": int(g.weights[fixed].sum()),
                            "reason": f"{len(fixed)} channels reach a channel slice of a size fixed in "
                                      "the model's code (x[:, :n]): held fixed, the rest of the group ranked"})
            g.scores[fixed], g.weights[fixed] = math.inf, 0
        if not bool((g.weights > 0).any()):
            skipped.append({"group": root_name, "reason": "no channel has a BatchNorm2d", "channels": held})
            continue
        groups.append(g)
    unreached = [(names.get(m, "?"), m.num_features) for m in model.modules()
                 if isinstance(m, nn.BatchNorm2d) and m not in seen_bns]
    if unreached:
        skipped.append({"group": "<BN layers in no group>", "channels": sum(n for _, n in unreached),
                        "reason": "not reached by any prunable group: " + ", ".join(n for n, _ in unreached[:8])
                        + (", ..." if len(unreached) > 8 else "")})
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
    scores = torch.nan_to_num(scores, nan=math.inf)
    scores[weights == 0] = math.inf  # a channel without BN (no gamma) is never removed
    return scores, weights


# --------------------------------------------------------------------------------------------
# Selection


def _floor(channels: int, policy: SlimPolicy, min_keep: int = 0) -> int:
    """Fewest channels a group may keep, as a multiple of ``round_to``."""
    need = max(policy.min_channels, math.ceil(policy.min_keep_fraction * channels), min_keep)
    return math.ceil(need / policy.round_to) * policy.round_to


def _atom_order(g: _Group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _unit_table(groups: list[_Group], policy: SlimPolicy) -> tuple[np.ndarray, ...]:
    """Every group's removal units: (score, BN-channel weight, group index, cut) per unit.

    A unit is the next atoms of a group in ascending |gamma| order up to the next allowed cut
    (kept channels a multiple of ``round_to``, at or above the floor); its score is the highest
    |gamma| it removes and its weight the BN channels it removes.  Also stores each group's
    order of channels (``g.order``) and its most removable channels.
    """
    scores, weights, group_ids, cuts_all = [], [], [], []
    for gi, g in enumerate(groups):
        atom_scores, g.order, ends = _atom_order(g)
        n_max = g.channels - _floor(g.channels, policy, g.min_keep)
        # units that would remove a channel without BN (score inf, sorted last) are never offered
        allowed = (ends <= n_max) & ((g.channels - ends) % policy.round_to == 0) & torch.isfinite(atom_scores)
        cuts, unit_scores = ends[allowed], atom_scores[allowed]
        g.max_removable = int(cuts[-1]) if len(cuts) else 0
        cum_w = torch.cumsum(g.weights[g.order], 0)
        unit_cum = cum_w[cuts - 1] if len(cuts) else cum_w[:0]
        scores.append(unit_scores.double().numpy())
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
        if stopped_at is not None:
            nxt = (f"the next unit ({int(unit_weight[stopped_at])} BN channels, group "
                   f"{groups[unit_group[stopped_at]].root_name}) would overshoot")
        else:
            nxt = "the last unit taken overshoots by less than stopping short would miss"
        bound_by.append(
            f"granularity: channels go in units of round_to x (BN layers in the group), or whole "
            f"conv groups; {nxt}, so {removed} of the target {target} BN channels are removed"
        )
    return prunable, removed, threshold, bound_by


def _untraceable(ratio: float, total_bn: int, pol: SlimPolicy, cause: str,
                 skipped: list[dict[str, Any]]) -> SlimReport:
    """Raise :class:`SlimError` (default) or warn and report the model untouched."""
    if pol.on_untraceable == "error":
        raise SlimError(f"cannot slim this model: {cause} (on_untraceable='warn' returns it untouched)")
    warnings.warn(f"slim: model left untouched: {cause}", stacklevel=3)
    return SlimReport(requested_ratio=float(ratio), true_ratio=0.0, threshold=0.0, prunable_bn_channels=0,
                      removed_bn_channels=0, total_bn_channels=total_bn, exact=ratio == 0,
                      bound_by=[cause] if ratio else [], groups=[],
                      skipped=[{"group": "<model>", "reason": cause, "channels": total_bn}, *skipped],
                      policy=asdict(pol), ratio_all_bn=0.0)


def _why_none(model: nn.Module, skipped: list[dict[str, Any]]) -> str:
    """Why no group is prunable: the model's batch norm layers first (none with a gamma:
    SyncBatchNorm, affine=False), else the skipped groups' reasons."""
    problem = batchnorm_problem(model)
    if problem:
        return f"the model {problem}"
    return _skip_summary(skipped) if skipped else "it has no BatchNorm2d layer"


def _check_inputs(model: nn.Module, example_inputs: Any) -> None:
    """Refuse, in one line, what would make ``slim`` fail deep inside or quietly change the
    model: lazy layers not yet initialised (tracing would initialise the copy with new random
    weights) and an example batch whose channel count the model's convolutions cannot take."""
    from torch.nn.parameter import is_lazy

    lazy = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if is_lazy(t)]
    if lazy:
        some = ", ".join(lazy[:3]) + (", ..." if len(lazy) > 3 else "")
        raise ModelError(f"the model has uninitialised lazy parameters ({some}): slimming would trace "
                         "it with new random weights; run one forward pass on a real batch (or load its "
                         "weights) before slimming")
    if isinstance(example_inputs, torch.Tensor) and example_inputs.dim() == 4:
        problem = input_channels_problem(model, int(example_inputs.shape[1]),
                                         f"an example input of shape {tuple(example_inputs.shape)}",
                                         "pass example inputs with as many channels as the model takes")
        if problem:
            raise ModelError(f"the model {problem}")


def _check_runs_on(model: nn.Module, example_inputs: Any) -> None:
    """Run ``model`` on ``example_inputs``; a failure is the caller's (a :class:`ModelError`)."""
    try:
        with torch.no_grad():
            model(example_inputs)
    except Exception as err:
        shape = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else type(example_inputs)
        raise ModelError(f"the model cannot run on the example input of shape {shape}: {type(err).__name__}: "
                         f"{' '.join(str(err).split())[:300]}; pass a batch the model accepts") from None


def _skip_summary(skipped: list[dict[str, Any]]) -> str:
    reasons = sorted({s["reason"].split(" (")[0] for s in skipped})
    return "; ".join(reasons[:4]) + ("; ..." if len(reasons) > 4 else "")


_MAX_TRIES = 4
TARGET_TOLERANCE = 0.01  # a FLOPs/params target is met when |kept - F| <= TARGET_TOLERANCE * F
_MAX_SEARCH_STEPS = 40


@dataclass
class _Goal:
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


def _search_ratio(model: nn.Module, dg: tp.DependencyGraph, groups: list[_Group],
                  tap_means: dict[nn.Module, torch.Tensor], pol: SlimPolicy, goal: _Goal,
                  snapshot: _Snapshot, skipped: list[dict[str, Any]]) -> tuple[float, list[str]]:
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
    available = int(_unit_table(groups, pol)[1].sum())
    target, tol = goal.fraction, TARGET_TOLERANCE * goal.fraction
    cache: dict[int, float] = {0: 1.0}

    def kept(k: int) -> float:
        if k not in cache:
            _select(groups, k / prunable, pol)
            try:
                if pol.fold_constants:
                    _fold_constants(dg, groups, tap_means)
                _apply(dg, groups)
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
        floors = [g.root_name for g in groups if g.max_removable < g.channels]
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


def _slim_work(model: nn.Module, ratio: float, example_inputs: torch.Tensor, pol: SlimPolicy,
               goal: _Goal | None = None) -> SlimReport:
    """Slim ``model`` in place (one trace; failed surgery undone from a snapshot).  With ``goal``
    the ratio is searched first (on the same trace) so the model keeps ``goal.fraction`` of its
    FLOPs or parameters."""
    total_bn = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    try:
        traced = _trace(model, example_inputs, fold=pol.fold_constants and (ratio > 0 or goal is not None))
        groups, skipped = _collect_groups(model, traced.graph, traced.classifier, pol.group_score)
    except Exception as err:  # torch-pruning cannot model this graph at all
        _check_runs_on(model, example_inputs)  # a model that cannot run on example_inputs is the caller's error
        return _untraceable(ratio, total_bn, pol, f"torch-pruning cannot trace the model: "
                            f"{type(err).__name__}: {err}", [])
    if ratio > 0 and not groups:
        return _untraceable(ratio, total_bn, pol, f"no channel group can be pruned ({_why_none(model, skipped)})",
                            skipped)
    dg, expected = traced.graph, traced.output_shape
    probe = _probe_input(model, example_inputs, expected)
    snapshot = _Snapshot(model, dg)
    search_bound: list[str] = []
    if goal is not None:
        if not groups:
            return _untraceable(0.0, total_bn, pol, f"no channel group can be pruned ({_why_none(model, skipped)})",
                                skipped)
        ratio, search_bound = _search_ratio(model, dg, groups, traced.tap_means, pol, goal, snapshot, skipped)
    by_name = {g.root_name: g for g in groups}
    excluded: dict[str, str] = {}
    for _ in range(_MAX_TRIES):
        active = [g for g in groups if g.root_name not in excluded]
        prunable, removed, threshold, bound_by = _select(active, ratio, pol)
        if not removed:
            break
        if pol.fold_constants:
            _fold_constants(dg, active, traced.tap_means)
        try:
            _apply(dg, active)
            problem = _check_runs(model, probe, expected)
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
        if problem is None:
            break
        snapshot.restore(dg)
        bad = _breaking_groups(model, dg, active, probe, expected)
        snapshot.restore(dg)
        if not bad:
            raise SlimError(f"pruned model fails to run ({problem}), though each group alone does not break it")
        excluded.update(bad)
    else:
        raise SlimError(f"pruned model still fails to run after excluding {len(excluded)} groups ({problem})")
    skipped += [{"group": name, "reason": why, "channels": int(by_name[name].weights.sum())}
                for name, why in excluded.items()]
    nonnegligible = sum(int((g.scores[g.prune_idxs] > pol.warn_gamma).sum()) for g in groups
                        if g.root_name not in excluded)
    history = plain_plan(dg.pruning_history())
    setattr(model, PLAN_ATTR, list(getattr(model, PLAN_ATTR, [])) + history)
    held = sum(int(s["channels"]) for s in skipped)
    ratio_all = removed / total_bn if total_bn else 0.0
    if held and ratio:
        bound_by.append(
            f"skipped groups: {held} of {total_bn} BN channels are held fixed in "
            f"{sum(1 for s in skipped if s['channels'])} skipped group(s) (see skipped), so "
            f"{removed} of all {total_bn} BN channels ({ratio_all:.1%}) are removed for a requested {ratio:.1%}")
    return SlimReport(
        requested_ratio=float(ratio),
        true_ratio=removed / prunable if prunable else 0.0,
        threshold=float(threshold),
        prunable_bn_channels=prunable,
        removed_bn_channels=removed,
        total_bn_channels=total_bn,
        exact=removed == round(ratio * prunable) and not (held and ratio),
        bound_by=bound_by if goal is None else search_bound,
        groups=[_group_report(g) for g in groups if g.root_name not in excluded],
        skipped=skipped,
        policy=asdict(pol),
        ratio_all_bn=ratio_all,
        warn_gamma=pol.warn_gamma,
        nonnegligible_removed=nonnegligible,
        search_steps=goal.steps if goal is not None else 0,
    )


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
        ``report.skipped`` (with the BN channels it holds fixed); the returned model always runs.

    Raises:
        SlimError: the model cannot be traced or no group of it can be pruned (unless
            ``on_untraceable="warn"``), or the pruned model cannot be made to run.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    return _slim(model, ratio, example_inputs, SlimPolicy.from_kwargs(**policy), None)


def _slim(model: nn.Module, ratio: float, example_inputs: torch.Tensor, pol: SlimPolicy,
          goal: _Goal | None) -> tuple[nn.Module, SlimReport]:
    start = time.perf_counter()
    _check_inputs(model, example_inputs)
    was_training = model.training
    work = model if pol.inplace else copy.deepcopy(model)
    work.eval()
    try:
        report = _slim_work(work, ratio, example_inputs, pol, goal)
    finally:
        work.train(was_training)
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    return work, report


def coupled_units(model: nn.Module, example_inputs: torch.Tensor) -> list[tuple[nn.BatchNorm2d, torch.Tensor]]:
    """Which BN channels ``slim`` removes together: per affine BN layer, a unit id per channel.

    Channels of different BN layers that share an id are one channel of a coupled group (e.g.
    a residual stream channel: the last BN of every block of a stage and the downsample BN),
    which :func:`slim` scores by combining their |gamma| (``group_score``) and removes only as
    a whole.  Channels no prunable group reaches get ids of their own.  Used by the group-aware
    sparsity penalty (:class:`slimcore.sparsity.GammaPenalty`); ``model`` is left unchanged.
    """
    was_training = model.training
    model.eval()
    try:
        traced = _trace(model, example_inputs, fold=False)
        groups, _ = _collect_groups(model, traced.graph, traced.classifier, "max")
    finally:
        model.train(was_training)
    units: dict[nn.BatchNorm2d, torch.Tensor] = {
        m: torch.full((m.num_features,), -1, dtype=torch.long)
        for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine}
    next_id = 0
    for g in groups:
        for _, bn, idxs, root_idxs in g.bn_items:
            units[bn][idxs] = next_id + root_idxs
        next_id += g.channels
    for ids in units.values():
        alone = ids < 0
        ids[alone] = torch.arange(next_id, next_id + int(alone.sum()))
        next_id += int(alone.sum())
    return list(units.items())


def slim_to(model: nn.Module, target: Target | float | str, example_inputs: torch.Tensor, *,
            safe_ratio: float | None = None, input_size: int | tuple[int, ...] | None = None,
            **policy: Any) -> tuple[nn.Module, SlimReport]:
    """Slim ``model`` to a target: a channel ratio, a kept fraction of FLOPs or of parameters.

    Args:
        model, example_inputs, **policy: as :func:`slim`.
        target: a :class:`slimcore.targets.Target` or its spelling: ``0.2`` (a ratio, exactly
            :func:`slim`), ``"flops0.5"`` (keep half the FLOPs), ``"speedup2"`` (the same: a MAC
            speed-up S keeps 1/S of the FLOPs, thop's MAC count), ``"params0.3"`` (keep 30% of
            the parameters) or ``"safe"`` (the ratio ``safe_ratio``, which the caller reads from
            the sensitivity report).
        safe_ratio: the ratio a ``safe`` target stands for.
        input_size: the input FLOPs are counted at (as :func:`slimcore.profile.count_flops`);
            default: ``example_inputs`` at batch 1.

    A FLOPs or parameters target is met when the kept fraction is within 1% of it (relative);
    the ratio is searched on one traced graph (each candidate pruned, measured and undone).
    When no ratio meets it (group floors, ``round_to``, groups held fixed) the nearest one is
    used and ``report.bound_by`` says what bounds it.  The report always records the target,
    the resolved ratio (``requested_ratio``) and the FLOPs and parameters before and after.
    """
    goal_target = parse_target(target)
    pol = SlimPolicy.from_kwargs(**policy)
    shape = tuple(example_inputs.shape[1:]) if input_size is None else input_size
    if isinstance(shape, tuple) and len(shape) == 3:
        shape = (1, *shape)
    goal = None
    if goal_target.kind == "safe":
        if safe_ratio is None:
            raise ValueError("a 'safe' target needs safe_ratio= (the sensitivity report's safe_ratio)")
        ratio = parse_target(float(safe_ratio)).value
    elif goal_target.kind == "ratio":
        ratio = goal_target.value
    else:
        ratio = 0.0
        if goal_target.flops_fraction is not None:  # flopsF, or speedupS: keep 1/S of the FLOPs (MACs)
            goal = _Goal("flops", goal_target.flops_fraction, shape)
        else:
            goal = _Goal("params", float(goal_target.value), shape)  # type: ignore[arg-type]
    start = time.perf_counter()
    flops_before = count_flops(model, shape)
    params_before = count_params(model)
    if goal is not None:
        goal.before = flops_before if goal.measure == "flops" else float(params_before)
    pruned, report = _slim(model, float(ratio), example_inputs, pol, goal)  # type: ignore[arg-type]
    report.target = goal_target.tag
    report.flops_before, report.params_before = flops_before, params_before
    report.flops_after, report.params_after = count_flops(pruned, shape), count_params(pruned)
    report.flops_fraction = report.flops_after / flops_before if flops_before else 1.0
    report.params_fraction = report.params_after / params_before if params_before else 1.0
    if goal is not None:
        achieved = report.flops_fraction if goal.measure == "flops" else report.params_fraction
        report.exact = abs(achieved - goal.fraction) <= TARGET_TOLERANCE * goal.fraction
        if not report.exact and not report.bound_by:
            report.bound_by.append(
                f"skipped groups: the pruned model keeps {achieved:.2%} of the "
                f"{'FLOPs' if goal.measure == 'flops' else 'parameters'} for a target of {goal.fraction:.2%} "
                "after groups whose surgery broke the model were held fixed (see skipped)")
    report.seconds = time.perf_counter() - start
    return pruned, report


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


__all__: list[str] = ["TARGET_TOLERANCE", "GroupReport", "SlimError", "SlimPolicy", "SlimReport", "coupled_units",
                      "replay_plan", "slim", "slim_to"]
