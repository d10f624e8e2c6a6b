"""Stage ``finetune@ARCH-RATIO``: train the pruned model (no sparsity penalty)."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import PARAMS_OPTION, check_ratio, params_for, run_app, stage
from stages._training import train_to_checkpoint

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    arch: str = typer.Option(..., help="architecture, one of params.yaml's archs"),
    ratio: float = typer.Option(..., help="pruning ratio whose model to fine-tune"),
    params_file: Path = PARAMS_OPTION,
    epochs: int | None = typer.Option(None, help="override finetune.epochs"),
    lr: float | None = typer.Option(None, help="override finetune.lr"),
) -> None:
    """Fine-tune models/ARCH/pruned-RATIO.pt into models/ARCH/finetuned-RATIO.pt."""
    with stage(f"finetune@{arch}-{ratio}"):
        params = params_for(params_file, arch, **{"finetune.epochs": epochs, "finetune.lr": lr})
        check_ratio(params, ratio)
        from slimcore import paths

        train_to_checkpoint(params, arch, paths.finetune_run(ratio), paths.finetuned(arch, ratio),
                            train_cfg=params.finetune, sparsity=0.0, init=paths.pruned(arch, ratio),
                            module="stages.finetune")


if __name__ == "__main__":
    run_app(app)
