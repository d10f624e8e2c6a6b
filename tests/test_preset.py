"""``make seed``: the preset as ``dvc exp run -S`` overrides, and the refusals before anything starts.

Fast: no training and no DVC run; ``dvc exp run`` itself is replaced by a recorder.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from slimcore.errors import ParamsError
from slimcore_pipeline import preset as preset_mod
from slimcore_pipeline.config import load_params
from slimcore_pipeline.preset import (
    DeviceError,
    after_run_hint,
    app,
    check_device,
    check_round_trip,
    exp_run_args,
    format_value,
    overrides_for,
    param_overrides,
    parse_sets,
    resolve_preset,
)
from slimcore_pipeline.synthetic import write_cifar

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "seed-cifar100.yaml"
PARAMS = ROOT / "params.yaml"


@pytest.fixture
def cifar(tmp_path: Path) -> Path:
    """A small synthetic CIFAR-100 root (what --cifar-root points at)."""
    write_cifar(tmp_path / "cifar", "cifar100", train_images=20, test_images=10)
    return tmp_path / "cifar"


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def have(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Fake GPU")
    return have


@pytest.fixture
def dvc_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the dvc command instead of running it."""
    calls: list[list[str]] = []

    def call(args: list[str], **_: object) -> int:
        calls.append(list(args))
        return 0

    monkeypatch.setattr(preset_mod.subprocess, "call", call)
    return calls


def _digest(*files: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(PRESET), "--params", str(PARAMS), *args])
    return result.exit_code, result.output


def _error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


# --------------------------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------------------------


def test_seed_preset_overrides_reproduce_the_preset_through_dvc(cifar: Path) -> None:
    """Applied by DVC's own -S code to a copy of params.yaml, the overrides give exactly the preset."""
    target = resolve_preset(PRESET, cifar)
    assert target.data.root == str(cifar.resolve())
    overrides = overrides_for(target, PARAMS)
    for expected in ("data.name=cifar100", "data.image_size=224", "model.stem=imagenet", "model.width=1.0",
                     "train.epochs=100", "train.milestones=[40,60,80]", "finetune.milestones=[20,30]",
                     "prune.round_to=8", "runtime.amp=bf16", "runtime.num_workers=8",
                     f"data.root={cifar.resolve()}"):
        assert expected in overrides, overrides
    assert not any(o.startswith(("seed=", "archs=", "prune.targets=", "~", "+")) for o in overrides), overrides
    check_round_trip(overrides, target, PARAMS)  # raises if DVC's rewrite would differ

    from dvc.utils.hydra import apply_overrides

    copy = cifar.parent / "params.yaml"
    shutil.copyfile(PARAMS, copy)
    apply_overrides(str(copy), overrides)
    assert load_params(copy) == target == resolve_preset(PRESET, cifar)
    assert load_params(copy) != load_params(PARAMS)


def test_relative_data_root_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_preset(PRESET).data.root == str(tmp_path / "data")  # the preset's own `root: data`
    assert resolve_preset(PRESET, "sub/cifar").data.root == str(tmp_path / "sub" / "cifar")
    assert resolve_preset(PRESET, sets={"data.root": "x"}).data.root == str(tmp_path / "x")


def test_param_overrides_in_hydra_grammar() -> None:
    target = {"a": 1.0, "b": {"c": [0.2, 0.4], "d": "bf16", "new": True}, "s": "a b", "path": "/x/y-z.1",
              "off": "off", "n": None, "m": {"k": 1}}
    current = {"a": 1, "b": {"c": [0.2, 0.4], "d": "auto"}, "s": "a b", "path": "/x", "off": "auto",
               "n": 0, "gone": 3}
    assert param_overrides(target, current) == [
        "a=1.0",  # int 1 in the file, float 1.0 wanted: changed
        "b.d=bf16", "+b.new=true", "path=/x/y-z.1", "off=off", "n=null", "+m={k:1}", "~gone",
    ]
    assert format_value([0.0, 1e-05, True, "it's"]) == "[0.0,1e-05,true,'it\\'s']"
    assert format_value("true") == "'true'" and format_value("1e3") == "'1e3'" and format_value("x y") == "'x y'"


