"""DistributedDataParallel on CPU (gloo): the same result as one process with the same global batch.

Two torchrun workers with batch B each must train exactly what one process with batch 2B
trains (DistributedSampler shards the same permutation; DDP averages gradients; the train
metrics are reduced across ranks).  BatchNorm is frozen in that comparison: with live BN each
rank normalises by its own half-batch statistics (no SyncBatchNorm on CPU), which is the one
expected difference.  Tolerance: 1e-6 absolute on every weight, 1e-6 on the epoch metrics.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "helpers" / "ddp_worker.py"
TOL = 1e-6


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"$ {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_two_gloo_workers_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    _run([sys.executable, str(WORKER), str(single), "32"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(WORKER), str(ddp), "16"], tmp_path)
    one, two = torch.load(single), torch.load(ddp)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, atol=TOL, rtol=0, msg=key)
    for a, b in zip(one["history"], two["history"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < TOL and abs(a["train_top1"] - b["train_top1"]) < TOL
    # the comparison is not vacuous: both started from the same weights and training moved them
    for key, value in one["init"].items():
        torch.testing.assert_close(two["init"][key], value, atol=0, rtol=0)
    moved = max(float((one["state_dict"][k].float() - v.float()).abs().max()) for k, v in one["init"].items())
    assert moved > 1e-2, moved


def test_stage_relaunches_itself_under_torchrun_and_only_rank_0_writes(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["archs"] = ["vgg16_bn"]
    params["data"]["image_size"] = 8
    params["model"]["width"] = 0.0625
    params["train"].update(epochs=1, warmup_epochs=0, milestones=[], batch_size=16)
    params["runtime"].update(nproc=2, device="cpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = _run([sys.executable, "-m", "stages.baseline_train", "--arch", "vgg16_bn"], tmp_path)
    out = proc.stdout + proc.stderr
    assert "relaunching under torchrun" in out
    assert out.count("epoch 1/1") == 1, out  # rank 1 trains silently
    assert out.count("saved models/vgg16_bn/baseline.pt") == 1, out

    from slimcore.checkpoint import load_model

    model = load_model(tmp_path / "models" / "vgg16_bn" / "baseline.pt", expected_arch="vgg16_bn")
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert (tmp_path / "metrics" / "vgg16_bn" / "baseline-train" / "metrics.json").is_file()
    assert not (tmp_path / ".slimcore" / "resume" / "vgg16_bn" / "baseline-train.pt").exists()


def test_sigterm_to_a_multi_process_stage_ends_in_exit_130_without_a_traceback(tmp_path: Path) -> None:
    """torchrun's agent turns SIGTERM into a SignalException traceback and exit 1; the stage's
    launcher (slimcore_pipeline.launch) ends like its workers: exit 130, the one-line interrupt message."""
    import signal
    import time

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["archs"] = ["vgg16_bn"]
    params["data"]["image_size"] = 8
    params["model"]["width"] = 0.0625
    params["train"].update(epochs=200, warmup_epochs=0, milestones=[], batch_size=16)
    params["runtime"].update(nproc=2, device="cpu", threads=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.Popen([sys.executable, "-m", "stages.baseline_train", "--arch", "vgg16_bn"], cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    resume = tmp_path / ".slimcore" / "resume" / "vgg16_bn" / "baseline-train.pt"
    deadline = time.monotonic() + 120
    while not resume.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # wait until the workers train (a finished epoch saved its resume state)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "SignalException" not in out, out
    assert "interrupted" in out, out
    assert not (tmp_path / "models" / "vgg16_bn" / "baseline.pt").exists()
