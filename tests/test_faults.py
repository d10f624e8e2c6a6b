"""Faults and bad input at the stage level: clear errors, nothing written, runs resume.

Every stage runs as users run it (``python -m stages.X`` in a project folder), as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.helpers.params import DELETE, tiny_params

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vgg16_bn"
CKPT = Path("models") / ARCH / "baseline.pt"
STATE = Path(".slimcore") / "resume" / ARCH / "baseline-train.pt"
CURVES = Path("metrics") / ARCH / "baseline-train" / "metrics.json"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _tiny_params(**changes: Any) -> dict[str, Any]:
    return tiny_params(ARCH, {"epochs": 4, "warmup_epochs": 1, "milestones": [3], "batch_size": 32},
                       {"device": "cpu", "threads": 1}, changes)


_DELETE = DELETE


def _project(tmp_path: Path, **changes: Any) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_tiny_params(**changes), sort_keys=False))
    return tmp_path


def _stage(project: Path, module: str, *args: str, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", f"stages.{module}", *args], cwd=project, env=_env(),
                          capture_output=True, text=True, timeout=300)


def _said(proc: subprocess.CompletedProcess[str]) -> str:
    """What the stage told the user (its log and errors go to stderr), without -X importtime lines."""
    return proc.stdout + "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time"))


def _files(project: Path) -> set[str]:
    return {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------
# 1. bad params: one message naming the key, exit 2, nothing written, torch never imported
# --------------------------------------------------------------------------------------------

BAD_PARAMS = [
    ({"train.epochs_typo": 3}, ["train.epochs_typo"]),
    ({"colour": "blue"}, ["colour"]),
    ({"train.lr": "fast"}, ["train.lr"]),
    ({"train.lr": -0.1}, ["train.lr"]),
    ({"train.epochs": 0}, ["train.epochs"]),
    ({"prune.targets": [0.2, 1.0]}, ["prune.targets"]),
    ({"prune.targets": []}, ["prune.targets"]),
    ({"prune.targets": ["flops2.0"]}, ["prune.targets", "0 < F < 1"]),
    ({"archs": ["vgg16_bn", "resnet5O"]}, ["archs", "resnet5O", "did you mean resnet50", "vgg16_bn, resnet50"]),
    ({"data.name": "imagenet"}, ["data.name", "digits", "fashionmnist", "cifar10", "svhn", "imagefolder"]),
    ({"data.image_size": 4}, ["data.image_size", ">= 8"]),
    ({"penalty.strength.vgg16_bn": _DELETE}, ["penalty.strength.vgg16_bn"]),
]


@pytest.mark.parametrize("changes,named", BAD_PARAMS, ids=[next(iter(c)) + "=" + str(next(iter(c.values())))[:12]
                                                          for c, _ in BAD_PARAMS])
def test_bad_params_fail_fast_naming_the_key_and_write_nothing(tmp_path: Path, changes: dict[str, Any],
                                                               named: list[str]) -> None:
    project = _project(tmp_path, **changes)
    (project / CKPT).parent.mkdir(parents=True)
    (project / CKPT).write_bytes(b"an earlier run's checkpoint")
    before = _files(project)
    proc = _stage(project, "baseline_train", "--arch", ARCH, importtime=True)
    message = _said(proc)
    assert proc.returncode == 2, message[-3000:]
    assert "error:" in message and all(word in message for word in named), message
    assert "Traceback" not in message
    assert _files(project) == before and (project / CKPT).read_bytes() == b"an earlier run's checkpoint"
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "torch" not in imported, "validation must fail before torch is imported (start-up stays < 2 s)"


@pytest.mark.parametrize("module,args,named", [
    ("baseline_train", ["--arch", ARCH, "--epochs", "-1"], ["train.epochs"]),
    ("baseline_train", ["--arch", ARCH, "--lr", "0"], ["train.lr"]),
    ("baseline_train", ["--arch", "resnet50"], ["resnet50", "archs"]),
    ("prune", ["--arch", ARCH, "--target", "1.5"], ["--target", "[0, 1)"]),
    ("prune", ["--arch", ARCH, "--target", "flops"], ["--target", "unknown target", "flopsF"]),
    ("prune", ["--arch", ARCH, "--target", "safe"],
     ["metrics/sensitivity/vgg16_bn-safe.json", "sensitivity@vgg16_bn-safe"]),
])
def test_bad_options_by_hand_fail_the_same_way(tmp_path: Path, module: str, args: list[str], named: list[str]) -> None:
    project = _project(tmp_path)
    proc = _stage(project, module, *args)
    assert proc.returncode == 2, _said(proc)[-3000:]
    assert all(word in _said(proc) for word in named), _said(proc)
    assert _files(project) == {"params.yaml"}


# --------------------------------------------------------------------------------------------
# 2. missing or bad data; 5. non-finite loss
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_missing_dataset_root_names_the_path(tmp_path: Path) -> None:
    project = _project(tmp_path, **{"data.name": "cifar10", "data.root": "no/such/folder"})
    proc = _stage(project, "baseline_train", "--arch", ARCH)
    said = _said(proc)
    assert proc.returncode == 2, said[-3000:]
    assert "no/such/folder" in said and "cifar-10-batches-py" in said, said
    assert not (project / "models").exists()


@pytest.mark.slow
def test_diverging_loss_stops_with_epoch_and_step_and_saves_no_checkpoint(tmp_path: Path) -> None:
    project = _project(tmp_path, **{"train.lr": 1e12, "train.warmup_epochs": 0, "train.milestones": []})
    proc = _stage(project, "baseline_train", "--arch", ARCH)
    said = _said(proc)
    assert proc.returncode == 3, said[-3000:]
    assert "epoch 1, step" in said and "loss is" in said, said
    assert not (project / CKPT).exists()


# --------------------------------------------------------------------------------------------
# 4. resume after SIGKILL / SIGTERM, and 6. determinism
# --------------------------------------------------------------------------------------------


def _digests(project: Path) -> dict[str, str]:
    """md5 of every output a stage wrote, except the wall-clock files under metrics/timings/."""
    out = {}
    for path in sorted(project.rglob("*")):
        rel = path.relative_to(project)
        if path.is_file() and rel.parts[0] in ("models", "metrics") and rel.parts[:2] != ("metrics", "timings"):
            out[rel.as_posix()] = hashlib.md5(path.read_bytes()).hexdigest()
    return out


def _trained(project: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any], dict[str, str]]:
    from slimcore.checkpoint import load_model_and_meta

    model, meta = load_model_and_meta(project / CKPT, expected_arch=ARCH)
    timings = json.loads((project / "metrics" / "timings" / ARCH / "baseline-train.json").read_text())
    assert [e["epoch"] for e in timings["epochs"]] == [h["epoch"] for h in meta["history"]]
    assert all(e["seconds"] > 0 for e in timings["epochs"])
    assert "seconds" not in json.dumps(meta), "wall-clock time in a checkpoint breaks byte-reproducibility"
    return model.state_dict(), meta["history"], json.loads((project / CURVES).read_text()), _digests(project)


def _start_and_signal_after_first_epoch(project: Path, sig: int) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen([sys.executable, "-m", "stages.baseline_train", "--arch", ARCH], cwd=project,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (project / STATE).exists():  # epoch 1 finished and saved: the run is in epoch 2
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its first epoch was saved"
        time.sleep(0.005)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert not (project / CKPT).exists(), f"the run finished before the signal landed:\n{out}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ...]:
    project = _project(tmp_path_factory.mktemp("straight"))
    proc = _stage(project, "baseline_train", "--arch", ARCH)
    assert proc.returncode == 0, _said(proc)[-3000:]
    return _trained(project)


def _assert_same_run(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    weights_a, history_a, curves_a, digests_a = a
    weights_b, history_b, curves_b, digests_b = b
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    # json: NaN (a split not evaluated, e.g. test without train.eval_test) equals NaN here
    assert json.dumps(history_a, sort_keys=True) == json.dumps(history_b, sort_keys=True)
    assert json.dumps(curves_a, sort_keys=True) == json.dumps(curves_b, sort_keys=True)
    assert CKPT.as_posix() in digests_a and CURVES.as_posix() in digests_a
    assert digests_a == digests_b, "same params, code and data must give byte-identical outputs"


@pytest.mark.slow
def test_same_params_and_seed_give_identical_weights_and_metrics(tmp_path: Path,
                                                                 uninterrupted: tuple[Any, ...]) -> None:
    project = _project(tmp_path)
    proc = _stage(project, "baseline_train", "--arch", ARCH)
    assert proc.returncode == 0, _said(proc)[-3000:]
    _assert_same_run(uninterrupted, _trained(project))


@pytest.mark.slow
def test_prune_stage_twice_gives_byte_identical_outputs(tmp_path: Path) -> None:
    """A prune stage re-run on the same sparse model writes the same bytes (only its timing differs)."""
    from slimcore.checkpoint import save_model
    from slimcore.models import build_model
    from tests.conftest import randomize_bn

    project = _project(tmp_path, **{"model.width": 0.125})
    save_model(project / "models" / ARCH / "sparse-0.5.pt", randomize_bn(build_model(ARCH, 10, "cifar", 0.125)))
    runs = []
    for _ in range(2):
        proc = _stage(project, "prune", "--arch", ARCH, "--target", "0.5")
        assert proc.returncode == 0, _said(proc)[-3000:]
        runs.append(_digests(project))
        assert json.loads((project / "metrics" / "timings" / ARCH / "prune-0.5.json").read_text())["seconds"] > 0
    assert {"models/vgg16_bn/pruned-0.5.pt", "models/vgg16_bn/pruned-0.5-nofold.pt",
            "metrics/prune/vgg16_bn-0.5.json"} <= set(runs[0])
    assert runs[0] == runs[1]
    assert "seconds" not in (project / "metrics" / "prune" / f"{ARCH}-0.5.json").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path: Path, sig: int,
                                                                 uninterrupted: tuple[Any, ...]) -> None:
    project = _project(tmp_path)
    killed = _start_and_signal_after_first_epoch(project, sig)
    if sig == signal.SIGTERM:  # handled like Ctrl-C: a clean stop that says how to resume
        assert killed.returncode == 130, killed.stdout
        assert "interrupted" in killed.stdout and "resume" in killed.stdout, killed.stdout
    else:
        assert killed.returncode == -signal.SIGKILL
    assert (project / STATE).is_file()
    resumed = _stage(project, "baseline_train", "--arch", ARCH)
    assert resumed.returncode == 0, _said(resumed)[-3000:]
    assert "resuming after epoch" in _said(resumed), _said(resumed)
    assert not (project / STATE).exists(), "the resume state is removed once the checkpoint is saved"
    _assert_same_run(uninterrupted, _trained(project))


def test_arch_names_are_read_from_torchvision_without_importing_it() -> None:
    """The fast, torch-free list of classification models is torchvision's own list."""
    import torchvision

    from slimcore.archs import classification_archs

    assert classification_archs() == tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def test_resume_fingerprint_changes_with_the_code_and_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume state from other code or other data is never continued (it was: a run killed before
    an upgrade resumed under the new code and trained a different model)."""
    import os
    import shutil

    from stages import _training

    code = tmp_path / "code"
    for folder in _training.CODE_FOLDERS:
        shutil.copytree(ROOT / folder, code / folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(_training, "CODE_ROOT", code)
    before = _training.code_signature()
    assert _training.code_signature() == before  # stable
    for edited in ("slimcore_pipeline/train.py", "slimcore/penalty.py"):  # the pipeline and the engine
        with (code / edited).open("a") as f:
            f.write("\n# a local edit\n")
        assert _training.code_signature() != before
        before = _training.code_signature()

    data = tmp_path / "data"
    (data / "train" / "c0").mkdir(parents=True)
    image = data / "train" / "c0" / "0.png"
    image.write_bytes(b"x" * 10)
    (data / "train" / "c0" / "loop").symlink_to(data / "train")  # never followed: no hang
    first = _training.data_signature(data)
    assert _training.data_signature(data) == first
    image.write_bytes(b"y" * 11)
    assert _training.data_signature(data) != first
    stamp = _training.data_signature(data)
    os.utime(image, ns=(1, 1))
    assert _training.data_signature(data) != stamp
    assert _training.data_signature(tmp_path / "absent") == "-"
