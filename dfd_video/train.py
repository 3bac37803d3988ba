"""The `train` subcommand (the default): DFD post-training (dfd.train) under FSDP2, with checkpoints and --resume."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Callable

import torch

import dfd
from dfd_video import lora
from dfd_video.data import LatentShards
from dfd_video.distributed import (compute_dtype, mean_over_ranks, on_main_rank, peak_memory_gb, set_full_state_dict,
                                   setup_distributed, shard)
from dfd_video.files import fail, write_text
from dfd_video.probes import Drift, open_probes
from dfd_video.runs import (MetricLog, latest_checkpoint, load_checkpoint, read_weights, save_checkpoint,
                           set_rng_state, start_run_folder)
from dfd_video.weights import describe_dmd2, describe_lines, fit_state_dict, read_checkpoint, read_raw


def dfd_config(args: argparse.Namespace) -> dfd.DFDConfig:
    """The method settings (dfd.DFDConfig) from the train flags."""
    return dfd.DFDConfig(p=args.p, per_sample_coin=args.per_sample_coin, p_t_min=args.p_t_min, space=args.space,
                         fake_updates=args.fake_updates, grad_accum=args.grad_accum,
                         student_ts=tuple(args.student_ts), backward_sim=args.backward_sim, t_min=args.t_min,
                         t_max=args.t_max, t_shift=args.t_shift, grad_clip=args.grad_clip,
                         grad_clip_fake=args.grad_clip_fake, ema=args.ema,
                         seed=args.seed, monitor_every=args.monitor_every)


def run_train(adapter, args: argparse.Namespace) -> dict:
    """DFD post-training (dfd.train) with FSDP2, checkpoints and resume. Returns the last logged metrics."""
    d = setup_distributed(args.device)
    per_rank = args.batch_size // (d.world * args.grad_accum)  # a multiple: cli.check_args
    if args.resume is None and args.dmd2_ckpt is None:
        raise SystemExit("error: --dmd2-ckpt is required (DFD post-trains a DMD2 student; or pass --resume)")
    on_main_rank(d, lambda: start_run_folder(args.out, args.overwrite))  # cli.check_args refused mixing two runs
    dtype = compute_dtype(args, d)
    adapter.compute_dtype = dtype
    ckpt = not args.no_checkpointing

    def build(weights: Callable[[], dict] | None, source: str, trainable: bool, mixed: bool = True,
              convert: bool = True):
        """One network, sharded before it holds any weight: every rank builds it on the meta device and allocates
        only its own shard; rank 0 alone reads the full state dict (weights(), or the base model's when None) and
        streams it to the others tensor by tensor. So no rank but 0 ever holds a full copy, and rank 0 one at a time
        (bench/bench_host_memory.py)."""
        net = adapter.load_network(args.model_dir, meta=True)

        def read() -> dict:  # rank 0; a ValueError here stops every rank with its one line
            sd = weights() if weights is not None else read_raw(args.model_dir)  # the base model's transformer
            sd = fit_state_dict(net, sd, source, adapter.convert_state_dict if convert else None)
            return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # the sharded params' dtype
        full = on_main_rank(d, read)
        net = shard(net, adapter.blocks(net), d, dtype if mixed else None,
                    adapter.fp32_islands(net) if mixed else None, ckpt and trainable and mixed, trainable)
        net.to_empty(device=d.device)
        adapter.init_buffers(net, d.device)
        set_full_state_dict(net, full or {}, from_rank0=True)
        return net

    try:
        c = dfd_config(args)
        data = LatentShards(args.data, adapter.data_keys)
        resume, resumed_from = None, None
        if args.resume is not None:
            resumed_from = latest_checkpoint(args.out if args.resume == "latest" else args.resume)
            # state.pt holds both optimizers' full states (16 bytes per trained parameter): rank 0 alone reads it and
            # streams each rank its shards below; the other ranks get the rest (step, position, RNG, LoRA settings)
            full_state = on_main_rank(d, lambda: load_checkpoint(resumed_from, weights=False)[1])
            meta = on_main_rank(d, lambda: {k: v for k, v in full_state.items() if k != "optim"}, share=True)
            # full weights: rank 0 reads them network by network in build(); LoRA: every rank reads the (small) adapters
            resume = (load_checkpoint(resumed_from, state=False)[0] if args.lora_rank else {}, meta)
            lora.check_resume(args, resume[1], resumed_from, adapter)
        teacher_net = adapter.load_network(args.model_dir, meta=True)  # for check_data; built below
        adapter.check_data(data.shapes, teacher_net)
        desc = None
        if resume is None:  # student from the DMD2 generator, fake score from its critic (else the teacher)
            desc = describe_dmd2(args.dmd2_ckpt, args.init_from, args.fake_init, args.bidirectional_ckpt,
                                 args.rectified_flow_ckpt)
            if desc["refusals"]:
                raise ValueError(desc["refusals"][0])
            if d.main:
                lines = describe_lines(desc) + (["  EMA        <- the student's starting weights"] if args.ema > 0 else [])
                print("\n".join(lines), file=sys.stderr)
        # --lora-rank: frozen bases + trainable LoRA adapters, all four networks built in dfd_video/lora.py; either way
        # rank 0 alone reads weights and streams them to the other ranks
        if not args.lora_rank:
            teacher_net = build(None, f"--model-dir {args.model_dir}", False)
        lora_nets = lora.build_networks(adapter, args, resume, d, dtype, ckpt, desc) if args.lora_rank else None
        if lora_nets:
            teacher_net, student_net, fake_net, ema_net = lora_nets.teacher, lora_nets.student, lora_nets.fake, lora_nets.ema
        elif resume is None:
            s, f = desc["networks"]["student"], desc["networks"]["fake_score"]
            student_w = lambda: read_checkpoint(s["source"], s["role"])
            student_net = build(student_w, f"{s['source']} (student)", True)
            ema_net = build(student_w, f"{s['source']} (EMA)", False, mixed=False) if args.ema > 0 else None
            fake_net = build((lambda: read_checkpoint(f["source"], f["role"])) if f else None,
                             f"{f['source']} (critic)" if f else "teacher", True)
        else:
            src = f"--resume {resumed_from}"
            saved = lambda name: lambda: read_weights(resumed_from, name)
            student_net = build(saved("student"), f"{src} (student)", True, convert=False)
            # a run that turns the EMA on at resume starts it from the student
            ema_w = lambda: read_weights(resumed_from, "ema") or read_weights(resumed_from, "student")
            ema_net = build(ema_w, f"{src} (EMA)", False, mixed=False, convert=False) if args.ema > 0 else None
            fake_net = build(saved("fake"), f"{src} (fake)", True, convert=False)
    except ValueError as e:
        raise fail(e)
    uncond = {k: v.to(d.device) for k, v in data.negative.items()} if data.negative else None
    teacher = adapter.denoiser(teacher_net, args.guidance, uncond)
    student = adapter.denoiser(student_net, None, None)
    fake = adapter.denoiser(fake_net, None, None)
    ema = adapter.denoiser(ema_net, None, None) if ema_net is not None else None
    if lora_nets:
        teacher = lora_nets.teacher_denoiser(teacher)
    adamw = lambda net, lr: torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=lr,
                                              betas=(0.9, 0.999), weight_decay=args.weight_decay)
    opt_s, opt_f = adamw(student_net, args.lr), adamw(fake_net, args.lr_fake)
    start, position = 0, 0
    if resume is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        st = resume[1]
        if st.get("world") is not None and st["world"] * st.get("per_rank_batch", per_rank) != d.world * per_rank:
            raise SystemExit(f"error: --resume: checkpoint used global batch {st['world'] * st['per_rank_batch']}, "
                             f"this run {d.world * per_rank}")
        if st.get("world") not in (None, d.world) and d.main:
            print(f"--resume: the checkpoint was written by {st['world']} ranks, this run has {d.world}: same global "
                  "batch and data, but the sums run in another order, so the weights will be close to an unbroken "
                  "run's, not bit-identical", file=sys.stderr)
        for name, net, opt in (("student", student_net, opt_s), ("fake", fake_net, opt_f)):
            set_optimizer_state_dict(net, opt, full_state["optim"][name] if d.main else {},
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full_state
        start, position = st["step"] + 1, st["position"]
        set_rng_state(st["rng"])
    if start >= args.steps:
        raise SystemExit(f"error: --resume: checkpoint is at step {start}, nothing left of --steps {args.steps}")
    per_step = (c.fake_updates + 1) * c.grad_accum  # micro-batches dfd.train draws per student step
    stream = data.batches(position, per_rank, d.rank, d.world, args.seed)
    batches = (adapter.make_batch({k: v.to(d.device) for k, v in item.items()}, d.device) for item in stream)
    if d.main:
        write_text(os.path.join(args.out, "args.json"), json.dumps(vars(args), indent=1))
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
        if lora_nets and lora_nets.ema is not None:  # dfd.train got ema=None: the EMA covers the adapter only
            lora_nets.ema.update(args.ema)
        drift = probes(step, ema or student) if probes is not None and probes.due(step) else None
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps or drift:
            nets = {"student": student_net, "fake": fake_net, **({"ema": ema_net} if ema_net is not None else {})}
            extra = {"position": (step + 1 - start) * per_step + position, "world": d.world,
                     "per_rank_batch": per_rank, "adapter": adapter.name, "args": vars(args)}
            if lora_nets:
                extra["lora"] = lora_nets.info
            saved[0] = save_checkpoint(args.out, step, nets, {"student": opt_s, "fake": opt_f}, extra, d, args.keep,
                                       weights_of=lora.full_state_dict if lora_nets else None)
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
                  ema=None if lora_nets else ema, log=on_log, on_step_end=on_step_end)
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
