"""The `sample` and `export` subcommands: the few-step student to mp4s, or to a diffusers transformer folder."""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import dfd
from dfd_video import lora
from dfd_video.distributed import cast_keeping_fp32, compute_dtype, setup_distributed
from dfd_video.files import fail
from dfd_video.video import write_mp4
from dfd_video.weights import load_student_weights, load_weights


def load_student(adapter, args) -> nn.Module:
    net = lora.load_student(adapter, args)  # a --lora-rank run: its DMD2 base with the adapter merged in
    if net is not None:
        return net
    net = adapter.load_network(args.model_dir)
    sd = load_student_weights(args.ckpt, args.weights, args.bidirectional_ckpt, args.rectified_flow_ckpt)
    load_weights(net, sd, f"--ckpt {args.ckpt}", adapter.convert_state_dict)
    return net


def run_sample(adapter, args: argparse.Namespace) -> list[str]:
    """Prompts -> mp4s with the few-step sampler (dfd.sample); files prompt{i:03d}_seed{s}.mp4."""
    d = setup_distributed(args.device)
    adapter.compute_dtype = compute_dtype(args, d)
    try:
        net = load_student(adapter, args).to(d.device).eval()
        items = adapter.sample_items(args, d.device)
    except ValueError as e:
        raise fail(e)
    if adapter.compute_dtype is not None:
        cast_keeping_fp32(net, adapter.compute_dtype)
    student = adapter.denoiser(net, None, None)
    os.makedirs(args.out, exist_ok=True)
    jobs = [(i, s) for i in range(len(items)) for s in args.seeds][d.rank::d.world]
    written = []
    for i, seed in jobs:
        g = torch.Generator(d.device).manual_seed(seed)
        noise = torch.randn((1, *adapter.noise_shape(args)), generator=g, device=d.device)
        cond = adapter.make_cond({k: v[None].to(d.device) for k, v in items[i].items()}, d.device)
        with torch.no_grad():
            x0 = dfd.sample(student, noise, cond, tuple(args.student_ts), generator=g, renoise=args.sampler == "renoise")
            frames = adapter.decode(x0, args)[0]
        path = os.path.join(args.out, f"prompt{i:03d}_seed{seed}.mp4")
        write_mp4(path, frames, args.fps)
        written.append(path)
        if args.save_latents:
            from safetensors.torch import save_file
            save_file({"latents": x0[0].float().cpu().contiguous()}, path[:-4] + ".safetensors")
    dist.barrier()
    if d.main:
        print(f"wrote {len(items) * len(args.seeds)} videos ({len(items)} prompts x {len(args.seeds)} seeds) to "
              f"{args.out}", file=sys.stderr)
    return written


def run_export(adapter, args: argparse.Namespace) -> str:
    d = setup_distributed("cpu")
    try:
        net = lora.load_for_export(adapter, args) if args.lora else load_student(adapter, args)
    except ValueError as e:
        raise fail(e)
    if d.main:
        if args.lora:  # <out>/lora/: the adapter alone, in diffusers' LoRA format; then merged for the folder
            net = lora.save_lora(adapter, net, args.out)
        adapter.save_pretrained(net, args.out)
        print(f"exported the student to {args.out}", file=sys.stderr)
    return args.out
