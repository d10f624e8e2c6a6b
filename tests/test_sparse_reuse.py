"""sparse-train@ARCH-T per prune target, and the copy of a finished run when the penalty ignores
the target (``stages/_reuse.py``): the copy is the bytes training writes, and only the same
inputs are ever copied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimcore_pipeline import paths
from tests.helpers.params import tiny_params

ARCH = "vgg16_bn"
runner = CliRunner()


def _project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **changes: object) -> None:
    params = tiny_params(ARCH, {"epochs": 1, "warmup_epochs": 0, "milestones": []}, {},
                         {"model.sparse_start": "scratch", "penalty.ramp_epochs": 0, **changes})
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _sparse_train(target: str) -> str:
    from stages import sparse_train

    result = runner.invoke(sparse_train.app, ["--arch", ARCH, "--target", target])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fixed_share_trains_once_and_copies_the_same_bytes_to_the_other_targets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _project(tmp_path, monkeypatch, **{"penalty.target": 0.3})
    assert "copied" not in _sparse_train("0.2")
    said = _sparse_train("0.5")
    assert (f"sparse-train@{ARCH}-0.5: penalty.target is the fixed share 0.3, so every prune target trains the "
            f"same model from the same inputs: copied sparse-train@{ARCH}-0.2's") in said
    copied = paths.sparse(ARCH, "0.5").read_bytes()
    assert copied == paths.sparse(ARCH, "0.2").read_bytes()
    assert _files(paths.curves(ARCH, paths.sparse_run("0.5"))) == _files(paths.curves(ARCH, paths.sparse_run("0.2")))
    timing = json.loads(paths.timings(ARCH, paths.sparse_run("0.5")).read_text())
    assert timing["reused_from"] == f"sparse-train@{ARCH}-0.2" and timing["seconds"] >= 0
    # without the kept run, the same stage trains: and writes exactly what was copied
    import shutil

    shutil.rmtree(paths.STATE / "reuse")
    assert "copied" not in _sparse_train("0.5")
    assert paths.sparse(ARCH, "0.5").read_bytes() == copied
    from slimcore.checkpoint import load_model_and_meta

    _, meta = load_model_and_meta(paths.sparse(ARCH, "0.5"))
    assert meta["run"] == "sparse-train"  # the file name, not the checkpoint, says the target


def test_changed_inputs_train_again_and_replace_the_kept_run(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _project(tmp_path, monkeypatch, **{"penalty.method": "l1", "penalty.strength.vgg16_bn": 1e-4})
    _sparse_train("0.2")
    first = sorted(p.name for p in (paths.STATE / "reuse" / ARCH).iterdir())
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train"]["lr"] = 0.05
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "copied" not in _sparse_train("0.5")  # another learning rate: another model
    kept = sorted(p.name for p in (paths.STATE / "reuse" / ARCH).iterdir())
    assert len(first) == len(kept) == 1 and first != kept  # one kept run per arch: the latest
    assert "copied sparse-train@vgg16_bn-0.5's" in _sparse_train("0.6")


def test_auto_sizes_each_target_and_never_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _project(tmp_path, monkeypatch, **{"penalty.target": "auto", "penalty.method": "group"})
    said = _sparse_train("0.2")
    assert f"sparse-train@{ARCH}-0.2: penalty.target auto: 23.0% of the BN channels" in said
    said = _sparse_train("0.5")
    assert f"sparse-train@{ARCH}-0.5: penalty.target auto: 53.0% of the BN channels" in said and "copied" not in said
    assert not (paths.STATE / "reuse").exists()
    assert paths.sparse(ARCH, "0.5").read_bytes() != paths.sparse(ARCH, "0.2").read_bytes()
