"""Stage ``prune@ARCH-TARGET``: slim the target's sparse-trained model (``models/ARCH/sparse-TARGET.pt``)
to the target (a channel ratio, a kept fraction of FLOPs or parameters, a MAC speed-up, or the
``safe`` ratio; see slimcore/targets.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from stages._common import PARAMS_OPTION, check_target, console, params_for, run_app, stage, trace_inputs, write_json

if TYPE_CHECKING:
    from slimcore_pipeline.paths import TargetLike

app = typer.Typer(add_completion=False, help=__doc__)


def read_safe_ratio(arch: str, target: TargetLike) -> float:
    """``safe_ratio`` of ``metrics/sensitivity/ARCH-TARGET.json`` (the ``sensitivity@ARCH-TARGET``
    stage's, measured on the target's own sparse model)."""
    from slimcore.errors import SlimcoreError
    from slimcore_pipeline import paths

    path = paths.sensitivity_report(arch, target)
    again = f"dvc repro sensitivity@{arch}-{paths.target_tag(target)}"
    if not path.is_file():
        raise SlimcoreError(f"{path} not found: run the sensitivity stage first ({again})")
    try:
        ratio = json.loads(path.read_text())["safe_ratio"]
    except (ValueError, KeyError, TypeError) as err:
        raise SlimcoreError(f"{path}: no safe_ratio ({type(err).__name__}: {err}): run the sensitivity stage "
                            f"again ({again})") from None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise SlimcoreError(f"{path}: safe_ratio must be a ratio in [0, 1), got {ratio!r}")
    return float(ratio)


def safe_ratio_hint(arch: str, target: TargetLike, max_drop: float, measured: float | None) -> str:
    """Where the warning points: the safe ratio ``measured`` (:func:`measured_safe_ratio`), or the
    stage that measures it when there is none."""
    from slimcore_pipeline import paths

    if measured is None:
        return (f"run the sensitivity stage (dvc repro sensitivity@{arch}-{paths.target_tag(target)}) "
                "for the safe ratio")
    return (f"the safe ratio (top-1 drop within prune.max_drop={max_drop:g} pt) is "
            f"{100 * measured:.4g}% ({paths.sensitivity_report(arch, target)})")


def gamma_warning(name: str, report: Any, hint: str, safe_ratio: float | None = None) -> str | None:
    """The one line that says slimming removed channels whose |gamma| was not negligible; None when
    the sensitivity stage measured this ratio within prune.max_drop (``safe_ratio`` at or above it):
    the measurement outranks the |gamma| heuristic (:func:`gamma_note` says so instead)."""
    if not report.nonnegligible_removed or within_safe(report.requested_ratio, safe_ratio):
        return None
    n = report.nonnegligible_removed
    return (f"warning: {name}: removes {n} channel{'s' if n != 1 else ''} whose |gamma| score exceeds "
            f"prune.warn_gamma={report.warn_gamma:g} (threshold {report.threshold:.3g}): they were not "
            f"negligible and accuracy may drop; {hint}")


def within_safe(ratio: float, safe_ratio: float | None) -> bool:
    """The ratio is at or below the measured safe ratio (a tolerance for float spellings)."""
    return safe_ratio is not None and ratio <= safe_ratio + 1e-9


def gamma_note(name: str, report: Any, safe_ratio: float | None, max_drop: float) -> str | None:
    """Why channels above prune.warn_gamma go without a warning: the ratio was measured safe."""
    if not report.nonnegligible_removed or not within_safe(report.requested_ratio, safe_ratio):
        return None
    n = report.nonnegligible_removed
    return (f"{name}: {n} removed channel{'s' if n != 1 else ''} score above prune.warn_gamma="
            f"{report.warn_gamma:g}, but ratio {100 * report.requested_ratio:.4g}% is within the safe ratio "
            f"{100 * safe_ratio:.4g}% (validation top-1 drop <= {max_drop:g} pt before fine-tuning, measured by "
            f"the sensitivity stage): no warning")


def threshold_text(report: Any, group_score: str) -> str:
    """The threshold in the ranking's own units: the score of the last unit removed."""
    if report.removed_bn_channels == 0:
        return "nothing removed"
    if report.threshold <= 0:
        return "every removed channel has |gamma| score 0 (zeroed by sparse training)"
    return (f"last removed unit's score {report.threshold:.3g} (|gamma|, the {group_score} over coupled BN "
            f"layers; every removed channel scores at most this)")


def measured_safe_ratio(arch: str, target: TargetLike) -> float | None:
    """The sensitivity stage's safe ratio, or None when it has not run (or its report is unreadable)."""
    try:
        return read_safe_ratio(arch, target)
    except ValueError:
        return None


def target_warning(name: str, report: Any, target: Any) -> str | None:
    """The line that says a FLOPs/params target was not met, and what bounds it."""
    if target.kind not in ("flops", "params", "speedup") or report.exact:
        return None
    if target.kind == "speedup":
        reached = 1 / report.flops_fraction if report.flops_fraction else float("inf")
        return (f"warning: {name}: reaches a MAC speed-up of {reached:.3g}x (keeps {report.flops_fraction:.2%} "
                f"of the FLOPs) for a target of {target.value:g}x (ratio {report.requested_ratio:.2%}): "
                f"bound by {'; '.join(report.bound_by)}")
    achieved = report.flops_fraction if target.kind == "flops" else report.params_fraction
    what = "FLOPs" if target.kind == "flops" else "parameters"
    return (f"warning: {name}: keeps {achieved:.2%} of the {what} for a target of {target.value:.2%} "
            f"(ratio {report.requested_ratio:.2%}): bound by {'; '.join(report.bound_by)}")


