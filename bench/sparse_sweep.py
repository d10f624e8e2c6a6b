"""Sparse-training variants side by side: how slimmable does each leave the model?

For each (arch, variant) it trains the sparse model from scratch on the pipeline's data
exactly as ``sparse-train`` does (params.yaml's data, model, train and seed), then reports:
test top-1 per epoch (and the largest epoch-to-epoch fall after warm-up), the share of
``slim``'s removal units whose group score is below 1e-2, and test top-1 after ``slim`` at each
ratio before any fine-tuning.  One JSON line per run on stdout (and a table at the end).

    PYTHONPATH=. .venv/bin/python bench/sparse_sweep.py --arch resnet50 \
        --variant l1:1e-2 --variant group:0.5:ramp=2

A variant is ``METHOD:STRENGTH[:key=value...]`` with keys ``ramp`` (epochs), ``target``, ``lr``, ``epochs``
``milestones`` (e.g. ``6/8``) and ``from`` (a checkpoint to start from instead of random init,
``ARCH`` replaced by the arch: ``from=models/ARCH/baseline.pt``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimcore.accuracy import evaluate
from slimcore.checkpoint import load_model
from slimcore.models import ModelSpec
from slimcore.penalty import PenaltySpec
from slimcore.prune import coupled_units, slim
from slimcore_pipeline.config import load_params
from slimcore_pipeline.data import load_splits, make_loader
from slimcore_pipeline.runtime import current_context
from slimcore_pipeline.train import Trainer


def parse_variant(text: str) -> dict:
    method, strength, *rest = text.split(":")
    out = {"method": method, "strength": float(strength), "ramp": 0.0}
    for kv in rest:
        key, value = kv.split("=")
        if key == "milestones":
            out[key] = [int(m) for m in value.split("/") if m]
        elif key == "from":
            out[key] = value  # a checkpoint to start from (e.g. models/ARCH/baseline.pt)
        else:
            out[key] = float(value)
    return out


def unit_scores(model: torch.nn.Module, example: torch.Tensor) -> torch.Tensor:
    """Per removal unit: max |gamma| over its BN layers (how ``slim`` scores with group_score=max)."""
    units = coupled_units(model, example)
    n = int(max(int(ids.max()) for _, ids in units) + 1)
    best = torch.zeros(n)
    for bn, ids in units:
        best.scatter_reduce_(0, ids, bn.weight.detach().abs().float(), reduce="amax")
    return best


def run(arch: str, variant: dict, ratios: list[float], params_path: str) -> dict:
    params = load_params(params_path)
    cfg = params.train
    if "lr" in variant:
        cfg = cfg.model_copy(update={"lr": variant["lr"]})
    if "epochs" in variant:
        cfg = cfg.model_copy(update={"epochs": int(variant["epochs"])})
    if "milestones" in variant:
        cfg = cfg.model_copy(update={"milestones": variant["milestones"]})
    torch.manual_seed(params.seed)
    splits = load_splits(params.data)
    choice = params.model_for(arch)
    if "from" in variant:
        model = load_model(variant["from"].replace("ARCH", arch), trusted=choice)  # the pipeline's own entry
    else:
        model = ModelSpec(choice.source, choice.name, splits.num_classes, choice.stem, choice.width,
                          choice.kwargs).build()
    size = params.data.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(params.seed))
    ctx = current_context(params.runtime)
    train = make_loader(splits.train, cfg.batch_size, train=True, seed=params.seed, runtime=params.runtime)
    test = make_loader(splits.test, 256, train=False, seed=params.seed, runtime=params.runtime)
    units = coupled_units(model, example) if variant["method"] == "group" else None
    start = time.perf_counter()
    penalty = PenaltySpec(variant["strength"], variant["method"], units, ramp_epochs=variant["ramp"],
                          target=variant.get("target", 0.0))
    trainer = Trainer(model, cfg, ctx, train, None, test_loader=test, desc=f"{arch}", penalty=penalty)
    history = trainer.fit()
    seconds = time.perf_counter() - start
    tops = [round(100 * h.test_top1, 2) for h in history]
    # every epoch after the warm-up against the one before it (the "no collapse" criterion)
    worst_fall = max([tops[i - 1] - tops[i] for i in range(max(1, cfg.warmup_epochs), len(tops))] or [0.0])
    scores = unit_scores(model, example)
    pruned = {}
    for r in ratios:
        small, rep = slim(model, r, example, **params.prune.model_dump(
            include={"round_to", "min_channels", "min_keep_fraction", "fold_constants", "group_score"}))
        pruned[str(r)] = {"top1": round(100 * evaluate(small, test)["top1"], 2),
                          "threshold": float(f"{rep.threshold:.3g}")}
    return {"arch": arch, "variant": variant, "sparse_top1": tops[-1], "curve": tops,
            "worst_fall": round(worst_fall, 2), "units_below_1e-2": round(float((scores < 1e-2).float().mean()), 3),
            "units_zero": round(float((scores == 0).float().mean()), 3), "pruned": pruned,
            "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", required=True)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--ratios", default="0.4,0.6,0.7")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    for arch in args.arch:
        for text in args.variant:
            row = run(arch, parse_variant(text), ratios, args.params)
            row["variant"] = text
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| arch | variant | sparse top-1 | worst fall | units <1e-2 | zero | "
          + " | ".join(f"pruned {r}" for r in ratios) + " | s |")
    for row in rows:
        print(f"| {row['arch']} | {row['variant']} | {row['sparse_top1']} | {row['worst_fall']} | "
              f"{row['units_below_1e-2']} | {row['units_zero']} | "
              + " | ".join(f"{row['pruned'][str(r)]['top1']} ({row['pruned'][str(r)]['threshold']})" for r in ratios)
              + f" | {row['seconds']} |")


if __name__ == "__main__":
    main()
