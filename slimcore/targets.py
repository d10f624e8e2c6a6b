"""What a prune stage aims at: an entry of ``prune.targets`` (pure Python: no torch).

Four forms, each written in ``params.yaml`` the way DVC prints it in stage and file names:

* ``0.2``: a channel ratio, the share of prunable BN channels to remove (the seed's; a decimal,
  never an integer: DVC would name ``0`` ``pruned-0.pt`` where the stage writes ``pruned-0.0.pt``);
* ``flopsF``: keep the fraction F (0 < F < 1) of the unpruned model's FLOPs (thop's count, as the
  profile stage measures it), e.g. ``flops0.5``;
* ``paramsF``: keep the fraction F of its parameters, e.g. ``params0.3``;
* ``safe``: the largest ratio whose validation top-1 drop stays within ``prune.max_drop``, read
  from ``metrics/sensitivity/ARCH.json`` (written by the ``sensitivity@ARCH`` stage).

F is written as Python prints it (``flops0.5``, not ``flops0.50`` or ``flops.5``): the tag is the
text itself, so one target has one name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["ratio", "flops", "params", "safe"]
KINDS: tuple[Kind, ...] = ("ratio", "flops", "params", "safe")
_FRACTION = re.compile(r"(flops|params)(.+)")
FORMS = "a channel ratio as a decimal (0.2), flopsF or paramsF with 0 < F < 1 (flops0.5), or safe"


@dataclass(frozen=True)
class Target:
    """One parsed entry of ``prune.targets``: ``kind`` and ``value`` (the ratio, or the kept
    fraction F of FLOPs/parameters; None for ``safe``)."""

    kind: Kind
    value: float | None = None

    @property
    def tag(self) -> str:
        """How the target appears in stage and file names, as DVC renders it (``0.2``,
        ``flops0.5``, ``params0.3``, ``safe``)."""
        if self.kind == "safe":
            return "safe"
        text = str(float(self.value))  # type: ignore[arg-type]
        return text if self.kind == "ratio" else f"{self.kind}{text}"

    def __str__(self) -> str:
        return self.tag

    @property
    def yaml_value(self) -> float | str:
        """The entry as params.yaml holds it: a float for a ratio, the tag otherwise."""
        return float(self.value) if self.kind == "ratio" else self.tag  # type: ignore[arg-type]

    def label(self, resolved_ratio: float | None = None) -> str:
        """As the results table and the charts print it: ``20%``, ``FLOPs 50%``, ``params 30%``,
        ``safe (45%)`` (the safe ratio as resolved; ``safe`` when unknown)."""
        if self.kind == "ratio":
            return _pct(self.value)  # type: ignore[arg-type]
        if self.kind == "safe":
            return "safe" if resolved_ratio is None else f"safe ({_pct(resolved_ratio)})"
        return f"{'FLOPs' if self.kind == 'flops' else 'params'} {_pct(self.value)}"  # type: ignore[arg-type]

    def sort_key(self) -> tuple[int, float]:
        """Ratios, then FLOPs and params targets by how much they remove, then safe."""
        order = {"ratio": 0, "flops": 1, "params": 2, "safe": 3}[self.kind]
        if self.value is None:
            return order, 0.0
        return order, self.value if self.kind == "ratio" else 1 - self.value


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


def _ratio(x: float, text: str) -> Target:
    if not math.isfinite(x) or not 0 <= x < 1:
        raise ValueError(f"{text}: a channel ratio is the fraction of prunable BN channels to remove, in [0, 1)")
    return Target("ratio", float(x))


def target_label(target: Target | float | str, prune_report: dict | None = None) -> str:
    """A target as the results table and the charts print it (``20%``, ``FLOPs 50%``,
    ``params 30%``, ``safe (45%)``); a safe target's ratio comes from its prune report
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


__all__ = ["FORMS", "KINDS", "Target", "parse_target", "parse_targets", "target_label"]
