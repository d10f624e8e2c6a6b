"""Benchmark: the cost of pinning the CPU math (runtime.cpu_isa avx2, runtime.threads 2) vs today's
native kernels (this CPU's best instruction set, torch's default thread count).

The variables that pin the instruction set are read once per process, so every variant runs in a
fresh subprocess; variants alternate within each round so that machine load hits all alike, and
each figure is the median over rounds of the mean time of a training step (forward, loss,
backward, SGD step; the steps after one warm-up step) on the default model: the pipeline's
``model`` section (stem cifar, width 0.125) at 16 px, batch 64, 10 classes. Each subprocess also
prints the sha256 of its final weights, so the table shows which settings give which bytes.

    .venv/bin/python bench/determinism.py                            # vgg16_bn, 3 rounds of 10 steps
    .venv/bin/python bench/determinism.py --arch resnet50 --arch mobilenet_v2 --rounds 5
    .venv/bin/python bench/determinism.py --threads 1       # the instruction set's cost alone, one core

"native ISA, N threads" separates the two costs: the thread count's and the instruction set's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ISA_VARS = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")
TODAY = "today: native ISA, default threads"


def variants(threads: int) -> dict[str, tuple[str, int]]:
    """label -> (runtime.cpu_isa, runtime.threads): what the stages do with these params."""
    return {TODAY: ("native", 0), f"native ISA, {threads} threads": ("native", threads),
            f"pinned: avx2, {threads} threads": ("avx2", threads)}


def worker(arch: str, cpu_isa: str, threads: int, steps: int, size: int, batch: int) -> None:
    from slimcore_pipeline import cpumath
    from slimcore_pipeline.config import RuntimeConfig

    cfg = RuntimeConfig(cpu_isa=cpu_isa, threads=threads)  # type: ignore[arg-type]
    cpumath.pin_isa(cfg)  # as params_for does: before torch
    import torch
    from torch import nn

    from slimcore.models import build_model

    cpumath.apply_threads(cfg)
    torch.manual_seed(0)
    model = build_model(arch, 10, stem="cifar", width=0.125)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
               for _ in range(steps + 1)]
    model.train()
    start = 0.0
    for i, (x, y) in enumerate(batches):
        if i == 1:
            start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    ms = (time.perf_counter() - start) / steps * 1000
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    print(json.dumps({"ms": ms, "sha256": digest.hexdigest()[:16], "isa": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads()}))


def run_variant(arch: str, cpu_isa: str, threads: int, args: argparse.Namespace) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ISA_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--worker", arch, cpu_isa, str(threads), "--steps", str(args.steps),
           "--size", str(args.size), "--batch", str(args.batch)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="repeatable (default: vgg16_bn)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="runtime.threads of the pinned variant (params.yaml: 2)")
    parser.add_argument("--worker", nargs=3, metavar=("ARCH", "CPU_ISA", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        arch, cpu_isa, threads = args.worker
        worker(arch, cpu_isa, int(threads), args.steps, args.size, args.batch)
        return

    from slimcore_pipeline.cpumath import cpu_name

    print(f"{cpu_name()}, {os.cpu_count()} CPUs; {args.rounds} rounds x {args.steps} steps, "
          f"batch {args.batch} at {args.size}px")
    pinned = variants(args.threads)
    for arch in args.arch or ["vgg16_bn"]:
        times: dict[str, list[float]] = {label: [] for label in pinned}
        seen: dict[str, set[str]] = {label: set() for label in pinned}
        info: dict[str, str] = {}
        for r in range(args.rounds):
            labels = list(pinned) if r % 2 == 0 else list(reversed(pinned))
            for label in labels:
                got = run_variant(arch, *pinned[label], args)
                times[label].append(float(got["ms"]))  # type: ignore[arg-type]
                seen[label].add(str(got["sha256"]))
                info[label] = f"ATen {got['isa']}, {got['threads']} threads"
        base = statistics.median(times[TODAY])
        for label in pinned:
            med = statistics.median(times[label])
            print(f"{arch:14s} {label:36s} {info[label]:24s} median {med:8.1f} ms/step  "
                  f"x{med / base:.2f}  sha256 {', '.join(sorted(seen[label]))}")


if __name__ == "__main__":
    main()
