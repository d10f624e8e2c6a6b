"""Model factories for the ``python`` model source (``tests.helpers.nets:NAME``, importable from the repo root)."""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    """conv-BN-ReLU twice with a residual connection (coupled channels for the pruner)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class SmallNet(nn.Module):
    """A small residual CNN; with ``fixed_size`` its head flattens an exact ``fixed_size``-pixel map."""

    def __init__(self, num_classes: int, depth: int = 2, width: int = 16, fixed_size: int | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(depth)])
        self.expand = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                    nn.BatchNorm2d(2 * width), nn.ReLU())
        if fixed_size is None:
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
            features = 2 * width
        else:  # accepts exactly fixed_size x fixed_size inputs (after stride 2 and a 2x2 pool)
            self.pool = nn.AvgPool2d(2)
            features = 2 * width * (fixed_size // 4) ** 2
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.expand(self.blocks(self.stem(x)))), 1))


def small_cnn(num_classes: int, depth: int = 2, width: int = 16) -> nn.Module:
    return SmallNet(num_classes, depth, width)


def fixed_size_cnn(num_classes: int, size: int = 24) -> nn.Module:
    """Runs on ``size`` x ``size`` inputs only: a replay must trace it at the size it was pruned with."""
    return SmallNet(num_classes, depth=1, width=8, fixed_size=size)


def no_batchnorm(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def not_a_module(num_classes: int) -> object:
    return {"num_classes": num_classes}


NOT_CALLABLE = 3


def bn_variant(num_classes: int, kind: str = "plain", in_channels: int = 3) -> nn.Module:
    """conv-BN-ReLU, 1x1 conv-BN-ReLU, pool, linear; ``kind``: ``plain``, ``affine_free``
    (BatchNorm2d(affine=False)), ``sync`` (SyncBatchNorm), ``batch_stats``
    (track_running_stats=False: normalised with each batch's statistics, even in eval)."""
    def bn(c: int) -> nn.Module:
        if kind == "sync":
            return nn.SyncBatchNorm(c)
        return nn.BatchNorm2d(c, affine=kind != "affine_free", track_running_stats=kind != "batch_stats")

    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), bn(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 1, bias=False), bn(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
