"""Model sources (torchvision, timm, python) end to end, and starting weights (model.weights).

timm tests skip where timm is not installed (``make test`` installs it: ``.[dev,timm]``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from slimcore.checkpoint import (
    FORMAT,
    CheckpointError,
    UnverifiedCheckpointWarning,
    checkpoint_spec,
    content_digest,
    load_model,
    save_model,
)
from slimcore.errors import ModelError
from slimcore.models import TRACE_ATTR, ModelSpec, build_model, spec_of
from slimcore.prune import slim
from slimcore.weights import classifier_name, load_weights, weights_file
from slimcore_pipeline.config import ParamsError, parse_params
from stages._training import Start, start_of, starting_model
from tests.conftest import randomize_bn

ROOT = Path(__file__).resolve().parents[1]
NETS = "tests.helpers.nets"


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _same_weights(a: nn.Module, b: nn.Module, skip: str = "\0") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


# --------------------------------------------------------------------------------------------
# build_model for each source
# --------------------------------------------------------------------------------------------


def test_torchvision_prefix_names_the_same_model() -> None:
    plain, prefixed = build_model("resnet18", 4), build_model("torchvision:resnet18", 4)
    assert spec_of(plain) == spec_of(prefixed) == ModelSpec("torchvision", "resnet18", 4)
    assert spec_of(prefixed).arch == "resnet18"


def test_python_factory_gets_num_classes_and_kwargs() -> None:
    model = build_model(f"{NETS}:small_cnn", 5, depth=3)
    spec = spec_of(model)
    assert (spec.source, spec.name, spec.num_classes, dict(spec.kwargs)) == \
        ("python", f"{NETS}:small_cnn", 5, {"depth": 3})
    assert spec.arch == f"{NETS}:small_cnn"
    assert len(model.blocks) == 3 and model.fc.out_features == 5
    assert _out(model, torch.randn(2, 3, 16, 16)).shape == (2, 5)
    # a factory argument named like build_model's own (width) reaches the factory, as the stages build it
    wide = build_model(f"{NETS}:small_cnn", 5, depth=1, width=8)
    assert wide.fc.in_features == 16 and spec_of(wide).kwargs == {"depth": 1, "width": 8}
    assert spec_of(wide) == ModelSpec("python", f"{NETS}:small_cnn", 5, kwargs={"depth": 1, "width": 8})
    assert ModelSpec.from_dict(spec_of(wide).to_dict()) == spec_of(wide)


def test_timm_model_is_built_without_download() -> None:
    pytest.importorskip("timm")
    model = build_model("timm:resnet10t", 7, drop_rate=0.1)
    spec = spec_of(model)
    assert (spec.source, spec.name, dict(spec.kwargs), spec.arch) == \
        ("timm", "resnet10t", {"drop_rate": 0.1}, "timm:resnet10t")
    assert _out(model, torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize(("arch", "kwargs", "message"), [
    (f"{NETS}x:small_cnn", {}, f"module '{NETS}x' is not importable"),
    (f"{NETS}:nope", {}, "has no attribute 'nope'"),
    (f"{NETS}:NOT_CALLABLE", {}, "is not callable"),
    (f"{NETS}:not_a_module", {}, "returned dict, not a torch.nn.Module"),
    (f"{NETS}:no_batchnorm", {}, "has no BatchNorm2d layers"),
    (f"{NETS}:small_cnn", {"colour": "red"}, "unexpected keyword argument 'colour'"),
    (f"{NETS}:small_cnn", {"pretrained": True}, "kwargs may not set pretrained"),
    ("pkg.mod:", {}, "expected an import path 'package.module:factory'"),
])
def test_python_source_errors_are_clear(arch: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError) as info:
        build_model(arch, 3, **kwargs)
    assert message in str(info.value)


def test_stem_and_width_shape_reference_archs_only() -> None:
    # in a spec, stem/width are torchvision's; for other sources they are builder arguments
    with pytest.raises(ModelError, match="stem/width shape the reference archs"):
        ModelSpec("python", f"{NETS}:small_cnn", 3, stem="cifar").build()
    with pytest.raises(ModelError, match="stem/width shape the reference archs"):
        ModelSpec("timm", "resnet10t", 3, width=0.5).build()
    with pytest.raises(TypeError, match="width"):  # timm's resnet10t has no width argument
        build_model("timm:resnet10t", 3, width=0.5)


def test_unknown_timm_name_suggests_close_ones() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ModelError, match=r"unknown timm model 'resnet50dd' \(did you mean .*resnet50d"):
        build_model("timm:resnet50dd", 10)


def test_missing_timm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ModelError, match=r"pip install slimcore\[timm\]"):
        build_model("timm:resnet50d", 10)


# --------------------------------------------------------------------------------------------
# checkpoints: rebuilt through the same source, plan replayed at the traced size
# --------------------------------------------------------------------------------------------


def _prune_round_trip(tmp_path: Path, arch: str, size: int,
                      kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = randomize_bn(build_model(arch, 10, **(kwargs or {})).eval())
    x = torch.randn(2, 3, size, size)
    pruned, report = slim(model, 0.3, x)
    assert report.removed_bn_channels > 0
    path = save_model(tmp_path / "m.pt", pruned)
    assert torch.load(path, weights_only=True)["trace_size"] == [size, size]
    trusted = arch if spec_of(pruned).source == "python" else None  # the caller's own factory
    loaded = load_model(path, expected_arch=arch, trusted=trusted)
    assert spec_of(loaded) == spec_of(pruned)
    assert torch.equal(_out(loaded, x), _out(pruned, x))
    again = load_model(save_model(tmp_path / "again.pt", loaded), trusted=trusted)  # a child keeps plan and size
    assert torch.equal(_out(again, x), _out(pruned, x))
    return pruned, loaded


@pytest.mark.parametrize("name", ["resnet10t", "lcnet_050"])  # lcnet: depthwise convs, squeeze-excitation
def test_pruned_timm_model_round_trips_exactly(tmp_path: Path, name: str) -> None:
    pytest.importorskip("timm")
    _prune_round_trip(tmp_path, f"timm:{name}", 32)


def test_pruned_python_model_round_trips_exactly(tmp_path: Path) -> None:
    _prune_round_trip(tmp_path, f"{NETS}:small_cnn", 16, {"depth": 2})


def test_replay_traces_at_the_size_the_model_was_pruned_with(tmp_path: Path) -> None:
    """A model that runs on 24px inputs only: replaying at any default size would fail."""
    _, loaded = _prune_round_trip(tmp_path, f"{NETS}:fixed_size_cnn", 24, {"size": 24})
    assert getattr(loaded, TRACE_ATTR) == (24, 24)
    with pytest.raises(RuntimeError):
        _out(build_model(f"{NETS}:fixed_size_cnn", 10, size=24), torch.randn(1, 3, 32, 32))


def test_version_1_checkpoint_still_loads(tmp_path: Path) -> None:
    """Files written before model sources: spec {arch, ...} (torchvision), no trace size."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    pruned, _ = slim(randomize_bn(build_model("vgg16_bn", 10, "cifar", 0.125).eval()), 0.3, x)
    new = torch.load(save_model(tmp_path / "v2.pt", pruned), weights_only=True)
    old = {"format": FORMAT, "version": 1, "plan": new["plan"], "state_dict": new["state_dict"], "meta": {},
           "spec": {"arch": "vgg16_bn", "num_classes": 10, "stem": "cifar", "width": 0.125}}
    torch.save(old, tmp_path / "v1.pt")
    with pytest.warns(UnverifiedCheckpointWarning, match=r"v1\.pt: a version-1 checkpoint has no digest"):
        loaded = load_model(tmp_path / "v1.pt", expected_arch="vgg16_bn")
    assert spec_of(loaded) == ModelSpec("torchvision", "vgg16_bn", 10, "cifar", 0.125)
    assert torch.equal(_out(loaded, x), _out(pruned, x))
    old["version"] = 4
    torch.save(old, tmp_path / "v4.pt")
    with pytest.raises(CheckpointError, match="version 4"):
        load_model(tmp_path / "v4.pt")


