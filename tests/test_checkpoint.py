"""Checkpoints: state_dict + spec + plan, atomic, weights_only, exact round trips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from slimcore.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_model,
    load_model_and_meta,
    read_checkpoint,
    save_model,
)
from slimcore.models import build_model, spec_of
from slimcore.profile import count_params
from slimcore.prune import slim
from tests.conftest import coupled_bimodal


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("arch,stem,width,size", [
    ("vgg16_bn", "cifar", 0.25, 16),
    ("resnet50", "cifar", 0.25, 16),
    ("mobilenet_v2", "cifar", 0.25, 16),
    ("vgg16_bn", "imagenet", 0.25, 64),
    ("resnet18", "imagenet", 1.0, 64),
    ("mobilenet_v3_large", "imagenet", 1.0, 64),
    ("efficientnet_b0", "imagenet", 1.0, 64),
    ("densenet121", "imagenet", 1.0, 64),
])
def test_pruned_checkpoint_round_trip_is_exact(tmp_path: Path, arch: str, stem: str, width: float,
                                               size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    model = coupled_bimodal(build_model(arch, 10, stem, width).eval(), x[:1], zero_fraction=0.5)
    pruned, _ = slim(model, 0.4, x)
    path = save_model(tmp_path / "m.pt", pruned, note="hello")
    # the file is plain data: torch.load(weights_only=True) reads it without any allowlist
    raw = torch.load(path, weights_only=True)
    assert raw["spec"] == spec_of(pruned).to_dict() and raw["meta"] == {"note": "hello"}
    loaded, meta = load_model_and_meta(path)
    assert meta == {"note": "hello"}
    assert count_params(loaded) == count_params(pruned)
    assert torch.equal(_out(loaded, x), _out(pruned, x))
    # and a fine-tuned child keeps the plan: save again, load again
    again = load_model(save_model(tmp_path / "again.pt", loaded))
    assert torch.equal(_out(again, x), _out(pruned, x))


def test_unpruned_round_trip_and_training_mode(tmp_path: Path) -> None:
    model = build_model("resnet50", 7, "cifar", 0.125)
    model.train()
    loaded = load_model(save_model(tmp_path / "b.pt", model))
    assert not loaded.training  # loaded models are ready for inference
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(_out(loaded, x), _out(model, x))


def test_truncated_file_names_the_path(tmp_path: Path) -> None:
    path = save_model(tmp_path / "t.pt", build_model("vgg16_bn", 10, "cifar", 0.125))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path)


def test_missing_foreign_and_pickled_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a slimcore checkpoint"):
        load_model(foreign)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=str(text)):
        load_model(text)
    pickled = tmp_path / "pickled.pt"
    torch.save(build_model("vgg16_bn", 10, "cifar", 0.125), pickled)  # a whole pickled module
    with pytest.raises(CheckpointError, match=str(pickled)) as refused:
        read_checkpoint(pickled)
    assert "refused" in str(refused.value) or "nothing in it was executed" in str(refused.value)


def test_wrong_arch_is_refused(tmp_path: Path) -> None:
    path = save_model(tmp_path / "v.pt", build_model("vgg16_bn", 10, "cifar", 0.125))
    with pytest.raises(CheckpointError, match="holds a vgg16_bn model, but resnet50 was requested"):
        load_model(path, expected_arch="resnet50")


def test_models_without_spec_cannot_be_saved(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no slimcore ModelSpec"):
        save_model(tmp_path / "x.pt", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert not (tmp_path / "x.pt").exists()


def test_atomic_write_leaves_old_file_or_new_never_half(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no temp file left behind
