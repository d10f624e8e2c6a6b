"""Benchmark: how long a FLOPs or parameters target takes against a plain ratio.

Full-size torchvision resnet50 (100 classes; ``--stem cifar`` for the stride-8 stem), synthetic
bimodal gammas as after sparse training (bench/prune_speed.py), slimmed from a fresh copy each
repeat, interleaved so that machine load affects every row alike; median wall time:

* ``slim(ratio)``: the plain ratio (one trace, one surgery);
* ``slim_to(ratio)``: the same through ``slim_to``, which adds thop's FLOPs count of the model
  before and after (the report's FLOPs and params fractions);
* ``slim_to(flopsF)`` / ``slim_to(paramsF)``: the ratio searched on the same trace, each
  candidate pruned, counted (thop at ``--size``, as the profile stage counts) and undone.

    PYTHONPATH=. .venv/bin/python bench/targets.py [--arch resnet50] [--size 224] [--ratio 0.4]
        [--flops 0.5] [--params 0.5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_speed import bimodal_gammas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--stem", default="imagenet", choices=["imagenet", "cifar"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--params", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from slimcore.models import build_model
    from slimcore.prune import slim, slim_to

    torch.manual_seed(0)
    model = bimodal_gammas(build_model(args.arch, 100, args.stem, 1.0).eval())
    x = torch.randn(1, 3, args.size, args.size)
    cases = {
        f"slim({args.ratio})": lambda: slim(model, args.ratio, x),
        f"slim_to({args.ratio})": lambda: slim_to(model, args.ratio, x),
        f"slim_to(flops{args.flops})": lambda: slim_to(model, f"flops{args.flops}", x),
        f"slim_to(params{args.params})": lambda: slim_to(model, f"params{args.params}", x),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    reports = {}
    slim(model, args.ratio, x)  # warm-up: first-call costs (imports, allocator) are not the target's
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            _, reports[name] = fn()
            times[name].append(time.perf_counter() - start)
    print(f"{args.arch} (width 1.0, {args.stem} stem), {args.size}px, {torch.get_num_threads()} threads, "
          f"bimodal gammas, median of {args.repeats}:")
    base = statistics.median(times[f"slim({args.ratio})"])
    print("| call | seconds (median) | min | x slim(ratio) | resolved ratio | FLOPs kept | params kept | steps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, t in times.items():
        r = reports[name]
        flops = f"{r.flops_fraction:.4f}" if r.flops_fraction is not None else "-"
        params = f"{r.params_fraction:.4f}" if r.params_fraction is not None else "-"
        print(f"| `{name}` | {statistics.median(t):.2f} | {min(t):.2f} | {statistics.median(t) / base:.1f}x "
              f"| {r.requested_ratio:.4f} | {flops} | {params} | {r.search_steps} |")


if __name__ == "__main__":
    main()
