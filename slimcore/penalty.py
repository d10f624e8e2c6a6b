"""The network-slimming penalty on every BatchNorm scale factor (gamma), three ways.

- ``l1``: the paper's subgradient ``strength * sign(gamma)``, added to the gradients after
  ``backward`` and before ``optimizer.step`` (under a GradScaler: after ``scaler.unscale_``).
  It passes through momentum, so gammas oscillate around zero instead of reaching it.
- ``prox``: the proximal step of the same L1 term, decoupled from momentum: after each
  optimizer step every gamma is soft-thresholded, ``gamma <- sign(gamma) * max(|gamma| - lr *
  strength, 0)``.  Unneeded channels reach exactly zero and stay there.
- ``group``: the proximal step of a group lasso over the channels :func:`slimcore.prune.slim`
  removes together (:func:`slimcore.prune.coupled_units`): a residual stream channel's gammas in
  every BN layer that feeds it shrink as one vector, ``v <- v * max(0, 1 - lr * strength *
  sqrt(k) / ||v||)`` (``k``: its BN layers), so the whole channel reaches zero together, which is
  what ``slim``'s group score needs; a channel of one BN layer gets plain ``prox``.

A gamma at exactly zero makes its BN channel emit the constant beta, which ``slim`` folds into
the next layer: removing such channels changes no output.  ``ramp_steps`` grows the strength
linearly from zero, so the network learns features before the penalty starts removing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

PenaltyMethod = Literal["l1", "prox", "group"]
PENALTY_METHODS: tuple[str, ...] = ("l1", "prox", "group")


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """All affine BatchNorm2d layers, by qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine]


def gamma_magnitudes(model: nn.Module) -> torch.Tensor:
    """|gamma| of every BN channel in the model, concatenated (for histograms and thresholds)."""
    layers = batchnorm_layers(model)
    if not layers:
        return torch.empty(0)
    return torch.cat([m.weight.detach().abs().flatten().cpu() for _, m in layers])


