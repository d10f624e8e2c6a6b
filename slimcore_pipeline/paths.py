"""Every artifact path of the pipeline, from one place (dvc.yaml spells the same paths).

Prune targets appear in names as DVC renders them (``0.2`` -> ``pruned-0.2.pt``,
``flops0.5`` -> ``pruned-flops0.5.pt``, ``safe`` -> ``pruned-safe.pt``; see :mod:`slimcore.targets`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from slimcore.targets import Target, parse_target

MODELS = Path("models")
METRICS = Path("metrics")
STATE = Path(".slimcore")  # resumable training state: not a DVC output, not in git


TargetLike = Target | float | str


def target_tag(target: TargetLike) -> str:
    """How a prune target appears in file and stage names, as DVC prints it: ``0.2``, ``0.25``,
    ``0.0`` (a ratio), ``flops0.5``, ``params0.3``, ``safe``."""
    return parse_target(float(target) if isinstance(target, int) and not isinstance(target, bool)
                        else target).tag


def checkpoint(arch: str, run: str) -> Path:
    """``models/ARCH/RUN.pt`` (``baseline``)."""
    return MODELS / arch / f"{run}.pt"


def sparse(arch: str, target: TargetLike) -> Path:
    """``models/ARCH/sparse-T.pt``: the sparse-trained model for the prune target T, its penalty
    sized for T alone (``sparse-train@ARCH-T``)."""
    return MODELS / arch / f"sparse-{target_tag(target)}.pt"


def pruned(arch: str, target: TargetLike, fold: bool = True) -> Path:
    """``models/ARCH/pruned-T.pt``; the ablation without constant folding: ``pruned-T-nofold.pt``."""
    return MODELS / arch / f"pruned-{target_tag(target)}{'' if fold else '-nofold'}.pt"


def finetuned(arch: str, target: TargetLike) -> Path:
    return MODELS / arch / f"finetuned-{target_tag(target)}.pt"


def curves(arch: str, run: str) -> Path:
    """dvclive folder of a training run: ``metrics/ARCH/RUN`` (RUN: baseline-train, finetune-T...)."""
    return METRICS / arch / run


def finetune_run(target: TargetLike) -> str:
    return f"finetune-{target_tag(target)}"


def sparse_run(target: TargetLike) -> str:
    """``sparse-train-T``: the run name of T's sparse training (its curves, timings and resume state)."""
    return f"sparse-train-{target_tag(target)}"


def sensitivity_run(target: TargetLike) -> str:
    return f"sensitivity-{target_tag(target)}"


def stage_name(run: str, arch: str) -> str:
    """The DVC stage that writes ``run`` of ``arch``, as ``dvc repro`` names it: ``finetune-0.2``
    -> ``finetune@vgg16_bn-0.2``, ``sparse-train-0.2`` -> ``sparse-train@vgg16_bn-0.2``,
    ``baseline-train`` -> ``baseline-train@vgg16_bn``."""
    for kind in ("sparse-train", "sensitivity", "finetune", "prune"):
        if run.startswith(f"{kind}-"):
            return f"{kind}@{arch}-{run[len(kind) + 1:]}"
    return f"{run}@{arch}"


def prune_run(target: TargetLike) -> str:
    return f"prune-{target_tag(target)}"


def prune_reports() -> Path:
    """Folder of all prune reports (the evaluate stage depends on it as a whole)."""
    return METRICS / "prune"


def prune_report(arch: str, target: TargetLike) -> Path:
    return prune_reports() / f"{arch}-{target_tag(target)}.json"


def sensitivity_dir() -> Path:
    """Folder of the sensitivity curves (top-1 on the validation split vs ratio, before fine-tuning)."""
    return METRICS / "sensitivity"


def sensitivity_report(arch: str, target: TargetLike) -> Path:
    """``metrics/sensitivity/ARCH-T.json``: the curve of T's sparse model and its ``safe_ratio``, the
    largest ratio whose validation top-1 drop stays within ``prune.max_drop`` (read by the ``safe``
    prune target, and by every target's warning)."""
    return sensitivity_dir() / f"{arch}-{target_tag(target)}.json"


def profile_report() -> Path:
    """FLOPs, parameters and bytes of every checkpoint (deterministic: no wall-clock figures)."""
    return METRICS / "profile.json"


def timings_dir() -> Path:
    """Every wall-clock figure lives under here, and nowhere else (never in a checkpoint or a
    declared DVC metric), so that everything else is byte-identical from run to run."""
    return METRICS / "timings"


def timings(arch: str, run: str) -> Path:
    """``metrics/timings/ARCH/RUN.json``: seconds (and images/s) of one stage run."""
    return timings_dir() / arch / f"{run}.json"


