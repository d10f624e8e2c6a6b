"""The engine (slimcore) stands alone: it never imports the pipeline or the pipeline's packages,
its modules import one another without a circle, and it slims, saves and loads a model with
those packages made unimportable."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers.imports import imported_module

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "slimcore"
# what `pip install slimcore` does not install: the pipeline and the packages only it needs
FORBIDDEN = ("slimcore_pipeline", "stages", "dvc", "dvclive", "dvc_render", "typer", "click", "pydantic", "rich",
             "yaml", "sklearn")


def _engine_files() -> list[Path]:
    return sorted(ENGINE.rglob("*.py"))


def _module_name(file: Path) -> str:
    parts = list(file.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(file: Path) -> list[tuple[str, list[str], int]]:
    """Every import in ``file``, anywhere (functions and ``if TYPE_CHECKING:`` blocks included):
    (absolute module, names imported from it, line); relative imports resolved."""
    name = _module_name(file)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((imported_module(node, package), [alias.name for alias in node.names], node.lineno))
    return found


def _engine_modules() -> dict[str, Path]:
    return {_module_name(f): f for f in _engine_files()}


def _edges() -> dict[str, set[str]]:
    """slimcore module -> the slimcore modules it imports (``from slimcore.x import y`` names
    slimcore.x.y when that is a module, and slimcore.x otherwise)."""
    modules = _engine_modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, file in modules.items():
        for module, names, _ in _imports(file):
            if module.split(".")[0] != "slimcore":
                continue
            subs = {f"{module}.{n}" for n in names if f"{module}.{n}" in modules}
            if subs:
                edges[name] |= subs
            if not names or len(subs) < len(names):
                target = module
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules:
                    edges[name].add(target)
        edges[name].discard(name)
    return edges


def test_the_engine_never_imports_the_pipeline_or_its_packages() -> None:
    bad = [f"{f.relative_to(ROOT)}:{line}: imports {module}"
           for f in _engine_files() for module, _, line in _imports(f) if module.split(".")[0] in FORBIDDEN]
    assert not bad, "the engine must stand alone (pip install slimcore has none of these):\n" + "\n".join(bad)


def test_engine_modules_import_one_another_without_a_circle() -> None:
    edges = _edges()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "import circles among engine modules:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_layering_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """The walkers themselves: TYPE_CHECKING and function-level imports, relative imports."""
    probe = ENGINE / "_layering_probe.py"
    assert not probe.exists()
    probe.write_text(textwrap.dedent("""
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            import yaml
        def f():
            from . import checkpoint
            from .errors import ModelError
    """))
    try:
        found = {m for m, _, _ in _imports(probe)}
        assert {"yaml", "slimcore", "slimcore.errors"} <= found
        assert {"slimcore.checkpoint", "slimcore.errors"} <= _edges()["slimcore._layering_probe"]
    finally:
        probe.unlink()


SCRIPT = """
import importlib, importlib.abc, importlib.util, pathlib, sys

FORBIDDEN = {forbidden!r}


class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # importing a blocked package raises ImportError (a find_spec probe alone, as torch makes for
    # optional packages, sees a module that then fails to load)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"{{spec.name}} is blocked: the engine must not need it")

    def exec_module(self, module):
        raise ImportError(f"{{module.__name__}} is blocked: the engine must not need it")


sys.meta_path.insert(0, Block())
for name in {modules!r}:
    importlib.import_module(name)

import torch
import torchvision

from slimcore.checkpoint import load_model, save_model
from slimcore.models import build_model
from slimcore.prune import slim

torch.manual_seed(0)
model = build_model("resnet50", 10, "imagenet", 1.0).eval()
x = torch.randn(2, 3, 32, 32)
slimmed, report = slim(model, 0.3, x)
path = save_model(pathlib.Path(sys.argv[1]) / "slim.pt", slimmed)
loaded = load_model(path).eval()
with torch.no_grad():
    a, b = slimmed.eval()(x), loaded(x)
assert a.shape == (2, 10), a.shape
assert torch.equal(a, b), (a - b).abs().max()
assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
loaded_from_tv = isinstance(loaded, torchvision.models.ResNet)
print("ok", loaded_from_tv, sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN))
"""


def test_the_engine_slims_saves_and_loads_with_the_pipeline_packages_blocked(tmp_path: Path) -> None:
    modules = sorted(m for m in _engine_modules() if m != "slimcore.__main__")
    code = SCRIPT.format(forbidden=set(FORBIDDEN), modules=modules)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    # (an optional package such as timm may print that one of its own imports was blocked)
    assert out.stdout.splitlines()[-1:] == ["ok True []"], out.stdout + out.stderr
