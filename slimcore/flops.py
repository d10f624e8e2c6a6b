"""FLOPs and parameter counts of a model: what slimming's FLOPs and params targets measure.

FLOPs convention: thop's count, i.e. multiply-accumulates (MACs) of convolutions and linear
layers plus thop's per-element counts for BatchNorm, pooling and activations (see README).
Latency timing is the pipeline's (``slimcore_pipeline.latency``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of learnable parameters (BN running statistics excluded).

    Example:
        >>> slimcore.count_params(pruned) / slimcore.count_params(model)   # the parameters kept
    """
    return sum(p.numel() for p in model.parameters())


def input_shape(input_size: int | tuple[int, ...]) -> tuple[int, ...]:
    """``input_size`` (a square image side, ``(C, H, W)`` or ``(N, C, H, W)``) as an NCHW shape, batch 1 by default."""
    if isinstance(input_size, int):
        return (1, 3, input_size, input_size)
    if len(input_size) == 3:
        return (1, *input_size)
    return tuple(input_size)


def count_flops(model: nn.Module, input_size: int | tuple[int, ...]) -> float:
    """thop's MAC count for one forward pass (batch 1 unless ``input_size`` says otherwise).

    ``input_size``: a square image side, ``(C, H, W)`` or ``(N, C, H, W)``.  The model is not
    modified (thop's counters are attached to a copy).

    Example:
        >>> slimcore.count_flops(model, 32)              # MACs of one 3x32x32 image
        >>> slimcore.count_flops(model, (1, 3, 224, 224))
    """
    import thop

    probe = copy.deepcopy(model).eval().cpu()
    logging.getLogger("thop").setLevel(logging.ERROR)
    with torch.no_grad(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        macs, _ = thop.profile(probe, inputs=(torch.zeros(input_shape(input_size)),), verbose=False)
    return float(macs)


__all__ = ["count_flops", "count_params", "input_shape"]
