"""dvc.yaml agrees with the code: code deps cover imports, stage names and outs match slimcore_pipeline.paths.

Fast (no training): parses dvc.yaml with PyYAML, renders the stage list with DVC in-process.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml

from slimcore_pipeline import paths
from slimcore_pipeline.config import load_params
from tests.helpers.imports import imported_module

ROOT = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("slimcore", "slimcore_pipeline", "stages")
STAGES = ["baseline-train", "sparse-train", "sensitivity", "prune", "finetune", "profile", "evaluate"]
CMD_MODULE = re.compile(r"(?:^|\s)-m\s+(stages\.[A-Za-z_][\w.]*)")


# --------------------------------------------------------------------------------------------
# import closure of a stage module
# --------------------------------------------------------------------------------------------


def _module_file(module: str) -> Path | None:
    """The source file of a ``slimcore.*``/``stages.*`` module (package: its ``__init__.py``)."""
    if module.split(".")[0] not in CODE_PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(file: Path) -> tuple[str, bool]:
    """(dotted name, is_package) of a source file under ROOT."""
    parts = list(file.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _imported_modules(file: Path) -> set[str]:
    """Every module named by an import statement anywhere in ``file`` (functions included)."""
    name, is_package = _module_name(file)
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                # ``import a.b.c`` executes a, a.b and a.b.c
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        elif isinstance(node, ast.ImportFrom):
            base = imported_module(node, package)
            parts = base.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            # ``from pkg import mod`` imports the submodule pkg.mod when there is one
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return {m for m in found if _module_file(m) is not None}


def _is_trivial(file: Path) -> bool:
    """An empty package ``__init__.py`` (at most a docstring) cannot change any result."""
    body = ast.parse(file.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return not body


@cache
def import_closure(module: str) -> frozenset[str]:
    """Repo-relative POSIX paths of every slimcore/stages file ``module`` imports, transitively."""
    start = _module_file(module)
    assert start is not None, f"no source file for {module}"
    seen: set[Path] = set()
    todo = [start]
    # running ``python -m a.b`` imports package a first
    todo += [f for f in (_module_file(p) for p in _parents(module)) if f is not None]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        todo += [f for m in _imported_modules(file) if (f := _module_file(m)) is not None]
    return frozenset(
        f.relative_to(ROOT).as_posix() for f in seen if not (f.name == "__init__.py" and _is_trivial(f))
    )


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _covered(file: str, deps: list[str]) -> bool:
    """``file`` is a dep itself or lies in a directory dep."""
    target = PurePosixPath(file)
    for dep in deps:
        d = PurePosixPath(dep.rstrip("/"))
        if target == d or d in target.parents:
            return True
    return False


# --------------------------------------------------------------------------------------------
# dvc.yaml as written
# --------------------------------------------------------------------------------------------


@cache
def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _raw_stages() -> dict[str, dict]:
    """Stage definitions as written (``foreach``/``matrix`` bodies: their ``do`` or the stage)."""
    return {name: spec.get("do", spec) for name, spec in _dvc_yaml()["stages"].items()}


def _dep_paths(stage: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else str(d) for d in stage.get("deps", [])]


def _stage_module(stage: dict) -> str:
    match = CMD_MODULE.search(stage["cmd"])
    assert match, f"cmd {stage['cmd']!r} does not run `python -m stages.X`"
    return match.group(1)


def test_dvc_yaml_parses_and_has_the_pipeline_stages() -> None:
    assert set(_raw_stages()) == {"baseline-train", "sparse-train", "sensitivity", "prune", "finetune", "profile",
                                  "evaluate"}


@pytest.mark.parametrize("name", STAGES)
def test_stage_code_deps_cover_every_imported_module(name: str) -> None:
    stage = _raw_stages()[name]
    module = _stage_module(stage)
    closure = import_closure(module)
    # sanity: the closure really follows imports (every stage uses _common and paths)
    assert {f"{module.replace('.', '/')}.py", "stages/_common.py", "slimcore_pipeline/config.py"} <= closure
    deps = _dep_paths(stage)
    missing = sorted(f for f in closure if not _covered(f, deps))
    assert not missing, (
        f"stage {name!r} runs {module}, which imports {missing}, but dvc.yaml does not list them "
        f"as deps: a change there would not re-run the stage (stale results)"
    )


@pytest.mark.parametrize("name", STAGES)
def test_stage_code_deps_exist(name: str) -> None:
    """A code dep that names no file (typo, renamed module) makes DVC fail or silently track nothing."""
    code = [d for d in _dep_paths(_raw_stages()[name]) if d.split("/")[0] in CODE_PACKAGES]
    assert code, f"stage {name!r} lists no code deps"
    assert not [d for d in code if not (ROOT / d).exists()], f"stage {name!r}: deps not in the repo"
    assert len(code) == len(set(code)), f"stage {name!r} lists a code dep twice: {sorted(code)}"


def test_import_closure_follows_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The resolver itself: imports inside functions, ``from pkg import mod`` and packages."""
    # stages/_common.py imports slimcore.checkpoint only inside stage(); _training imports train in a function
    closure = import_closure("stages.baseline_train")
    assert {"slimcore/checkpoint.py", "slimcore_pipeline/train.py", "slimcore_pipeline/paths.py",
            "slimcore_pipeline/console.py"} <= closure
    # slimcore/models.py is reached through slimcore.checkpoint; plan.py only via checkpoint's lazy import
    assert {"slimcore/models.py", "slimcore/plan.py"} <= closure
    # loading checkpoints never needs the slimming policy, and only training stages import the loop
    assert not [f for f in closure if f == "slimcore/prune.py" or f.startswith("slimcore/prune/")]
    assert "slimcore_pipeline/train.py" not in import_closure("stages.prune")
    # ``from slimcore_pipeline import paths, results_table`` inside a function counts as results_table.py
    assert "slimcore_pipeline/results_table.py" in import_closure("stages.evaluate")


