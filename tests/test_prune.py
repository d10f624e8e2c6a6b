"""The slimming engine: exact ratios, real removal, lossless folding, generality."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimcore.flops import count_flops, count_params
from slimcore.models import build_model
from slimcore.prune import SlimError, SlimPolicy, slim
from tests.conftest import coupled_bimodal, randomize_bn, zero_coupled_channels

REFERENCE = ["vgg16_bn", "resnet50", "mobilenet_v2"]


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _bn_channels(model: nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("arch", REFERENCE)
@pytest.mark.parametrize("stem,width,size", [("cifar", 0.25, 16), ("imagenet", 0.25, 64)])
def test_pruned_models_run_and_match_their_report(arch: str, stem: str, width: float, size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    model = coupled_bimodal(build_model(arch, 10, stem, width).eval(), x[:1], zero_fraction=0.5)
    before_bn = _bn_channels(model)
    for ratio in (0.2, 0.4, 0.6):
        pruned, report = slim(model, ratio, x)
        out = _run(pruned, x)
        assert out.shape == (2, 10)
        assert abs(report.true_ratio - ratio) <= 0.01, report.bound_by
        # the report's counts are what the pruned network physically has
        assert report.total_bn_channels == before_bn
        assert _bn_channels(pruned) == before_bn - report.removed_bn_channels
        assert count_params(pruned) < count_params(model)
        assert count_flops(pruned, size) < count_flops(model, size)
        layers = report.channels_per_layer
        modules = dict(pruned.named_modules())
        for name, (_, after) in layers.items():
            assert modules[name].num_features == after
        assert all(after >= 1 for _, after in layers.values())
    assert _bn_channels(model) == before_bn  # the input model is left untouched


@pytest.mark.parametrize("arch", REFERENCE)
def test_exact_ratio_on_full_size_models(arch: str) -> None:
    """The seed table's pruned FLOPs: within 1 pp at imagenet stem, 100 classes, width 1, with bimodal gammas."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)  # the channel structure is the one at 224px
    model = coupled_bimodal(build_model(arch, 100).eval(), x, zero_fraction=0.45)
    for ratio in (0.2, 0.4, 0.6):
        pruned, report = slim(model, ratio, x)
        assert abs(report.true_ratio - ratio) <= 0.01, (arch, ratio, report.true_ratio, report.bound_by)
        assert report.prunable_bn_channels == report.total_bn_channels
        assert _run(pruned, x).shape == (1, 100)


def test_threshold_ranks_globally_by_gamma() -> None:
    """Every removed channel's |gamma| is <= the threshold and (ungrouped VGG) every kept one is >=."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    model = randomize_bn(build_model("vgg16_bn", 10, "cifar", 0.25).eval())
    pruned, report = slim(model, 0.3, x, fold_constants=False)
    kept = torch.cat([m.weight.detach().abs() for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)])
    original = torch.cat([m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    assert kept.min() >= report.threshold
    removed = original.sort().values[: report.removed_bn_channels]
    assert removed.max() == pytest.approx(report.threshold)
    assert report.removed_bn_channels == round(0.3 * original.numel())


def test_lossless_removal_where_consumers_see_no_padding() -> None:
    """Channels with gamma = 0 feeding 1x1 convs, residual adds and the classifier fold exactly."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    model = randomize_bn(build_model("resnet50", 10, "cifar", 0.25).eval())

    def choose(root: str, channels: int, bns: list[str]) -> list[int]:
        # bn2 feeds the 1x1 conv3; residual groups (several BNs) feed 1x1 convs and fc.
        if root.endswith("conv2") or len(bns) > 1:
            return list(range(0, channels, 3))
        return []

    zeroed = zero_coupled_channels(model, x, choose)
    ratio = zeroed / _bn_channels(model)
    reference = _run(model, x)
    folded, report = slim(model, ratio, x)
    assert report.removed_bn_channels == zeroed
    assert torch.allclose(_run(folded, x), reference, atol=1e-4), (_run(folded, x) - reference).abs().max()
    unfolded, _ = slim(model, ratio, x, fold_constants=False)
    assert (_run(unfolded, x) - reference).abs().max() > 1e-2  # betas matter: folding is what fixes it


