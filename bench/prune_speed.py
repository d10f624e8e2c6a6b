"""Benchmark: how long slimming full-size ResNet-50 takes, slimcore vs torch-pruning.

Both prune the same model (torchvision resnet50, 100 classes, synthetic bimodal gammas as after
sparse training) at the same ratio, in the same process, in place, from a fresh copy each
repeat; the figure is the median wall time.  torch-pruning's BNScalePruner includes building its
DependencyGraph, as slimcore's `slim` does.

    .venv/bin/python bench/prune_speed.py [--arch resnet50] [--ratio 0.4] [--repeats 5] [--size 224]

With ``--timm [NAME ...]`` (default: TIMM_MODELS, a spread of timm's BN CNN families) it prints one row per timm model
instead: BN channels, prunable ones, removed share of all BN channels, skipped groups, slimcore's
seconds, torch-pruning's seconds and status (ok / crashed / timeout / broken: the returned model
does not run or gives another output shape), and the ratio of the two times.  torch-pruning runs
in a child process with ``--tp-timeout`` seconds.

    PYTHONPATH=. .venv/bin/python bench/prune_speed.py --timm [NAME ...] [--size 224] [--tp-timeout 120] [--repeats 3]

With ``--repeats N`` both alternate N times per model and the fastest of each is shown (robust to
other load on the machine).  Both times include building the DependencyGraph (one traced forward
pass) and the surgery; slimcore's also include folding constants and checking the pruned model.
"""

from __future__ import annotations

import argparse
import copy
import gc
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

# slimcore is imported inside the functions that use it: its first graph patches torch-pruning's
# split/concat index mapping (slimcore.tp_compat), and the torch-pruning child process must time
# torch-pruning as released.


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
    from slimcore.prune import slim

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


TIMM_MODELS = ["resnet50d", "seresnet50", "resnext26ts", "regnetx_002", "regnety_004", "efficientnet_b0",
               "mobilenetv3_large_100", "densenet121", "ghostnet_100", "hrnet_w18_small", "cspresnet50",
               "cspdarknet53", "res2net50_26w_4s", "dpn68", "rexnet_100", "mixnet_s", "ecaresnet26t"]


def _timm_model(name: str) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return bimodal_gammas(timm.create_model(name, pretrained=False, num_classes=100).eval(), 0.45)


def _tp_child(name: str, ratio: float, size: int, threads: int, queue: mp.Queue) -> None:
    torch.set_num_threads(threads)
    model = _timm_model(name)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = model(x).shape
    classifier = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]  # DPN: a 1x1 conv
    assert "slimcore" not in sys.modules, "the torch-pruning child must not import slimcore (its graphs patch tp)"
    gc.collect()
    start = time.perf_counter()
    try:
        pruner = tp.pruner.BNScalePruner(model, x, importance=tp.importance.BNScaleImportance(),
                                         global_pruning=True, pruning_ratio=ratio, ignored_layers=[classifier])
        pruner.step()
    except Exception as err:
        queue.put(("crashed", None, f"{type(err).__name__}"))
        return
    seconds = time.perf_counter() - start
    try:
        with torch.no_grad():
            ok = model(x).shape == expected
    except Exception:
        ok = False
    queue.put(("ok" if ok else "broken", seconds, ""))


def time_torch_pruning_isolated(name: str, ratio: float, size: int, timeout: float) -> tuple[str, float | None]:
    """torch-pruning's time on a timm model in a child process (status, seconds)."""
    ctx = mp.get_context("spawn")  # fork after torch used threads can deadlock
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_tp_child, args=(name, ratio, size, torch.get_num_threads(), queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return "timeout", None
    if queue.empty():
        return "crashed", None
    status, seconds, _ = queue.get()
    return status, seconds


def _slimcore_once(name: str, ratio: float, size: int) -> tuple[float, Any]:
    """slimcore's seconds and report on a fresh timm model (after a warm-up forward, as the
    torch-pruning child does before its timing)."""
    from slimcore.prune import slim

    model = _timm_model(name)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        model(x)
    gc.collect()
    start = time.perf_counter()
    _, report = slim(model, ratio, x, inplace=True)
    return time.perf_counter() - start, report


def timm_table(names: list[str], ratio: float, size: int, tp_timeout: float, repeats: int = 1) -> None:
    """One row per timm model: coverage of slimcore and both times (see the module doc).

    With ``repeats`` > 1, slimcore and the torch-pruning child alternate ``repeats`` times and
    each column is the fastest run (the least disturbed by other load on the machine)."""
    print(f"timm models, {size}px, ratio {ratio}, {torch.get_num_threads()} threads, bimodal gammas (45% ~0), "
          f"best of {repeats}\n")
    print("| model | BN channels | prunable | removed / all BN | skipped groups (BN ch) | slimcore s "
          "| torch-pruning s | slimcore / tp |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        ours: list[float] = []
        theirs: list[float] = []
        status, cells = "-", ["-"] * 5
        for _ in range(repeats):
            try:
                seconds, report = _slimcore_once(name, ratio, size)
                ours.append(seconds)
                cells = [f"{report.total_bn_channels}", f"{report.prunable_bn_channels}",
                         f"{report.ratio_all_bn:.3f}",
                         f"{sum(1 for s in report.skipped if s['channels'])} ({report.skipped_bn_channels})",
                         f"{min(ours):.2f}"]
            except Exception as err:
                cells = ["-", "-", "-", f"error: {type(err).__name__}: {str(err)[:80]}", "-"]
            if status in ("crashed", "timeout"):  # torch-pruning is not tried again
                continue
            status, seconds_tp = time_torch_pruning_isolated(name, ratio, size, tp_timeout)
            if seconds_tp is not None:
                theirs.append(seconds_tp)
        tp_cell = f"{min(theirs):.2f} ({status})" if theirs else f"- ({status})"
        rel = f"{min(ours) / min(theirs):.2f}x" if ours and theirs else "-"
        print(f"| {name} | " + " | ".join([*cells, tp_cell, rel]) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=5, help="(with --timm: default 1) runs, best taken")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--timm", nargs="*", default=None, help="timm model names (none given: TIMM_MODELS)")
    parser.add_argument("--tp-timeout", type=float, default=120.0)
    args = parser.parse_args()
    if args.timm is not None and "--repeats" not in sys.argv:
        args.repeats = 1
    if args.timm is not None:
        timm_table(args.timm or TIMM_MODELS, args.ratio, args.size, args.tp_timeout, args.repeats)
        return
    from slimcore.models import build_model

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
