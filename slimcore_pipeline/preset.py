"""Run a params preset (``configs/*.yaml``) as a DVC experiment, leaving the workspace as committed.

``make seed CIFAR_ROOT=...`` calls this module: it validates the preset exactly as the stages
validate ``params.yaml``, makes ``data.root`` absolute, refuses a machine without CUDA (unless
asked) and a dataset root the data module cannot read, turns the preset's differences from
``params.yaml`` into ``dvc exp run -S key=value`` overrides and runs::

    dvc exp run --temp -n NAME -S key=value ...

``--temp`` runs the pipeline in a temporary copy of the repository, so the committed
``params.yaml``, ``dvc.lock``, ``metrics/`` and ``models/`` stay untouched; the result is a DVC
experiment (``dvc exp show``, ``dvc exp apply NAME``, ``dvc exp branch NAME BRANCH``). DVC deletes
that copy when a stage fails, so a failed run starts over; ``--in-place`` runs the experiment in
the current workspace instead (meant for a separate clone), where an interrupted run resumes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, NoReturn

import typer
import yaml

from slimcore.errors import ParamsError, SlimcoreError
from slimcore_pipeline.config import DEFAULT_PARAMS_PATH, Params, RuntimeConfig, load_params, with_overrides
from slimcore_pipeline.console import console

EXIT_REFUSED = 2
SEED_PRESET = Path("configs/seed-cifar100.yaml")


class DeviceError(SlimcoreError):
    """The machine cannot (or should not) run the preset: no CUDA, or fewer GPUs than processes."""


# --------------------------------------------------------------------------------------------
# the preset and its overrides
# --------------------------------------------------------------------------------------------


def parse_sets(items: Sequence[str]) -> dict[str, object]:
    """``["train.epochs=1", "archs=[resnet50]"]`` -> ``{"train.epochs": 1, "archs": ["resnet50"]}``.

    Values are read as YAML, as they would be in a params file.
    """
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. runtime.nproc=4")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ParamsError(f"--set {item!r}: the value is not valid YAML: {err}") from None
    return out


def resolve_preset(path: Path, data_root: str | Path | None = None,
                   sets: Mapping[str, object] | None = None) -> Params:
    """The validated preset with ``sets`` applied and ``data.root`` absolute.

    ``data_root`` replaces the preset's ``data.root``; either way it is resolved against the
    current directory, because the experiment runs in a temporary copy of the repository.
    """
    params = load_params(path)
    changes = dict(sets or {})
    root = data_root if data_root is not None else changes.get("data.root", params.data.root)
    changes["data.root"] = str(Path(str(root)).expanduser().resolve())
    return with_overrides(params, changes)


# Strings Hydra reads back as the same string without quotes (names, paths); others are quoted.
_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_NOT_STRINGS = {"true", "false", "null", "inf", "nan"}


def format_value(value: object) -> str:
    """A value in Hydra's override grammar (what ``dvc exp run -S`` parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _NOT_STRINGS:
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    raise ParamsError(f"cannot pass a {type(value).__name__} ({value!r}) to dvc exp run -S")


