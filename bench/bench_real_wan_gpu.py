"""Opt-in, on one CUDA GPU: the real-size Wan2.1-T2V-1.3B architecture (its public config, dfd_video/configs/, with
random weights, so no download) runs a few DFD steps at 81 x 480 x 832, with full weights and with LoRA, set up as
`train` sets it up (FSDP2 over a world of one, bf16 compute, fp32 islands, activation checkpointing, AdamW), and
prints the measured peak GPU memory and step time beside what the planner (`plan`, docs/memory.md) predicts.

  python bench/bench_real_wan_gpu.py                              # full weights, then LoRA r = 16; needs ~60 GB
  python bench/bench_real_wan_gpu.py --lora 16 64 --steps 3 --out bench/results/real_wan_gpu.md
  python bench/bench_real_wan_gpu.py --device cpu --blocks 1 --latent 2x4x4 --steps 1   # smoke test of this script

Rows: what stays allocated after a step (parameters of the three networks and AdamW state; dfd frees the gradients
after each optimizer step, so the planned figure here leaves them out; a few small buffers are in the measured one)
and the peak of the step (torch.cuda.max_memory_allocated), each with
the planner's figure for the same run; step time is the median of the timed steps (one fake-score update and one
student update each, after one untimed step). Without CUDA the memory columns report the process RSS peak instead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from result_file import add_out_flag, result_file  # noqa: E402


def allocated(device: torch.device) -> tuple[int, int]:
    """(bytes allocated now, peak since the last reset) on the device; RSS-based on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak, peak


def run(config: dict, rank: int, args, device: torch.device) -> dict:
    """One setting (rank 0: full weights): networks built and sharded as dfd_video.train does, then the steps."""
    import dfd
    import wan_dfd
    from dfd_video import distributed, lora
    from dfd_video.planning.memory import meta_network
    adapter = wan_dfd.WanAdapter()
    d = distributed.setup_distributed(device.type)
    nets = []
    for seed in (0, 1, 2):  # teacher, student, fake score: random weights of the real architecture
        torch.manual_seed(seed)
        net = meta_network(config).to_empty(device=device)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.02)
        adapter.init_buffers(net, device)
        nets.append(net)
    teacher_net, student_net, fake_net = nets
    dtype = torch.bfloat16 if device.type == "cuda" else None
    text_dim = config["text_dim"]
    g = torch.Generator(device).manual_seed(0)
    uncond = {"text": torch.randn(512, text_dim, generator=g, device=device)}
    if rank:  # the fake score on the teacher's base, as train does when the fake score starts from the teacher
        del fake_net
        info = {"rank": rank, "alpha": float(rank), "targets": adapter.lora_targets}
        teacher_net = fake_net = lora.shard_lora(lora.attach(teacher_net, info, 1), adapter, d, dtype, True)
        student_net = lora.shard_lora(lora.attach(student_net, info, 0), adapter, d, dtype, True)
        teacher = lora.AdaptersOff(adapter.denoiser(teacher_net, 5.0, uncond, dtype), teacher_net)
    else:
        for net, trainable in ((teacher_net, False), (student_net, True), (fake_net, True)):
            distributed.shard(net, adapter.blocks(net), d, dtype, adapter.fp32_islands(net), trainable, trainable)
        teacher = adapter.denoiser(teacher_net, 5.0, uncond, dtype)
    adamw = lambda net: torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-5)
    opt_s, opt_f = adamw(student_net), adamw(fake_net)
    student, fake = adapter.denoiser(student_net, dtype=dtype), adapter.denoiser(fake_net, dtype=dtype)
    T, H, W = (int(v) for v in args.latent.split("x"))
    batch = (torch.randn(args.batch, 16, T, H, W, generator=g, device=device),
             torch.randn(args.batch, 512, text_dim, generator=g, device=device))
    c = dfd.DFDConfig(fake_updates=1, monitor_every=0, t_min=0.001, t_max=0.999, t_shift=5.0, grad_clip=10.0,
                      grad_clip_fake=0.0)
    times, state, peak = [], None, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        dfd.fake_score_step(student, fake, opt_f, [batch], c, i, 0)
        dfd.student_step(student, teacher, fake, opt_s, [batch], c, i)
        now, peak = allocated(device)
        if i == 0:
            state = now  # parameters, AdamW state and (set_to_none) no gradients left: the resident training state
        else:
            times.append(time.perf_counter() - t0)
    distributed.teardown_distributed()
    return {"state": state, "peak": peak, "step_s": statistics.median(times) if times else float("nan")}


def predicted(config: dict, rank: int, args) -> dict:
    import wan_dfd
    from dfd_video.planning.memory import meta_network, network_sizes, plan_model
    adapter = wan_dfd.WanAdapter()
    sizes = network_sizes(adapter, meta_network(config))
    T, H, W = (int(v) for v in args.latent.split("x"))
    return plan_model(adapter, sizes, world=1, lora_rank=rank, shared_fake=True, compute_bytes=2,
                        batch_per_gpu=args.batch, latent=(16, T, H, W), checkpointing=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lora", type=int, nargs="*", default=[16], help="LoRA ranks to run after full weights")
    ap.add_argument("--no-full", action="store_true", help="skip the full-weight run")
    ap.add_argument("--latent", default="21x60x104", help="latent T x H x W (81 x 480 x 832 video: 21 x 60 x 104)")
    ap.add_argument("--batch", type=int, default=1, help="clips per step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one untimed)")
    ap.add_argument("--blocks", type=int, default=None, help="cut the config to this many blocks (smoke tests)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test of this script")
    add_out_flag(ap)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_real_wan_gpu.py: no CUDA device (it measures GPU memory; --device cpu runs a smoke test)")
    with result_file(args.out, f"Real-size Wan2.1-T2V-1.3B training steps on {args.device}: measured memory and step "
                     "time beside the planner"):
        measure_all(args)


def measure_all(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    with open(os.path.join(ROOT, "dfd_video", "configs", "wan2.1_t2v_1.3b_transformer.json")) as f:
        config = json.load(f)
    if args.blocks:
        config["num_layers"] = args.blocks
    device = torch.device(args.device)
    gib = lambda b: f"{b / 2**30:.2f}"
    print(f"Wan2.1-T2V-1.3B architecture ({config['num_layers']} blocks), random weights, latents {args.batch} x 16 x "
          f"{args.latent}, {args.device}{' (RSS, not GPU memory)' if args.device == 'cpu' else ''}")
    print("| weights | resident after a step GiB (measured / planned) | step peak GiB (measured / planned) | step time s |")
    print("| --- | ---: | ---: | ---: |")
    for rank in ([] if args.no_full else [0]) + list(args.lora):
        got, plan = run(config, rank, args, device), predicted(config, rank, args)
        resident = plan["state"] - sum(v["grads"] for v in plan["exact"].values())
        print(f"| {'LoRA r = ' + str(rank) if rank else 'full'} | {gib(got['state'])} / {gib(resident)} | "
              f"{gib(got['peak'])} / {gib(plan['total'])} | {got['step_s']:.2f} |", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
