"""Where a ``dvc repro`` is: "stage N/M", time elapsed and an estimate of what is left.

DVC runs each stage as its own process and says nothing of the pipeline's progress, so every
stage works it out, cheaply (a few milliseconds; it never fails a stage):

* **M**: the stages of ``dvc.yaml``, ``foreach``/``matrix`` expanded from ``params.yaml`` the
  way DVC names them (``finetune@vgg16_bn-0.2``): :func:`pipeline_stages`.
* **N**: the stages this ``dvc repro`` (or ``dvc exp run``) has started, this one included. The
  run is the nearest ancestor process running dvc (its pid and start time, from ``/proc``); each
  run keeps the names it started in ``.slimcore/progress/RUN.json``. Stages DVC skips (unchanged)
  start no process, so N counts the stages that ran, and the run may end before N reaches M.
* **left**: the last recorded duration (``.slimcore/progress/durations.json``, written at the end
  of every stage) of each stage of ``dvc.yaml`` this run has not started yet: an upper bound,
  since DVC skips the unchanged ones; a stage never timed counts as the median of the timed ones.

Outside DVC (a stage run by hand) the line names the stage and its last duration only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_DIR = Path(".slimcore") / "progress"
DURATIONS = "durations.json"


def _lookup(params: dict[str, Any], expr: Any) -> Any:
    """``${a.b}`` -> params["a"]["b"]; a list or a plain value as is."""
    if not isinstance(expr, str):
        return expr
    match = re.fullmatch(r"\$\{\s*([\w.\-]+)\s*\}", expr)
    if not match:
        return expr
    value: Any = params
    for key in match.group(1).split("."):
        value = value[key]
    return value


def _name(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def pipeline_stages(dvc_yaml: Path = Path("dvc.yaml"), params_yaml: Path = Path("params.yaml")) -> list[str]:
    """Every stage of ``dvc_yaml`` as DVC names it, ``foreach``/``matrix`` expanded with
    ``params_yaml`` (a foreach over a list: ``NAME@ITEM``; a matrix: ``NAME@V1-V2``)."""
    import yaml

    spec = yaml.safe_load(dvc_yaml.read_text()) or {}
    params = yaml.safe_load(params_yaml.read_text()) if params_yaml.is_file() else {}
    names: list[str] = []
    for stage, body in (spec.get("stages") or {}).items():
        if "foreach" in body:
            items = _lookup(params, body["foreach"])
            keys = items if isinstance(items, list) else list(items)
            names += [f"{stage}@{_name(k)}" for k in keys]
        elif "matrix" in body:
            axes = [_lookup(params, v) for v in body["matrix"].values()]
            combos: list[list[str]] = [[]]
            for axis in axes:
                combos = [[*c, _name(v)] for c in combos for v in axis]
            names += [f"{stage}@{'-'.join(c)}" for c in combos]
        else:
            names.append(stage)
    return names


def _proc(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, start time, command line) of a process, from /proc (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), fields[19], cmdline


def dvc_run_id() -> str | None:
    """``PID-STARTTIME`` of the nearest ancestor running ``dvc repro``/``dvc exp run``, or None."""
    pid = os.getppid()
    for _ in range(12):
        info = _proc(pid)
        if info is None or pid <= 1:
            return None
        parent, started, cmdline = info
        words = cmdline.split()
        is_dvc = any(Path(w).name == "dvc" for w in words[:3]) or "-m dvc" in cmdline
        if is_dvc and any(w in ("repro", "exp", "queue") for w in words):
            return f"{pid}-{started}"
        pid = parent
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict[str, Any]) -> None:
    from slimcore_pipeline.process import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def clock(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3700`` -> ``1h01m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def start_line(name: str, stages: list[str], started: list[str], elapsed: float | None,
               durations: dict[str, float]) -> str:
    """The line a stage prints as it starts (see the module docstring)."""
    if elapsed is None:
        last = durations.get(name)
        return f"stage {name} (not under dvc repro)" + (f"; last run took {clock(last)}" if last else "")
    total = len(stages)
    head = f"stage {len(started)}/{total} {name}" if name in stages else f"stage {len(started)} {name}"
    left = [s for s in stages if s not in started]
    known = [durations[s] for s in left if s in durations] or list(durations.values())
    if known or not left:
        guess = statistics.median(known) if known else 0.0
        bound = durations.get(name, guess) + sum(durations.get(s, guess) for s in left)
        estimate = (f"at most ~{clock(bound)} left (last durations of this and the {len(left)} stages not started; "
                    "unchanged ones are skipped)")
    else:
        estimate = "no estimate yet (no stage timed before)"
    return f"{head}: {clock(elapsed)} since the run's first stage, {estimate}"


@contextlib.contextmanager
def announce(name: str, log: Any) -> Iterator[None]:
    """Print the stage's start line with ``log`` (a console's ``log``), and record its duration
    when it ends without an error. Any failure of this bookkeeping is ignored."""
    begin = time.time()
    run_file = None
    try:
        durations = {k: float(v) for k, v in _read(STATE_DIR / DURATIONS).items()}
        run = dvc_run_id()
        stages, started, elapsed = [], [name], None
        if run is not None:
            run_file = STATE_DIR / f"run-{run}.json"
            state = _read(run_file) or {"first": begin, "started": []}
            state["started"] = [s for s in state.get("started", []) if s != name] + [name]
            _write(run_file, state)
            started, elapsed = state["started"], begin - float(state["first"])
            stages = pipeline_stages()
            for old in STATE_DIR.glob("run-*.json"):  # earlier runs' files: keep the folder small
                if old != run_file and begin - old.stat().st_mtime > 86400:
                    old.unlink(missing_ok=True)
        log(start_line(name, stages, started, elapsed, durations))
    except Exception:  # progress is a courtesy: it never fails a stage
        pass
    yield
    with contextlib.suppress(Exception):
        durations = _read(STATE_DIR / DURATIONS)
        durations[name] = round(time.time() - begin, 3)
        _write(STATE_DIR / DURATIONS, durations)
        log(f"stage {name}: done in {clock(time.time() - begin)}")


__all__ = ["announce", "clock", "dvc_run_id", "pipeline_stages", "start_line"]
