"""A finished sparse-train run, kept for the other prune targets when its penalty ignores the target.

Every prune target T has its own ``sparse-train@ARCH-T``. With ``penalty.target: auto`` each one
trains a different model (its penalty is sized for T). With ``penalty.method: l1``, a fixed
numeric ``penalty.target`` or a zero strength, the penalty is the same for every target, so every
target would train the same model from the same inputs. The first run to finish keeps its
checkpoint and dvclive curves under ``.slimcore/reuse/ARCH/KEY/``, where KEY is a fingerprint of
everything the run reads: every params section but ``prune`` and ``profile``, the start checkpoint
and weights file (by content), the project's code, the data folder and torch's version. The next
target with the same KEY copies them instead of training. Training is deterministic, so the copy
is the same bytes training would write; the checkpoint names no target (its meta ``run`` is
``sparse-train``), only its file name does.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slimcore_pipeline.config import Params
    from stages._training import Start

META_RUN = "sparse-train"  # the run every sparse checkpoint records, whatever its target
MODEL, CURVES, SOURCE = "model.pt", "curves", "from.txt"  # what a kept run holds


def target_independent(params: Params, arch: str) -> bool:
    """True when the penalty is the same for every prune target (see the module doc)."""
    pen = params.penalty
    return pen.method == "l1" or pen.target != "auto" or pen.strength[arch] == 0


def reuse_key(params: Params, arch: str, start: Start) -> str:
    """The fingerprint of everything a target-independent sparse-train run of ``arch`` reads."""
    import torch

    from stages._training import inputs_fingerprint

    return inputs_fingerprint(params, arch, start.init, start.weights, META_RUN, str(torch.__version__))


def kept_runs(arch: str) -> Path:
    """``.slimcore/reuse/ARCH``: at most one kept run per arch (the latest)."""
    from slimcore_pipeline import paths

    return paths.STATE / "reuse" / arch


def restore(arch: str, key: str, out: Path, curves: Path, timings: Path) -> str | None:
    """Copy the kept run ``key`` of ``arch`` to ``out`` (checkpoint) and ``curves`` (dvclive), write
    ``timings``, and return the stage that trained it; None when no such run is kept."""
    from slimcore_pipeline.process import atomic_write_bytes
    from stages._common import write_json

    folder = kept_runs(arch) / key
    if not all((folder / name).exists() for name in (MODEL, CURVES, SOURCE)):
        return None
    started = time.perf_counter()
    for parent in (out.parent, curves.parent, timings.parent):
        parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (folder / MODEL).read_bytes())
    shutil.rmtree(curves, ignore_errors=True)
    shutil.copytree(folder / CURVES, curves)
    source = (folder / SOURCE).read_text().strip()
    write_json(timings, {"seconds": round(time.perf_counter() - started, 3), "reused_from": source})
    return source


def keep(arch: str, key: str, out: Path, curves: Path, stage: str) -> None:
    """Keep the run that just wrote ``out`` and ``curves`` as ``key``, replacing any other kept run of
    ``arch`` (built beside it first, so a reader never sees half of one)."""
    base = kept_runs(arch)
    base.mkdir(parents=True, exist_ok=True)
    building = base / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    shutil.copyfile(out, building / MODEL)
    shutil.copytree(curves, building / CURVES)
    (building / SOURCE).write_text(stage + "\n")
    for old in base.iterdir():
        if old != building:
            shutil.rmtree(old, ignore_errors=True)
    building.rename(base / key)


__all__ = ["META_RUN", "keep", "kept_runs", "restore", "reuse_key", "target_independent"]
