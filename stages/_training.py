"""Training glue shared by ``baseline-train``, ``sparse-train`` and ``finetune``.

Kept out of ``_common`` so that stages which do not train (prune, profile, evaluate) do not
depend on the training loop in ``dvc.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from slimcore.errors import ParamsError
from slimcore_pipeline.config import Params
from stages._common import console, write_json

if TYPE_CHECKING:
    from torch import nn


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


CODE_ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("slimcore", "slimcore_pipeline", "stages")  # what code_signature hashes


def code_signature() -> str:
    """A hash of the engine's, the pipeline's and the stages' source: a resume state written by
    other code (an upgrade, a local edit) is never continued."""
    h = hashlib.sha256()
    for folder in CODE_FOLDERS:
        for path in sorted((CODE_ROOT / folder).rglob("*.py")):
            h.update(str(path.relative_to(CODE_ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def data_signature(root: str | Path) -> str:
    """A cheap hash of the dataset folder: every file's path, size and modification time (no
    contents read), so that a resume never continues on changed data; ``-`` when it is absent."""
    folder = Path(root)
    if not folder.is_dir():
        return "-"
    h = hashlib.sha256()
    for here, dirs, files in os.walk(folder):  # symlinked folders are not entered: no loop can hang it
        dirs.sort()
        for name in sorted(files):
            path = Path(here) / name
            try:
                info = path.stat()
                stamp = f"{info.st_size}\0{info.st_mtime_ns}"
            except OSError:  # a dangling link: the data stage refuses it with its own message
                stamp = "unreadable"
            h.update(f"{path.relative_to(folder)}\0{stamp}\n".encode())
    return h.hexdigest()[:16]


def inputs_fingerprint(params: Params, arch: str, init: Path | None, weights: Path | None, *parts: Any) -> str:
    """:func:`fingerprint` of what a training run of ``arch`` reads, and ``parts``: every params section
    but ``prune`` and ``profile``, the start checkpoint and weights file (by content), the project's
    code and the data folder. The resume state and the kept sparse runs (``stages/_reuse.py``) use it."""
    return fingerprint(params.model_dump(exclude={"prune", "profile"}), arch,
                       init if init is not None else "scratch", weights if weights is not None else "no weights",
                       code_signature(), data_signature(params.data.root), *parts)


def fingerprint(*parts: Any) -> str:
    """A stable hash of settings and input files: resume only a run with the same inputs."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def relaunch_under_torchrun(params: Params, module: str) -> None:
    """With ``runtime.nproc > 1``, replace this process by ``torchrun`` running ``module`` N times.

    torchrun (``python -m slimcore_pipeline.launch --standalone``: torchrun that exits 130 when stopped)
    starts the workers, sets
    RANK/WORLD_SIZE/LOCAL_RANK and forwards signals; each worker re-enters the stage, finds
    those variables and trains its shard under DistributedDataParallel.  A stage already
    started by torchrun (e.g. by hand, multi-node) never relaunches.
    """
    nproc = params.runtime.nproc
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return
    import torch

    if params.runtime.device != "cpu" and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        from slimcore.errors import ParamsError

        raise ParamsError(f"runtime.nproc: {nproc} processes but {torch.cuda.device_count()} GPU(s); "
                          "use at most one process per GPU")
    # slimcore_pipeline.launch: torchrun, ending in exit 130 without a traceback when stopped
    argv = [sys.executable, "-m", "slimcore_pipeline.launch", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *sys.argv[1:]]
    console.log(f"runtime.nproc={nproc}: relaunching under torchrun: {' '.join(argv[1:])}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


class Start(NamedTuple):
    """Where a training run starts: a checkpoint to continue (``init``), else a freshly built model,
    initialised from a weights file (``weights``) or randomly (both None)."""

    init: Path | None = None
    weights: Path | None = None

    def describe(self) -> str:
        """Where the weights come from, for messages (a file, or random init)."""
        return str(self.init or self.weights or "random init")


def start_of(params: Params, arch: str, run: str) -> Start:
    """Where ``baseline-train`` / ``sparse-train`` of ``arch`` start.

    baseline-train: ``model.weights``' file for the arch, or random init when the folder has none.
    sparse-train: ``model.sparse_start``: ``scratch`` (random init), ``baseline`` (the trained
    ``models/ARCH/baseline.pt``) or ``weights`` (the arch's weights file, which must exist).
    """
    from slimcore.weights import weights_file
    from slimcore_pipeline import paths

    if run == "baseline-train":
        return Start(weights=weights_file(params.model.weights, arch))
    start = params.model.sparse_start
    if start == "baseline":
        baseline = paths.checkpoint(arch, "baseline")
        if not baseline.is_file():
            raise ParamsError(f"model.sparse_start: baseline, but {baseline} does not exist "
                              f"(run baseline-train@{arch})")
        return Start(init=baseline)
    if start == "weights":
        found = weights_file(params.model.weights, arch)
        if found is None:
            raise ParamsError(f"model.sparse_start: weights, but {params.model.weights}/ holds no {arch}.pt or "
                              f"{arch}.pth")
        return Start(weights=found)
    return Start()


def starting_model(params: Params, arch: str, num_classes: int, start: Start) -> tuple[nn.Module, str]:
    """The model a run trains (built through ``models``, or loaded from ``start.init``) and a log line."""
    from slimcore.checkpoint import load_model
    from slimcore.models import ModelSpec
    from slimcore.weights import load_weights

    choice = params.model_for(arch)
    if start.init is not None:  # its classes are checked against the data by the caller
        model = load_model(start.init, expected_arch=choice.arch, trusted=choice)  # the pipeline's own entry
        return model, f"continues from {start.init}"
    model = ModelSpec(choice.source, choice.name, num_classes, choice.stem, choice.width, choice.kwargs).build()
    if start.weights is not None:
        return model, load_weights(model, start.weights).message()
    return model, "random init"


def write_timings(path: Path, timings: list[Any], ctx: Any) -> None:
    """The run's wall-clock figures (``metrics/timings/ARCH/RUN.json``), apart from its checkpoint."""
    seconds = sum(t.seconds for t in timings)
    images = sum(t.images for t in timings)
    write_json(path, {
        "device": str(ctx.device), "processes": ctx.world_size, "amp": str(ctx.amp_dtype or "off"),
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 1) if seconds > 0 else None,
        "epochs": [{"epoch": t.epoch, "seconds": round(t.seconds, 3), "images": t.images,
                    "images_per_second": round(t.images_per_second, 1)} for t in timings],
    })


