"""Top-1 / top-5 accuracy of a model on a split."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from slimcore.runtime import Context


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, ctx: Context | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) and mean loss over every sample in ``loader``.

    The model is evaluated in eval mode and restored to its previous mode afterwards.
    """
    device = ctx.device if ctx else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if ctx is not None and ctx.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if ctx is not None:
                with ctx.autocast():
                    logits = model(x)
            else:
                logits = model(x)
            logits = logits.float()
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(dim=1).sum())
            seen += y.shape[0]
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"top1": correct1 / seen, "top5": correct5 / seen, "loss": loss_sum / seen, "samples": seen}


__all__ = ["evaluate"]
