"""The `train` subcommand (the default): DFD post-training (dfd.train) under FSDP2, with checkpoints and --resume.

run() reads top to bottom: the run folder and what --resume restores, the four networks (teacher, student, fake
score, EMA), the optimizers, the data stream, then dfd.train with a logger and a checkpointer."""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

import dfd
from dfd_video import lora
from dfd_video.data import LatentShards, online_text_encoder
from dfd_video.distributed import (Dist, compute_dtype, full_state_dict, mean_over_ranks, on_main_rank,
                                   peak_memory_gb, set_full_state_dict, setup_distributed, shard)
from dfd_video.files import fail
from dfd_video.length import DEFAULT_ITERATIONS, RunLength, resolve
from dfd_video.runs import (MetricLog, accept_resume, claim_run_folder, data_fingerprint, latest_checkpoint,
                           load_checkpoint, read_weights, record_segment, save_checkpoint, set_rng_state,
                           where_it_stopped)
from dfd_video.spec import model_options
from dfd_video.throughput import open_throughput
from dfd_video.weights import describe_dmd2, describe_lines, fit_state_dict, read_checkpoint, read_raw


class StopRun(Exception):
    """Raised from the step callback to end the run after a checkpoint (--stop-on-drift)."""


def dfd_config(args: argparse.Namespace) -> dfd.DFDConfig:
    """The method settings (dfd.DFDConfig) from the train flags."""
    return dfd.DFDConfig(p=args.p, per_sample_coin=args.per_sample_coin, p_t_min=args.p_t_min, space=args.space,
                         fake_loss=args.fake_loss,
                         fake_updates=args.fake_updates, grad_accum=args.grad_accum,
                         student_ts=tuple(args.student_ts), backward_sim=args.backward_sim, t_min=args.t_min,
                         t_max=args.t_max, t_shift=args.t_shift, grad_clip=args.grad_clip,
                         grad_clip_fake=args.grad_clip_fake, ema=args.ema, zero_nonfinite=args.zero_nonfinite_grads,
                         seed=args.seed, monitor_every=args.monitor_every, **recipe_config(args))


def recipe_config(args: argparse.Namespace) -> dict:
    """The DFDConfig fields of add_recipe_args' flags (SF-DFD's recipe), at dfd's defaults when not given."""
    return dict(per_micro_coin=args.per_micro_coin, t_clamp=tuple(args.t_clamp) if args.t_clamp else None)


@dataclass
class Resume:
    """What --resume restores: the step folder, its weights (LoRA runs only: the adapters; full weights are read
    network by network on rank 0), and state.pt less the optimizer states (step, data position, RNG, LoRA)."""
    folder: str
    lora_weights: dict
    state: dict
    optim: dict | None  # rank 0: both optimizers' full states; None elsewhere
    changes: dict  # flags this command changes, allowed by --allow-changes (runs.accept_resume)


def read_resume(args: argparse.Namespace, d: Dist, spec) -> Resume | None:
    """--resume's step folder and state. state.pt holds both optimizers' full states (16 bytes per trained parameter):
    rank 0 alone reads it and later streams each rank its shards; the other ranks get the rest."""
    if args.resume is None:
        return None
    folder = latest_checkpoint(args.out if args.resume == "latest" else args.resume)
    full = on_main_rank(d, lambda: load_checkpoint(folder, weights=False)[1])
    state = on_main_rank(d, lambda: {k: v for k, v in full.items() if k != "optim"}, share=True)
    weights = load_checkpoint(folder, state=False)[0] if args.lora_rank else {}
    lora.check_resume(args, state, folder, spec)
    changes = accept_resume(args, state, folder, d.main)
    return Resume(folder, weights, state, full["optim"] if d.main else None, changes)


