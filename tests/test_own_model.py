"""docs/own-model.md, followed literally: a timm model and a module of your own, under DVC.

The slow test writes the page's module file and merges its ``params.yaml`` block into a
scratch git+DVC copy of the project (only epochs, ratios and profiling runs are reduced, for
time), puts a "pretrained" state_dict with a 1000-class head into ``weights/``, runs the whole
pipeline with ``dvc repro``, and checks that both models were pruned for real, fine-tuned, and
reload from their checkpoints through their own source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_e2e_dvc import _copy_project, dvc, init_repo, skip_without_dvc_checkout
from test_own_data import guide_page

from slimcore_pipeline.config import parse_params

ROOT = Path(__file__).resolve().parents[1]
PAGE = "own-model.md"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", guide_page(PAGE), re.DOTALL)


def readme_module() -> tuple[str, str]:
    """(file name, source) of the section's Python block, whose first line names the file."""
    (block,) = readme_blocks("python")
    first, _, _ = block.partition("\n")
    match = re.fullmatch(r"# (\w+\.py)", first.strip())
    assert match, f"docs/own-model.md's module block must start with '# FILE.py', got {first!r}"
    return match.group(1), block


def readme_params() -> dict[str, Any]:
    (block,) = readme_blocks("yaml")
    return yaml.safe_load(block)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` written into ``base`` section by section (what 'change these keys' means)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "models":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def test_readme_block_validates_and_names_every_model() -> None:
    extra = readme_params()
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), extra)
    parsed = parse_params(params)
    assert set(parsed.archs) == set(extra["models"]), "every model of the block is in archs"
    sources = {parsed.model_for(a).source for a in parsed.archs}
    assert sources == {"timm", "python"}, sources
    name, source = readme_module()
    module = name.removesuffix(".py")
    assert any(m["name"].startswith(f"{module}:") for m in extra["models"].values()), (module, extra["models"])
    compile(source, name, "exec")  # the page's module is valid Python


def test_readme_module_builds_a_prunable_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slimcore.models import build_model
    from slimcore.prune import slim

    name, source = readme_module()
    (tmp_path / name).write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = next(m for m in readme_params()["models"].values() if m["source"] == "python")
    model = build_model(entry["name"], 10, **entry.get("kwargs", {}))
    pruned, report = slim(model, 0.4, torch.randn(2, 3, 32, 32))
    assert report.removed_bn_channels > 0 and pruned(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.slow
def test_readme_own_model_under_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    skip_without_dvc_checkout()
    pytest.importorskip("timm")
    import timm

    from slimcore.checkpoint import load_model

    proj = tmp_path / "proj"
    proj.mkdir()
    _copy_project(proj)
    name, source = readme_module()
    (proj / name).write_text(source)
    monkeypatch.syspath_prepend(str(proj))  # the checkpoints are loaded here too, as a user in proj/ would
    extra = readme_params()
    params = merge(yaml.safe_load((proj / "params.yaml").read_text()), extra)
    params["prune"]["targets"] = [0.4]  # for time: one ratio, short schedules, few latency runs
    params["train"].update(epochs=1, warmup_epochs=0, milestones=[])
    params["finetune"].update(epochs=1, milestones=[])
    params["profile"].update(latency_runs=3, warmup_runs=1)
    params["prune"]["sensitivity_step"] = 0.25  # a 3-ratio sensitivity grid
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    timm_arch = next(a for a, m in extra["models"].items() if m["source"] == "timm")
    pretrained = timm.create_model(extra["models"][timm_arch]["name"], pretrained=False, num_classes=1000)
    torch.save(pretrained.state_dict(), proj / "weights" / f"{timm_arch}.pth")  # a 1000-class head
    init_repo(proj, "own model: docs/own-model.md's module and params")

    repro = dvc("repro", cwd=proj, timeout=600)
    assert repro.returncode == 0, repro.tail()
    log = " ".join(repro.output.split())
    assert "not loaded" in log and "1000 classes" in log, repro.tail()  # the head was left at random init
    results = (proj / "metrics" / "results.md").read_text()
    for arch, entry in extra["models"].items():
        trusted = entry["name"] if entry["source"] == "python" else None  # the page's own module: trusted
        model = load_model(proj / "models" / arch / "finetuned-0.4.pt", trusted=trusted)
        baseline = load_model(proj / "models" / arch / "baseline.pt", trusted=trusted)
        bn = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn0 = sum(m.num_features for m in baseline.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert bn < 0.8 * bn0, (arch, bn, bn0)  # physically smaller
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
        report = json.loads((proj / "metrics" / "prune" / f"{arch}-0.4.json").read_text())
        assert report["removed_bn_channels"] == bn0 - bn, (arch, report["removed_bn_channels"], bn0 - bn)
        assert arch in results
        summary = json.loads((proj / "metrics" / "summary" / f"{arch}.json").read_text())
        assert summary["r1"]["top1"] > 30, (arch, summary)  # 10 classes: well above chance
    assert "up to date" in dvc("status", cwd=proj).output