def _same(a: object, b: object) -> bool:
    """Equal values of equal types (``1`` and ``1.0`` differ)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def param_overrides(target: Mapping[str, object], current: Mapping[str, object], prefix: str = "") -> list[str]:
    """The ``-S`` overrides that turn ``current`` (params.yaml as read) into ``target``.

    Changed keys become ``key=value``, keys only in ``target`` ``+key=value`` and keys only in
    ``current`` ``~key`` (Hydra's grammar); sections are compared key by key.
    """
    out: list[str] = []
    for key, value in target.items():
        dotted = f"{prefix}{key}"
        if key not in current:
            out.append(f"+{dotted}={format_value(value)}")
        elif isinstance(value, Mapping) and isinstance(current[key], Mapping):
            out += param_overrides(value, current[key], f"{dotted}.")  # type: ignore[arg-type]
        elif not _same(value, current[key]):
            out.append(f"{dotted}={format_value(value)}")
    out += [f"~{prefix}{key}" for key in current if key not in target]
    return out


def _as_validated(raw: Mapping[str, object], validated: Mapping[str, object]) -> dict[str, object]:
    """``raw``'s keys with their validated values (``1e-05`` read as text by YAML 1.1 becomes the float)."""
    return {key: _as_validated(value, validated[key])  # type: ignore[arg-type]
            if isinstance(value, Mapping) and isinstance(validated.get(key), Mapping)
            else validated.get(key, value) for key, value in raw.items()}


def overrides_for(target: Params, params_file: Path = DEFAULT_PARAMS_PATH) -> list[str]:
    """Overrides from ``params_file`` (validated: a broken one fails here, naming the key) to ``target``."""
    current = load_params(params_file).model_dump()
    return param_overrides(target.model_dump(), _as_validated(yaml.safe_load(params_file.read_text()), current))


def check_round_trip(overrides: Sequence[str], target: Params, params_file: Path = DEFAULT_PARAMS_PATH) -> None:
    """Apply ``overrides`` to a scratch copy of ``params_file`` as ``dvc exp run -S`` does; it must give ``target``.

    DVC writes the file back as YAML 1.2, which the stages read as YAML 1.1: a value such as
    ``off`` would come back as ``False``. This catches that before anything starts.
    """
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls

    with tempfile.TemporaryDirectory(prefix="slimcore-preset-") as tmp:
        scratch = Path(tmp) / "params.yaml"
        shutil.copyfile(params_file, scratch)
        apply_overrides(str(scratch), list(overrides))
        try:
            result = load_params(scratch)
        except ParamsError as err:
            problem = str(err).replace(f"{scratch}: ", "")
            raise ParamsError(f"dvc exp run -S would write an invalid {params_file}: {problem} (DVC writes YAML 1.2, "
                              "the stages read YAML 1.1: commit such a value to params.yaml instead)") from None
    if result != target:
        got, want = result.model_dump(), target.model_dump()
        diff = [k for k in want if got.get(k) != want[k]]
        raise ParamsError(f"dvc exp run -S would not reproduce the preset (sections {', '.join(diff)} differ); "
                          "set those keys in params.yaml by hand")


# --------------------------------------------------------------------------------------------
# the machine and the data
# --------------------------------------------------------------------------------------------


CPU_WHY = "this preset would train for weeks on CPU; run it on a GPU machine, or"


def check_device(runtime: RuntimeConfig, allow_cpu: bool = False, why: str = CPU_WHY) -> str:
    """Refuse a run that would train on CPU (unless ``allow_cpu``) or ask for more GPUs than exist.

    ``why`` says what a CPU run would cost and what to do instead. Returns a one-line
    description of what will run it.
    """
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if runtime.device == "cuda" and gpus == 0:
        raise DeviceError(f"runtime.device: cuda, but torch {torch.__version__} sees no CUDA GPU on this machine")
    if gpus == 0 or runtime.device == "cpu":
        if not allow_cpu:
            machine = "runtime.device is cpu" if gpus else f"no CUDA GPU on this machine (torch {torch.__version__})"
            raise DeviceError(f"{machine}: {why} pass --allow-cpu (make ... ALLOW_CPU=1) to start it anyway")
        return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}, runtime.nproc={runtime.nproc}"
    if runtime.nproc > gpus:
        raise DeviceError(f"runtime.nproc: {runtime.nproc} processes but {gpus} GPU(s) here; "
                          "use at most one process per GPU")
    return (f"{runtime.nproc} x {torch.cuda.get_device_name(0)} (of {gpus}), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def check_data(params: Params) -> str:
    """Open the dataset exactly as the stages will (``slimcore_pipeline.data.load_splits``); DataError if it cannot."""
    from slimcore_pipeline.data import load_splits

    splits = load_splits(params.data)
    return (f"{splits.name} at {params.data.root}: {len(splits.train)} train / {len(splits.val)} val / "
            f"{len(splits.test)} test images, "
            f"{splits.num_classes} classes")


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def exp_run_args(name: str, overrides: Sequence[str], in_place: bool = False) -> list[str]:
    """``dvc`` arguments that run the pipeline as experiment ``name``.

    By default in a temporary copy of the repo (``--temp``); ``in_place`` runs it in this
    workspace, whose params.yaml, dvc.lock and metrics/ it changes (an interrupted run resumes).
    """
    args = ["exp", "run", *([] if in_place else ["--temp"]), "-n", name]
    for item in overrides:
        args += ["-S", item]
    return args


def after_run_hint(name: str, in_place: bool = False) -> str:
    """How to look at (and keep) the experiment's results."""
    lines = [("dvc exp show --only-changed", "its params and metrics next to the workspace's"),
             (f"dvc exp apply {name}", "its params.yaml, dvc.lock, metrics/ and models/ into the workspace"),
             (f"dvc exp branch {name} {name}-results", "or keep it as a git branch; then e.g."),
             (f"git show {name}-results:metrics/results.md", "its results table")]
    width = max(len(cmd) for cmd, _ in lines)
    where = "it is also in this workspace" if in_place else "the workspace is as it was"
    return f"experiment {name!r} done ({where}). Look at it with:\n" + "\n".join(
        f"  {cmd:<{width}}  # {what}" for cmd, what in lines)


def _fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(EXIT_REFUSED)


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    preset: Annotated[Path, typer.Argument(help="preset file, validated like params.yaml")] = SEED_PRESET,
    data_root: Annotated[str | None, typer.Option(
        "--data-root", "--cifar-root",
        help="dataset folder (CIFAR: the one holding cifar-100-python/); default: the preset's data.root")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", "-n", help="experiment name (default: the preset's file name)")] = None,
    sets: Annotated[list[str] | None, typer.Option(
        "--set", "-S", help="KEY=VALUE applied to the preset, e.g. runtime.nproc=4 (repeatable)")] = None,
    allow_cpu: Annotated[bool, typer.Option("--allow-cpu", help="start even without a CUDA GPU")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="check everything and print the command, run nothing")] = False,
    in_place: Annotated[bool, typer.Option(
        "--in-place", help="run in this workspace, not a temporary copy: changes its params.yaml, dvc.lock and "
                           "metrics/, and an interrupted run resumes (use a separate clone)")] = False,
    params_file: Annotated[Path, typer.Option("--params", help="the workspace's params file")] = DEFAULT_PARAMS_PATH,
) -> None:
    """Run PRESET as a DVC experiment in a temporary copy of the repo (params.yaml, metrics stay as they are)."""
    exp = name or preset.stem
    try:
        target = resolve_preset(preset, data_root, parse_sets(sets or []))
        machine = check_device(target.runtime, allow_cpu)
        data = check_data(target)
        overrides = overrides_for(target, params_file)
        check_round_trip(overrides, target, params_file)
    except SlimcoreError as err:
        _fail(str(err))
    args = exp_run_args(exp, overrides, in_place)
    console.log(f"preset {preset}: {machine}; {data}")
    where = "in this workspace (--in-place)" if in_place else \
        "in a temporary copy of the repo (the workspace stays as committed)"
    console.log(f"running it as DVC experiment {exp!r} {where}; {len(overrides)} params differ from {params_file}")
    print(shlex.join(["dvc", *args]), flush=True)
    if dry_run:
        return
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    code = subprocess.call([sys.executable, "-m", "dvc", *args], env=env)
    if code != 0:
        hint = "" if in_place else (" If a stage failed, DVC has removed its temporary copy and a rerun starts "
                                    "over; for a run you may need to resume, use --in-place in a separate clone.")
        console.print(f"[bold red]error:[/] dvc exp run exited with {code} (its message is above).{hint}",
                      soft_wrap=True, highlight=False)
        raise typer.Exit(code)
    console.print(after_run_hint(exp, in_place), soft_wrap=True, highlight=False)


if __name__ == "__main__":
    app(prog_name="python -m slimcore_pipeline.preset")
