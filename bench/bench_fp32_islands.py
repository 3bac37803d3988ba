"""Measurement: one DFD step under FSDP2 bf16 against diffusers' own mixed precision, before and after the fp32 islands.

    python bench/bench_fp32_islands.py                                      # tiny Wan and Cosmos, 3 seeds, ~2 min
    python bench/bench_fp32_islands.py --out bench/results/fp32_islands_tiny.md   # the result file docs/numerics.md quotes
    python bench/bench_fp32_islands.py --size real --seeds 0 --models wan   # real widths (dfd_video/configs), 1 block, ~3 min
    python bench/bench_fp32_islands.py --size real --seeds 0 --models cosmos --modes diffusers fsdp_before fsdp_after
                                                                            # ~3 min, ~10 GB

Diffusers loads a transformer in bf16 with its `_keep_in_fp32_modules` in fp32 (Wan: rope, time_embedder,
scale_shift_table, norm1/2/3); `sample` runs the student that way too (cast_keeping_fp32). Training runs FSDP2 with
MixedPrecisionPolicy(param_dtype=bf16). For the same three random networks (teacher seed 0, student 1, fake score
2) and one batch, every mode below runs dfd.student_step (p = 1: the teacher sees the real sample) and
dfd.fake_score_step, with the optimizers replaced by a probe that records the gradients:

  fp32         everything fp32, no casting: the exact values, for scale
  diffusers    cast_keeping_fp32(net, bf16): the reference
  fsdp_before  FSDP2 bf16 as at commit a6f7b02: only Wan's time embedder an fp32 unit, and every block casting its
               inputs, the RoPE tables included, to bf16
  fsdp_after   FSDP2 bf16 now: dfd_video.distributed.shard with the adapter's fp32_islands, no input casting
  bare_bf16    the reference with the bare parameters (Wan's scale_shift_table) in bf16 as well: what FSDP2
               gives if they are left in their blocks' bf16 units (one policy per module), i.e. the cost of
               not splitting those blocks
  fp32_fsdp    FSDP2 in fp32, against fp32: FSDP2's own floor. Its hooks on every unit's inputs change the order
               in which autograd sums the gradients of a tensor many blocks read (the text embedding), so those
               parameters' gradients differ by a rounding (~1e-7 here, ~1e-3 of them in bf16, where the same
               reordering is what remains of fsdp_after against diffusers)

and the table gives, against `diffusers` (fp32_fsdp: against fp32), the relative difference of the student loss
and of the fake-score loss, and the relative L2 error ||g - g_ref|| / ||g_ref|| and cosine of the full gradient of
each network (worst over --seeds, which change the batch; the networks and the DFD draws are fixed). The last
column is the student's error against fp32, for scale: how far bf16 itself is from exact. World of one
(in-process store); nothing here needs a GPU. docs/numerics.md has the measured tables.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench")]
import dfd  # noqa: E402
from result_file import add_out_flag, result_file  # noqa: E402
from dfd_video.distributed import cast_keeping_fp32, fp32_islands, setup_distributed, shard  # noqa: E402

CONFIGS = os.path.join(ROOT, "dfd_video", "configs")
MODES = ("fp32", "diffusers", "fsdp_before", "fsdp_after", "bare_bf16", "fp32_fsdp")


def build(model: str, size: str, seed: int) -> nn.Module:
    """A random transformer: the tests' tiny one, or the real config (dfd_video/configs) cut to one block."""
    if size == "tiny":
        import tiny_cosmos
        import tiny_wan
        return (tiny_wan if model == "wan" else tiny_cosmos).tiny_transformer(seed)
    from diffusers import CosmosTransformer3DModel, WanTransformer3DModel
    cls = WanTransformer3DModel if model == "wan" else CosmosTransformer3DModel
    name = "wan2.1_t2v_1.3b_transformer.json" if model == "wan" else "cosmos_predict2.5_2b_transformer.json"
    cfg = {**json.load(open(os.path.join(CONFIGS, name))), "num_layers": 1}
    torch.manual_seed(seed)
    return cls.from_config(cfg)


def data(model: str, net: nn.Module, size: str, seed: int):
    """(batch, uncond): one sample of the right shapes, random."""
    g = torch.Generator().manual_seed(1000 + seed)
    T, H, W = (3, 4, 6) if size == "tiny" else (2, 4, 4)
    x = torch.randn(1, 16, T, H, W, generator=g)
    if model == "wan":
        D = net.config.text_dim
        return {"latents": x, "text": torch.randn(1, 512, D, generator=g)}, {"text": torch.randn(512, D, generator=g)}
    D = net.config.crossattn_proj_in_channels
    return ({"latents": x, "image": x[:, :, :1].clone(), "text": torch.randn(1, 512, D, generator=g)},
            {"text": torch.randn(512, D, generator=g)})


