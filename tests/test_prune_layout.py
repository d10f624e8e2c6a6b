"""The slimming subpackage stays readable, and torch-pruning is patched only when a graph is built.

- every module of ``slimcore/prune/`` is small (one concept each) and none imports a private
  name of another, and the modules of slimming import one another without a circle
  (``TYPE_CHECKING`` imports included);
- :mod:`slimcore.tp_compat` refuses a torch-pruning outside the supported range, naming it;
- importing slimcore leaves torch-pruning as released; building a graph applies the workarounds.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PRUNE = ROOT / "slimcore" / "prune"
MAX_LINES = 420


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(file: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``import``/``from ... import`` anywhere in ``file``."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_every_prune_module_is_small_and_says_what_it_holds() -> None:
    files = sorted(PRUNE.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "policy.py", "groups.py", "selection.py", "search.py",
                                       "constant_folding.py", "surgery.py", "api.py"}
    assert not (ROOT / "slimcore" / "prune.py").exists()
    for f in files:
        lines = len(f.read_text().splitlines())
        assert lines <= MAX_LINES, f"{f.relative_to(ROOT)} has {lines} lines (> {MAX_LINES}): split it by concept"
        assert ast.get_docstring(ast.parse(f.read_text())), f"{f.relative_to(ROOT)} has no module docstring"


def test_no_private_name_is_imported_across_slimming_modules() -> None:
    for f in [*PRUNE.glob("*.py"), ROOT / "slimcore" / "tp_compat.py", ROOT / "slimcore" / "plan.py"]:
        for module, names in _imports(f):
            if module.startswith("slimcore"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{f.relative_to(ROOT)} imports private {private} from {module}"


def test_slimming_modules_import_without_a_circle() -> None:
    """Depth-first over slimcore imports from slimcore.prune (function-level and TYPE_CHECKING too)."""
    edges: dict[str, set[str]] = {}

    def visit(module: str) -> None:
        if module in edges:
            return
        file = _module_file(module)
        edges[module] = set()
        if file is None:
            return
        for name, names in _imports(file):
            if not name.startswith("slimcore"):
                continue
            targets = [name] + [f"{name}.{n}" for n in names if _module_file(f"{name}.{n}")]
            for target in targets:
                if _module_file(target) is not None and target != module:
                    edges[module].add(target)
                    visit(target)

    visit("slimcore.prune")
    for m in [p.stem for p in PRUNE.glob("*.py") if p.stem != "__init__"]:
        visit(f"slimcore.prune.{m}")
    state: dict[str, int] = {}

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return [*path, module, target]
            if state.get(target) is None:
                found = cycle_from(target, [*path, module])
                if found:
                    return found
        state[module] = 2
        return None

    for module in sorted(edges):
        if state.get(module) is None:
            found = cycle_from(module, [])
            assert found is None, "import circle: " + " -> ".join(found)


def test_tp_compat_refuses_an_unsupported_torch_pruning(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_pruning as tp

    from slimcore import tp_compat
    from slimcore.prune import slim

    monkeypatch.setattr(tp, "__version__", "1.5.3", raising=False)
    with pytest.raises(tp_compat.UnsupportedVersionError, match=r"torch-pruning >=1\.6,<1\.7.*1\.5\.3"):
        tp_compat.check_version()
    with pytest.raises(RuntimeError, match=r">=1\.6,<1\.7"):
        tp_compat.ensure_applied()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(tp_compat.UnsupportedVersionError, match=r">=1\.6,<1\.7"):  # not taken for untraceable
        slim(model, 0.5, torch.randn(1, 3, 8, 8), on_untraceable="warn")
    monkeypatch.setattr(tp, "__version__", "1.7.0")
    with pytest.raises(RuntimeError, match=r">=1\.6,<1\.7"):
        tp_compat.check_version()
    monkeypatch.setattr(tp, "__version__", "1.6.2")
    tp_compat.check_version()


_PROBE = """
import torch, torch_pruning as tp
from torch import nn
originals = (tp.ops.SlicePruner.prune_out_channels, tp.dependency.shape_infer.init_shape_information,
             tp.dependency.index_mapping.update_concat_index_mapping,
             tp.dependency.index_mapping.update_split_index_mapping)
import slimcore.prune, slimcore.plan, slimcore.tp_compat
now = (tp.ops.SlicePruner.prune_out_channels, tp.dependency.shape_infer.init_shape_information,
       tp.dependency.index_mapping.update_concat_index_mapping,
       tp.dependency.index_mapping.update_split_index_mapping)
assert all(a is b for a, b in zip(originals, now)), "importing slimcore patched torch-pruning"
assert tp.DependencyGraph.get_pruning_group is not slimcore.tp_compat.bounded_pruning_group
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
graph = slimcore.plan.build_graph(model, torch.randn(1, 3, 8, 8))
after = (tp.ops.SlicePruner.prune_out_channels, tp.dependency.shape_infer.init_shape_information,
         tp.dependency.index_mapping.update_concat_index_mapping,
         tp.dependency.index_mapping.update_split_index_mapping)
assert all(a is not b for a, b in zip(originals, after)), "build_graph did not apply the workarounds"
assert graph.get_pruning_group.__func__ is slimcore.tp_compat.bounded_pruning_group
print("ok")
"""


def test_importing_slimcore_leaves_torch_pruning_alone_until_a_graph_is_built() -> None:
    # a fresh interpreter: this test process may have built graphs already
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
