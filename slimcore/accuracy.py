"""Accuracy evaluation: top-1 / top-5 accuracy and mean loss of a model on a data loader."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str | None = None, *,
             channels_last: bool = False, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) and mean loss over every sample in ``loader``.

    ``device``: where the batches go (default: the model's); ``channels_last``: batches in that
    memory format; ``amp_dtype``: forward passes under ``torch.autocast`` with that dtype (default:
    full precision).  The model is evaluated in eval mode and restored to its previous mode afterwards.

    >>> scores = evaluate(model, test_loader)  # doctest: +SKIP
    >>> scores["top1"], scores["samples"]  # doctest: +SKIP
    (0.9312, 10000)
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext():
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
