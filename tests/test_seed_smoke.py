"""``make seed-smoke``: the preset end to end on synthetic CIFAR-100, timed per stage.

The unit tests are fast; the last test runs the whole smoke on CPU at a tiny size (32px,
width 0.125, one arch, one prune target): six stage subprocesses, about 45 s on 2 shared cores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from slimcore_pipeline import seed_smoke
from slimcore_pipeline.config import load_params
from slimcore_pipeline.seed_smoke import (
    SmokeOptions,
    StageResult,
    app,
    read_stage_timing,
    smoke_params,
    stage_plan,
    train_steps,
)

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "seed-cifar100.yaml"


def test_smoke_params_keep_the_preset_but_the_schedule(tmp_path: Path) -> None:
    preset = load_params(PRESET)
    params = smoke_params(SmokeOptions(preset=PRESET), tmp_path / "data", nproc=2)
    assert (params.data.name, params.data.root, params.data.image_size) == ("cifar100", str(tmp_path / "data"), 224)
    assert params.model == preset.model and params.archs == preset.archs and params.prune == preset.prune
    # AMP, channels_last: as the preset; no DataLoader workers for a few in-memory batches
    assert params.runtime == preset.runtime.model_copy(update={"nproc": 2, "num_workers": 0})
    assert params.penalty.strength == preset.penalty.strength
    for run, cfg in (("train", params.train), ("finetune", params.finetune)):
        assert (cfg.epochs, cfg.warmup_epochs, cfg.milestones) == (1, 0, []), run
        assert cfg.model_dump(exclude={"epochs", "warmup_epochs", "milestones"}) == \
            getattr(preset, run).model_dump(exclude={"epochs", "warmup_epochs", "milestones"})
    assert params.profile.latency_runs < preset.profile.latency_runs
    small = smoke_params(SmokeOptions(preset=PRESET, image_size=32, width=0.125, archs=["resnet50"], targets=[0.5],
                                      batch_size=8, sets={"runtime.num_workers": 1}), tmp_path, nproc=1)
    assert (small.data.image_size, small.model.width, small.archs, small.prune.targets) == (32, 0.125, ["resnet50"],
                                                                                           [0.5])
    assert (small.train.batch_size, small.finetune.batch_size, small.runtime.num_workers) == (8, 8, 1)


def test_stage_plan_follows_the_pipeline(tmp_path: Path) -> None:
    params = smoke_params(SmokeOptions(preset=PRESET, archs=["vgg16_bn", "resnet50"], targets=[0.2, 0.5],
                                       batch_size=16), tmp_path, nproc=2)
    plan = stage_plan(params, train_images=100, test_images=30, val_images=10)
    names = [stage.name for stage in plan]
    assert names == [
        "baseline-train@vgg16_bn", "sparse-train@vgg16_bn-0.2", "sparse-train@vgg16_bn-0.5",
        "sensitivity@vgg16_bn-0.2", "sensitivity@vgg16_bn-0.5", "prune@vgg16_bn-0.2", "prune@vgg16_bn-0.5",
        "finetune@vgg16_bn-0.2", "finetune@vgg16_bn-0.5",
        "baseline-train@resnet50", "sparse-train@resnet50-0.2", "sparse-train@resnet50-0.5",
        "sensitivity@resnet50-0.2", "sensitivity@resnet50-0.5", "prune@resnet50-0.2", "prune@resnet50-0.5",
        "finetune@resnet50-0.2", "finetune@resnet50-0.5", "profile", "evaluate"]
    by_name = {stage.name: (stage.args, stage.images) for stage in plan}
    timing = {stage.name: stage.timing for stage in plan}
    assert timing["sparse-train@vgg16_bn-0.5"] == Path("metrics/timings/vgg16_bn/sparse-train-0.5.json")
    assert timing["prune@resnet50-0.5"] == Path("metrics/timings/resnet50/prune-0.5.json")
    assert timing["finetune@resnet50-0.2"] == Path("metrics/timings/resnet50/finetune-0.2.json")
    assert timing["profile"] is None and timing["evaluate"] is None
    assert timing["sensitivity@resnet50-0.2"] == Path("metrics/timings/resnet50/sensitivity-0.2.json")
    # the validation split, for the unpruned model and each of the 19 ratios of the 0.05 grid
    assert by_name["sensitivity@resnet50-0.2"] == (["stages.sensitivity", "--arch", "resnet50", "--target", "0.2"],
                                                   10 * 20)
    assert by_name["prune@resnet50-0.5"] == (["stages.prune", "--arch", "resnet50", "--target", "0.5"], None)
    # 100 images over 2 processes: 50 each, 3 full batches of 16 -> 3 x 16 x 2 images a step
    assert train_steps(100, 16, 2) == 3
    assert by_name["sparse-train@vgg16_bn-0.2"] == (["stages.sparse_train", "--arch", "vgg16_bn", "--target", "0.2"],
                                                    96)
    assert by_name["finetune@resnet50-0.2"][1] == 96
    assert by_name["evaluate"] == (["stages.evaluate"], 30 * 2 * 9)  # 9 checkpoints per arch: 1 + 4 per target
    assert by_name["profile"][1] is None


def test_stage_timing_is_read_from_the_file_the_stage_writes(tmp_path: Path) -> None:
    train = tmp_path / "sparse-train.json"
    train.write_text(json.dumps({"device": "cpu", "seconds": 2.0, "images_per_second": 500.0, "epochs": []}))
    prune = tmp_path / "prune-0.5.json"
    prune.write_text(json.dumps({"seconds": 0.3}))
    assert read_stage_timing(train) == (2.0, 500.0)
    assert read_stage_timing(prune) == (0.3, None)
    assert read_stage_timing(tmp_path / "missing.json") == (None, None)

    timed = StageResult("sparse-train@vgg16_bn", [], 640, wall_seconds=10.0, timed_seconds=2.0,
                        timed_images_per_second=500.0)
    assert (timed.images_per_second, timed.source) == (500.0, "metrics/timings")
    wall = StageResult("baseline-train@vgg16_bn", [], 640, wall_seconds=10.0)
    assert (wall.images_per_second, wall.source) == (64.0, "wall s")
    assert StageResult("prune@vgg16_bn-0.2", [], None, wall_seconds=3.0).images_per_second is None


def test_smoke_refuses_a_machine_without_cuda_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, [str(PRESET), "--workdir", str(tmp_path / "ws")])
    assert result.exit_code == 2, result.output
    assert "no CUDA GPU" in result.output and "--allow-cpu" in result.output
    assert not (tmp_path / "ws" / "logs").exists()
    result = CliRunner().invoke(app, [str(PRESET), "--allow-cpu", "--train-images", "10", "--batch-size", "16"])
    assert result.exit_code == 2 and "fewer than one batch of 16" in result.output


def test_a_failing_stage_stops_the_smoke_and_keeps_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prune with no sparse checkpoint fails: exit 1, the log's end is shown and the workspace stays."""
    prune = seed_smoke.PlannedStage("prune@vgg16_bn-0.5", ["stages.prune", "--arch", "vgg16_bn", "--target", "0.5"],
                                    None, None)
    monkeypatch.setattr(seed_smoke, "stage_plan", lambda *_: [prune])
    workspace = tmp_path / "ws"
    result = CliRunner().invoke(app, [str(PRESET), "--allow-cpu", "--image-size", "32", "--width", "0.125",
                                      "--archs", "vgg16_bn", "--targets", "0.5", "--batch-size", "4",
                                      "--train-images", "104", "--test-images", "4", "--workdir", str(workspace)])
    assert result.exit_code == 1, result.output
    log = workspace / "logs" / "01-prune-vgg16_bn-0.5.log"
    assert f"prune@vgg16_bn-0.5 exited with 2 (log: {log})" in result.output
    assert "sparse-0.5.pt" in log.read_text() and "sparse-0.5.pt" in result.output
    assert (workspace / "params.yaml").is_file()


