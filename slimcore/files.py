"""Atomic file writes: readers see the old file or the new one, never half of one.

The temp file ``.NAME.PID.XXXXXXXX.tmp`` sits next to the target (same file system, so the
rename is atomic), gets the user's umask like ``open()`` would, is fsynced, renamed over the
target, and the folder is fsynced; on any error the temp file is removed and the target is
untouched.  A program that must refuse to write at some point (the pipeline, once a stop signal
arrived) passes ``check``, which runs before the temp file is made and again before the rename.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def file_mode() -> int:
    """0666 less the user's umask (0644 with the usual 022): what ``open()`` would create."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path | str, data: bytes, *, mode: int | None = None,
                       check: Callable[[], None] | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (creating its folder); returns the path.

    ``mode``: the file's permission bits (default: :func:`file_mode`); ``check``: called before
    the write and before the rename, an exception from it aborts the write leaving nothing.

    >>> atomic_write_bytes("out/hello.txt", b"hello\\n")  # doctest: +SKIP
    PosixPath('out/hello.txt')
    """
    path = Path(path)
    if check is not None:
        check()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), file_mode() if mode is None else mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


__all__ = ["atomic_write_bytes", "file_mode"]
