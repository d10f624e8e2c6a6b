"""Benchmark: images/s of slimcore's training loop vs a bare PyTorch loop, and the L1 penalty's cost.

Same model, same in-memory data, same DataLoader, same batch; each variant trains one epoch
per repeat from the same initial weights, variants interleaved so machine load hits all alike;
the figure is the median.  Variants:

* bare PyTorch: forward, cross-entropy, zero_grad, backward, SGD step: nothing else;
* slimcore Trainer without sparsity (warmup/multistep schedule, label smoothing, no weight
  decay on BN/bias, NaN check every step, progress bookkeeping, per-epoch |gamma| stats);
* slimcore Trainer with the L1 penalty on every BN gamma (the sparse-train stage).

    .venv/bin/python bench/train_speed.py                       # CPU, small VGG-16-BN at 32 px
    .venv/bin/python bench/train_speed.py --device cuda --arch resnet50 --stem imagenet \\
        --width 1 --size 224 --batch 128 --steps 50             # GPU, AMP (bf16) + channels_last
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimcore.models import build_model
from slimcore.penalty import PenaltySpec
from slimcore_pipeline.config import RuntimeConfig, TrainConfig
from slimcore_pipeline.console import console
from slimcore_pipeline.data import make_loader
from slimcore_pipeline.runtime import Context, current_context
from slimcore_pipeline.train import Trainer


def bare_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, ctx: Context, lr: float) -> None:
    """The plainest correct training loop, with the same precision settings as slimcore's."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.use_grad_scaler)
    model.train()
    for x, y in loader:
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with ctx.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def slimcore_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, ctx: Context, lr: float,
                   sparsity: float) -> None:
    cfg = TrainConfig(epochs=1, batch_size=loader.batch_size or 1, lr=lr, warmup_epochs=0, milestones=[])
    Trainer(model, cfg, ctx, loader, None, desc="bench", penalty=PenaltySpec(sparsity)).fit()


def sync(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vgg16_bn")
    parser.add_argument("--stem", default="cifar")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    parser.add_argument("--sparsity", type=float, default=1e-4)
    args = parser.parse_args()

    console.quiet = True  # the per-epoch log lines would drown the figures
    ctx = current_context(RuntimeConfig(device=args.device, amp=args.amp))
    torch.manual_seed(0)
    n = args.batch * args.steps
    data = TensorDataset(torch.randn(n, 3, args.size, args.size), torch.randint(0, 100, (n,)))
    loader = make_loader(data, args.batch, train=True, seed=0, runtime=RuntimeConfig(device=args.device),
                         device=ctx.device.type)
    base = build_model(args.arch, 100, args.stem, args.width).to(ctx.device)
    if ctx.channels_last:
        base = base.to(memory_format=torch.channels_last)
    variants: dict[str, Callable[[nn.Module], None]] = {
        "bare PyTorch loop": lambda m: bare_epoch(m, loader, ctx, 0.01),
        "slimcore Trainer": lambda m: slimcore_epoch(m, loader, ctx, 0.01, 0.0),
        f"slimcore Trainer + L1 {args.sparsity:g}": lambda m: slimcore_epoch(m, loader, ctx, 0.01, args.sparsity),
    }
    for run in variants.values():  # warm-up: allocator, kernels, autotuning
        run(copy.deepcopy(base))
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            model = copy.deepcopy(base)
            sync(ctx)
            start = time.perf_counter()
            run(model)
            sync(ctx)
            seconds[name].append(time.perf_counter() - start)
    amp = str(ctx.amp_dtype).replace("torch.", "") if ctx.amp_dtype else "fp32"
    print(f"{args.arch} ({args.stem} stem, width {args.width}) at {args.size}px, batch {args.batch}, {args.steps} "
          f"steps/epoch, {ctx.device.type} {amp}{' channels_last' if ctx.channels_last else ''}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}:")
    rates = {name: n / statistics.median(t) for name, t in seconds.items()}
    for name, rate in rates.items():
        print(f"  {name:34s} {rate:9.1f} images/s")
    bare, ours, sparse = rates.values()
    print(f"  slimcore / bare:                 {ours / bare:.3f}")
    print(f"  L1 penalty overhead:             {100 * (1 - sparse / ours):+.1f}%")


if __name__ == "__main__":
    main()
