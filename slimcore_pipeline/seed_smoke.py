"""Smoke-run a preset (the seed's CIFAR-100 by default) end to end on synthetic data, timing each stage.

``make seed-smoke`` (``python -m slimcore_pipeline.seed_smoke``) writes a random CIFAR-100-shaped dataset
in torchvision's on-disk format to a scratch workspace, derives a ``params.yaml`` from the preset
that keeps everything but the schedule (1 epoch, no warm-up, no milestones, a few latency runs,
a few batches of the preset's batch size) and runs every pipeline stage in ``dvc.yaml``'s order
as ``python -m stages.X`` subprocesses there, through the real data loader, AMP, channels_last
and, with several GPUs, torchrun. It ends with a table of seconds and images/s per stage.

Seconds are the stage subprocess's wall time, start-up included (Python, torch, CUDA, loading
checkpoints); when a stage writes timing files under ``metrics/timings/`` (``seconds``,
``images_per_second``) those figures are preferred for its images/s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any, NamedTuple, NoReturn

import typer
import yaml

from slimcore.errors import ParamsError, SlimcoreError
from slimcore.targets import parse_target
from slimcore_pipeline import paths
from slimcore_pipeline.config import Params, load_params, with_overrides
from slimcore_pipeline.console import console
from slimcore_pipeline.preset import EXIT_REFUSED, SEED_PRESET, check_device, parse_sets

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STEPS = 5  # training batches per stage when --train-images is not given
DEFAULT_TEST_IMAGES = 256
CPU_WHY = ("the smoke at the preset's size takes hours on CPU; run it on a GPU machine, or shrink it "
           "(--image-size 32 --width 0.125 --archs vgg16_bn --targets 0.5) and")


class StageFailed(SlimcoreError):
    """A stage subprocess exited non-zero (its log is kept in the workspace)."""


@dataclass
class SmokeOptions:
    """What to run; ``None`` means: as in the preset (or derived from it)."""

    preset: Path = SEED_PRESET
    image_size: int | None = None
    width: float | None = None
    archs: list[str] | None = None
    targets: list[float | str] | None = None  # prune.targets entries (0.5, flops0.5, ...)
    train_images: int | None = None  # default: DEFAULT_STEPS batches per process
    test_images: int = DEFAULT_TEST_IMAGES
    batch_size: int | None = None
    nproc: int | None = None  # default: the number of GPUs (1 without)
    sets: dict[str, object] = field(default_factory=dict)  # extra KEY=VALUE on the preset
    workdir: Path | None = None  # default: a new temporary folder
    keep: bool = False
    allow_cpu: bool = False
    stage_timeout: float = 1800.0  # subprocess stages only
    one_process_each: bool = False  # one process per stage, as DVC runs them (always so with nproc > 1)


@dataclass
class StageResult:
    """One stage's run and its figures."""

    stage: str  # as dvc.yaml names it: baseline-train@vgg16_bn, prune@vgg16_bn-0.2, evaluate ...
    command: list[str]
    images: int | None  # images the stage pushed through a model (None: prune, profile)
    wall_seconds: float  # the whole stage (as a subprocess: start-up included)
    timed_seconds: float | None = None  # from the metrics/timings/ file the stage wrote, if any
    timed_images_per_second: float | None = None

    @property
    def images_per_second(self) -> float | None:
        """From the stage's timing files if it wrote any, else images / wall seconds."""
        if self.timed_images_per_second is not None:
            return self.timed_images_per_second
        if self.images is None:
            return None
        seconds = self.timed_seconds if self.timed_seconds is not None else self.wall_seconds
        return self.images / seconds if seconds > 0 else None

    @property
    def source(self) -> str:
        return "metrics/timings" if self.timed_seconds is not None or self.timed_images_per_second is not None \
            else "wall s"


# --------------------------------------------------------------------------------------------
# params and the stage list
# --------------------------------------------------------------------------------------------


