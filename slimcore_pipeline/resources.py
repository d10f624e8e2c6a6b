"""Resource and permission checks a stage does before the expensive work, so it fails in a second, not an hour in.

Each raises a :class:`~slimcore.errors.SlimcoreError` whose one line names the key, path or
value and what to do, so a stage exits 2 having written nothing: memory for a tensor of known
size, free disk for a file of estimated size, a writable output folder, a batch that fits the
training set.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from slimcore.errors import DataError, ParamsError, SlimcoreError

if TYPE_CHECKING:
    from torch import nn

MEMORY_HEADROOM = 0.8  # a tensor may take at most this share of the available memory
DISK_MARGIN = 1.1  # and a file this much more free space than its estimated size (+ 16 MiB)


class ResourceError(SlimcoreError):
    """Not enough memory or disk for what was asked, or an output folder that cannot be written."""


def human(n: float) -> str:
    """Bytes as a short human figure: ``7.5 GB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: int, what: str, fix: str, available: int | None = None) -> None:
    """Refuse to allocate ``need`` bytes for ``what`` when they exceed the available memory's headroom."""
    available = available_memory() if available is None else available
    if available is not None and need > MEMORY_HEADROOM * available:
        raise ResourceError(f"{what} needs {human(need)} of memory, {human(available)} available: {fix}")


def check_disk(folder: Path | str, need: int, what: str) -> None:
    """Refuse to write a file of about ``need`` bytes into ``folder`` without the free space for it."""
    folder = Path(folder)
    free = shutil.disk_usage(_existing(folder)).free
    if free < need * DISK_MARGIN + 16 * 2**20:
        raise ResourceError(f"{folder}: {human(free)} free, {what} needs about {human(need)}: "
                            "free disk space (or move the project) and run again")


def _existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(*folders: Path | str) -> None:
    """New files can be made in each folder (or, where it is missing, in the nearest folder above
    it, where it will be created): checked at stage start, leaving nothing behind."""
    for folder in map(Path, folders):
        probe = _existing(folder)
        try:
            if not probe.is_dir():
                raise NotADirectoryError(20, "not a directory", str(probe))
            fd, tmp = tempfile.mkstemp(prefix=".slimcore-write-check.", suffix=".tmp", dir=probe)
            os.close(fd)
            os.unlink(tmp)
        except OSError as err:
            where = f"{folder}: cannot write there" if probe == folder else \
                f"{folder}: cannot create it in {probe}"
            raise ResourceError(f"{where} ({os_reason(err)}): make {probe} a writable folder (chmod u+w, or "
                                "remount read-write) and run again") from None


def os_reason(err: OSError) -> str:
    """``[Errno 28] No space left on device: '...'`` as ``no space left on device``."""
    return (err.strerror or errno.errorcode.get(err.errno or 0, str(err))).lower()


def write_error(path: Path | str, err: OSError, atomic: bool = True) -> ResourceError | None:
    """The one-line error of a failed write of ``path`` that a user can fix, else None.

    ``atomic``: the write was :func:`slimcore_pipeline.process.atomic_write_bytes`'s (it left nothing).
    """
    nothing = "; nothing was written" if atomic else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceError(f"{path}: {os_reason(err)}{f' ({nothing[2:]})' if atomic else ''}: free disk space "
                             "and run again")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ResourceError(f"{path}: cannot write there ({os_reason(err)}{nothing}): make the folder writable "
                             "and run again")
    return None


def check_batch_size(key: str, batch_size: int, world_size: int, train_size: int) -> None:
    """A training batch must fit the training set (the last partial batch is dropped)."""
    if batch_size * world_size > train_size:
        per = f" x {world_size} processes" if world_size > 1 else ""
        raise ParamsError(f"{key}: {batch_size}{per} is larger than the training set ({train_size} images), "
                          "so no step would run: lower it")


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (about a checkpoint's size)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


__all__ = ["DataError", "ResourceError", "available_memory", "check_batch_size", "check_disk", "check_memory",
           "check_writable", "human", "os_reason", "tensor_bytes", "write_error"]
