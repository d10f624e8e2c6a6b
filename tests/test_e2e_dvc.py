"""End to end: the real pipeline under DVC, in a scratch copy of the project with tiny params.

``dvc repro`` runs once (module fixture); the tests then check its artifacts, that a second
``dvc repro`` does nothing, and that ``dvc exp run -S prune.targets=[flops0.5]`` (a FLOPs target
instead of the ratios) re-runs only the prune side of the pipeline.  About a minute and a half on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests: python, dvc
ARCH = "vgg16_bn"
RATIOS = (0.2, 0.5)
EXP_TARGET = "flops0.5"  # keep half the FLOPs: the ratio is searched
TIMEOUT = 420  # seconds per DVC command: generous for a loaded 2-core machine
# pipeline outputs are produced by the test, never copied from the developer's workspace
OUTPUTS = ("dvc.lock", "metrics/", "models/", "dvc_plots/", ".slimcore/")


@dataclass
class Result:
    cmd: str
    returncode: int
    output: str

    def tail(self, chars: int = 6000) -> str:
        return f"$ {self.cmd}  (exit {self.returncode})\n{self.output[-chars:]}"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "DVC_")) and k != "PYTHONPATH"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # stage commands call `python`
    env.update(DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",  # 2 shared cores
               GIT_AUTHOR_NAME="slimcore test", GIT_AUTHOR_EMAIL="test@slimcore.invalid",
               GIT_COMMITTER_NAME="slimcore test", GIT_COMMITTER_EMAIL="test@slimcore.invalid")
    return env


def run(args: list[str], cwd: Path, timeout: float = TIMEOUT) -> Result:
    """Run a command (stdout + stderr together); on timeout kill its whole process group."""
    cmd = " ".join(args)
    proc = subprocess.Popen(args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s:\n{Result(cmd, -9, out or '').tail()}")
    return Result(cmd, proc.returncode, out)


def ok(args: list[str], cwd: Path, timeout: float = TIMEOUT) -> Result:
    result = run(args, cwd, timeout)
    assert result.returncode == 0, result.tail()
    return result


def dvc(*args: str, cwd: Path, timeout: float = TIMEOUT) -> Result:
    return run([str(BIN / "dvc"), *args], cwd, timeout)


def _copy_project(dest: Path) -> None:
    """The developer's tracked and untracked-but-not-ignored files (uncommitted work included)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if rel.startswith(OUTPUTS) or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    (dest / ".dvc").mkdir(exist_ok=True)
    shutil.copy2(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    if (ROOT / ".dvc" / "plots").is_dir():
        shutil.copytree(ROOT / ".dvc" / "plots", dest / ".dvc" / "plots", dirs_exist_ok=True)
    if (ROOT / ".dvcignore").is_file():
        shutil.copy2(ROOT / ".dvcignore", dest / ".dvcignore")


def _tiny_params(proj: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["archs"] = [ARCH]
    params["prune"]["targets"] = list(RATIOS)
    params["train"].update(epochs=1, warmup_epochs=0, milestones=[])
    params["finetune"].update(epochs=1, milestones=[])
    params["profile"].update(latency_runs=3, warmup_runs=1)
    params["prune"]["sensitivity_step"] = 0.25  # for time: a 3-ratio sensitivity grid
    params["data"]["image_size"] = 8  # vgg16_bn's cifar stem accepts 8px
    assert ARCH in params["penalty"]["strength"]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _commit(proj: Path, message: str) -> None:
    ok(["git", "add", "-A"], proj)
    ok(["git", "commit", "-q", "--allow-empty", "-m", message], proj)


def init_repo(proj: Path, message: str) -> None:
    """Make ``proj`` a git repository with a test identity (no signing) and commit all of it."""
    ok(["git", "init", "-q"], proj)
    for key, value in (("user.email", "test@slimcore.invalid"), ("user.name", "slimcore test"),
                       ("commit.gpgsign", "false")):
        ok(["git", "config", key, value], proj)
    _commit(proj, message)


@dataclass
class Pipeline:
    proj: Path
    repro: Result


def skip_without_dvc_checkout() -> None:
    """The end-to-end tests need DVC in this venv and the project's git checkout to copy."""
    if not (BIN / "dvc").exists():
        pytest.skip(f"dvc is not installed next to {sys.executable}")
    if not (ROOT / ".git").exists():
        pytest.skip("needs the project's git checkout")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    skip_without_dvc_checkout()
    proj = tmp_path_factory.mktemp("e2e") / "proj"
    proj.mkdir()
    _copy_project(proj)
    _tiny_params(proj)
    init_repo(proj, "slimcore e2e: tiny params")
    repro = dvc("repro", cwd=proj)
    assert repro.returncode == 0, repro.tail()
    return Pipeline(proj, repro)


@pytest.fixture(scope="module")
def rerun(pipeline: Pipeline) -> tuple[Result, Result]:
    """A second ``dvc repro`` and ``dvc status`` right after the first (before any experiment)."""
    return dvc("repro", cwd=pipeline.proj), dvc("status", cwd=pipeline.proj)


@dataclass
class Experiment:
    run: Result
    metrics_diff: Result
    plots_show: Result
    plots_dir: Path
    tracked_models: list[str]


@pytest.fixture(scope="module")
def experiment(pipeline: Pipeline, rerun: tuple[Result, Result]) -> Experiment:
    proj = pipeline.proj
    _commit(proj, "slimcore e2e: first repro (dvc.lock, metrics/)")
    tracked = ok(["git", "ls-files", "models"], proj).output.split()
    run_ = dvc("exp", "run", "-S", f"prune.targets=[{EXP_TARGET}]", cwd=proj)
    assert run_.returncode == 0, run_.tail()
    plots_dir = proj.parent / "plots"
    return Experiment(run_, dvc("metrics", "diff", cwd=proj), dvc("plots", "show", "-o", str(plots_dir), cwd=proj),
                      plots_dir, tracked)


# --------------------------------------------------------------------------------------------
# the first `dvc repro`
# --------------------------------------------------------------------------------------------


def test_repro_writes_every_checkpoint(pipeline: Pipeline) -> None:
    models = pipeline.proj / "models" / ARCH
    names = ["baseline"] + [f"{kind}-{r}{suffix}" for r in RATIOS for kind, suffix in
                            (("sparse", ""), ("pruned", ""), ("pruned", "-nofold"), ("finetuned", ""))]
    missing = [n for n in names if not (models / f"{n}.pt").is_file()]
    assert not missing, f"missing checkpoints {missing}\n{pipeline.repro.tail()}"
    per_ratio = [f"{kind}@{ARCH}-{r}" for r in RATIOS for kind in ("sparse-train", "sensitivity", "prune", "finetune")]
    for stage in (f"baseline-train@{ARCH}", *per_ratio, "profile", "evaluate"):
        assert f"Running stage '{stage}'" in pipeline.repro.output, pipeline.repro.tail()


def test_results_table_has_a_row_per_ratio(pipeline: Pipeline) -> None:
    table = (pipeline.proj / "metrics" / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(f"| {ARCH} |")]
    for ratio in RATIOS:
        assert any(f"| {100 * ratio:g}% |" in row for row in rows), f"no {ratio:.0%} row for {ARCH}:\n{table}"


def test_eval_and_profile_reports(pipeline: Pipeline) -> None:
    metrics = pipeline.proj / "metrics"
    labels = {"baseline"} | {f"{kind}-{r}" for r in RATIOS for kind in ("sparse", "pruned", "finetuned")} \
        | {f"pruned-{r}-nofold" for r in RATIOS}
    evals = json.loads((metrics / "eval.json").read_text())
    assert set(evals) == {ARCH}
    assert set(evals[ARCH]) == labels
    for label, values in evals[ARCH].items():
        assert 0.0 <= values["top1"] <= values["top5"] <= 1.0, (label, values)
    profile = json.loads((metrics / "profile.json").read_text())
    assert set(profile) == {ARCH}
    assert labels <= set(profile[ARCH])
    for label in labels:
        entry = profile[ARCH][label]
        assert entry["params"] > 0 and entry["flops"] > 0 and entry["bytes"] > 0, (label, entry)
    latency = json.loads((metrics / "timings" / "latency.json").read_text())[ARCH]
    assert set(latency) == {"baseline"} | {f"finetuned-{r}" for r in RATIOS}
    assert all(t["median_ms"] > 0 for t in latency.values())
    assert "speedup" in (metrics / "timings" / "latency.md").read_text()
    assert profile[ARCH]["finetuned-0.5"]["params"] < profile[ARCH]["finetuned-0.2"]["params"] \
        < profile[ARCH]["baseline"]["params"]


def test_declared_metrics_are_one_small_summary_per_arch(pipeline: Pipeline) -> None:
    show = dvc("metrics", "show", "--json", cwd=pipeline.proj)
    assert show.returncode == 0, show.tail()
    data = json.loads(show.output[show.output.index("{"):])
    files = next(iter(data.values()))["data"]
    assert set(files) == {f"metrics/summary/{ARCH}.json"}, sorted(files)
    summary = files[f"metrics/summary/{ARCH}.json"]["data"]
    assert list(summary) == [f"r{i + 1}" for i in range(len(RATIOS))] + ["baseline"]
    assert 0 < summary["r1"]["top1"] <= 100 and 0 < summary["r2"]["macs_kept"] < summary["r1"]["macs_kept"] < 100
    details = json.loads((pipeline.proj / "metrics" / "details" / f"{ARCH}.json").read_text())
    assert [details[f"r{i + 1}"]["ratio"] for i in range(len(RATIOS))] == list(RATIOS)
    assert details["r1"]["params"] < details["baseline"]["params"] and details["r1"]["top1"] == summary["r1"]["top1"]
    for i, ratio in enumerate(RATIOS):  # each target's sparse model has its own curve and safe ratio
        sensitivity = json.loads((pipeline.proj / "metrics" / "sensitivity" / f"{ARCH}-{ratio}.json").read_text())
        assert details[f"r{i + 1}"]["safe_ratio"] == sensitivity["safe_ratio"]
        assert [p["ratio"] for p in sensitivity["points"]] == [0.25, 0.5, 0.75]
    table = dvc("metrics", "show", cwd=pipeline.proj)  # no flags: one row per arch, under 160 columns
    assert table.returncode == 0 and max(map(len, table.output.splitlines())) <= 160, table.tail()


def test_prune_report_hits_the_requested_ratio(pipeline: Pipeline) -> None:
    for ratio in RATIOS:
        report = json.loads((pipeline.proj / "metrics" / "prune" / f"{ARCH}-{ratio}.json").read_text())
        assert abs(report["true_ratio"] - ratio) <= 0.01, report
        assert report["params_after"] < report["params_before"]


def test_plot_data_written(pipeline: Pipeline) -> None:
    for name in ("tradeoff", "gamma_hist", "curves", "sensitivity"):
        csv = pipeline.proj / "metrics" / "plots" / f"{name}.csv"
        assert csv.is_file(), pipeline.repro.tail()
        assert len(csv.read_text().splitlines()) > 1, f"{csv} has no rows"


def test_finetuned_checkpoint_round_trips(pipeline: Pipeline) -> None:
    """The test process (not the stage) rebuilds the fine-tuned model from its file alone."""
    import torch

    from slimcore.checkpoint import load_model
    from slimcore.flops import count_flops, count_params

    report = json.loads((pipeline.proj / "metrics" / "prune" / f"{ARCH}-0.2.json").read_text())
    profile = json.loads((pipeline.proj / "metrics" / "profile.json").read_text())[ARCH]
    model = load_model(pipeline.proj / "models" / ARCH / "finetuned-0.2.pt", expected_arch=ARCH)
    assert count_params(model) == report["params_after"] == profile["finetuned-0.2"]["params"]
    assert count_flops(model, 8) == profile["finetuned-0.2"]["flops"]
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 8, 8))
    assert out.shape[0] == 2 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# a second `dvc repro`, then an experiment on the prune ratios