def run_length(spec, args: argparse.Namespace, resume: Resume | None) -> RunLength:
    """The run's length in its unit (dfd_video.length); a resumed run keeps the unit it was started with (a checkpoint
    from before the unit existed counted student steps)."""
    saved = None
    if resume is not None:
        st = resume.state
        saved = st.get("length") or {"unit": "student_steps", "count": st.get("args", {}).get("steps", st["step"] + 1)}
    try:
        length = resolve(args, spec.defaults.get("iterations", DEFAULT_ITERATIONS), saved)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return length


def check_left(resume: Resume, length: RunLength, start: int) -> None:
    """A resumed run must have steps left, and cannot continue past FastGen's trailing fake-score updates."""
    if resume.state.get("tail_done"):
        raise SystemExit(f"error: --resume: {resume.folder} ends its run with the trailing fake-score updates after "
                         "the last student update (FastGen's loop stops inside a cycle); it cannot be continued")
    if start >= length.lines:
        raise SystemExit(f"error: --resume: checkpoint is at {length.name(start - 1)}, nothing left of {length.flag()}")


@dataclass
class Networks:
    teacher: torch.nn.Module
    student: torch.nn.Module
    fake: torch.nn.Module
    ema: torch.nn.Module | None
    lora: lora.LoraNets | None = None
    desc: dict | None = None  # describe_dmd2's answer (a fresh run)


def build_network(spec, args: argparse.Namespace, d: Dist, dtype, weights: Callable[[], dict] | None, source: str,
                  trainable: bool, mixed: bool = True, convert: bool = True,
                  checkpoint: bool | None = None) -> torch.nn.Module:
    """One network, sharded before it holds any weight: every rank builds it on the meta device and allocates only
    its own shard; rank 0 alone reads the full state dict (weights(), or the base model's when None) and streams it
    to the others tensor by tensor. So no rank but 0 ever holds a full copy, and rank 0 one at a time
    (bench/bench_host_memory.py). mixed=False: fp32 compute (the EMA). checkpoint: activation checkpointing
    (None: for the trained networks; the teacher too when the GAN backpropagates through it)."""
    net = spec.load_network(args.model_dir, meta=True)

    def read() -> dict:  # rank 0; a ValueError here stops every rank with its one line
        sd = weights() if weights is not None else read_raw(args.model_dir)  # the base model's transformer
        sd = fit_state_dict(net, sd, source, spec.convert_state_dict if convert else None)
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # the sharded params' dtype
    full = on_main_rank(d, read)
    checkpointing = not args.no_checkpointing and (trainable if checkpoint is None else checkpoint) and mixed
    net = shard(net, spec.blocks(net), d, dtype if mixed else None, spec.fp32_islands(net) if mixed else None,
                checkpointing, trainable)
    net.to_empty(device=d.device)
    spec.init_buffers(net, d.device)
    set_full_state_dict(net, full or {}, from_rank0=True)
    return net


