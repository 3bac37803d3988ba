"""Writing files so that nothing is lost silently: atomic writes, and one-line errors."""
from __future__ import annotations

import os
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Writes through a temporary name in the same folder, then renames: readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def fail(e: Exception) -> SystemExit:
    return SystemExit(f"error: {e}")