# --------------------------------------------------------------------------------------------


def test_second_repro_does_nothing(rerun: tuple[Result, Result]) -> None:
    repro, status = rerun
    assert repro.returncode == 0, repro.tail()
    assert "Running stage" not in repro.output, repro.tail()
    assert "Data and pipelines are up to date" in repro.output, repro.tail()
    assert status.returncode == 0, status.tail()
    assert "Data and pipelines are up to date" in status.output, status.tail()


def test_checkpoints_stay_out_of_git(experiment: Experiment) -> None:
    """After `git add -A`, DVC's .gitignore files keep every checkpoint out of git."""
    assert experiment.tracked_models, "DVC wrote no models/**/.gitignore"
    assert all(Path(f).name == ".gitignore" for f in experiment.tracked_models), experiment.tracked_models


def test_exp_run_reruns_only_what_the_targets_reach(experiment: Experiment) -> None:
    """A new prune target gets its own sparse model (penalty.target auto sizes it for that target),
    its sensitivity curve, prune and fine-tuning; the baseline is untouched."""
    out = experiment.run.output
    for stage in (f"sparse-train@{ARCH}-{EXP_TARGET}", f"sensitivity@{ARCH}-{EXP_TARGET}", f"prune@{ARCH}-{EXP_TARGET}",
                  f"finetune@{ARCH}-{EXP_TARGET}", "profile", "evaluate"):
        assert f"Running stage '{stage}'" in out, experiment.run.tail()
    assert f"Running stage 'baseline-train@{ARCH}'" not in out, experiment.run.tail()
    assert re.search(rf"Stage '{re.escape(f'baseline-train@{ARCH}')}' didn't change", out), experiment.run.tail()


