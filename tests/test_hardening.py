"""Process safety, so that a run never leaves a half-written or mixed-up output: stages die
with ``dvc repro``, one writer per outputs, clean stops during start-up, temp files that never
become inputs, files with the user's umask.

Stages run as users run them (``python -m stages.X``, or under ``dvc repro``), as subprocesses,
on the tiny vgg16_bn config of tests/test_faults.py.  About a minute on 2 loaded cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_e2e_dvc import BIN, _copy_project, init_repo, skip_without_dvc_checkout
from tests.test_e2e_dvc import _env as _dvc_env

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vgg16_bn"
STAGE = f"baseline-train@{ARCH}"
CKPT = Path("models") / ARCH / "baseline.pt"
STATE = Path(".slimcore") / "resume" / ARCH / "baseline-train.pt"
LOCK = Path(".slimcore") / "locks" / f"{STAGE}.lock"
BAD_SIGNS = ("Traceback", "terminate called", "error_already_set", "Aborted", "core dumped", "Exception ignored")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("SLIMCORE_STAGE_LOCK", None)
    return env


def _umask_022() -> None:
    os.umask(0o022)


def _tiny_params(epochs: int = 4) -> dict[str, Any]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["archs"] = [ARCH]
    params["data"]["image_size"] = 8
    params["model"]["width"] = 0.0625
    params["train"].update(epochs=epochs, warmup_epochs=1, milestones=[epochs - 1], batch_size=32)
    params["runtime"].update(device="cpu", threads=1, nproc=1)
    return params


def _project(path: Path, epochs: int = 4) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.yaml").write_text(yaml.safe_dump(_tiny_params(epochs), sort_keys=False))
    return path


def _start(project: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "stages.baseline_train", "--arch", ARCH, *args], cwd=project,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_umask_022)


def _files(project: Path) -> set[str]:
    return {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()}


def _wait_for(condition: Any, what: str, timeout: float = 240, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended before {what}:\n{proc.communicate()[0][-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _clean(text: str) -> None:
    bad = [sign for sign in BAD_SIGNS if sign in text]
    assert not bad, f"{bad} in:\n{text[-4000:]}"


# --------------------------------------------------------------------------------------------
# 2. SIGTERM during start-up: exit 130, the resume hint, no traceback or abort, nothing written
# --------------------------------------------------------------------------------------------

DELAYS = (0.25, 0.6, 1.0, 1.6, 2.3, 3.0)  # seconds after launch: interpreter, typer, params, torch imports


def test_sigterm_during_start_up_exits_130_cleanly_and_writes_nothing(tmp_path: Path) -> None:
    # all at once (each in its own project): the loaded machine only stretches the start-up window
    projects = [_project(tmp_path / f"at-{delay}s") for delay in DELAYS]
    started = time.monotonic()
    procs = [_start(project) for project in projects]
    for delay, proc in zip(DELAYS, procs):
        time.sleep(max(0.0, started + delay - time.monotonic()))
        proc.send_signal(signal.SIGTERM)
    for delay, proc, project in zip(DELAYS, procs, projects):
        out = proc.communicate(timeout=240)[0]
        assert proc.returncode == 130, f"SIGTERM at {delay}s: exit {proc.returncode}\n{out[-3000:]}"
        assert f"{STAGE}: interrupted" in out and "to resume" in out, out
        _clean(out)
        assert _files(project) == {"params.yaml"}, f"SIGTERM at {delay}s wrote {_files(project)}"


# the moment an import finishes (python -X importtime prints it): the start-up window, whatever the load
IMPORTED = ("slimcore_pipeline.config", "torch._C", "torchvision.ops")  # params read; mid-torch; mid-torchvision


def _signal_after_import(proc: subprocess.Popen[str], module: str, said: list[str]) -> None:
    """Read the stage's stderr; SIGTERM it as soon as ``module`` is imported."""
    assert proc.stderr is not None
    signalled = False
    for line in proc.stderr:
        if line.startswith("import time:"):
            if not signalled and line.rsplit("|", 1)[-1].strip() == module:
                proc.send_signal(signal.SIGTERM)
                signalled = True
        else:
            said.append(line)
    if not signalled:
        said.append(f"(test) {module} was never imported\n")


