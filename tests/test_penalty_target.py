"""penalty.target auto: the share of BN channels sparse training zeroes, derived from the prune target."""

from __future__ import annotations

import pytest
import torch

from slimcore.models import build_model
from slimcore.penalty_target import DEFAULT_MARGIN, MAX_SHARE, SAFE_ONLY_SHARE, share_for_targets
from slimcore.prune import slim_to
from slimcore.targets import parse_target
from slimcore_pipeline.config import PenaltyConfig, load_params, with_overrides
from stages.sparse_train import penalty_share
from tests.conftest import randomize_bn

EXAMPLE = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _vgg() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(build_model("vgg16_bn", 10, "cifar", 0.125).eval())


def test_ratio_targets_give_the_largest_ratio_plus_the_margin() -> None:
    share = share_for_targets(_vgg(), [0.2, 0.6, 0.4], EXAMPLE)
    assert share == pytest.approx(0.6 + DEFAULT_MARGIN)
    assert share_for_targets(_vgg(), [0.2], EXAMPLE, margin=0.0) == pytest.approx(0.2)


def test_a_speedup_resolves_to_the_share_slim_to_removes_for_it() -> None:
    model = _vgg()
    _, report = slim_to(model, "speedup4", EXAMPLE, input_size=16)
    assert 0.3 < report.ratio_all_bn < 0.9
    share = share_for_targets(model, ["speedup4", 0.1], EXAMPLE, input_size=16, margin=0.0)
    assert share == pytest.approx(report.ratio_all_bn)
    # a larger speed-up needs a larger share
    assert share_for_targets(model, ["speedup2"], EXAMPLE, input_size=16, margin=0.0) < share


def test_safe_alone_and_the_cap() -> None:
    assert share_for_targets(_vgg(), ["safe"], EXAMPLE) == SAFE_ONLY_SHARE
    assert share_for_targets(_vgg(), [0.94], EXAMPLE) == MAX_SHARE


def test_params_accept_auto_and_refuse_other_words() -> None:
    assert PenaltyConfig(target="auto").target == "auto"
    assert PenaltyConfig(target=0.4).target == 0.4
    with pytest.raises(ValueError):
        PenaltyConfig(target="most")
    with pytest.raises(ValueError):
        PenaltyConfig(target=1.0)


def test_the_stage_sizes_auto_for_its_own_target_alone_and_passes_numbers_through() -> None:
    params = with_overrides(load_params(), {"penalty.target": "auto", "penalty.method": "group",
                                           "prune.targets": [0.2, 0.5], "data.image_size": 16})
    # each target's sparse model: sized for that target, not for the largest one requested
    assert penalty_share(_vgg(), params, "vgg16_bn", parse_target(0.2)) == pytest.approx(0.2 + DEFAULT_MARGIN)
    assert penalty_share(_vgg(), params, "vgg16_bn", parse_target(0.5)) == pytest.approx(0.5 + DEFAULT_MARGIN)
    assert penalty_share(_vgg(), params, "vgg16_bn", parse_target("safe")) == SAFE_ONLY_SHARE
    flops = penalty_share(_vgg(), params, "vgg16_bn", parse_target("speedup2"))
    assert flops == pytest.approx(share_for_targets(_vgg(), ["flops0.5"], torch.randn(2, 3, 16, 16),
                                                    input_size=16, **params.prune.policy()))
    fixed = with_overrides(params, {"penalty.target": 0.3})
    assert penalty_share(_vgg(), fixed, "vgg16_bn", parse_target(0.2)) == 0.3
    # the paper's subgradient pulls every gamma: auto resolves to 0 (no share) without a search
    paper = with_overrides(params, {"penalty.method": "l1"})
    assert penalty_share(_vgg(), paper, "vgg16_bn", parse_target(0.2)) == 0.0
