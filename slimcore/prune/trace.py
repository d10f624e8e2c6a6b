"""Tracing for slimming: one forward pass that yields the graph and what slimming needs besides.

:func:`trace` builds torch-pruning's DependencyGraph (:func:`slimcore.plan.build_graph`) and, in
the same pass, finds the classifier (never pruned), the output shape (to check surgery against)
and, for constant folding, every conv/linear layer's mean input per kernel tap with every BN
gamma at zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from slimcore.plan import build_graph
from slimcore.prune.constant_folding import tap_means


@dataclass
class Trace:
    """What one traced forward pass tells: the graph, the logits layer, the output shape, and
    (when folding) each conv/linear layer's mean input per kernel tap with every gamma at zero."""

    graph: tp.DependencyGraph
    classifier: nn.Module | None
    output_shape: torch.Size
    tap_means: dict[nn.Module, torch.Tensor]


def trace(model: nn.Module, example_inputs: torch.Tensor, fold: bool) -> Trace:
    """Build the DependencyGraph; its tracing pass also yields everything else slimming needs.

    The classifier is the last Conv2d/Linear executed.  With ``fold``, the pass runs with every
    BN gamma set to zero (tracing depends on the graph, not on values): each BN channel then
    emits the constant it would emit once removed, and every conv/linear records the mean of
    its inputs per kernel tap, from which the contribution of any set of removed inputs follows
    without another forward pass.  One forward pass serves all (it dominates the cost).
    """
    order: list[nn.Module] = []
    shapes: list[torch.Size] = []
    means: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        order.append(module)
        if fold and isinstance(args[0], torch.Tensor) and getattr(module, "groups", 1) == 1:
            with torch.no_grad():
                means[module] = tap_means(module, args[0].detach())

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
    return Trace(graph, order[-1] if order else None, shapes[-1], means)


__all__ = ["Trace", "trace"]
