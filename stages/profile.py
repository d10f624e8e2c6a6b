"""Stage ``profile``: FLOPs, parameters, bytes on disk and CPU latency of every model."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import PARAMS_OPTION, console, params_for, run_app, stage, write_json

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(params_file: Path = PARAMS_OPTION) -> None:
    """Measure baseline, sparse, pruned and fine-tuned models of every arch into metrics/profile.json."""
    with stage("profile"):
        params = params_for(params_file)
        from rich.progress import Progress

        from slimcore import paths
        from slimcore.checkpoint import load_model
        from slimcore.profile import count_flops, count_params, file_bytes, measure_latency

        size, cfg = params.data.image_size, params.profile
        jobs = [(arch, label, path) for arch in params.archs
                for label, path in paths.model_files(arch, params.prune.ratios).items()]
        result: dict[str, dict[str, object]] = {arch: {"image_size": size} for arch in params.archs}
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("profile", total=len(jobs))
            for arch, label, path in jobs:
                progress.update(task, description=f"profile {arch} {label}")
                model = load_model(path, expected_arch=arch)
                result[arch][label] = {
                    "flops": count_flops(model, size),
                    "params": count_params(model),
                    "bytes": file_bytes(path),
                    "latency": measure_latency(model, size, runs=cfg.latency_runs,
                                               warmup=cfg.warmup_runs, threads=cfg.threads),
                }
                progress.advance(task)
        write_json(paths.profile_report(), result)
        console.log(f"profile: {len(jobs)} models -> {paths.profile_report()}")


if __name__ == "__main__":
    run_app(app)