@pytest.mark.parametrize("arch", ["vgg16_bn", "mobilenet_v2"])
def test_folding_is_close_where_padding_sees_the_constant(arch: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    model = coupled_bimodal(build_model(arch, 10, "cifar", 0.25).eval(), x[:1], zero_fraction=0.3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[m.weight < 1e-3] = 0.0
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    reference = _run(model, x)
    folded, _ = slim(model, zeros / _bn_channels(model), x)
    unfolded, _ = slim(model, zeros / _bn_channels(model), x, fold_constants=False)
    err_fold = (_run(folded, x) - reference).abs().max()
    err_nofold = (_run(unfolded, x) - reference).abs().max()
    assert err_fold < err_nofold / 5, (err_fold, err_nofold)


def test_ratio_zero_returns_an_identical_model() -> None:
    x = torch.randn(2, 3, 16, 16)
    model = randomize_bn(build_model("mobilenet_v2", 10, "cifar", 0.25).eval())
    same, report = slim(model, 0.0, x)
    assert report.removed_bn_channels == 0 and report.true_ratio == 0.0
    assert same is not model
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values()))
    assert torch.equal(_run(same, x), _run(model, x))


def test_floor_never_empties_a_layer_and_reports_the_bound() -> None:
    x = torch.randn(1, 3, 16, 16)
    model = randomize_bn(build_model("resnet50", 10, "cifar", 0.125).eval())
    pruned, report = slim(model, 0.99, x, min_channels=2, min_keep_fraction=0.1)
    assert _run(pruned, x).shape == (1, 10)
    assert all(g.channels_after >= max(2, math.ceil(0.1 * g.channels_before)) for g in report.groups)
    assert report.true_ratio < 0.99 and not report.exact
    assert report.bound_by and report.bound_by[0].startswith("floor")


def test_round_to_keeps_multiples_by_gamma_not_at_random() -> None:
    x = torch.randn(1, 3, 16, 16)
    model = coupled_bimodal(build_model("vgg16_bn", 10, "cifar", 0.25).eval(), x, zero_fraction=0.5)
    a, report = slim(model, 0.4, x, round_to=8)
    b, _ = slim(model, 0.4, x, round_to=8)
    assert all(g.channels_after % 8 == 0 for g in report.groups)
    assert abs(report.true_ratio - 0.4) <= 0.03
    assert a.slimcore_plan == b.slimcore_plan  # deterministic: same plan twice


def test_classifier_outputs_are_never_pruned() -> None:
    x = torch.randn(1, 3, 64, 64)
    for arch in ("vgg16_bn", "mobilenet_v2"):
        model = coupled_bimodal(build_model(arch, 37, "imagenet", 0.25).eval(), x, zero_fraction=0.6)
        pruned, report = slim(model, 0.6, x)
        assert _run(pruned, x).shape == (1, 37)
        assert all(g.root not in ("classifier.6", "classifier.1") for g in report.groups)


def test_unknown_policy_and_bad_ratio_are_errors() -> None:
    model = build_model("vgg16_bn", 10, "cifar", 0.125)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(TypeError, match="round_too"):
        slim(model, 0.2, x, round_too=8)
    with pytest.raises(ValueError, match="ratio"):
        slim(model, 1.0, x)
    with pytest.raises(ValueError):
        SlimPolicy(round_to=0)