def test_the_smoke_refuses_data_without_a_validation_split(tmp_path: Path) -> None:
    """8 images of 100 classes: each class keeps its only image for training, the sensitivity stage
    would have nothing to measure: refused before any stage runs."""
    result = CliRunner().invoke(app, [str(PRESET), "--allow-cpu", "--image-size", "32", "--width", "0.125",
                                      "--archs", "vgg16_bn", "--targets", "0.5", "--batch-size", "4",
                                      "--train-images", "8", "--test-images", "4", "--workdir", str(tmp_path / "ws")])
    assert result.exit_code == 2, result.output
    assert "no validation split" in result.output and "at least 2 training images" in result.output


@pytest.mark.slow
def _digests(folder: Path) -> dict[str, str]:
    """md5 of every checkpoint and report a smoke wrote (wall-clock files and logs excluded)."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and "timings" not in p.parts
             and p.relative_to(folder).parts[0] in ("models", "metrics")]
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


def test_seed_smoke_runs_every_stage_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real thing, tiny: synthetic CIFAR-100 through every stage, in this process and as one
    subprocess per stage (as DVC runs them), with the same bytes out; a table and JSON at the end."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # 2 shared cores: spinning thread pools double the time
        monkeypatch.setenv(var, "1")
    for var in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR"):
        monkeypatch.delenv(var, raising=False)  # set by stages earlier tests ran here: the subprocesses inherit them
    runs = {}
    for mode in ("in-process", "--subprocess"):
        workspace, report = tmp_path / mode.strip("-"), tmp_path / f"{mode.strip('-')}.json"
        result = CliRunner().invoke(app, [
            str(PRESET), "--allow-cpu", "--image-size", "32", "--width", "0.125", "--archs", "vgg16_bn",
            "--targets", "0.5", "--batch-size", "16", "--train-images", "128", "--test-images", "32",
            "--set", "runtime.num_workers=2", "--set", "runtime.threads=1",  # the same threads in both modes
            # native kernels in both modes: earlier tests have already run torch in this process natively,
            # after which its CPU kernels can no longer be pinned to AVX2 here (a fresh CLI process is)
            "--set", "runtime.cpu_isa=native",
            "--set", "prune.sensitivity_step=0.25",
            "--workdir", str(workspace), "--keep", "--json", str(report),
            *([mode] if mode.startswith("--") else [])])
        assert result.exit_code == 0, result.output + "".join(
            f"\n--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(workspace.glob("logs/*.log")))
        runs[mode] = _digests(workspace)
        stages = json.loads(report.read_text())["stages"]
        assert [s["stage"] for s in stages] == ["baseline-train@vgg16_bn", "sparse-train@vgg16_bn-0.5",
                                                "sensitivity@vgg16_bn-0.5", "prune@vgg16_bn-0.5",
                                                "finetune@vgg16_bn-0.5", "profile", "evaluate"]
        # 128 images of 100 classes: the 28 classes with two give one each to the validation split,
        # 100 train (6 batches of 16); the sensitivity stage reads the 28 for the unpruned model and 3 ratios
        assert [s["images"] for s in stages] == [96, 96, 28 * 4, None, 96, None, 32 * 5]
        assert all(s["wall_seconds"] > 0 for s in stages)
        assert all((s["images_per_second"] or 0) > 0 for s in stages if s["images"])
        # the stages ran on the preset's settings, on the synthetic data, in the workspace only
        params = yaml.safe_load((workspace / "params.yaml").read_text())
        assert params["data"] == {**params["data"], "name": "cifar100", "image_size": 32,
                                  "root": str(workspace / "data")}
        assert params["runtime"]["amp"] == "bf16" and params["model"]["stem"] == "imagenet"
        evals = json.loads((workspace / "metrics" / "eval.json").read_text())
        assert set(evals["vgg16_bn"]) == {"baseline", "sparse-0.5", "pruned-0.5", "pruned-0.5-nofold",
                                          "finetuned-0.5"}
        assert (workspace / "metrics" / "results.md").is_file()
        for stage in ("baseline-train@vgg16_bn", "evaluate"):
            assert stage in result.output
        assert "images/s" in result.output and "wall s" in result.output
        assert ("as subprocesses" in result.output) == mode.startswith("--"), result.output
    assert "models/vgg16_bn/finetuned-0.5.pt" in runs["in-process"]
    assert runs["in-process"] == runs["--subprocess"], "running the stages in one process changed their outputs"