def test_parse_sets_reads_yaml_values() -> None:
    assert parse_sets(["runtime.nproc=4", "archs=[resnet50]", "data.root=/a=b", "x="]) == {
        "runtime.nproc": 4, "archs": ["resnet50"], "data.root": "/a=b", "x": None}
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        parse_sets(["runtime.nproc"])


def test_exp_run_args_and_hint() -> None:
    assert exp_run_args("seed", ["a=1", "b=[1,2]"]) == ["exp", "run", "--temp", "-n", "seed", "-S", "a=1",
                                                         "-S", "b=[1,2]"]
    assert exp_run_args("seed", [], in_place=True) == ["exp", "run", "-n", "seed"]
    hint = after_run_hint("seed")
    for command in ("dvc exp show", "dvc exp apply seed", "dvc exp branch seed seed-results",
                    "git show seed-results:metrics/results.md"):
        assert command in hint


# --------------------------------------------------------------------------------------------
# the device
# --------------------------------------------------------------------------------------------


def test_check_device(gpus) -> None:  # type: ignore[no-untyped-def]
    runtime = resolve_preset(PRESET).runtime
    gpus(0)
    with pytest.raises(DeviceError, match=r"no CUDA GPU .*--allow-cpu"):
        check_device(runtime)
    assert check_device(runtime, allow_cpu=True).startswith("CPU")
    gpus(2)
    assert "Fake GPU" in check_device(runtime)
    with pytest.raises(DeviceError, match=r"runtime\.nproc: 4 processes but 2 GPU"):
        check_device(runtime.model_copy(update={"nproc": 4}))
    with pytest.raises(DeviceError, match=r"runtime\.device is cpu"):
        check_device(runtime.model_copy(update={"device": "cpu"}))
    gpus(0)
    with pytest.raises(DeviceError, match=r"runtime\.device: cuda"):
        check_device(runtime.model_copy(update={"device": "cuda"}), allow_cpu=True)


# --------------------------------------------------------------------------------------------
# the command line: refusals leave everything alone
# --------------------------------------------------------------------------------------------


def test_cli_refuses_a_machine_without_cuda(cifar: Path, no_gpu: None, dvc_calls: list) -> None:
    before = _digest(PARAMS, ROOT / "dvc.lock")
    code, output = _cli("--cifar-root", str(cifar))
    assert code == 2, output
    line = _error_line(output)
    assert "no CUDA GPU" in line and "--allow-cpu" in line and "ALLOW_CPU=1" in line
    assert dvc_calls == []
    assert _digest(PARAMS, ROOT / "dvc.lock") == before


@pytest.mark.parametrize("layout", ["missing", "empty", "cifar10"])
def test_cli_refuses_a_bad_cifar_root(tmp_path: Path, no_gpu: None, dvc_calls: list, layout: str) -> None:
    root = tmp_path / "root"
    if layout == "empty":
        (root / "cifar-100-python").mkdir(parents=True)
    elif layout == "cifar10":
        write_cifar(root, "cifar10", 10, 5)
    code, output = _cli("--cifar-root", str(root), "--allow-cpu")
    assert code == 2, output
    line = _error_line(output)
    assert f"{root}/cifar-100-python is not a cifar100 copy: missing train, meta" in line
    assert dvc_calls == []


def test_cli_refuses_an_invalid_preset_or_option(tmp_path: Path, cifar: Path, no_gpu: None, dvc_calls: list) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(PRESET.read_text()), "train": {"epochs": 0}}))
    result = CliRunner().invoke(app, [str(bad), "--cifar-root", str(cifar), "--allow-cpu"])
    assert result.exit_code == 2 and "train.epochs: Input should be greater than 0" in _error_line(result.output)
    code, output = _cli("--cifar-root", str(cifar), "--allow-cpu", "--set", "runtime.nproc")
    assert code == 2 and "expected KEY=VALUE" in _error_line(output)
    # DVC writes YAML 1.2 (`off` unquoted), the stages read YAML 1.1 (`off` is False): refused up front
    code, output = _cli("--cifar-root", str(cifar), "--allow-cpu", "--set", "runtime.channels_last='off'")
    assert code == 2 and "runtime.channels_last" in _error_line(output) and "YAML 1.2" in output
    assert dvc_calls == []


