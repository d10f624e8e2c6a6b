"""Process safety of a stage: stop signals, parent death, and the temp files of atomic writes.

No torch here: ``stages/__init__.py`` calls :func:`enter_stage_process` before anything heavy is
imported, so that

* SIGINT/SIGTERM are **blocked** while the interpreter imports torch (a KeyboardInterrupt raised
  inside a half-run import has aborted the process from C++, left half-imported-module
  tracebacks, or been swallowed so the run went on); :func:`start_up_done` unblocks them at a
  safe point, where a signal that arrived meanwhile is delivered at once;
* the stage dies with the process that started it (``prctl(PR_SET_PDEATHSIG, SIGTERM)`` on Linux,
  and a thread that watches the parent pid, and the grandparent when the parent is a shell):
  a ``kill -9`` of ``dvc repro`` no longer leaves an orphaned trainer writing beside the next one.

Atomic writers (:func:`atomic_write_bytes`) write ``.NAME.PID.XXXXXXXX.tmp`` next to the target,
with the user's umask (0644 typically, not mkstemp's 0600), and refuse to write once a stop was
requested; :func:`remove_stale_temp_files` deletes the temp files of writers that died.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
WATCH_SECONDS = 0.5  # how often the fallback thread checks that the parent still lives
KILL_GRACE_SECONDS = 20.0  # after SIGTERM to itself as an orphan, SIGKILL if still alive
_SHELLS = {"sh", "bash", "dash", "zsh", "fish", "ksh", "mksh", "busybox"}
_PR_SET_PDEATHSIG = 1

_stop_signal: int | None = None  # the first SIGINT/SIGTERM received
_raising = False  # whether the handler raises KeyboardInterrupt (the stage's body) or only remembers
_blocked_at_start = False
_stage_process = False


# ---------------------------------------------------------------------------------------- signals


_MASKS = hasattr(signal, "pthread_sigmask")  # POSIX; elsewhere stops are only handled, never held


def block_stop_signals() -> None:
    """Hold SIGINT/SIGTERM pending (they are delivered when unblocked)."""
    if _MASKS:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def unblock_stop_signals() -> None:
    if _MASKS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def pending_stop_signal() -> int | None:
    """A SIGINT/SIGTERM received while blocked and not yet delivered, if any."""
    if not _MASKS:
        return None
    pending = signal.sigpending()
    return next((int(s) for s in STOP_SIGNALS if s in pending), None)


def stop_requested() -> int | None:
    """The stop signal this process received (delivered or still pending), else None."""
    return _stop_signal or pending_stop_signal()


def _on_stop(signum: int, frame: Any) -> None:
    global _stop_signal
    if _stop_signal is None:
        _stop_signal = signum
    if _raising:
        raise KeyboardInterrupt


def install_stop_handlers() -> dict[int, Any]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (and are remembered); returns the old handlers."""
    global _raising, _stop_signal
    _raising, _stop_signal = True, None
    return {int(s): signal.signal(s, _on_stop) for s in STOP_SIGNALS}


def hold_stops() -> None:
    """From now on a SIGINT/SIGTERM is only remembered (:func:`stop_requested`), never raised:
    a stage's exit path runs to its end.  (Blocking is not enough: threads started after
    :func:`start_up_done` may take the signal, and Python runs the handler in the main thread.)"""
    global _raising
    _raising = False
    block_stop_signals()


def ignore_stop_signals() -> None:
    """The last step of a stage process: SIGINT/SIGTERM ignored while the interpreter shuts down."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def restore_handlers(old: dict[int, Any]) -> None:
    """Back to ``old`` handlers, except in a stage process: there stops stay remembered to the end
    (a default SIGTERM action taken by another thread would kill it without a word)."""
    global _stop_signal
    if _stage_process:
        return
    _stop_signal = None
    for signum, handler in old.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    unblock_stop_signals()


def check_not_stopped() -> None:
    """Raise KeyboardInterrupt when a stop was requested: nothing is written after one, even when
    the KeyboardInterrupt it raised was swallowed somewhere (a ``__del__``, a callback)."""
    if _stop_signal is not None:
        raise KeyboardInterrupt


def is_stage_process() -> bool:
    """True in ``python [opts] -m stages.X`` (stages/__init__.py runs while runpy locates X)."""
    argv = getattr(sys, "orig_argv", [])
    if sys.argv[:1] != ["-m"] or "-m" not in argv[1:]:
        return False
    i = argv.index("-m", 1)
    return i + 1 < len(argv) and argv[i + 1].startswith("stages.")


def enter_stage_process() -> None:
    """First thing a stage process does: block stop signals and tie its life to its parent's."""
    global _blocked_at_start, _stage_process
    if not is_stage_process():
        return
    block_stop_signals()
    _blocked_at_start = _stage_process = True
    die_with_parent()


