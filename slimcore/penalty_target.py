"""How many BN channels sparse training should drive to zero: derived from the prune targets.

The targeted penalty (:class:`slimcore.penalty.GammaPenalty` with ``target``) shrinks only the
units of lowest |gamma| holding a share of all BN channels.  Too small a share and the
largest prune target removes channels that still carry signal; too large and every pruned
model carries channels that are zero but not removed, and the sparse model loses accuracy it
never gets back.  :func:`share_for_targets` resolves each requested target on the model
sparse training starts from (a ratio is itself; ``flopsF``, ``paramsF`` and ``speedupS`` are
resolved by :func:`slimcore.prune.slim_to`'s search on that model's |gamma| ranking) and
returns the largest share plus a small ``margin``: the ranking moves while the penalty works.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slimcore.targets import Target, parse_targets

# Added to the largest resolved share: the units the penalty zeroes are re-ranked every step,
# so the set that reaches zero is not exactly the set the starting model's ranking predicts.
DEFAULT_MARGIN = 0.03
# The share used when no requested target can be resolved before sparse training (only
# ``safe``, which the sensitivity stage measures on the sparse model).
SAFE_ONLY_SHARE = 0.5
MAX_SHARE = 0.95


def share_for_targets(model: nn.Module, targets: Iterable[Target | float | str], example_inputs: torch.Tensor,
                      *, input_size: int | tuple[int, ...] | None = None, margin: float = DEFAULT_MARGIN,
                      **policy: Any) -> float:
    """The share of all BN channels the penalty should zero for ``targets`` (see the module doc).

    Args:
        model: the model sparse training starts from (left unchanged).
        targets: ``prune.targets`` entries (:class:`slimcore.targets.Target` or their spellings).
        example_inputs, input_size, **policy: as :func:`slimcore.prune.slim_to`.
        margin: added to the largest share (capped at 0.95).

    Example:
        >>> share = share_for_targets(model, ["speedup2", "speedup4"], torch.randn(2, 3, 32, 32))
    """
    from slimcore.prune import slim_to  # torch-pruning: only when a FLOPs or params search is needed

    parsed = parse_targets(list(targets))
    shares = [float(t.value) for t in parsed if t.kind == "ratio"]  # type: ignore[arg-type]
    # of the FLOPs-like targets (flopsF, speedupS) and the params targets, only the one keeping the
    # least needs the search: it removes the most
    flops = [t for t in parsed if t.flops_fraction is not None]
    params = [t for t in parsed if t.kind == "params"]
    for group in (flops, params):
        if group:
            least = min(group, key=lambda t: t.flops_fraction if t.flops_fraction is not None else t.value)
            _, report = slim_to(model, least, example_inputs, input_size=input_size, **policy)
            shares.append(float(report.ratio_all_bn))
    if not shares:
        return SAFE_ONLY_SHARE
    return min(MAX_SHARE, max(shares) + margin)


__all__ = ["DEFAULT_MARGIN", "MAX_SHARE", "SAFE_ONLY_SHARE", "share_for_targets"]
