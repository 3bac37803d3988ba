"""The `check` subcommand: the preflight to run before the first training job on a GPU cluster.

One process (plain `python`, not torchrun), in four parts; docs/check.md explains how to read the report.
  1. checkpoint  which networks --dmd2-ckpt holds, where the student / fake score / EMA of `train` would come from,
                 how many of the network's keys each provides, and warnings
  2. parity      the teacher's guided x0 at one t against the diffusers pipeline's own computation (its transformer
                 calls and CFG, one Euler step to t = 0) on a short low-resolution clip, with a threshold per dtype
  3. student     a 4-step sample (dfd.sample at the student's times, --sampler), decoded, with saturation statistics;
                 with --data, delta^2 = E||x - G||^2 per element (Eq. 7) of the student's one-step output from real
                 clips noised to the first student time
  4. memory      the estimated peak GPU memory per rank for --world-size and the train flags, as `plan` computes it
                 (dfd_video.planning.memory.plan_memory), and on a GPU the largest batch per rank that fits one like it
Problems (a checkpoint that does not fit, failed parity, unreadable data) are one line each; any problem makes the
command exit non-zero after the report is printed (and written with --out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import torch
import torch.nn as nn

import dfd
from dfd_video.cli import add_clip_args, add_train_args
from dfd_video.data import LatentShards
from dfd_video.distributed import cast_keeping_fp32, compute_dtype
from dfd_video.evaluation.evaluate import saturation_stats
from dfd_video.files import fail, write_text
from dfd_video.planning.memory import GiB, gan_sizes, largest_batch, network_sizes, part_rows, plan_model
from dfd_video.spec import model_options
from dfd_video.weights import describe_dmd2, describe_lines, load_weights, match_state_dict, read_checkpoint

# parity threshold: max |x0 ours - x0 pipeline| <= REL[dtype] * max |x0 pipeline|. Both sides run the same weights in
# the same dtype; what differs is batching (ours: cond and uncond in one batch of 2) and so the kernels' summation
# order. A convention error (timestep scale, guidance form, velocity sign) moves x0 by O(1) of its scale.
PARITY_REL = {"fp32": 1e-4, "bf16": 2e-2}  # fp32 with TF32 off (see teacher_parity)
FAKE_FROM_TEACHER = "teacher (--model-dir)"  # the fake score's source when the checkpoint gives it none
PAPER_TRAIN_SIZE = (81, 480, 832)  # frames, height, width of the paper's clips: the memory estimate without --data
RESERVE_GB = 6.0  # GiB per GPU left for what the estimate does not model (plan's --reserve-gb default)


def add_args(p: argparse.ArgumentParser, spec=None) -> None:
    """The flags of this subcommand (dfd_video.cli builds its parser only when it runs)."""
    add_train_args(p, spec, check=True)
    p.add_argument("--world-size", type=int, default=8, help="ranks of the planned train run, for the memory "
                   "estimate (default 8: one node); check itself runs as one process")
    add_clip_args(p, "frames of the low-resolution parity / sample clip (without --data; with --data the data's "
                  "clip size is used)", None, (17, 240, 416))
    p.add_argument("--sampler", default="ode", choices=("ode", "renoise"),
                   help="the student sampler (as in `sample`): ode = the noise x_t implies (the authors' inference), "
                        "renoise = fresh noise between steps")
    p.add_argument("--parity-t", type=float, default=0.8, help="noise level t in (0, 1] of the teacher parity step")
    p.add_argument("--check-batch", type=int, default=2, help="clips from --data for delta^2")


# ---------------------------------------------------------------------------------------------------
# 1. The checkpoint: weights.describe_dmd2 (what train would load, from names alone) and how well each network's
# weights fit the base model's architecture (load_weights' key matching, reported instead of raised).


def match_keys(want: dict[str, tuple], sd: dict[str, torch.Tensor], convert: Callable | None) -> dict:
    """How `sd` fits a network whose state dict has shapes `want`: load_weights' matching, reported, not raised."""
    _, bad = match_state_dict(want, sd, convert)
    return {"keys": len(want), "provided": len(want) - len(bad["missing"]) - len(bad["shape_mismatches"]), **bad}