def adapter_for(model: str):
    if model == "wan":
        import wan_dfd
        return wan_dfd.WanAdapter(), 5.0
    import cosmos_dfd
    cosmos_dfd.ensure_padding_mask_resize()  # load_network's step: torchvision's resize, or the stand-in
    return cosmos_dfd.CosmosAdapter(), 3.0


def shard_before(net: nn.Module, blocks, d, param_dtype, fp32_modules, trainable: bool) -> nn.Module:
    """dfd_video.distributed.shard as it was at commit a6f7b02 (blocks cast their inputs; islands after them)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    low = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    high = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    root = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for b in blocks:
        fully_shard(b, mesh=d.mesh, mp_policy=low)
    for m in fp32_modules:
        fully_shard(m, mesh=d.mesh, mp_policy=high)
    fully_shard(net, mesh=d.mesh, mp_policy=root)
    net.requires_grad_(trainable)
    return net


def old_fp32_modules(model: str, net: nn.Module) -> list[nn.Module]:
    """The adapters' fp32_modules at commit a6f7b02."""
    if model == "wan":
        return [net.condition_embedder.time_embedder]
    return [net.learnable_pos_embed] if net.learnable_pos_embed is not None else []


def prepare(mode: str, model: str, net: nn.Module, adapter, d, trainable: bool) -> nn.Module:
    """`net` (changed in place) as `mode` runs it."""
    bf16 = torch.bfloat16
    if mode == "fp32":
        return net.requires_grad_(trainable)
    if mode == "fp32_fsdp":
        return shard(net, adapter.blocks(net), d, None, adapter.fp32_islands(net), False, trainable)
    if mode in ("diffusers", "bare_bf16"):
        cast_keeping_fp32(net, bf16)
        if mode == "bare_bf16":
            with torch.no_grad():
                for name in fp32_islands(net).params:
                    p = net.get_parameter(name)
                    p.data = p.data.to(bf16)
        return net.requires_grad_(trainable)
    if mode == "fsdp_before":
        return shard_before(net, adapter.blocks(net), d, bf16, old_fp32_modules(model, net), trainable)
    return shard(net, adapter.blocks(net), d, bf16, adapter.fp32_islands(net), False, trainable)


class Probe:
    """Stands in for the optimizer: dfd's _apply calls step() then zero_grad(); step() records the gradients."""

    def __init__(self, net: nn.Module):
        self.net, self.grad = net, None

    def step(self):
        gs = [p.grad for p in self.net.parameters() if p.grad is not None]
        self.grad = torch.cat([(g.full_tensor() if hasattr(g, "full_tensor") else g).float().flatten() for g in gs])

    def zero_grad(self, set_to_none: bool = True):
        for p in self.net.parameters():
            p.grad = None


def one_step(mode: str, model: str, nets: dict, batch: dict, uncond: dict, d, copy_nets: bool = True) -> dict:
    """One student step (p = 1) and one fake-score step of `mode` on copies of `nets` (the nets themselves with
    copy_nets=False); returns both losses and both networks' flattened gradients."""
    adapter, g = adapter_for(model)
    dtype = None if mode.startswith("fp32") else torch.bfloat16
    own = (lambda n: copy.deepcopy(n)) if copy_nets else (lambda n: n)
    s_net = prepare(mode, model, own(nets["student"]), adapter, d, True)
    f_net = prepare(mode, model, own(nets["fake"]), adapter, d, True)
    t_net = prepare(mode, model, own(nets["teacher"]), adapter, d, False)
    student, fake = adapter.denoiser(s_net, dtype=dtype), adapter.denoiser(f_net, dtype=dtype)
    teacher = adapter.denoiser(t_net, g, uncond, dtype)
    c = dfd.DFDConfig(p=1.0, grad_clip=0.0)
    b = adapter.make_batch(batch, torch.device("cpu"))
    ps, pf = Probe(s_net), Probe(f_net)
    logs = dfd.student_step(student, teacher, fake, ps, [b], c, step=0)
    logs.update(dfd.fake_score_step(student, fake, pf, [b], c, step=0, j=0))
    return {"loss_student": logs["loss_student"], "loss_fake": logs["loss_fake"], "g_student": ps.grad,
            "g_fake": pf.grad}


