"""The same checkpoint bytes on another CPU: runtime.cpu_isa avx2 and a fixed runtime.threads.

One machine stands in for two: an x86-64 CPU with AVX2 only is what this CPU is when its kernels
are capped at AVX2 from outside (ATEN_CPU_CAPABILITY, DNNL_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS).
A training stage, run as users run it, writes the same ``baseline.pt`` pinned on this machine
(whatever it has: AVX-512, AMX) as natively on that AVX2 machine, whatever the machine's core
count says (OMP_NUM_THREADS). On a CPU with AVX-512 it also checks that the native kernels do
change the bytes, i.e. that the pinning is what makes them equal.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from slimcore_pipeline import cpumath
from slimcore_pipeline.config import RuntimeConfig
from tests.helpers.params import tiny_params

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vgg16_bn"
CKPT = Path("models") / ARCH / "baseline.pt"
MACHINE_ENV = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
               "OMP_NUM_THREADS", "MKL_NUM_THREADS")
AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

needs_avx2 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                reason="an x86-64 CPU with AVX2 is what the pinning targets")


def _train(tmp_path: Path, name: str, cpu_isa: str, env: dict[str, str]) -> str:
    """md5 of the ``baseline.pt`` that ``baseline-train`` writes in a fresh project (12 px, 2 epochs)."""
    project = tmp_path / name
    project.mkdir()
    params: dict[str, Any] = tiny_params(ARCH, {"epochs": 2, "warmup_epochs": 1, "milestones": [1], "batch_size": 32},
                                         {"device": "cpu", "threads": 2, "cpu_isa": cpu_isa},
                                         {"data.image_size": 12, "data.train_per_class": 40})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    full = {k: v for k, v in os.environ.items() if k not in (*MACHINE_ENV, "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update(env, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "stages.baseline_train", "--arch", ARCH], cwd=project, env=full,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return hashlib.md5((project / CKPT).read_bytes()).hexdigest()


@pytest.mark.slow  # three 2-epoch training runs: about 30 s each on 2 busy cores
@needs_avx2
def test_pinned_bytes_equal_native_bytes_of_an_avx2_machine(tmp_path: Path) -> None:
    # this machine as it is (its best kernels allowed, even asked for), one core's worth of threads
    here = _train(tmp_path, "here", "avx2", {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "ALL",
                                              "OMP_NUM_THREADS": "1"})
    # an AVX2-only machine running its own (native) kernels, 2 threads
    avx2 = _train(tmp_path, "avx2", "native", {**AVX2_MACHINE, "OMP_NUM_THREADS": "2"})
    assert here == avx2, "runtime.cpu_isa avx2 must write the bytes an AVX2 machine writes"
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        native = _train(tmp_path, "native", "native", {"OMP_NUM_THREADS": "2"})
        assert native != here, "AVX-512 kernels should sum in another order (else this test proves nothing)"


def test_pin_isa_sets_every_library_and_native_sets_nothing() -> None:
    env: dict[str, str] = {"ATEN_CPU_CAPABILITY": "avx512", "DNNL_MAX_CPU_ISA": "ALL"}
    cpumath.pin_isa(RuntimeConfig(cpu_isa="native"), env)
    assert env == {"ATEN_CPU_CAPABILITY": "avx512", "DNNL_MAX_CPU_ISA": "ALL"}
    cpumath.pin_isa(RuntimeConfig(), env)  # the default: avx2, overriding what was there
    assert env == {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                   "MKL_CBWR": "AVX2"}


def test_provenance_names_cpu_torch_and_settings() -> None:
    line = cpumath.provenance(RuntimeConfig())
    assert cpumath.cpu_name() in line and torch.__version__ in line and "AVX2" in line
    assert line.endswith("\n") and line.count("\n") == 1
