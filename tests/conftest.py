"""Shared test helpers: synthetic BN statistics and coupled-channel gammas."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch_pruning as tp
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Realistic, non-trivial BN state: gammas in [0.5, 1], betas and running stats random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def classifier_of(model: nn.Module) -> nn.Module:
    """The last Linear/Conv2d module in definition order (the logits layer of torchvision CNNs)."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


def zero_coupled_channels(model: nn.Module, example: torch.Tensor,
                          choose: Callable[[str, int, list[str]], list[int]]) -> int:
    """Set gamma = 0 for chosen channels of each coupled group, in every BN of the group.

    ``choose(root_name, channels, bn_names)`` returns the root channel indices to zero.
    Returns the number of BN channels zeroed (counting each BN layer of a group).
    """
    from slimcore.tp_compat import ensure_applied

    ensure_applied()  # the split/concat handling slimcore's own graphs get
    dg = tp.DependencyGraph().build_dependency(model, example, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    zeroed = 0
    with torch.no_grad():
        for group in dg.get_all_groups(ignored_layers=[classifier_of(model)],
                                       root_module_types=(nn.Conv2d, nn.Linear)):
            bns = [(it.dep.target.module, it.idxs, it.root_idxs) for it in group
                   if isinstance(it.dep.target.module, nn.BatchNorm2d)]
            if not bns:
                continue
            root = group[0].dep.target.module
            pick = set(choose(names[root], dg.get_out_channels(root), [names[b] for b, _, _ in bns]))
            for bn, idxs, root_idxs in bns:
                for i, r in zip(idxs, root_idxs):
                    if r in pick:
                        bn.weight[i] = 0.0
                        zeroed += 1
    return zeroed


def coupled_bimodal(model: nn.Module, example: torch.Tensor, zero_fraction: float, seed: int = 0) -> nn.Module:
    """Sparse-trained-like gammas: per coupled group, a random ``zero_fraction`` of channels
    have gamma ~ 1e-4 in all their BN layers, the rest are in [0.5, 1]."""
    randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 1)

    def choose(_name: str, channels: int, _bns: list[str]) -> list[int]:
        return torch.randperm(channels, generator=g)[: int(channels * zero_fraction)].tolist()

    zero_coupled_channels(model, example, choose)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                tiny = m.weight == 0
                m.weight[tiny] = torch.rand(int(tiny.sum()), generator=g) * 1e-4
    return model


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)