def test_expected_arch_compares_the_resolved_model(tmp_path: Path) -> None:
    path = save_model(tmp_path / "p.pt", build_model(f"{NETS}:small_cnn", 3))
    assert checkpoint_spec(path).source == "python"
    load_model(path, expected_arch=f"{NETS}:small_cnn", trusted=f"{NETS}:small_cnn")
    load_model(path, expected_arch=f"python:{NETS}:small_cnn", trusted=f"{NETS}:small_cnn")
    with pytest.raises(CheckpointError, match=f"holds a {NETS}:small_cnn model, but mynet was requested"):
        load_model(path, expected_arch="mynet")  # a short name must be resolved first (Params.model_for)


def test_unbuildable_source_on_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.pt"
    save_model(path, build_model(f"{NETS}:small_cnn", 3))
    raw = torch.load(path, weights_only=True)
    raw["spec"]["name"] = "tests.helpers.gone:small_cnn"
    raw["digest"] = content_digest(raw)
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"gone\.pt: cannot rebuild .*is not importable"):
        load_model(path, trusted="tests.helpers.gone:small_cnn")


def test_kwargs_that_are_not_plain_data_cannot_be_saved(tmp_path: Path) -> None:
    model = build_model("torchvision:resnet18", 3, norm_layer=nn.BatchNorm2d)
    with pytest.raises(CheckpointError, match=r"kwargs\.norm_layer is a type"):
        save_model(tmp_path / "x.pt", model)
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------------------------
# params.yaml: models and short names
# --------------------------------------------------------------------------------------------


