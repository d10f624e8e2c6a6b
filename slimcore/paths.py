"""Every artifact path of the pipeline, from one place (dvc.yaml spells the same paths).

Ratios appear in names as DVC renders them (``0.2`` -> ``pruned-0.2.pt``).
"""

from __future__ import annotations

from pathlib import Path

MODELS = Path("models")
METRICS = Path("metrics")
STATE = Path(".slimcore")  # resumable training state: not a DVC output, not in git


def ratio_tag(ratio: float) -> str:
    """How a ratio appears in file and stage names (``0.2``, ``0.25``, ``0.0``): as DVC prints it."""
    return str(float(ratio))


def checkpoint(arch: str, run: str) -> Path:
    """``models/ARCH/{baseline,sparse}.pt``."""
    return MODELS / arch / f"{run}.pt"


def pruned(arch: str, ratio: float, fold: bool = True) -> Path:
    """``models/ARCH/pruned-R.pt``; the ablation without constant folding: ``pruned-R-nofold.pt``."""
    return MODELS / arch / f"pruned-{ratio_tag(ratio)}{'' if fold else '-nofold'}.pt"


def finetuned(arch: str, ratio: float) -> Path:
    return MODELS / arch / f"finetuned-{ratio_tag(ratio)}.pt"


def curves(arch: str, run: str) -> Path:
    """dvclive folder of a training run: ``metrics/ARCH/RUN`` (RUN: baseline-train, finetune-R...)."""
    return METRICS / arch / run


def finetune_run(ratio: float) -> str:
    return f"finetune-{ratio_tag(ratio)}"


def prune_reports() -> Path:
    """Folder of all prune reports (the evaluate stage depends on it as a whole)."""
    return METRICS / "prune"


def prune_report(arch: str, ratio: float) -> Path:
    return prune_reports() / f"{arch}-{ratio_tag(ratio)}.json"


def profile_report() -> Path:
    return METRICS / "profile.json"


def eval_report() -> Path:
    return METRICS / "eval.json"


def results_table() -> Path:
    return METRICS / "results.md"


def plots_dir() -> Path:
    return METRICS / "plots"


def resume_state(arch: str, run: str) -> Path:
    return STATE / "resume" / arch / f"{run}.pt"


def model_files(arch: str, ratios: list[float]) -> dict[str, Path]:
    """Every checkpoint of one arch, by the label used in metrics (``pruned-0.2`` ...)."""
    files = {"baseline": checkpoint(arch, "baseline"), "sparse": checkpoint(arch, "sparse")}
    for r in ratios:
        tag = ratio_tag(r)
        files[f"pruned-{tag}"] = pruned(arch, r)
        files[f"pruned-{tag}-nofold"] = pruned(arch, r, fold=False)
        files[f"finetuned-{tag}"] = finetuned(arch, r)
    return files
