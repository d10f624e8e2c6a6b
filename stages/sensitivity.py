"""Stage ``sensitivity@ARCH-TARGET``: validation top-1 of a target's sparse model slimmed at every
ratio of a grid.

Slims ``models/ARCH/sparse-TARGET.pt`` at ``prune.sensitivity_step, 2 * step, ..., 1 - step`` with
the prune policy, measures each pruned model (before fine-tuning) on the validation split, and
writes the curve and its ``safe_ratio`` (the largest ratio whose validation top-1 drop, and every
smaller ratio's, stays within ``prune.max_drop`` points) to ``metrics/sensitivity/ARCH-TARGET.json``;
see :mod:`slimcore_pipeline.sensitivity`.  Its wall-clock time goes to
metrics/timings/ARCH/sensitivity-TARGET.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from stages._common import PARAMS_OPTION, check_target, console, params_for, run_app, stage, trace_inputs, write_json

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    arch: str = typer.Option(..., help="architecture, one of params.yaml's archs"),
    target: str = typer.Option(..., help="the prune target whose sparse model to measure (0.2, flops0.5, "
                                         "speedup2, safe)"),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Write metrics/sensitivity/ARCH-TARGET.json and the stage's seconds to
    metrics/timings/ARCH/sensitivity-TARGET.json."""
    with stage(f"sensitivity@{arch}-{target}"):
        params = params_for(params_file, arch)
        goal = check_target(params, target)
        name = f"sensitivity@{arch}-{goal.tag}"
        start = time.perf_counter()
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from slimcore.checkpoint import load_model
        from slimcore.errors import DataError
        from slimcore.models import spec_of
        from slimcore_pipeline import paths
        from slimcore_pipeline.data import check_num_classes, load_splits, make_loader
        from slimcore_pipeline.process import atomic_write_bytes
        from slimcore_pipeline.runtime import current_context
        from slimcore_pipeline.sensitivity import SensitivityPoint, ratio_grid, sensitivity

        sparse_path = paths.sparse(arch, goal)
        choice = params.model_for(arch)  # the pipeline's own entry: its python factory may run
        sparse = load_model(sparse_path, expected_arch=choice.arch, trusted=choice)
        splits = load_splits(params.data)
        check_num_classes(splits, spec_of(sparse).num_classes, str(sparse_path))
        if len(splits.val) == 0:
            raise DataError(f"data.val_fraction: the validation split of {splits.name} is empty (each class "
                            "keeps its only training image): add images or raise val_fraction")
        ctx = current_context(params.runtime)
        loader = make_loader(splits.val, 256, train=False, seed=params.seed, runtime=params.runtime,
                             device=ctx.device.type)
        size = params.data.image_size
        example = trace_inputs(params)  # the prune stage's batch
        cfg = params.prune
        grid = ratio_grid(cfg.sensitivity_step)
        console.log(f"{name}: {len(grid)} ratios (prune.sensitivity_step {cfg.sensitivity_step:g}), "
                    f"each one slim and one pass over the {len(splits.val)} validation images")
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[last]}"), TimeRemainingColumn(),
                            console=console, transient=True, disable=not console.is_terminal)
        with progress:
            task = progress.add_task(name, total=len(grid), last="")

            def advance(point: SensitivityPoint) -> None:
                last = (f"{point.ratio:.0%}: top-1 {point.top1:.1f}" if point.top1 is not None
                        else f"{point.ratio:.0%}: cannot slim")
                progress.update(task, advance=1, last=last)

            result = sensitivity(arch, sparse, loader, example, image_size=size, policy=cfg.policy(),
                                 max_drop=cfg.max_drop, step=cfg.sensitivity_step, ctx=ctx, on_point=advance)
        atomic_write_bytes(paths.sensitivity_report(arch, goal), result.to_json())
        write_json(paths.timings(arch, paths.sensitivity_run(goal)), {"seconds": round(time.perf_counter() - start, 3)})
        safe = result.safe_ratio
        at_safe = next((p.top1 for p in result.points if p.ratio == safe), result.reference_top1)
        for point in result.points:
            if point.error:
                console.print(f"[yellow]warning: {name}: ratio {point.ratio:g} cannot be slimmed: "
                              f"{escape(point.error)}[/] (recorded with no accuracy: it fails the budget)")
        console.log(f"{name}: safe ratio {safe:g} (val top-1 {result.reference_top1:.1f} -> "
                    f"{at_safe:.1f}, budget {cfg.max_drop:g} pt)")
        from slimcore_pipeline.reached import no_sparsity

        none, reached = no_sparsity(result.to_dict())
        if none:
            console.print(f"[yellow]warning: {name}: sparse-train reached no sparsity: {reached}; "
                          f"raise penalty.strength.{arch} or train.epochs[/]", soft_wrap=True)


if __name__ == "__main__":
    run_app(app)
