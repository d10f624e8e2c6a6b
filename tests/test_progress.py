"""Progress lines ("stage N/M", elapsed, what is left), unpadded logs, DVC's stage names, the
fair thread share, and messages that agree with each other (prune's warn_gamma, the threshold)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from slimcore_pipeline import paths, progress, runtime

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_stages_are_named_as_dvc_names_them() -> None:
    stages = progress.pipeline_stages(ROOT / "dvc.yaml", ROOT / "params.yaml")
    assert len(stages) == 41 and len(set(stages)) == 41
    assert stages[:3] == ["baseline-train@vgg16_bn", "baseline-train@resnet50", "baseline-train@mobilenet_v2"]
    assert "prune@resnet50-0.6" in stages and "finetune@vgg16_bn-0.2" in stages
    assert stages[-2:] == ["profile", "evaluate"]


def test_log_names_are_dvc_stage_names() -> None:
    assert paths.stage_name("finetune-0.2", "vgg16_bn") == "finetune@vgg16_bn-0.2"
    assert paths.stage_name("finetune-flops0.5", "resnet50") == "finetune@resnet50-flops0.5"
    assert paths.stage_name("sparse-train-speedup2", "mobilenet_v2") == "sparse-train@mobilenet_v2-speedup2"
    assert paths.stage_name("sensitivity-0.2", "resnet50") == "sensitivity@resnet50-0.2"
    assert paths.stage_name("baseline-train", "resnet50") == "baseline-train@resnet50"
    assert not [p for p in (ROOT / "stages").glob("*.py") if '{run}@{arch}' in p.read_text()]


def test_the_start_line_says_n_of_m_elapsed_and_an_upper_bound() -> None:
    stages = ["a@x", "a@y", "b", "c"]
    line = progress.start_line("a@y", stages, ["a@x", "a@y"], 65.0, {"a@y": 10.0, "b": 20.0, "c": 30.0})
    assert line == ("stage 2/4 a@y: 1m05s since the run's first stage, at most ~1m00s left (last durations of "
                    "this and the 2 stages not started; unchanged ones are skipped)")
    assert progress.start_line("b", stages, ["b"], 0.0, {}) == \
        "stage 1/4 b: 0s since the run's first stage, no estimate yet (no stage timed before)"
    by_hand = progress.start_line("b", stages, ["b"], None, {"b": 3.0})
    assert by_hand == "stage b (not under dvc repro); last run took 3s"
    assert progress.clock(3700) == "1h01m"


def test_announce_counts_the_stages_of_one_run_and_records_durations(tmp_path: Path, monkeypatch) -> None:
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(progress, "dvc_run_id", lambda: "123-456")
    said: list[str] = []
    for name in ("baseline-train@vgg16_bn", "sparse-train@vgg16_bn-0.2"):
        with progress.announce(name, said.append):
            pass
    assert said[0].startswith("stage 1/41 baseline-train@vgg16_bn: 0s since the run's first stage")
    assert said[2].startswith("stage 2/41 sparse-train@vgg16_bn-0.2: 0s since the run's first stage, at most ~")
    assert said[1].startswith("stage baseline-train@vgg16_bn: done in ")
    durations = progress._read(progress.STATE_DIR / progress.DURATIONS)
    assert set(durations) == {"baseline-train@vgg16_bn", "sparse-train@vgg16_bn-0.2"}
    monkeypatch.setattr(progress, "pipeline_stages", lambda: 1 / 0)  # bookkeeping never fails a stage
    with progress.announce("evaluate", said.append):
        pass


def test_log_lines_are_not_padded() -> None:
    code = "from slimcore_pipeline.console import console; console.log('x [bold]y[/]'); console.print('z' * 300)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = done.stderr.splitlines()
    assert lines[0].endswith("] x y") and lines[1] == "z" * 300  # no trailing spaces, not wrapped


def test_threads_default_to_a_fair_share() -> None:
    assert runtime.fair_threads(cores=2, running=2) == (1, "2 cores / 2 running stage processes")
    assert runtime.fair_threads(cores=2, running=1)[0] == 2
    assert runtime.fair_threads(cores=8, running=1, world=4)[0] == 2
    assert runtime.fair_threads(cores=1, running=3)[0] == 1
    assert runtime.running_stages() >= 1
    import torch

    from slimcore_pipeline.config import RuntimeConfig

    runtime.current_context(RuntimeConfig(device="cpu", threads=0))
    assert torch.get_num_threads() == runtime.fair_threads()[0]
    runtime.current_context(RuntimeConfig(device="cpu", threads=1))
    assert torch.get_num_threads() == 1


def test_running_stages_counts_stage_processes(tmp_path: Path) -> None:
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "nap.py").write_text("import time\ntime.sleep(30)\n")
    procs = [subprocess.Popen([sys.executable, "-m", "stages.nap"], cwd=tmp_path) for _ in range(2)]
    try:
        import time

        time.sleep(0.5)
        assert runtime.running_stages() >= 2
        assert runtime.fair_threads(cores=2)[0] == 1
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _report(**kw):
    base = {"nonnegligible_removed": 2, "warn_gamma": 0.01, "threshold": 0.87, "requested_ratio": 0.6,
            "removed_bn_channels": 10}
    return SimpleNamespace(**{**base, **kw})


def test_warn_gamma_is_not_a_warning_at_or_below_the_safe_ratio() -> None:
    from stages.prune import gamma_note, gamma_warning, threshold_text

    assert gamma_warning("prune@r-0.6", _report(), "hint", safe_ratio=0.6) is None
    note = gamma_note("prune@r-0.6", _report(), 0.6, 2.0)
    assert note == ("prune@r-0.6: 2 removed channels score above prune.warn_gamma=0.01, but ratio 60% is within the "
                    "safe ratio 60% (validation top-1 drop <= 2 pt before fine-tuning, measured by the sensitivity "
                    "stage): no warning")
    line = gamma_warning("prune@r-0.6", _report(), "hint", safe_ratio=0.5)
    assert line.startswith("warning: prune@r-0.6: removes 2 channels") and gamma_note("x", _report(), 0.5, 2) is None
    assert gamma_warning("p", _report(), "hint", safe_ratio=None) is not None  # never measured: warn
    assert threshold_text(_report(threshold=0.0), "max") == \
        "every removed channel has |gamma| score 0 (zeroed by sparse training)"
    assert threshold_text(_report(), "max").startswith("last removed unit's score 0.87 (|gamma|, the max over")


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system python")
def test_a_stage_under_a_python_without_the_venv_says_to_activate_it() -> None:
    check = subprocess.run(["/usr/bin/python3", "-c", "import typer"], capture_output=True)
    if check.returncode == 0:
        pytest.skip("the system python has typer")
    done = subprocess.run(["/usr/bin/python3", "-m", "stages.prune", "--arch", "x", "--target", "0.2"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "run `source .venv/bin/activate` first (or `make repro`, which uses .venv)" in done.stderr
    assert "Traceback" not in done.stderr
