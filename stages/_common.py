"""What every stage shares: params loading, clear errors, interrupts, seeding, training glue.

Stages import torch-heavy modules only after params validated, so a bad ``params.yaml`` fails
in a fraction of a second with one message that names the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer

from slimcore.config import Params, ParamsError, load_params, with_overrides
from slimcore.console import console

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="params file (the pipeline reads params.yaml)")

EXIT_USAGE = 2
EXIT_NUMERICS = 3
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one clear error and exit non-zero (nothing has been written)."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Turn expected failures into one-line messages and exit codes; SIGTERM acts like Ctrl-C."""
    from slimcore.checkpoint import CheckpointError
    from slimcore.data import DataError

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except (ParamsError, DataError, CheckpointError) as err:
        fail(f"{name}: {err}")
    except KeyboardInterrupt:
        console.print(f"[yellow]{name}: interrupted[/]; every finished epoch is saved: "
                      "run the stage again (or `dvc repro`) to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except FloatingPointError as err:
        fail(f"{name}: {err}", EXIT_NUMERICS)


def params_for(path: Path, arch: str | None = None, **overrides: Any) -> Params:
    """Validated params (with by-hand option overrides), checking ``arch`` is one of ``archs``."""
    params = load_params(path)
    if any(v is not None for v in overrides.values()):
        params = with_overrides(params, overrides)
    if arch is not None and arch not in params.archs:
        raise ParamsError(f"--arch {arch!r} is not in {path}'s archs: {', '.join(params.archs)}")
    return params


def check_ratio(params: Params, ratio: float) -> None:
    """A ratio given by hand must be a valid ratio (and is usually one of prune.ratios)."""
    if not 0 <= ratio < 1:
        raise ParamsError(f"--ratio {ratio}: must be in [0, 1) (a fraction of BN channels)")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fingerprint(*parts: Any) -> str:
    """A stable hash of settings and input files: resume only a run with the same inputs."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def write_json(path: Path, data: Any) -> None:
    """Pretty JSON, atomically."""
    from slimcore.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def train_to_checkpoint(params: Params, arch: str, run: str, out: Path, *, train_cfg: Any,
                        sparsity: float, init: Path | None = None) -> None:
    """Train a model (from scratch, or from the checkpoint ``init``) and save it to ``out``.

    Resumes from the run's last finished epoch if an earlier attempt was interrupted.
    """
    import torch

    from slimcore import paths
    from slimcore.checkpoint import load_model, save_model
    from slimcore.data import check_num_classes, load_splits, make_loader
    from slimcore.models import build_model, spec_of
    from slimcore.runtime import barrier, current_context, distributed
    from slimcore.train import Trainer

    ctx = current_context(params.runtime)
    with distributed(ctx):
        seed_everything(params.seed)
        splits = load_splits(params.data)
        if init is not None:
            model = load_model(init, expected_arch=arch)
            check_num_classes(splits, spec_of(model).num_classes, str(init))
        else:
            model = build_model(arch, splits.num_classes, params.model.stem, params.model.width)
        train = make_loader(splits.train, train_cfg.batch_size, train=True, seed=params.seed,
                            runtime=params.runtime, rank=ctx.rank, world_size=ctx.world_size,
                            device=ctx.device.type)
        test = make_loader(splits.test, max(256, train_cfg.batch_size), train=False, seed=params.seed,
                           runtime=params.runtime, device=ctx.device.type)
        trainer = Trainer(model, train_cfg, ctx, train, test, sparsity=sparsity, desc=f"{run}@{arch}")
        key = fingerprint(params.model_dump(exclude={"prune", "profile"}), arch, run, sparsity,
                          init if init is not None else "scratch")
        state = paths.resume_state(arch, run)
        history = trainer.fit(state_path=state, fingerprint=key, curves_dir=paths.curves(arch, run))
        if ctx.is_main:
            final = history[-1] if history else None
            save_model(out, model.cpu(), run=run, history=[vars(h) for h in history],
                       test_top1=final.test_top1 if final else None, sparsity=sparsity,
                       torch_version=str(torch.__version__))
            state.unlink(missing_ok=True)
            console.log(f"{run}@{arch}: saved {out}")
        barrier(ctx)


def run_app(app: typer.Typer) -> None:
    """Entry point shared by ``python -m stages.X``."""
    app(prog_name=f"python -m stages.{Path(sys.argv[0]).stem}", standalone_mode=True)


__all__ = [
    "PARAMS_OPTION", "check_ratio", "console", "fail", "fingerprint", "params_for", "run_app",
    "seed_everything", "stage", "train_to_checkpoint", "write_json",
]