def smoke_params(opts: SmokeOptions, data_root: Path, nproc: int) -> Params:
    """The preset with a smoke schedule: 1 epoch, no warm-up or milestones, few latency runs, no
    DataLoader workers (``--set runtime.num_workers=8`` to time the preset's loaders)."""
    preset = load_params(opts.preset)
    if preset.data.name not in ("cifar10", "cifar100"):
        raise ParamsError(f"{opts.preset}: data.name is {preset.data.name!r}; the smoke writes CIFAR-shaped data "
                          "(cifar10 or cifar100)")
    batch = opts.batch_size or preset.train.batch_size
    changes: dict[str, object] = {
        "data.root": str(data_root), "data.download": False,
        "data.image_size": opts.image_size, "model.width": opts.width,
        "archs": opts.archs, "prune.targets": opts.targets,
        "profile.latency_runs": 3, "profile.warmup_runs": 1, "runtime.nproc": nproc,
        # A few batches of in-memory data: worker processes cost more than they save. On an H200
        # (gVisor), 8 workers per loader made a 640-image training stage take ~106 s, 0 took ~25 s.
        "runtime.num_workers": 0,
    }
    for run in ("train", "finetune"):
        changes.update({f"{run}.epochs": 1, f"{run}.warmup_epochs": 0, f"{run}.milestones": [],
                        f"{run}.batch_size": batch})
    return with_overrides(preset, {**changes, **opts.sets})


def train_images_default(params: Params, steps: int = DEFAULT_STEPS) -> int:
    """Enough images for ``steps`` full batches on every process."""
    return steps * params.train.batch_size * params.runtime.nproc


def train_steps(images: int, batch_size: int, nproc: int) -> int:
    """Optimizer steps in one epoch: DistributedSampler pads to nproc shards, each drops its last partial batch."""
    return math.ceil(images / nproc) // batch_size


class PlannedStage(NamedTuple):
    """One pipeline stage of the smoke, in ``dvc.yaml``'s terms."""

    name: str  # baseline-train@vgg16_bn, prune@vgg16_bn-0.2, evaluate ...
    args: list[str]  # ``python -m`` arguments
    images: int | None  # images pushed through a model (None: prune, profile)
    timing: Path | None  # the metrics/timings/ file the stage writes (relative to the workspace)


def stage_plan(params: Params, train_images: int, test_images: int, val_images: int = 0) -> list[PlannedStage]:
    """Every stage of the pipeline in order, with the images it handles and its timing file.

    ``train_images``: the training split (what training stages see: the validation split is held
    out of it); ``val_images``: the validation split, read by the sensitivity stage once for the
    unpruned model and once per ratio of its grid."""
    from slimcore_pipeline.sensitivity import ratio_grid

    def seen(cfg: Any) -> int:  # images a training stage pushes through its model: full batches x epochs
        return train_steps(train_images, cfg.batch_size, params.runtime.nproc) * cfg.batch_size \
            * params.runtime.nproc * cfg.epochs

    # the stages of each (arch, target), in dvc.yaml's order: kind, module, images, run name of its timing file
    per_target = (("sparse-train", "sparse_train", seen(params.train), paths.sparse_run),
                  ("sensitivity", "sensitivity", val_images * (len(ratio_grid(params.prune.sensitivity_step)) + 1)
                   or None, paths.sensitivity_run),
                  ("prune", "prune", None, paths.prune_run),
                  ("finetune", "finetune", seen(params.finetune), paths.finetune_run))
    targets = params.prune.parsed_targets()
    plan: list[PlannedStage] = []
    for arch in params.archs:
        plan.append(PlannedStage(f"baseline-train@{arch}", ["stages.baseline_train", "--arch", arch],
                                 seen(params.train), paths.timings(arch, "baseline-train")))
        for kind, module, images, run_of in per_target:
            plan += [PlannedStage(f"{kind}@{arch}-{t.tag}", [f"stages.{module}", "--arch", arch, "--target", t.tag],
                                  images, paths.timings(arch, run_of(t))) for t in targets]
    plan.append(PlannedStage("profile", ["stages.profile"], None, None))
    checkpoints = sum(len(paths.model_files(arch, targets)) for arch in params.archs)
    plan.append(PlannedStage("evaluate", ["stages.evaluate"], test_images * checkpoints, None))
    return plan


