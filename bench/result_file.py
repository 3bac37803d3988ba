"""`--out FILE` of the bench scripts: what a bench prints, also written as a markdown result file (bench/results/).

The file is headed by the command line that reproduces it and the machine it ran on (timings depend on both; byte
counts do not). Markdown table rows are kept as they are, every other run of printed lines goes into a text block,
so the file reads as the terminal did. It is written atomically, and only when the bench finishes.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import shlex
import sys
from typing import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dfd_video.files import write_error, write_text  # noqa: E402


def add_out_flag(parser) -> None:
    parser.add_argument("--out", default=None, metavar="FILE", help="also write what is printed to FILE as markdown, "
                        "headed by the command and the machine (replaced atomically if it exists; e.g. bench/results/)")


def check_out(path: str | None) -> None:
    """Exits with one line before a long run whose result could not be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --out {path}: expected a file in an existing folder this process may write into")


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.text = stream, io.StringIO()

    def write(self, s: str) -> int:
        self.stream.write(s)
        return self.text.write(s)

    def flush(self) -> None:
        self.stream.flush()


def markdown(printed: str) -> str:
    """Table rows as they are; each run of other non-empty lines fenced as text."""
    out, text = [], []

    def close() -> None:
        if text:
            out.extend(["```text", *text, "```", ""])
            text.clear()
    for line in printed.splitlines():
        if line.startswith("|"):
            close()
            out.append(line)
        elif line.strip():
            if out and out[-1].startswith("|"):
                out.append("")
            text.append(line)
        else:
            close()
            if out and out[-1] != "":
                out.append("")
    close()
    return "\n".join(out).strip() + "\n"


def header(title: str) -> str:
    import torch
    try:
        import diffusers
        versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}"
    command = shlex.join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]])
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    return (f"# {title}\n\nWritten by `{command}` on {datetime.date.today().isoformat()} ({versions}; {machine}). "
            "Timings depend on the machine and its load; byte counts do not.\n\n")


@contextlib.contextmanager
def result_file(path: str | None, title: str) -> Iterator[None]:
    """Within the block, stdout is also collected; at its end (not on an error) it is written to `path`."""
    if path is None:
        yield
        return
    check_out(path)
    tee, before = _Tee(sys.stdout), sys.stdout
    sys.stdout = tee
    try:
        yield
    finally:
        sys.stdout = before
    try:
        write_text(path, header(title) + markdown(tee.text.getvalue()))
    except OSError as e:
        raise SystemExit(f"error: {write_error(path, e)}")
    print(f"result written to {path}", file=sys.stderr)
