"""Stage ``finetune@ARCH-TARGET``: train the pruned model (no slimming penalty)."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import PARAMS_OPTION, check_target, params_for, run_app, stage
from stages._training import train_to_checkpoint

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    arch: str = typer.Option(..., help="architecture, one of params.yaml's archs"),
    target: str = typer.Option(..., help="prune target whose model to fine-tune (0.2, flops0.5, params0.3, "
                                         "speedup2, safe)"),
    params_file: Path = PARAMS_OPTION,
    epochs: int | None = typer.Option(None, help="override finetune.epochs"),
    lr: float | None = typer.Option(None, help="override finetune.lr"),
) -> None:
    """Fine-tune models/ARCH/pruned-TARGET.pt into models/ARCH/finetuned-TARGET.pt."""
    with stage(f"finetune@{arch}-{target}"):
        params = params_for(params_file, arch, **{"finetune.epochs": epochs, "finetune.lr": lr})
        goal = check_target(params, target)
        from slimcore_pipeline import paths

        train_to_checkpoint(params, arch, paths.finetune_run(goal), paths.finetuned(arch, goal),
                            train_cfg=params.finetune, strength=0.0, init=paths.pruned(arch, goal),
                            module="stages.finetune")


if __name__ == "__main__":
    run_app(app)