def _raw(**changes: Any) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(changes)
    return raw


def _with_models(models: dict[str, Any], archs: list[str] | None = None, **changes: Any) -> dict[str, Any]:
    archs = archs if archs is not None else list(models)
    raw = _raw(models=models, archs=archs, **changes)
    raw["penalty"]["strength"] = {a: 1e-4 for a in archs}
    return raw


def test_short_names_resolve_through_models() -> None:
    params = parse_params(_with_models({
        "r10t": {"source": "timm", "name": "resnet10t", "kwargs": {"drop_rate": 0.1}},
        "mynet": {"source": "python", "name": f"{NETS}:small_cnn", "kwargs": {"depth": 3}},
    }, archs=["r10t", "mynet", "vgg16_bn", "resnet18"], data={"image_size": 32}))
    r10t, mynet, vgg, r18 = (params.model_for(a) for a in params.archs)
    assert (r10t.arch, r10t.kwargs, r10t.stem, r10t.width) == ("timm:resnet10t", {"drop_rate": 0.1}, "imagenet", 1.0)
    assert (mynet.arch, mynet.kwargs) == (f"{NETS}:small_cnn", {"depth": 3})
    assert (vgg.arch, vgg.stem, vgg.width) == ("vgg16_bn", "cifar", 0.125)  # params.yaml's stem/width
    assert (r18.arch, r18.stem, r18.width) == ("resnet18", "imagenet", 1.0)  # ignored for other models


