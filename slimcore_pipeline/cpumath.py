"""The CPU math's instruction set and thread count, pinned so that a stage writes the same bytes
on any x86-64 CPU with AVX2.

PyTorch picks its CPU kernels by the machine's best instruction set: ATen's vectorised kernels
(AVX-512 where there is AVX-512), oneDNN's convolutions (AVX-512, AMX) and MKL's GEMM (Linear
layers). Each sums in a different order per instruction set, so the same training on an AVX-512
Xeon and on an AVX2 laptop ends in different weights. Reductions split over threads sum in an
order that depends on the thread count, so that must be fixed too.

``runtime.cpu_isa: avx2`` (the default) caps all three at AVX2, through the variables they read
once, when first used: :func:`pin_isa` sets them before the stage imports torch (``params_for``
in ``stages/_common.py``; torchrun workers and DataLoader workers inherit them).
``runtime.threads`` fixes the thread count (params.yaml: 2; 0 leaves torch's default, one per
core, which ties the bytes to the machine). ``native`` leaves the variables as they are: the
fastest kernels of this CPU, bytes that differ between CPUs.

What this cannot pin (see README, "Reproducibility"): a CPU without AVX2 (ATen then runs its
scalar kernels), another architecture (aarch64) or another torch/oneDNN/MKL build, and oneDNN
blocking choices that follow the cache sizes of the CPU. GPU runs are unaffected by these
variables and not bitwise reproducible anyway.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping
from pathlib import Path

from slimcore_pipeline.config import RuntimeConfig

ISA_ENV: dict[str, dict[str, str]] = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels (batch norm, reductions, optimizer)
        "DNNL_MAX_CPU_ISA": "AVX2",  # oneDNN's convolutions and reorders
        "ONEDNN_MAX_CPU_ISA": "AVX2",  # (oneDNN reads this name first)
        "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility: its AVX2 code path
    },
}


def pin_isa(cfg: RuntimeConfig, environ: MutableMapping[str, str] | None = None) -> None:
    """Set the instruction-set variables of ``cfg.cpu_isa`` (nothing for ``native``).

    Call before torch's first CPU operation (ATen, oneDNN and MKL read them once): ``params_for``
    calls it before the stage imports torch. It overrides values already in the environment.
    """
    env = os.environ if environ is None else environ
    env.update(ISA_ENV.get(cfg.cpu_isa, {}))


def apply_threads(cfg: RuntimeConfig) -> None:
    """``torch.set_num_threads(cfg.threads)`` (0: left to :func:`slimcore_pipeline.runtime.current_context`, a fair
    share of the cores); torch must be importable."""
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if sys.platform.startswith("linux") and cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Processor", "cpu model") and value.strip():
                return " ".join(value.split())
    return platform.processor() or platform.machine() or "unknown CPU"


def check_pinned(cfg: RuntimeConfig) -> str | None:
    """Why this process's ATen kernels are not the pinned ones (None: they are, or not pinned).

    Not AVX2 under ``cpu_isa: avx2``: a CPU without AVX2 or not x86-64, or torch initialised
    before :func:`pin_isa` ran.
    """
    if cfg.cpu_isa == "native":
        return None
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX2":
        return None
    return (f"runtime.cpu_isa {cfg.cpu_isa}: torch runs its {capability} kernels on this {platform.machine()} "
            "CPU, so the results differ from those of an x86-64 CPU with AVX2")


def provenance(cfg: RuntimeConfig, device: str = "cpu") -> str:
    """One line naming the machine, torch and the math settings (results.md's last line)."""
    import torch

    if device == "cuda":
        return (f"Made on {torch.cuda.get_device_name()} (CUDA), torch {torch.__version__}: GPU kernels are not "
                "bitwise reproducible. This line names the machine, so it differs on another.\n")
    capability = torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    pinned = (f"CPU math pinned to AVX2 (ATen {capability}, oneDNN, MKL) with {threads} threads: the same "
              "bytes on any x86-64 CPU with AVX2 and this torch build" if cfg.cpu_isa == "avx2" else
              f"CPU math native (ATen {capability}) with {threads} threads: bytes tied to this CPU")
    return (f"Made on {cpu_name()} ({platform.machine()}), torch {torch.__version__}; {pinned}. "
            "This line names the machine, so it is the one line that differs on another.\n")


__all__ = ["ISA_ENV", "apply_threads", "check_pinned", "cpu_name", "pin_isa", "provenance"]
