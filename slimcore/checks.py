"""Checks of a model's weights the engine does before using them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimcore.errors import ModelError

if TYPE_CHECKING:
    from torch import nn


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse weights holding NaN or inf: training from them fails at its first step, evaluating is moot."""
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{source}: {name} holds NaN or inf values: these weights are broken (not a "
                             "learning-rate problem); re-create or replace the file")


__all__ = ["check_finite"]
