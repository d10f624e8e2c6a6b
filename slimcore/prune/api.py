"""The public functions of slimming and their orchestration: :func:`slim`, :func:`slim_to`,
:func:`coupled_units`.

One slimming run traces the model once (:mod:`slimcore.prune.trace`), collects its channel
groups (:mod:`slimcore.prune.groups`), searches the ratio for a FLOPs or parameters target
(:mod:`slimcore.prune.search`), selects the channels (:mod:`slimcore.prune.selection`), folds
their constants (:mod:`slimcore.prune.constant_folding`) and removes them
(:mod:`slimcore.prune.surgery`), leaving intact any group whose surgery breaks the model.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from slimcore.errors import ModelError
from slimcore.flops import count_flops, count_params
from slimcore.models import PLAN_ATTR, batchnorm_problem, input_channels_problem
from slimcore.plan import plain_plan
from slimcore.prune.constant_folding import fold_constants
from slimcore.prune.groups import ChannelGroup, collect_groups
from slimcore.prune.policy import GroupReport, SlimError, SlimPolicy, SlimReport
from slimcore.prune.search import TARGET_TOLERANCE, Goal, search_ratio
from slimcore.prune.selection import select
from slimcore.prune.surgery import Snapshot, apply_selection, breaking_groups, check_runs, probe_input
from slimcore.prune.trace import trace
from slimcore.targets import Target, parse_target
from slimcore.tp_compat import check_version


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


def _slim_work(model: nn.Module, ratio: float, example_inputs: torch.Tensor, pol: SlimPolicy,
               goal: Goal | None = None) -> SlimReport:
    """Slim ``model`` in place (one trace; failed surgery undone from a snapshot).  With ``goal``
    the ratio is searched first (on the same trace) so the model keeps ``goal.fraction`` of its
    FLOPs or parameters."""
    total_bn = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    try:
        traced = trace(model, example_inputs, fold=pol.fold_constants and (ratio > 0 or goal is not None))
        groups, skipped = collect_groups(model, traced.graph, traced.classifier, pol.group_score)
    except Exception as err:  # torch-pruning cannot model this graph at all
        _check_runs_on(model, example_inputs)  # a model that cannot run on example_inputs is the caller's error
        return _untraceable(ratio, total_bn, pol, f"torch-pruning cannot trace the model: "
                            f"{type(err).__name__}: {err}", [])
    if ratio > 0 and not groups:
        return _untraceable(ratio, total_bn, pol, f"no channel group can be pruned ({_why_none(model, skipped)})",
                            skipped)
    dg, expected = traced.graph, traced.output_shape
    probe = probe_input(model, example_inputs, expected)
    snapshot = Snapshot(model, dg)
    search_bound: list[str] = []
    if goal is not None:
        if not groups:
            return _untraceable(0.0, total_bn, pol, f"no channel group can be pruned ({_why_none(model, skipped)})",
                                skipped)
        ratio, search_bound = search_ratio(model, dg, groups, traced.tap_means, pol, goal, snapshot, skipped)
    by_name = {g.root_name: g for g in groups}
    excluded: dict[str, str] = {}
    for _ in range(_MAX_TRIES):
        active = [g for g in groups if g.root_name not in excluded]
        selection = select(active, ratio, pol)
        if not selection.removed:
            break
        if pol.fold_constants:
            fold_constants(dg, selection, traced.tap_means)
        try:
            apply_selection(dg, selection)
            problem = check_runs(model, probe, expected)
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
        if problem is None:
            break
        snapshot.restore(dg)
        bad = breaking_groups(model, dg, selection, probe, expected)
        snapshot.restore(dg)
        if not bad:
            raise SlimError(f"pruned model fails to run ({problem}), though each group alone does not break it")
        excluded.update(bad)
    else:
        raise SlimError(f"pruned model still fails to run after excluding {len(excluded)} groups ({problem})")
    skipped += [{"group": name, "reason": why, "channels": int(by_name[name].weights.sum())}
                for name, why in excluded.items()]
    # the last selection covers every group not excluded
    prunable, removed, threshold = selection.prunable, selection.removed, selection.threshold
    bound_by = list(selection.bound_by)
    nonnegligible = sum(int((g.scores[idxs] > pol.warn_gamma).sum())
                        for g, idxs in zip(selection.groups, selection.removed_idxs))
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
        groups=[_group_report(g, idxs, most) for g, idxs, most in
                zip(selection.groups, selection.removed_idxs, selection.max_removable)],
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

    Example:
        >>> small, report = slimcore.slim(model, 0.4, torch.randn(2, 3, 32, 32), round_to=8)
        >>> report.true_ratio, report.bound_by      # 0.4 within one rounding unit, or why not
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    return _slim(model, ratio, example_inputs, SlimPolicy.from_kwargs(**policy), None)


def _slim(model: nn.Module, ratio: float, example_inputs: torch.Tensor, pol: SlimPolicy,
          goal: Goal | None) -> tuple[nn.Module, SlimReport]:
    start = time.perf_counter()
    check_version()  # before tracing: an unsupported torch-pruning is no untraceable model
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
    slimming penalty (:class:`slimcore.penalty.GammaPenalty`); ``model`` is left unchanged.

    Example:
        >>> units = slimcore.coupled_units(model, torch.randn(2, 3, 32, 32))
        >>> penalty = slimcore.GammaPenalty(model, 0.15, method="group", units=units)
    """
    check_version()
    was_training = model.training
    model.eval()
    try:
        traced = trace(model, example_inputs, fold=False)
        groups, _ = collect_groups(model, traced.graph, traced.classifier, "max")
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
        input_size: the input FLOPs are counted at (as :func:`slimcore.flops.count_flops`);
            default: ``example_inputs`` at batch 1.

    A FLOPs or parameters target is met when the kept fraction is within 1% of it (relative);
    the ratio is searched on one traced graph (each candidate pruned, measured and undone).
    When no ratio meets it (group floors, ``round_to``, groups held fixed) the nearest one is
    used and ``report.bound_by`` says what bounds it.  The report always records the target,
    the resolved ratio (``requested_ratio``) and the FLOPs and parameters before and after.

    Example:
        >>> small, report = slimcore.slim_to(model, "speedup2", torch.randn(2, 3, 32, 32))
        >>> report.flops_fraction                   # about 0.5 of the MACs kept
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
            goal = Goal("flops", goal_target.flops_fraction, shape)
        else:
            goal = Goal("params", float(goal_target.value), shape)  # type: ignore[arg-type]
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


def _group_report(g: ChannelGroup, removed_idxs: torch.Tensor, max_removable: int) -> GroupReport:
    removed = torch.zeros(g.channels, dtype=torch.bool)
    removed[removed_idxs] = True
    return GroupReport(
        root=g.root_name,
        bn_layers=[name for name, *_ in g.bn_items],
        channels_before=g.channels,
        channels_after=g.channels - len(removed_idxs),
        bn_channels_before=int(g.weights.sum()),
        bn_channels_after=int(g.weights[~removed].sum()),
        at_floor=len(removed_idxs) == max_removable,
    )


__all__ = ["coupled_units", "slim", "slim_to"]