def compare(a: dict, ref: dict) -> dict:
    """Relative loss differences; relative L2 error and cosine of the gradients (accumulated in float64 in chunks,
    so a 190 M-parameter gradient needs no float64 copy)."""
    out = {k: abs(a[k] - ref[k]) / abs(ref[k]) for k in ("loss_student", "loss_fake")}
    for k in ("g_student", "g_fake"):
        dd = xy = xx = yy = 0.0
        for x, y in zip(a[k].split(1 << 22), ref[k].split(1 << 22)):
            x, y = x.double(), y.double()
            dd, xy = dd + (x - y).square().sum().item(), xy + (x * y).sum().item()
            xx, yy = xx + x.square().sum().item(), yy + y.square().sum().item()
        out[k + "_err"] = (dd / yy) ** 0.5
        out[k + "_cos"] = xy / (xx * yy) ** 0.5
    return out


def run(model: str, size: str, seeds: list[int], modes: list[str], d) -> dict:
    """Worst case over seeds of compare() against the reference of each mode; one mode's networks at a time, and
    only the reference results kept, so the real-width Cosmos (190 M parameters a network) stays near 10 GB."""
    worst: dict[str, dict] = {m: {} for m in modes}
    order = [m for m in ("fp32", "diffusers") if m in modes] + [m for m in modes if m not in ("fp32", "diffusers")]
    for seed in seeds:
        refs: dict[str, dict] = {}
        for m in order:
            nets = {"teacher": build(model, size, 0), "student": build(model, size, 1), "fake": build(model, size, 2)}
            batch, uncond = data(model, nets["teacher"], size, seed)
            r = one_step(m, model, nets, batch, uncond, d, copy_nets=False)
            del nets
            if m in ("fp32", "diffusers"):
                refs[m] = r  # compared once both references exist
            else:
                score(worst[m], m, r, refs)
            del r
        for m, r in refs.items():
            score(worst[m], m, r, refs)
    return worst


def score(worst: dict, mode: str, r: dict, refs: dict) -> None:
    """Updates `worst` with compare() against the mode's reference, and the gradient errors against fp32."""
    against = [("", refs.get("fp32" if mode == "fp32_fsdp" else "diffusers")), ("fp32_", refs.get("fp32"))]
    for tag, ref in against:
        if ref is None:
            continue
        for k, v in compare(r, ref).items():
            if tag and not k.endswith("_err"):
                continue
            pick = min if k.endswith("_cos") else max
            worst[tag + k] = pick(worst.get(tag + k, v), v)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["wan", "cosmos"], choices=("wan", "cosmos"))
    p.add_argument("--size", default="tiny", choices=("tiny", "real"),
                   help="tiny: the tests' models; real: dfd_video/configs at real widths, one block")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="a subset (the real-width Cosmos: diffusers fsdp_before fsdp_after, ~10 GB)")
    p.add_argument("--threads", type=int, default=2)
    add_out_flag(p)
    args = p.parse_args(argv)
    if "diffusers" not in args.modes or ("fp32_fsdp" in args.modes and "fp32" not in args.modes):
        p.error("--modes needs diffusers (the reference), and fp32 with fp32_fsdp")
    torch.set_num_threads(args.threads)
    d = setup_distributed("cpu")
    with result_file(args.out, f"One DFD step under FSDP2 bf16 against diffusers' bf16 forward ({args.size} size, CPU)"):
        return compare_models(args, d)


def compare_models(args: argparse.Namespace, d) -> dict:
    results = {}
    for model in args.models:
        t0 = time.perf_counter()
        w = run(model, args.size, args.seeds, args.modes, d)
        results[model] = w
        print(f"\n{model}, {args.size}, seeds {args.seeds} ({time.perf_counter() - t0:.0f} s); against `diffusers` "
              "(fp32_fsdp: against fp32), max over seeds (cos: min):")
        print("| mode | loss_student rel | loss_fake rel | g_student rel err | g_student cos | g_fake rel err "
              "| g_fake cos | g_student rel err vs fp32 |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for m in args.modes:
            r = w[m]
            vs32 = f"{r['fp32_g_student_err']:.2e}" if "fp32_g_student_err" in r else "-"
            print(f"| {m} | {r['loss_student']:.2e} | {r['loss_fake']:.2e} | {r['g_student_err']:.2e} | "
                  f"{r['g_student_cos']:.6f} | {r['g_fake_err']:.2e} | {r['g_fake_cos']:.6f} | {vs32} |")
    return results


if __name__ == "__main__":
    main()
