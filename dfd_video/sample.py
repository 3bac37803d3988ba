"""The `sample` subcommand: the few-step student (dfd.sample) to mp4s, prompt{i:03d}_seed{s}.mp4."""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from dfd_video import lora
from dfd_video.distributed import cast_keeping_fp32, compute_dtype, setup_distributed
from dfd_video.files import atomic_write, fail
from dfd_video.runs import refuse_non_finite
from dfd_video.spec import model_options
from dfd_video.video import read_prompts, write_mp4
from dfd_video.weights import load_student_weights, load_weights


def load_student(spec, args: argparse.Namespace) -> nn.Module:
    """The student of --ckpt (a training checkpoint, a LoRA run's with its base merged in, or any --dmd2-ckpt
    format) in the base architecture, fp32 on CPU."""
    net = lora.load_lora_student(spec, args)
    if net is not None:
        return net
    net = spec.load_network(args.model_dir)
    sd = load_student_weights(args.ckpt, args.weights, args.bidirectional_ckpt, args.rectified_flow_ckpt)
    load_weights(net, sd, f"--ckpt {args.ckpt}", spec.convert_state_dict)
    return net


def check_args(args: argparse.Namespace) -> list[str]:
    """A --prompts file that cannot be used (not UTF-8 text, no prompt) is said before any model loads."""
    if args.prompts is None or not os.path.isfile(args.prompts):
        return []  # a missing file: cli.check_args says so
    try:
        return [] if read_prompts(args.prompts) else [f"--prompts {args.prompts}: no prompts (one per line)"]
    except ValueError as e:
        return [str(e)]


def conditions(spec, args: argparse.Namespace, encoders) -> list[dict[str, torch.Tensor]]:
    """Per-video conditioning from --prompts (encoded) or --embeddings, and --images for image-conditioned models."""
    prompts = embeddings = None
    if args.prompts is not None:
        prompts = read_prompts(args.prompts)
        if not prompts:
            raise ValueError(f"--prompts {args.prompts}: no prompts (one per line)")
    else:
        from safetensors.torch import load_file
        try:
            embeddings = load_file(args.embeddings)
        except Exception as e:
            raise ValueError(f"--embeddings {args.embeddings}: not a readable safetensors file ({type(e).__name__})") from None
    return spec.sample_items(encoders, prompts, embeddings, getattr(args, "images", None),
                             (args.num_frames, args.height, args.width))


def run(spec, args: argparse.Namespace) -> list[str]:
    """Prompts -> mp4s with the few-step sampler (dfd.sample); each rank renders every world-th video."""
    d = setup_distributed(args.device)
    dtype = compute_dtype(args.dtype, d.device)
    try:
        net = load_student(spec, args).to(d.device).eval()
        refuse_non_finite(net.state_dict(), f"--ckpt {args.ckpt}")
        encoders = spec.open_encoders(args.model_dir, d.device, dtype or torch.float32, text=args.prompts is not None)
        items = conditions(spec, args, encoders)
    except ValueError as e:
        raise fail(e)
    if dtype is not None:
        cast_keeping_fp32(net, dtype)
    student = spec.denoiser(net, dtype=dtype, **model_options(spec, args))
    os.makedirs(args.out, exist_ok=True)
    jobs = [(i, s) for i in range(len(items)) for s in args.seeds][d.rank::d.world]
    written = []
    for i, seed in jobs:
        g = torch.Generator(d.device).manual_seed(seed)
        noise = torch.randn((1, *spec.latent_shape(args.num_frames, args.height, args.width)), generator=g,
                            device=d.device)
        cond = spec.make_cond({k: v[None].to(d.device) for k, v in items[i].items()}, d.device)
        with torch.no_grad():
            x0 = spec.sample_video(student, noise, cond, tuple(args.student_ts), g, args.sampler == "renoise")
            frames = encoders.vae.decode(x0)[0]
        path = os.path.join(args.out, f"prompt{i:03d}_seed{seed}.mp4")
        write_mp4(path, frames, args.fps)
        written.append(path)
        if args.save_latents:
            from safetensors.torch import save_file
            latents = {"latents": x0[0].float().cpu().contiguous()}
            atomic_write(path[:-4] + ".safetensors", lambda tmp: save_file(latents, tmp))
    dist.barrier()
    if d.main:
        print(f"wrote {len(items) * len(args.seeds)} videos ({len(items)} prompts x {len(args.seeds)} seeds) to "
              f"{args.out}", file=sys.stderr)
    return written
