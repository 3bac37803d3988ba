"""The `export` subcommand: the student to the model's own format (a diffusers transformer folder), and with --lora
the adapter alone in diffusers' LoRA format."""
from __future__ import annotations

import argparse
import sys

import dfd
from dfd_video import lora
from dfd_video.distributed import setup_distributed
from dfd_video.files import check_new_folder, fail, write_folder
from dfd_video.model_card import write_model_card
from dfd_video.runs import checkpoint_run, refuse_non_finite, run_args
from dfd_video.sample import load_student


def trained_student_ts(ckpt: str) -> tuple[float, ...]:
    """The --student-ts the training run used for this checkpoint (its segments.jsonl / args.json, next to
    checkpoints/), else the paper's."""
    try:
        found = checkpoint_run(ckpt)
        return dfd.STUDENT_TS if found is None else tuple(run_args(*found)["student_ts"])
    except (ValueError, OSError, KeyError, TypeError):
        return dfd.STUDENT_TS


def check_args(args: argparse.Namespace) -> list[str]:
    """--out: a new or empty folder (or --overwrite), never inside --model-dir (an export into its transformer/ would
    replace the teacher)."""
    return check_new_folder(args.out, "--out", args.overwrite, {"--model-dir": args.model_dir})


def run(spec, args: argparse.Namespace) -> str:
    d = setup_distributed("cpu")
    try:
        net = lora.load_for_export(spec, args) if args.lora else load_student(spec, args)
        refuse_non_finite(net.state_dict(), f"--ckpt {args.ckpt}")
    except ValueError as e:
        raise fail(e)
    if d.main:
        def write(folder: str) -> None:  # into a temporary folder, renamed to --out when complete
            merged = lora.save_lora(spec, net, folder) if args.lora else net  # <out>/lora/: the adapter alone
            student_ts = tuple(args.student_ts or trained_student_ts(args.ckpt))
            spec.export(merged, folder, student_ts)
            write_model_card(spec, args, student_ts, folder)  # README.md (and lora/README.md): how it was made
        aside = write_folder(args.out, write, args.overwrite)
        if aside:
            print(f"--overwrite: moved the earlier {args.out} to {aside}", file=sys.stderr)
        print(f"exported the student to {args.out}" + (f" (and the LoRA alone to {args.out}/lora/{lora.LORA_FILE}, "
              "for the pipeline's load_lora_weights on the DMD2 student)" if args.lora else ""), file=sys.stderr)
    return args.out
