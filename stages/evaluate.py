"""Stage ``evaluate``: top-1/top-5 of every model, the results table and the plot data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from stages._common import PARAMS_OPTION, console, params_for, run_app, stage, write_json

app = typer.Typer(add_completion=False, help=__doc__)


def write_summaries(params: Any, evals: dict[str, Any], profile: dict[str, Any],
                    prunes: dict[str, Any], sensitivity: dict[str, Any] | None = None) -> None:
    """One ``metrics/summary/ARCH.json`` (the declared metrics) and one ``metrics/details/ARCH.json``
    per arch, and no other file in either folder."""
    from slimcore_pipeline import paths, results_table

    for folder in (paths.summaries(), paths.details_dir()):
        for stale in folder.glob("*.json") if folder.is_dir() else []:
            if stale.stem not in params.archs:
                stale.unlink()
    for arch in params.archs:
        args = (arch, params, evals[arch], profile[arch], prunes[arch], (sensitivity or {}).get(arch))
        write_json(paths.summary(arch), results_table.summary(*args))
        write_json(paths.details(arch), results_table.details(*args))


@app.command()
def main(params_file: Path = PARAMS_OPTION) -> None:
    """Write metrics/eval.json, metrics/{summary,details}/ARCH.json, metrics/results.md and metrics/plots/*.csv
    (with the sensitivity curves of metrics/sensitivity/ARCH.json)."""
    with stage("evaluate"):
        params = params_for(params_file)
        from slimcore_pipeline import paths
        from slimcore_pipeline.resources import check_writable

        check_writable(paths.eval_report().parent, paths.summaries(), paths.details_dir(), paths.plots_dir(),
                       paths.results_table().parent)
        import torch
        from rich.table import Table

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
        sensitivity = {arch: json.loads(paths.sensitivity_report(arch).read_text()) for arch in params.archs}
        evals: dict[str, dict[str, dict[str, float | int]]] = {}
        prunes: dict[str, dict[str, dict[str, object]]] = {}  # arch -> target tag -> prune report
        targets = params.prune.parsed_targets()
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
                if label in ("baseline", "sparse"):
                    gammas[arch][label] = gamma_magnitudes(model).cpu()
                if meta.get("history"):  # trained checkpoints: baseline-train, sparse-train, finetune-R
                    histories[arch][meta["run"]] = meta["history"]
            prunes[arch] = {t.tag: json.loads(paths.prune_report(arch, t).read_text()) for t in targets}
        write_json(paths.eval_report(), evals)
        write_summaries(params, evals, profile, prunes, sensitivity)
        write_plot_data(paths.plots_dir(), archs=params.archs, targets=targets, evals=evals,
                        profile=profile, prunes=prunes, histories=histories, gammas=gammas, sensitivity=sensitivity)
        markdown = results_table.results_markdown(params, evals, profile, prunes, sensitivity)
        markdown += "\n" + cpumath.provenance(params.runtime, ctx.device.type)  # the one machine-specific line
        atomic_write_bytes(paths.results_table(), markdown.encode())

        table = Table(title="slimcore results (test top-1 %)")
        for col in ("arch", "baseline", "sparse", *[f"{t.tag}: pruned / FT" for t in targets],
                    f"safe ratio (val, {params.prune.max_drop:g} pt)"):
            table.add_column(col, justify="right")
        for arch, ev in evals.items():
            cells = [f"{100 * ev[f'pruned-{t.tag}']['top1']:.2f} / "
                     f"{100 * ev[f'finetuned-{t.tag}']['top1']:.2f}" for t in targets]
            table.add_row(arch, f"{100 * ev['baseline']['top1']:.2f}", f"{100 * ev['sparse']['top1']:.2f}", *cells,
                          f"{sensitivity[arch]['safe_ratio']:g}")
        console.print(table)
        console.log(f"evaluate: wrote {paths.results_table()}")


if __name__ == "__main__":
    run_app(app)
