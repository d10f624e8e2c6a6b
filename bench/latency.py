"""Benchmark: CPU latency of full-size baseline vs slimmed models, next to the FLOPs they save.

For each arch (torchvision's, 224 px, 100 classes) the model gets sparse-trained-like bimodal
gammas (as in bench/prune_speed.py), is slimmed at ``--ratio`` twice (``round_to=1``: exact
ratio, odd channel counts; ``round_to=8``: kept channels multiples of 8, SIMD-friendly), and
the three models are timed in interleaved rounds (median) at batch 1 and batch 32.

    .venv/bin/python bench/latency.py [--archs vgg16_bn resnet50 mobilenet_v2] [--ratio 0.5]
                                      [--batches 1 32] [--runs 10] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_speed import bimodal_gammas

from slimcore.flops import count_flops
from slimcore.models import build_model
from slimcore.prune import slim
from slimcore_pipeline.latency import measure_latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["vgg16_bn", "resnet50", "mobilenet_v2"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=10, help="timed rounds at batch 1 (a third at larger batches)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    print(f"{args.size}px, 100 classes, ratio {args.ratio}, {args.threads} threads; median ms per forward pass")
    print(f"| arch | model | MFLOPs | FLOPs saved | {' | '.join(f'batch {b} ms | speedup' for b in args.batches)} |")
    print(f"|---|---|--:|--:|{'--:|--:|' * len(args.batches)}")
    for arch in args.archs:
        torch.manual_seed(0)
        base = bimodal_gammas(build_model(arch, 100).eval())
        x = torch.randn(1, 3, args.size, args.size)
        models = {"baseline": base}
        for round_to in (1, 8):
            models[f"slim round_to={round_to}"], _ = slim(base, args.ratio, x, round_to=round_to)
        flops = {label: count_flops(m, args.size) for label, m in models.items()}
        cells: dict[str, list[str]] = {label: [] for label in models}
        for batch in args.batches:
            runs = args.runs if batch == 1 else max(3, args.runs // 3)
            lat = measure_latencies(models, (batch, 3, args.size, args.size), runs=runs, warmup=1,
                                    threads=args.threads)
            for label in models:
                ms = lat[label]["median_ms"]
                cells[label] += [f"{ms:.1f}", f"{lat['baseline']['median_ms'] / ms:.2f}x"]
        for label in models:
            saved = 1 - flops[label] / flops["baseline"]
            print(f"| {arch} | {label} | {flops[label] / 1e6:.0f} | {saved:.0%} | {' | '.join(cells[label])} |",
                  flush=True)


if __name__ == "__main__":
    main()
