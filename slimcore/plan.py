"""Pruning plans: torch-pruning's record of which channels were removed, replayed on load.

A plan is a list of ``[layer name, is_output_channels, [channel indices]]`` (plain ints, so
it travels inside a ``weights_only`` checkpoint).  Replaying it on a freshly built model
reproduces the pruned architecture exactly; the checkpoint's weights then load strictly.
Replay traces the model with an input of the size it was pruned with: :func:`build_graph`
records the traced input size on the model (``TRACE_ATTR``), checkpoints store it, so models that
need large inputs (many timm models) replay as they were traced.
Kept apart from :mod:`slimcore.prune` so that loading a model never depends on the slimming
policy (and DVC does not re-run training when the policy changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from slimcore.models import PLAN_ATTR, TRACE_ATTR, ModelSpec
from slimcore.tp_compat import ensure_applied, patch_graph

Plan = list[list[Any]]


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's DependencyGraph of ``model`` (traced with autograd on).

    Records the input's spatial size on the model (``TRACE_ATTR``): a plan recorded on this
    graph is replayed with an input of that size (see :func:`replay_plan`).  A 1-in 1-out Conv1d
    (ECA-style attention, convolving along the channel axis) is left out of the trace, so
    torch-pruning sees it as the element-wise op it is for channel indices.  slimcore's
    workarounds for torch-pruning (:mod:`slimcore.tp_compat`) are applied here, before tracing
    (process-wide, once) and on the graph.
    """
    ensure_applied()
    channel_convs = [m for m in model.modules()
                     if isinstance(m, nn.Conv1d) and m.in_channels == m.out_channels == 1]
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False,
                                                      ignored_layers=channel_convs)
    patch_graph(graph)
    if isinstance(example_inputs, torch.Tensor) and example_inputs.dim() == 4:
        setattr(model, TRACE_ATTR, (int(example_inputs.shape[2]), int(example_inputs.shape[3])))
    return graph


def sync_split_sizes(model: nn.Module) -> nn.Module:
    """Update fixed channel-split sizes after surgery: called after pruning and after replaying
    a plan.  timm's MixedConv2d keeps ``splits`` (the input channels of each of its convs),
    CSP stages split ``conv_exp``'s output in halves of ``expand_chs // 2``, Res2Net blocks
    split ``conv1``'s output in chunks of ``width`` (the input channels of each of ``convs``);
    slimming prunes those splits by the same offsets in every chunk, so they stay equal."""
    for module in model.modules():
        exp = getattr(module, "conv_exp", None)
        if isinstance(getattr(module, "expand_chs", None), int) and exp is not None:
            conv = exp if isinstance(exp, nn.Conv2d) else getattr(exp, "conv", None)
            if isinstance(conv, nn.Conv2d):
                module.expand_chs = conv.out_channels
        convs = getattr(module, "convs", None)
        if isinstance(getattr(module, "width", None), int) and isinstance(getattr(module, "scale", None), int) \
                and isinstance(convs, nn.ModuleList) and len(convs) and isinstance(convs[0], nn.Conv2d):
            module.width = convs[0].in_channels
        splits = getattr(module, "splits", None)
        convs = list(module.children())
        if isinstance(splits, (list, tuple)) and len(splits) == len(convs) \
                and all(isinstance(c, nn.Conv2d) for c in convs):
            module.splits = [c.in_channels for c in convs]
            module.in_channels = sum(module.splits)
            module.out_channels = sum(c.out_channels for c in convs)
    return model


def plain_plan(history: Sequence[Sequence[Any]]) -> Plan:
    """A plan as plain Python values (str, bool, list of int)."""
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


def replay_plan(model: nn.Module, plan: Sequence[Sequence[Any]], spec: ModelSpec,
                trace_size: Sequence[int] | None = None) -> nn.Module:
    """Re-apply a recorded pruning plan to a freshly built model (in place), for loading.

    ``trace_size`` is the (H, W) the plan was traced with (default: the spec's smallest input).
    """
    was_training = model.training
    model.eval()
    height, width = (int(trace_size[0]), int(trace_size[1])) if trace_size else (spec.min_image_size,) * 2
    dg = build_graph(model, torch.randn(1, 3, height, width))
    dg.load_pruning_history(plain_plan(plan))
    sync_split_sizes(model)
    setattr(model, PLAN_ATTR, plain_plan(plan))
    model.train(was_training)
    return model


__all__ = ["Plan", "build_graph", "plain_plan", "replay_plan", "sync_split_sizes"]
