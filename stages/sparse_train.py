"""Stage ``sparse-train@ARCH``: train the arch with L1 on every BatchNorm gamma."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import PARAMS_OPTION, params_for, run_app, stage
from stages._training import train_to_checkpoint

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    arch: str = typer.Option(..., help="architecture, one of params.yaml's archs"),
    params_file: Path = PARAMS_OPTION,
    epochs: int | None = typer.Option(None, help="override train.epochs"),
    lr: float | None = typer.Option(None, help="override train.lr"),
    sparsity: float | None = typer.Option(None, help="override sparsity.ARCH (L1 strength)"),
) -> None:
    """Train ARCH from scratch with sparsity; writes models/ARCH/sparse.pt and metrics/ARCH/sparse-train/."""
    with stage(f"sparse-train@{arch}"):
        params = params_for(params_file, arch, **{"train.epochs": epochs, "train.lr": lr,
                                                  f"sparsity.{arch}": sparsity})
        from slimcore import paths

        train_to_checkpoint(params, arch, "sparse-train", paths.checkpoint(arch, "sparse"),
                            train_cfg=params.train, sparsity=params.sparsity[arch], module="stages.sparse_train")


if __name__ == "__main__":
    run_app(app)
