"""What every stage shares: params loading, clear errors and exit codes, interrupts, JSON output.

Stages import torch-heavy modules only after params validated, so a bad ``params.yaml`` fails
in a fraction of a second with one message that names the key.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer

from slimcore.errors import ParamsError, SlimcoreError
from slimcore.targets import Target
from slimcore_pipeline import cpumath
from slimcore_pipeline.config import Params, load_params, with_overrides
from slimcore_pipeline.console import console

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="params file (the pipeline reads params.yaml)")

EXIT_USAGE = 2
EXIT_NUMERICS = 3
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one clear error and exit non-zero (nothing has been written)."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


TEMP_ROOTS = ("models", "metrics", ".slimcore")  # where atomic writers of killed stages leave temp files


TRAINING_STAGES = ("baseline-train", "sparse-train", "finetune")  # they save every finished epoch


def _interrupted(name: str) -> NoReturn:
    if name.partition("@")[0] in TRAINING_STAGES:
        what = "every finished epoch is saved: run the stage again (or `dvc repro`) to resume"
    else:
        what = "it stopped before finishing (no half-written file is left): run the stage again (or `dvc repro`)"
    console.print(f"[yellow]{name}: interrupted[/]; {what}")
    raise typer.Exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Run a stage's body so that a stop, a crash or a bad input never leaves a half-written output, and exits say why.

    * SIGINT and SIGTERM (at any moment, start-up included) end it with exit 130 and the resume
      hint: they stay blocked until :func:`params_for` has imported torch (the safe point), and
      nothing is written once one arrived;
    * it holds the exclusive lock of its outputs (``.slimcore/locks/NAME.lock``) for its whole run:
      a second instance exits 2 at once, naming the pid that holds it;
    * it first removes temp files that killed writers left under models/, metrics/ and .slimcore/;
    * expected failures (:class:`SlimcoreError`) print one line and exit 2 (3: non-finite loss);
    * it prints where the run is ("stage N/M", elapsed, an estimate of what is left) and records
      its duration (slimcore_pipeline/progress.py); torchrun's workers leave that to their launcher.
    """
    from slimcore_pipeline import process
    from slimcore_pipeline.locks import OutputLock, held_by_launcher
    from slimcore_pipeline.progress import announce

    old_handlers = process.install_stop_handlers()
    lock = None
    try:
        try:
            if not held_by_launcher():
                lock = OutputLock(name).acquire()
                for path in process.remove_stale_temp_files(TEMP_ROOTS):
                    console.log(f"{name}: removed {path} (a temp file left by a killed run)")
            with announce(name, console.log) if lock is not None else contextlib.nullcontext():
                yield
        finally:
            process.hold_stops()  # the exit below is never cut short: it says what happened
        if process.stop_requested():  # a stop whose KeyboardInterrupt was swallowed, or still pending
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        _interrupted(name)
    except SlimcoreError as err:
        if process.stop_requested():
            _interrupted(name)
        fail(f"{name}: {one_line(err)}")
    except FloatingPointError as err:
        if process.stop_requested():
            _interrupted(name)
        fail(f"{name}: {err}", EXIT_NUMERICS)
    except OSError as err:  # disk full or read-only where no writer of ours caught it (dvclive, a library)
        from slimcore_pipeline.resources import write_error

        clear = write_error(err.filename or "an output file", err, atomic=False)
        if clear is None:
            raise
        fail(f"{name}: {clear}")
    finally:
        if lock is not None:
            lock.release()
        process.restore_handlers(old_handlers)


