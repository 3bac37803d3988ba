"""The model card `export` writes: README.md in the exported folder (and with --lora in its lora/ folder), in the
Hugging Face model-card layout (YAML front matter: library_name, base_model, pipeline_tag, tags; then markdown), so
the folder uploads to the Hub as it is and says how it was made: the base model, the DMD2 checkpoint it started from,
the recipe (every train flag that differs from its default, read from the run folder's args.json), the student steps
trained, the last logged metrics (metrics.jsonl) and the diffusers lines that load it. diffusers ignores README.md.
"""
from __future__ import annotations

import argparse
import json
import os

from dfd_video.files import write_text
from dfd_video.runs import checkpoint_run, latest_checkpoint, metric_rows

BOOKKEEPING = ("cmd", "out", "resume", "overwrite", "unit", "length", "causal_student")  # flags that say where a run went, not how it was made
TAGS = ["dfd", "data-forcing-distillation", "dmd2", "distillation", "few-step", "video"]


def run_of(ckpt: str) -> tuple[str, int] | None:
    """(run folder, the last student step the checkpoint holds) when --ckpt is a training checkpoint of a run folder
    (with its args.json) whose step is known (dfd_video.runs.checkpoint_run), else None."""
    found = checkpoint_run(ckpt)
    if found is None or found[1] is None or not os.path.exists(os.path.join(found[0], "args.json")):
        return None
    return found


def recipe(spec, run_args: dict) -> list[tuple[str, str, str]]:
    """(flag, value, default) of every train flag of the run that differs from the script's default."""
    from dfd_video.cli import add_train_args, flag
    parser = argparse.ArgumentParser()
    add_train_args(parser, spec)
    show = lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return [(flag(k), show(v), show(parser.get_default(k))) for k, v in sorted(run_args.items())
            if k not in BOOKKEEPING and v != parser.get_default(k)]


def last_metrics(run: str, step: int) -> dict:
    """The metrics.jsonl line of the checkpoint's step (the last one at or before it); {} without a log."""
    rows = [r for r in metric_rows(run) if r.get("step", -1) <= step]
    return rows[-1] if rows else {}


def table(rows: list[tuple], head: tuple[str, ...], code: bool = True) -> str:
    """A markdown table; code: the first column (flags, metric names) in backticks."""
    cell = lambda i, c: f"`{c}`" if code and i == 0 else str(c)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cell(i, c) for i, c in enumerate(r)) + " |" for r in rows])


def provenance(spec, args: argparse.Namespace, student_ts: tuple[float, ...]) -> str:
    """The "How it was made" section."""
    found = run_of(args.ckpt)
    ts = ", ".join(f"{t:g}" for t in student_ts)
    lines = [f"A {len(student_ts)}-step student (times {ts}) of {spec.family} post-trained with Data-Forcing "
             "Distillation (DFD; arXiv:2511.00062) from a DMD2 student.", "", "## How it was made", ""]
    if found is None:
        return "\n".join(lines + [f"Exported from `{args.ckpt}`, which is not a training run of this code (no "
                                  "run folder with args.json): no recipe or metrics are recorded.", ""])
    run, step = found
    with open(os.path.join(run, "args.json")) as f:
        run_args = json.load(f)
    has_ema = os.path.exists(os.path.join(latest_checkpoint(args.ckpt), "ema.safetensors"))
    weights = "the EMA" if args.weights == "ema" or (args.weights == "auto" and has_ema) else "the student"
    rows = [("base model", f"{spec.base_model} (local folder `{run_args.get('model_dir')}`)"),
            ("DMD2 checkpoint", f"`{run_args.get('dmd2_ckpt')}` (its {run_args.get('init_from', 'generator')})"
             if run_args.get("dmd2_ckpt") else "not recorded (args.json of a resumed run)"),
            ("training run", f"`{run}`, checkpoint after student step {step} (counted from 0) of a run of "
                             f"--{str(run_args.get('unit', 'student_steps')).replace('_', '-')} "
                             f"{run_args.get('length', run_args.get('steps'))}"),
            ("weights", weights + (f", LoRA rank {run_args['lora_rank']} merged" if run_args.get("lora_rank") else ""))]
    lines += [table(rows, ("", ""), code=False), "", "### Recipe: the train flags that differ from the defaults", ""]
    diff = recipe(spec, run_args)
    lines += [table(diff, ("flag", "value", "default")) if diff else "None: the script's defaults.", ""]
    metrics = last_metrics(run, step)
    if metrics:
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
        lines += [f"### Last logged metrics (student step {metrics.get('step')})", "",
                  table([(k, fmt(v)) for k, v in metrics.items() if k != "step"], ("metric", "value")), ""]
    return "\n".join(lines)


def front_matter(spec, lora: bool) -> str:
    from huggingface_hub import ModelCardData
    task = "image-to-video" if spec.image_conditioned else "text-to-video"
    data = ModelCardData(library_name="diffusers", base_model=spec.base_model or None, pipeline_tag=task,
                         tags=TAGS + [task] + (["lora"] if lora else []))
    return f"---\n{data.to_yaml()}\n---\n"


def python(lines: list[str], names: list[str]) -> str:
    """A python block: the imports of `lines`, the variable lines `names`, the rest of `lines`."""
    imports = [x for x in lines if x.startswith(("import ", "from "))]
    return "```python\n" + "\n".join(imports + names + [x for x in lines if x not in imports]) + "\n```\n"


def write_model_card(spec, args: argparse.Namespace, student_ts: tuple[float, ...], folder: str | None = None) -> None:
    """README.md in `folder` (default args.out: where the export ends up, which the card's code names), and with
    --lora in folder/lora (rank 0, after the weights are written)."""
    folder = folder or args.out
    made = provenance(spec, args, student_ts)
    base = f"base = {spec.base_model!r}  # or a local copy of the base model"
    code = python(spec.load_lines(student_ts, "student"),
                  [base, f"student = {args.out!r}  # this folder, or its Hub id once uploaded"])
    body = (f"# {spec.family}: a DFD few-step student\n\n{made}\n## How to load it\n\nThe transformer in this folder "
            f"replaces the base pipeline's; the scheduler runs the student's times.\n\n{code}")
    os.makedirs(os.path.join(folder, "lora") if args.lora else folder, exist_ok=True)
    write_text(os.path.join(folder, "README.md"), front_matter(spec, False) + body)
    if args.lora:
        lines = spec.load_lines(student_ts, "dmd2_student")
        code = python([*lines[:-1], 'pipe.load_lora_weights(f"{student}/lora")  # alpha included (read from the '
                       'metadata)', lines[-1]],
                      [base, "dmd2_student = 'the DMD2 student transformer folder the run started from'",
                       f"student = {args.out!r}  # the export folder this lora/ folder is in"])
        body = (f"# {spec.family}: the LoRA of a DFD few-step student\n\nThe adapter alone, in diffusers' LoRA "
                f"format, for the DMD2 student it was trained on (the parent folder holds it merged).\n\n{made}\n"
                f"## How to load it\n\n{code}")
        write_text(os.path.join(folder, "lora", "README.md"), front_matter(spec, True) + body)
