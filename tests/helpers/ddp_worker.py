"""Train a tiny model with slimcore's Trainer, alone or as one of torchrun's workers.

    python tests/helpers/ddp_worker.py OUT BATCH [--live-bn]            # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/helpers/ddp_worker.py OUT BATCH [--live-bn]               # DDP on gloo

Rank 0 saves the trained state_dict and the epoch records to OUT.  By default BatchNorm is
frozen (eval mode: running statistics), so the only thing that differs between one process
with batch 2B and two with batch B is the DDP machinery itself (sampler shards, gradient
averaging, metric reduction): results must agree to float rounding.  ``--live-bn`` keeps
BN in training mode (per-rank batch statistics, as in real DDP training without SyncBN).
"""

from __future__ import annotations

import sys
import types
from dataclasses import asdict

import torch
from torch import nn

from slimcore.models import build_model
from slimcore.penalty import PenaltySpec
from slimcore_pipeline.config import Params, TrainConfig
from slimcore_pipeline.data import load_splits, make_loader
from slimcore_pipeline.runtime import current_context, distributed
from slimcore_pipeline.train import Trainer


def _freeze_bn(model: nn.Module) -> None:
    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        nn.Module.train(self, mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    model.train = types.MethodType(train, model)  # type: ignore[method-assign]


def main(out: str, batch: int, live_bn: bool) -> None:
    params = Params.model_validate({"archs": ["vgg16_bn"], "penalty": {"strength": {"vgg16_bn": 1e-3}},
                                    "data": {"image_size": 8}, "model": {"stem": "cifar", "width": 0.0625},
                                    "runtime": {"device": "cpu", "threads": 1}})
    cfg = TrainConfig(epochs=2, batch_size=batch, lr=0.05, warmup_epochs=0, milestones=[], label_smoothing=0.1)
    ctx = current_context(params.runtime)
    with distributed(ctx):
        torch.manual_seed(0)
        splits = load_splits(params.data)
        model = build_model("vgg16_bn", splits.num_classes, "cifar", 0.0625)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        if not live_bn:
            _freeze_bn(model)
        train = make_loader(splits.train, batch, train=True, seed=0, runtime=params.runtime,
                            rank=ctx.rank, world_size=ctx.world_size)
        history = Trainer(model, cfg, ctx, train, None, desc="ddp-test", penalty=PenaltySpec(1e-3)).fit()
        if ctx.is_main:
            torch.save({"state_dict": model.state_dict(), "init": init, "history": [asdict(h) for h in history],
                        "world_size": ctx.world_size}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "--live-bn" in sys.argv[3:])
