"""The command line shared by wan_dfd.py and cosmos_dfd.py: the subcommands, their flags, the checks run before any
model loads, and main(spec).

The method path's subcommands (prepare, train, sample, export) have their flags here. The optional layers'
(evaluate, plot: dfd_video.evaluation; check, plan: dfd_video.planning) live with their drivers, and a layer is
imported only when its subcommand runs: `train` never imports evaluation or planning code.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import dfd
from dfd_video import lora
from dfd_video.distributed import teardown_distributed, wait_for_rank0
from dfd_video.files import cannot_move_working_dir, check_writable, error_line, holds_working_dir
from dfd_video.length import DEFAULT_ITERATIONS, add_length_args
from dfd_video.runs import held_run_error, release_run_locks, run_files
from dfd_video.spec import model_family_error
from dfd_video.weights import fastgen_prefix_exists


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", required=True, help="local diffusers-format base model folder")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: CUDA when available")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="compute dtype of the networks (auto: bf16 on CUDA, fp32 on CPU); weights stay fp32")


def add_ckpt_trust_args(p: argparse.ArgumentParser) -> None:
    """The flags that overrule a refusal of describe_dmd2 (docs/checkpoints.md)."""
    p.add_argument("--bidirectional-ckpt", action="store_true",
                   help="the Self-Forcing / CausVid .pt given is a bidirectional (full-sequence) student; without this "
                        "flag such files are refused, because their released students are block-causal")
    p.add_argument("--rectified-flow-ckpt", action="store_true",
                   help="the checkpoint under a base/distilled path (NVIDIA's TrigFlow-distilled Cosmos) is in fact a "
                        "rectified-flow model; without this flag that path is refused")


def add_train_args(p: argparse.ArgumentParser, spec=None, check: bool = False) -> None:
    """The train flags, with the spec's defaults; check=True for `check`, which takes them all (so a train command
    line can be pasted) with --data optional and --out the report file."""
    add_common_args(p)
    p.add_argument("--dmd2-ckpt", help="the DMD2 checkpoint to start from: a FastGen FSDP checkpoint (any of its "
                   "<iter>.net_model/ .fake_score_model/ .ema_model/ folders, its <iter>.pth, the <dir>/<iter> prefix "
                   "or the checkpoints folder: latest iteration), a FastGen / Self-Forcing .pt/.pth, a diffusers "
                   "folder, a .safetensors or a torch.distributed.checkpoint folder (docs/checkpoints.md)")
    p.add_argument("--init-from", default="generator", choices=("generator", "generator_ema"),
                   help="which network of the DMD2 checkpoint starts the student: generator (FastGen's net_model, "
                        "the network its critic was trained against) or generator_ema (its EMA, e.g. ema_model; the "
                        "generator when there is none)")
    p.add_argument("--fake-init", default=None, choices=("critic", "teacher"),
                   help="where the fake score starts: critic (the DMD2 checkpoint's fake score, e.g. FastGen's "
                        "fake_score_model) or teacher (a copy of the base model, as a fresh DMD2 run starts it); "
                        "default: the critic when the checkpoint has one, else the teacher")
    add_ckpt_trust_args(p)
    p.add_argument("--data", required=not check, help="folder written by `prepare`" + (
        " (optional: real conditioning for parity and the sample, delta^2, the clip size of the memory estimate)"
        if check else ""))
    if check:
        p.add_argument("--out", default=None, help="also write the report as JSON: a .json file, or a folder (e.g. "
                       "the run folder of a pasted train command) that gets check.json")
    else:
        p.add_argument("--out", default="runs/dfd", help="run folder: checkpoints/, metrics.jsonl, args.json")
    again = p.add_mutually_exclusive_group()  # a --out that already holds a run needs one of the two
    again.add_argument("--resume", nargs="?", const="latest", default=None,
                       help="continue from a checkpoint folder (no value: the latest one in --out)")
    again.add_argument("--overwrite", action="store_true", help="start afresh in a --out that holds an earlier run, "
                       "after renaming that run's folder to <out>.old-<date>-<time>")
    p.add_argument("--allow-changes", action="store_true", help="with --resume: continue although this command "
                   "changes flags that change the method (or --data) from the checkpoint's; each change is recorded "
                   "in <out>/segments.jsonl (docs/errors.md)")
    defaults = dict(spec.defaults) if spec is not None else {}
    add_length_args(p, defaults.pop("iterations", DEFAULT_ITERATIONS))
    p.add_argument("--batch-size", type=int, default=16, help="global batch: ranks x grad-accum x per-rank batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update (each network)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW lr of the student (paper: 1e-5)")
    p.add_argument("--lr-fake", type=float, default=1e-5, help="AdamW lr of the fake score (paper: 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, both networks")
    add_method_args(p)
    p.add_argument("--ema", type=float, default=0.0, help="student EMA decay (0: no EMA)")
    p.add_argument("--seed", type=int, default=0, help="seeds data order, noise, t and the DFD coin")
    p.add_argument("--monitor-every", type=int, default=10, help="every N steps log teacher_gap (one extra teacher call)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N student steps and after the last "
                   "one (0: only after the last step)")
    p.add_argument("--keep", type=int, default=2, help="newest checkpoints kept in <out>/checkpoints")
    p.add_argument("--no-checkpointing", action="store_true", help="turn off activation checkpointing")
    add_recipe_args(p, spec)
    lora.add_lora_flags(p)
    add_gan_args(p)
    add_probe_args(p)
    add_tracking_args(p)
    if spec is not None:
        spec.add_model_args(p, "check" if check else "train")
    p.set_defaults(**defaults)


def add_method_args(p: argparse.ArgumentParser) -> None:
    """The flags that set the method: dfd.DFDConfig's fields (train.dfd_config) and the teacher's guidance."""
    p.add_argument("--p", type=float, default=0.5, help="P(teacher sees the real video) per student step, Eq. 10; "
                   "0 = plain DMD, 1 = DFD only")
    p.add_argument("--per-sample-coin", action="store_true", help="one DFD coin per sample instead of per step")
    p.add_argument("--p-t-min", type=float, default=0.0, help="beyond the paper: DFD only on samples whose DMD noise "
                   "level t >= this (p(t) = p there, 0 below; per-sample coins); 0: the paper's p at every t")
    p.add_argument("--space", default="x0", choices=("x0", "score"), help="x0: the authors' loss; score: Eq. 8 literally")
    p.add_argument("--fake-loss", default="x0", choices=("x0", "flow"), help="the fake score's loss: x0 (FastGen's "
                   "fake_score_pred_type in its Wan and Cosmos DMD2 configs) or flow (the error of the flow velocity, "
                   "i.e. the x0 error / t^2: FastGen's 'flow', SF-DFD's critic)")
    p.add_argument("--guidance", type=float, default=5.0, help="teacher CFG g in uncond + g (cond - uncond)")
    p.add_argument("--fake-updates", type=int, default=4, help="fake-score updates before each student update "
                   "(4: the paper's student update frequency 5, FastGen's student_update_freq=5, a 5-iteration cycle)")
    p.add_argument("--student-ts", type=float, nargs="+", default=list(dfd.STUDENT_TS),
                   help="the few-step student's times t (decreasing, in (0, 1])")
    p.add_argument("--backward-sim", action="store_true",
                   help="student input by backward simulation from noise instead of the real video noised to t_s")
    p.add_argument("--t-min", type=float, default=0.001, help="lower end of the DMD / fake-score noise level "
                   "t ~ U[t-min, t-max], which is then shifted and clamped back to [t-min, t-max] (FastGen's DMD2: "
                   "0.001; Self-Forcing / CausVid: 0.02)")
    p.add_argument("--t-max", type=float, default=0.999, help="upper end of that range (FastGen's DMD2: 0.999; "
                   "Self-Forcing / CausVid: 0.98)")
    p.add_argument("--t-shift", type=float, default=5.0, help="shift of that t (5.0: FastGen's, and the student "
                   "schedule's)")
    p.add_argument("--grad-clip", type=float, default=10.0, help="max grad norm of the student (<= 0: off; "
                   "FastGen's DMD2: 10)")
    p.add_argument("--grad-clip-fake", type=float, default=0.0, help="max grad norm of the fake score (<= 0: off, "
                   "as in FastGen's DMD2, which clips the student only; Self-Forcing: 10)")
    p.add_argument("--zero-nonfinite-grads", action="store_true", help="set the student's NaN gradients to 0 and "
                   "+-inf to the largest finite value, then clip and step, as FastGen's GradClipCallback does "
                   "(default: stop the run with the last checkpoint untouched)")


def add_recipe_args(p: argparse.ArgumentParser, spec) -> None:
    """The settings a published recipe other than FastGen's DMD2 fixes (SF-DFD's: --preset sf-dfd, docs/recipe.md)."""
    if spec is not None and spec.presets:
        p.add_argument("--preset", choices=sorted(spec.presets), default=None, help="a published recipe's flag "
                       "defaults (flags given on the command line still win): sf-dfd = SF-DFD on a Self-Forcing "
                       "student (docs/causal.md)")
    p.add_argument("--per-micro-coin", action="store_true", help="one DFD coin per micro-batch (gradient-accumulation "
                   "pass), the same on every rank, as SF-DFD draws it; default: one per student step")
    p.add_argument("--t-clamp", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="clamp the shifted DMD / fake-score t to [LO, HI] instead of [t-min, t-max] (Self-Forcing: "
                        "draw on [0, 0.999], clamp to [0.02, 0.98])")
    p.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1 of both networks (Self-Forcing: 0)")
    p.add_argument("--ema-init", default="student", choices=("student", "checkpoint"), help="where --ema's average "
                   "starts: the student's weights, or the DMD2 checkpoint's own EMA (e.g. Self-Forcing's "
                   "generator_ema; the student's when it has none)")


def resolve_preset(spec, name: str | None) -> dict[str, Any]:
    """--preset's flag defaults; a callable value is given the number of ranks (torchrun's WORLD_SIZE)."""
    if spec is None or name not in spec.presets:
        return {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {k: v(world) if callable(v) else v for k, v in spec.presets[name].items()}


def preset_name(argv: Sequence[str]) -> str | None:
    """The --preset value on a command line (read before parsing: it sets the other flags' defaults)."""
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--preset="):
            return a.split("=", 1)[1]
    return None


def add_gan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("GAN", "DMD2's GAN head as FastGen trains it: a discriminator on the teacher's block "
                             "features (docs/gan.md); off by default, as in the paper's DFD (Table 5)")
    g.add_argument("--gan-weight", type=float, default=0.0, help="weight of the GAN loss in the student's loss "
                   "(FastGen's Wan / Cosmos DMD2 configs: 0.03; 0: no GAN, no discriminator)")
    g.add_argument("--gan-blocks", type=int, nargs="+", default=None, help="teacher blocks whose outputs the "
                   "discriminator reads (default: FastGen's DMD2 config for the architecture, e.g. 15 22 29 for "
                   "Wan2.1-1.3B, 13 20 27 for Cosmos-Predict2.5-2B)")
    g.add_argument("--gan-disc-type", default=None, help="FastGen's discriminator head: multiscale_down_mlp_large, "
                   "multiscale_down_mlp[_efficient|_medium] or dit_simple_conv3d (default: FastGen's config for the "
                   "architecture)")
    g.add_argument("--gan-lr", type=float, default=1e-5, help="AdamW lr of the discriminator (FastGen: 1e-5)")
    g.add_argument("--gan-r1-weight", type=float, default=0.0, help="weight of the approximate R1 penalty (FastGen's "
                   "gan_r1_reg_weight; 0: off, as in its video configs)")
    g.add_argument("--gan-r1-alpha", type=float, default=0.1, help="noise scale of that penalty (FastGen: 0.1)")
    g.add_argument("--gan-fresh-noise", action="store_true", help="noise the real video with its own t and noise "
                   "(FastGen's gan_use_same_t_noise=False); default: the fake sample's, as both video configs")


# One rule per flag: (holds(value), what it must be). check_args applies those whose flag the subcommand has and
# the command line gives (None: not given).
_between = lambda lo, hi: lambda v: lo <= v <= hi
_LR = "must be a finite number > 0 and < 1 (AdamW moves every weight by about lr per step; the paper: 1e-5)"
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "p": (_between(0.0, 1.0), "must be in [0, 1]"),
    "p_t_min": (_between(0.0, 1.0), "must be in [0, 1]"),
    "iterations": (lambda v: v >= 2, "must be >= 2 (FastGen runs iterations 1..N-1)"),
    "student_steps": (lambda v: v >= 1, "must be >= 1"),
    "gan_weight": (lambda v: v >= 0 and math.isfinite(v), "must be a finite number >= 0 (0: no GAN)"),
    "gan_lr": (lambda v: v > 0 and math.isfinite(v), "must be a finite number > 0"),
    "gan_r1_weight": (lambda v: v >= 0 and math.isfinite(v), "must be a finite number >= 0 (0: off)"),
    "gan_r1_alpha": (lambda v: v > 0 and math.isfinite(v), "must be a finite number > 0"),
    "gan_blocks": (lambda v: all(b >= 0 for b in v), "must be block indices >= 0"),
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "grad_accum": (lambda v: v >= 1, "must be >= 1"),
    "lr": (lambda v: 0 < v < 1, _LR),
    "lr_fake": (lambda v: 0 < v < 1, _LR),
    "fake_updates": (lambda v: v >= 0, "must be >= 0"),
    "guidance": (lambda v: 0 < v < math.inf, "must be a finite number > 0 (the teacher is uncond + g (cond - uncond): "
                 "g = 1 is no guidance, g = 0 the negative prompt alone, g < 0 guides towards it)"),
    "t_shift": (lambda v: 0 < v < math.inf, "must be a finite number > 0 (1: no shift; it maps t to s t / (1 + (s - 1) "
                "t), which for s <= 0 leaves [0, 1] and is clamped to an end)"),
    "ema": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "per_shard": (lambda v: v >= 1, "must be >= 1"),
    "keep": (lambda v: v >= 1, "must be >= 1"),
    "probe_every": (lambda v: v >= 0, "must be >= 0 (0: off)"),
    "stop_on_drift": (lambda v: v >= 0, "must be >= 0 (0: off)"),
    "probe_count": (lambda v: v >= 1, "need at least one condition"),
    "probe_seeds": (lambda v: len(v) >= 1, "need at least one seed"),
    "monitor_every": (lambda v: v >= 0, "must be >= 0 (0: off)"),
    "adam_beta1": (_between(0.0, 0.999999), "must be in [0, 1)"),
    "t_clamp": (lambda v: 0.0 <= v[0] < v[1] <= 1.0, "must be LO HI with 0 <= LO < HI <= 1"),
    "frames_per_block": (lambda v: v >= 1, "must be >= 1"),
    "context_sigma": (_between(0.0, 1.0), "must be in [0, 1]"),
    "save_every": (lambda v: v >= 0, "must be >= 0"),
    "student_ts": (lambda v: all(0 < t <= 1 for t in v) and all(a > b for a, b in zip(v, v[1:])),
                   "must be strictly decreasing values in (0, 1]"),
    "num_frames": (lambda v: v >= 1 and (v - 1) % 4 == 0, "must be 4k + 1 (the VAE compresses time 4x)"),
    "height": (lambda v: v >= 16 and v % 16 == 0, "must be a positive multiple of 16"),
    "width": (lambda v: v >= 16 and v % 16 == 0, "must be a positive multiple of 16"),
    "fps": (lambda v: v > 0, "must be > 0"),
    "world_size": (lambda v: v >= 1, "must be >= 1"),
    "parity_t": (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "peak_tflops": (lambda v: v > 0 and math.isfinite(v), "must be a finite number > 0"),
    "check_batch": (lambda v: v >= 1, "must be >= 1"),
    "seeds": (lambda v: len(v) >= 1, "give at least one seed"),
    "model_dir": (os.path.isdir, "no such folder"),
}
PATH_FLAGS = ("dmd2_ckpt", "prompts", "embeddings", "ckpt", "probe_prompts", "probe_encoder")  # must exist if given


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(args: argparse.Namespace) -> list[str]:
    """One line per bad value, before any model is loaded (the first is shown): the per-flag RULES, then what
    depends on several flags or on the filesystem."""
    given = vars(args)
    bad = [f"{flag(k)} {given[k]}: {what}" for k, (holds, what) in RULES.items()
           if given.get(k) is not None and not holds(given[k])]
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; checked here, before the process group starts
    if "batch_size" in given and args.grad_accum >= 1 and args.batch_size % (world * args.grad_accum):
        bad.append(f"--batch-size {args.batch_size} is not a multiple of ranks x --grad-accum "
                   f"= {world} x {args.grad_accum}")
    if given.get("allow_changes") and args.resume is None:
        bad.append("--allow-changes needs --resume (it lets a resumed run change its flags)")
    if given.get("stop_on_drift", 0) > 0 and not args.probe_every:
        bad.append("--stop-on-drift needs --probe-every N (the drift is measured by the probes)")
    if given.get("per_micro_coin") and (args.per_sample_coin or args.p_t_min > 0):
        bad.append("--per-micro-coin draws one coin per micro-batch: it excludes --per-sample-coin and --p-t-min")
    if given.get("iterations") is not None and args.fake_updates >= 0 and args.iterations < args.fake_updates + 2:
        bad.append(f"--iterations {args.iterations} gives no student update at --fake-updates {args.fake_updates} "
                   f"(FastGen runs iterations 1..N-1, the student on every {args.fake_updates + 1}th): need "
                   f">= {args.fake_updates + 2}")
    if "t_min" in given and not 0.0 <= args.t_min < args.t_max <= 1.0:
        bad.append(f"--t-min {args.t_min} / --t-max {args.t_max}: need 0 <= t-min < t-max <= 1")
    for k in PATH_FLAGS:
        v = given.get(k)
        if v is not None and not os.path.exists(v) and not (k != "prompts" and fastgen_prefix_exists(v)):
            bad.append(f"{flag(k)} {v}: no such file or folder")
    if given.get("out") is not None:
        try:
            check_writable(args.out, "--out")
        except ValueError as e:
            bad.append(str(e))
    held = run_files(args.out) if args.cmd == "train" else []  # check's --out is its report
    if held and args.resume is None and not args.overwrite:
        bad.append(held_run_error(args.out))
    if held and args.overwrite and holds_working_dir(args.out):
        bad.append(cannot_move_working_dir("--out", args.out))
    return bad + lora.check_lora_flags(args)


def add_clip_args(p: argparse.ArgumentParser, frames_help: str, fps_help: str | None,
                  size: tuple[int, int, int] = (81, 480, 832)) -> None:
    """The video geometry (frames, height, width; the paper's by default, 81 x 480 x 832 at 16 fps); no --fps when
    fps_help is None."""
    p.add_argument("--num-frames", type=int, default=size[0], help=frames_help)
    p.add_argument("--height", type=int, default=size[1], help="frame height in pixels (a multiple of 16)")
    p.add_argument("--width", type=int, default=size[2], help="frame width in pixels (a multiple of 16)")
    if fps_help is not None:
        p.add_argument("--fps", type=float, default=16.0, help=fps_help)


def add_probe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("probes", "sample fixed conditions and seeds with the current student (its EMA if any) "
                             "while training; see <out>/probes.jsonl and <out>/probes/*.png")
    g.add_argument("--probe-every", type=int, default=0, help="probe every N student steps, and once before the first "
                   "(0: no probes)")
    g.add_argument("--probe-prompts", help="prompts file (one per line) for the probes (Wan); default: the "
                   "conditions of the first --probe-count data samples")
    g.add_argument("--probe-count", type=int, default=2, help="data samples whose conditions the probes use")
    g.add_argument("--probe-seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="noise seeds per condition")
    g.add_argument("--probe-sampler", default="ode", choices=("ode", "renoise"), help="the few-step sampler "
                   "(ode: what the exported pipeline runs)")
    g.add_argument("--probe-encoder", help="local transformers image model (e.g. a CLIP folder) for the Eq. 11 "
                   "diversity across seeds")
    g.add_argument("--stop-on-drift", type=float, default=0.0, help="end the run, after a checkpoint, when a probe's "
                   "saturation or high-frequency energy moves by more than this fraction from the first probe "
                   "(0: never)")


def add_tracking_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tracking and throughput", "besides metrics.jsonl (docs/tools.md)")
    g.add_argument("--tracker", default=None, choices=("wandb", "tensorboard"),
                   help="also log to Weights & Biases or TensorBoard (<out>/tensorboard): every metrics.jsonl key, "
                        "probe grids and clips, the configuration; a resumed run continues the same record (default: "
                        "off; needs that package)")
    g.add_argument("--wandb-project", default="dfd", help="the wandb project of --tracker wandb (entity: WANDB_ENTITY; "
                   "WANDB_MODE=offline logs without an account)")
    g.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak TFLOP/s in the compute dtype, for "
                   "mfu_pct in the log (default: bf16 on a GPU of dfd_video/throughput.py's table; else no MFU)")


def add_sample_args(p: argparse.ArgumentParser, spec) -> None:
    add_common_args(p)
    p.add_argument("--ckpt", required=True, help="training checkpoint (step folder, run folder or `latest`) or any "
                   "--dmd2-ckpt format")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "student"),
                   help="auto: the EMA when the checkpoint has one")
    add_ckpt_trust_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file, one prompt per line (encoded with the base text encoder)")
    src.add_argument("--embeddings", help="safetensors with precomputed conditioning (as `prepare` stores it, [N, ...])")
    if spec.image_conditioned:
        p.add_argument("--images", nargs="+", help="conditioning image per prompt (or one for all prompts); "
                       "resized to cover --height x --width and centre-cropped like the training frames")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one video per prompt and seed")
    p.add_argument("--out", default="samples", help="output folder")
    add_clip_args(p, "frames per video (4k + 1)", "mp4 frame rate")
    p.add_argument("--student-ts", type=float, nargs="+", default=list(dfd.STUDENT_TS), help="sampler times")
    p.add_argument("--sampler", default="ode", choices=("ode", "renoise"),
                   help="ode: re-noise with the noise x_t implies (deterministic; FastGen's student_sample_type='ode' in "
                        "its Wan and Cosmos DMD2 configs, and what a diffusers pipeline with an Euler scheduler "
                        "computes); renoise: fresh noise between steps (FastGen's 'sde', DMD2's original sampler)")
    p.add_argument("--save-latents", action="store_true", help="also write the final latents next to each mp4")
    lora.add_lora_base_flag(p)
    spec.add_model_args(p, "sample")