@pytest.mark.parametrize("arch", ["resnet18", "resnet101", "mobilenet_v3_large", "efficientnet_b0", "densenet121"])
def test_any_torchvision_bn_cnn(arch: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    model = coupled_bimodal(build_model(arch, 10).eval(), x, zero_fraction=0.5)
    pruned, report = slim(model, 0.4, x)
    assert _run(pruned, x).shape == (1, 10)
    assert abs(report.true_ratio - 0.4) <= 0.01
    assert count_params(pruned) < count_params(model)
    for entry in report.skipped:  # every group left intact is named, with a reason
        assert entry["group"] and entry["reason"]


def test_grouped_convs_pruned_by_group_pattern_and_untraceable_models_are_errors() -> None:
    """Grouped convolutions keep their groups (same channels removed in every group); a model
    that cannot be pruned at all raises SlimError, or with on_untraceable="warn" comes back as is."""
    x = torch.randn(1, 3, 64, 64)
    resnext = randomize_bn(build_model("resnext50_32x4d", 10).eval())
    grouped = {n: m.groups for n, m in resnext.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    pruned, report = slim(resnext, 0.3, x)
    assert _run(pruned, x).shape == (1, 10)
    assert not any("grouped convolution" in s["reason"] for s in report.skipped)
    modules = dict(pruned.named_modules())
    for name, groups in grouped.items():
        conv = modules[name]
        assert conv.groups == groups and conv.in_channels % groups == 0 and conv.out_channels % groups == 0
    assert any(modules[n].out_channels < resnext.get_submodule(n).out_channels for n in grouped)
    shuffle = randomize_bn(build_model("shufflenet_v2_x0_5", 10).eval())
    with pytest.raises(SlimError, match="cannot slim this model"):
        slim(shuffle, 0.3, x)
    with pytest.warns(UserWarning, match="untouched"):
        same, report = slim(shuffle, 0.3, x, on_untraceable="warn")
    assert torch.allclose(_run(same, x), _run(shuffle, x))
    assert report.removed_bn_channels == 0 and report.skipped[0]["group"] == "<model>"
    assert report.ratio_all_bn == 0.0 and report.skipped[0]["channels"] == report.total_bn_channels


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1),
                                                            (3, 1, 2, 2), (5, 2, 2, 1), (3, 1, "same", 1)])
def test_tap_means_give_the_mean_output_of_any_input_subset(kernel: int, stride: int, padding: object,
                                                            dilation: int) -> None:
    """sum(W[:, idxs] * taps[idxs]) equals the mean over batch and positions of conv(inputs idxs only)."""
    from slimcore.prune.constant_folding import tap_means

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 4, kernel, stride=1 if padding == "same" else stride, padding=padding,
                           dilation=dilation, bias=False)
    x = torch.randn(2, 6, 11, 9)
    idxs = torch.tensor([1, 4, 5])
    masked = torch.zeros_like(x)
    masked[:, idxs] = x[:, idxs]
    expected = conv(masked).mean(dim=(0, 2, 3))
    taps = tap_means(conv, x)
    got = (conv.weight[:, idxs] * taps[idxs]).reshape(4, -1).sum(1)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# targets beyond the channel ratio : FLOPs, parameters, safe; the gamma warning


