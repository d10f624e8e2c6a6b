"""What every stage shares: params loading, clear errors and exit codes, interrupts, JSON output.

Stages import torch-heavy modules only after params validated, so a bad ``params.yaml`` fails
in a fraction of a second with one message that names the key.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer

from slimcore.config import Params, load_params, with_overrides
from slimcore.console import console
from slimcore.errors import ParamsError, SlimcoreError
from slimcore.targets import Target

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
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except SlimcoreError as err:
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


def check_target(params: Params, target: str) -> Target:
    """A prune target given by hand (``--target``): a valid one (usually one of prune.targets)."""
    from slimcore.targets import parse_target

    try:
        return parse_target(target)
    except ValueError as err:
        raise ParamsError(f"--target {target}: {err}") from None


def write_json(path: Path, data: Any) -> None:
    """Pretty JSON, atomically."""
    from slimcore.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def run_app(app: typer.Typer) -> None:
    """Entry point shared by ``python -m stages.X``."""
    app(prog_name=f"python -m stages.{Path(sys.argv[0]).stem}", standalone_mode=True)


__all__ = ["PARAMS_OPTION", "check_target", "console", "fail", "params_for", "run_app", "stage", "write_json"]