CHANCE_MARGIN_PT = 5.0  # a final validation (or test) top-1 this close to chance (or below it) gets a warning


def near_chance(top1: float, num_classes: int, margin_pt: float = CHANCE_MARGIN_PT) -> bool:
    """True when ``top1`` (a fraction) is within ``margin_pt`` points of chance (100/num_classes %) or below.

    NaN (that split not evaluated) is never near chance.
    """
    if math.isnan(top1) or num_classes < 2:
        return False
    return 100 * top1 < 100 / num_classes + margin_pt


def chance_warning(run: str, arch: str, *, top1: float, train_top1: float, num_classes: int,
                   section: str, epochs: int, lr: float, augment: str, image_size: int,
                   dataset: str, split: str = "validation") -> str | None:
    """The warning a training stage prints when its model ended near chance, naming likely causes.

    ``top1`` is the last epoch's top-1 on ``split`` (``validation``, or ``test`` when only that
    was evaluated); ``section`` is the params section that set the schedule (``train`` or
    ``finetune``); ``augment`` the augmentation actually applied (``data.augment`` resolved).
    """
    if not near_chance(top1, num_classes):
        return None
    chance = 100 / num_classes
    causes = [f"too few epochs ({section}.epochs = {epochs}; raise it, and {section}.milestones with it)",
              f"the learning rate ({section}.lr = {lr:g}: too high diverges, too low barely moves)"]
    if augment != "none":
        causes.append(f"augmentation too strong for {image_size}px images or this few epochs "
                      f"(data.augment resolves to {augment}; try crop+flip, flip or none)")
    if dataset == "imagefolder":
        causes.append("labels: data.root/train/<class>/ and data.root/val/<class>/ must hold the same "
                      "classes, one folder per class, each image in its own class's folder")
    if not near_chance(train_top1, num_classes):  # it learned the training set but not the held-out one
        causes.insert(0, f"train top-1 is {100 * train_top1:.1f}%: the {split} images may not match the "
                         "training ones (labels, folders, preprocessing) or the model overfits")
    from slimcore_pipeline.paths import stage_name

    return (f"{stage_name(run, arch)}: {split} top-1 {100 * top1:.1f}% is within {CHANCE_MARGIN_PT:g} pt of "
            f"chance ({chance:.1f}% for {num_classes} classes); likely causes: " + "; ".join(causes))