# --------------------------------------------------------------------------------------------
# the rendered stage list (DVC's own view of foreach/matrix with this repo's params)
# --------------------------------------------------------------------------------------------


def _render(root: Path) -> dict[str, dict[str, list[str]]]:
    """{stage name: {"outs": [...], "deps": [...], "cmd": str}} as DVC renders dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {
            stage.name: {
                "outs": [str(PurePosixPath(o.def_path)) for o in stage.outs],
                "deps": [str(PurePosixPath(d.def_path)) for d in stage.deps],
                "cmd": stage.cmd,
            }
            for stage in repo.index.stages
        }


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, list[str]]]:
    return _render(ROOT)


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def _expected_outs(params) -> dict[str, set[str]]:
    def posix(*ps: Path) -> set[str]:
        return {PurePosixPath(p).as_posix() for p in ps}

    expected: dict[str, set[str]] = {}
    for arch in params.archs:
        expected[f"baseline-train@{arch}"] = posix(paths.checkpoint(arch, "baseline"),
                                                   paths.curves(arch, "baseline-train"),
                                                   paths.timings(arch, "baseline-train"))
        for target in params.prune.parsed_targets():
            tag = paths.target_tag(target)
            sparse, sensitivity = f"sparse-train@{arch}-{tag}", f"sensitivity@{arch}-{tag}"
            expected[sparse] = posix(paths.sparse(arch, target), paths.curves(arch, paths.sparse_run(target)),
                                     paths.timings(arch, paths.sparse_run(target)))
            expected[sensitivity] = posix(paths.sensitivity_report(arch, target),
                                          paths.timings(arch, paths.sensitivity_run(target)))
            prune, finetune = f"prune@{arch}-{tag}", f"finetune@{arch}-{tag}"
            expected[prune] = posix(paths.pruned(arch, target), paths.pruned(arch, target, fold=False),
                                    paths.prune_report(arch, target), paths.timings(arch, paths.prune_run(target)))
            run = paths.finetune_run(target)
            expected[finetune] = posix(paths.finetuned(arch, target), paths.curves(arch, run),
                                       paths.timings(arch, run))
            # together the four stages write exactly what the profile stage removes for a dropped target
            assert expected[sparse] | expected[sensitivity] | expected[prune] | expected[finetune] \
                == posix(*paths.target_outputs(arch, target))
    expected["profile"] = posix(paths.profile_report(), paths.latency_report(), paths.latency_table())
    expected["evaluate"] = posix(paths.results_table(), paths.plots_dir(), paths.eval_report(), paths.details_dir(),
                                 paths.summaries())
    return expected


def test_rendered_stage_names(rendered, params) -> None:
    names = set(rendered)
    for arch in params.archs:
        assert f"baseline-train@{arch}" in names
        for target in params.prune.parsed_targets():
            assert f"sparse-train@{arch}-{paths.target_tag(target)}" in names, sorted(names)
            assert f"sensitivity@{arch}-{paths.target_tag(target)}" in names, sorted(names)
            assert f"prune@{arch}-{paths.target_tag(target)}" in names, sorted(names)
            assert f"finetune@{arch}-{paths.target_tag(target)}" in names, sorted(names)
    assert {"profile", "evaluate"} <= names
    assert names == set(_expected_outs(params)), "stages beyond (or short of) the archs x targets grid"


def test_rendered_outs_match_slimcore_paths(rendered, params) -> None:
    for name, outs in _expected_outs(params).items():
        assert set(rendered[name]["outs"]) == outs, name


def test_declared_metrics_are_the_summaries_only() -> None:
    """`dvc metrics diff` shows accuracy, ratios, FLOPs and params, never a wall-clock figure."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        metrics = {str(PurePosixPath(o.def_path)) for stage in repo.index.stages for o in stage.outs if o.metric}
        uncached = {str(PurePosixPath(o.def_path)) for stage in repo.index.stages for o in stage.outs
                    if not o.use_cache}
    assert metrics == {paths.summaries().as_posix()}
    timing_outs = {o for o in uncached if o.startswith(paths.timings_dir().as_posix() + "/")}
    assert timing_outs, "wall-clock figures must be outputs under metrics/timings/"