def checkpoint_report(args: argparse.Namespace, spec, net: nn.Module) -> dict:
    """What `train` with these flags would load from --dmd2-ckpt (describe_dmd2: format, the source of the student,
    fake score and the checkpoint's EMA, warnings, refusals) and each network's key coverage of `net`. Problems:
    the refusals and every network whose weights do not fit, one line each."""
    desc = describe_dmd2(args.dmd2_ckpt, args.init_from, args.fake_init, args.bidirectional_ckpt,
                         args.rectified_flow_ckpt)
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    lines = describe_lines(desc, args.gan_weight > 0) + ([spec.describe_student] if spec.describe_student else [])
    out = {"path": args.dmd2_ckpt, "format": desc["format"], "summary": desc["summary"], "lines": lines,
           "networks": {}, "warnings": list(desc["warnings"]), "problems": list(desc["refusals"]),
           "causal": bool(spec.describe_student)}
    show = lambda xs: ", ".join(xs[:4]) + (f" ... (+{len(xs) - 4})" if len(xs) > 4 else "")
    for name in ("student", "fake_score", "ema"):
        src = desc["networks"][name]
        if src is None:
            out["networks"][name] = ({"source": FAKE_FROM_TEACHER} if name == "fake_score" else
                                     {"source": None} if name == "student" else None)
            continue
        try:
            m = match_keys(want, read_checkpoint(src["source"], src["role"]) or {}, spec.convert_state_dict)
        except ValueError as e:
            out["problems"].append(f"{name}: {e}")
            out["networks"][name] = {"source": src["source"], "role": src["role"]}
            continue
        out["networks"][name] = {"source": src["source"], "role": src["role"], **m}
        for what in ("missing", "unexpected", "shape_mismatches"):
            if m[what]:
                out["problems"].append(f"{name} ({src['source']}): {len(m[what])} {what.replace('_', ' ')} of "
                                       f"{m['keys']} keys [{show(m[what])}]")
    if args.gan_weight > 0:  # where train's discriminator would start (its keys are checked when train loads it)
        found = desc["networks"].get("discriminator")
        out["networks"]["discriminator"] = {"source": found["source"] if found else
                                            "a fresh one (the checkpoint holds none)"}
    if out["networks"]["ema"] is not None:  # train's --ema starts from the student's weights, not from this one
        out["networks"]["ema"]["note"] = "the checkpoint's own EMA; --init-from generator_ema starts the student from it"
    return out


# ---------------------------------------------------------------------------------------------------
# The driver.


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is visible")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _masked_max(x: torch.Tensor, mask: torch.Tensor | None) -> float:
    x = x.abs() if mask is None else (x * mask).abs()
    return float(x.max())