def data_summary(splits: Any, eval_test: bool, section: str) -> str:
    """The stage log's line about the data: split sizes, what each epoch evaluates, and the
    normalisation statistics (also stored in the checkpoint's ``meta.normalization``)."""
    norm = splits.normalization
    stats = (f"; normalised with mean {norm['mean']} std {norm['std']}" if norm else "")
    evaluated = " + ".join([*(["val"] if len(splits.val) else []), *(["test"] if eval_test else [])]) or \
        f"nothing (no validation images; {section}.eval_test: true evaluates the test split)"
    return (f"data {splits.name}: {len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test images; "
            f"each epoch evaluates {evaluated}{stats}")


def train_to_checkpoint(params: Params, arch: str, run: str, out: Path, *, train_cfg: Any,
                        strength: float, init: Path | None = None, weights: Path | None = None,
                        module: str, units: Callable[[nn.Module], Any] | None = None,
                        penalty_target: Callable[[nn.Module], float] | None = None,
                        meta_run: str | None = None) -> None:
    """Train a model and save it to ``out``: from the checkpoint ``init``, else built through
    params' ``models`` and initialised from the ``weights`` file (random init without one).

    ``strength``: the penalty's (0: no penalty); ``units`` gives its coupled channels (from the starting model) and
    ``penalty_target`` the share of BN channels it shrinks, re-resolved from the model at the
    start of every epoch (sparse-train with ``penalty.target: auto`` only). ``meta_run``: the run
    the checkpoint records (default ``run``; every sparse-train-T records ``sparse-train``).
    Resumes from the run's last finished epoch if an earlier attempt was interrupted (only with
    the same settings, arch, start checkpoint and weights file).  With ``runtime.nproc > 1`` the
    stage ``module`` first relaunches itself under torchrun.
    """
    from slimcore_pipeline import paths
    from slimcore_pipeline.resources import check_writable

    check_writable(out.parent, paths.curves(arch, run), paths.timings(arch, run).parent,
                   paths.resume_state(arch, run).parent)
    relaunch_under_torchrun(params, module)
    import torch

    from slimcore.checks import check_finite
    from slimcore.models import spec_of
    from slimcore.penalty import PenaltySpec
    from slimcore_pipeline.data import check_num_classes, load_splits, make_loader
    from slimcore_pipeline.process import save_model
    from slimcore_pipeline.resources import check_batch_size, check_disk, tensor_bytes
    from slimcore_pipeline.runtime import barrier, current_context, distributed
    from slimcore_pipeline.train import Trainer

    ctx = current_context(params.runtime)
    with distributed(ctx):
        seed_everything(params.seed)
        splits = load_splits(params.data)
        start = Start(init, weights)
        section = "finetune" if run.startswith("finetune") else "train"
        check_batch_size(f"{section}.batch_size", train_cfg.batch_size, ctx.world_size, len(splits.train))
        model, how = starting_model(params, arch, splits.num_classes, start)
        check_finite(model, start.describe())  # broken weights: not a learning-rate problem
        # the checkpoint, and the resume state beside it (weights + momentum + optimizer state)
        check_disk(out.parent, tensor_bytes(model), f"the checkpoint {out}")
        check_disk(paths.resume_state(arch, run).parent, 3 * tensor_bytes(model), "the resume state")
        if init is not None:
            check_num_classes(splits, spec_of(model).num_classes, str(init))
        if ctx.is_main:
            console.log(f"{paths.stage_name(run, arch)}: {params.model_for(arch).arch}, {how}")
            console.log(data_summary(splits, train_cfg.eval_test, section))
            for note in splits.notes:
                console.print(f"[yellow]note:[/] {note}")
        train = make_loader(splits.train, train_cfg.batch_size, train=True, seed=params.seed,
                            runtime=params.runtime, rank=ctx.rank, world_size=ctx.world_size,
                            device=ctx.device.type)
        # evaluated after every epoch: the validation split, and the test split only when asked
        val, test = (make_loader(part, max(256, train_cfg.batch_size), train=False, seed=params.seed,
                                 runtime=params.runtime, device=ctx.device.type) if len(part) else None
                     for part in (splits.val, splits.test if train_cfg.eval_test else []))
        coupled = units(model) if units is not None and strength > 0 else None
        # penalty.target auto: re-resolved from the model at the start of every epoch (the set of
        # channels the penalty zeroes drifts, and with it the MACs they hold)
        retarget = penalty_target if penalty_target is not None and strength > 0 else None
        # a fixed share; none without a penalty, and none for auto (retarget sets it) or auto under l1
        target = params.penalty.target
        share = float(target) if strength > 0 and target != "auto" else 0.0
        penalty = PenaltySpec(strength, params.penalty.method, coupled, ramp_epochs=params.penalty.ramp_epochs,
                              target=share, close_epochs=params.penalty.close_epochs)
        trainer = Trainer(model, train_cfg, ctx, train, val, desc=paths.stage_name(run, arch), penalty=penalty,
                          test_loader=test, retarget=retarget)
        # files (Path) are hashed by content: a resume never mixes a changed start or weights file
        key = inputs_fingerprint(params, arch, init, weights, run, strength,
                                 params.prune.model_dump() if retarget else None)
        state = paths.resume_state(arch, run)
        history = trainer.fit(state_path=state, fingerprint=key, curves_dir=paths.curves(arch, run))
        if ctx.is_main:
            final = history[-1] if history else None
            # only what the same inputs reproduce exactly: no wall-clock figure goes in here
            # (the strength goes in as meta "sparsity", the key every earlier checkpoint has)
            save_model(out, model.cpu(), run=meta_run or run, history=[vars(h) for h in history],
                       val_top1=final.val_top1 if final else None, test_top1=final.test_top1 if final else None,
                       sparsity=strength, normalization=splits.normalization, torch_version=str(torch.__version__))
            write_timings(paths.timings(arch, run), trainer.timings, ctx)
            state.unlink(missing_ok=True)
            console.log(f"{paths.stage_name(run, arch)}: saved {out}")
            split, top1 = ("test", final.test_top1) if final and math.isnan(final.val_top1) else \
                ("validation", final.val_top1 if final else math.nan)
            warning = final and chance_warning(
                run, arch, top1=top1, train_top1=final.train_top1,
                num_classes=splits.num_classes, section=section,
                epochs=train_cfg.epochs, lr=train_cfg.lr, augment=params.data.augmentation(),
                image_size=params.data.image_size, dataset=params.data.name, split=split)
            if warning:
                console.print(f"[yellow]warning:[/] {warning}")
        barrier(ctx)


__all__ = ["CHANCE_MARGIN_PT", "Start", "chance_warning", "code_signature", "data_signature", "data_summary",
           "fingerprint", "inputs_fingerprint",
           "near_chance", "relaunch_under_torchrun", "seed_everything", "start_of", "starting_model",
           "train_to_checkpoint", "write_timings"]