def test_stale_target_outputs_are_found_and_only_those(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a dropped target left behind is found; current targets and other archs are untouched."""
    monkeypatch.chdir(tmp_path)
    dropped = [0.6, "flops0.5", "params0.3", "speedup4", "safe", 1e-05]
    for arch, target in [("vgg16_bn", 0.2), ("vgg16_bn", "flops0.25"), *[("vgg16_bn", t) for t in dropped],
                         ("resnet50", 0.6), ("resnet50", "safe")]:
        for path in paths.target_outputs(arch, target):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
    paths.checkpoint("vgg16_bn", "baseline").write_text("x")
    stale = paths.stale_target_outputs(["vgg16_bn"], [0.2, "flops0.25"])
    assert sorted(stale) == sorted(p for t in dropped for p in paths.target_outputs("vgg16_bn", t))
    # what an earlier version's one sparse model per arch left: found too, for this arch only
    for arch in ("vgg16_bn", "resnet50"):
        for path in paths.per_arch_sparse_outputs(arch):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
    legacy = paths.stale_target_outputs(["vgg16_bn"], [0.2, "flops0.25"])
    assert sorted(legacy) == sorted(stale + paths.per_arch_sparse_outputs("vgg16_bn"))
    assert Path("models/vgg16_bn/sparse.pt") in legacy and Path("metrics/sensitivity/vgg16_bn.json") in legacy


@pytest.mark.parametrize("target,files", [
    (0.2, ["models/A/sparse-0.2.pt", "models/A/pruned-0.2.pt", "models/A/finetuned-0.2.pt",
           "metrics/prune/A-0.2.json", "metrics/sensitivity/A-0.2.json", "metrics/A/sparse-train-0.2"]),
    ("speedup2", ["models/A/sparse-speedup2.pt", "metrics/timings/A/sparse-train-speedup2.json",
                  "metrics/timings/A/sensitivity-speedup2.json", "models/A/pruned-speedup2-nofold.pt"]),
    ("flops0.5", ["models/A/pruned-flops0.5.pt", "models/A/pruned-flops0.5-nofold.pt",
                  "metrics/prune/A-flops0.5.json", "metrics/timings/A/prune-flops0.5.json"]),
    ("params0.3", ["models/A/finetuned-params0.3.pt", "metrics/A/finetune-params0.3"]),
    ("safe", ["models/A/finetuned-safe.pt", "metrics/prune/A-safe.json", "metrics/timings/A/finetune-safe.json"]),
])
def test_target_names_in_paths(target: object, files: list[str]) -> None:
    outs = {p.as_posix() for p in paths.target_outputs("A", target)}
    assert set(files) <= outs and len(outs) == 12


def test_rendered_data_deps_chain_the_stages(rendered, params) -> None:
    """Each stage reads what the previous one writes, at the path the code reads it from."""
    for arch in params.archs:
        for target in params.prune.parsed_targets():
            tag = paths.target_tag(target)
            sparse = paths.sparse(arch, target).as_posix()
            assert sparse in rendered[f"prune@{arch}-{tag}"]["deps"]
            assert paths.sensitivity_report(arch, target).as_posix() in rendered[f"prune@{arch}-{tag}"]["deps"]
            assert paths.pruned(arch, target).as_posix() in rendered[f"finetune@{arch}-{tag}"]["deps"]
            # each target's sparse model starts from the baseline (or model.weights); its curve reads it
            assert paths.checkpoint(arch, "baseline").as_posix() in rendered[f"sparse-train@{arch}-{tag}"]["deps"]
            assert params.model.weights in rendered[f"sparse-train@{arch}-{tag}"]["deps"]
            assert sparse in rendered[f"sensitivity@{arch}-{tag}"]["deps"]
            for stage in ("sparse-train", "sensitivity", "prune"):
                cmd = rendered[f"{stage}@{arch}-{tag}"]["cmd"]
                assert f"--arch {arch}" in cmd and f"--target {tag}" in cmd, stage
        assert params.model.weights in rendered[f"baseline-train@{arch}"]["deps"]
    for name in ("profile", "evaluate"):
        assert _covered(paths.finetuned(params.archs[0], params.prune.targets[0]).as_posix(),
                        rendered[name]["deps"]), name
    assert paths.profile_report().as_posix() in rendered["evaluate"]["deps"]


def test_evaluate_reads_the_reports_without_depending_on_their_folders(rendered, params) -> None:
    """evaluate reads metrics/prune/ARCH-T.json and metrics/sensitivity/ARCH-T.json, but a folder dep
    would hash what `dvc exp apply` leaves of targets no longer requested (evaluate: changed deps).
    What those reports hold is a function of evaluate's deps: the sparse checkpoints, the params and
    the code of the stages that write them."""
    evaluate = rendered["evaluate"]
    for report in (paths.prune_report(params.archs[0], params.prune.targets[0]),
                   paths.sensitivity_report(params.archs[0], params.prune.targets[0])):
        assert not _covered(report.as_posix(), evaluate["deps"]), report
    raw = _raw_stages()
    for writer in ("prune", "sensitivity"):
        code = [d for d in _dep_paths(raw[writer]) if d.split("/")[0] in CODE_PACKAGES]
        assert not [d for d in code if not _covered(d, evaluate["deps"])], writer
    for arch in params.archs:
        for target in params.prune.targets:
            assert _covered(paths.sparse(arch, target).as_posix(), evaluate["deps"])


@pytest.mark.parametrize("name", STAGES)
def test_stages_that_read_data_depend_on_data_root(name: str) -> None:
    """A stage whose code loads the dataset lists ``${data.root}``; one that does not, does not."""
    stage = _raw_stages()[name]
    reads_data = "slimcore_pipeline/data.py" in import_closure(_stage_module(stage))
    assert ("${data.root}" in _dep_paths(stage)) is reads_data, (name, _dep_paths(stage))


def test_rendered_data_root_dep_relative_or_absolute(rendered, params, tmp_path: Path) -> None:
    """DVC renders data.root as written: the committed ``data`` folder, or an absolute path outside."""
    readers = [n for n in rendered if n.split("@")[0] in ("baseline-train", "sparse-train", "sensitivity", "finetune",
                                                          "evaluate")]
    assert readers and all(params.data.root in rendered[n]["deps"] for n in readers)
    assert (ROOT / params.data.root).is_dir(), "DVC fails on a dep path that does not exist"
    outside = tmp_path / "images"
    outside.mkdir()
    scratch = tmp_path / "repo"
    scratch.mkdir()
    shutil.copy(ROOT / "dvc.yaml", scratch / "dvc.yaml")
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["data"]["root"] = str(outside)
    (scratch / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=scratch, check=True)
    (scratch / ".dvc").mkdir()
    (scratch / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    absolute = _render(scratch)
    for name in readers:
        assert str(outside) in absolute[name]["deps"], name
    assert not [n for n in absolute if n not in readers and str(outside) in absolute[n]["deps"]]


def _render_with_targets(tmp_path: Path, targets: str) -> dict[str, dict[str, list[str]]]:
    """Render dvc.yaml in a scratch repo whose params.yaml spells ``prune.targets`` as given."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    text = (ROOT / "params.yaml").read_text()
    data = yaml.safe_load(text)
    data["prune"]["targets"] = "__TARGETS__"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False).replace("__TARGETS__", targets))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    return _render(tmp_path)


