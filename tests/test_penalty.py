"""The sparsity penalties (l1 subgradient, proximal, group-proximal) and BN recalibration."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slimcore.models import build_model
from slimcore.penalty import GammaPenalty, batchnorm_layers
from slimcore.prune import coupled_units, slim
from slimcore_pipeline.config import RuntimeConfig
from slimcore_pipeline.runtime import current_context
from slimcore_pipeline.train import recalibrate_bn

EXAMPLE = torch.zeros(2, 3, 16, 16)


def _tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet50", 10, "cifar", 0.125).eval()


def test_prox_soft_thresholds_every_gamma_exactly() -> None:
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -0.05, 0.01, -0.015]))
    GammaPenalty(model, 0.2, "prox").after_step_(lr=0.1)  # shrink 0.02
    assert bn.weight.tolist() == pytest.approx([0.48, -0.03, 0.0, 0.0])
    assert bn.weight[2] == 0 and bn.weight[3] == 0  # exactly zero, not oscillating around it


def test_prox_ramps_strength_up_over_ramp_steps() -> None:
    bn = nn.BatchNorm2d(1)
    penalty = GammaPenalty(nn.Sequential(bn), 1.0, "prox", ramp_steps=4)
    for _ in range(4):
        penalty.after_step_(lr=0.1)
    # shrinks of 0.025, 0.05, 0.075, 0.1: 0.25 in all
    assert float(bn.weight.detach()) == pytest.approx(0.75)


def test_l1_subgradient_goes_into_the_gradient_not_the_weights() -> None:
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -0.5]))
    bn.weight.grad = torch.zeros(2)
    penalty = GammaPenalty(nn.Sequential(bn), 1e-3, "l1")
    penalty.before_step_()
    penalty.after_step_(lr=0.1)
    assert bn.weight.grad.tolist() == pytest.approx([1e-3, -1e-3])
    assert bn.weight.tolist() == pytest.approx([0.5, -0.5])


def test_coupled_units_tie_a_residual_channel_across_its_bn_layers() -> None:
    model = _tiny_resnet()
    units = dict((id(bn), ids) for bn, ids in coupled_units(model, EXAMPLE))
    bn3, down = model.layer1[0].bn3, model.layer1[0].downsample[1]
    assert torch.equal(units[id(bn3)], units[id(down)])  # one residual stream: one unit per channel
    for block in model.layer1[1:]:
        assert torch.equal(units[id(block.bn3)], units[id(bn3)])
    assert not set(units[id(model.layer1[0].bn1)].tolist()) & set(units[id(bn3)].tolist())
    every = torch.cat(list(units.values()))
    assert len(every) == sum(m.num_features for _, m in batchnorm_layers(model))


def test_group_prox_zeros_a_residual_channel_in_every_bn_layer_together() -> None:
    model = _tiny_resnet()
    units = coupled_units(model, EXAMPLE)
    members = [bn for bn, ids in units if int(ids[0]) == int(dict((id(b), i) for b, i in units)[
        id(model.layer1[0].bn3)][0])]
    assert len(members) == 4  # bn3 of the 3 blocks + the downsample BN
    with torch.no_grad():
        for _, bn in batchnorm_layers(model):
            bn.weight.fill_(1.0)
        for bn in members:
            bn.weight[0] = 0.01  # channel 0 of the stream: small in every layer it has
        members[0].weight[1] = 0.01  # channel 1: small in one layer only
    GammaPenalty(model, 0.5, "group", units).after_step_(lr=0.1)  # shrink 0.05 x sqrt(k)
    assert all(float(bn.weight[0]) == 0.0 for bn in members)
    assert all(float(bn.weight[1]) > 0.0 for bn in members)  # held up by the other three layers
    norm = torch.sqrt(torch.tensor(3.0 + 0.01 ** 2))
    assert float(members[1].weight[1]) == pytest.approx(float(1 - 0.05 * 2 / norm), rel=1e-5)


def test_slimming_channels_the_group_penalty_zeroed_changes_no_output() -> None:
    """Zero gammas emit their beta, which slim folds into the next layer: the pruned model computes
    what the sparse one did, up to zero padding at the borders (a bias cannot vary in space)."""
    model = _tiny_resnet()
    units = coupled_units(model, EXAMPLE)
    n_units = int(max(int(ids.max()) for _, ids in units)) + 1
    dead = torch.randperm(n_units, generator=torch.Generator().manual_seed(0))[: int(0.75 * n_units)]
    with torch.no_grad():
        for bn, ids in units:
            bn.weight[torch.isin(ids, dead)] = 0.0
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.3, 0.3)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pruned, report = slim(model, 0.6, x[:2], min_keep_fraction=0.05)
    assert report.threshold == 0.0
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    unfolded, _ = slim(model, 0.6, x[:2], min_keep_fraction=0.05, fold_constants=False)
    with torch.no_grad():
        reference = model(x)
        error = (pruned(x) - reference).abs().max()
        assert error < 0.01 * reference.abs().max()
        assert error < 0.1 * (unfolded(x) - reference).abs().max()


def test_recalibrate_bn_replaces_stale_running_stats_with_the_batch_average() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    model = nn.Sequential(conv, bn)
    with torch.no_grad():
        bn.running_mean.fill_(100.0)
        bn.running_var.fill_(100.0)
    xs = torch.randn(32, 3, 8, 8) * 3 + 1
    loader = DataLoader(TensorDataset(xs, torch.zeros(32, dtype=torch.long)), batch_size=8)
    model.eval()
    recalibrate_bn(model, loader, 2, current_context(RuntimeConfig(device="cpu")))
    with torch.no_grad():
        feats = [conv(xs[i * 8:(i + 1) * 8]) for i in range(2)]
    expected_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)
    assert not model.training and bn.momentum == 0.1


def test_close_steps_bring_the_targeted_units_to_exactly_zero_on_the_last_step() -> None:
    """A gentle strength alone leaves the targeted gammas above zero; close_steps zeroes them by the
    last step (gradually: half way they are still about half way) and leaves the others alone."""
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn)
    start = torch.tensor([0.5, -0.4, 1.0, 2.0])
    with torch.no_grad():
        bn.weight.copy_(start)
    gentle = GammaPenalty(model, 0.01, "prox", target=0.5)
    for _ in range(10):
        gentle.after_step_(lr=0.1)
    assert bool((bn.weight[:2].abs() > 0.3).all())  # 10 x 0.001: nowhere near zero
    with torch.no_grad():
        bn.weight.copy_(start)
    closing = GammaPenalty(model, 0.01, "prox", target=0.5, close_steps=10, close_window=10)
    for step in range(10):
        closing.after_step_(lr=0.1)
        if step == 4:
            assert 0.15 < float(bn.weight[0].abs()) < 0.35
    assert bn.weight[:2].tolist() == [0.0, 0.0]
    assert bn.weight[2:].tolist() == pytest.approx([1.0, 2.0])


def test_close_window_starts_the_fade_late() -> None:
    bn = nn.BatchNorm2d(2)
    model = nn.Sequential(nn.Conv2d(3, 2, 1), bn)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0]))
    penalty = GammaPenalty(model, 0.0001, "prox", target=0.5, close_steps=10, close_window=4)
    for _ in range(6):
        penalty.after_step_(lr=0.1)
    assert float(bn.weight[0]) == pytest.approx(0.5, abs=1e-3)  # before the window: only the gentle strength
    for _ in range(4):
        penalty.after_step_(lr=0.1)
    assert bn.weight.tolist() == [0.0, pytest.approx(2.0)]