def build_networks(spec, args: argparse.Namespace, d: Dist, dtype, resume: Resume | None) -> Networks:
    """The teacher from --model-dir; student, fake score and EMA from the DMD2 checkpoint (its generator and critic,
    describe_dmd2) or from --resume; with --lora-rank, frozen bases and adapters (dfd_video/lora.py)."""
    desc = None
    if resume is None:
        desc = describe_dmd2(args.dmd2_ckpt, args.init_from, args.fake_init, args.bidirectional_ckpt,
                             args.rectified_flow_ckpt)
        if desc["refusals"]:
            raise ValueError(desc["refusals"][0])
        if d.main:
            lines = describe_lines(desc, args.gan_weight > 0) + ([spec.describe_student] if spec.describe_student else [])
            lines += [f"  EMA        <- {ema_source(args, desc)[1]}"] if args.ema > 0 else []
            print("\n".join(lines), file=sys.stderr)
    if args.lora_rank:
        nets = lora.build_networks(spec, args, (resume.lora_weights, resume.state) if resume else None, d, dtype,
                                   not args.no_checkpointing, desc)
        return Networks(nets.teacher, nets.student, nets.fake, nets.ema, nets, desc)
    build = lambda *a, **kw: build_network(spec, args, d, dtype, *a, **kw)
    teacher = build(None, f"--model-dir {args.model_dir}", False, checkpoint=args.gan_weight > 0)
    if resume is None:
        s, f = desc["networks"]["student"], desc["networks"]["fake_score"]
        student_w = lambda: read_checkpoint(s["source"], s["role"])
        critic_w = (lambda: read_checkpoint(f["source"], f["role"])) if f else None
        student = build(student_w, f"{s['source']} (student)", True)
        e = ema_source(args, desc)[0]
        ema_w = lambda: read_checkpoint(e["source"], e["role"])
        ema = build(ema_w, f"{e['source']} (EMA)", False, mixed=False) if args.ema > 0 else None
        fake = build(critic_w, f"{f['source']} (critic)" if f else "teacher", True)
        return Networks(teacher, student, fake, ema, desc=desc)
    src = f"--resume {resume.folder}"
    saved = lambda name: lambda: read_weights(resume.folder, name)
    student = build(saved("student"), f"{src} (student)", True, convert=False)
    # a run that turns the EMA on at resume starts it from the student
    ema_w = lambda: read_weights(resume.folder, "ema") or read_weights(resume.folder, "student")
    ema = build(ema_w, f"{src} (EMA)", False, mixed=False, convert=False) if args.ema > 0 else None
    fake = build(saved("fake"), f"{src} (fake)", True, convert=False)
    return Networks(teacher, student, fake, ema)


def ema_source(args: argparse.Namespace, desc: dict) -> tuple[dict, str]:
    """Where a fresh run's EMA starts (describe_dmd2's entry, and the line train logs): --ema-init checkpoint takes
    the checkpoint's own EMA when it has one (SF-DFD restores Self-Forcing's generator_ema), else the student."""
    own = desc["networks"]["ema"]
    if getattr(args, "ema_init", "student") == "checkpoint" and own is not None:
        return own, f"the checkpoint's EMA, {own['source']} [{own['role']}]"
    note = " (--ema-init checkpoint: the checkpoint has no EMA)" if getattr(args, "ema_init", "") == "checkpoint" else ""
    return desc["networks"]["student"], "the student's starting weights" + note