def add_export_args(p: argparse.ArgumentParser, spec) -> None:
    p.add_argument("--model-dir", required=True, help="base model folder (architecture config)")
    p.add_argument("--ckpt", required=True, help="training checkpoint or any --dmd2-ckpt format")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "student"),
                   help="auto: the EMA of a training checkpoint when it has one")
    add_ckpt_trust_args(p)
    p.add_argument("--out", required=True, help="output folder (config.json + safetensors): new or empty, never "
                   "inside --model-dir")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out: it is renamed to "
                   "<out>.old-<date>-<time> once the new export is complete")
    p.add_argument("--student-ts", type=float, nargs="+", default=None,
                   help="the student's times, recorded with the export (Cosmos: its pipeline scheduler, out/scheduler; "
                        "default: the training run's, else the paper's)")
    lora.add_lora_base_flag(p)
    p.add_argument("--lora", action="store_true", help="from a --lora-rank run: also write the LoRA alone, "
                   "<out>/lora/" + lora.LORA_FILE + ", for Pipeline.load_lora_weights on the DMD2 student")
    spec.add_model_args(p, "export")


def add_prepare_args(p: argparse.ArgumentParser, spec) -> None:
    add_common_args(p)
    p.add_argument("--videos", required=True, help="folder of videos with sidecar .txt captions, or captions.csv / "
                   "captions.jsonl (columns video, caption); WebDataset tar shards as FastGen's video loader reads "
                   "them (keys mp4 and txt): a folder of .tar files (or WDS:<folder>), one .tar, or a quoted brace "
                   "pattern such as 'shards/{00000..00099}.tar'; or a Self-Forcing latent LMDB (SF-DFD's data; "
                   "docs/causal.md)")
    p.add_argument("--out", required=True, help="output data folder")
    add_clip_args(p, "frames per clip (4k + 1)", "frames are sampled at this rate from the start of each video")
    p.add_argument("--per-shard", type=int, default=64, help="samples per shard file")
    p.add_argument("--store-dtype", default="bf16", choices=("bf16", "fp32"), help="dtype of the stored tensors")
    p.add_argument("--vae-latent", default="sample", choices=("sample", "mode"),
                   help="how real videos become latents: sample = one posterior sample per video, seeded by its path "
                        "(FastGen's trainer encodes with a posterior sample, fresh at every step); mode = the "
                        "posterior mode (deterministic, what the diffusers pipelines use for a conditioning image)")
    p.add_argument("--negative-prompt", default=None,
                   help="text of CFG's unconditional branch, stored as the negative embedding the teacher is guided "
                        "against (default: FastGen's English Wan negative prompt, which its Wan and Cosmos DMD2 "
                        "configs feed; for a Self-Forcing LMDB --videos, SF-DFD's Chinese one; \"\": the diffusers "
                        "pipeline's default, \"\" for Wan, DEFAULT_NEGATIVE_PROMPT for Cosmos)")
    if spec.text_store:
        p.add_argument("--text", default="cache", choices=("cache", "online"),
                       help="cache: store one embedding per unique caption (103 MB each for the real Cosmos encoder); "
                            "online: store captions only, `train` encodes them with the sharded text encoder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted prepare into the same --out "
                   "(after its last complete shard; same videos, settings and number of ranks)")


