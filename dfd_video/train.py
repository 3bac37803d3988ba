"""The `train` subcommand (the default): DFD post-training (dfd.train) under FSDP2, with checkpoints and --resume."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

import dfd
from dfd_video.data import LatentShards
from dfd_video.distributed import compute_dtype, mean_over_ranks, peak_memory_gb, setup_distributed, shard
from dfd_video.files import fail
from dfd_video.probes import Drift, open_probes
from dfd_video.runs import MetricLog, latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from dfd_video.weights import load_weights, read_checkpoint


def dfd_config(args: argparse.Namespace) -> dfd.DFDConfig:
    """The method settings (dfd.DFDConfig) from the train flags."""
    return dfd.DFDConfig(p=args.p, per_sample_coin=args.per_sample_coin, space=args.space,
                         fake_updates=args.fake_updates, grad_accum=args.grad_accum,
                         student_ts=tuple(args.student_ts), backward_sim=args.backward_sim, t_min=args.t_min,
                         t_max=args.t_max, t_shift=args.t_shift, grad_clip=args.grad_clip, ema=args.ema,
                         seed=args.seed, monitor_every=args.monitor_every)


def run_train(adapter, args: argparse.Namespace) -> dict:
    """DFD post-training (dfd.train) with FSDP2, checkpoints and resume. Returns the last logged metrics."""
    d = setup_distributed(args.device)
    per_rank, rem = divmod(args.batch_size, d.world * args.grad_accum)
    if rem or per_rank < 1:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not a multiple of ranks x --grad-accum "
                         f"= {d.world} x {args.grad_accum}")
    if args.resume is None and args.dmd2_ckpt is None:
        raise SystemExit("error: --dmd2-ckpt is required (DFD post-trains a DMD2 student; or pass --resume)")
    dtype = compute_dtype(args, d)
    adapter.compute_dtype = dtype
    ckpt = not args.no_checkpointing

    def build(weights: dict | None, source: str, trainable: bool, mixed: bool = True, convert: bool = True):
        """One network: the base weights, then `weights` over them, then sharded at once, so the host holds one
        full fp32 copy at a time (fully_shard moves the rank's shard to the device and frees the rest)."""
        net = adapter.load_network(args.model_dir)
        if weights is not None:
            load_weights(net, weights, source, adapter.convert_state_dict if convert else None)
        return shard(net, adapter.blocks(net), d, dtype if mixed else None,
                     adapter.fp32_islands(net) if mixed else None, ckpt and trainable and mixed, trainable)

    try:
        c = dfd_config(args)
        data = LatentShards(args.data, adapter.data_keys)
        resume, resumed_from = None, None
        if args.resume is not None:
            resumed_from = latest_checkpoint(args.out if args.resume == "latest" else args.resume)
            resume = load_checkpoint(resumed_from)
        teacher_net = adapter.load_network(args.model_dir)
        adapter.check_data(data.shapes, teacher_net)
        teacher_net = shard(teacher_net, adapter.blocks(teacher_net), d, dtype, adapter.fp32_islands(teacher_net),
                            False, False)
        if resume is None:  # student from the DMD2 generator, fake score from its critic (else the teacher)
            sd = read_checkpoint(args.dmd2_ckpt, args.init_from)
            if sd is None:
                raise ValueError(f"--dmd2-ckpt {args.dmd2_ckpt}: holds no generator weights")
            src = f"--dmd2-ckpt {args.dmd2_ckpt}"
            student_net = build(sd, f"{src} (student)", True)
            ema_net = build(sd, f"{src} (EMA)", False, mixed=False) if args.ema > 0 else None
            del sd
            fake_net = build(read_checkpoint(args.dmd2_ckpt, "critic"), f"{src} (critic)", True)
        else:
            w = resume[0]
            src = f"--resume {resumed_from}"
            student_w = w.pop("student")
            student_net = build(student_w, f"{src} (student)", True, convert=False)
            ema_w = w.pop("ema", student_w)  # a run that turns the EMA on at resume starts it from the student
            del student_w
            ema_net = build(ema_w, f"{src} (EMA)", False, mixed=False, convert=False) if args.ema > 0 else None
            del ema_w
            fake_net = build(w.pop("fake"), f"{src} (fake)", True, convert=False)
    except ValueError as e:
        raise fail(e)
    uncond = {k: v.to(d.device) for k, v in data.negative.items()} if data.negative else None
    teacher = adapter.denoiser(teacher_net, args.guidance, uncond)
    student = adapter.denoiser(student_net, None, None)
    fake = adapter.denoiser(fake_net, None, None)
    ema = adapter.denoiser(ema_net, None, None) if ema_net is not None else None
    adamw = lambda net, lr: torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999),
                                              weight_decay=args.weight_decay)
    opt_s, opt_f = adamw(student_net, args.lr), adamw(fake_net, args.lr_fake)
    start, position = 0, 0
    if resume is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        st = resume[1]
        if st.get("world") is not None and st["world"] * st.get("per_rank_batch", per_rank) != d.world * per_rank:
            raise SystemExit(f"error: --resume: checkpoint used global batch {st['world'] * st['per_rank_batch']}, "
                             f"this run {d.world * per_rank}")
        for name, net, opt in (("student", student_net, opt_s), ("fake", fake_net, opt_f)):
            set_optimizer_state_dict(net, opt, st["optim"][name], options=StateDictOptions(full_state_dict=True))
        start, position = st["step"] + 1, st["position"]
        set_rng_state(st["rng"])
    if start >= args.steps:
        raise SystemExit(f"error: --resume: checkpoint is at step {start}, nothing left of --steps {args.steps}")
    per_step = (c.fake_updates + 1) * c.grad_accum  # micro-batches dfd.train draws per student step
    stream = data.batches(position, per_rank, d.rank, d.world, args.seed)
    batches = (adapter.make_batch({k: v.to(d.device) for k, v in item.items()}, d.device) for item in stream)
    if d.main:
        os.makedirs(args.out, exist_ok=True)
        json.dump(vars(args), open(os.path.join(args.out, "args.json"), "w"), indent=1)
    log = MetricLog(os.path.join(args.out, "metrics.jsonl"), args.steps, start, d.main)
    last: dict = {}
    clock = [time.perf_counter()]
    saved = [resumed_from]

    def on_log(step: int, logs: dict) -> None:
        now = time.perf_counter()
        logs = mean_over_ranks(logs, d.device)
        logs.update(step_time_s=now - clock[0], peak_mem_gb=peak_memory_gb(d.device), lr=opt_s.param_groups[0]["lr"],
                    samples=(step + 1) * per_step * per_rank * d.world)
        clock[0] = now
        last.clear()
        last.update(step=step, **logs)
        log(step, logs)

    def on_step_end(step: int) -> None:
        drift = probes(step, ema or student) if probes is not None and probes.due(step) else None
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps or drift:
            nets = {"student": student_net, "fake": fake_net, **({"ema": ema_net} if ema_net is not None else {})}
            extra = {"position": (step + 1 - start) * per_step + position, "world": d.world,
                     "per_rank_batch": per_rank, "adapter": adapter.name, "args": vars(args)}
            saved[0] = save_checkpoint(args.out, step, nets, {"student": opt_s, "fake": opt_f}, extra, d, args.keep)
            clock[0] = time.perf_counter()  # do not bill the save (or the probe) to the next step
        if drift:
            raise Drift(f"stopped after student step {step}: {drift}; checkpoint {saved[0]}")

    # FSDP2 warns that the transformer returns a view; the adapters never modify outputs in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    try:
        probes = open_probes(adapter, args, d, data, start)
    except ValueError as e:
        raise fail(e)
    if probes is not None and resume is None:
        probes(-1, ema or student)  # the starting checkpoint: the reference of --stop-on-drift
        clock[0] = time.perf_counter()
    try:
        dfd.train(student, teacher, fake, opt_s, opt_f, batches, args.steps, c, start_step=start, rank=d.rank,
                  ema=ema, log=on_log, on_step_end=on_step_end)
    except FloatingPointError as e:
        where = f"the last good checkpoint {saved[0]} is untouched" if saved[0] else "no checkpoint was written"
        raise SystemExit(f"error: training stopped: {e}; {where}")
    except Drift as e:
        raise SystemExit(f"error: --stop-on-drift: {e}")
    finally:
        log.close()
    if d.main:
        print(f"trained to step {args.steps} of --steps {args.steps}: last checkpoint {saved[0]}, metrics "
              f"{os.path.join(args.out, 'metrics.jsonl')}", file=sys.stderr)
    return last
