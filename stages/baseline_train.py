"""Stage ``baseline-train@ARCH``: train the arch without the slimming penalty, from ``model.weights``."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import PARAMS_OPTION, params_for, run_app, stage
from stages._training import start_of, train_to_checkpoint

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    arch: str = typer.Option(..., help="architecture, one of params.yaml's archs"),
    params_file: Path = PARAMS_OPTION,
    epochs: int | None = typer.Option(None, help="override train.epochs"),
    lr: float | None = typer.Option(None, help="override train.lr"),
) -> None:
    """Train ARCH from model.weights' file for it (random init without one); writes
    models/ARCH/baseline.pt and metrics/ARCH/baseline-train/."""
    with stage(f"baseline-train@{arch}"):
        params = params_for(params_file, arch, **{"train.epochs": epochs, "train.lr": lr})
        from slimcore_pipeline import paths

        start = start_of(params, arch, "baseline-train")
        train_to_checkpoint(params, arch, "baseline-train", paths.checkpoint(arch, "baseline"),
                            train_cfg=params.train, strength=0.0, init=start.init, weights=start.weights,
                            module="stages.baseline_train")


if __name__ == "__main__":
    run_app(app)