@pytest.mark.parametrize("targets", ["[0.0, 0.25, 0.50]", "[0.2, 0.4, 0.6]",
                                     "[0.2, flops0.5, 'params0.3', safe]"])
def test_target_spelling_in_names_matches_paths(tmp_path: Path, targets: str) -> None:
    """However params.yaml spells a target, DVC's names and slimcore_pipeline.paths' names agree."""
    rendered = _render_with_targets(tmp_path, targets)
    params = load_params(tmp_path / "params.yaml")
    expected = _expected_outs(params)
    assert set(rendered) == set(expected)
    for name, outs in expected.items():
        assert set(rendered[name]["outs"]) == outs, name
    if "flops" in targets:  # readable stage names, as DVC renders the matrix values
        for name in ("prune@resnet50-0.2", "prune@resnet50-flops0.5", "prune@resnet50-params0.3",
                     "prune@resnet50-safe", "finetune@vgg16_bn-flops0.5"):
            assert name in rendered, sorted(rendered)
        assert rendered["prune@resnet50-flops0.5"]["cmd"].endswith("--arch resnet50 --target flops0.5")
        assert "models/resnet50/pruned-flops0.5.pt" in rendered["prune@resnet50-flops0.5"]["outs"]
        assert "models/mobilenet_v2/finetuned-safe.pt" in rendered["finetune@mobilenet_v2-safe"]["outs"]