class Parser(argparse.ArgumentParser):
    """argparse whose errors under torchrun are printed by rank 0 alone (distributed.wait_for_rank0)."""

    def error(self, message: str):
        wait_for_rank0()
        tell_torchrun(f"{self.prog}: error: {message}")
        super().error(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every default (but not None or False) and keeps the description's line breaks (launch lines)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not hidden and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


# subcommand: (module of its driver `run(spec, args)`, flags (a function here, or None: the module's add_args), help)
SUBCOMMANDS: dict[str, tuple[str, Any, str]] = {
    "prepare": ("dfd_video.prepare", add_prepare_args, "videos + captions -> latent shards"),
    "train": ("dfd_video.train", add_train_args, "DFD post-training (default)"),
    "sample": ("dfd_video.sample", add_sample_args, "checkpoint + prompts -> mp4s"),
    "export": ("dfd_video.export", add_export_args, "student -> diffusers transformer folder"),
    "evaluate": ("dfd_video.evaluation.evaluate", None, "sample folders -> diversity / camera / saturation / VBench "
                 "report"),
    "plot": ("dfd_video.evaluation.plot", None, "a run's metrics over steps -> one PNG"),
    "check": ("dfd_video.planning.check", None, "preflight before the first training job: checkpoint format and key "
              "coverage, teacher parity with the diffusers pipeline, a student sample with saturation and delta^2, "
              "estimated GPU memory per rank"),
    "plan": ("dfd_video.planning.plan", None, "GPU memory per rank of a planned train run, by part, and the largest "
             "batch per GPU that fits (no model loaded; docs/memory.md)"),
}

USAGE = """%(prog)s [train] --model-dir DIR --data DIR --dmd2-ckpt CKPT [flags]    (no subcommand: train)
       torchrun --nproc_per_node=N %(prog)s --model-dir DIR --data DIR --dmd2-ckpt CKPT [flags]
       %(prog)s check --model-dir DIR --dmd2-ckpt CKPT [--data DIR]    (preflight: run it first)
       %(prog)s plan --world-size N [--lora-rank r] [--gpu-gb 80]    (GPU memory per rank, no model loaded)
       %(prog)s {prepare,train,sample,export,evaluate,plot,check,plan} --help"""


def build_parser(spec, description: str = "", cmd: str | None = None, preset: str | None = None) -> argparse.ArgumentParser:
    """The command line: every subcommand listed, and the flags of `cmd` (all subcommands' when None; the optional
    layers' modules are imported only for theirs). description: the model script's docstring (--help shows its
    title and launch lines; from a line starting "Conventions" on it is left out)."""
    description = description.split("\nConventions")[0].strip()
    parser = Parser(description=description, usage=USAGE, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, title="subcommands", prog=parser.prog)
    for name, (module, add, helptext) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=helptext, description=helptext, formatter_class=HelpFormatter)
        if cmd in (None, name):
            (add or importlib.import_module(module).add_args)(sp, spec)
            if name in ("train", "check"):
                sp.set_defaults(**resolve_preset(spec, preset))
    return parser


