"""The sensitivity curve (slimcore_pipeline.sensitivity) and the ``sensitivity@ARCH-TARGET`` stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typer.testing import CliRunner

from slimcore.prune import SlimError
from slimcore_pipeline import paths
from slimcore_pipeline.config import PruneConfig
from slimcore_pipeline.sensitivity import (
    SensitivityPoint,
    ratio_grid,
    safe_ratio,
    sensitivity,
    within_budget,
)
from tests.conftest import coupled_bimodal
from tests.helpers.params import tiny_params

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TARGET = "0.5"  # the prune target whose sparse model the stage measures


# --------------------------------------------------------------------------------------------
# grid, policy, safe ratio
# --------------------------------------------------------------------------------------------


def test_ratio_grid_runs_from_step_to_one_minus_step() -> None:
    assert ratio_grid(0.05) == [round(0.05 * k, 6) for k in range(1, 20)]
    assert ratio_grid(0.05)[0] == 0.05 and ratio_grid(0.05)[-1] == 0.95 and len(ratio_grid(0.05)) == 19
    assert ratio_grid(0.1) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert ratio_grid(0.25) == [0.25, 0.5, 0.75]
    assert ratio_grid(0.3) == [0.3, 0.6]
    assert ratio_grid(0.5) == [0.5]
    with pytest.raises(ValueError, match="step"):
        ratio_grid(0.0)


def test_policy_is_what_slim_takes_and_nothing_else() -> None:
    cfg = PruneConfig(round_to=8, group_score="l2", max_drop=1.0, sensitivity_step=0.1)
    policy = cfg.policy()
    assert policy == {"fold_constants": True, "group_score": "l2", "min_channels": 1, "min_keep_fraction": 0.05,
                      "on_untraceable": "error", "round_to": 8, "warn_gamma": 0.01}


def _points(curve: dict[float, float | None]) -> list[SensitivityPoint]:
    return [SensitivityPoint(ratio=r, top1=t, error=None if t is not None else "cannot slim")
            for r, t in curve.items()]


@pytest.mark.parametrize("curve,expected", [
    ({0.1: 97.5, 0.2: 96.5, 0.3: 96.2, 0.4: 94.0}, 0.3),      # monotone: the last within 2 pt
    ({0.1: 97.0, 0.2: 94.9, 0.3: 96.0, 0.4: 96.5}, 0.1),      # non-monotone: a later recovery does not count
    ({0.1: 98.0, 0.2: 95.0, 0.3: 97.5}, 0.1),
    ({0.1: 94.0, 0.2: 97.0}, 0.0),                            # even the smallest ratio fails
    ({0.1: 96.0, 0.2: 96.0, 0.3: 96.0}, 0.3),                 # exactly the budget (98 - 2) is within it
    ({0.1: 99.0, 0.2: 98.5, 0.3: 90.0}, 0.2),                 # a gain is within budget
    ({0.1: 97.0, 0.2: None, 0.3: 97.0}, 0.1),                 # a ratio that cannot be slimmed fails
    ({0.3: 97.0, 0.1: 97.0, 0.2: 90.0}, 0.1),                 # order of the points does not matter
    ({}, 0.0),
])
def test_safe_ratio_is_the_largest_ratio_of_a_passing_prefix(curve: dict, expected: float) -> None:
    assert safe_ratio(_points(curve), reference_top1=98.0, max_drop=2.0) == expected


def test_safe_ratio_budget_and_reference() -> None:
    points = _points({0.1: 97.0, 0.2: 96.0, 0.3: 93.0})
    assert safe_ratio(points, 98.0, 0.0) == 0.0
    assert safe_ratio(points, 98.0, 5.0) == 0.3
    assert safe_ratio(points, 97.0, 1.0) == 0.2
    assert within_budget(points[1], 98.0, 2.0) and not within_budget(points[2], 98.0, 2.0)
    assert points[2].drop(98.0) == 5.0 and SensitivityPoint(ratio=0.5, top1=None).drop(98.0) is None


# --------------------------------------------------------------------------------------------
# the curve on a model
# --------------------------------------------------------------------------------------------


class _Small(nn.Module):
    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _val_loader(n: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 4), batch_size=8)


def test_the_curve_records_every_ratio_honestly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted accuracies (by remaining BN channels): non-monotone; one ratio raises SlimError."""
    import slimcore_pipeline.sensitivity as sens

    example = torch.randn(2, 3, 8, 8)
    model = coupled_bimodal(_Small(), example, zero_fraction=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real_slim = sens.slim

    def flaky_slim(m: nn.Module, ratio: float, x: torch.Tensor, **policy: object):  # type: ignore[no-untyped-def]
        if ratio == 0.5:
            raise SlimError("synthetic failure")
        return real_slim(m, ratio, x, **policy)

    def scripted(m: nn.Module, loader: DataLoader, ctx: object) -> tuple[float, float]:
        kept = sum(b.num_features for b in m.modules() if isinstance(b, nn.BatchNorm2d))
        return {32: (90.0, 99.0), 24: (89.0, 99.0), 16: (87.5, 98.0), 8: (88.5, 97.0)}[kept]

    monkeypatch.setattr(sens, "slim", flaky_slim)
    monkeypatch.setattr(sens, "_accuracy", scripted)
    seen: list[float] = []
    result = sensitivity("small", model, _val_loader(), example, image_size=8,
                         policy={"min_keep_fraction": 0.0}, max_drop=2.0, step=0.25,
                         on_point=lambda p: seen.append(p.ratio))
    assert seen == [0.25, 0.5, 0.75] == [p.ratio for p in result.points]
    n_params = sum(p.numel() for p in model.parameters())
    assert (result.reference_top1, result.val_images, result.reference_params) == (90.0, 24, n_params)
    ok, failed, last = result.points
    assert (ok.top1, ok.true_ratio, ok.error) == (89.0, 0.25, None)
    assert (failed.top1, failed.true_ratio, failed.error) == (None, None, "synthetic failure")
    assert last.top1 == 88.5 and last.true_ratio == 0.75  # within budget, but after a failure
    assert result.safe_ratio == 0.25
    assert ok.mflops < result.reference_mflops and last.mflops < ok.mflops and last.params < ok.params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    data = json.loads(result.to_json())
    assert data["safe_ratio"] == 0.25 and [p["within_budget"] for p in data["points"]] == [True, False, True]
    assert data["points"][1]["error"] == "synthetic failure" and data["points"][1]["drop"] is None


def test_floors_bound_a_ratio_and_it_is_recorded() -> None:
    example = torch.randn(2, 3, 8, 8)
    model = coupled_bimodal(_Small(), example, zero_fraction=0.5)
    result = sensitivity("small", model, _val_loader(), example, image_size=8,
                         policy={"min_keep_fraction": 0.5}, max_drop=100.0, step=0.25)
    bound = result.points[-1]
    assert bound.ratio == 0.75 and bound.true_ratio == 0.5 and not bound.exact and bound.bound_by
    assert result.points[1].true_ratio == 0.5 and result.points[1].mflops == bound.mflops
    assert result.safe_ratio == 0.75  # the budget is huge: the bounded ratio is measured, so it counts
    text = result.to_json()
    assert json.loads(text)["points"][-1]["bound_by"] == list(bound.bound_by)
    assert text == sensitivity("small", model, _val_loader(), example, image_size=8,
                               policy={"min_keep_fraction": 0.5}, max_drop=100.0, step=0.25).to_json()
    assert b"seconds" not in text


# --------------------------------------------------------------------------------------------
# the stage, end to end on a tiny model
# --------------------------------------------------------------------------------------------


class _NoTouching(Dataset):
    """A split the stage must never read."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __len__(self) -> int:
        raise AssertionError(f"the {self.name} split was read")

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        raise AssertionError(f"the {self.name} split was read")


@pytest.fixture
def tiny_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict]:
    from slimcore.checkpoint import save_model
    from slimcore.models import build_model

    arch = "vgg16_bn"
    params = tiny_params(arch, {}, {}, {"prune.sensitivity_step": 0.25, "prune.max_drop": 2.0})
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    torch.manual_seed(0)
    model = build_model(arch, 10, params["model"]["stem"], 0.0625)
    coupled_bimodal(model, torch.randn(2, 3, 8, 8), zero_fraction=0.5).eval()
    save_model(paths.sparse(arch, TARGET), model, run=paths.sparse_run(TARGET))
    return arch, params


def test_the_stage_writes_the_curve_reading_only_the_validation_split(tiny_project: tuple[str, dict],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import slimcore_pipeline.data as data
    from stages import sensitivity as stage

    arch, params = tiny_project
    real = data.load_splits
    calls = []

    def guarded(cfg, seed=None):  # type: ignore[no-untyped-def]
        splits = real(cfg, seed)
        calls.append(len(splits.val))
        splits.train, splits.test = _NoTouching("train"), _NoTouching("test")
        return splits

    monkeypatch.setattr(data, "load_splits", guarded)
    result = runner.invoke(stage.app, ["--arch", arch, "--target", TARGET])
    assert result.exit_code == 0, result.output
    assert calls and calls[0] > 0
    report = json.loads(paths.sensitivity_report(arch, TARGET).read_text())
    assert set(report) == {"arch", "max_drop", "step", "reference_top1", "reference_top5", "reference_mflops",
                           "reference_params", "val_images", "image_size", "policy", "safe_ratio", "points",
                           "warn_gamma", "gammas_below_warn"}
    # how sparse sparse-train made it: the share of BN gammas at most prune.warn_gamma
    assert report["warn_gamma"] == params["prune"].get("warn_gamma", 0.01)
    assert 0.25 <= report["gammas_below_warn"] <= 1  # half the channels were zeroed
    assert "reached no sparsity" not in result.output
    said = " ".join(result.output.split())  # the cost, said before the work
    assert (f"sensitivity@{arch}-{TARGET}: 3 ratios (prune.sensitivity_step 0.25), each one slim and one pass "
            "over the") in said
    assert (report["arch"], report["max_drop"], report["step"], report["val_images"]) == (arch, 2.0, 0.25, calls[0])
    assert report["policy"] == PruneConfig(**params["prune"]).policy()
    assert [p["ratio"] for p in report["points"]] == [0.25, 0.5, 0.75]
    for point in report["points"]:
        assert {"ratio", "true_ratio", "ratio_all_bn", "exact", "bound_by", "threshold", "top1", "top5", "drop",
                "mflops", "params", "error", "within_budget"} == set(point)
        assert 0 <= point["top1"] <= 100 and point["mflops"] < report["reference_mflops"]
        assert point["drop"] == pytest.approx(report["reference_top1"] - point["top1"], abs=1e-3)
    points = [SensitivityPoint(ratio=p["ratio"], top1=p["top1"]) for p in report["points"]]
    assert report["safe_ratio"] == safe_ratio(points, report["reference_top1"], 2.0)
    assert f"sensitivity@{arch}-{TARGET}: safe ratio {report['safe_ratio']:g} (val top-1 " in said
    assert "budget 2 pt)" in result.output
    # the json holds no wall-clock figure: those go to the timings file, and only there
    assert list(json.loads(paths.timings(arch, paths.sensitivity_run(TARGET)).read_text())) == ["seconds"]
    first = paths.sensitivity_report(arch, TARGET).read_bytes()
    assert runner.invoke(stage.app, ["--arch", arch, "--target", TARGET]).exit_code == 0
    assert paths.sensitivity_report(arch, TARGET).read_bytes() == first  # same inputs, same bytes


def test_a_sparse_model_with_no_sparsity_is_named_in_one_warning(tiny_project: tuple[str, dict]) -> None:
    from slimcore.checkpoint import save_model
    from slimcore.models import build_model
    from stages import sensitivity as stage
    from tests.conftest import randomize_bn

    arch, params = tiny_project
    torch.manual_seed(0)
    dense = randomize_bn(build_model(arch, 10, params["model"]["stem"], 0.0625)).eval()  # gammas in [0.5, 1]
    save_model(paths.sparse(arch, TARGET), dense, run=paths.sparse_run(TARGET))
    result = runner.invoke(stage.app, ["--arch", arch, "--target", TARGET])
    assert result.exit_code == 0, result.output
    report = json.loads(paths.sensitivity_report(arch, TARGET).read_text())
    assert report["gammas_below_warn"] == 0.0
    said = " ".join(result.output.split())
    assert (f"warning: sensitivity@{arch}-{TARGET}: sparse-train reached no sparsity: 0.0% of BN gammas below 0.01; "
            f"raise penalty.strength.{arch} or train.epochs") in said


def test_the_stage_refuses_an_empty_validation_split(tiny_project: tuple[str, dict],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import slimcore_pipeline.data as data
    from stages import sensitivity as stage

    arch, _ = tiny_project
    real = data.load_splits

    def empty(cfg, seed=None):  # type: ignore[no-untyped-def]
        splits = real(cfg, seed)
        splits.val = TensorDataset(torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.long))
        return splits

    monkeypatch.setattr(data, "load_splits", empty)
    result = runner.invoke(stage.app, ["--arch", arch, "--target", TARGET])
    assert result.exit_code == 2 and "validation split" in result.output and "val_fraction" in result.output
    assert not paths.sensitivity_report(arch, TARGET).exists()
