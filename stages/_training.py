"""Training glue shared by ``baseline-train``, ``sparse-train`` and ``finetune``.

Kept out of ``_common`` so that stages which do not train (prune, profile, evaluate) do not
depend on the training loop in ``dvc.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from slimcore.config import Params
from stages._common import console, write_json


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


def relaunch_under_torchrun(params: Params, module: str) -> None:
    """With ``runtime.nproc > 1``, replace this process by ``torchrun`` running ``module`` N times.

    torchrun (``python -m torch.distributed.run --standalone``) starts the workers, sets
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
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *sys.argv[1:]]
    console.log(f"runtime.nproc={nproc}: relaunching under torchrun: {' '.join(argv[1:])}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


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


def train_to_checkpoint(params: Params, arch: str, run: str, out: Path, *, train_cfg: Any,
                        sparsity: float, init: Path | None = None, module: str) -> None:
    """Train a model (from scratch, or from the checkpoint ``init``) and save it to ``out``.

    Resumes from the run's last finished epoch if an earlier attempt was interrupted.  With
    ``runtime.nproc > 1`` the stage ``module`` first relaunches itself under torchrun.
    """
    relaunch_under_torchrun(params, module)
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
            # only what the same inputs reproduce exactly: no wall-clock figure goes in here
            save_model(out, model.cpu(), run=run, history=[vars(h) for h in history],
                       test_top1=final.test_top1 if final else None, sparsity=sparsity,
                       torch_version=str(torch.__version__))
            write_timings(paths.timings(arch, run), trainer.timings, ctx)
            state.unlink(missing_ok=True)
            console.log(f"{run}@{arch}: saved {out}")
        barrier(ctx)


__all__ = ["fingerprint", "relaunch_under_torchrun", "seed_everything", "train_to_checkpoint", "write_timings"]
