"""End to end: a teammate's ``git clone`` + ``make pull`` gives the trained workspace, no training.

In a scratch git repo of the project (tiny params, one arch, one ratio): ``dvc repro``, point the
project's default remote at a temp folder with ``dvc remote modify --local``, ``make push``, and
commit.  Then ``git clone`` it, point the clone at the same folder, ``make pull``: the clone must be
up to date (``dvc status``), ``dvc repro`` must run no stage, and every checkpoint under ``models/``
must equal the original byte for byte and load with ``slimcore.checkpoint.load_model``.
About a minute on 2 CPU cores.  Asserts on checkpoints and DVC's own output only, never on
metric file names.
"""

from __future__ import annotations

import filecmp
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_e2e_dvc import (
    ARCH,
    BIN,
    Result,
    _commit,
    _copy_project,
    _tiny_params,
    dvc,
    init_repo,
    ok,
    skip_without_dvc_checkout,
)

pytestmark = pytest.mark.slow

RATIO = 0.5  # one ratio is enough: a pull restores whatever dvc.lock names
UP_TO_DATE = "Data and pipelines are up to date"


@dataclass
class Clones:
    origin: Path  # where the pipeline ran and was pushed from
    clone: Path  # `git clone` of origin, filled by `make pull`
    remote: Path  # the temp folder both point at
    default_remote: Path  # where origin's committed default remote resolves (must stay untouched)
    remote_name: str
    push: Result
    pull: Result
    status: Result
    repro: Result
    git_status: Result


def _dvc_ok(*args: str, cwd: Path) -> Result:
    return ok([str(BIN / "dvc"), *args], cwd)


def _make(target: str, cwd: Path) -> Result:
    """``make TARGET`` with the venv running the tests as VENV; ``-o`` keeps make from (re)installing it."""
    venv = BIN.parent
    return ok(["make", "-o", f"{venv}/.installed", f"VENV={venv}", target], cwd)


def _resolve_remote(proj: Path, name: str) -> Path:
    """Where remote NAME's url in the committed ``.dvc/config`` points (DVC reads it relative to ``.dvc/``)."""
    url = _dvc_ok("config", "--project", f"remote.{name}.url", cwd=proj).output.strip()
    return (proj / ".dvc" / url).resolve()


def _checkpoints(proj: Path) -> list[Path]:
    return sorted(p.relative_to(proj) for p in (proj / "models").rglob("*.pt"))


@pytest.fixture(scope="module")
def clones(tmp_path_factory: pytest.TempPathFactory) -> Clones:
    skip_without_dvc_checkout()
    base = tmp_path_factory.mktemp("remote")
    origin, clone, remote = base / "origin", base / "clone", base / "remote"
    origin.mkdir()
    _copy_project(origin)
    _tiny_params(origin)
    params = yaml.safe_load((origin / "params.yaml").read_text())
    params["prune"]["targets"] = [RATIO]
    (origin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_repo(origin, "slimcore remote test: tiny params")
    _dvc_ok("repro", cwd=origin)

    name = _dvc_ok("remote", "default", cwd=origin).output.strip()
    default_remote = _resolve_remote(origin, name)
    _dvc_ok("remote", "modify", "--local", name, "url", str(remote), cwd=origin)
    push = _make("push", origin)
    _commit(origin, "slimcore remote test: dvc.lock and metrics after repro")

    ok(["git", "clone", "-q", str(origin), str(clone)], base)
    _dvc_ok("remote", "modify", "--local", name, "url", str(remote), cwd=clone)
    pull = _make("pull", clone)
    return Clones(origin, clone, remote, default_remote, name, push, pull,
                  dvc("status", cwd=clone), dvc("repro", cwd=clone), ok(["git", "status", "--porcelain"], clone))


def test_default_remote_lives_outside_the_repository(clones: Clones) -> None:
    """The committed default is a folder beside the clone: neither git nor DVC tracks it, and
    neither `dvc repro` nor a push to an overridden url writes to it."""
    assert not clones.default_remote.is_relative_to(clones.origin), clones.default_remote
    assert not clones.default_remote.exists(), f"something wrote to the default remote {clones.default_remote}"


def test_local_override_stays_out_of_git(clones: Clones) -> None:
    tracked = ok(["git", "ls-files", ".dvc"], clones.origin).output.split()
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked, tracked
    assert (clones.origin / ".dvc" / "config.local").is_file()


def test_push_fills_the_remote(clones: Clones) -> None:
    assert any(p.is_file() for p in clones.remote.rglob("*")), clones.push.tail()
    status = dvc("status", "--cloud", cwd=clones.origin)
    assert status.returncode == 0, status.tail()
    assert f"Cache and remote '{clones.remote_name}' are in sync" in status.output, status.tail()


def test_pull_restores_every_checkpoint_byte_for_byte(clones: Clones) -> None:
    expected = _checkpoints(clones.origin)
    assert Path("models", ARCH, "baseline.pt") in expected and Path("models", ARCH, f"finetuned-{RATIO}.pt") in expected
    assert _checkpoints(clones.clone) == expected, clones.pull.tail()
    differ = [str(p) for p in expected if not filecmp.cmp(clones.origin / p, clones.clone / p, shallow=False)]
    assert not differ, f"pulled checkpoints differ from the originals: {differ}"


def test_clone_is_up_to_date_and_repro_trains_nothing(clones: Clones) -> None:
    assert clones.status.returncode == 0, clones.status.tail()
    assert UP_TO_DATE in clones.status.output, clones.status.tail()
    assert clones.repro.returncode == 0, clones.repro.tail()
    assert "Running stage" not in clones.repro.output, clones.repro.tail()
    assert UP_TO_DATE in clones.repro.output, clones.repro.tail()
    assert clones.git_status.output == "", f"the clone's workspace differs from git:\n{clones.git_status.output}"


def test_pulled_checkpoints_load(clones: Clones) -> None:
    from torch import nn

    from slimcore.checkpoint import load_model

    for rel in _checkpoints(clones.clone):
        assert isinstance(load_model(clones.clone / rel, expected_arch=ARCH), nn.Module), rel