def restore_optimizers(resume: Resume, trained: dict, opts: dict, d: Dist, per_rank: int) -> tuple[int, int]:
    """Loads the optimizers' states (rank 0 streams each rank its shards; trained: the network of each optimizer) and
    the RNG; returns (first step, data position). A different global batch is refused; a different rank count is
    said."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    st = resume.state
    if st.get("world") is not None and st["world"] * st.get("per_rank_batch", per_rank) != d.world * per_rank:
        raise SystemExit(f"error: --resume: checkpoint used global batch {st['world'] * st['per_rank_batch']}, "
                         f"this run {d.world * per_rank}")
    if st.get("world") not in (None, d.world) and d.main:
        print(f"--resume: the checkpoint was written by {st['world']} ranks, this run has {d.world}: same global "
              "batch and data, but the sums run in another order, so the weights will be close to an unbroken "
              "run's, not bit-identical", file=sys.stderr)
    saved = on_main_rank(d, lambda: sorted(resume.optim), share=True)
    for name, opt in opts.items():
        if name not in saved:  # a discriminator new at this resume: its optimizer starts afresh
            continue
        set_optimizer_state_dict(trained[name], opt, resume.optim[name] if d.main else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    resume.optim = None
    set_rng_state(st["rng"])
    return st["step"] + 1, st["position"]


def open_data(spec, args: argparse.Namespace, d: Dist, dtype, teacher_net) -> LatentShards:
    """The prepared data, checked against the network; for captions stored without embeddings (--text online), the
    text encoder that embeds them while training."""
    data = LatentShards(args.data, spec.data_keys)
    spec.check_data(data.shapes, teacher_net)
    if data.prompts is not None and data.prompts.online:
        data.prompts.encoder = online_text_encoder(spec, args.model_dir, d, dtype or torch.float32)
    return data


class Progress:
    """dfd.train's callbacks: `log` (metrics.jsonl with the step's time, memory, lr, samples, FastGen iterations and
    throughput; the --tracker) and `step_end` (the LoRA EMA, probes, checkpoints every --save-every steps and after
    the last)."""

    def __init__(self, spec, args, d: Dist, nets: Networks, opts: dict, start: int, position: int, per_rank: int,
                 saved: str | None, probes: Any, length: RunLength, disc: torch.nn.Module | None = None):
        self.spec, self.args, self.d, self.nets, self.opts = spec, args, d, nets, opts
        self.start, self.position, self.per_rank, self.probes = start, position, per_rank, probes
        self.length, self.disc = length, disc
        self.data_manifest = data_fingerprint(args.data) if d.main else None  # state.pt's record (rank 0 writes it)
        self.metrics = MetricLog(os.path.join(args.out, "metrics.jsonl"), length.lines, start, d.main)
        self.last_saved, self.last_logs = saved, {}
        self.clock = time.perf_counter()
        self.sampler = None  # the denoiser probes sample with (the EMA's if any)
        self.throughput = None  # dfd_video.throughput.Throughput: samples/s, tokens/s, TFLOP/s, MFU
        self.tracker = None  # rank 0 with --tracker: a dfd_video.tracking.Tracker

    def drawn(self, step: int) -> int:
        """Micro-batches dfd.train draws from the run's start through step `step` (-1: none): one per network
        update and accumulation round."""
        return self.length.iteration(step) * self.args.grad_accum if step >= 0 else 0

    def log(self, step: int, logs: dict) -> None:
        now = time.perf_counter()
        logs = mean_over_ranks(logs, self.d.device)
        logs.update(step_time_s=now - self.clock, peak_mem_gb=peak_memory_gb(self.d.device),
                    lr=self.opts["student"].param_groups[0]["lr"],
                    samples=self.drawn(step) * self.per_rank * self.d.world,
                    iteration=self.length.iteration(step), student_updates=self.length.updates(step))
        if self.throughput is not None:
            logs.update(self.throughput(step, logs["step_time_s"]))
        self.clock = now
        self.last_logs = {"step": step, **logs}
        self.metrics(step, logs)
        if self.tracker is not None:
            self.tracker.log(step, logs)

    def track_probe(self) -> None:
        """The probe just taken (rank 0): statistics, seed grid and clip, to the --tracker."""
        if self.tracker is not None and self.probes is not None and self.probes.last is not None:
            self.tracker.probe(self.probes.last)

    def step_end(self, step: int) -> None:
        a, nets = self.args, self.nets
        if nets.lora and nets.lora.ema is not None and step < self.length.student_steps:  # dfd.train got ema=None
            nets.lora.ema.update(a.ema)
        drift = None
        if self.probes is not None and step < self.length.student_steps and self.probes.due(step):
            drift = self.probes(step, self.sampler)
            self.track_probe()
            self.clock = time.perf_counter()  # the probe is not the next step's time (throughput)
        if (a.save_every and (step + 1) % a.save_every == 0) or step + 1 == self.length.lines or drift:
            self.save(step)
            self.clock = time.perf_counter()  # do not bill the save (or the probe) to the next step
        if drift:
            raise StopRun(f"stopped after student step {step}: {drift}; checkpoint {self.last_saved}")

    def save(self, step: int) -> None:
        nets, a, n = self.nets, self.args, self.length
        weights = {"student": nets.student, "fake": nets.fake, **({"ema": nets.ema} if nets.ema is not None else {}),
                   **({"discriminator": self.disc} if self.disc is not None else {})}
        extra = {"position": self.drawn(step) - self.drawn(self.start - 1) + self.position, "world": self.d.world,
                 "per_rank_batch": self.per_rank, "adapter": self.spec.name, "args": vars(a),
                 "length": {"unit": n.unit, "count": n.count}, "iteration": n.iteration(step),
                 "student_updates": n.updates(step), "tail_done": step >= n.student_steps,
                 "data_manifest": self.data_manifest}
        if nets.lora:
            extra["lora"] = nets.lora.info
        of = None  # LoRA runs save their adapters, and the discriminator whole
        if nets.lora:
            of = lambda net: full_state_dict(net) if net is self.disc else lora.adapter_state_dict(net)
        self.last_saved = save_checkpoint(a.out, step, weights, self.opts, extra, self.d, a.keep, weights_of=of,
                                          name=n.name(step))


def interrupted(args: argparse.Namespace) -> str:
    """What cli.main adds to the line of an interrupted train: the last step done and the checkpoint to resume."""
    return where_it_stopped(args.out)


def open_probes(spec, args, d: Dist, data: LatentShards, start: int, dtype, length: RunLength):
    """The training probes (--probe-every; the evaluation layer, imported only when asked for)."""
    if args.probe_every <= 0:
        return None
    from dfd_video.evaluation.probes import open_probes as open_
    return open_(spec, args, d, data, start, dtype, length)


def open_tracker(spec, args, d: Dist, start: int):
    """--tracker (rank 0; the optional layer dfd_video.tracking, imported only when asked for), resumed at `start`."""
    from dfd_video.tracking import open_tracker as open_
    config = {**vars(args), "world": d.world, "adapter": spec.name}
    return open_(args.tracker, args.out, config, start, args.wandb_project)


def check_args(args: argparse.Namespace) -> list[str]:
    """Before any model loads (every rank): the --tracker package is installed."""
    if getattr(args, "tracker", None) is None:
        return []
    from dfd_video.tracking import missing_package
    line = missing_package(args.tracker)
    return [line] if line else []


def open_gan(spec, args: argparse.Namespace, d: Dist, dtype, nets: Networks, resume: Resume | None, options: dict):
    """DMD2's GAN head (--gan-weight > 0; dfd_video.gan, imported only then): the discriminator and its optimizer,
    and the teacher's features it reads (the teacher's unguided branch; its LoRA switched off when it carries the fake
    score's)."""
    from dfd_video import gan
    features_of = spec.denoiser(nets.teacher, None, None, dtype, **options)
    if nets.lora:
        features_of = nets.lora.teacher_denoiser(features_of)
    return gan.open_gan(spec, args, d, dtype, nets.teacher, features_of, nets.desc, resume.folder if resume else None,
                        dfd_config(args))


