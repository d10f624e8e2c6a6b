"""What a prune stage aims at: an entry of ``prune.targets`` (pure Python: no torch).

Five forms, each written in ``params.yaml`` the way DVC prints it in stage and file names:

* ``0.2``: a channel ratio, the share of prunable BN channels to remove (the seed's; a decimal,
  never an integer: DVC would name ``0`` ``pruned-0.pt`` where the stage writes ``pruned-0.0.pt``);
* ``flopsF``: keep the fraction F (0 < F < 1) of the unpruned model's FLOPs (thop's count, as the
  profile stage measures it), e.g. ``flops0.5``;
* ``paramsF``: keep the fraction F of its parameters, e.g. ``params0.3``;
* ``speedupS``: a MAC speed-up S > 1, i.e. keep 1/S of the FLOPs (``speedup2`` is ``flops0.5``
  by another name: the same search, the same model), e.g. ``speedup2``, ``speedup1.5``; FLOPs
  here are thop's multiply-accumulate count (MACs), so S is a ratio of MACs, not of measured time;
* ``safe``: the largest ratio whose validation top-1 drop stays within ``prune.max_drop``, read
  from ``metrics/sensitivity/ARCH-safe.json`` (written by the ``sensitivity@ARCH-safe`` stage, on
  the ``safe`` target's own sparse model).

F is written as Python prints it (``flops0.5``, not ``flops0.50`` or ``flops.5``), and S the same
way without a trailing ``.0`` (``speedup2``, not ``speedup2.0``; ``speedup1.5``, not ``speedup1.50``):
the tag is the text itself, so one target has one name; another spelling is refused with a line
naming the canonical one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["ratio", "flops", "params", "speedup", "safe"]
KINDS: tuple[Kind, ...] = ("ratio", "flops", "params", "speedup", "safe")
_FRACTION = re.compile(r"(flops|params|speedup)(.+)")
FORMS = ("a channel ratio as a decimal (0.2), flopsF or paramsF with 0 < F < 1 (flops0.5), "
         "speedupS with S > 1 (speedup2: half the MACs), or safe")
MAX_SPEEDUP = 1000.0  # beyond it a model keeps < 0.1% of its MACs: a typo rather than a target


@dataclass(frozen=True)
class Target:
    """One parsed entry of ``prune.targets``: ``kind`` and ``value`` (the ratio, the kept
    fraction F of FLOPs/parameters, or the MAC speed-up S; None for ``safe``)."""

    kind: Kind
    value: float | None = None

    @property
    def tag(self) -> str:
        """How the target appears in stage and file names, as DVC renders it (``0.2``,
        ``flops0.5``, ``params0.3``, ``speedup2``, ``speedup1.5``, ``safe``)."""
        if self.kind == "safe":
            return "safe"
        text = str(float(self.value))  # type: ignore[arg-type]
        if self.kind == "speedup":
            return f"speedup{text.removesuffix('.0')}"
        return text if self.kind == "ratio" else f"{self.kind}{text}"

    @property
    def flops_fraction(self) -> float | None:
        """The fraction of the unpruned model's FLOPs (MACs) a ``flopsF`` or ``speedupS`` target
        keeps (F, or 1/S); None for the other kinds."""
        if self.kind == "flops":
            return float(self.value)  # type: ignore[arg-type]
        if self.kind == "speedup":
            return 1.0 / float(self.value)  # type: ignore[arg-type]
        return None

    def __str__(self) -> str:
        return self.tag

    @property
    def yaml_value(self) -> float | str:
        """The entry as params.yaml holds it: a float for a ratio, the tag otherwise."""
        return float(self.value) if self.kind == "ratio" else self.tag  # type: ignore[arg-type]

    def label(self, resolved_ratio: float | None = None) -> str:
        """As the results table and the charts print it: ``20%``, ``FLOPs 50%``, ``params 30%``,
        ``speed-up 2x``, ``safe (45%)`` (the safe ratio as resolved; ``safe`` when unknown)."""
        if self.kind == "ratio":
            return _pct(self.value)  # type: ignore[arg-type]
        if self.kind == "speedup":
            return f"speed-up {float(self.value):g}x"  # type: ignore[arg-type]
        if self.kind == "safe":
            return "safe" if resolved_ratio is None else f"safe ({_pct(resolved_ratio)})"
        return f"{'FLOPs' if self.kind == 'flops' else 'params'} {_pct(self.value)}"  # type: ignore[arg-type]

    def sort_key(self) -> tuple[int, float]:
        """Ratios, then FLOPs (and speed-up) and params targets by how much they remove, then safe."""
        order = {"ratio": 0, "flops": 1, "speedup": 1, "params": 2, "safe": 3}[self.kind]
        if self.value is None:
            return order, 0.0
        if self.kind == "ratio":
            return order, self.value
        kept = self.flops_fraction if self.flops_fraction is not None else self.value
        return order, 1 - kept


def _pct(x: float) -> str:
    return f"{100 * x:.4g}%"


def parse_target(value: object) -> Target:
    """An entry of ``prune.targets`` (or a stage's ``--target``) -> :class:`Target`.

    Raises ValueError with what is wrong and the allowed forms.
    """
    if isinstance(value, Target):
        return value
    if isinstance(value, bool) or isinstance(value, int):
        raise ValueError(f"{value!r}: write a ratio as a decimal ({float(value)!r}, not {value!r}): DVC names "
                         "the prune outputs by the value as written")
    if isinstance(value, float):
        return _ratio(value, repr(value))
    if not isinstance(value, str):
        raise ValueError(f"{value!r}: expected {FORMS}")
    text = value.strip()
    if text == "safe":
        return Target("safe")
    match = _FRACTION.fullmatch(text)
    if match:
        kind, number = match.groups()
        fraction = _number(number, text)
        if kind == "speedup":
            return _speedup(fraction, text)
        if not 0 < fraction < 1:
            raise ValueError(f"{text!r}: F in {kind}F is the fraction of the unpruned model's "
                             f"{'FLOPs' if kind == 'flops' else 'parameters'} to keep: 0 < F < 1")
        target = Target(kind, fraction)  # type: ignore[arg-type]
    else:
        try:
            ratio = float(text)
        except ValueError:
            raise ValueError(f"{text!r}: unknown target; expected {FORMS}") from None
        if re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"{text!r}: write a ratio as a decimal ({float(text)!r}, not {text}): DVC names "
                             "the prune outputs by the value as written")
        target = _ratio(ratio, text)
    if target.tag != text:
        raise ValueError(f"{text!r}: write it {target.tag!r}: the target is its name in stage and file names")
    return target


def _number(text: str, whole: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise ValueError(f"{whole!r}: unknown target; expected {FORMS}") from None
    if not math.isfinite(x):
        raise ValueError(f"{whole!r}: not a finite number")
    return x


def _speedup(s: float, text: str) -> Target:
    if not 1 < s <= MAX_SPEEDUP:
        hint = (f" (to keep {s:.4g} of the MACs write flops{s!r})" if 0 < s < 1 else "")
        raise ValueError(f"{text!r}: S in speedupS is the MAC speed-up (unpruned MACs / pruned MACs): "
                         f"1 < S <= {MAX_SPEEDUP:g}{hint}")
    target = Target("speedup", float(s))
    if target.tag != text:
        raise ValueError(f"{text!r}: write it {target.tag!r}: the target is its name in stage and file names")
    return target


def _ratio(x: float, text: str) -> Target:
    if x == 0 and math.copysign(1.0, x) < 0:  # -0.0 would name its outputs pruned--0.0.pt
        raise ValueError(f"{text}: negative zero; write it 0.0")
    if not math.isfinite(x) or not 0 <= x < 1:
        raise ValueError(f"{text}: a channel ratio is the fraction of prunable BN channels to remove, in [0, 1)")
    return Target("ratio", float(x))


def target_label(target: Target | float | str, prune_report: dict | None = None) -> str:
    """A target as the results table and the charts print it (``20%``, ``FLOPs 50%``,
    ``params 30%``, ``speed-up 2x``, ``safe (45%)``); a safe target's ratio comes from its prune report
    (``requested_ratio``)."""
    resolved = prune_report.get("requested_ratio") if prune_report else None
    return parse_target(target).label(resolved)


def parse_targets(values: list[object]) -> list[Target]:
    """Every entry parsed; duplicates (by name) refused."""
    targets, problems = [], []
    for i, v in enumerate(values):
        try:
            targets.append(parse_target(v))
        except ValueError as err:
            problems.append(f"entry {i}: {err}")
    if problems:
        raise ValueError("; ".join(problems))
    tags = [t.tag for t in targets]
    dupes = sorted({t for t in tags if tags.count(t) > 1})
    if dupes:
        raise ValueError(f"targets must be unique, got {', '.join(dupes)} more than once")
    return targets


__all__ = ["FORMS", "KINDS", "MAX_SPEEDUP", "Target", "parse_target", "parse_targets", "target_label"]