def start_up_done() -> None:
    """The safe point: import torch while signals are still blocked, then deliver them.

    Called once params are valid (a bad params file fails fast without torch); a SIGINT/SIGTERM
    that arrived during start-up is raised here as KeyboardInterrupt, inside the stage's handler.
    """
    global _blocked_at_start
    if not _blocked_at_start:
        return
    _blocked_at_start = False
    if pending_stop_signal() is None:  # (stopped already: no need to load torch just to exit)
        import torch  # noqa: F401  C++ extensions: never interrupted half-loaded
        import torchvision  # noqa: F401
    unblock_stop_signals()


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    if not _MASKS:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---------------------------------------------------------------------------------------- parent death


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _set_pdeathsig(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent() -> None:
    """SIGTERM when the parent dies (prctl), with a watcher thread as fallback (other systems, a
    parent shell that did not exec the command: then the grandparent is watched too)."""
    parent = os.getppid()
    if parent <= 1:
        return  # started by init (a container's entry point, a daemon): nothing to outlive
    _set_pdeathsig(signal.SIGTERM)
    grandparent = _parent_of(parent) if _comm(parent) in _SHELLS else None
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=_watch_parent, args=(parent, grandparent), name="slimcore-parent-watch",
                     daemon=True).start()


def _orphaned(parent: int, grandparent: int | None) -> bool:
    if os.getppid() != parent:
        return True
    return grandparent is not None and _parent_of(parent) not in (grandparent, None)


def _watch_parent(parent: int, grandparent: int | None) -> None:
    while not _orphaned(parent, grandparent):
        time.sleep(WATCH_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)  # a clean stop: exit 130, the resume state kept
    time.sleep(KILL_GRACE_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------- files

# ``.NAME.PID.XXXXXXXX.tmp`` (PID: the writer); ``.NAME.XXXXXXXX.tmp`` from older versions
TEMP_RE = re.compile(r"\.(?P<name>.+?)(?:\.(?P<pid>\d+))?\.[A-Za-z0-9_]{8}\.tmp")
TEMP_GLOB = ".*.tmp"  # the pattern .dvcignore and .gitignore hold


def file_mode() -> int:
    """:func:`slimcore.files.file_mode` with the stop signals held: its umask probe sets the
    process umask for an instant, which a stop handler writing a file must not see."""
    from slimcore import files

    with stop_signals_blocked():
        return files.file_mode()


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_temp(path: Path) -> bool:
    """A temp file of an atomic write whose writer is gone (or from a version without pids)."""
    match = TEMP_RE.fullmatch(path.name)
    if match is None:
        return False
    return match["pid"] is None or not alive(int(match["pid"]))


def remove_stale_temp_files(roots: Iterable[Path | str]) -> list[Path]:
    """Delete the temp files killed writers left under ``roots``; returns them."""
    removed = []
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for path in root.rglob(TEMP_GLOB):
            if path.is_file() and is_stale_temp(path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return sorted(removed)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half of one,
    and nothing once a stop was requested (:func:`slimcore.files.atomic_write_bytes` with that check).

    The file gets the user's umask (like ``open()``); its temp file ``.NAME.PID.XXXXXXXX.tmp``
    is removed on any error and, if the process is killed, by the next stage that starts.
    """
    from slimcore.files import atomic_write_bytes as write

    try:  # check_not_stopped runs before anything is written and again before the rename
        write(path, data, mode=file_mode(), check=check_not_stopped)
    except OSError as err:  # disk full, read-only folder: one line naming the file and what to do
        from slimcore_pipeline.resources import write_error

        clear = write_error(path, err)
        if clear is None:
            raise
        raise clear from None


def torch_save(obj: Any, path: Path | str) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    from slimcore.checkpoint import torch_bytes

    atomic_write_bytes(path, torch_bytes(obj))


def save_model(path: Path | str, model: Any, spec: Any = None, **meta: Any) -> Path:
    """:func:`slimcore.checkpoint.save_model` through :func:`atomic_write_bytes`."""
    from slimcore.checkpoint import model_bytes

    atomic_write_bytes(path, model_bytes(model, spec, **meta))
    return Path(path)


__all__ = ["STOP_SIGNALS", "TEMP_GLOB", "alive", "atomic_write_bytes", "block_stop_signals", "check_not_stopped",
           "die_with_parent", "enter_stage_process", "file_mode", "hold_stops", "ignore_stop_signals",
           "install_stop_handlers", "is_stage_process", "is_stale_temp", "pending_stop_signal",
           "remove_stale_temp_files", "restore_handlers", "save_model", "start_up_done", "stop_requested", "torch_save",
           "unblock_stop_signals"]
