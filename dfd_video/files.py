"""Writing files so that nothing is lost silently: atomic writes, writability checks, and one-line errors."""
from __future__ import annotations

import errno
import os
import re
import shutil
import time
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Writes through a temporary name in the same folder, then renames: readers never see half a file. A failed
    write (full disk, file-size limit, permissions: whatever the writing library calls it) is an OSError whose
    message is one line naming `path`, not the temporary name."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not is_write_failure(e):
            raise
        raise OSError(write_error(path, e)) from None


def write_folder(path: str, write: Callable[[str], Any], overwrite: bool = False) -> str | None:
    """Fills a new folder `path` through a temporary sibling renamed into place, so a failed or interrupted write
    leaves nothing (and an earlier folder untouched). An existing non-empty `path` is moved aside first when
    `overwrite` (the caller refused it otherwise); returns where it went, or None."""
    path = os.path.abspath(path)
    tmp = fill_temp_folder(path, write)
    aside = None
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"{path}: not empty (it was when the write began); nothing was replaced")
        aside = move_aside(path)
    elif os.path.isdir(path):
        os.rmdir(path)
    os.replace(tmp, path)
    return aside


def fill_temp_folder(path: str, write: Callable[[str], Any], also: tuple[type, ...] = ()) -> str:
    """A fresh folder <path>.tmp<pid> beside `path`, filled by write(tmp); returns it for the caller to rename into
    place. On any failure it is removed again; a failed write (is_write_failure, or one of `also`) is an OSError whose
    one line names `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (is_write_failure(e) or isinstance(e, also)):
            raise
        raise OSError(write_error(path, e)) from None
    return tmp


def move_aside(path: str) -> str:
    """Renames `path` to <path>.old-<date>-<time> (with -1, -2, ... if taken); returns the new name."""
    base = os.path.abspath(path)
    aside = stamped = f"{base}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(1, 1000):
        if not os.path.lexists(aside):
            break
        aside = f"{stamped}-{i}"
    os.rename(base, aside)
    return aside


def check_new_folder(path: str, flag: str, overwrite: bool, keep_out: dict[str, str]) -> list[str]:
    """Why a command may not fill the folder `path` (one line each): a non-empty folder without --overwrite, a
    file, a folder inside (or holding) one of `keep_out` ({flag: folder} the command reads, e.g. --model-dir)."""
    bad = []
    real = os.path.realpath(path)
    inside = lambda a, b: a == b or a.startswith(b.rstrip(os.sep) + os.sep)
    for other_flag, other in keep_out.items():
        if other is None or not os.path.exists(other):
            continue
        theirs = os.path.realpath(other)
        if inside(real, theirs):
            bad.append(f"{flag} {path}: inside {other_flag} {other}; write the new folder outside it (nothing is "
                       f"ever written into {other_flag})")
        elif inside(theirs, real):
            bad.append(f"{flag} {path}: holds {other_flag} {other}; choose a {flag} outside it")
    if os.path.isfile(path):
        bad.append(f"{flag} {path}: a file, not a folder")
    elif os.path.isdir(path) and os.listdir(path) and not overwrite:
        bad.append(f"{flag} {path} is not empty ({first_names(sorted(os.listdir(path)))}): pass --overwrite to move "
                   f"it to {os.path.normpath(path)}.old-<date>-<time> first, or choose a new folder")
    elif overwrite and holds_working_dir(path):
        bad.append(cannot_move_working_dir(flag, path))
    return bad


def first_names(names: list[str]) -> str:
    """The first three names, and how many more."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def holds_working_dir(path: str) -> bool:
    """Whether the folder `path` is, or holds, this process's working directory (which --overwrite cannot move)."""
    real, cwd = os.path.realpath(path), os.getcwd()
    return cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep)


def cannot_move_working_dir(flag: str, path: str) -> str:
    return f"--overwrite: {flag} {path} holds the working directory, which cannot be moved aside"


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


