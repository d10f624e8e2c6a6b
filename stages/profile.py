"""Stage ``profile``: FLOPs, parameters, bytes on disk and CPU latency of every model."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import PARAMS_OPTION, console, params_for, run_app, stage, write_json

app = typer.Typer(add_completion=False, help=__doc__)


def same_architecture(label: str) -> str:
    """The timed model whose architecture ``label`` shares (weights do not change latency)."""
    if label == "sparse":
        return "baseline"
    if label.startswith("pruned-"):
        return "finetuned-" + label.removeprefix("pruned-").removesuffix("-nofold")
    return label


@app.command()
def main(params_file: Path = PARAMS_OPTION) -> None:
    """Measure baseline, sparse, pruned and fine-tuned models of every arch into metrics/profile.json.

    FLOPs, parameters and bytes are measured for every checkpoint; latency for the baseline and
    each fine-tuned model (timed in interleaved rounds), and reported for the checkpoints that
    share their architecture (sparse: baseline; pruned: fine-tuned).
    """
    with stage("profile"):
        params = params_for(params_file)
        from slimcore import paths
        from slimcore.checkpoint import load_model
        from slimcore.profile import count_flops, count_params, file_bytes, measure_latencies

        size, cfg = params.data.image_size, params.profile
        result: dict[str, dict[str, object]] = {}
        for arch in params.archs:
            files = paths.model_files(arch, params.prune.ratios)
            models = {label: load_model(path, expected_arch=arch) for label, path in files.items()}
            timed = {label: models[label] for label in files if same_architecture(label) == label}
            console.log(f"profile {arch}: timing {len(timed)} architectures x {cfg.latency_runs} runs")
            latency = measure_latencies(timed, size, runs=cfg.latency_runs, warmup=cfg.warmup_runs,
                                        threads=cfg.threads)
            result[arch] = {"image_size": size}
            for label, model in models.items():
                result[arch][label] = {
                    "flops": count_flops(model, size),
                    "params": count_params(model),
                    "bytes": file_bytes(files[label]),
                    "latency": latency[same_architecture(label)],
                    "latency_of": same_architecture(label),
                }
        write_json(paths.profile_report(), result)
        console.log(f"profile: {sum(len(v) - 1 for v in result.values())} models -> {paths.profile_report()}")


if __name__ == "__main__":
    run_app(app)
