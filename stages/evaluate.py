"""Stage ``evaluate``: top-1/top-5 of every model, the results table and the plot data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from stages._common import PARAMS_OPTION, console, params_for, run_app, stage, write_json

if TYPE_CHECKING:
    from rich.table import Table

    from slimcore.targets import Target

app = typer.Typer(add_completion=False, help=__doc__)

CONSOLE_MODELS = ("sparse", "pruned", "finetuned")  # per target, in the printed table: model labels' prefixes


def write_summaries(params: Any, evals: dict[str, Any], profile: dict[str, Any],
                    prunes: dict[str, Any], sensitivity: dict[str, Any] | None = None) -> None:
    """One ``metrics/summary/ARCH.json`` (the declared metrics) and one ``metrics/details/ARCH.json``
    per arch, and no other file in either folder (``sensitivity[arch][tag]``: each target's safe
    ratio, in the details)."""
    from slimcore_pipeline import paths, results_table

    for folder in (paths.summaries(), paths.details_dir()):
        for stale in folder.glob("*.json") if folder.is_dir() else []:
            if stale.stem not in params.archs:
                stale.unlink()
    for arch in params.archs:
        args = (arch, params, evals[arch], profile[arch], prunes[arch])
        write_json(paths.summary(arch), results_table.summary(*args))
        write_json(paths.details(arch), results_table.details(*args, (sensitivity or {}).get(arch)))


def read_sensitivity(archs: Sequence[str], targets: Sequence[Target]) -> dict[str, dict[str, Any]]:
    """Every ``metrics/sensitivity/ARCH-T.json`` (the curve of T's own sparse model): ``{arch: {tag: report}}``."""
    from slimcore_pipeline import paths

    return {arch: {t.tag: json.loads(paths.sensitivity_report(arch, t).read_text()) for t in targets}
            for arch in archs}


def console_table(params: Any, evals: dict[str, Any], sensitivity: dict[str, dict[str, Any]]) -> Table:
    """The table the stage prints: per arch the baseline's test top-1 and, per target, its sparse
    model's, the pruned one's and the fine-tuned one's, with the safe ratio of that sparse model."""
    from rich.table import Table

    targets = params.prune.parsed_targets()
    table = Table(title="slimcore results (test top-1 %)",
                  caption=f"safe: the safe ratio of the target's sparse model (validation, drop <= "
                          f"{params.prune.max_drop:g} pt)")
    for col in ("arch", "baseline", *[f"{t.tag}: sparse / pruned / FT" for t in targets]):
        table.add_column(col, justify="right")
    for arch, ev in evals.items():
        cells = []
        for t in targets:
            top1 = " / ".join(f"{100 * ev[f'{kind}-{t.tag}']['top1']:.2f}" for kind in CONSOLE_MODELS)
            safe = sensitivity.get(arch, {}).get(t.tag, {}).get("safe_ratio")
            cells.append(top1 + ("" if safe is None else f"\nsafe {float(safe):g}"))
        table.add_row(arch, f"{100 * ev['baseline']['top1']:.2f}", *cells)
    return table


@app.command()
def main(params_file: Path = PARAMS_OPTION) -> None:
    """Write metrics/eval.json, metrics/{summary,details}/ARCH.json, metrics/results.md and metrics/plots/*.csv
    (with the sensitivity curves of metrics/sensitivity/ARCH-T.json, one per target's sparse model)."""
    with stage("evaluate"):
        params = params_for(params_file)
        from slimcore_pipeline import paths
        from slimcore_pipeline.resources import check_writable

        check_writable(paths.eval_report().parent, paths.summaries(), paths.details_dir(), paths.plots_dir(),
                       paths.results_table().parent)
        import torch

        from slimcore.checkpoint import load_model_and_meta
        from slimcore.models import spec_of
        from slimcore.penalty import gamma_magnitudes
        from slimcore_pipeline import cpumath, paths, results_table
        from slimcore_pipeline.data import check_num_classes, load_splits, make_loader
        from slimcore_pipeline.plotdata import write_plot_data
        from slimcore_pipeline.process import atomic_write_bytes
        from slimcore_pipeline.runtime import current_context, evaluate

        ctx = current_context(params.runtime)  # a GPU when there is one: 224px test sets are slow on CPU
        splits = load_splits(params.data)
        loader = make_loader(splits.test, 256, train=False, seed=params.seed, runtime=params.runtime,
                             device=ctx.device.type)
        profile = json.loads(paths.profile_report().read_text())
        targets = params.prune.parsed_targets()
        sensitivity = read_sensitivity(params.archs, targets)  # arch -> target tag -> sensitivity report
        evals: dict[str, dict[str, dict[str, float | int]]] = {}
        prunes: dict[str, dict[str, dict[str, object]]] = {}  # arch -> target tag -> prune report
        histories: dict[str, dict[str, list[dict[str, float]]]] = {}
        gammas: dict[str, dict[str, torch.Tensor]] = {}
        for arch in params.archs:
            evals[arch], gammas[arch], histories[arch] = {}, {}, {}
            for label, path in paths.model_files(arch, targets).items():
                choice = params.model_for(arch)  # the pipeline's own entry: its python factory may run
                model, meta = load_model_and_meta(path, expected_arch=choice.arch, trusted=choice)
                check_num_classes(splits, spec_of(model).num_classes, str(path))
                model = model.to(ctx.device, memory_format=torch.channels_last if ctx.channels_last
                                 else torch.preserve_format)
                result = evaluate(model, loader, ctx)  # the test-set size: results.md's 95% intervals
                evals[arch][label] = {**{k: v for k, v in result.items() if k != "samples"},
                                      "test_images": int(result["samples"])}
                if label == "baseline" or label.startswith("sparse-"):  # baseline, sparse-T: |gamma| histograms
                    gammas[arch][label] = gamma_magnitudes(model).cpu()
                if meta.get("history"):  # trained checkpoints: baseline-train, sparse-train-T, finetune-T
                    # every sparse checkpoint records the run sparse-train: its file names the target
                    run = paths.sparse_run(label.removeprefix("sparse-")) if label.startswith("sparse-") \
                        else meta["run"]
                    histories[arch][run] = meta["history"]
            prunes[arch] = {t.tag: json.loads(paths.prune_report(arch, t).read_text()) for t in targets}
        write_json(paths.eval_report(), evals)
        write_summaries(params, evals, profile, prunes, sensitivity)
        write_plot_data(paths.plots_dir(), archs=params.archs, targets=targets, evals=evals,
                        profile=profile, prunes=prunes, histories=histories, gammas=gammas, sensitivity=sensitivity)
        markdown = results_table.results_markdown(params, evals, profile, prunes, sensitivity)
        markdown += "\n" + cpumath.provenance(params.runtime, ctx.device.type)  # the one machine-specific line
        atomic_write_bytes(paths.results_table(), markdown.encode())
        console.print(console_table(params, evals, sensitivity))
        console.log(f"evaluate: wrote {paths.results_table()}")


if __name__ == "__main__":
    run_app(app)