def teacher_parity(spec, net: nn.Module, x_t: torch.Tensor, cond: Any, uncond: dict, args: argparse.Namespace,
                   dtype: torch.dtype | None, rep: dict) -> dict:
    """Part 2: the teacher's guided x0 at t = --parity-t from x_t [1, C, T, H, W], ours (spec.denoiser) against the
    pipeline's (spec.pipeline_x0); appends to rep's warnings / problems."""
    t, g = args.parity_t, args.guidance
    dtype_name = "bf16" if dtype is not None else "fp32"
    opt = model_options(spec, args)  # the run's (Cosmos: --cond-frame-t); the pipeline has its own
    par: dict[str, Any] = {"t": t, "guidance": g, "latent_shape": list(x_t.shape), "dtype": dtype_name,
                           "options": opt}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if dtype_name == "fp32":  # fp32 means fp32 here: cuDNN's default TF32 convolutions would blur the comparison to 1e-3
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            x0_pipe, cond_used, mask = spec.pipeline_x0(net, x_t, t, cond, uncond, g, dtype, args.model_dir)
            tt = torch.tensor([t], device=x_t.device)
            x0_ours = spec.denoiser(net, g, uncond, dtype, **opt)(x_t, tt, cond_used).float()
            # what the comparison must resolve: a guidance off by one (g vs g - 1, the pipeline-vs-paper slip) moves
            # x0 by exactly cond - uncond
            off_by_one = (spec.denoiser(net, g - 1, uncond, dtype, **opt)(x_t, tt, cond_used).float() if g != 1.0
                          else None)
        diff, scale = _masked_max(x0_ours - x0_pipe, mask), _masked_max(x0_pipe, mask)
        threshold = PARITY_REL[dtype_name] * scale
        par.update(max_abs_diff=diff, scale=scale, threshold=threshold, passed=bool(diff <= threshold and scale > 0))
        if off_by_one is not None:
            par["guidance_off_by_one"] = _masked_max(x0_ours - off_by_one, mask)
            if par["guidance_off_by_one"] <= threshold:
                rep["warnings"].append(
                    f"teacher parity at {dtype_name}: the threshold {threshold:.3g} does not resolve a guidance off by "
                    f"one (it moves x0 by {par['guidance_off_by_one']:.3g} here); " + (
                        "rerun check with --dtype fp32" if dtype_name != "fp32" else
                        "the prompt barely changes x0 (random weights or stand-in embeddings?)"))
        if not par["passed"]:
            ran = "".join(f", --{k.replace('_', '-')} {v}" for k, v in opt.items())
            rep["problems"].append(f"teacher parity failed: max |x0 ours - x0 pipeline| = {diff:.3g} > "
                                   f"{PARITY_REL[dtype_name]:g} x {scale:.3g} ({dtype_name}, t = {t}, g = {g}{ran}"
                                   + ("; the pipeline runs its own defaults of those" if opt else "") + ")")
    except ValueError as e:
        par.update(passed=None, skipped=str(e))
        rep["warnings"].append(f"teacher parity skipped: {e}")
    except Exception as e:  # a preflight reports what it could not run (e.g. a diffusers without this pipeline)
        par.update(passed=False, error=_one_line(e))
        rep["problems"].append(f"teacher parity could not run: {par['error']}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return par


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else type(e).__name__


def student_report(spec, args: argparse.Namespace, source: tuple[str, str], shape: tuple, first: dict,
                   items: dict | None,
                   device: torch.device, dtype: torch.dtype | None, stu: dict, rep: dict) -> None:
    """Part 3: the student (source = (path, role) as describe_dmd2 names it), a 4-step sample from the first clip's conditioning with
    its saturation statistics, and with data items delta^2 at the first student time; fills `stu`."""
    ts = tuple(args.student_ts)
    net = spec.load_network(args.model_dir)
    load_weights(net, read_checkpoint(*source), f"--dmd2-ckpt {source[0]} (student)",
                 spec.convert_state_dict)
    net = net.to(device).eval()
    if dtype is not None:
        cast_keeping_fp32(net, dtype)
    student = spec.denoiser(net, dtype=dtype, **model_options(spec, args))
    with torch.no_grad():  # as `sample` draws it: noise and re-noising from one generator on the device
        gs = torch.Generator(device).manual_seed(args.seed)
        noise = torch.randn((1, *shape), generator=gs, device=device)
        x = spec.sample_video(student, noise, spec.make_cond(first, device), ts, gs, args.sampler == "renoise")
        frames = spec.open_encoders(args.model_dir, device, torch.float32, text=False).vae.decode(x)[0].cpu().numpy()
    stu.update(frames=int(frames.shape[0]), height=int(frames.shape[1]), width=int(frames.shape[2]),
               latent_mean=float(x.float().mean()), latent_std=float(x.float().std()), **saturation_stats(frames))
    if items is None:
        return
    batch = spec.make_batch({k: v.to(device) for k, v in items.items()}, device)
    with torch.no_grad():
        delta2 = first_step_delta2(student, batch, float(ts[0]), torch.Generator().manual_seed(args.seed + 1))
    limit = dfd.DFDConfig().delta2_warn
    stu.update(delta2=delta2, delta2_t=float(ts[0]), delta2_clips=int(batch[0].shape[0]), delta2_warn=limit)
    if delta2 > limit:
        rep["warnings"].append(f"delta^2 = {delta2:.3g} per element exceeds {limit:g} (Eq. 7): the student is far "
                               "from the data; DFD needs a DMD2 student already close to it")


def first_step_delta2(student, batch: tuple, t0: float, generator: torch.Generator) -> float:
    """delta^2 of Eq. 7 as dfd.student_step monitors it, E||x - G||^2 per element (over the loss mask), for the
    student's one-step output G = student(alpha_t0 x + sigma_t0 eps, t0) from the real clips x of `batch`."""
    x_real, cond = batch[0], batch[1]
    mask = batch[2] if len(batch) > 2 else None
    t = torch.full((x_real.shape[0],), t0, device=x_real.device)
    eps = torch.randn(x_real.shape, generator=generator).to(x_real.device, x_real.dtype)
    G = student(dfd.forward_diffusion(x_real, eps, t), t, cond)
    m = (torch.ones_like(x_real) if mask is None else mask.expand_as(x_real)).float().flatten(1)
    return float((((x_real - G).float().flatten(1) ** 2 * m).sum(1) / m.sum(1).clamp_min(1)).mean())


def report_path(out: str) -> str:
    """--out: a .json file, or a folder (e.g. the run folder of a pasted train command) -> folder/check.json."""
    return out if out.endswith(".json") and not os.path.isdir(out) else os.path.join(out, "check.json")


def open_data(spec, args: argparse.Namespace, net: nn.Module, rep: dict, g: torch.Generator):
    """(items of up to --check-batch clips, negative-prompt tensors, conditioning note, data or None, latent shape):
    from --data when it is given and fits `net`, else random stand-ins of the network's shapes."""
    data = None
    if args.data is not None:
        try:
            data = LatentShards(args.data, spec.data_keys)
            spec.check_data(data.shapes, net)
        except ValueError as e:
            rep["problems"].append(f"--data: {e}" if not str(e).startswith("--data") else str(e))
            data = None
    if data is None:
        shape = spec.latent_shape(args.num_frames, args.height, args.width)
        one, negative = spec.check_items(net, shape, g)
        return {k: v[None] for k, v in one.items()}, negative, "random stand-in embeddings (no --data)", None, shape
    n = min(len(data), args.check_batch)
    samples = [data[i] for i in range(n)]
    items = {k: torch.stack([x[k] for x in samples]).float() for k in samples[0]}
    negative = {k: v.float() for k, v in data.negative.items()}
    return items, negative, f"--data, {n} clip(s)", data, tuple(data.shapes["latents"])


def run(spec, args: argparse.Namespace) -> dict:
    """The preflight report (a dict, printed as text and written as JSON with --out); exits non-zero on problems."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("error: check runs as one process (python, not torchrun); --world-size N sets the world "
                         "of the memory estimate")
    if args.dmd2_ckpt is None:
        raise SystemExit("error: check needs --dmd2-ckpt (the DMD2 checkpoint train would start from)")
    device = _device(args.device)
    dtype = compute_dtype(args.dtype, device)
    rep: dict[str, Any] = {"adapter": spec.name, "model_dir": args.model_dir, "dmd2_ckpt": args.dmd2_ckpt,
                           "data": args.data, "device": str(device), "dtype": "bf16" if dtype else "fp32",
                           "problems": [], "warnings": []}
    try:
        teacher_net = spec.load_network(args.model_dir)
    except ValueError as e:
        raise fail(e)
    sizes = network_sizes(spec, teacher_net)
    if args.gan_weight > 0:
        try:
            sizes["gan"] = gan_sizes(spec, teacher_net, args.gan_disc_type, args.gan_blocks)
        except ValueError as e:
            rep["problems"].append(str(e))
    ck = rep["checkpoint"] = checkpoint_report(args, spec, teacher_net)  # 1. the checkpoint
    rep["problems"] += ck["problems"]
    rep["warnings"] += ck["warnings"]
    g = torch.Generator().manual_seed(args.seed)
    items, negative, conditioning, data, shape = open_data(spec, args, teacher_net, rep, g)
    first = {k: v[:1].to(device) for k, v in items.items()}
    uncond = {k: v.to(device) for k, v in negative.items()}
    teacher_net = teacher_net.to(device)
    if dtype is not None:
        cast_keeping_fp32(teacher_net, dtype)
    with torch.no_grad():  # 2. the teacher's parity with the pipeline
        x0 = items["latents"][:1].to(device) if data is not None else torch.randn((1, *shape), generator=g).to(device)
        x_t = dfd.forward_diffusion(x0, torch.randn(x0.shape, generator=g).to(device),
                                    torch.tensor([args.parity_t], device=device))
    rep["parity"] = teacher_parity(spec, teacher_net, x_t, spec.make_cond(first, device), uncond, args, dtype, rep)
    rep["parity"]["conditioning"] = conditioning
    del teacher_net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rep["student"] = student_section(spec, args, ck, shape, first, items if data is not None else None, device,
                                     dtype, conditioning, rep)  # 3. a sample, delta^2
    fake_source = (ck["networks"].get("fake_score") or {}).get("source")  # 4. memory
    rep["memory"] = memory_report(spec, args, sizes, data, fake_source in (None, FAKE_FROM_TEACHER), device)
    if rep["memory"].get("problem"):
        rep["problems"].append(rep["memory"]["problem"])
    rep["ok"] = not rep["problems"]
    write_report(rep, args.out)
    if rep["problems"]:
        raise SystemExit(f"error: check found {len(rep['problems'])} problem(s), listed above")
    return rep


def student_section(spec, args, ck: dict, shape: tuple, first: dict, items: dict | None, device, dtype,
                    conditioning: str, rep: dict) -> dict:
    """Part 3, skipped when the student's weights do not fit; an error (e.g. out of memory at the data's clip size)
    is one problem line, and the report still comes."""
    stu: dict[str, Any] = {"student_ts": list(args.student_ts), "sampler": args.sampler, "latent_shape": [1, *shape],
                           "seed": args.seed, "conditioning": conditioning}
    fit = ck["networks"].get("student") or {}
    if ck["problems"] or fit.get("source") is None or fit.get("provided") != fit.get("keys") or fit.get("unexpected"):
        stu["skipped"] = "the student weights do not fit the network (see the checkpoint problems)"
        return stu
    try:
        student_report(spec, args, (fit["source"], fit["role"]), shape, first, items, device, dtype, stu, rep)
    except Exception as e:
        stu["error"] = _one_line(e)
        rep["problems"].append(f"student sample could not run: {stu['error']}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return stu


def write_report(rep: dict, out: str | None) -> None:
    """Prints the text report; with --out also writes it as JSON."""
    print(format_report(rep))
    if out is None:
        return
    path = report_path(out)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_text(path, json.dumps(rep, indent=1) + "\n")
    except OSError as e:
        raise SystemExit(f"error: --out {path}: {e.strerror}")
    print(f"report written to {path}", file=sys.stderr)


def memory_report(spec, args: argparse.Namespace, sizes: dict, data: LatentShards | None,
                  fake_from_teacher: bool, device: torch.device) -> dict:
    """dfd_video.planning.memory.plan_memory (what `plan` prints) for the run `train` would start with these flags on
    --world-size ranks: --lora-rank, --ema, the compute dtype, checkpointing, the clips per rank per micro-batch,
    at the --data clips' size (the paper's without --data); on a CUDA device, the largest batch per rank that fits a
    GPU of its size with RESERVE_GB kept free."""
    world = args.world_size
    per_rank, rem = divmod(args.batch_size, world * args.grad_accum)
    out: dict[str, Any] = {"world_size": world, "batch_size": args.batch_size, "grad_accum": args.grad_accum}
    if rem or per_rank < 1:
        out["problem"] = (f"--batch-size {args.batch_size} is not a multiple of --world-size x --grad-accum = "
                          f"{world} x {args.grad_accum}")
        per_rank = max(per_rank, 1)
    if data is not None:
        lat, clip = tuple(data.shapes["latents"]), "the --data clips"
    else:
        f, h, w = PAPER_TRAIN_SIZE
        lat = spec.latent_shape(f, h, w)
        clip = f"{f} frames at {h}x{w} (the paper's; pass --data for yours)"
    compute = "fp32" if args.dtype == "fp32" else "bf16"  # train's auto is bf16 on the GPUs it plans for
    lora_rank = getattr(args, "lora_rank", 0)
    plan = plan_model(spec, sizes, world=world, lora_rank=lora_rank, shared_fake=fake_from_teacher,
                        compute_bytes=4 if compute == "fp32" else 2, ema=args.ema > 0, batch_per_gpu=per_rank,
                        latent=lat, checkpointing=not args.no_checkpointing, kv_cache=bool(spec.describe_student),
                        gan=sizes.get("gan"))
    out.update(parts=plan["parts"], exact=plan["exact"], total=plan["total"], per_clip=plan["per_clip"],
               fixed=plan["fixed"], activations_counted=plan["counted"],
               rows=part_rows(plan, lora_rank > 0, args.ema > 0, per_rank), per_rank_batch=per_rank,
               latent_shape=list(lat), tokens=plan["activation_detail"]["tokens"], clip=clip, compute_dtype=compute,
               activation_checkpointing=not args.no_checkpointing, lora_rank=lora_rank,
               fake_score_base="the teacher's" if fake_from_teacher else "its own (the critic)")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_bytes=props.total_memory, reserve_bytes=RESERVE_GB * GiB,
                   largest_batch=largest_batch(plan, props.total_memory, RESERVE_GB * GiB))
    return out


# ---------------------------------------------------------------------------------------------------
# The text report.


def _gb(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB / 100 else f"{b / 2**20:.2f} MiB"


def format_report(rep: dict) -> str:
    L = [f"dfd check: {rep['adapter']}, --model-dir {rep['model_dir']}, {rep['device']} {rep['dtype']}", ""]
    ck = rep["checkpoint"]
    L.append(f"[1] checkpoint {ck['path']}")
    L.append(f"    format: {ck['summary'] or ck['format']}")
    for name, label in (("student", "student   "), ("fake_score", "fake score"), ("ema", "EMA       "),
                        ("discriminator", "GAN disc. ")):
        n = ck["networks"].get(name)
        if n is None:
            continue
        src = (n["source"] or "nothing") + (f" [{n['role']}]" if n.get("role") and ck["format"] not in
                                            ("fastgen-fsdp", "diffusers", "safetensors") else "")
        cov = f"{n['provided']}/{n['keys']} keys" if "keys" in n else ""
        extra = [f"{len(n[k])} {k.replace('_', ' ')}" for k in ("missing", "unexpected", "shape_mismatches") if n.get(k)]
        if n.get("converted"):
            extra.append("original key names, converted")
        if n.get("note"):
            extra.append(n["note"])
        L.append(f"    {label} <- {src:<22} {cov}" + (f"  ({'; '.join(extra)})" if extra else ""))
    p = rep["parity"]
    L += ["", f"[2] teacher parity with the diffusers pipeline: one step at t = {p['t']}, g = {p['guidance']}, "
              f"{p['dtype']}, latents {'x'.join(map(str, p['latent_shape']))}, {p['conditioning']}"
              + "".join(f", --{k.replace('_', '-')} {v}" for k, v in p.get("options", {}).items())]
    if p.get("passed") is None:
        L.append(f"    skipped: {p.get('skipped')}")
    elif "error" in p:
        L.append(f"    could not run: {p['error']}   FAIL")
    else:
        L.append(f"    max |x0 ours - x0 pipeline| = {p['max_abs_diff']:.3g}   (max |x0| {p['scale']:.3g}, threshold "
                 f"{p['threshold']:.3g})   {'PASS' if p['passed'] else 'FAIL'}")
        if p.get("guidance_off_by_one") is not None:
            L.append(f"    (a guidance off by one would move x0 by {p['guidance_off_by_one']:.3g})")
    s = rep["student"]
    L += ["", f"[3] student sample: {len(s['student_ts'])} steps at t = {s['student_ts']}, sampler {s['sampler']}, "
              f"seed {s['seed']}, {s['conditioning']}"]
    if "skipped" in s:
        L.append(f"    skipped: {s['skipped']}")
    elif "error" in s:
        L.append(f"    could not run: {s['error']}")
    else:
        L.append(f"    {s['frames']} frames {s['height']}x{s['width']}: saturation {s['saturation']:.3f}, clipped "
                 f"{s['clipped']:.3f}; latents mean {s['latent_mean']:.3f}, std {s['latent_std']:.3f}")
        if "delta2" in s:
            L.append(f"    delta^2 = {s['delta2']:.4g} per element (student's one step from {s['delta2_clips']} real "
                     f"clip(s) noised to t = {s['delta2_t']}; Eq. 7 warns above {s['delta2_warn']:g})")
        else:
            L.append("    delta^2: needs --data")
    m = rep["memory"]
    weights = (f"LoRA r = {m['lora_rank']}, the fake score on {m['fake_score_base']} base" if m["lora_rank"]
               else "full weights")
    L += ["", f"[4] ESTIMATED peak GPU memory per rank (as `plan` computes it): {m['world_size']} ranks, "
              f"{m['per_rank_batch']} clip(s) per rank per micro-batch, {weights}, {m['compute_dtype']} compute with "
              f"fp32 weights / grads / AdamW, activation checkpointing "
              f"{'on' if m['activation_checkpointing'] else 'off'}, {m['tokens']} tokens per clip ({m['clip']})"]
    L += [f"    {name:<75} {_gb(b):>11}  {kind}" for name, b, kind in m["rows"]]
    L.append(f"    {'total (the exact rows are exact; the rest is an estimate)':<75} {_gb(m['total']):>11}")
    if "largest_batch" in m:
        b = m["largest_batch"]
        L.append(f"    this GPU ({m['gpu']}, {_gb(m['gpu_bytes'])}) with {_gb(m['reserve_bytes'])} kept free: largest "
                 f"batch per rank that fits {b}" + (" (not even one clip: more ranks, --lora-rank or a smaller clip)"
                                                    if b == 0 else ""))
    L.append("")
    for w in rep["warnings"]:
        L.append(f"warning: {w}")
    for q in rep["problems"]:
        L.append(f"problem: {q}")
    L.append("result: OK" if rep["ok"] else f"result: {len(rep['problems'])} problem(s)")
    return "\n".join(L)