class GammaPenalty:
    """The slimming penalty of one training run; a no-op at strength 0.

    Call :meth:`before_step_` between ``backward`` and ``optimizer.step`` and :meth:`after_step_`
    right after ``optimizer.step`` (each does nothing for the methods it does not serve).

    Example:
        >>> penalty = slimcore.GammaPenalty(model, strength=1e-4, method="prox")
        >>> for x, y in loader:
        ...     loss = criterion(model(x), y)
        ...     optimizer.zero_grad()
        ...     loss.backward()
        ...     penalty.before_step_()
        ...     optimizer.step()
        ...     penalty.after_step_(optimizer.param_groups[0]["lr"])

    Args:
        model: the (unwrapped) model whose BN gammas are penalised.
        strength: the L1 coefficient.
        method: ``l1``, ``prox`` or ``group`` (see the module docstring).
        units: for ``group``: per BN layer, a unit id per channel (:func:`slimcore.prune.coupled_units`);
            channels sharing an id shrink together.  Without it (and for ``prox``) every channel
            is a unit of its own.
        ramp_steps: optimizer steps over which the strength grows linearly from 0.
        target: ``prox``/``group`` only: shrink only the units of lowest RMS |gamma| that hold
            this fraction of all BN channels (re-ranked every step); 0 shrinks every unit.
        close_steps: with a ``target``, the optimizer step by which the targeted units must be
            exactly zero (the run's last step): over the last ``close_window`` steps before it
            (0: all of them) each step pulls a targeted unit by at least ``norm / steps left``,
            a linear fade to zero, so the penalty can stay gentle (``strength``) and pruning at
            the target is still lossless at the end; 0: no such guarantee.
        close_window: see ``close_steps``.
    """

    def __init__(self, model: nn.Module, strength: float, method: PenaltyMethod = "l1",
                 units: list[tuple[nn.BatchNorm2d, torch.Tensor]] | None = None, ramp_steps: int = 0,
                 target: float = 0.0, close_steps: int = 0, close_window: int = 0) -> None:
        if strength < 0:
            raise ValueError(f"sparsity strength must be >= 0, got {strength}")
        if method not in PENALTY_METHODS:
            raise ValueError(f"sparsity method must be one of {', '.join(PENALTY_METHODS)}, got {method!r}")
        if not 0 <= target < 1:
            raise ValueError(f"sparsity target must be in [0, 1), got {target}")
        self.strength = float(strength)
        self.method = method
        self.ramp_steps = max(0, int(ramp_steps))
        self.target = float(target)
        self.close_steps = max(0, int(close_steps))
        self.close_from = max(0, self.close_steps - int(close_window)) if close_window > 0 else 0
        self.steps = 0
        layers = [m for _, m in batchnorm_layers(model)]
        self.gammas = [m.weight for m in layers]
        by_layer = {id(bn): ids for bn, ids in (units or [])} if method == "group" else {}
        if by_layer and any(id(bn) not in by_layer for bn in layers):
            raise ValueError("units must cover every affine BatchNorm2d of the model")
        ids, offset = [], 0
        for bn in layers:  # without units every channel is a unit of its own
            if by_layer:
                ids.append(by_layer[id(bn)].long())
            else:
                ids.append(torch.arange(offset, offset + bn.num_features))
                offset += bn.num_features
        self._ids = torch.cat(ids) if ids else torch.empty(0, dtype=torch.long)  # unit of every BN channel
        n_units = int(self._ids.max()) + 1 if len(self._ids) else 0
        self._size = torch.zeros(n_units).index_add_(0, self._ids, torch.ones(len(self._ids)))  # BN layers per unit
        self._weight = self._size.sqrt()  # the group lasso's weight per unit

    @property
    def active(self) -> bool:
        return self.strength > 0 and bool(self.gammas)

    def current_strength(self) -> float:
        """The strength at this step (ramped up over the first ``ramp_steps`` steps)."""
        if self.ramp_steps and self.steps < self.ramp_steps:
            return self.strength * (self.steps + 1) / self.ramp_steps
        return self.strength

    @torch.no_grad()
    def before_step_(self) -> None:
        """``l1``: ``grad += strength * sign(gamma)`` for every gamma that has a gradient."""
        if not self.active or self.method != "l1":
            return
        pairs = [(g, g.grad) for g in self.gammas if g.grad is not None]
        if pairs:
            params, grads = zip(*pairs)
            torch._foreach_add_(list(grads), torch._foreach_sign(list(params)), alpha=self.current_strength())

    @torch.no_grad()
    def after_step_(self, lr: float) -> None:
        """``prox`` / ``group``: the proximal step for the step size ``lr`` just taken."""
        if self.active and self.method != "l1":
            self._prox(lr * self.current_strength())
        self.steps += 1

    def _prox(self, shrink: float) -> None:
        """``v <- v * max(0, 1 - shrink * sqrt(k) / ||v||)`` per unit of ``k`` BN channels (for
        ``k = 1`` the soft threshold ``sign(g) * max(|g| - shrink, 0)``), in a few vectorised ops."""
        gammas = self.gammas
        device = gammas[0].device
        if self._ids.device != device:
            self._ids, self._size, self._weight = self._ids.to(device), self._size.to(device), self._weight.to(device)
        flat = torch.cat([g.detach().float().flatten() for g in gammas])
        norm = torch.zeros(len(self._size), device=device).index_add_(0, self._ids, flat * flat).sqrt_()
        weight = self._weight
        pull = torch.full_like(norm, shrink)
        if self.target > 0:
            chosen = self._lowest_units(norm / weight)
            pull = pull * chosen
            if self.close_steps and self.steps >= self.close_from:  # a linear fade: zero by the last step
                left = max(1, self.close_steps - self.steps)
                pull = torch.maximum(pull, chosen * norm / (weight * left))
        factor = (1 - pull * weight / norm.clamp_min(1e-30)).clamp_(min=0)
        scaled = (flat * factor[self._ids]).split([g.numel() for g in gammas])
        torch._foreach_copy_(gammas, [t.view_as(g).to(g.dtype) for t, g in zip(scaled, gammas)])

    def _lowest_units(self, rms: torch.Tensor) -> torch.Tensor:
        """1.0 for the units of lowest ``rms`` holding ``target`` of all BN channels, else 0.0."""
        order = torch.sort(rms, stable=True).indices
        within = torch.cumsum(self._size[order], 0) <= self.target * float(self._size.sum())
        chosen = torch.zeros_like(rms)
        chosen[order[within]] = 1.0
        return chosen

    @torch.no_grad()
    def penalty(self) -> float:
        """The L1 term ``strength * sum|gamma|`` (for logging; not part of the backward)."""
        if not self.active:
            return 0.0
        return self.strength * float(sum(g.abs().sum() for g in self.gammas))


@dataclass(frozen=True)
class PenaltySpec:
    """A :class:`GammaPenalty` described in epochs, before a run knows its steps per epoch.

    ``strength``, ``method``, ``units`` and ``target`` are :class:`GammaPenalty`'s; ``ramp_epochs``:
    the strength grows linearly from 0 over these epochs; ``close_epochs``: with a target, the
    targeted units fade linearly to exactly zero over the run's last ``close_epochs`` epochs (0:
    off; at least the run's epochs: over the whole run).
    """

    strength: float
    method: PenaltyMethod = "l1"
    units: list[tuple[nn.BatchNorm2d, torch.Tensor]] | None = None  # for method "group"
    ramp_epochs: float = 0.0
    target: float = 0.0
    close_epochs: float = 0.0

    def build(self, model: nn.Module, steps_per_epoch: int, epochs: int) -> GammaPenalty:
        """The penalty of a run of ``epochs`` epochs of ``steps_per_epoch`` optimizer steps each."""
        return GammaPenalty(model, self.strength, self.method, self.units,
                            ramp_steps=round(self.ramp_epochs * steps_per_epoch), target=self.target,
                            close_steps=epochs * steps_per_epoch if self.close_epochs else 0,
                            close_window=round(self.close_epochs * steps_per_epoch))


__all__ = ["PENALTY_METHODS", "GammaPenalty", "PenaltyMethod", "PenaltySpec", "batchnorm_layers",
           "gamma_magnitudes"]
