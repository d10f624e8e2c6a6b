"""Benchmark: what the slimming penalty and the BN recalibration cost per training epoch.

Trains the default's model of one arch (params.yaml: data, model, train) for one epoch under each
setting, interleaved and repeated so that machine load affects every row alike, and prints the
median seconds per epoch and the ratio to the first row:

* ``l1, no recal``: the paper's subgradient, no precise BN (the pipeline's first recipe);
* ``l1, recal 8``: + BN statistics re-estimated from 8 batches after the epoch;
* ``group, recal 8``: the default penalty (group-proximal, targeted) + recalibration.

    PYTHONPATH=. .venv/bin/python bench/penalty_cost.py [--arch resnet50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimcore.models import ModelSpec
from slimcore.penalty import PenaltySpec
from slimcore.prune import coupled_units
from slimcore_pipeline.config import load_params
from slimcore_pipeline.data import load_splits, make_loader
from slimcore_pipeline.runtime import current_context
from slimcore_pipeline.train import Trainer

SETTINGS = [("l1, no recal", "l1", 0), ("l1, recal 8", "l1", 8), ("group, recal 8", "group", 8)]


def epoch_seconds(arch: str, method: str, recal: int) -> float:
    params = load_params()
    cfg = params.train.model_copy(update={"epochs": 1, "warmup_epochs": 0, "milestones": [],
                                          "bn_recalibrate_batches": recal})
    torch.manual_seed(params.seed)
    splits = load_splits(params.data)
    choice = params.model_for(arch)
    model = ModelSpec(choice.source, choice.name, splits.num_classes, choice.stem, choice.width,
                      choice.kwargs).build()
    size = params.data.image_size
    units = coupled_units(model, torch.zeros(2, 3, size, size)) if method == "group" else None
    train = make_loader(splits.train, cfg.batch_size, train=True, seed=params.seed, runtime=params.runtime)
    penalty = PenaltySpec(params.penalty.strength[arch], method, units,
                          target=params.penalty.target if method != "l1" else 0.0)
    trainer = Trainer(model, cfg, current_context(params.runtime), train, None, desc=arch, penalty=penalty)
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name, _, _ in SETTINGS}
    epoch_seconds(args.arch, "l1", 0)  # warm-up: imports, allocator
    for _ in range(args.repeats):
        for name, method, recal in SETTINGS:
            times[name].append(epoch_seconds(args.arch, method, recal))
    first = statistics.median(times[SETTINGS[0][0]])
    print(f"| {args.arch}: setting | s / epoch (median of {args.repeats}) | vs first |")
    print("|---|---:|---:|")
    for name, _, _ in SETTINGS:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.2f} | {med / first:.2f}x |")


if __name__ == "__main__":
    main()