def test_integer_ratio_is_refused_before_dvc_misnames_it(tmp_path: Path) -> None:
    """``0`` would render as ``pruned-0.pt`` in dvc.yaml but the stage writes ``pruned-0.0.pt``."""
    from slimcore_pipeline.config import ParamsError

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prune"]["targets"] = [0, 0.5]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"prune\.targets.*0\.0, not 0"):
        load_params(tmp_path / "params.yaml")


# --------------------------------------------------------------------------------------------
# git hygiene
# --------------------------------------------------------------------------------------------


def test_default_data_folder_is_committed_and_its_contents_ignored() -> None:
    """``data/`` exists in every clone (README + .gitignore) while datasets put there stay out of git."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "data"], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.split()
    assert tracked == ["data/.gitignore", "data/README.md"], tracked
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", "data/my-images/train/cat/1.png"],
                             cwd=ROOT)
    assert ignored.returncode == 0, "data/.gitignore must keep datasets out of git"


def test_no_checkpoint_is_tracked_by_git() -> None:
    """models/ holds DVC outputs: only DVC's own .gitignore files may ever be in git."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "models"], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.split()
    committed = [f for f in tracked if PurePosixPath(f).name != ".gitignore"]
    assert not committed, f"checkpoints tracked by git (DVC outputs must stay out of git): {committed}"


def test_the_profile_stage_sums_up_what_it_removed() -> None:
    """Dropping targets removes a dozen files per target: the log says how many and why, in a line each."""
    from stages.profile import removal_lines

    dropped = [p for t in (0.6, "speedup4") for p in paths.target_outputs("vgg16_bn", t)]
    legacy = paths.per_arch_sparse_outputs("vgg16_bn")
    lines = removal_lines(dropped + legacy, ["vgg16_bn"])
    assert len(lines) == 2
    assert lines[0].startswith(f"profile: removed {len(dropped)} outputs of targets no longer in prune.targets")
    assert lines[0].endswith(f"and {len(dropped) - 3} more") and dropped[0].as_posix() in lines[0]
    assert lines[1].startswith(f"profile: removed {len(legacy)} outputs left by an earlier version's one sparse "
                               "model per arch")
    assert removal_lines([], ["vgg16_bn"]) == []