def _half_tiny_gammas(model: nn.Module, seed: int = 0) -> nn.Module:
    """Bimodal gammas: a random half of each BN layer's channels ~1e-3, the rest ~1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                v = 1 + 0.1 * torch.randn(m.num_features, generator=g).abs()
                tiny = torch.randperm(m.num_features, generator=g)[: m.num_features // 2]
                v[tiny] = 1e-3 * (1 + torch.rand(len(tiny), generator=g))
                m.weight.copy_(v)
    return model


@pytest.fixture(scope="module", params=REFERENCE)
def full_size(request: pytest.FixtureRequest) -> tuple[str, nn.Module, torch.Tensor]:
    """A full-size (width 1.0) reference arch at 32px with the cifar stem: the channel structure
    of the real model, cheap to trace."""
    torch.manual_seed(0)
    model = _half_tiny_gammas(build_model(request.param, 100, "cifar", 1.0).eval())
    return request.param, model, torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("target", ["flops0.25", "params0.3"])
def test_flops_and_params_targets_land_within_one_percent_on_full_size_models(full_size, target: str) -> None:
    from slimcore.prune import slim_to

    arch, model, x = full_size
    pruned, report = slim_to(model, target, x)
    fraction = float(target.removeprefix("flops").removeprefix("params"))
    measure = "flops" if target.startswith("flops") else "params"
    # what the report says is what the profile stage measures on the pruned model
    flops_before, flops_after = count_flops(model, 32), count_flops(pruned, 32)
    params_before, params_after = count_params(model), count_params(pruned)
    assert (report.flops_before, report.flops_after) == (flops_before, flops_after)
    assert (report.params_before, report.params_after) == (params_before, params_after)
    achieved = flops_after / flops_before if measure == "flops" else params_after / params_before
    assert achieved == pytest.approx(report.flops_fraction if measure == "flops" else report.params_fraction)
    assert abs(achieved - fraction) <= 0.01 * fraction, (arch, target, achieved, report.bound_by)
    assert report.exact and not report.bound_by
    assert report.target == target and 0 < report.requested_ratio < 1
    assert report.search_steps >= 1
    assert _run(pruned, x).shape == (2, 100)
    # the resolved ratio, given to slim, gives the same model
    again, plain = slim(model, report.requested_ratio, x)
    assert plain.removed_bn_channels == report.removed_bn_channels
    assert count_flops(again, 32) == flops_after


def test_ratio_and_safe_targets_are_plain_slim_and_safe_needs_its_ratio() -> None:
    from slimcore.prune import slim_to

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = coupled_bimodal(build_model("resnet50", 10, "cifar", 0.25).eval(), x[:1], zero_fraction=0.5)
    _, plain = slim(model, 0.3, x)
    for target, kwargs in ((0.3, {}), ("0.3", {}), ("safe", {"safe_ratio": 0.3})):
        _, report = slim_to(model, target, x, **kwargs)
        assert report.removed_bn_channels == plain.removed_bn_channels
        assert report.requested_ratio == 0.3 and report.search_steps == 0
        assert report.target == ("safe" if target == "safe" else "0.3")
        assert report.flops_fraction < 1 and report.params_fraction < 1
    with pytest.raises(ValueError, match="safe_ratio"):
        slim_to(model, "safe", x)
    with pytest.raises(ValueError, match="unknown target"):
        slim_to(model, "latency0.5", x)


def test_a_speedup_target_is_the_flops_target_one_over_s() -> None:
    from slimcore.prune import slim_to

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = coupled_bimodal(build_model("resnet50", 10, "cifar", 0.25).eval(), x[:1], zero_fraction=0.5)
    pruned, report = slim_to(model, "speedup2", x)
    _, as_flops = slim_to(model, "flops0.5", x)
    assert report.target == "speedup2" and report.search_steps >= 1
    assert report.removed_bn_channels == as_flops.removed_bn_channels  # the same search, the same model
    assert report.flops_after == as_flops.flops_after == count_flops(pruned, 16)
    speedup = report.flops_before / report.flops_after
    if report.exact:
        assert abs(report.flops_fraction - 0.5) <= 0.01 * 0.5 and speedup == pytest.approx(2, rel=0.011)
    else:
        assert report.bound_by
    assert _run(pruned, x).shape == (2, 10)


def test_unreachable_flops_target_names_the_floor_groups() -> None:
    from slimcore.prune import slim_to

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = coupled_bimodal(build_model("vgg16_bn", 10, "cifar", 0.25).eval(), x[:1], zero_fraction=0.5)
    pruned, report = slim_to(model, "flops0.1", x, min_keep_fraction=0.6)
    assert not report.exact
    assert report.flops_fraction > 0.1 * 1.01
    assert len(report.bound_by) == 1 and report.bound_by[0].startswith("floor:"), report.bound_by
    assert "features.0" in report.bound_by[0] and "min_keep_fraction=0.6" in report.bound_by[0]
    assert _run(pruned, x).shape == (2, 10)


def test_nonnegligible_removed_counts_channels_scoring_above_warn_gamma() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    bimodal = coupled_bimodal(build_model("resnet50", 10, "cifar", 0.25).eval(), x[:1], zero_fraction=0.5)
    _, quiet = slim(bimodal, 0.3, x)  # only near-zero gammas go
    assert quiet.nonnegligible_removed == 0 and quiet.warn_gamma == 1e-2 and quiet.threshold < 1e-2
    _, loud = slim(bimodal, 0.7, x)  # past the tiny half: channels with gamma ~1 go too
    removed_channels = sum(g.channels_before - g.channels_after for g in loud.groups)
    assert 0 < loud.nonnegligible_removed < removed_channels and loud.threshold > 1e-2
    dense = randomize_bn(build_model("vgg16_bn", 10, "cifar", 0.25).eval())  # every gamma in [0.5, 1]
    _, report = slim(dense, 0.3, x)
    assert report.nonnegligible_removed == sum(g.channels_before - g.channels_after for g in report.groups)
    _, lenient = slim(dense, 0.3, x, warn_gamma=1.0)
    assert lenient.nonnegligible_removed == 0 and lenient.policy["warn_gamma"] == 1.0
