"""The `plan` subcommand: GPU memory per rank of a planned `train` run, by part, and the largest batch that fits.

  python wan_dfd.py plan --world-size 1 --lora-rank 16 --gpu-gb 48
  python wan_dfd.py plan --table --out bench/results/plan_wan.md    # the tables docs/memory.md quotes

Nothing is loaded: the transformer is built on the meta device from --model-dir's config.json, or from the public
config of the model in dfd_video/configs/. The model is dfd_video.planning.memory.plan_memory; docs/memory.md says which parts
are exact, which are counted (and checked against measurement) and which are rough.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys

from dfd_video.cli import add_clip_args
from dfd_video.files import write_error, write_text
from dfd_video.planning.memory import (GiB, gan_sizes, largest_batch, meta_network, network_sizes, part_rows,
                                      plan_model, read_config)
from dfd_video.planning.tables import PUBLIC_CONFIGS

TABLE_WORLDS = (1, 2, 4, 8)
TABLE_GPUS = (24, 48, 80)
TABLE_WEIGHTS = (0, 16, 64)  # full weights, LoRA r = 16, r = 64


def add_args(p: argparse.ArgumentParser, spec=None) -> None:
    """The flags of this subcommand (dfd_video.cli builds its parser only when it runs)."""
    names = sorted(PUBLIC_CONFIGS.get(spec.name, {})) if spec is not None else []
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model-dir", default=None, help="a diffusers model folder (or transformer folder) whose "
                       "config.json sets the architecture (default: the public config of the model, "
                       "dfd_video/configs/)")
    where.add_argument("--config", default=None, choices=names or None, help="a public transformer config of "
                       "dfd_video/configs/ instead (default: the model's first, " + (names[0] if names else "") + ")")
    p.add_argument("--world-size", type=int, default=1, help="GPUs (ranks) of the planned run; every network is "
                   "sharded over all of them")
    p.add_argument("--lora-rank", type=int, default=0, help="plan a --lora-rank r run (0: full weights)")
    p.add_argument("--fake-init", default="teacher", choices=("teacher", "critic"), help="where the fake score "
                   "starts; with --lora-rank, teacher puts its adapter on the teacher's base (two bases in memory), "
                   "critic gives it a frozen base of its own (three)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="compute dtype (weights, gradients and "
                   "AdamW state are fp32 either way)")
    p.add_argument("--ema", type=float, default=0.0, help="student EMA decay of the planned run (> 0 adds the EMA)")
    p.add_argument("--batch-per-gpu", type=int, default=1, help="clips per GPU per micro-batch")
    add_clip_args(p, "frames per clip (4k + 1)", None)
    p.add_argument("--no-checkpointing", action="store_true", help="plan without activation checkpointing")
    p.add_argument("--causal", action="store_true", help="plan a causal (Self-Forcing / CausVid) student: adds its "
                   "rollout's KV cache (docs/causal.md)")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GiB (an \"80 GB\" A100 "
                   "has 80 GiB)")
    p.add_argument("--reserve-gb", type=float, default=6.0, help="GiB per GPU kept free for what is not modelled: "
                   "the CUDA context, NCCL buffers, the allocator's fragmentation")
    p.add_argument("--table", action="store_true", help="print the tables of docs/memory.md (full weights and LoRA "
                   "r = 16, 64 on --worlds GPUs of --gpus-gb GiB) for the other flags' clip and settings")
    p.add_argument("--worlds", type=int, nargs="+", default=list(TABLE_WORLDS), help="GPU counts of the --table rows")
    p.add_argument("--gpus-gb", type=float, nargs="+", default=list(TABLE_GPUS), help="GPU sizes (GiB) of the "
                   "--table columns")
    p.add_argument("--gan-weight", type=float, default=0.0, help="> 0: plan a run with DMD2's GAN head (its "
                   "discriminator, the teacher's backward; docs/gan.md)")
    p.add_argument("--gan-disc-type", default=None, help="the discriminator head (default: FastGen's config for the "
                   "architecture)")
    p.add_argument("--gan-blocks", type=int, nargs="+", default=None, help="its teacher feature blocks (default: "
                   "FastGen's config for the architecture)")
    # not dest "out": the shared checks take --out for a folder, and this is a file that a rerun replaces
    p.add_argument("--out", dest="out_file", default=None, metavar="FILE", help="also write what is printed to FILE "
                   "as markdown, headed by the command that wrote it (replaced atomically if it exists; e.g. "
                   "bench/results/plan_wan.md)")


def check_args(args: argparse.Namespace) -> list[str]:
    bad = []
    if args.batch_per_gpu < 1:
        bad.append(f"--batch-per-gpu {args.batch_per_gpu}: must be >= 1")
    if not args.gpu_gb > 0 or args.reserve_gb < 0 or args.reserve_gb >= args.gpu_gb:
        bad.append(f"--gpu-gb {args.gpu_gb:g} / --reserve-gb {args.reserve_gb:g}: need 0 <= reserve < GPU")
    if args.out_file is not None:
        folder = os.path.dirname(os.path.abspath(args.out_file))
        if os.path.isdir(args.out_file) or not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            bad.append(f"--out {args.out_file}: expected a file in an existing folder this process may write into")
    if min(args.worlds) < 1 or min(args.gpus_gb) <= args.reserve_gb:
        bad.append(f"--worlds / --gpus-gb: need GPU counts >= 1 and sizes above --reserve-gb {args.reserve_gb:g}")
    return bad


def latent_of(spec, config: dict, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """One clip's latent shape: the model's (the Wan 2.1 VAE), or the one a public config's "_latent" note gives
    (Wan2.2-TI2V-5B's own VAE: 48 channels, 16x in space)."""
    note = config.get("_latent")
    if note is None:
        return spec.latent_shape(frames, height, width)
    return (note["channels"], (frames - 1) // note["temporal"] + 1, height // note["spatial"], width // note["spatial"])


def plan_for(spec, sizes: dict, args: argparse.Namespace, world: int, rank: int, batch: int) -> dict:
    lat = latent_of(spec, sizes.get("config", {}), args.num_frames, args.height, args.width)
    return plan_model(spec, sizes, world=world, lora_rank=rank, shared_fake=args.fake_init == "teacher",
                      compute_bytes=2 if args.dtype == "bf16" else 4, ema=args.ema > 0, batch_per_gpu=batch,
                      latent=lat, checkpointing=not args.no_checkpointing, kv_cache=getattr(args, "causal", False),
                      gan=sizes.get("gan"))


def _g(b: float) -> str:
    return f"{b / GiB:.2f}"


def report(spec, sizes: dict, args: argparse.Namespace, source: str) -> str:
    p = plan_for(spec, sizes, args, args.world_size, args.lora_rank, args.batch_per_gpu)
    P = sum(math.prod(s) for s in sizes["shapes"])
    on = "the teacher's base" if args.fake_init == "teacher" else "a critic base of its own"
    weights = (f"LoRA r = {args.lora_rank} ({p['adapter_params'] / 1e6:.1f} M adapter parameters per network), fake "
               f"score on {on}" if args.lora_rank else "full weights")
    act = "counted (what the blocks save for backward; checked on the bench model, bench/bench_memory_plan.py)" \
        if p["counted"] else "rough (the older rule of thumb of bench/bench_wan_memory.py: not calibrated for this model)"
    rows = part_rows(p, args.lora_rank > 0, args.ema > 0, args.batch_per_gpu)
    fit = largest_batch(p, args.gpu_gb * GiB, args.reserve_gb * GiB)
    L = [f"plan: {type(spec).__name__}, {P / 1e9:.3f} B parameters per network ({source}); {weights}",
         f"  {args.world_size} GPU(s), {args.dtype} compute, activation checkpointing "
         f"{'off' if args.no_checkpointing else 'on'}, EMA {'on' if args.ema > 0 else 'off'}, {args.batch_per_gpu} "
         f"clip(s) per GPU of {args.num_frames} frames at {args.height}x{args.width} ({p['activation_detail']['tokens']} "
         f"tokens)", "",
         f"  {'per GPU':<74} {'GiB':>8}  kind"]
    L += [f"  {name:<74} {_g(b):>8}  {kind}" for name, b, kind in rows]
    L += [f"  {'total':<74} {_g(p['total']):>8}", "",
          f"  activations: {act}",
          f"  {args.gpu_gb:g} GiB GPU, {args.reserve_gb:g} GiB kept free: {'fits' if p['total'] + args.reserve_gb * GiB <= args.gpu_gb * GiB else 'does NOT fit'}; "
          f"largest batch per GPU that fits: {fit}" + (" (not even one clip)" if fit == 0 else "")]
    return "\n".join(L)


def tables(spec, sizes: dict, args: argparse.Namespace) -> str:
    """Per-GPU memory at batch 1 and the largest batch per GPU, for every weights setting, world size and GPU size;
    then the smallest configuration that fits each GPU size."""
    name = lambda r: f"LoRA r = {r}" if r else "full weights"
    worlds, gpus = sorted(set(args.worlds)), sorted(set(args.gpus_gb))
    L = [f"{args.num_frames} frames at {args.height}x{args.width}, {args.dtype} compute, activation checkpointing "
         f"{'off' if args.no_checkpointing else 'on'}, EMA {'on' if args.ema > 0 else 'off'}"
         + (", LoRA fake score on the teacher's base" if args.fake_init == "teacher" else "")
         + (", GAN head (discriminator in the first column, its activations in the third)" if sizes.get("gan") else "")
         + f"; GiB per GPU; largest batch per GPU with {args.reserve_gb:g} GiB kept free", "",
         "| weights | GPUs | params + grads + AdamW + teacher | gathered | activations / clip | working / clip | "
         "total at batch 1 | " + " | ".join(f"batch on {g:g} GiB" for g in gpus) + " |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in gpus) + " |"]
    smallest = {}
    for r in TABLE_WEIGHTS:
        for w in worlds:
            p = plan_for(spec, sizes, args, w, r, 1)
            fits = [largest_batch(p, g * GiB, args.reserve_gb * GiB) for g in gpus]
            for g, b in zip(gpus, fits):
                if b >= 1 and (r, g) not in smallest:
                    smallest[(r, g)] = (w, b)
            parts = p["parts"]
            state = sum(parts.get(k, 0) for k in ("parameters", "gradients", "optimizer", "teacher", "discriminator"))
            act = parts["activations"] + parts.get("gan_activations", 0)
            L.append(f"| {name(r)} | {w} | {_g(state)} | {_g(parts['gathered'])} | {_g(act)} | "
                     f"{_g(parts['working'])} | {_g(p['total'])} | " + " | ".join(str(b) for b in fits) + " |")
    L += ["", "Smallest configuration that fits (fewest GPUs with batch >= 1 per GPU):", "",
          "| weights | " + " | ".join(f"{g:g} GiB GPUs" for g in gpus) + " |",
          "| --- | " + " | ".join("---" for _ in gpus) + " |"]
    for r in TABLE_WEIGHTS:
        cells = [f"{smallest[(r, g)][0]} GPU(s), batch {smallest[(r, g)][1]} per GPU" if (r, g) in smallest
                 else f"does not fit {max(worlds)}" for g in gpus]
        L.append(f"| {name(r)} | " + " | ".join(cells) + " |")
    if 1 in worlds and 48 in gpus and 80 in gpus:  # the goals of docs/memory.md
        lora_ok = any((r, 48) in smallest and smallest[(r, 48)][0] == 1 for r in TABLE_WEIGHTS if r)
        full_ok = (0, 80) in smallest and smallest[(0, 80)][0] == 1
        L += ["", f"- goal, LoRA on one 48 GiB GPU at batch >= 1: {'met' if lora_ok else 'NOT met'}"
              + ("" if not args.no_checkpointing else " (without activation checkpointing)"),
              f"- goal, full weights on one 80 GiB GPU at batch >= 1: {'met' if full_ok else 'NOT met'}"]
    return "\n".join(L)


def run(spec, args: argparse.Namespace) -> dict:
    try:
        config, path = read_config(spec, args.model_dir, args.config)
        net = meta_network(config)
        sizes = {**network_sizes(spec, net), "config": config}
        if args.gan_weight > 0:
            sizes["gan"] = gan_sizes(spec, net, args.gan_disc_type, args.gan_blocks)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise SystemExit(f"error: {e}")
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    source = f"--model-dir {args.model_dir}" if args.model_dir else f"public config, {os.path.relpath(path, here)}"
    if args.lora_rank:
        biggest = min(min(t) for t in sizes["lora_targets"])
        if args.lora_rank > biggest:
            raise SystemExit(f"error: --lora-rank {args.lora_rank}: larger than the smallest target layer ({biggest})")
    text = tables(spec, sizes, args) if args.table else report(spec, sizes, args, source)
    print(text)
    if args.out_file is not None:
        write_result(args.out_file, spec, text)
    return plan_for(spec, sizes, args, args.world_size, args.lora_rank, args.batch_per_gpu)


def write_result(path: str, spec, text: str) -> None:
    """The printed plan as a markdown result file, headed by the command line that reproduces it (the numbers are
    computed from configs alone, so a rerun gives the same file)."""
    command = shlex.join(["python", os.path.basename(sys.argv[0]), *sys.argv[1:]])
    body = text if text.lstrip().startswith("|") or "\n|" in text else f"```text\n{text}\n```"
    head = (f"# GPU memory per rank planned for {spec.family}: computed, not measured\n\n"
            f"Written by `{command}` (dfd_video/planning/plan.py); docs/memory.md says which parts are exact, "
            "which counted and which rough.\n\n")
    try:
        write_text(path, head + body + "\n")
    except OSError as e:
        raise SystemExit(f"error: {write_error(path, e)}")