def main(spec, argv: Sequence[str] | None = None, description: str = "") -> Any:
    """Parses argv (no subcommand means train), checks the flags, runs the subcommand's driver. Whatever stops it
    ends in one line (run_driver), which under torchrun is also the report's root cause (tell_torchrun)."""
    try:
        return _main(spec, argv, description)
    except SystemExit as e:
        tell_torchrun(e.code)
        raise


def _main(spec, argv: Sequence[str] | None, description: str) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    args = build_parser(spec, description, argv[0] if argv[0] in SUBCOMMANDS else "", preset_name(argv)).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.cmd][0])
    bad = check_args(args) if args.cmd not in ("evaluate", "plot") else []  # those two check their own flags
    bad += module.check_args(args) if hasattr(module, "check_args") else []
    family = model_family_error(spec, getattr(args, "model_dir", None))  # read from its JSON files alone
    bad += [family] if family else []
    if bad:
        wait_for_rank0()
        raise SystemExit("error: " + bad[0])
    try:
        spec = spec.resolve(args)  # e.g. the causal Wan for a Self-Forcing .pt
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    finished = False
    try:
        result = run_driver(module, spec, args)
        finished = True
        return result
    finally:
        teardown_distributed(finished)
        release_run_locks()


def run_driver(module, spec, args: argparse.Namespace) -> Any:
    """module.run(spec, args), with what a user causes or can fix as one line instead of a traceback: Ctrl-C (exit
    status 130; the driver's `interrupted(args)` says where it stopped) and a failed read or write (an OSError:
    the path, and for a full disk or a file-size limit the free space). The drivers and the file readers turn bad
    input and corrupt files into ValueErrors with one line themselves."""
    try:
        return module.run(spec, args)
    except KeyboardInterrupt:
        line = "error: interrupted (Ctrl-C)"
        if int(os.environ.get("RANK", "0")) == 0:  # every rank got the Ctrl-C; rank 0 says it
            where = module.interrupted(args) if hasattr(module, "interrupted") else ""
            line += f" {where}" if where else ""
            print(line, file=sys.stderr)
        tell_torchrun(line)
        raise SystemExit(130) from None
    except OSError as e:
        raise SystemExit("error: " + error_line(e)) from None


def tell_torchrun(code: Any) -> None:
    """Under torchrun, a rank's error line also goes to the file torchrun reads (TORCHELASTIC_ERROR_FILE), so the
    report it prints after the rank's line ends with the same line (as `traceback :` of the root cause) instead of a
    pointer to its docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or not isinstance(code, str):
        return
    report = {"message": {"message": code, "extraInfo": {"py_callstack": code, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(report, f)
    except OSError:
        pass  # torchrun's report then points to its docs, as without this
