"""Every artifact path of the pipeline, from one place (dvc.yaml spells the same paths).

Ratios appear in names as DVC renders them (``0.2`` -> ``pruned-0.2.pt``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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


def prune_run(ratio: float) -> str:
    return f"prune-{ratio_tag(ratio)}"


def prune_reports() -> Path:
    """Folder of all prune reports (the evaluate stage depends on it as a whole)."""
    return METRICS / "prune"


def prune_report(arch: str, ratio: float) -> Path:
    return prune_reports() / f"{arch}-{ratio_tag(ratio)}.json"


def sensitivity_dir() -> Path:
    """Folder of the sensitivity curves (top-1 on the validation split vs ratio, before fine-tuning)."""
    return METRICS / "sensitivity"


def sensitivity_report(arch: str) -> Path:
    """``metrics/sensitivity/ARCH.json``: the curve and ``safe_ratio``, the largest ratio whose
    validation top-1 drop stays within ``prune.max_drop`` (read by the ``safe`` prune target)."""
    return sensitivity_dir() / f"{arch}.json"


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
    """The declared DVC metrics: one small ``ARCH.json`` per arch (see slimcore.report.summary)."""
    return METRICS / "summary"


def summary(arch: str) -> Path:
    return summaries() / f"{arch}.json"


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


def ratio_outputs(arch: str, ratio: float) -> list[Path]:
    """Everything the prune and finetune stages of one (arch, ratio) write."""
    return [pruned(arch, ratio), pruned(arch, ratio, fold=False), finetuned(arch, ratio),
            prune_report(arch, ratio), timings(arch, prune_run(ratio)),
            curves(arch, finetune_run(ratio)), timings(arch, finetune_run(ratio))]


_TAG = r"(?P<tag>\d+(?:\.\d+)?(?:e-?\d+)?)"


def _per_ratio_patterns(arch: str) -> list[tuple[Path, re.Pattern[str]]]:
    """Where per-ratio outputs of ``arch`` live, and the names they have there."""
    return [
        (MODELS / arch, re.compile(rf"(?:pruned|finetuned)-{_TAG}(?:-nofold)?\.pt")),
        (prune_reports(), re.compile(rf"{re.escape(arch)}-{_TAG}\.json")),
        (METRICS / arch, re.compile(rf"finetune-{_TAG}")),
        (timings_dir() / arch, re.compile(rf"(?:prune|finetune)-{_TAG}\.json")),
    ]


def stale_ratio_outputs(archs: Iterable[str], ratios: Iterable[float]) -> list[Path]:
    """Per-ratio outputs left by ratios that are no longer in ``prune.ratios``.

    DVC never deletes the outputs of a stage that left ``dvc.yaml`` (a matrix entry of an old
    ratio); they would feed the hashes of the stages that read whole folders and linger in
    experiments, so the ``profile`` stage removes them.
    """
    current = {ratio_tag(r) for r in ratios}
    stale = []
    for arch in archs:
        for folder, pattern in _per_ratio_patterns(arch):
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                match = pattern.fullmatch(path.name)
                if match and match["tag"] not in current:
                    stale.append(path)
    return stale
