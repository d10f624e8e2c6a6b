"""ONNX out: BatchNorm folding, export checked by onnxruntime, the CLI, and profile's onnxruntime latency."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from slimcore.checkpoint import load_model, save_model
from slimcore.export import (
    ExportError,
    conv_bn_pairs,
    default_image_size,
    export_checkpoint,
    export_model,
    fold_batchnorms,
    ort_session,
)
from slimcore.models import build_model
from slimcore.prune import slim
from tests.conftest import randomize_bn
from tests.helpers.export_cli import export_cli
from tests.helpers.params import tiny_params

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["fx", "graph"]


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


class ConvBN(nn.Module):
    """conv -> BN pairs of every kind, and BNs that must stay: after a ReLU, and after a conv
    whose output is also read by a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.biased = nn.Sequential(nn.Conv2d(8, 8, 1, bias=True), nn.BatchNorm2d(8))
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8))
        self.grouped = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=True), nn.BatchNorm2d(12))
        self.no_affine = nn.Sequential(nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8, affine=False))
        self.after_relu = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.BatchNorm2d(8))
        self.shared_conv = nn.Conv2d(8, 8, 1)
        self.shared_bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.plain(x))
        x = self.depthwise(self.biased(x))
        x = self.after_relu(self.no_affine(self.grouped(x)))
        y = self.shared_conv(x)
        return self.shared_bn(y) + y  # the conv's output is read twice: its BN must stay


def _random_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (also for BNs without affine parameters)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


FOLDABLE = {("plain.0", "plain.1"), ("biased.0", "biased.1"), ("depthwise.0", "depthwise.1"),
            ("grouped.0", "grouped.1"), ("no_affine.0", "no_affine.1")}


