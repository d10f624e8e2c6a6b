"""One writer per set of outputs: an exclusive ``flock`` a stage holds for its whole run.

``.slimcore/locks/STAGE.lock`` (STAGE: the stage name, e.g. ``sparse-train@vgg16_bn-0.2``, which
names its outputs) holds the pid of its holder.  A second instance refuses at once; a holder
that dies (even by SIGKILL) releases the lock with its last file descriptor, so a re-run
after it takes the lock and resumes.  No torch here.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

from slimcore.errors import SlimcoreError
from slimcore_pipeline.process import alive

try:
    import fcntl
except ImportError:  # Windows: no flock; stages run unlocked there
    fcntl = None  # type: ignore[assignment]

LOCKS = Path(".slimcore") / "locks"  # under slimcore_pipeline.paths.STATE: not a DVC output, not in git
HELD_ENV = "SLIMCORE_STAGE_LOCK"  # set by the holder: torchrun workers it starts do not lock again
DEAD_HOLDER_WAIT_SECONDS = 5.0  # forked workers of a dead holder may hold its lock a moment longer


class OutputsLocked(SlimcoreError):
    """Another process holds the lock on these outputs."""

    def __init__(self, name: str, path: Path, pid: int | None) -> None:
        self.pid = pid
        if pid is None:
            who = "another process"
        else:
            command = _command(pid)
            who = f"pid {pid}" + (f" ({command})" if command else "")
            if not alive(pid):
                who += " (which has exited; its child processes are still stopping)"
        stop = f"or stop it (kill {pid}), " if pid is not None else ""
        super().__init__(f"another run is writing the same outputs: {path} is locked by {who}; "
                         f"wait for it to finish {stop}then run again")


def lock_path(name: str) -> Path:
    """``.slimcore/locks/NAME.lock`` (characters unsafe in a file name become ``_``)."""
    return LOCKS / (re.sub(r"[^A-Za-z0-9@._+=-]", "_", name) + ".lock")


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    parts = [p.decode(errors="replace") for p in raw.split(b"\0") if p]
    if parts and Path(parts[0]).name.startswith("python"):
        parts[0] = "python"
    return " ".join(parts)[:200]


def _holder(fd: int) -> int | None:
    for _ in range(20):  # the holder writes its pid right after locking: give it a moment
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


class OutputLock:
    """The exclusive lock of ``name``'s outputs (see the module doc)."""

    def __init__(self, name: str, path: Path | None = None) -> None:
        self.name = name
        self.path = path or lock_path(name)
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock or raise :class:`OutputsLocked` naming the holder's pid (never waits for a
        live holder)."""
        if fcntl is None:
            return self
        deadline = time.monotonic() + DEAD_HOLDER_WAIT_SECONDS
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder(fd)
                os.close(fd)
                if pid is not None and not alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise OutputsLocked(self.name, self.path, pid) from None
            try:  # the file may have been removed (and re-created) by a holder that just released it
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        # kept across exec: a stage that relaunches itself under torchrun keeps holding it
        os.set_inheritable(fd, True)
        self.fd = fd
        os.environ[HELD_ENV] = str(self.path)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # before unlocking: a waiter re-checks the inode (see acquire)
        os.close(self.fd)
        self.fd = None
        os.environ.pop(HELD_ENV, None)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def held_by_launcher() -> bool:
    """A torchrun worker whose launcher (or rank 0) holds the lock: it must not take it again."""
    if "LOCAL_RANK" not in os.environ:
        return False
    return bool(os.environ.get(HELD_ENV)) or os.environ.get("RANK", "0") != "0"


__all__ = ["HELD_ENV", "LOCKS", "OutputLock", "OutputsLocked", "held_by_launcher", "lock_path"]
