"""Checkpoints: state_dict + spec + plan, atomic, weights_only, exact round trips."""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from slimcore.checkpoint import (
    CheckpointError,
    UnverifiedCheckpointWarning,
    atomic_write_bytes,
    content_digest,
    load_model,
    load_model_and_meta,
    read_checkpoint,
    save_model,
    unwrap_model,
)
from slimcore.flops import count_params
from slimcore.models import build_model, spec_of
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


# --------------------------------------------------------------------------------------------
# integrity: the digest, and what a changed byte does
# --------------------------------------------------------------------------------------------

def _small_pruned(x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = coupled_bimodal(build_model("vgg16_bn", 10, "cifar", 0.125).eval(), x[:1], zero_fraction=0.5)
    return slim(model, 0.4, x)[0]


def _tensor_data_offset(path: Path, member_suffix: str) -> int:
    """Where the bytes of the zip member ``*member_suffix`` start in the file (torch stores them
    uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    data = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def test_flipped_byte_in_a_tensor_is_a_one_line_error(tmp_path: Path) -> None:
    path = save_model(tmp_path / "f.pt", build_model("vgg16_bn", 10, "cifar", 0.125))
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == 3 and raw["digest"] == content_digest(raw) and raw["digest"].startswith("sha256:")
    data = bytearray(path.read_bytes())
    data[_tensor_data_offset(path, "/data/3") + 5] ^= 0x40  # one bit of one weight
    path.write_bytes(bytes(data))
    for read in (load_model, read_checkpoint):
        with pytest.raises(CheckpointError) as info:
            read(path)
        message = str(info.value)
        assert message.startswith(f"{path}: integrity check failed") and "\n" not in message


def test_digest_is_deterministic_and_covers_every_part(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    pruned = _small_pruned(x)
    first = save_model(tmp_path / "a.pt", pruned, note="n").read_bytes()
    assert save_model(tmp_path / "b.pt", pruned, note="n").read_bytes() == first  # byte-identical
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    changes = {"spec": lambda r: r["spec"].update(num_classes=11), "plan": lambda r: r["plan"][0][2].add_(1),
               "meta": lambda r: r["meta"].update(note="m"), "trace_size": lambda r: r.update(trace_size=[9, 8]),
               "dtype": lambda r: r.update(dtype="float16"),
               "state": lambda r: r["state_dict"][next(iter(r["state_dict"]))].view(-1)[0].add_(1)}
    for what, change in changes.items():
        copy = torch.load(tmp_path / "a.pt", weights_only=True)
        change(copy)
        assert content_digest(copy) != raw["digest"], what
        torch.save(copy, tmp_path / "c.pt")
        with pytest.raises(CheckpointError, match="integrity check failed"):
            read_checkpoint(tmp_path / "c.pt")
    del raw["digest"]
    torch.save(raw, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="damaged checkpoint: a version-3 file without its digest"):
        load_model(tmp_path / "d.pt")


def test_version_2_file_without_digest_loads_with_a_warning(tmp_path: Path) -> None:
    model = build_model("resnet50", 7, "cifar", 0.125)
    raw = torch.load(save_model(tmp_path / "m.pt", model), weights_only=True)
    for key in ("digest", "dtype"):
        del raw[key]
    raw["version"] = 2
    torch.save(raw, tmp_path / "v2.pt")
    with pytest.warns(UnverifiedCheckpointWarning, match=r"v2\.pt: a version-2 checkpoint has no digest"):
        loaded = load_model(tmp_path / "v2.pt")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(_out(loaded, x), _out(model, x))


# --------------------------------------------------------------------------------------------
# what save_model is given: wrappers, dtypes
# --------------------------------------------------------------------------------------------

def test_compiled_and_data_parallel_models_are_saved_unwrapped(tmp_path: Path) -> None:
    model = build_model("vgg16_bn", 10, "cifar", 0.125)
    plain = save_model(tmp_path / "plain.pt", model).read_bytes()
    for wrapped in (torch.compile(model), nn.DataParallel(model), nn.DataParallel(torch.compile(model))):
        assert unwrap_model(wrapped) is model
        assert save_model(tmp_path / "w.pt", wrapped).read_bytes() == plain  # no _orig_mod. / module. keys


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_recorded_and_restored(tmp_path: Path, dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 8, 8)
    pruned = _small_pruned(x)
    model = pruned.to(dtype)
    path = save_model(tmp_path / "h.pt", model)
    assert torch.load(path, weights_only=True)["dtype"] == str(dtype).removeprefix("torch.")
    loaded = load_model(path)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))


def test_mixed_dtype_model_is_refused_in_one_line(tmp_path: Path) -> None:
    model = build_model("vgg16_bn", 10, "cifar", 0.125)
    model.classifier.half()
    with pytest.raises(CheckpointError, match="its parameters mix float16, float32; cast it to one dtype"):
        save_model(tmp_path / "x.pt", model)
    assert not (tmp_path / "x.pt").exists()
