"""Pruning plans: torch-pruning's record of which channels were removed, replayed on load.

A plan is a list of ``[layer name, is_output_channels, [channel indices]]`` (plain ints, so
it travels inside a ``weights_only`` checkpoint).  Replaying it on a freshly built model
reproduces the pruned architecture exactly; the checkpoint's weights then load strictly.
Kept apart from :mod:`slimcore.prune` so that loading a model never depends on the slimming
policy (and DVC does not re-run training when the policy changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from slimcore.models import PLAN_ATTR, ModelSpec

Plan = list[list[Any]]


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's DependencyGraph of ``model`` (traced with autograd on)."""
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)


def plain_plan(history: Sequence[Sequence[Any]]) -> Plan:
    """A plan as plain Python values (str, bool, list of int)."""
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


def replay_plan(model: nn.Module, plan: Sequence[Sequence[Any]], spec: ModelSpec) -> nn.Module:
    """Re-apply a recorded pruning plan to a freshly built model (in place), for loading."""
    was_training = model.training
    model.eval()
    dg = build_graph(model, spec.example_inputs())
    dg.load_pruning_history(plain_plan(plan))
    setattr(model, PLAN_ATTR, plain_plan(plan))
    model.train(was_training)
    return model


__all__ = ["Plan", "build_graph", "plain_plan", "replay_plan"]
