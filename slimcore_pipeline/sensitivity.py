"""Pruning sensitivity: validation top-1 of a sparse-trained model slimmed at each ratio of a grid.

:func:`sensitivity` slims the model once per ratio (``step, 2*step, ..., 1 - step``; with the
configured policy, exactly as the prune stage does), and measures each pruned model *before any
fine-tuning* on the validation split (``data.val_fraction`` of the training images, never the
test split), with its FLOPs and parameters counted as the profile stage counts them
(:func:`slimcore.flops.count_flops`, :func:`slimcore.flops.count_params`).  No training
happens: the cost is one slim, one FLOPs count and one pass over the validation split per ratio.

:func:`safe_ratio` turns the curve into one number, the largest grid ratio such that it and every
smaller one lose at most ``prune.max_drop`` points of validation top-1 against the unpruned
model; the pipeline measures each prune target's sparse model (``models/ARCH/sparse-T.pt``) into
``metrics/sensitivity/ARCH-T.json``, and the ``safe`` target reads its ratio from
``metrics/sensitivity/ARCH-safe.json`` (:func:`slimcore_pipeline.paths.sensitivity_report`).

A ratio that slimming cannot deliver is kept in the curve, never dropped: a :class:`SlimError`
gives a point with ``error`` set and no accuracy (it fails the budget), and a ratio bounded by the
per-group floors or by skipped groups keeps its measured ``true_ratio`` / ``ratio_all_bn`` and
``bound_by``.  The JSON (:meth:`SensitivityResult.to_json`) holds rounded numbers under sorted
keys and no wall-clock figure: the same model, data and params give the same bytes.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from slimcore.flops import count_flops, count_params
from slimcore.penalty import gamma_magnitudes
from slimcore.prune import SlimError, slim
from slimcore_pipeline.config import MIN_SENSITIVITY_STEP
from slimcore_pipeline.runtime import Context, evaluate

# Digits kept in the JSON: ratios and FLOPs (MFLOPs) to 6 decimals, accuracies (%) to 4.
RATIO_DIGITS, ACCURACY_DIGITS, MFLOPS_DIGITS = 6, 4, 6


def ratio_grid(step: float) -> list[float]:
    """``step, 2*step, ...`` up to ``1 - step`` (0.05: 0.05, 0.10, ..., 0.95), rounded to 6 decimals,
    each ratio once (and never 0).  ``step`` is at least ``MIN_SENSITIVITY_STEP`` (0.01: 99 ratios,
    each one slim and one validation pass)."""
    if not MIN_SENSITIVITY_STEP <= step <= 0.5:
        raise ValueError(f"sensitivity step must be in [{MIN_SENSITIVITY_STEP}, 0.5], got {step}")
    count = math.floor((1 - step) / step + 1e-9)
    return sorted({r for r in (round(k * step, RATIO_DIGITS) for k in range(1, count + 1)) if 0 < r < 1})


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


@dataclass(frozen=True)
class SensitivityPoint:
    """One grid ratio: what slimming removed and the pruned model's validation accuracy.

    Attributes:
        ratio: the requested ratio (share of prunable BN channels).
        top1, top5: validation accuracy (%) of the pruned model before fine-tuning; ``None``
            when slimming failed (``error``).
        true_ratio: removed / prunable BN channels, as measured (below ``ratio`` when the floors
            or rounding bound it); ``None`` when slimming failed.
        ratio_all_bn: removed / all BN channels (lower when groups were held fixed).
        exact: slimming met the request over all BN channels (see :class:`slimcore.prune.SlimReport`).
        bound_by: what stopped slimming short of the request (floors, skipped groups), if anything.
        threshold: the |gamma| threshold at this ratio.
        mflops, params: cost of the pruned model (thop's MACs / 10^6 at ``image_size``, parameters).
        error: the :class:`slimcore.prune.SlimError` message when this ratio cannot be slimmed.
    """

    ratio: float
    top1: float | None
    top5: float | None = None
    true_ratio: float | None = None
    ratio_all_bn: float | None = None
    exact: bool = False
    bound_by: tuple[str, ...] = ()
    threshold: float | None = None
    mflops: float | None = None
    params: int | None = None
    error: str | None = None

    def drop(self, reference_top1: float) -> float | None:
        """Points of validation top-1 lost against the unpruned model (``None``: not measured)."""
        return None if self.top1 is None else _round(reference_top1 - self.top1, ACCURACY_DIGITS)

    def to_dict(self, reference_top1: float, max_drop: float) -> dict[str, Any]:
        out = asdict(self)
        out["bound_by"] = list(self.bound_by)
        drop = self.drop(reference_top1)
        out["drop"] = drop
        out["within_budget"] = within_budget(self, reference_top1, max_drop)
        return out


@dataclass
class SensitivityResult:
    """The sensitivity curve of one model: what ``metrics/sensitivity/ARCH-T.json`` holds.

    ``reference_top1`` / ``reference_top5`` / ``reference_mflops`` / ``reference_params``: the
    unpruned (sparse-trained) model on the same validation split; ``safe_ratio``: see
    :func:`safe_ratio`; ``val_images``: size of the validation split; ``gammas_below_warn``: the
    share of the unpruned model's BN channels whose |gamma| is at most ``warn_gamma``
    (``prune.warn_gamma``), i.e. how sparse sparse-train made it (~0: it reached no sparsity).
    """

    arch: str
    max_drop: float
    step: float
    reference_top1: float
    reference_top5: float
    reference_mflops: float
    reference_params: int
    val_images: int
    image_size: int
    policy: dict[str, Any]
    points: list[SensitivityPoint] = field(default_factory=list)
    warn_gamma: float = 1e-2
    gammas_below_warn: float | None = None

    @property
    def safe_ratio(self) -> float:
        return safe_ratio(self.points, self.reference_top1, self.max_drop)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch, "max_drop": self.max_drop, "step": self.step,
            "reference_top1": self.reference_top1, "reference_top5": self.reference_top5,
            "reference_mflops": self.reference_mflops, "reference_params": self.reference_params,
            "val_images": self.val_images, "image_size": self.image_size, "policy": dict(self.policy),
            "safe_ratio": self.safe_ratio, "warn_gamma": self.warn_gamma,
            "gammas_below_warn": self.gammas_below_warn,
            "points": [p.to_dict(self.reference_top1, self.max_drop) for p in self.points],
        }

    def to_json(self) -> bytes:
        """Pretty JSON with sorted keys (same result, same bytes)."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()


_EPS = 1e-9  # accuracies are rounded to 4 decimals: a drop of exactly max_drop is within budget


def within_budget(point: SensitivityPoint, reference_top1: float, max_drop: float) -> bool:
    """The point was measured and loses at most ``max_drop`` points of top-1 (a gain is fine)."""
    drop = point.drop(reference_top1)
    return drop is not None and drop <= max_drop + _EPS


def safe_ratio(points: Sequence[SensitivityPoint], reference_top1: float, max_drop: float) -> float:
    """The largest grid ratio that, with every smaller grid ratio, stays within ``max_drop``.

    Walks the points by increasing ratio and stops at the first one that loses more than
    ``max_drop`` points of top-1 against ``reference_top1`` (the unpruned model) or could not be
    slimmed; returns the last ratio before it, or 0.0 when even the smallest fails.

    Why conservative (a prefix, not the largest passing ratio anywhere): the curve is measured
    on a small validation split before fine-tuning, so it is noisy and need not be monotone; a
    larger ratio that happens to pass after a smaller one failed is most likely luck of that
    split (one image is ``100 / val_images`` points), not a real recovery, and pruning more than
    a ratio that already broke the budget is not a choice a budget should make.
    """
    safe = 0.0
    for point in sorted(points, key=lambda p: p.ratio):
        if not within_budget(point, reference_top1, max_drop):
            break
        safe = point.ratio
    return safe


def share_below(model: nn.Module, warn_gamma: float) -> float | None:
    """The share of ``model``'s BN channels whose |gamma| is at most ``warn_gamma`` (None: no BN)."""
    gammas = gamma_magnitudes(model)
    if gammas.numel() == 0:
        return None
    return _round(float((gammas <= warn_gamma).float().mean()), RATIO_DIGITS)


def _accuracy(model: nn.Module, loader: DataLoader, ctx: Context | None) -> tuple[float, float]:
    """Validation (top-1, top-5) in %, rounded."""
    if ctx is not None:
        model = model.to(ctx.device, memory_format=torch.channels_last if ctx.channels_last
                         else torch.preserve_format)
    result = evaluate(model, loader, ctx)
    return (float(_round(100 * result["top1"], ACCURACY_DIGITS)),  # type: ignore[arg-type]
            float(_round(100 * result["top5"], ACCURACY_DIGITS)))  # type: ignore[arg-type]


def measure_point(model: nn.Module, ratio: float, example_inputs: torch.Tensor, val_loader: DataLoader,
                  image_size: int, policy: Mapping[str, Any], ctx: Context | None = None) -> SensitivityPoint:
    """Slim a copy of ``model`` (on the CPU) at ``ratio`` and measure it; ``model`` is not modified."""
    try:
        pruned, report = slim(model, ratio, example_inputs, **{**policy, "inplace": False})
    except SlimError as err:
        return SensitivityPoint(ratio=ratio, top1=None, error=str(err))
    mflops = _round(count_flops(pruned, image_size) / 1e6, MFLOPS_DIGITS)
    n_params = count_params(pruned)
    top1, top5 = _accuracy(pruned, val_loader, ctx)
    return SensitivityPoint(
        ratio=ratio, top1=top1, top5=top5, true_ratio=_round(report.true_ratio, RATIO_DIGITS),
        ratio_all_bn=_round(report.ratio_all_bn, RATIO_DIGITS), exact=bool(report.exact),
        bound_by=tuple(report.bound_by), threshold=_round(report.threshold, 9), mflops=mflops, params=n_params,
    )


def sensitivity(arch: str, model: nn.Module, val_loader: DataLoader, example_inputs: torch.Tensor, *,
                image_size: int, policy: Mapping[str, Any], max_drop: float, step: float,
                ctx: Context | None = None,
                on_point: Callable[[SensitivityPoint], None] | None = None) -> SensitivityResult:
    """The sensitivity curve of ``model`` (a sparse-trained CPU model, left unmodified).

    Args:
        arch: the name the result carries (``params.archs`` entry).
        model: the unpruned model, on the CPU (each ratio slims a fresh copy of it).
        val_loader: the validation split (evaluation transforms); never the test split.
        example_inputs: a batch the model accepts, for tracing (the prune stage's seeded batch).
        image_size: input side for the FLOPs count (``data.image_size``).
        policy: :func:`slimcore.prune.slim` keyword arguments (``params.prune.policy()``).
        max_drop: points of validation top-1 a safe ratio may lose (``prune.max_drop``).
        step: the grid step (``prune.sensitivity_step``): ratios ``step .. 1 - step``.
        ctx: where to evaluate (a GPU when there is one); ``None``: the model's device, fp32.
        on_point: called after each ratio (progress).
    """
    policy = dict(policy)
    reference = model.cpu().eval()
    top1, top5 = _accuracy(copy.deepcopy(reference), val_loader, ctx)  # moved to ctx's device: a copy
    result = SensitivityResult(
        arch=arch, max_drop=float(max_drop), step=float(step), reference_top1=top1, reference_top5=top5,
        reference_mflops=float(_round(count_flops(reference, image_size) / 1e6, MFLOPS_DIGITS)),  # type: ignore[arg-type]
        reference_params=count_params(reference), val_images=len(val_loader.dataset),  # type: ignore[arg-type]
        image_size=image_size, policy=policy, warn_gamma=float(policy.get("warn_gamma", 1e-2)),
    )
    result.gammas_below_warn = share_below(reference, result.warn_gamma)
    for ratio in ratio_grid(step):
        point = measure_point(reference, ratio, example_inputs, val_loader, image_size, policy, ctx)
        result.points.append(point)
        if on_point is not None:
            on_point(point)
    return result


__all__ = ["SensitivityPoint", "SensitivityResult", "measure_point", "ratio_grid", "safe_ratio",
           "sensitivity", "share_below", "within_budget"]
