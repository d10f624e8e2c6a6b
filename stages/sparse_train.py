"""Stage ``sparse-train@ARCH-TARGET``: train the arch with the slimming penalty on every BatchNorm
gamma (``penalty``, its strength ``penalty.strength.ARCH``), from ``model.sparse_start``, for one
prune target: with ``penalty.target: auto`` the penalty zeroes the share of channels that target
removes and no more, so a 2x model does not carry the dead channels a 4x budget needs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from stages._common import PARAMS_OPTION, check_target, console, params_for, run_app, stage
from stages._training import start_of, train_to_checkpoint

if TYPE_CHECKING:
    from torch import nn

    from slimcore.targets import Target
    from slimcore_pipeline.config import Params

app = typer.Typer(add_completion=False, help=__doc__)


def coupled_channels(model: nn.Module, params: Params, name: str) -> list[tuple[nn.BatchNorm2d, Any]] | None:
    """For ``penalty.method: group``: the BN channels ``slim`` removes together (see
    :func:`slimcore.prune.coupled_units`); None for the other methods.  A model whose graph
    cannot be traced gets the per-channel proximal step instead, with a warning."""
    if params.penalty.method != "group":
        return None
    import torch

    from slimcore.prune import coupled_units

    size = params.data.image_size
    try:
        return coupled_units(model, torch.zeros(2, 3, size, size))  # zeros: no draw from the RNG
    except Exception as err:
        console.print(f"[yellow]warning:[/] sparse-train@{name}: cannot trace which channels slim removes "
                      f"together ({type(err).__name__}: {err}); penalty.method group shrinks each channel "
                      "alone, as prox does")
        return None


def penalty_share(model: nn.Module, params: Params, arch: str, goal: Target,
                  said: list[float] | None = None) -> float:
    """``penalty.target`` as a share of BN channels: the number itself, or for ``auto`` the share
    the prune target ``goal`` needs on this model (:func:`slimcore.penalty_target.share_for_targets`),
    logged when it differs from the last one in ``said``."""
    target = params.penalty.target
    if target != "auto":
        return float(target)
    if params.penalty.method == "l1":  # the subgradient pulls every gamma: no share to resolve
        return 0.0
    from slimcore.penalty_target import share_for_targets
    from stages._common import trace_inputs

    share = share_for_targets(model, [goal], trace_inputs(params),
                              input_size=params.data.image_size, **params.prune.policy())
    if said is None or not said or said[-1] != share:
        what = ("no measured ratio yet: safe is found on this model afterwards" if goal.kind == "safe"
                else f"what {goal.tag} removes from the model as it is now, plus a margin")
        console.log(f"sparse-train@{arch}-{goal.tag}: penalty.target auto: {share:.1%} of the BN channels ({what})")
    if said is not None:
        said.append(share)
    return share


def auto_share(params: Params, arch: str, goal: Target) -> Callable[[nn.Module], float] | None:
    """For ``penalty.target: auto`` (prox/group): the function the trainer calls at the start of
    every epoch to re-resolve ``goal``'s share from the model as it is; None otherwise."""
    if params.penalty.target != "auto" or params.penalty.method == "l1":
        return None
    said: list[float] = []
    return lambda model: penalty_share(model, params, arch, goal, said)


@app.command()
def main(
    arch: str = typer.Option(..., help="architecture, one of params.yaml's archs"),
    target: str = typer.Option(..., help="the prune target this sparse model is for (0.2, flops0.5, params0.3, "
                                         "speedup2, safe): penalty.target auto sizes the penalty for it"),
    params_file: Path = PARAMS_OPTION,
    epochs: int | None = typer.Option(None, help="override train.epochs"),
    lr: float | None = typer.Option(None, help="override train.lr"),
    strength: float | None = typer.Option(None, "--strength", "--sparsity",
                                          help="override penalty.strength.ARCH"),
) -> None:
    """Train ARCH with the penalty from model.sparse_start (scratch, baseline or weights) for TARGET;
    writes models/ARCH/sparse-TARGET.pt and metrics/ARCH/sparse-train-TARGET/."""
    with stage(f"sparse-train@{arch}-{target}"):
        params = params_for(params_file, arch, **{"train.epochs": epochs, "train.lr": lr,
                                                  f"penalty.strength.{arch}": strength})
        goal = check_target(params, target)
        from slimcore_pipeline import paths
        from stages import _reuse

        name, run, out = f"sparse-train@{arch}-{goal.tag}", paths.sparse_run(goal), paths.sparse(arch, goal)
        start = start_of(params, arch, "sparse-train")
        key = _reuse.reuse_key(params, arch, start) if _reuse.target_independent(params, arch) else None
        if key is not None:
            source = _reuse.restore(arch, key, out, paths.curves(arch, run), paths.timings(arch, run))
            if source is not None:
                console.log(f"{name}: {why_shared(params, arch)}, so every prune target trains the same model "
                            f"from the same inputs: copied {source}'s ({_reuse.kept_runs(arch) / key}) to {out}")
                return
        train_to_checkpoint(params, arch, run, out,
                            train_cfg=params.train, strength=params.penalty.strength[arch], init=start.init,
                            weights=start.weights, module="stages.sparse_train",
                            units=lambda model: coupled_channels(model, params, f"{arch}-{goal.tag}"),
                            penalty_target=auto_share(params, arch, goal), meta_run=_reuse.META_RUN)
        if key is not None and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 wrote the files
            _reuse.keep(arch, key, out, paths.curves(arch, run), name)


def why_shared(params: Params, arch: str) -> str:
    """Why the penalty ignores the prune target (see :func:`stages._reuse.target_independent`)."""
    pen = params.penalty
    if pen.strength[arch] == 0:
        return f"penalty.strength.{arch} is 0"
    if pen.method == "l1":
        return "penalty.method l1 pulls every gamma whatever the target"
    return f"penalty.target is the fixed share {float(pen.target):g}"


if __name__ == "__main__":
    run_app(app)