def test_exp_run_warns_only_of_the_new_ratios_outputs(experiment: Experiment) -> None:
    """DVC (dvc-data) warns "No file hash info found ... It won't be created" once for each cached
    output of a stage that has never run (here: the new ratio's), when `exp run` checks out the
    workspace before reproducing; nothing else may warn (no stale output, no old ratio)."""
    warnings = [line for line in experiment.run.output.splitlines() if "WARNING" in line]
    expected = {f"models/{ARCH}/{name}-{EXP_TARGET}{suffix}.pt"
                for name, suffix in (("sparse", ""), ("pruned", ""), ("pruned", "-nofold"), ("finetuned", ""))}
    named = {w.split("'")[1].split("/proj/")[-1] for w in warnings if "No file hash info found" in w}
    assert len(warnings) == len(named) and named <= expected, experiment.run.tail()


def test_exp_leaves_no_stale_output_of_the_old_ratios(experiment: Experiment, pipeline: Pipeline) -> None:
    from slimcore_pipeline import paths

    proj = pipeline.proj
    stale = [p.as_posix() for r in RATIOS for p in paths.target_outputs(ARCH, r) if (proj / p).exists()]
    assert not stale, f"outputs of dropped ratios left in the workspace: {stale}"
    fresh = [p.as_posix() for p in paths.target_outputs(ARCH, EXP_TARGET) if not (proj / p).exists()]
    assert not fresh, f"missing outputs of the new ratio: {fresh}"
    listed = ok(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"], proj).output.split("\n")
    refs = [line.split()[0] for line in listed if line and "/exec/" not in line]  # exec/: DVC's own bookkeeping
    assert len(refs) == 1, listed
    committed = set(ok(["git", "ls-tree", "-r", "--name-only", refs[0]], proj).output.split())
    old = {p.as_posix() for r in RATIOS for p in paths.target_outputs(ARCH, r)}
    assert not {f for f in committed if any(f == o or f.startswith(o + "/") for o in old)}, "stale files in the exp"


def test_metrics_diff_shows_accuracy_and_no_timing(experiment: Experiment) -> None:
    diff = experiment.metrics_diff
    assert diff.returncode == 0, diff.tail()
    assert f"metrics/summary/{ARCH}.json" in diff.output, diff.tail()
    # the experiment's one target replaces two: its slot's MACs change, the second slot goes away
    assert "r1.macs_kept" in diff.output and "r2.top1" in diff.output, diff.tail()
    for noise in ("seconds", "latency", "median_ms", "timings"):
        assert noise not in diff.output, diff.tail()


def test_exp_flops_target_lands_within_one_percent(experiment: Experiment, pipeline: Pipeline) -> None:
    report = json.loads((pipeline.proj / "metrics" / "prune" / f"{ARCH}-{EXP_TARGET}.json").read_text())
    assert report["target"] == EXP_TARGET and 0 < report["requested_ratio"] < 1
    assert report["exact"] or report["bound_by"], report
    if report["exact"]:
        assert abs(report["flops_fraction"] - 0.5) <= 0.005, report
    profile = json.loads((pipeline.proj / "metrics" / "profile.json").read_text())[ARCH]
    assert profile[f"pruned-{EXP_TARGET}"]["flops"] == report["flops_after"]
    assert profile[f"sparse-{EXP_TARGET}"]["flops"] == report["flops_before"]


def test_exp_results_in_workspace_and_metrics_diff(experiment: Experiment, pipeline: Pipeline) -> None:
    assert (pipeline.proj / "models" / ARCH / f"finetuned-{EXP_TARGET}.pt").is_file(), experiment.run.tail()
    evals = json.loads((pipeline.proj / "metrics" / "eval.json").read_text())
    assert f"finetuned-{EXP_TARGET}" in evals[ARCH]


def test_plots_show_renders_html(experiment: Experiment) -> None:
    show = experiment.plots_show
    assert show.returncode == 0, show.tail()
    assert (experiment.plots_dir / "index.html").is_file(), show.tail()
    html = (experiment.plots_dir / "index.html").read_text()  # the offline page (vendor/vega/): no CDN
    assert "cdn.jsdelivr" not in html and html.count("<script data-bundle=") == 3


# --------------------------------------------------------------------------------------------
# last (it changes the workspace): `dvc exp apply` of another targets experiment
# --------------------------------------------------------------------------------------------


def test_exp_apply_of_other_targets_leaves_status_clean(experiment: Experiment, pipeline: Pipeline) -> None:
    """The workspace holds the (uncommitted) flops0.5 experiment; applying one with other targets
    over it leaves flops0.5's plain outputs behind (git does not delete untracked files, DVC only
    its cached ones), which must not make any stage look changed."""
    proj = pipeline.proj
    ok([str(BIN / "dvc"), "exp", "run", "--temp", "-n", "only-0.5", "-S", "prune.targets=[0.5]"], proj)
    ok([str(BIN / "dvc"), "exp", "apply", "only-0.5"], proj)
    left = proj / "metrics" / "prune" / f"{ARCH}-{EXP_TARGET}.json"
    assert left.is_file(), "the residue this test is about did not occur (DVC changed?)"
    status = ok([str(BIN / "dvc"), "status"], proj)
    assert "Data and pipelines are up to date" in status.output, status.tail()
    summary = json.loads((proj / "metrics" / "summary" / f"{ARCH}.json").read_text())
    assert list(summary) == ["r1", "baseline"], summary
    compare = ok([sys.executable, "-m", "slimcore_pipeline.compare", "HEAD"], proj)  # main's [0.2, 0.5] vs [0.5]
    lines = compare.output.splitlines()
    assert max(map(len, lines)) <= 160 and len(lines) == 1 + len(RATIOS), compare.tail()
    assert lines[1].split()[:3] == [ARCH, "r1", "0.2"] and lines[1].split()[5] == "0.5", compare.tail()
    assert lines[2].split()[:3] == [ARCH, "r2", "0.5"] and lines[2].split()[5] == "-", compare.tail()
