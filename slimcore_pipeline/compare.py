"""Two runs side by side, one row per arch and target slot: ``make compare A=main B=NAME``.

``python -m slimcore_pipeline.compare [A] [B]`` (default ``HEAD`` and the workspace, as ``dvc exp diff``)
reads ``dvc exp diff --json --all A B`` and prints, per arch (``metrics/summary/ARCH.json``) and
per slot ``rN`` of ``prune.targets``, each run's target, fine-tuned test top-1 and MACs kept, and
what changed: the same figures as ``dvc exp show``, in a table as wide as the number of runs
(about 90 columns), not the number of archs and targets.  ``-`` marks a slot a run does not have.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SUMMARY = re.compile(r"(?:.*/)?metrics/summary/(?P<arch>[^/]+)\.json")
SLOT = re.compile(r"r(?P<n>\d+)\.(?P<field>top1|macs_kept)")


def _dvc() -> str:
    """The dvc next to this python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def exp_diff(a: str | None, b: str | None) -> dict[str, Any]:
    """``dvc exp diff --json --all [A [B]]`` as a dict; exits with DVC's message when it fails."""
    cmd = [_dvc(), "exp", "diff", "--json", "--all", *[r for r in (a, b) if r]]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"compare: {' '.join(cmd[1:])} failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    out = proc.stdout.strip()
    return json.loads(out[out.index("{"):]) if "{" in out else {}


def _targets(diff: Mapping[str, Any], side: str) -> list[str]:
    """The target tags of ``prune.targets`` on one side (``old`` or ``new``), as stages name them."""
    import yaml

    from slimcore_pipeline.paths import target_tag

    for values in diff.get("params", {}).values():
        entry = (values or {}).get("prune.targets") or {}
        listed = entry.get(side)
        if isinstance(listed, str):  # DVC writes a list param as its text: "[0.2, 'flops0.5']"
            try:
                listed = yaml.safe_load(listed)
            except yaml.YAMLError:
                listed = None
        if isinstance(listed, list):
            tags = []
            for value in listed:
                try:
                    tags.append(target_tag(value))
                except (TypeError, ValueError):
                    tags.append(str(value))
            return tags
    return []


def rows(diff: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (arch, slot): ``arch``, ``slot``, and per side the target, top-1 and MACs kept."""
    targets = {side: _targets(diff, side) for side in ("old", "new")}
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for path, metrics in diff.get("metrics", {}).items():
        match = SUMMARY.fullmatch(path)
        if not match:
            continue
        for key, entry in metrics.items():
            slot = SLOT.fullmatch(key)
            if not slot:
                continue
            n = int(slot["n"])
            row = found.setdefault((match["arch"], n), {"arch": match["arch"], "slot": f"r{n}"})
            for side in ("old", "new"):
                row[f"{side}.{slot['field']}"] = entry.get(side)
                tags = targets[side]
                row[f"{side}.target"] = tags[n - 1] if n <= len(tags) else None
    return [found[key] for key in sorted(found)]


def _num(value: Any, digits: int = 2) -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.{digits}f}"


def _change(new: Any, old: Any) -> str:
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (new, old))
    return f"{new - old:+.2f}" if ok else "-"


def render(diff: Mapping[str, Any], a: str, b: str) -> str:
    """The side-by-side table as text (what ``make compare`` prints)."""
    table = rows(diff)
    if not table:
        return ("compare: no metrics/summary/ARCH.json in either run (run the pipeline first, "
                "or name two experiments: make compare A=main B=NAME)")
    head = ["arch", "slot", f"{a} target", "top1", "MACs kept", f"{b} target", "top1", "MACs kept", "top1 +/-",
            "MACs +/-"]
    body = [[r["arch"], r["slot"], r.get("old.target") or "-", _num(r.get("old.top1")),
             _num(r.get("old.macs_kept")), r.get("new.target") or "-", _num(r.get("new.top1")),
             _num(r.get("new.macs_kept")), _change(r.get("new.top1"), r.get("old.top1")),
             _change(r.get("new.macs_kept"), r.get("old.macs_kept"))] for r in table]
    return _text_table(head, body)


def _text_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    left = {0, 1, 2, 5}  # names and targets left, numbers right

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), *(line(row) for row in body)])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 2 or any(a.startswith("-") for a in args):
        print("usage: python -m slimcore_pipeline.compare [A] [B]   (default: HEAD and the workspace; "
              "or make compare A=main B=NAME)", file=sys.stderr)
        return 2
    a = args[0] if args else None
    b = args[1] if len(args) > 1 else None
    print(render(exp_diff(a, b), a or "HEAD", b or "workspace"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
