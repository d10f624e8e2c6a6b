"""Constant folding: what removed BN channels would have contributed, into the next layer.

A removed channel whose gamma is ~0 outputs a constant (beta through the activation).  The traced
forward pass (:func:`slimcore.prune.trace.trace`) runs with every gamma at zero and records, for
every conv/linear layer, its mean input per kernel tap (:func:`tap_means`); from those, the
contribution of any set of removed inputs follows without another forward pass
(:func:`fold_constants`), and goes into the layer's bias or the running mean of the BN after it.
(Not BatchNorm folding, which merges a BN into the conv before it for export.)
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch_pruning as tp
from torch import nn

from slimcore.prune.selection import Selection


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding the convolution applies, as for ``F.pad``."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]  # "same"
        (th, tw) = totals
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def tap_means(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean input per (channel, kernel tap) over the batch and every output position.

    A linear layer's output averaged over the batch is ``W @ mean(x)``; a convolution's output
    averaged over positions is ``sum(W * tap_means)`` with the padded input sampled the way the
    kernel samples it.  Shape: ``(in_features,)`` or ``(in_channels, kh, kw)``.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).float().mean(0)
    conv: nn.Conv2d = module  # type: ignore[assignment]
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    pads = _conv_padding(conv)
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and not any(pads):
        return x.float().mean(dim=(0, 2, 3)).reshape(-1, 1, 1)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = nn.functional.pad(x.float(), pads, mode=mode) if any(pads) else x.float()
    out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    taps = torch.empty(x.shape[1], kh, kw)
    for i in range(kh):
        rows = xp[:, :, i * dh: i * dh + (out_h - 1) * sh + 1: sh]
        for j in range(kw):
            taps[:, i, j] = rows[:, :, :, j * dw: j * dw + (out_w - 1) * sw + 1: sw].mean(dim=(0, 2, 3))
    return taps


def _bias_sink(dg: tp.DependencyGraph, module: nn.Module) -> tuple[str, nn.Module]:
    """Where a consumer's missing constant goes: its own bias, or the running mean of its BN."""
    if getattr(module, "bias", None) is not None:
        return "bias", module
    outputs = dg.module2node[module].outputs
    if len(outputs) == 1 and isinstance(outputs[0].module, nn.BatchNorm2d):
        bn = outputs[0].module
        # without running statistics (track_running_stats=False) a BN subtracts each batch's mean,
        # which cancels a constant shift of its input exactly: nothing to fold
        return ("bn", bn) if bn.running_mean is not None else ("cancelled", bn)
    return "new_bias", module


@torch.no_grad()
def fold_constants(dg: tp.DependencyGraph, selection: Selection, tap_means: dict[nn.Module, torch.Tensor]) -> None:
    """Fold the output of the channels ``selection`` is about to remove into the layers that consume them.

    A removed channel, its gamma at zero, emits a constant (beta through the activation, and
    through any depthwise conv and BN of its group).  The traced pass recorded every consumer's
    mean input per kernel tap with all gammas at zero; what the removed inputs add to the
    consumer's output (``sum(W[:, removed] * taps[removed])``, exact for a linear or 1x1 layer,
    the mean over positions for a padded KxK conv) goes into the layer's bias, or the running
    mean of the BN right after it, so removing the inputs leaves the layer's output unchanged.
    """
    wanted: dict[nn.Module, list[torch.Tensor]] = defaultdict(list)
    for g, removed_idxs in selection.removals():
        removed = torch.zeros(g.channels, dtype=torch.bool)
        removed[removed_idxs] = True
        for module, idxs, root_idxs in g.consumers:
            wanted[module].append(idxs[removed[root_idxs]])
    for module, parts in wanted.items():
        if module not in tap_means:
            continue  # not reached by the traced pass (cannot happen for a consumer in the graph)
        idxs = torch.unique(torch.cat(parts))
        weight = module.weight.detach().float().index_select(1, idxs)
        taps = tap_means[module].index_select(0, idxs)
        delta = (weight * taps).reshape(weight.shape[0], -1).sum(1)
        kind, sink = _bias_sink(dg, module)
        # new tensors, never in place: a snapshot taken before folding can restore the old ones
        if kind == "bias":
            sink.bias = nn.Parameter(sink.bias.detach() + delta.to(sink.bias.dtype))
        elif kind == "bn":  # BN(x + d) == BN'(x), mean' = mean - d
            sink.running_mean = sink.running_mean - delta.to(sink.running_mean.dtype)
        elif kind == "cancelled":
            continue
        else:
            sink.bias = nn.Parameter(delta.to(module.weight.dtype))


__all__ = ["fold_constants", "tap_means"]
