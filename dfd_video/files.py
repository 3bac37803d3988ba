"""Writing files so that nothing is lost silently: atomic writes, writability checks, and one-line errors."""
from __future__ import annotations

import errno
import os
import shutil
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Writes through a temporary name in the same folder, then renames: readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def check_writable(path: str, flag: str) -> None:
    """ValueError (one line naming the path) unless `path` is, or can be created as, a folder this process may write
    into. Only reads the filesystem, so every rank can run it before any model loads."""
    p = os.path.abspath(path)
    while not os.path.lexists(p):  # the nearest existing ancestor is where the folders would be created
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ValueError(f"{flag} {path}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: no permission to write in {p}")


def write_error(path: str, e: Exception) -> str:
    """One line for a failed write of `path`: the reason and the free space on its disk. torch.save reports a full
    disk as `RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos`, so for an error without an
    errno a nearly full disk (under 1% or 1 GB free) is named as the reason."""
    disk = os.path.abspath(path)
    while not os.path.ismount(disk):
        disk = os.path.dirname(disk)
    usage = shutil.disk_usage(disk)
    lines = str(e).strip().splitlines()
    reason = e.strerror if isinstance(e, OSError) and e.strerror else lines[0][:200] if lines else type(e).__name__
    full = usage.free < min(0.01 * usage.total, 2**30)
    if getattr(e, "errno", None) == errno.ENOSPC or (full and not isinstance(e, OSError)):
        reason = "no space left on device"
    return f"could not write {path}: {reason}; {usage.free / 2**30:.1f} GB free on the disk mounted at {disk}"


def fail(e: Exception) -> SystemExit:
    return SystemExit(f"error: {e}")