def log_recipe(spec, args: argparse.Namespace, d: Dist, net, length: RunLength) -> None:
    """Rank 0: the run length in both units, and where this run's flags differ from FastGen's DMD2 config for the
    architecture (e.g. its Wan 14B students take 2 steps)."""
    if not d.main:
        return
    lines = [f"run length: {length.describe()}"]
    recipe = spec.fastgen_recipe(net)
    if recipe is not None:
        ours = {"--guidance": (args.guidance, recipe.guidance), "--lr": (args.lr, recipe.lr),
                "--lr-fake": (args.lr_fake, recipe.lr), "--student-ts": (tuple(args.student_ts), recipe.student_ts)}
        diff = [f"{k} {v[0]} (FastGen: {v[1]})" for k, v in ours.items() if v[0] != v[1]]
        if diff:
            lines.append(f"warning: FastGen's {recipe.config} differs from this run: {', '.join(diff)}; a DMD2 "
                         "checkpoint trained with it expects FastGen's values")
    print("\n".join(lines), file=sys.stderr)


def run(spec, args: argparse.Namespace) -> dict:
    """DFD post-training (dfd.train) with FSDP2, checkpoints and resume. Returns the last logged metrics."""
    d = setup_distributed(args.device)
    per_rank = args.batch_size // (d.world * args.grad_accum)  # a multiple: cli.check_args
    if args.resume is None and args.dmd2_ckpt is None:
        raise SystemExit("error: --dmd2-ckpt is required (DFD post-trains a DMD2 student; or pass --resume)")
    on_main_rank(d, lambda: claim_run_folder(args.out, args.overwrite, args.resume is not None))
    dtype = compute_dtype(args.dtype, d.device)
    options = model_options(spec, args)
    adversary = None
    try:
        resume = read_resume(args, d, spec)
        length = run_length(spec, args, resume)
        arch = spec.load_network(args.model_dir, meta=True)  # the architecture alone: data checks, FLOP count
        data = open_data(spec, args, d, dtype, arch)
        log_recipe(spec, args, d, arch, length)
        nets = build_networks(spec, args, d, dtype, resume)
        if args.gan_weight > 0:
            adversary = open_gan(spec, args, d, dtype, nets, resume, options)
        probes = open_probes(spec, args, d, data, resume.state["step"] + 1 if resume else 0, dtype, length)
    except ValueError as e:
        raise fail(e)
    uncond = {k: v.to(d.device) for k, v in data.negative.items()} if data.negative else None
    teacher = spec.denoiser(nets.teacher, args.guidance, uncond, dtype, **options)
    if nets.lora:
        teacher = nets.lora.teacher_denoiser(teacher)
    student, fake = spec.denoiser(nets.student, dtype=dtype, **options), spec.denoiser(nets.fake, dtype=dtype, **options)
    ema = spec.denoiser(nets.ema, dtype=dtype, **options) if nets.ema is not None else None
    adamw = lambda net, lr: torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=lr,
                                              betas=(args.adam_beta1, 0.999), weight_decay=args.weight_decay)
    opts = {"student": adamw(nets.student, args.lr), "fake": adamw(nets.fake, args.lr_fake)}
    trained = {"student": nets.student, "fake": nets.fake}
    if adversary is not None:
        opts["discriminator"], trained["discriminator"] = adversary.opt, adversary.disc
    start, position = restore_optimizers(resume, trained, opts, d, per_rank) if resume else (0, 0)
    if resume is not None:
        check_left(resume, length, start)
    stream = data.batches(position, per_rank, d.rank, d.world, args.seed)
    batches = (spec.make_batch({k: v.to(d.device) for k, v in item.items()}, d.device) for item in stream)
    if d.main:
        record_segment(args.out, {**vars(args), "unit": length.unit, "length": length.count}, start,
                       resume.folder if resume else None, resume.changes if resume else {})
    progress = Progress(spec, args, d, nets, opts, start, position, per_rank, resume.folder if resume else None, probes,
                        length, adversary.disc if adversary is not None else None)
    progress.sampler = ema or student
    progress.throughput = open_throughput(spec, args, arch, data.shapes["latents"], per_rank, d.world, d.device, dtype,
                                          d.main)
    if args.tracker:
        progress.tracker = on_main_rank(d, lambda: open_tracker(spec, args, d, start))
    # FSDP2 warns that the transformer returns a view; the adapters never modify outputs in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if probes is not None and resume is None:
        probes(-1, progress.sampler)  # the starting checkpoint: the reference of --stop-on-drift
        progress.track_probe()
    progress.clock = time.perf_counter()  # the first step's time: not the set-up's, nor the first probe's
    try:
        dfd.train(student, teacher, fake, opts["student"], opts["fake"], batches, length.student_steps,
                  dfd_config(args), start_step=start, rank=d.rank, ema=None if nets.lora else ema, log=progress.log,
                  on_step_end=progress.step_end, generate=spec.generate(tuple(args.student_ts)), adversary=adversary,
                  tail=length.tail)
    except FloatingPointError as e:
        where = (f"the last good checkpoint {progress.last_saved} is untouched" if progress.last_saved
                 else "no checkpoint was written")
        raise SystemExit(f"error: training stopped: {e}; {where}")
    except StopRun as e:
        raise SystemExit(f"error: --stop-on-drift: {e}")
    finally:
        progress.metrics.close()
        if progress.tracker is not None:
            progress.tracker.close()
    if d.main:
        print(f"trained {length.describe()}: last checkpoint {progress.last_saved}, metrics "
              f"{os.path.join(args.out, 'metrics.jsonl')}", file=sys.stderr)
    return progress.last_logs