@pytest.mark.parametrize("method", METHODS)
def test_folding_keeps_outputs_and_leaves_bns_that_do_not_follow_a_conv(method: str) -> None:
    torch.manual_seed(0)
    model = _random_stats(ConvBN())
    x = torch.randn(2, 3, 8, 8)
    folded, pairs = fold_batchnorms(model, x, method=method)  # type: ignore[arg-type]
    assert set(pairs) == FOLDABLE
    assert torch.allclose(_out(folded, x), _out(model, x), atol=1e-5, rtol=0)
    kept = {n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert kept == {"after_relu.2", "shared_bn"}
    assert folded.plain[0].bias is not None and isinstance(folded.plain[1], nn.Identity)
    assert isinstance(model.plain[1], nn.BatchNorm2d) and model.plain[0].bias is None  # the original is intact


def test_fx_and_graph_find_the_same_pairs_on_a_pruned_reference_model() -> None:
    torch.manual_seed(0)
    model = randomize_bn(build_model("mobilenet_v2", 10, "cifar", 0.25)).eval()
    x = torch.randn(2, 3, 16, 16)
    pruned, _ = slim(model, 0.3, x)
    pairs = conv_bn_pairs(pruned, x, "fx")
    assert pairs == conv_bn_pairs(pruned, x, "graph")
    folded, folded_pairs = fold_batchnorms(pruned, x)
    assert folded_pairs == pairs and len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(_out(folded, x), _out(pruned, x), atol=1e-5, rtol=0)


class BNAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: normalise with the module's statistics, then an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class OddBN(nn.BatchNorm2d):
    """A BN subclass that reads its input in its own way: folding into the conv before it is wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * x)


def test_bn_subclasses_are_folded_keeping_their_activation_or_left_when_that_breaks_them() -> None:
    torch.manual_seed(0)
    model = _random_stats(nn.Sequential(nn.Conv2d(3, 8, 3), BNAct(8), nn.Conv2d(8, 4, 1), OddBN(4)))
    x = torch.randn(2, 3, 8, 8)
    folded, pairs = fold_batchnorms(model, x)
    assert pairs == [("0", "1"), ("2", "3")]  # both look foldable on the graph ...
    assert isinstance(folded[1], BNAct) and not torch.allclose(_out(folded, x), _out(model, x), atol=1e-4)
    _, strict = fold_batchnorms(model, x, subclasses=False)
    assert strict == []
    # ... and export keeps the fold of BNAct only where the outputs stay the same
    _, report = export_model(model[:2], image_size=8)
    assert report.bn_folded == 1 and report.bn_left == 0
    _, report = export_model(model, image_size=8)
    assert report.max_abs_diff <= 1e-4 and report.bn_folded == 0


@pytest.mark.parametrize("arch", ["vgg16_bn", "resnet50"])
def test_folding_the_other_reference_archs(arch: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(build_model(arch, 10, "cifar", 0.125)).eval()
    x = torch.randn(2, 3, 8, 8)
    folded, pairs = fold_batchnorms(model, x)
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(_out(folded, x), _out(model, x), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = randomize_bn(build_model("mobilenet_v2", 10, "cifar", 0.25)).eval()
    pruned, report = slim(model, 0.3, torch.randn(2, 3, 16, 16))
    assert report.true_ratio > 0.2
    return save_model(tmp_path_factory.mktemp("ckpt") / "pruned.pt", pruned, run="test")


def test_exported_pruned_checkpoint_runs_in_onnxruntime_like_pytorch(pruned_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "model.onnx"
    report, source = export_checkpoint(pruned_ckpt, out, image_size=16, dynamic_batch=True)
    assert source == "--image-size" and out.stat().st_size == report.bytes
    proto = onnx.load(str(out))
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    assert report.bn_folded == report.bn_total > 0 and report.nodes == len(proto.graph.node)
    # independently of export's own check: the file on disk against the checkpoint as loaded
    model = load_model(pruned_ckpt)
    session = ort_session(out)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # dynamic batch
    got = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - _out(model, x).numpy()).max() <= 1e-4
    assert report.max_abs_diff <= 1e-4
    # same checkpoint, same bytes
    again = tmp_path / "again.onnx"
    export_checkpoint(pruned_ckpt, again, image_size=16, dynamic_batch=True)
    assert hashlib.md5(again.read_bytes()).hexdigest() == hashlib.md5(out.read_bytes()).hexdigest() == report.md5


def test_failed_check_writes_nothing(pruned_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_checkpoint(pruned_ckpt, out, image_size=16, atol=-1.0)  # no output can pass
    with pytest.raises(ExportError, match="does not run on 1x3x2x2"):
        export_model(nn.Sequential(nn.Conv2d(3, 4, 5), nn.BatchNorm2d(4)), image_size=2)
    assert list(tmp_path.iterdir()) == []


def test_default_image_size(pruned_ckpt: Path, tmp_path: Path) -> None:
    model = load_model(pruned_ckpt)
    params = tmp_path / "params.yaml"
    assert default_image_size(model, {}, params) == (8, "the model's minimum input size")  # mobilenet_v2, cifar
    params.write_text(yaml.safe_dump({"data": {"image_size": 24}}))
    assert default_image_size(model, {}, params) == (24, f"{params} data.image_size")
    assert default_image_size(model, {"image_size": 32}, params)[0] == 32
    assert default_image_size(model, {"image_size": 32}, params, trace_size=(16, 16)) == \
        (16, "the checkpoint's trace_size")
    assert default_image_size(model, {}, params, trace_size=(16, 12))[0] == 24  # not square: the next source


runner = CliRunner()



def _onnx_input_dims(path: str) -> list[int]:
    return [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]


def test_cli_takes_the_size_the_checkpoint_was_traced_with_then_the_projects(
        pruned_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({"data": {"image_size": 24}}))  # another project's size
    result = export_cli([str(pruned_ckpt), "model.onnx"])  # pruned (traced) at 16px
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "BatchNorm layers folded" in said and "input size from the checkpoint's trace_size" in said, said
    assert _onnx_input_dims("model.onnx") == [1, 3, 16, 16]
    unpruned = save_model(tmp_path / "baseline.pt", build_model("mobilenet_v2", 10, "cifar", 0.125))
    result = export_cli([str(unpruned), "baseline.onnx"])  # no plan, no trace size: params.yaml
    assert result.exit_code == 0, result.output
    assert "params.yaml data.image_size" in " ".join(result.output.split())
    assert _onnx_input_dims("baseline.onnx") == [1, 3, 24, 24]


@pytest.mark.parametrize("content,message", [
    (None, "checkpoint not found"),
    (b"not a checkpoint at all", "not a readable checkpoint"),
    ("dict", "not a slimcore checkpoint"),
])
def test_cli_bad_input_fails_clearly_and_writes_nothing(tmp_path: Path, content: bytes | str | None,
                                                        message: str) -> None:
    ckpt = tmp_path / "in.pt"
    if content == "dict":
        torch.save({"state_dict": {}}, ckpt)
    elif content is not None:
        ckpt.write_bytes(content)
    result = export_cli([str(ckpt), str(tmp_path / "out.onnx")])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out.onnx").exists()


def test_cli_rejects_a_bad_batch_option(pruned_ckpt: Path, tmp_path: Path) -> None:
    result = export_cli([str(pruned_ckpt), str(tmp_path / "out.onnx"), "--batch", "4"])
    assert result.exit_code == 2 and not (tmp_path / "out.onnx").exists()


def test_latency_table_without_onnxruntime_figures() -> None:
    from stages.profile import latency_markdown

    t = {"median_ms": 2.0, "p10_ms": 1.0, "p90_ms": 3.0}
    table = latency_markdown({"a": {"baseline": {**t, "onnxruntime": {"median_ms": 0.5}},
                                    "finetuned-0.5": {**t, "median_ms": 1.0}}}, 8, 1)
    assert "| a | baseline | 2.000 | 1.000 | 3.000 | 1.00x | 0.500 | 1.00x |" in table
    assert "| a | finetuned-0.5 | 1.000 | 1.000 | 3.000 | 2.00x | - | - |" in table


def test_profile_stage_reports_onnxruntime_latency_in_timings_only(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from slimcore_pipeline import paths
    from stages import profile

    arch, ratio = "vgg16_bn", 0.5
    params = tiny_params(arch, {}, {}, {"prune.targets": [ratio], "profile.latency_runs": 3,
                                        "profile.warmup_runs": 1})
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    torch.manual_seed(0)
    base = randomize_bn(build_model(arch, 10, params["model"]["stem"], 0.0625)).eval()
    pruned, _ = slim(base, ratio, torch.randn(2, 3, 8, 8))
    for label, path in paths.model_files(arch, [ratio]).items():
        save_model(path, base if label == "baseline" or label.startswith("sparse-") else pruned)

    result = runner.invoke(profile.app, [])
    assert result.exit_code == 0, result.output
    latency = json.loads(paths.latency_report().read_text())[arch]
    assert set(latency) == {"baseline", f"finetuned-{ratio}"}
    for figures in latency.values():
        assert figures["median_ms"] > 0
        assert figures["onnxruntime"]["median_ms"] > 0 and figures["onnxruntime"]["threads"] == 1
    table = paths.latency_table().read_text()
    assert "onnxruntime ms" in table and table.count("x |") == 4  # two speedups per model
    assert "onnxruntime" not in paths.profile_report().read_text()  # deterministic figures only


def test_half_precision_checkpoint_exports_in_float32(pruned_ckpt: Path, tmp_path: Path) -> None:
    half = save_model(tmp_path / "half.pt", load_model(pruned_ckpt).half())
    assert next(load_model(half).parameters()).dtype == torch.float16  # restored as saved
    report, _ = export_checkpoint(half, tmp_path / "half.onnx", image_size=16)
    assert report.max_abs_diff <= report.atol