# --------------------------------------------------------------------------------------------
# timing files
# --------------------------------------------------------------------------------------------


def read_stage_timing(path: Path) -> tuple[float | None, float | None]:
    """(seconds, images/s) from a stage's ``metrics/timings/`` file (stages._training.write_timings,
    stages.prune); (None, None) when the stage wrote none."""
    if not path.is_file():
        return None, None
    data = json.loads(path.read_text())
    return data["seconds"], data.get("images_per_second")


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


def describe_machine(params: Params) -> dict[str, str]:
    """Device name, torch version, AMP dtype, channels_last and processes, as the stages will see them."""
    import torch

    from slimcore_pipeline.runtime import current_context

    ctx = current_context(params.runtime)
    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {"device": device, "torch": str(torch.__version__), "cuda": str(torch.version.cuda),
            "amp": str(ctx.amp_dtype).removeprefix("torch.") if ctx.amp_dtype else "off (fp32)",
            "channels_last": "on" if ctx.channels_last else "off", "nproc": str(params.runtime.nproc)}


def _stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_in_process(workspace: Path, module_args: list[str], out: IO[str]) -> int:
    """Run a stage's Typer app in this process (cwd: ``workspace``), its output to ``out``.

    The stage's code is the same as under DVC; what is saved is each stage's Python, torch and
    CUDA start-up, about 10 s a stage on a sandboxed GPU machine.
    """
    import importlib

    import click

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    module = importlib.import_module(module_args[0])
    here = Path.cwd()
    os.chdir(workspace)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            result = module.app(module_args[1:], prog_name=f"python -m {module_args[0]}", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.ClickException as err:
        out.write(f"error: {err.format_message()}\n")
        return err.exit_code
    finally:
        os.chdir(here)


def run_stage(workspace: Path, index: int, planned: PlannedStage, timeout: float,
              in_process: bool = False) -> StageResult:
    """Run one stage in ``workspace`` (a subprocess, or in this process); its output goes to
    ``logs/NN-STAGE.log`` there."""
    stage, module_args = planned.name, planned.args
    command = [sys.executable, "-m", *module_args]
    log = workspace / "logs" / f"{index:02d}-{stage.replace('@', '-')}.log"
    log.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        if in_process:
            code: int | None = _run_in_process(workspace, module_args, out)
        else:
            try:
                code = subprocess.run(command, cwd=workspace, env=_stage_env(), stdout=out, stderr=subprocess.STDOUT,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = None
    wall = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        what = f"timed out after {timeout:.0f} s" if code is None else f"exited with {code}"
        raise StageFailed(f"{stage} {what} (log: {log}):\n{tail}")
    seconds, rate = read_stage_timing(workspace / planned.timing) if planned.timing else (None, None)
    return StageResult(stage, ["python", "-m", *module_args], planned.images, wall, seconds, rate)


def _prepare_workspace(opts: SmokeOptions) -> Path:
    if opts.workdir is None:
        return Path(tempfile.mkdtemp(prefix="slimcore-seed-smoke-"))
    workspace = opts.workdir.resolve()
    if workspace.exists() and any(workspace.iterdir()):
        raise ParamsError(f"--workdir {workspace}: not empty; give a new or empty folder")
    workspace.mkdir(parents=True, exist_ok=True)
    return workspace


def run_smoke(opts: SmokeOptions) -> tuple[list[StageResult], dict[str, str], Path]:
    """Run every stage of the preset's pipeline at smoke size; (results, machine, workspace).

    The workspace is deleted afterwards unless ``opts.keep`` (and kept when a stage fails).
    """
    from slimcore_pipeline.synthetic import write_cifar

    nproc = opts.nproc or _gpu_count() or 1
    workspace = _prepare_workspace(opts)
    ok = False
    try:
        params = smoke_params(opts, workspace / "data", nproc)
        from slimcore_pipeline.cpumath import pin_isa

        pin_isa(params.runtime)  # before torch's first CPU op here, as each stage does: in-process runs match
        check_device(params.runtime, opts.allow_cpu, CPU_WHY)
        train_images = opts.train_images or train_images_default(params)
        if train_steps(train_images, params.train.batch_size, nproc) == 0:
            raise ParamsError(f"--train-images {train_images}: fewer than one batch of {params.train.batch_size} "
                              f"per process ({nproc} processes)")
        write_cifar(workspace / "data", params.data.name, train_images, opts.test_images)
        from slimcore_pipeline.data import load_splits

        splits = load_splits(params.data)  # the validation split is held out of the training images
        if len(splits.val) == 0:
            raise ParamsError(f"--train-images {train_images}: no validation split (data.val_fraction keeps each "
                              f"class's only image for training): give each of the {splits.num_classes} classes at "
                              "least 2 training images")
        if train_steps(len(splits.train), params.train.batch_size, nproc) == 0:
            raise ParamsError(f"--train-images {train_images}: after holding out {len(splits.val)} validation "
                              f"images, fewer than one batch of {params.train.batch_size} per process")
        (workspace / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
        machine = describe_machine(params)
        console.log(f"seed smoke in {workspace}: {machine['device']}, torch {machine['torch']} "
                    f"(CUDA {machine['cuda']}), AMP {machine['amp']}, channels_last {machine['channels_last']}, "
                    f"nproc {machine['nproc']}")
        console.log(f"{', '.join(params.archs)} at {params.data.image_size}px, width {params.model.width:g}, "
                    f"targets {', '.join(t.tag for t in params.prune.parsed_targets())}; synthetic {params.data.name}: "
                    f"{len(splits.train)} train / {len(splits.val)} val / {opts.test_images} test images, "
                    f"batch {params.train.batch_size} "
                    f"per process, {params.train.epochs} + {params.finetune.epochs} epochs (train, finetune)")
        results = []
        plan = stage_plan(params, len(splits.train), opts.test_images, len(splits.val))
        in_process = not opts.one_process_each and nproc == 1  # nproc > 1: training stages re-exec under torchrun
        console.log("stages run " + ("in this process (one Python and torch start-up for all; --subprocess: one "
                                     "process each, as DVC runs them)" if in_process else "as subprocesses"))
        for index, planned in enumerate(plan, 1):
            result = run_stage(workspace, index, planned, opts.stage_timeout, in_process)
            console.log(f"[{index}/{len(plan)}] {planned.name}: {result.wall_seconds:.1f} s")
            results.append(result)
        ok = True
        return results, machine, workspace
    finally:
        if ok and not opts.keep:
            shutil.rmtree(workspace, ignore_errors=True)
        elif not ok and opts.workdir is None and not any(workspace.glob("logs/*.log")):
            shutil.rmtree(workspace, ignore_errors=True)  # refused before any stage ran: nothing to look at


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def results_table(results: Sequence[StageResult], machine: dict[str, str]):  # type: ignore[no-untyped-def]
    """A rich table: one row per stage, then the total."""
    from rich.table import Table

    table = Table(title=f"seed smoke: {machine['device']}, torch {machine['torch']}, AMP {machine['amp']}, "
                        f"nproc {machine['nproc']}")
    for col in ("stage", "images", "wall s", "timed s", "images/s", "from"):
        table.add_column(col, justify="left" if col in ("stage", "from") else "right")
    for r in results:
        rate = r.images_per_second
        table.add_row(r.stage, "" if r.images is None else str(r.images), f"{r.wall_seconds:.1f}",
                      "" if r.timed_seconds is None else f"{r.timed_seconds:.1f}",
                      "" if rate is None else f"{rate:,.1f}" if rate < 100 else f"{rate:,.0f}",
                      r.source if rate is not None else "")
    table.add_row("total", "", f"{sum(r.wall_seconds for r in results):.1f}", "", "", "", style="bold")
    return table


def as_dict(result: StageResult) -> dict[str, Any]:
    """One stage's figures as plain JSON-able values."""
    return {**dataclasses.asdict(result), "images_per_second": result.images_per_second, "source": result.source}


TABLE_NOTES = (
    "wall s: the whole stage, checkpoint loads and saves included (as a subprocess: also Python, torch and "
    "CUDA start-up).",
    "timed s: from the stage's metrics/timings/ files, when it writes them.",
    "images: training stages = train images x epochs (their per-epoch test pass not counted); "
    "evaluate = test images x checkpoints evaluated.",
    "images/s: from metrics/timings/ when there, else images / timed s or wall s.",
)


def _split_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(EXIT_REFUSED)


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    preset: Annotated[Path, typer.Argument(help="preset file, validated like params.yaml")] = SEED_PRESET,
    image_size: Annotated[int | None, typer.Option(help="pixels (default: the preset's)")] = None,
    width: Annotated[float | None, typer.Option(help="model width multiplier (default: the preset's)")] = None,
    archs: Annotated[str | None, typer.Option(help="comma-separated archs (default: the preset's)")] = None,
    targets: Annotated[str | None, typer.Option(
        help="comma-separated prune targets: ratios, flopsF, paramsF, speedupS (default: the preset's)")] = None,
    train_images: Annotated[int | None, typer.Option(
        help=f"synthetic train images (default: {DEFAULT_STEPS} batches per process)")] = None,
    test_images: Annotated[int, typer.Option(help="synthetic test images")] = DEFAULT_TEST_IMAGES,
    batch_size: Annotated[int | None, typer.Option(
        help="per-process batch of train and finetune (default: the preset's)")] = None,
    nproc: Annotated[int | None, typer.Option(
        help="processes per training stage (default: the number of GPUs)")] = None,
    sets: Annotated[list[str] | None, typer.Option(
        "--set", "-S", help="KEY=VALUE on the smoke params, e.g. runtime.num_workers=2 (repeatable)")] = None,
    workdir: Annotated[Path | None, typer.Option(help="workspace folder (default: a new temporary one)")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="keep the workspace (models, metrics, logs)")] = False,
    allow_cpu: Annotated[bool, typer.Option("--allow-cpu", help="run without a CUDA GPU (shrink it!)")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the figures to this JSON file")] = None,
    one_process_each: Annotated[bool, typer.Option(
        "--subprocess", help="run each stage in its own process, as DVC does (always so with nproc > 1)")] = False,
) -> None:
    """Run the preset's whole pipeline on synthetic data for a few steps and print images/s per stage."""
    try:
        target_values = [parse_target(t).yaml_value for t in _split_list(targets) or []] or None
    except ValueError as err:
        _fail(f"--targets {targets!r}: {err}; e.g. 0.2,0.4 or flops0.5")
    try:
        opts = SmokeOptions(preset, image_size, width, _split_list(archs), target_values, train_images, test_images,
                            batch_size, nproc, parse_sets(sets or []), workdir, keep, allow_cpu,
                            one_process_each=one_process_each)
        results, machine, workspace = run_smoke(opts)
    except StageFailed as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    except SlimcoreError as err:
        _fail(str(err))
    console.print(results_table(results, machine))
    for note in TABLE_NOTES:
        console.print(note, soft_wrap=True, highlight=False)
    if keep:
        console.log(f"workspace kept: {workspace} (params.yaml, models/, metrics/, logs/)")
    if json_out is not None:
        json_out.write_text(json.dumps({"machine": machine, "stages": [as_dict(r) for r in results]}, indent=2) + "\n")


if __name__ == "__main__":
    app(prog_name="python -m slimcore_pipeline.seed_smoke")