@pytest.mark.slow
def test_sigterm_as_each_heavy_import_finishes_exits_130_cleanly(tmp_path: Path) -> None:
    import threading

    runs = []
    for module in IMPORTED:  # all at once, each read by its own thread (pipes never fill)
        project = _project(tmp_path / module)
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "stages.baseline_train", "--arch", ARCH],
                                cwd=project, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        said: list[str] = []
        reader = threading.Thread(target=_signal_after_import, args=(proc, module, said), daemon=True)
        reader.start()
        runs.append((module, project, proc, reader, said))
    for module, project, proc, reader, lines in runs:
        proc.wait(timeout=240)
        reader.join(timeout=30)
        said = "".join(lines)
        assert proc.returncode == 130, f"SIGTERM after importing {module}: exit {proc.returncode}\n{said[-3000:]}"
        assert f"{STAGE}: interrupted" in said, said
        _clean(said)
        assert _files(project) == {"params.yaml"}, f"SIGTERM after importing {module} wrote {_files(project)}"


# --------------------------------------------------------------------------------------------
# 1. one writer per outputs: a second instance refuses at once; after the holder dies, a re-run resumes
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_instance_refuses_naming_the_holder_and_a_rerun_after_it_died_resumes(tmp_path: Path) -> None:
    project = _project(tmp_path / "proj")
    first = _start(project)
    try:
        _wait_for(lambda: (project / LOCK).is_file() and (project / LOCK).read_text().strip() == str(first.pid),
                  "the first run's lock", proc=first)
        second = subprocess.run([sys.executable, "-m", "stages.baseline_train", "--arch", ARCH], cwd=project,
                                env=_env(), capture_output=True, text=True, timeout=120)
        said = second.stdout + second.stderr
        assert second.returncode == 2, said
        assert "another run is writing the same outputs" in said and f"pid {first.pid}" in said, said
        assert f"kill {first.pid}" in said and "stages.baseline_train" in said, said
        _clean(said)
        _wait_for(lambda: (project / STATE).is_file(), "the first run's first epoch", proc=first)
        first.send_signal(signal.SIGKILL)  # dies holding the lock: its file stays, the flock goes
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert not (project / CKPT).exists(), "the first run finished before it was killed"
    assert (project / LOCK).read_text().strip() == str(first.pid)
    rerun = _start(project)
    out = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, out[-3000:]
    assert "resuming after epoch" in out, out
    _clean(out)
    assert not (project / LOCK).exists(), "the lock file is removed by a run that ends normally"
    # 7. written with the user's umask (022 here), like DVC's checked-out copies
    assert (project / CKPT).stat().st_mode & 0o777 == 0o644
    for path in (project / "metrics").rglob("*.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_the_lock_in_process(tmp_path: Path) -> None:
    from slimcore_pipeline.locks import OutputLock, OutputsLocked

    path = tmp_path / "locks" / "x.lock"
    with OutputLock("x", path):
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(OutputsLocked, match=f"locked by pid {os.getpid()}"):
            OutputLock("x", path).acquire()
    assert not path.exists()
    path.write_text("999999999\n")  # left by a holder killed with SIGKILL: not locked any more
    with OutputLock("x", path):
        assert path.read_text().strip() == str(os.getpid())


# --------------------------------------------------------------------------------------------
# under `dvc repro`: 1. kill -9 of dvc takes the stage with it; the re-run resumes. 3. temp files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    skip_without_dvc_checkout()
    proj = tmp_path_factory.mktemp("hardening") / "proj"
    proj.mkdir()
    _copy_project(proj)
    (proj / "params.yaml").write_text(yaml.safe_dump(_tiny_params(epochs=8), sort_keys=False))
    init_repo(proj, "slimcore hardening: tiny params")
    yield proj


def _dvc(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=_dvc_env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_umask_022)


@pytest.mark.slow
def test_kill_9_of_dvc_repro_takes_the_stage_with_it_and_a_rerun_resumes(dvc_project: Path) -> None:
    import psutil

    proj = dvc_project
    log = (proj.parent / "first-repro.log").open("w")
    repro = subprocess.Popen([str(BIN / "dvc"), "repro", STAGE], cwd=proj, env=_dvc_env(), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    stages: list[int] = []
    try:
        _wait_for(lambda: (proj / STATE).is_file(), "the first epoch under dvc repro")
        stages = [p.pid for p in psutil.Process(repro.pid).children(recursive=True)
                  if "stages.baseline_train" in " ".join(p.cmdline())]
        assert stages, "no stage process under dvc repro"
        os.kill(repro.pid, signal.SIGKILL)
        repro.wait(timeout=30)
        _wait_for(lambda: all(_gone(pid) for pid in stages), "the orphaned stage to stop", timeout=60)
    finally:
        for pid in [repro.pid, *stages]:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()
    first = (proj.parent / "first-repro.log").read_text()
    assert not (proj / CKPT).exists(), f"the stage finished before dvc was killed:\n{first[-3000:]}"
    assert f"{STAGE}: interrupted" in first, first[-3000:]
    rerun = _dvc("repro", STAGE, cwd=proj)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-4000:]
    assert "resuming after epoch" in out, out[-4000:]
    assert (proj / CKPT).stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_temp_files_of_killed_writers_are_ignored_by_dvc_and_removed_by_the_next_stage(dvc_project: Path) -> None:
    from slimcore_pipeline.process import TEMP_RE

    proj = dvc_project
    # a writer killed in the middle of an atomic write (after its temp file was written in full)
    kill_mid_write = ("import os, signal\nfrom slimcore_pipeline.process import atomic_write_bytes\n"
                      "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
                      f"atomic_write_bytes('models/{ARCH}/pruned-0.4.pt', b'x' * 100000)\n")
    killed = subprocess.run([sys.executable, "-c", kill_mid_write], cwd=proj, env=_env(), timeout=60)
    assert killed.returncode == -signal.SIGKILL
    (left,) = (proj / "models" / ARCH).glob(".pruned-0.4.pt.*.tmp")
    assert TEMP_RE.fullmatch(left.name) and left.stat().st_size == 100000
    older = proj / "models" / ARCH / ".finetuned-0.4.pt.k3j2h1g0.tmp"  # the name before the writer's pid
    older.write_bytes(b"y" * 1000)
    live = proj / "metrics" / f".eval.json.{os.getpid()}.abcd_123.tmp"  # a writer still running (this one)
    live.write_bytes(b"{}")
    temps = [p.relative_to(proj).as_posix() for p in (left, older, live)]

    ignored = _dvc("check-ignore", *temps, cwd=proj, timeout=120)
    assert ignored.returncode == 0 and all(t in ignored.stdout for t in temps), ignored.stdout + ignored.stderr
    kept = _dvc("check-ignore", CKPT.as_posix(), "models", cwd=proj, timeout=120)
    assert kept.returncode == 1, kept.stdout + kept.stderr  # the real outputs are still hashed
    git = subprocess.run(["git", "check-ignore", *temps], cwd=proj, capture_output=True, text=True)
    assert git.returncode == 0, git.stdout + git.stderr

    # any stage removes the temp files of dead writers as it starts (here one that then fails fast)
    stage = subprocess.run([sys.executable, "-m", "stages.baseline_train", "--arch", "resnet50"], cwd=proj,
                           env=_env(), capture_output=True, text=True, timeout=120)
    said = stage.stdout + stage.stderr
    assert stage.returncode == 2 and "resnet50" in said, said
    assert not left.exists() and not older.exists(), said
    assert live.exists(), "a temp file of a live writer must stay"
    assert "a temp file left by a killed run" in said, said
    live.unlink()


# --------------------------------------------------------------------------------------------
# 7. file modes: 0666 less the umask, from every atomic writer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_users_umask(tmp_path: Path, umask: int, mode: int) -> None:
    from slimcore.checkpoint import atomic_torch_save, save_model
    from slimcore.models import build_model
    from slimcore_pipeline.process import atomic_write_bytes
    from stages._common import write_json

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "metrics" / "results.md", b"# results\n")
        write_json(tmp_path / "metrics" / "eval.json", {"top1": 1.0})
        atomic_torch_save({"x": 1}, tmp_path / ".slimcore" / "state.pt")
        save_model(tmp_path / "models" / "m.pt", build_model(ARCH, 10, "cifar", 0.0625))
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 4 and not [p for p in written if p.name.endswith(".tmp")]
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == {p.name: mode for p in written}


def test_stop_signals_are_held_only_in_stage_processes() -> None:
    """Importing ``stages`` (as these tests do) leaves this process's signals alone."""
    import stages  # noqa: F401
    from slimcore_pipeline.process import STOP_SIGNALS, is_stage_process

    assert not is_stage_process()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert not set(STOP_SIGNALS) & blocked
