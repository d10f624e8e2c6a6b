"""Stage ``sparse-train@ARCH``: train the arch with L1 on every BatchNorm gamma, from ``model.sparse_start``."""

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
    sparsity: float | None = typer.Option(None, help="override sparsity.ARCH (L1 strength)"),
) -> None:
    """Train ARCH with sparsity from model.sparse_start (scratch, baseline or weights); writes
    models/ARCH/sparse.pt and metrics/ARCH/sparse-train/."""
    with stage(f"sparse-train@{arch}"):
        params = params_for(params_file, arch, **{"train.epochs": epochs, "train.lr": lr,
                                                  f"sparsity.{arch}": sparsity})
        from slimcore import paths

        start = start_of(params, arch, "sparse-train")
        train_to_checkpoint(params, arch, "sparse-train", paths.checkpoint(arch, "sparse"),
                            train_cfg=params.train, sparsity=params.sparsity[arch], init=start.init,
                            weights=start.weights, module="stages.sparse_train")


if __name__ == "__main__":
    run_app(app)
