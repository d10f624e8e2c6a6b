"""Benchmark: how long slimming full-size ResNet-50 takes, slimcore vs torch-pruning.

Both prune the same model (torchvision resnet50, 100 classes, synthetic bimodal gammas as after
sparse training) at the same ratio, in the same process, in place, from a fresh copy each
repeat; the figure is the median wall time.  torch-pruning's BNScalePruner includes building its
DependencyGraph, as slimcore's `slim` does.

    .venv/bin/python bench/prune_speed.py [--arch resnet50] [--ratio 0.4] [--repeats 5] [--size 224]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch
import torch_pruning as tp
from torch import nn

from slimcore.models import build_model
from slimcore.prune import slim


def bimodal_gammas(model: nn.Module, zero_fraction: float = 0.5, seed: int = 0) -> nn.Module:
    """Sparse-trained-like BN scales: a fraction near zero, the rest in [0.5, 1]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                v = torch.rand(m.num_features, generator=g) * 0.5 + 0.5
                tiny = torch.rand(m.num_features, generator=g) < zero_fraction
                v[tiny] = torch.rand(int(tiny.sum()), generator=g) * 1e-4
                m.weight.copy_(v)
    return model


def time_slimcore(model: nn.Module, ratio: float, x: torch.Tensor, inplace: bool) -> tuple[float, int]:
    work = copy.deepcopy(model) if inplace else model
    gc.collect()  # the copy's garbage must not be collected inside the timed region
    start = time.perf_counter()
    pruned, _ = slim(work, ratio, x, inplace=inplace)
    elapsed = time.perf_counter() - start
    return elapsed, sum(p.numel() for p in pruned.parameters())


def time_torch_pruning(model: nn.Module, ratio: float, x: torch.Tensor) -> tuple[float, int]:
    work = copy.deepcopy(model)
    classifier = [m for m in work.modules() if isinstance(m, nn.Linear)][-1]
    gc.collect()
    start = time.perf_counter()
    pruner = tp.pruner.BNScalePruner(work, x, importance=tp.importance.BNScaleImportance(),
                                     global_pruning=True, pruning_ratio=ratio, ignored_layers=[classifier])
    pruner.step()
    elapsed = time.perf_counter() - start
    return elapsed, sum(p.numel() for p in work.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = bimodal_gammas(build_model(args.arch, 100).eval())
    x = torch.randn(1, 3, args.size, args.size)
    runs: dict[str, list[float]] = {"slimcore (inplace)": [], "slimcore (copy)": [], "torch-pruning BNScalePruner": []}
    params: dict[str, int] = {}
    for _ in range(args.repeats):  # interleaved, so machine load affects all alike
        for name, fn in (("slimcore (inplace)", lambda: time_slimcore(model, args.ratio, x, True)),
                         ("slimcore (copy)", lambda: time_slimcore(model, args.ratio, x, False)),
                         ("torch-pruning BNScalePruner", lambda: time_torch_pruning(model, args.ratio, x))):
            seconds, params[name] = fn()
            runs[name].append(seconds)
    print(f"{args.arch}, {args.size}px, ratio {args.ratio}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}:")
    medians = {name: statistics.median(t) for name, t in runs.items()}
    for name, med in medians.items():
        print(f"  {name:30s} {med:6.3f} s   (min {min(runs[name]):.3f}, max {max(runs[name]):.3f})  "
              f"params after {params[name] / 1e6:.2f}M")
    ratio = medians["slimcore (inplace)"] / medians["torch-pruning BNScalePruner"]
    print(f"  slimcore / torch-pruning: {ratio:.2f}x")


if __name__ == "__main__":
    main()