def latency_report() -> Path:
    return timings_dir() / "latency.json"


def latency_table() -> Path:
    return timings_dir() / "latency.md"


def summaries() -> Path:
    """The declared DVC metrics: one small ``ARCH.json`` per arch (see slimcore_pipeline.results_table.summary)."""
    return METRICS / "summary"


def summary(arch: str) -> Path:
    return summaries() / f"{arch}.json"


def details_dir() -> Path:
    """Per arch, every figure of the summary and more, keyed the same way (slimcore_pipeline.results_table.details):
    a plain output, so that ``dvc metrics show`` stays narrow."""
    return METRICS / "details"


def details(arch: str) -> Path:
    return details_dir() / f"{arch}.json"


def eval_report() -> Path:
    return METRICS / "eval.json"


def results_table() -> Path:
    return METRICS / "results.md"


def plots_dir() -> Path:
    return METRICS / "plots"


def resume_state(arch: str, run: str) -> Path:
    return STATE / "resume" / arch / f"{run}.pt"


def model_files(arch: str, targets: Iterable[TargetLike]) -> dict[str, Path]:
    """Every checkpoint of one arch, by the label used in metrics (``pruned-0.2``, ``finetuned-flops0.5`` ...)."""
    files = {"baseline": checkpoint(arch, "baseline")}
    for t in targets:
        tag = target_tag(t)
        files[f"sparse-{tag}"] = sparse(arch, t)
        files[f"pruned-{tag}"] = pruned(arch, t)
        files[f"pruned-{tag}-nofold"] = pruned(arch, t, fold=False)
        files[f"finetuned-{tag}"] = finetuned(arch, t)
    return files


def target_outputs(arch: str, target: TargetLike) -> list[Path]:
    """Everything the sparse-train, sensitivity, prune and finetune stages of one (arch, target) write."""
    return [sparse(arch, target), curves(arch, sparse_run(target)), timings(arch, sparse_run(target)),
            sensitivity_report(arch, target), timings(arch, sensitivity_run(target)),
            pruned(arch, target), pruned(arch, target, fold=False), finetuned(arch, target),
            prune_report(arch, target), timings(arch, prune_run(target)),
            curves(arch, finetune_run(target)), timings(arch, finetune_run(target))]


_NUMBER = r"\d+(?:\.\d+)?(?:e-?\d+)?"
_TAG = rf"(?P<tag>(?:flops|params|speedup)?{_NUMBER}|safe)"


def _per_target_patterns(arch: str) -> list[tuple[Path, re.Pattern[str]]]:
    """Where per-target outputs of ``arch`` live, and the names they have there."""
    return [
        (MODELS / arch, re.compile(rf"(?:sparse|pruned|finetuned)-{_TAG}(?:-nofold)?\.pt")),
        (prune_reports(), re.compile(rf"{re.escape(arch)}-{_TAG}\.json")),
        (sensitivity_dir(), re.compile(rf"{re.escape(arch)}-{_TAG}\.json")),
        (METRICS / arch, re.compile(rf"(?:sparse-train|finetune)-{_TAG}")),
        (timings_dir() / arch, re.compile(rf"(?:sparse-train|sensitivity|prune|finetune)-{_TAG}\.json")),
    ]


def per_arch_sparse_outputs(arch: str) -> list[Path]:
    """What the pipeline wrote when it trained one sparse model per arch (``sparse-train@ARCH``,
    ``sensitivity@ARCH``), before every target got its own: left in a workspace, the old checkpoint
    would still feed the hash of the stages that read ``models/``."""
    return [MODELS / arch / "sparse.pt", METRICS / arch / "sparse-train", timings(arch, "sparse-train"),
            sensitivity_dir() / f"{arch}.json", timings(arch, "sensitivity")]


def stale_target_outputs(archs: Iterable[str], targets: Iterable[TargetLike]) -> list[Path]:
    """Per-target outputs left by targets that are no longer in ``prune.targets``.

    DVC never deletes the outputs of a stage that left ``dvc.yaml`` (a matrix entry of an old
    target); they would feed the hashes of the stages that read whole folders and linger in
    experiments, so the ``profile`` stage removes them, and what the per-arch sparse stages of
    earlier versions left (:func:`per_arch_sparse_outputs`).
    """
    current = {target_tag(t) for t in targets}
    stale = []
    for arch in archs:
        stale += [path for path in per_arch_sparse_outputs(arch) if path.exists()]
        for folder, pattern in _per_target_patterns(arch):
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                match = pattern.fullmatch(path.name)
                if match and match["tag"] not in current:
                    stale.append(path)
    return stale
