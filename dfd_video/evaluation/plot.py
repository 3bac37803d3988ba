"""The `plot` subcommand: a run's metrics.jsonl (and probes.jsonl, when the run has probes) over its unit (FastGen
iterations or student steps, dfd_video.length), as one PNG, because people would rather look at a curve than read
JSON."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from dfd_video.files import atomic_write
from dfd_video.runs import run_args

# panels in this order when the run logged them; any other numeric key follows
FIRST = ("loss_student", "loss_fake", "delta2", "teacher_gap", "dm_normaliser", "dm_grad_norm", "grad_norm_student",
         "grad_norm_fake", "dfd", "t_mean")
SKIP = {"step", "iteration", "student_updates", "samples", "lr", "step_time_s", "peak_mem_gb"}  # bookkeeping
# the x axis in the run's unit (args.json "unit", dfd_video.length): the metrics key and its label
AXES = {"iterations": ("iteration", "FastGen iteration"), "student_steps": ("step", "student step")}


def add_args(p: argparse.ArgumentParser, spec=None) -> None:
    """The flags of this subcommand (dfd_video.cli builds its parser only when it runs)."""
    p.add_argument("--run", required=True, help="a training run folder (train's --out)")
    p.add_argument("--out", help="the PNG to write (default: <run>/metrics.png)")


def read_series(path: str, x: str = "step") -> dict[str, tuple[list[int], list[float]]]:
    """{key: (x values, values)} of every numeric key in a JSONL file of {"step": N, ...} lines, against the key `x`
    ("step", or "iteration" where the lines have it); ValueError naming the file and line when a line is not JSON or
    has no step."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row[x] if x in row else row["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(f"{path}:{n}: not a metrics line (JSON with a \"step\")") from None
            for k, v in row.items():
                if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    steps, values = series.setdefault(k, ([], []))
                    steps.append(step)
                    values.append(float(v))
    return series


def plot_run(run: str, out: str) -> list[str]:
    """Draws every series of <run>/metrics.jsonl and <run>/probes.jsonl into `out`; returns the keys drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise ValueError(f"--run {run}: no metrics.jsonl (expected a training run folder, i.e. train's --out)")
    x, xlabel = AXES[run_unit(run)]
    series = read_series(metrics, x)
    probes = os.path.join(run, "probes.jsonl")
    if os.path.isfile(probes):
        series.update({f"probe/{k}": v for k, v in read_series(probes, x).items()})
    if not series:
        raise ValueError(f"{metrics}: no steps logged yet")
    keys = [k for k in FIRST if k in series] + sorted(k for k in series if k not in FIRST)
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        steps, values = series[k]
        title = k
        if k == "dfd":  # a 0/1 coin per step: its running mean is the readable part
            values = [sum(values[:i + 1]) / (i + 1) for i in range(len(values))]
            title = "dfd (fraction of steps so far)"
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, lw=1.0, alpha=0.5 if len(steps) >= 30 else 1)
        if len(steps) >= 30 and k != "dfd":  # a trailing mean over a tenth of the run, for the trend
            w = len(steps) // 10
            ax.plot(steps[w - 1:], [sum(values[i - w + 1:i + 1]) / w for i in range(w - 1, len(values))], lw=1.8,
                    color="C1", label=f"mean of {w}")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(os.path.abspath(run), fontsize=10)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return keys


def run_unit(run: str) -> str:
    """The unit the run counts in (its recorded flags' "unit"; runs from before it counted student steps)."""
    flags = run_args(run)
    unit = flags.get("unit", "student_steps") if isinstance(flags, dict) else "student_steps"
    return unit if unit in AXES else "student_steps"


def run(spec, args: argparse.Namespace) -> str:
    out = args.out or os.path.join(args.run, "metrics.png")
    try:
        keys = plot_run(args.run, out)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(f"plotted {len(keys)} series of {args.run} -> {out}", file=sys.stderr)
    return out