def test_cli_refuses_more_processes_than_gpus(cifar: Path, gpus, dvc_calls: list) -> None:  # type: ignore[no-untyped-def]
    gpus(2)
    code, output = _cli("--cifar-root", str(cifar), "--set", "runtime.nproc=4")
    assert code == 2 and "runtime.nproc: 4 processes but 2 GPU" in _error_line(output)
    assert dvc_calls == []


# --------------------------------------------------------------------------------------------
# the command line: what it runs
# --------------------------------------------------------------------------------------------


def test_cli_runs_dvc_exp_run_temp_with_the_overrides(cifar: Path, gpus, dvc_calls: list) -> None:  # type: ignore[no-untyped-def]
    gpus(4)
    before = _digest(PARAMS, ROOT / "dvc.lock")
    code, output = _cli("--cifar-root", str(cifar), "--set", "runtime.nproc=4")
    assert code == 0, output
    target = resolve_preset(PRESET, cifar, {"runtime.nproc": 4})
    assert dvc_calls == [[sys.executable, "-m", "dvc", *exp_run_args("seed-cifar100", overrides_for(target, PARAMS))]]
    assert "runtime.nproc=4" in dvc_calls[0] and "--temp" in dvc_calls[0]
    assert "dvc exp run --temp -n seed-cifar100 -S" in output
    assert "dvc exp apply seed-cifar100" in output and "dvc exp branch seed-cifar100" in output
    assert _digest(PARAMS, ROOT / "dvc.lock") == before


def test_cli_dry_run_and_allow_cpu(cifar: Path, no_gpu: None, dvc_calls: list) -> None:
    code, output = _cli("--cifar-root", str(cifar), "--allow-cpu", "--dry-run", "--name", "try")
    assert code == 0, output
    assert "dvc exp run --temp -n try -S data.name=cifar100" in output
    assert dvc_calls == []
    code, output = _cli("--cifar-root", str(cifar), "--allow-cpu", "--in-place", "--dry-run")
    assert code == 0 and "dvc exp run -n seed-cifar100 -S" in output


def test_cli_passes_dvc_failures_on(cifar: Path, gpus, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    gpus(1)
    monkeypatch.setattr(preset_mod.subprocess, "call", lambda *a, **k: 255)
    code, output = _cli("--cifar-root", str(cifar))
    assert code == 255
    assert "dvc exp run exited with 255" in output and "--in-place" in output


# --------------------------------------------------------------------------------------------
# the Fashion-MNIST CPU preset (make fashion-mnist)
# --------------------------------------------------------------------------------------------

FASHION_PRESET = ROOT / "configs" / "fashion-mnist.yaml"


def _tiny_fashion(folder: Path, per_class: int = 4) -> Path:
    """The four idx files (gzipped, flat, as Debian installs them) with a few 28x28 images."""
    import gzip
    import struct

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 10 * per_class), ("t10k", 10)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array, magic in (("images-idx3", images, 3), ("labels-idx1", labels, 1)):
            header = bytes([0, 0, 0x08, magic]) + struct.pack(f">{magic}I", *array.shape)
            (folder / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return folder


def test_fashion_mnist_preset_runs_on_cpu_as_an_experiment(tmp_path: Path, no_gpu: None,
                                                           dvc_calls: list[list[str]]) -> None:
    """What `make fashion-mnist` runs: the preset, validated, on CPU, as `dvc exp run --temp` overrides
    that DVC turns back into exactly the preset; the data checked before anything starts."""
    root = _tiny_fashion(tmp_path / "fashion")
    target = resolve_preset(FASHION_PRESET, root)
    assert (target.data.name, target.data.image_size, target.data.train_per_class) == ("fashionmnist", 28, 300)
    assert target.prune.targets == ["speedup2", "speedup4"] and target.penalty.target == "auto"
    overrides = overrides_for(target, PARAMS)
    check_round_trip(overrides, target, PARAMS)
    result = CliRunner().invoke(app, [str(FASHION_PRESET), "--params", str(PARAMS), "--data-root", str(root),
                                      "--allow-cpu"])
    assert result.exit_code == 0, result.output
    assert len(dvc_calls) == 1, result.output
    args = dvc_calls[0]
    assert args[args.index("exp") + 1] == "run" and "--temp" in args and "fashion-mnist" in args
    assert "data.name=fashionmnist" in args and "prune.targets=[speedup2,speedup4]" in args
