"""The `export` subcommand: the student to the model's own format (a diffusers transformer folder), and with --lora
the adapter alone in diffusers' LoRA format."""
from __future__ import annotations

import argparse
import json
import os
import sys

import dfd
from dfd_video import lora
from dfd_video.distributed import setup_distributed
from dfd_video.files import fail
from dfd_video.model_card import write_model_card
from dfd_video.runs import latest_checkpoint
from dfd_video.sample import load_student


def trained_student_ts(ckpt: str) -> tuple[float, ...]:
    """The --student-ts a training run used (its args.json, next to checkpoints/), else the paper's."""
    try:
        run_folder = os.path.dirname(os.path.dirname(latest_checkpoint(ckpt)))
        with open(os.path.join(run_folder, "args.json")) as f:
            return tuple(json.load(f)["student_ts"])
    except (ValueError, OSError, KeyError, json.JSONDecodeError):
        return dfd.STUDENT_TS


def run(spec, args: argparse.Namespace) -> str:
    d = setup_distributed("cpu")
    try:
        net = lora.load_for_export(spec, args) if args.lora else load_student(spec, args)
    except ValueError as e:
        raise fail(e)
    if d.main:
        if args.lora:  # <out>/lora/: the adapter alone, in diffusers' LoRA format; then merged for the folder
            net = lora.save_lora(spec, net, args.out)
        student_ts = tuple(args.student_ts or trained_student_ts(args.ckpt))
        spec.export(net, args.out, student_ts)
        write_model_card(spec, args, student_ts)  # README.md (and lora/README.md): how it was made, how to load it
        print(f"exported the student to {args.out}", file=sys.stderr)
    return args.out
