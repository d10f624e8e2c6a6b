"""Hostile checkpoints (docs/security.md): a file names its architecture, it never chooses code.

Every crafted file below carries a valid digest (whoever writes a file can write its digest), so
what refuses it is the loader's policy, not the integrity check.  Each refusal is one line that
names the file, and happens before any import, model build or file access: ``ModelSpec.build``
and ``resolve_factory`` are replaced by tripwires, and the side effects each payload would have
(a hubconf that runs, a log file that is emptied, a module that is imported) are checked.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from slimcore import models
from slimcore.checkpoint import CheckpointError, content_digest, load_model, save_model
from slimcore.models import ModelSpec, build_model
from tests.helpers.export_cli import export_cli

NETS = "tests.helpers.nets"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) checkpoint, written before any tripwire is set."""
    return save_model(tmp_path_factory.mktemp("template") / "t.pt", build_model("vgg16_bn", 10, "cifar", 0.125))


def craft(template: Path, tmp_path: Path, spec: dict[str, Any] | None = None, **fields: Any) -> Path:
    """``template`` with ``spec`` and other top-level ``fields`` replaced, digest recomputed."""
    raw = torch.load(template, weights_only=True)
    if spec is not None:
        raw["spec"] = {"num_classes": 10, "stem": "imagenet", "width": 1.0, "kwargs": {}, **spec}
    raw.update(fields)
    raw["digest"] = content_digest(raw)
    path = tmp_path / "evil.pt"
    torch.save(raw, path)
    return path


