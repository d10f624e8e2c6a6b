"""The policy and report types of slimming: what a user asks for and what slimming did.

:class:`SlimPolicy` (validated options of :func:`slimcore.prune.slim`), :class:`SlimReport` and
its :class:`GroupReport` per channel group, :class:`SlimError`, and :data:`GroupScore` (how the
|gamma| of a group's BN layers combine into one score per channel).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

GroupScore = Literal["max", "mean", "l2"]


class SlimError(RuntimeError):
    """Slimming could not produce a valid model.

    Example:
        >>> try:
        ...     slimcore.slim(model, 0.5, x)
        ... except slimcore.SlimError as err:   # e.g. a model torch-pruning cannot trace
        ...     print(err)
    """


@dataclass(frozen=True)
class SlimPolicy:
    """How channels are chosen and removed.

    Attributes:
        round_to: kept channels per group are a multiple of this (hardware-friendly widths).
        min_channels: never keep fewer channels than this in a group.
        min_keep_fraction: never keep fewer than this fraction of a group's channels.
        fold_constants: fold removed channels' constant output into the next layer.
        group_score: how the |gamma| of a group's BN layers combine into one score per channel.
        inplace: prune ``model`` itself instead of a deep copy.
        on_untraceable: when the model cannot be traced or no channel of it can be pruned:
            ``"error"`` raises :class:`SlimError` naming the cause, ``"warn"`` warns and returns
            the model untouched (its report says why).
        warn_gamma: report how many removed channels score above this (|gamma|, or the group
            score of coupled channels): channels that were not negligible
            (``SlimReport.nonnegligible_removed``).  It changes nothing that is removed.

    Example:
        >>> slimcore.slim(model, 0.5, x, round_to=8, min_keep_fraction=0.1)  # the fields, as keywords
    """

    round_to: int = 1
    min_channels: int = 1
    min_keep_fraction: float = 0.0
    fold_constants: bool = True
    group_score: GroupScore = "max"
    inplace: bool = False
    on_untraceable: Literal["error", "warn"] = "error"
    warn_gamma: float = 1e-2

    def __post_init__(self) -> None:
        if self.round_to < 1 or self.min_channels < 1:
            raise ValueError("round_to and min_channels must be >= 1")
        if not 0 <= self.min_keep_fraction < 1:
            raise ValueError(f"min_keep_fraction must be in [0, 1), got {self.min_keep_fraction}")
        if self.group_score not in ("max", "mean", "l2"):
            raise ValueError(f"group_score must be max, mean or l2, got {self.group_score!r}")
        if self.on_untraceable not in ("error", "warn"):
            raise ValueError(f"on_untraceable must be error or warn, got {self.on_untraceable!r}")
        if not self.warn_gamma >= 0:
            raise ValueError(f"warn_gamma must be >= 0, got {self.warn_gamma}")

    @classmethod
    def from_kwargs(cls, **policy: Any) -> SlimPolicy:
        allowed = {f.name for f in fields(cls)}
        unknown = set(policy) - allowed
        if unknown:
            raise TypeError(f"unknown slim policy option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**policy)


@dataclass
class GroupReport:
    """One group of coupled channels, before and after."""

    root: str
    bn_layers: list[str]
    channels_before: int
    channels_after: int
    bn_channels_before: int
    bn_channels_after: int
    at_floor: bool


@dataclass
class SlimReport:
    """What slimming did: the figures users check against what they asked for.

    ``true_ratio`` is removed / prunable BN channels (what the ranking controls);
    ``ratio_all_bn`` is removed / all BN channels of the model, which is lower whenever groups
    were held fixed.  ``skipped`` lists every group left intact: ``group`` (its root layer),
    ``reason`` and ``channels`` (the BN channels it holds fixed).  ``exact`` is True only when
    the requested ratio was met over *all* BN channels (within one rounding unit of the target
    and nothing held fixed); ``bound_by`` says what stopped it otherwise.

    ``nonnegligible_removed`` counts the removed channels (of the groups' root layers) whose
    score exceeds ``warn_gamma``.  :func:`slim_to` also fills ``target`` (its name, e.g.
    ``flops0.5``), ``requested_ratio`` (the ratio it resolved to), the FLOPs (thop's count, as
    :func:`slimcore.flops.count_flops`) and parameters before and after, and
    ``flops_fraction`` / ``params_fraction`` (after / before); for a FLOPs or parameters target,
    ``exact`` means the kept fraction is within 1% (relative) of the target, and
    ``search_steps`` counts the pruned candidates measured to find the ratio.

    Example:
        >>> _, report = slimcore.slim_to(model, "flops0.5", x)
        >>> report.exact, report.flops_fraction, report.skipped   # met?, kept, what was held fixed
    """

    requested_ratio: float
    true_ratio: float
    threshold: float
    prunable_bn_channels: int
    removed_bn_channels: int
    total_bn_channels: int
    exact: bool
    bound_by: list[str]
    groups: list[GroupReport]
    skipped: list[dict[str, Any]]
    policy: dict[str, Any]
    ratio_all_bn: float = 0.0
    seconds: float = 0.0
    warn_gamma: float = 1e-2
    nonnegligible_removed: int = 0
    target: str = ""
    flops_before: float | None = None
    flops_after: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    flops_fraction: float | None = None
    params_fraction: float | None = None
    search_steps: int = 0

    @property
    def skipped_bn_channels(self) -> int:
        """BN channels held fixed (in skipped groups or in no group at all)."""
        return sum(int(s.get("channels", 0)) for s in self.skipped)

    @property
    def channels_per_layer(self) -> dict[str, list[int]]:
        """``{bn_layer: [channels_before, channels_after]}`` for every prunable BN layer."""
        return {bn: [g.channels_before, g.channels_after] for g in self.groups for bn in g.bn_layers}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["channels_per_layer"] = self.channels_per_layer
        return out


__all__ = ["GroupReport", "GroupScore", "SlimError", "SlimPolicy", "SlimReport"]
