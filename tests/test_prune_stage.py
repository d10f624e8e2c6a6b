"""The prune stage with its targets (ratios, FLOPs, params, speed-ups, safe): file names, the
safe target, the reports, the warnings.

Each test runs ``python -m stages.prune`` on a tiny sparse model in a scratch project (a few
seconds each: start-up and one slim).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_faults import ARCH, _project, _said, _stage

WIDTH = 0.125
TARGETS = ("0.5", "safe", "flops0.6", "speedup1.5", "params0.1")  # what these tests prune to


def _sparse(project: Path, gammas: str) -> None:
    """models/ARCH/sparse-T.pt for every T of :data:`TARGETS` (one model), with dense gammas (all in
    [0.5, 1]) or bimodal ones (half ~1e-4)."""
    from slimcore.checkpoint import save_model
    from slimcore.models import build_model
    from tests.conftest import coupled_bimodal, randomize_bn

    model = randomize_bn(build_model(ARCH, 10, "cifar", WIDTH).eval())
    if gammas == "bimodal":
        model = coupled_bimodal(model, torch.randn(1, 3, 8, 8), zero_fraction=0.5)
    for target in TARGETS:
        save_model(project / "models" / ARCH / f"sparse-{target}.pt", model)


def _prune(project: Path, target: str) -> tuple[str, dict]:
    proc = _stage(project, "prune", "--arch", ARCH, "--target", target)
    said = _said(proc)
    assert proc.returncode == 0, said[-3000:]
    return said, json.loads((project / "metrics" / "prune" / f"{ARCH}-{target}.json").read_text())


def _warnings(said: str) -> list[str]:
    return [line for line in said.splitlines() if "warning:" in line]


@pytest.fixture
def dense(tmp_path: Path) -> Path:
    project = _project(tmp_path, **{"model.width": WIDTH})
    _sparse(project, "dense")
    return project


def test_removing_nonnegligible_channels_warns_in_one_line_and_records_it(dense: Path) -> None:
    said, report = _prune(dense, "0.5")
    (line,) = [w for w in _warnings(said) if "warn_gamma" in w]
    assert f"prune@{ARCH}-0.5" in line and "prune.warn_gamma=0.01" in line
    assert f"removes {report['nonnegligible_removed']} channels" in line
    assert f"threshold {report['threshold']:.3g}" in line
    assert f"run the sensitivity stage (dvc repro sensitivity@{ARCH}-0.5)" in line
    assert report["warn_gamma"] == pytest.approx(0.01)
    assert report["nonnegligible_removed"] > 0 and report["threshold"] > 0.01
    assert report["target"] == "0.5" and report["requested_ratio"] == 0.5
    assert 0 < report["flops_fraction"] < 1 and report["flops_after"] < report["flops_before"]


def test_safe_target_reads_the_sensitivity_report_and_names_the_safe_ratio(dense: Path) -> None:
    proc = _stage(dense, "prune", "--arch", ARCH, "--target", "safe")
    said = _said(proc)
    assert proc.returncode == 2 and "Traceback" not in said, said[-3000:]
    (error,) = [line for line in said.splitlines() if "error:" in line]
    assert f"metrics/sensitivity/{ARCH}-safe.json" in error and f"dvc repro sensitivity@{ARCH}-safe" in error
    assert not (dense / "models" / ARCH / "pruned-safe.pt").exists()

    sensitivity = dense / "metrics" / "sensitivity" / f"{ARCH}-safe.json"
    sensitivity.parent.mkdir(parents=True)
    sensitivity.write_text(json.dumps({"safe_ratio": 0.3, "curve": []}))
    (sensitivity.parent / f"{ARCH}-0.5.json").write_text(json.dumps({"safe_ratio": 0.3, "curve": []}))
    said, report = _prune(dense, "safe")
    assert report["target"] == "safe" and report["requested_ratio"] == 0.3
    assert abs(report["true_ratio"] - 0.3) <= 0.01
    assert report["safe_ratio_from"] == f"metrics/sensitivity/{ARCH}-safe.json"
    for name in ("pruned-safe.pt", "pruned-safe-nofold.pt"):
        assert (dense / "models" / ARCH / name).is_file()
    assert (dense / "metrics" / "timings" / ARCH / "prune-safe.json").is_file()
    # dense gammas: every removed one scores above warn_gamma, but the ratio was measured safe: a note, no warning
    assert not [w for w in _warnings(said) if "warn_gamma" in w]
    (line,) = [w for w in said.splitlines() if "warn_gamma" in w]
    assert "ratio 30% is within the safe ratio 30%" in line and "no warning" in line
    # above the measured safe ratio, the warning names it
    said, _ = _prune(dense, "0.5")
    (line,) = [w for w in _warnings(said) if "warn_gamma" in w]
    assert f"the safe ratio (top-1 drop within prune.max_drop=2 pt) is 30% (metrics/sensitivity/{ARCH}-0.5.json)" \
        in line


def test_flops_target_writes_its_files_and_lands_or_says_why(tmp_path: Path) -> None:
    project = _project(tmp_path, **{"model.width": WIDTH})
    _sparse(project, "bimodal")
    said, report = _prune(project, "flops0.6")
    assert report["target"] == "flops0.6" and 0 < report["requested_ratio"] < 1
    assert report["search_steps"] >= 1
    achieved = report["flops_after"] / report["flops_before"]
    assert achieved == pytest.approx(report["flops_fraction"])
    if report["exact"]:
        assert abs(achieved - 0.6) <= 0.006 and not report["bound_by"]
    else:  # a tiny model: the granularity may bound it, and the stage says so
        assert report["bound_by"] and any("keeps" in w and "bound by" in w for w in _warnings(said))
    assert report["nonnegligible_removed"] == 0 and not [w for w in _warnings(said) if "warn_gamma" in w]
    for name in ("pruned-flops0.6.pt", "pruned-flops0.6-nofold.pt"):
        assert (project / "models" / ARCH / name).is_file()
    from slimcore.checkpoint import load_model
    from slimcore.flops import count_flops

    pruned = load_model(project / "models" / ARCH / "pruned-flops0.6.pt")
    assert count_flops(pruned, 8) == report["flops_after"]
    assert isinstance(pruned, nn.Module)


def test_speedup_target_writes_its_files_and_reaches_the_speedup_or_says_why(tmp_path: Path) -> None:
    project = _project(tmp_path, **{"model.width": WIDTH})
    _sparse(project, "bimodal")
    said, report = _prune(project, "speedup1.5")
    assert report["target"] == "speedup1.5" and 0 < report["requested_ratio"] < 1
    speedup = report["flops_before"] / report["flops_after"]
    if report["exact"]:
        assert abs(report["flops_fraction"] - 1 / 1.5) <= 0.01 / 1.5 and not report["bound_by"]
    else:  # a tiny model: the granularity may bound it, and the stage says so in MAC speed-up terms
        (line,) = [w for w in _warnings(said) if "bound by" in w]
        assert f"reaches a MAC speed-up of {speedup:.3g}x" in line and "for a target of 1.5x" in line
    for name in ("pruned-speedup1.5.pt", "pruned-speedup1.5-nofold.pt"):
        assert (project / "models" / ARCH / name).is_file()
    proc = _stage(project, "prune", "--arch", ARCH, "--target", "speedup1.50")
    assert proc.returncode == 2 and "write it 'speedup1.5'" in _said(proc)


def test_unreachable_target_warns_with_what_bounds_it(tmp_path: Path) -> None:
    project = _project(tmp_path, **{"model.width": WIDTH, "prune.min_keep_fraction": 0.8})
    _sparse(project, "bimodal")
    said, report = _prune(project, "params0.1")
    assert not report["exact"] and report["bound_by"][0].startswith("floor:")
    (line,) = [w for w in _warnings(said) if "bound by" in w]
    assert f"prune@{ARCH}-params0.1: keeps" in line and "of the parameters for a target of 10.00%" in line
    assert "min_keep_fraction=0.8" in line
