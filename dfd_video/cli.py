"""The command line shared by wan_dfd.py and cosmos_dfd.py: every subcommand's flags, the checks run before any
model loads, and main(adapter)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import dfd
from dfd_video import lora
from dfd_video.check import run_check
from dfd_video.distributed import teardown_distributed, wait_for_rank0
from dfd_video.evaluate import run_evaluate
from dfd_video.files import check_writable
from dfd_video.plan import check_plan_args, run_plan
from dfd_video.plot import run_plot
from dfd_video.prepare import run_prepare
from dfd_video.runs import run_files
from dfd_video.sample import run_export, run_sample
from dfd_video.train import run_train
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


def add_train_args(p: argparse.ArgumentParser, check: bool = False) -> None:
    """The train flags; check=True for `check`, which takes them all (so a train command line can be pasted) with
    --data optional and --out the report file."""
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
    p.add_argument("--steps", type=int, default=100, help="student updates in total (paper, Wan DFD: 100 \"iterations\"; "
                   "FastGen counts every update of either network, so its 100 are 20 student updates: "
                   "docs/recipe.md)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch: ranks x grad-accum x per-rank batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update (each network)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW lr of the student (paper: 1e-5)")
    p.add_argument("--lr-fake", type=float, default=1e-5, help="AdamW lr of the fake score (paper: 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, both networks")
    p.add_argument("--p", type=float, default=0.5, help="P(teacher sees the real video) per student step, Eq. 10; "
                   "0 = plain DMD, 1 = DFD only")
    p.add_argument("--per-sample-coin", action="store_true", help="one DFD coin per sample instead of per step")
    p.add_argument("--p-t-min", type=float, default=0.0, help="beyond the paper: DFD only on samples whose DMD noise "
                   "level t >= this (p(t) = p there, 0 below; per-sample coins); 0: the paper's p at every t")
    p.add_argument("--space", default="x0", choices=("x0", "score"), help="x0: the authors' loss; score: Eq. 8 literally")
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
    p.add_argument("--ema", type=float, default=0.0, help="student EMA decay (0: no EMA)")
    p.add_argument("--seed", type=int, default=0, help="seeds data order, noise, t and the DFD coin")
    p.add_argument("--monitor-every", type=int, default=10, help="every N steps log teacher_gap (one extra teacher call)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N student steps and after the last "
                   "one (0: only after the last step)")
    p.add_argument("--keep", type=int, default=2, help="newest checkpoints kept in <out>/checkpoints")
    p.add_argument("--no-checkpointing", action="store_true", help="turn off activation checkpointing")
    lora.add_train_args(p)


def check_args(args: argparse.Namespace) -> None:
    """One line per bad value, before any model is loaded."""
    bad = []
    if hasattr(args, "p") and not 0.0 <= args.p <= 1.0:
        bad.append(f"--p {args.p}: must be in [0, 1]")
    if hasattr(args, "p_t_min") and not 0.0 <= args.p_t_min <= 1.0:
        bad.append(f"--p-t-min {args.p_t_min}: must be in [0, 1]")
    for name in ("steps", "batch_size", "grad_accum"):
        if hasattr(args, name) and getattr(args, name) < 1:
            bad.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; checked here, before the process group starts
    if hasattr(args, "batch_size") and args.grad_accum >= 1 and args.batch_size % (world * args.grad_accum):
        bad.append(f"--batch-size {args.batch_size} is not a multiple of ranks x --grad-accum "
                   f"= {world} x {args.grad_accum}")
    for name in ("lr", "lr_fake"):
        if hasattr(args, name) and not getattr(args, name) > 0:
            bad.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0")
    if hasattr(args, "fake_updates") and args.fake_updates < 0:
        bad.append(f"--fake-updates {args.fake_updates}: must be >= 0")
    if hasattr(args, "guidance") and args.guidance < 0:
        bad.append(f"--guidance {args.guidance}: must be >= 0")
    if hasattr(args, "ema") and not 0.0 <= args.ema < 1.0:
        bad.append(f"--ema {args.ema}: must be in [0, 1)")
    for name in ("per_shard", "keep"):
        if hasattr(args, name) and getattr(args, name) < 1:
            bad.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if getattr(args, "probe_every", 0) < 0 or getattr(args, "stop_on_drift", 0) < 0:
        bad.append("--probe-every / --stop-on-drift: must be >= 0 (0: off)")
    if getattr(args, "stop_on_drift", 0) > 0 and not args.probe_every:
        bad.append("--stop-on-drift needs --probe-every N (the drift is measured by the probes)")
    if getattr(args, "probe_count", 1) < 1 or getattr(args, "probe_seeds", [0]) == []:
        bad.append("--probe-count / --probe-seeds: need at least one condition and one seed")
    if hasattr(args, "monitor_every") and args.monitor_every < 0:
        bad.append(f"--monitor-every {args.monitor_every}: must be >= 0 (0: off)")
    if hasattr(args, "save_every") and args.save_every < 0:
        bad.append(f"--save-every {args.save_every}: must be >= 0")
    if hasattr(args, "t_min") and not 0.0 <= args.t_min < args.t_max <= 1.0:
        bad.append(f"--t-min {args.t_min} / --t-max {args.t_max}: need 0 <= t-min < t-max <= 1")
    ts = getattr(args, "student_ts", None)
    if ts is not None and (not all(0 < t <= 1 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:]))):
        bad.append(f"--student-ts {ts}: must be strictly decreasing values in (0, 1]")
    if hasattr(args, "num_frames") and (args.num_frames < 1 or (args.num_frames - 1) % 4):
        bad.append(f"--num-frames {args.num_frames}: must be 4k + 1 (the VAE compresses time 4x)")
    for name in ("height", "width"):
        if hasattr(args, name) and (getattr(args, name) < 16 or getattr(args, name) % 16):
            bad.append(f"--{name} {getattr(args, name)}: must be a positive multiple of 16")
    if hasattr(args, "fps") and not args.fps > 0:
        bad.append(f"--fps {args.fps}: must be > 0")
    if hasattr(args, "world_size") and args.world_size < 1:
        bad.append(f"--world-size {args.world_size}: must be >= 1")
    if hasattr(args, "parity_t") and not 0.0 < args.parity_t <= 1.0:
        bad.append(f"--parity-t {args.parity_t}: must be in (0, 1]")
    if hasattr(args, "check_batch") and args.check_batch < 1:
        bad.append(f"--check-batch {args.check_batch}: must be >= 1")
    if getattr(args, "seeds", None) is not None and not args.seeds:
        bad.append("--seeds: give at least one seed")
    for name in ("model_dir",):
        v = getattr(args, name, None)
        if v is not None and not os.path.isdir(v):
            bad.append(f"--model-dir {v}: no such folder")
    for name, flag in (("dmd2_ckpt", "--dmd2-ckpt"), ("prompts", "--prompts"), ("embeddings", "--embeddings"),
                       ("ckpt", "--ckpt"), ("probe_prompts", "--probe-prompts"), ("probe_encoder", "--probe-encoder")):
        v = getattr(args, name, None)
        if v is not None and not os.path.exists(v) and not (flag != "--prompts" and fastgen_prefix_exists(v)):
            bad.append(f"{flag} {v}: no such file or folder")
    if getattr(args, "out", None) is not None:
        try:
            check_writable(args.out, "--out")
        except ValueError as e:
            bad.append(str(e))
    held = run_files(args.out) if getattr(args, "cmd", None) == "train" else []  # check's --out is its report
    if held and args.resume is None and not args.overwrite:
        bad.append(f"--out {args.out} already holds a run ({', '.join(held)}): pass --resume to continue it, or "
                   f"--overwrite to move it to {os.path.normpath(args.out)}.old-<date>-<time> and start afresh")
    if held and args.overwrite and (os.getcwd() + os.sep).startswith(os.path.abspath(args.out) + os.sep):
        bad.append(f"--overwrite: --out {args.out} holds the working directory, which cannot be moved aside")
    bad += lora.check_args(args)
    if getattr(args, "cmd", None) == "plan":
        bad += check_plan_args(args)
    if bad:
        raise SystemExit("error: " + bad[0])


def add_check_args(p: argparse.ArgumentParser) -> None:
    add_train_args(p, check=True)
    p.add_argument("--world-size", type=int, default=8, help="ranks of the planned train run, for the memory "
                   "estimate (default 8: one node); check itself runs as one process")
    add_clip_args(p, "frames of the low-resolution parity / sample clip (without --data; with --data the data's "
                  "clip size is used)", None, (17, 240, 416))
    p.add_argument("--sampler", default="ode", choices=("ode", "renoise"),
                   help="the student sampler (as in `sample`): ode = the noise x_t implies (the authors' inference), "
                        "renoise = fresh noise between steps")
    p.add_argument("--parity-t", type=float, default=0.8, help="noise level t in (0, 1] of the teacher parity step")
    p.add_argument("--check-batch", type=int, default=2, help="clips from --data for delta^2")


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", nargs="+", required=True, help="one folder of prompt<i>_seed<s>.mp4 per method "
                   "(as `sample` writes them; >= 2 seeds per prompt, the paper uses 8)")
    p.add_argument("--names", nargs="+", help="method names for the table (default: the folder names)")
    p.add_argument("--clip", help="local CLIP folder (transformers format, e.g. clip-vit-large-patch14) for the "
                   "CLIP diversity columns")
    p.add_argument("--dino", help="local DINO folder (e.g. dinov2-large) for the DINO diversity columns")
    p.add_argument("--encoder", action="append", metavar="NAME=FOLDER",
                   help="any other transformers image model with a pooled output (repeatable)")
    p.add_argument("--poses", nargs="+", help="one folder of camera-to-world poses per --samples folder: "
                   "<stem>.npy [N, 4, 4], <stem>.npz or a ViPE output folder (pose/<stem>.npz)")
    p.add_argument("--relative-poses", action="store_true", help="express each video's poses in its first camera's "
                   "frame (T_0^-1 T_t) before the cross-seed distances; default: as the estimator wrote them")
    p.add_argument("--prompts", help="the prompts file given to `sample` (one per line): labels the report and figure")
    p.add_argument("--frames", type=int, default=16, help="evenly spaced frames per video for the features")
    p.add_argument("--figure-prompts", type=int, nargs="*", help="prompt indices for the seed-grid figure "
                   "(default: the first prompt; the flag alone: no figure)")
    vbench_models = {  # the VBench dimensions' models (docs/evaluation.md): a dimension without its model is skipped
        "--vbench-dino": ("DIR", "local DINO ViT-B/16 folder (transformers ViTModel, facebook/dino-vitb16) for VBench "
                          "subject consistency (and I2V subject with --i2v-images)"),
        "--vbench-clip": ("DIR", "local CLIP ViT-B/32 folder (openai/clip-vit-base-patch32) for VBench background "
                          "consistency"),
        "--aesthetic-head": ("FILE", "LAION aesthetic predictor linear head (sa_0_4_vit_l_14_linear.pth) for VBench "
                             "aesthetic quality, on --aesthetic-clip's embeddings"),
        "--aesthetic-clip": ("DIR", "local CLIP ViT-L/14 folder (openai/clip-vit-large-patch14) under "
                             "--aesthetic-head (default: --clip)"),
        "--vbench-dreamsim": ("DIR", "local DreamSim cache folder (the ensemble checkpoint unpacked, and DINO's "
                              "backbone in checkpoints/) for VBench I2V background, with --i2v-images"),
        "--amt": ("FILE", "AMT-S weights (amt-s.pth, as VBench downloads it) for VBench motion smoothness"),
        "--raft": ("FILE", "RAFT weights (raft-things.pth from the RAFT release) for VBench dynamic degree"),
        "--musiq": ("FILE", "pyiqa's MUSIQ weights trained on SPAQ (musiq_spaq_ckpt-358bb6af.pth) for VBench "
                    "imaging quality")}
    for flag, (metavar, text) in vbench_models.items():
        p.add_argument(flag, metavar=metavar, help=text)
    p.add_argument("--temporal-flickering", action="store_true", help="VBench temporal flickering (model-free; "
                   "every frame of every video is decoded)")
    p.add_argument("--i2v-images", nargs="+", metavar="FILE", help="the conditioning image per prompt (in prompt "
                   "order, or one for all) given to `sample --images`: adds VBench I2V subject (with --vbench-dino) "
                   "and I2V background (with --vbench-dreamsim)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="where the encoders run")
    p.add_argument("--out", default="eval", help="output folder")
    p.add_argument("--no-cache", action="store_true", help="do not keep per-video features and statistics in "
                   "<out>/cache (kept by default: a rerun, e.g. with one more --samples folder or after a kill, "
                   "decodes and encodes only the videos it has not seen)")


def add_clip_args(p: argparse.ArgumentParser, frames_help: str, fps_help: str | None,
                  size: tuple[int, int, int] = (81, 480, 832)) -> None:
    """The video geometry (frames, height, width; the paper's by default, 81 x 480 x 832 at 16 fps); no --fps when
    fps_help is None."""
    p.add_argument("--num-frames", type=int, default=size[0], help=frames_help)
    p.add_argument("--height", type=int, default=size[1], help="frame height in pixels (a multiple of 16)")
    p.add_argument("--width", type=int, default=size[2], help="frame width in pixels (a multiple of 16)")
    if fps_help is not None:
        p.add_argument("--fps", type=float, default=16.0, help=fps_help)


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default=None, help="a diffusers model folder (or transformer folder) whose "
                   "config.json sets the architecture (default: the public config of the model, dfd_video/configs/)")
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
    p.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GiB (an \"80 GB\" A100 "
                   "has 80 GiB)")
    p.add_argument("--reserve-gb", type=float, default=6.0, help="GiB per GPU kept free for what is not modelled: "
                   "the CUDA context, NCCL buffers, the allocator's fragmentation")
    p.add_argument("--table", action="store_true", help="print the tables of docs/memory.md (full weights and LoRA "
                   "r = 16, 64 on 1, 2, 4, 8 GPUs of 24, 48, 80 GiB) for the other flags' clip and settings")


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


def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a training run folder (train's --out)")
    p.add_argument("--out", help="the PNG to write (default: <run>/metrics.png)")


def add_sample_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    p.add_argument("--ckpt", required=True, help="training checkpoint (step folder, run folder or `latest`) or any "
                   "--dmd2-ckpt format")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "student"),
                   help="auto: the EMA when the checkpoint has one")
    add_ckpt_trust_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file, one prompt per line (encoded with the base text encoder)")
    src.add_argument("--embeddings", help="safetensors with precomputed conditioning (as `prepare` stores it, [N, ...])")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one video per prompt and seed")
    p.add_argument("--out", default="samples", help="output folder")
    add_clip_args(p, "frames per video (4k + 1)", "mp4 frame rate")
    p.add_argument("--student-ts", type=float, nargs="+", default=list(dfd.STUDENT_TS), help="sampler times")
    p.add_argument("--sampler", default="ode", choices=("ode", "renoise"),
                   help="ode: re-noise with the noise x_t implies (deterministic; FastGen's student_sample_type='ode' in "
                        "its Wan and Cosmos DMD2 configs, and what a diffusers pipeline with an Euler scheduler "
                        "computes); renoise: fresh noise between steps (FastGen's 'sde', DMD2's original sampler)")
    p.add_argument("--save-latents", action="store_true", help="also write the final latents next to each mp4")
    lora.add_sample_args(p)


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", required=True, help="base model folder (architecture config)")
    p.add_argument("--ckpt", required=True, help="training checkpoint or any --dmd2-ckpt format")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "student"),
                   help="auto: the EMA of a training checkpoint when it has one")
    add_ckpt_trust_args(p)
    p.add_argument("--out", required=True, help="output folder (config.json + safetensors)")
    lora.add_export_args(p)


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    p.add_argument("--videos", required=True, help="folder of videos with sidecar .txt captions, or captions.csv / "
                   "captions.jsonl (columns video, caption)")
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
                        "configs feed; \"\": the diffusers pipeline's default, \"\" for Wan, DEFAULT_NEGATIVE_PROMPT "
                        "for Cosmos)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted prepare into the same --out "
                   "(after its last complete shard; same videos, settings and number of ranks)")


class Parser(argparse.ArgumentParser):
    """argparse whose errors under torchrun are printed by rank 0 alone (distributed.wait_for_rank0)."""

    def error(self, message: str):
        wait_for_rank0()
        super().error(message)


SUBCOMMANDS = ("prepare", "train", "sample", "export", "evaluate", "plot", "check", "plan")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every default (but not None or False) and keeps the description's line breaks (launch lines)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not hidden and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


USAGE = """%(prog)s [train] --model-dir DIR --data DIR --dmd2-ckpt CKPT [flags]    (no subcommand: train)
       torchrun --nproc_per_node=N %(prog)s --model-dir DIR --data DIR --dmd2-ckpt CKPT [flags]
       %(prog)s check --model-dir DIR --dmd2-ckpt CKPT [--data DIR]    (preflight: run it first)
       %(prog)s plan --world-size N [--lora-rank r] [--gpu-gb 80]    (GPU memory per rank, no model loaded)
       %(prog)s {prepare,train,sample,export,evaluate,plot,check,plan} --help"""


def build_parser(adapter, description: str = "") -> argparse.ArgumentParser:
    """Every subcommand's flags, the adapter's own included. description: the adapter script's docstring (--help
    shows its title and launch lines; from a line starting "Conventions" on it is left out)."""
    description = description.split("\nConventions")[0].strip()
    parser = Parser(description=description, usage=USAGE, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, title="subcommands", prog=parser.prog)
    for name, add, helptext in (("prepare", add_prepare_args, "videos + captions -> latent shards"),
                                ("train", add_train_args, "DFD post-training (default)"),
                                ("sample", add_sample_args, "checkpoint + prompts -> mp4s"),
                                ("export", add_export_args, "student -> diffusers transformer folder"),
                                ("evaluate", add_evaluate_args, "sample folders -> diversity / camera / saturation "
                                 "report"),
                                ("plot", add_plot_args, "a run's metrics over steps -> one PNG"),
                                ("check", add_check_args, "preflight before the first training job: checkpoint "
                                 "format and key coverage, teacher parity with the diffusers pipeline, a student "
                                 "sample with saturation and delta^2, estimated GPU memory per rank"),
                                ("plan", add_plan_args, "GPU memory per rank of a planned train run, by part, and the "
                                 "largest batch per GPU that fits (no model loaded; docs/memory.md)")):
        sp = sub.add_parser(name, help=helptext, description=helptext, formatter_class=HelpFormatter)
        add(sp)
        if name in ("train", "check"):  # check takes a pasted train command line
            add_probe_args(sp)
        if hasattr(adapter, "add_args"):  # the adapter's own flags and defaults
            adapter.add_args(name, sp)
    return parser


def main(adapter, argv: Sequence[str] | None = None, description: str = "") -> Any:
    """Parses argv (no subcommand means train), checks the flags, runs the subcommand's driver."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    args = build_parser(adapter, description).parse_args(argv)
    if hasattr(adapter, "configure"):
        adapter.configure(args)
    if args.cmd not in ("evaluate", "plot"):  # these check their own flags
        try:
            check_args(args)
        except SystemExit:
            wait_for_rank0()
            raise
    run = {"prepare": run_prepare, "train": run_train, "sample": run_sample, "export": run_export,
           "evaluate": run_evaluate, "plot": run_plot, "check": run_check, "plan": run_plan}[args.cmd]
    finished = False
    try:
        result = run(adapter, args)
        finished = True
        return result
    finally:
        teardown_distributed(finished)