@pytest.mark.parametrize(("models", "archs", "message"), [
    ({"../up": {"source": "timm", "name": "resnet50d"}}, None, "models: '../up': a short name"),
    ({"a b": {"source": "timm", "name": "resnet50d"}}, None, "models: 'a b': a short name"),
    ({"m": {"source": "keras", "name": "x"}}, None, "models.m.source"),
    ({"m": {"source": "python", "name": "no_colon"}}, None, "models.m: python model 'no_colon'"),
    ({"m": {"source": "torchvision", "name": "resnet51"}}, None, "did you mean resnet50"),
    ({"m": {"source": "torchvision", "name": "vgg16"}}, None, "has no BatchNorm2d"),
    ({"m": {"source": "timm", "name": "x", "kwargs": {"pretrained": True}}}, None, "may not set pretrained"),
    ({"m": {"source": "timm", "name": "x", "extra": 1}}, None, "models.m.extra: unknown key; allowed keys here: "
                                                               "source, name, kwargs"),
    ({"m": {"source": "timm", "name": "resnet50d"}}, ["n"], "unknown arch 'n'"),
])
def test_bad_models_entries_name_the_key(models: dict[str, Any], archs: list[str] | None, message: str) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(_with_models(models, archs))
    assert message in str(info.value)


def test_timm_and_python_entries_validate_without_importing_them() -> None:
    code = ("import sys, yaml\nfrom slimcore_pipeline.config import parse_params\n"
            "raw = yaml.safe_load(open('params.yaml'))\n"
            "raw['penalty']['strength'] = {'r': 1e-4, 'p': 1e-4}\n"
            "raw.update(archs=['r', 'p'], models={\n"
            "    'r': {'source': 'timm', 'name': 'resnet50d'},\n"
            f"    'p': {{'source': 'python', 'name': '{NETS}:small_cnn'}}}})\n"
            "parse_params(raw)\n"
            "print(sorted(m for m in ('torch', 'timm', 'tests.helpers.nets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------
# starting weights
# --------------------------------------------------------------------------------------------


def _params(tmp_path: Path, **model: Any) -> Any:
    return parse_params(_with_models({"tiny": {"source": "python", "name": f"{NETS}:small_cnn"}},
                                     model={"stem": "cifar", "width": 0.125, **model}))


def _donor(num_classes: int = 10, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build_model(f"{NETS}:small_cnn", num_classes), seed)


def test_weights_folder_convention(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    assert weights_file(folder, "tiny") is None  # no file: random init
    (folder / "tiny.pth").write_bytes(b"x")
    assert weights_file(folder, "tiny") == folder / "tiny.pth"
    assert weights_file(folder / "tiny.pth", "anything") == folder / "tiny.pth"  # one file for every arch
    (folder / "tiny.pt").write_bytes(b"x")
    with pytest.raises(ModelError, match="keep one"):
        weights_file(folder, "tiny")
    with pytest.raises(ModelError, match="neither a folder"):
        weights_file(tmp_path / "nowhere", "tiny")
    monkeypatch.chdir(tmp_path)  # a project without the default folder: random init
    (folder / "tiny.pt").unlink()
    assert weights_file("weights", "tiny") == Path("weights/tiny.pth")
    (folder / "tiny.pth").unlink()
    folder.rmdir()
    assert weights_file("weights", "tiny") is None
    with pytest.raises(ModelError, match="neither a folder"):
        weights_file("weights/tiny.pt", "tiny")
    assert weights_file(ROOT / "weights", "vgg16_bn") is None  # the committed folder holds no weights
    assert (ROOT / "weights" / "README.md").is_file()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model+module", "slimcore"])
def test_weights_initialise_the_model(tmp_path: Path, wrap: str) -> None:
    donor = _donor()
    state = donor.state_dict()
    path = tmp_path / "tiny.pt"
    if wrap == "slimcore":
        save_model(path, donor)
    else:
        obj: Any = {
            "plain": state,
            "state_dict": {"state_dict": state, "epoch": 3},
            "model+module": {"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}},
        }[wrap]
        torch.save(obj, path)
    params = _params(tmp_path)
    scratch, how = starting_model(params, "tiny", 10, Start())
    assert how == "random init" and not _same_weights(scratch, donor)
    model, how = starting_model(params, "tiny", 10, Start(weights=path))
    assert _same_weights(model, donor), wrap
    assert str(path) in how and ("slimcore checkpoint" if wrap == "slimcore" else "state_dict") in how


def test_classifier_of_another_size_keeps_its_init(tmp_path: Path) -> None:
    donor = _donor(num_classes=20)  # "pretrained" on 20 classes, trained here on 10
    torch.save(donor.state_dict(), tmp_path / "w.pt")
    model = build_model(f"{NETS}:small_cnn", 10)
    fresh_fc = model.fc.weight.detach().clone()
    report = load_weights(model, tmp_path / "w.pt")
    assert classifier_name(model, 10) == "fc"
    assert report.skipped == ["fc.weight", "fc.bias"] and report.classes_in_file == 20
    assert "classifier fc not loaded (20 classes in the file, 10 here)" in report.message()
    assert _same_weights(model, donor, skip="fc.")
    assert torch.equal(model.fc.weight, fresh_fc)


def test_weights_that_do_not_fit_are_named(tmp_path: Path) -> None:
    state = _donor().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["stem.1.running_var"]
    state["expand.0.weight"] = torch.zeros(32, 16, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ModelError) as info:
        load_weights(build_model(f"{NETS}:small_cnn", 10), tmp_path / "bad.pt")
    message = str(info.value)
    for part in ("bad.pt: weights do not fit", "1 missing (stem.1.running_var)", "1 unexpected (extra.weight)",
                 "expand.0.weight: (32, 16, 1, 1) in the file, (32, 16, 3, 3) in the model"):
        assert part in message, message


def test_pruned_checkpoints_and_other_archs_are_refused_as_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pruned, _ = slim(_donor().eval(), 0.3, torch.randn(2, 3, 16, 16))
    save_model(tmp_path / "pruned.pt", pruned)
    with pytest.raises(ModelError, match="holds a pruned model"):
        load_weights(build_model(f"{NETS}:small_cnn", 10), tmp_path / "pruned.pt")
    save_model(tmp_path / "vgg.pt", build_model("vgg16_bn", 10, "cifar", 0.125))
    with pytest.raises(ModelError, match=f"holds a vgg16_bn model, but {NETS}:small_cnn is being trained"):
        load_weights(build_model(f"{NETS}:small_cnn", 10), tmp_path / "vgg.pt")


def test_where_training_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    params = _params(tmp_path)
    assert start_of(params, "tiny", "baseline-train") == Start()  # no weights/tiny.pt: random init
    assert start_of(params, "tiny", "sparse-train") == Start()  # sparse_start: scratch
    torch.save(_donor().state_dict(), tmp_path / "weights" / "tiny.pt")
    assert start_of(params, "tiny", "baseline-train") == Start(weights=Path("weights/tiny.pt"))
    assert start_of(_params(tmp_path, sparse_start="weights"), "tiny", "sparse-train") == \
        Start(weights=Path("weights/tiny.pt"))

    from_baseline = _params(tmp_path, sparse_start="baseline")
    with pytest.raises(ParamsError, match=r"baseline, but models/tiny/baseline\.pt does not exist"):
        start_of(from_baseline, "tiny", "sparse-train")
    baseline = _donor(seed=5)
    save_model(tmp_path / "models" / "tiny" / "baseline.pt", baseline)
    start = start_of(from_baseline, "tiny", "sparse-train")
    assert start == Start(init=Path("models/tiny/baseline.pt"))
    model, how = starting_model(from_baseline, "tiny", 10, start)
    assert _same_weights(model, baseline) and how == "continues from models/tiny/baseline.pt"

    (tmp_path / "weights" / "tiny.pt").unlink()
    with pytest.raises(ParamsError, match=r"sparse_start: weights, but weights/ holds no tiny\.pt"):
        start_of(_params(tmp_path, sparse_start="weights"), "tiny", "sparse-train")
