"""Where and how tensors are computed: device, mixed precision, threads and torch.distributed.

Training stages run as one process, or as ``torchrun --standalone --nproc_per_node N`` workers
when ``runtime.nproc > 1``; :func:`current_context` reads torchrun's environment either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from slimcore_pipeline.config import RuntimeConfig


@dataclass(frozen=True)
class Context:
    """The resolved runtime of this process."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes checkpoints, metrics and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def use_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Autocast region for forward passes (a no-op in full precision)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def evaluate(model: torch.nn.Module, loader: Any, ctx: Context | None = None) -> dict[str, float]:
    """:func:`slimcore.accuracy.evaluate` on ``ctx``'s device, memory format and precision (``None``:
    the model's device, full precision)."""
    from slimcore.accuracy import evaluate as accuracy

    if ctx is None:
        return accuracy(model, loader)
    return accuracy(model, loader, ctx.device, channels_last=ctx.channels_last, amp_dtype=ctx.amp_dtype)


def _resolve_device(cfg: RuntimeConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("runtime.device: cuda requested but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _resolve_amp(cfg: RuntimeConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None  # AMP is a GPU feature here: CPU runs stay in fp32 (and bit-reproducible)
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


STAGE_MARK = "-m stages."  # how the command line of a pipeline stage reads (dvc.yaml's cmd)


def running_stages() -> int:
    """Pipeline stage processes running on this machine now (this one included): every
    ``python -m stages.X`` in ``/proc``, whichever workspace, queue worker or experiment runs it.
    Torchrun's workers of one stage count once each. 1 where ``/proc`` cannot be read."""
    count = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = open(f"/proc/{entry.name}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                count += STAGE_MARK in cmdline and "python" in cmdline.split(" ", 1)[0]
    return max(count, 1)


def fair_threads(world: int = 1, cores: int | None = None, running: int | None = None) -> tuple[int, str]:
    """runtime.threads 0: this process's fair share of the cores, and why.

    The cores (those this process may use) divided by the stage processes running now (queued
    experiments run stages side by side: ``dvc exp run --run-all -j N``, ``dvc queue start -j N``)
    and by the processes of this stage (``runtime.nproc``); at least 1. Oversubscribing costs far
    more than it gains: on 2 busy cores, two concurrent training processes ran ~10x faster with 1
    thread each than with 2 (docs/performance.md).
    """
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    running = running if running is not None else running_stages()
    share = max(1, cores // max(running, world, 1))
    return share, f"{cores} cores / {max(running, world, 1)} running stage processes"


def current_context(cfg: RuntimeConfig) -> Context:
    """Resolve the runtime settings for this process (reads torchrun's RANK/WORLD_SIZE)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(cfg, local_rank)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    else:
        torch.set_num_threads(fair_threads(world)[0])
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
    return Context(device, _resolve_amp(cfg, device), channels_last, rank, world, local_rank)


@contextlib.contextmanager
def distributed(ctx: Context) -> Iterator[None]:
    """Initialise and tear down the process group when running under torchrun."""
    if not ctx.distributed or dist.is_initialized():
        yield
        return
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(backend=backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], ctx: Context) -> list[float]:
    """Sum scalars across ranks (identity in a single process)."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(ctx: Context) -> None:
    """Wait for all ranks (no-op in a single process)."""
    if ctx.distributed:
        dist.barrier()
