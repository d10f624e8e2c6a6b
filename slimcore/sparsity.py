"""The network-slimming penalty: L1 on every BatchNorm scale factor (gamma).

The subgradient ``strength * sign(gamma)`` is added to the gradients after ``backward`` and
before ``optimizer.step`` (under a GradScaler: after ``scaler.unscale_``, so the penalty is not
divided by the loss scale).
"""

from __future__ import annotations

import torch
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """All affine BatchNorm2d layers, by qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and m.affine]


def gamma_magnitudes(model: nn.Module) -> torch.Tensor:
    """|gamma| of every BN channel in the model, concatenated (for histograms and thresholds)."""
    layers = batchnorm_layers(model)
    if not layers:
        return torch.empty(0)
    return torch.cat([m.weight.detach().abs().flatten().cpu() for _, m in layers])


class L1Sparsity:
    """Adds the L1 subgradient on BN gammas to their ``.grad``; a no-op at strength 0."""

    def __init__(self, model: nn.Module, strength: float) -> None:
        if strength < 0:
            raise ValueError(f"sparsity strength must be >= 0, got {strength}")
        self.strength = float(strength)
        self.gammas = [m.weight for _, m in batchnorm_layers(model)]

    @property
    def active(self) -> bool:
        return self.strength > 0 and bool(self.gammas)

    @torch.no_grad()
    def apply_(self) -> None:
        """``grad += strength * sign(gamma)`` for every gamma that has a gradient."""
        if not self.active:
            return
        pairs = [(g, g.grad) for g in self.gammas if g.grad is not None]
        if not pairs:
            return
        params, grads = zip(*pairs)
        torch._foreach_add_(list(grads), torch._foreach_sign(list(params)), alpha=self.strength)

    @torch.no_grad()
    def penalty(self) -> float:
        """The L1 term ``strength * sum|gamma|`` (for logging; not part of the backward)."""
        if not self.active:
            return 0.0
        return self.strength * float(sum(g.abs().sum() for g in self.gammas))


__all__ = ["L1Sparsity", "batchnorm_layers", "gamma_magnitudes"]
