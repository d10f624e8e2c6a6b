"""The pipeline's stage graph for one arch, as a mermaid flowchart: ``make dag [ARCH=vgg16_bn]``.

``dvc dag`` draws every arch's stages at once (39 lines, 1,954 columns on the default); the
stages of one arch and the two shared ones (``profile``, ``evaluate``) are what to read.
``python -m slimcore_pipeline.dag [ARCH]`` (default: the first of ``archs``) reads ``dvc dag --dot`` and
prints that subgraph as mermaid (GitHub and most markdown viewers draw it).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

EDGE = re.compile(r'"(?P<src>[^"]+)"\s*->\s*"(?P<dst>[^"]+)"')
SHARED = ("profile", "evaluate")
ORDER = ["baseline-train", "sparse-train", "sensitivity", "prune", "finetune", "profile", "evaluate"]
PER_TARGET = ("sparse-train", "sensitivity", "prune", "finetune")  # stages named ARCH-TARGET


def _dvc() -> str:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else "dvc"


def edges_of(dot: str) -> list[tuple[str, str]]:
    return [(m["src"], m["dst"]) for m in EDGE.finditer(dot)]


def _keeps(stage: str, arch: str) -> bool:
    name, _, item = stage.partition("@")
    return stage in SHARED or item == arch or (item.startswith(f"{arch}-") and name in PER_TARGET)


def mermaid(edges: Iterable[tuple[str, str]], arch: str) -> str:
    """The edges between ``arch``'s stages and the shared ones, as ``flowchart LR``."""
    kept = [(a, b) for a, b in edges if _keeps(a, arch) and _keeps(b, arch)]
    names = sorted({n for edge in kept for n in edge}, key=lambda n: (ORDER.index(n.partition("@")[0])
                                                                      if n.partition("@")[0] in ORDER else 99, n))
    ids = {name: f"s{i}" for i, name in enumerate(names)}
    lines = ["flowchart LR", *(f'  {ids[n]}["{n}"]' for n in names)]
    lines += [f"  {ids[a]} --> {ids[b]}" for a, b in kept]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if (args and args[0].startswith("-")) or len(args) > 1:
        print("usage: python -m slimcore_pipeline.dag [ARCH]   (or make dag ARCH=vgg16_bn)", file=sys.stderr)
        return 2
    if args:
        arch = args[0]
    else:
        import yaml

        arch = (yaml.safe_load(Path("params.yaml").read_text()) or {}).get("archs", [""])[0]
    proc = subprocess.run([_dvc(), "dag", "--dot"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"dag: dvc dag --dot failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    edges = edges_of(proc.stdout)
    if not any(_keeps(a, arch) and a not in SHARED for edge in edges for a in edge):
        sys.exit(f"dag: no stage of arch {arch!r} in dvc.yaml (archs in params.yaml)")
    print(mermaid(edges, arch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