def one_line(err: BaseException) -> str:
    """An error's message; for one a DataLoader worker raised (re-raised with the worker's
    traceback in its text), the original message alone."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())


def fit_schedule(params: Params, overrides: dict[str, Any]) -> dict[str, Any]:
    """``--epochs N`` by hand: drop the section's milestones at or beyond N (and cap warmup_epochs
    below N), logging it, so a shorter run keeps the schedule's first N epochs."""
    fitted = dict(overrides)
    for key, epochs in overrides.items():
        section, _, leaf = key.rpartition(".")
        cfg = getattr(params, section, None) if leaf == "epochs" and isinstance(epochs, int) else None
        if cfg is None or epochs < 1:
            continue
        kept = [m for m in cfg.milestones if m < epochs]
        if kept != list(cfg.milestones) and fitted.get(f"{section}.milestones") is None:
            fitted[f"{section}.milestones"] = kept
            console.log(f"--epochs {epochs}: {section}.milestones {list(cfg.milestones)} -> {kept} "
                        f"(the learning-rate drops at or after epoch {epochs} are dropped)")
        if epochs > 1 and cfg.warmup_epochs >= epochs and fitted.get(f"{section}.warmup_epochs") is None:
            fitted[f"{section}.warmup_epochs"] = epochs - 1
            console.log(f"--epochs {epochs}: {section}.warmup_epochs {cfg.warmup_epochs} -> {epochs - 1}")
    return fitted


def params_for(path: Path, arch: str | None = None, **overrides: Any) -> Params:
    """Validated params (with by-hand option overrides), checking ``arch`` is one of ``archs``;
    then the CPU math pinned as ``runtime`` says (:mod:`slimcore_pipeline.cpumath`) and torch imported.

    A by-hand ``SECTION.epochs`` fits the section's milestones to it (see :func:`fit_schedule`).
    """
    from slimcore_pipeline.process import start_up_done

    params = load_params(path)
    if any(v is not None for v in overrides.values()):
        params = with_overrides(params, fit_schedule(params, overrides))
    if arch is not None and arch not in params.archs:
        raise ParamsError(f"--arch {arch!r} is not in {path}'s archs: {', '.join(params.archs)}")
    cpumath.pin_isa(params.runtime)  # before torch's first CPU operation: the same bytes on any AVX2 CPU
    start_up_done()  # torch imported with stop signals held; a SIGINT/SIGTERM that came meanwhile lands here
    cpumath.apply_threads(params.runtime)
    if (why := cpumath.check_pinned(params.runtime)) is not None:
        console.log(f"[yellow]warning:[/] {why}")
    return params


def check_target(params: Params, target: str) -> Target:
    """A prune target given by hand (``--target``): a valid one (usually one of prune.targets)."""
    from slimcore.targets import parse_target

    try:
        return parse_target(target)
    except ValueError as err:
        raise ParamsError(f"--target {target}: {err}") from None


def trace_inputs(params: Params) -> Any:
    """The seeded batch ``slim`` traces with (2 images at ``data.image_size``): one definition, so
    that the sensitivity stage measures exactly what the prune stage removes."""
    import torch

    size = params.data.image_size
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(params.seed))


def write_json(path: Path, data: Any) -> None:
    """Pretty JSON, atomically."""
    from slimcore_pipeline.process import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def run_app(app: typer.Typer) -> None:
    """Entry point shared by ``python -m stages.X``.

    A stop signal that came after the stage's body (held there: see :func:`stage`) still ends it
    with exit 130; from then on they are ignored, so that the interpreter's shutdown (which puts
    back the default handlers) cannot turn a finished run into a silent death by SIGTERM.
    """
    from slimcore_pipeline import process

    name = f"stages.{Path(sys.argv[0]).stem}"
    try:
        app(prog_name=f"python -m {name}", standalone_mode=True)
    except SystemExit as done:
        stopped = process.stop_requested()
        process.ignore_stop_signals()
        if done.code in (0, None) and (stopped or process.stop_requested()):
            console.print(f"[yellow]{name}: interrupted after its outputs were written[/]; "
                          "run the stage again (or `dvc repro`) to record them")
            raise SystemExit(EXIT_INTERRUPTED) from None
        raise


__all__ = ["PARAMS_OPTION", "check_target", "console", "fail", "fit_schedule", "one_line", "params_for", "run_app",
           "stage", "trace_inputs", "write_json"]