@app.command()
def main(
    arch: str = typer.Option(..., help="architecture, one of params.yaml's archs"),
    target: str = typer.Option(..., help="a prune target: a ratio (0.2), flopsF or paramsF (keep the fraction F "
                                         "of FLOPs or parameters, e.g. flops0.5), speedupS (a MAC speed-up, "
                                         "speedup2: keep 1/S of the FLOPs) or safe"),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Write models/ARCH/pruned-TARGET.pt (+ -nofold ablation), metrics/prune/ARCH-TARGET.json and
    the slimming time to metrics/timings/ARCH/prune-TARGET.json."""
    with stage(f"prune@{arch}-{target}"):
        params = params_for(params_file, arch)
        goal = check_target(params, target)
        name = f"prune@{arch}-{goal.tag}"
        safe = read_safe_ratio(arch, goal) if goal.kind == "safe" else None
        from slimcore_pipeline import paths
        from slimcore_pipeline.resources import check_disk, check_writable, tensor_bytes

        check_writable(paths.pruned(arch, goal).parent, paths.prune_report(arch, goal).parent,
                       paths.timings(arch, paths.prune_run(goal)).parent)
        from slimcore.checkpoint import load_model
        from slimcore.models import spec_of
        from slimcore.prune import slim, slim_to
        from slimcore_pipeline.process import save_model

        choice = params.model_for(arch)  # the pipeline's own entry: its python factory may run
        sparse = load_model(paths.sparse(arch, goal), expected_arch=choice.arch, trusted=choice)
        check_disk(paths.pruned(arch, goal).parent, 2 * tensor_bytes(sparse), "the two pruned checkpoints")
        size = params.data.image_size
        example = trace_inputs(params)
        policy = params.prune.policy()
        pruned, report = slim_to(sparse, goal, example, safe_ratio=safe, input_size=size, **policy)
        ratio = report.requested_ratio
        save_model(paths.pruned(arch, goal), pruned, run="prune", target=goal.tag, ratio=ratio,
                   true_ratio=report.true_ratio, threshold=report.threshold)
        nofold, _ = slim(sparse, ratio, example, **{**policy, "fold_constants": False})
        save_model(paths.pruned(arch, goal, fold=False), nofold, run="prune-nofold", target=goal.tag, ratio=ratio)
        summary = {
            "target": goal.tag,
            "requested_ratio": ratio,
            "true_ratio": report.true_ratio,
            "ratio_all_bn": report.ratio_all_bn,
            "threshold": report.threshold,
            "exact": report.exact,
            "removed_bn_channels": report.removed_bn_channels,
            "prunable_bn_channels": report.prunable_bn_channels,
            "total_bn_channels": report.total_bn_channels,
            "skipped_bn_channels": report.skipped_bn_channels,
            "flops_before": report.flops_before,
            "flops_after": report.flops_after,
            "flops_fraction": report.flops_fraction,
            "params_before": report.params_before,
            "params_after": report.params_after,
            "params_fraction": report.params_fraction,
            "search_steps": report.search_steps,
            "warn_gamma": report.warn_gamma,
            "nonnegligible_removed": report.nonnegligible_removed,
            "bound_by": report.bound_by,
            "skipped": report.skipped,
            "policy": report.policy,
            "spec": spec_of(pruned).to_dict(),
            "channels": report.channels_per_layer,
        }
        if safe is not None:
            summary["safe_ratio_from"] = paths.sensitivity_report(arch, goal).as_posix()
        write_json(paths.prune_report(arch, goal), summary)
        write_json(paths.timings(arch, paths.prune_run(goal)),
                   {"seconds": round(report.seconds, 3), "search_steps": report.search_steps})
        console.log(f"{name}: removed {report.true_ratio:.2%} of {report.prunable_bn_channels} BN channels "
                    f"(ratio {ratio:.4g}; {threshold_text(report, params.prune.group_score)})")
        console.log(f"{name}: kept {report.flops_fraction:.2%} of the FLOPs and {report.params_fraction:.2%} of the "
                    f"params ({report.params_before / 1e6:.3f}M -> {report.params_after / 1e6:.3f}M)")
        lines = [target_warning(name, report, goal)]
        if goal.kind in ("ratio", "safe") and short_of_request(report.ratio_all_bn, ratio):
            lines.append(f"warning: {name}: only {report.ratio_all_bn:.2%} of all {report.total_bn_channels} BN "
                         f"channels removed for a requested {ratio:.0%}: {report.skipped_bn_channels} BN channels "
                         f"are held fixed in skipped groups (see 'skipped' in {paths.prune_report(arch, goal)})")
        measured = safe if safe is not None else measured_safe_ratio(arch, goal)
        hint = safe_ratio_hint(arch, goal, params.prune.max_drop, measured)
        lines.append(gamma_warning(name, report, hint, measured))
        note = gamma_note(name, report, measured, params.prune.max_drop)
        if note:
            console.log(note)
        from rich.markup import escape

        for line in lines:
            if line:
                console.print(f"[yellow]{escape(line)}[/]", soft_wrap=True)


def short_of_request(ratio_all_bn: float, requested: float, tolerance: float = 0.01) -> bool:
    """True when the share of all BN channels removed falls short of the request by > 1 pt."""
    return ratio_all_bn < requested - tolerance


if __name__ == "__main__":
    run_app(app)