@pytest.fixture
def nothing_built(template: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fail the test if anything tries to resolve a factory or build a model; the template to craft from."""

    def tripwire(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model was built or a factory resolved from a refused checkpoint")

    monkeypatch.setattr(models, "resolve_factory", tripwire)
    monkeypatch.setattr(ModelSpec, "build", tripwire)
    return template


def _refused(path: Path, match: str, **kwargs: Any) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


def _export_refused(path: Path, tmp_path: Path, match: str) -> None:
    out = tmp_path / "x.onnx"
    result = export_cli([str(path), str(out)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and match in said, result.output
    assert not out.exists()


def test_torch_hub_local_repo_is_not_run(tmp_path: Path, nothing_built: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    marker = tmp_path / "hubconf-ran"
    (repo / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef m(**kw):\n    raise SystemExit\n")
    calls: list[object] = []
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: calls.append(a))
    path = craft(nothing_built, tmp_path, spec={"source": "python", "name": "torch.hub:load",
                                 "kwargs": {"repo_or_dir": str(repo), "model": "m", "source": "local"}})
    message = _refused(path, "refused to run code: the file asks for Python factory torch.hub:load")
    assert "trusted='torch.hub:load'" in message and "--trust-code torch.hub:load" in message
    _export_refused(path, tmp_path, "refused to run code")
    assert not marker.exists() and calls == []


def test_torch_hub_github_repo_is_not_fetched(tmp_path: Path, nothing_built: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: calls.append(a))
    path = craft(nothing_built, tmp_path, spec={"source": "python", "name": "torch.hub:load", "kwargs": {
        "repo_or_dir": "someone/repo", "model": "m", "source": "github", "trust_repo": True}})
    _refused(path, "refused to run code: .*torch.hub:load.*source='github'")
    _export_refused(path, tmp_path, "refused to run code")
    assert calls == []


def test_logging_basicconfig_does_not_empty_a_file(tmp_path: Path, nothing_built: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    handlers = list(logging.root.handlers)
    path = craft(nothing_built, tmp_path, spec={"source": "python", "name": "logging:basicConfig",
                                 "kwargs": {"filename": str(victim), "filemode": "w"}})
    _refused(path, "refused to run code: the file asks for Python factory logging:basicConfig")
    _export_refused(path, tmp_path, "refused to run code")
    assert victim.read_text() == "precious" and logging.root.handlers == handlers


def test_a_module_named_by_the_file_is_not_imported(tmp_path: Path, nothing_built: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "evil_factory.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef build(**kw): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = craft(nothing_built, tmp_path, spec={"source": "python", "name": "evil_factory:build"})
    _refused(path, "refused to run code")
    assert "evil_factory" not in sys.modules and not marker.exists()


def test_timm_checkpoint_path_is_refused_before_timm(tmp_path: Path, nothing_built: Path) -> None:
    had_timm = "timm" in sys.modules
    other = tmp_path / "other.pth"
    other.write_bytes(b"not read")
    path = craft(nothing_built, tmp_path,
                 spec={"source": "timm", "name": "resnet18", "kwargs": {"checkpoint_path": str(other)}})
    _refused(path, r"refused to rebuild its model: timm:resnet18 kwarg 'checkpoint_path' is not one a "
                   r"checkpoint may pass to timm \(allowed: ")
    _export_refused(path, tmp_path, "kwarg 'checkpoint_path' is not one a checkpoint may pass")
    assert ("timm" in sys.modules) == had_timm


@pytest.mark.parametrize(("spec", "fields", "message"), [
    ({"source": "torchvision", "name": "resnet18", "num_classes": 10**10}, {},
     "num_classes is 10000000000, not an integer in 1..100000"),
    ({"source": "timm", "name": "resnet18", "num_classes": 10**10}, {}, "num_classes is 10000000000"),
    ({"source": "python", "name": f"{NETS}:small_cnn", "num_classes": 10**10}, {}, "num_classes is 10000000000"),
    ({"source": "torchvision", "name": "mobilenet_v3_small", "kwargs": {"width_mult": 1000}}, {},
     r"kwarg width_mult=1000 is not a float in \[0.05, 4\]"),
    ({"source": "torchvision", "name": "resnet18", "kwargs": {"weights": "IMAGENET1K_V1"}}, {},
     "kwarg 'weights' is not one a checkpoint may pass to torchvision"),
    ({"source": "timm", "name": "resnet18", "kwargs": {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}}, {},
     "kwarg 'pretrained_cfg_overlay' is not one"),
    ({"source": "torchvision", "name": "vgg16_bn", "width": "wide"}, {}, "width is 'wide', not a number"),
    (None, {"trace_size": [10**6, 10**6]}, r"its trace_size \[1000000, 1000000\] is not two sides in 1..1024 px"),
    (None, {"dtype": "complex128"}, "its dtype 'complex128' is not one of"),
])
def test_unbounded_or_unlisted_requests_are_refused(tmp_path: Path, nothing_built: Path,
                                                    spec: dict[str, Any] | None, fields: dict[str, Any],
                                                    message: str) -> None:
    path = craft(nothing_built, tmp_path, spec=spec, **fields)
    _refused(path, message)
    _refused(path, message, trusted=f"{NETS}:small_cnn")  # trusting a factory lifts no bound


def test_own_python_model_loads_only_when_trusted(tmp_path: Path) -> None:
    model = build_model(f"{NETS}:small_cnn", 3, depth=1)
    path = save_model(tmp_path / "own.pt", model)
    message = _refused(path, f"asks for Python factory {NETS}:small_cnn\\(num_classes=3, depth=1\\)")
    assert f"trusted='{NETS}:small_cnn'" in message
    x = torch.randn(1, 3, 16, 16)
    for trusted in (f"{NETS}:small_cnn", f"python:{NETS}:small_cnn", [f"{NETS}:small_cnn"],
                    ModelSpec("python", f"{NETS}:small_cnn", 3, kwargs={"depth": 1})):
        loaded = load_model(path, trusted=trusted)  # type: ignore[arg-type]
        assert torch.equal(loaded(x), model.eval()(x))
    # an entry trusts exactly its kwargs; another factory trusts nothing here
    _refused(path, "refused to run code", trusted=ModelSpec("python", f"{NETS}:small_cnn", 3, kwargs={"depth": 2}))
    _refused(path, "refused to run code", trusted=f"{NETS}:fixed_size_cnn")
    with pytest.raises(ValueError, match="not a Python factory"):
        load_model(path, trusted="timm:resnet18")


def test_pipeline_entry_lifts_the_allow_list_for_its_own_kwargs(tmp_path: Path) -> None:
    """A params.yaml entry (torchvision here) may use builder kwargs a foreign file may not."""
    model = build_model("torchvision:resnet18", 4, progress=False)
    path = save_model(tmp_path / "r18.pt", model)
    _refused(path, "kwarg 'progress' is not one a checkpoint may pass to torchvision")
    load_model(path, trusted=ModelSpec("torchvision", "resnet18", 4, kwargs={"progress": False}))


def test_export_trust_code_flag(tmp_path: Path) -> None:
    path = save_model(tmp_path / "own.pt", build_model(f"{NETS}:small_cnn", 3, depth=1))
    _export_refused(path, tmp_path, f"--trust-code {NETS}:small_cnn")
    out = tmp_path / "own.onnx"
    result = export_cli([str(path), str(out), "--trust-code", f"{NETS}:small_cnn", "--image-size", "16"])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    result = export_cli([str(path), str(out), "--trust-code", "timm:resnet18"])
    assert result.exit_code == 2 and "--trust-code: trusted 'timm:resnet18': not a Python factory" in \
        " ".join(result.output.split())