REASONS = {errno.ENOSPC: "no space left on device",
           errno.EFBIG: "file too large (over this process's file-size limit, `ulimit -f`, or the file system's)",
           errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def io_errno(e: BaseException) -> int | None:
    """The errno of a failed read or write: an OSError's own, or the one a library puts in its message
    (safetensors: `I/O error: File too large (os error 27)`)."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    found = re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", str(e))
    return int(found[1] or found[2]) if found else None


def is_write_failure(e: BaseException) -> bool:
    """An error of the file system rather than of the data: an OSError, a library error carrying an errno, or
    torch.save's `unexpected pos` (its report of any failed write)."""
    return isinstance(e, OSError) or io_errno(e) is not None or "inline_container" in str(e)


def write_error(path: str, e: BaseException) -> str:
    """One line for a failed write of `path`: the reason and the free space on its disk. torch.save reports a full
    disk as `RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos` (torch_save keeps the errno
    where it can), so for an error without an errno a nearly full disk (under 1% or 1 GB free) is named as the
    reason."""
    disk = os.path.abspath(path)
    while not os.path.ismount(disk):
        disk = os.path.dirname(disk)
    usage = shutil.disk_usage(disk)
    lines = str(e).strip().splitlines()
    code = io_errno(e)
    reason = (REASONS.get(code) or (os.strerror(code) if code else None) or
              (e.strerror if isinstance(e, OSError) and e.strerror else lines[0][:200] if lines else type(e).__name__))
    full = usage.free < min(0.01 * usage.total, 2**30)
    if code is None and full and not isinstance(e, OSError):
        reason = "no space left on device"
    return f"could not write {path}: {reason}; {usage.free / 2**30:.1f} GB free on the disk mounted at {disk}"


def error_line(e: OSError) -> str:
    """One line for an OSError that reached the command line: the path and what went wrong (a write error with the
    free space on its disk)."""
    code, name = e.errno, e.filename
    if code is None or name is None:  # already a line (write_error's), or nothing better to say
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return write_error(name, e)
    return f"{name}: {REASONS.get(code, e.strerror or os.strerror(code))}"


class _KeepsWriteError:
    """A file wrapper that remembers the OSError of a failed write (torch.save replaces it by `unexpected pos`)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: Any, path: str) -> None:
    """torch.save to `path`; a failed write raises the file's own OSError (no space, file too large), not torch's
    `unexpected pos`."""
    import torch
    with open(path, "wb") as f:
        kept = _KeepsWriteError(f)
        try:
            torch.save(obj, kept)
        except RuntimeError:
            if kept.error is not None:
                raise OSError(kept.error.errno, kept.error.strerror, path) from None
            raise


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` (or the type alone) for an error inside a one-line report."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__


def read_error(path: str, e: BaseException) -> str:
    """Why a weights file could not be read, in words: a pickled object (never unpickled: it could run code), not a
    torch file, an empty or truncated file, or the library's first line."""
    text = str(e)
    pickled = re.search(r"GLOBAL (\S+)", text)
    if pickled:
        return (f"holds a pickled Python object ({pickled[1]}), which is never loaded here because unpickling can run "
                "any code; re-save the tensors alone (a dict of tensors, or .safetensors) from a copy you trust")
    if "Weights only load failed" in text or "invalid load key" in text or "mmap can only be used" in text:
        return "not a torch checkpoint: neither a torch.save zip file nor a legacy pickle of tensors"
    if isinstance(e, EOFError) or (os.path.isfile(path) and os.path.getsize(path) == 0):
        return "empty or truncated file"
    return first_line(e)


def read_text(path: str, what: str = "") -> str:
    """A UTF-8 text file; a ValueError naming the file, the line and the byte for anything else."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{what + ' ' if what else ''}{path}: line {line} is not UTF-8 text (byte "
                         f"0x{data[e.start]:02x}); save the file as UTF-8") from None


def fail(e: Exception) -> SystemExit:
    return SystemExit(f"error: {e}")
