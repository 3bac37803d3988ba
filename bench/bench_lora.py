"""LoRA vs full weights on the bench model, side by side in one run: the step-time ratio LoRA / full and the
train-state bytes ratio LoRA / full (CPU, world of one, FSDP2 as dfd_video.train sets it up).

  python bench/bench_lora.py                       # r = 8, latents 16 x 3 x 16 x 16, 12 rounds
  python bench/bench_lora.py --rank 4 16 --rounds 20 --clock wall
  python bench/bench_lora.py --rank 8 32 --out bench/results/lora.md      # the result file docs/memory.md quotes

A step is one fake-score update and one student update (dfd.fake_score_step + dfd.student_step: the student, the
teacher with CFG, the fake score), timed for full weights and for LoRA in alternation, after a warm-up round,
medians, on this thread's CPU clock (other jobs on the machine barely move it; --clock wall on a quiet machine).
Train state: parameters, gradients (as they stand at an optimizer step) and AdamW state, all networks (teacher, student,
fake score; LoRA: the fake score's adapter on the teacher's base), from dfd_video.distributed.train_state_bytes,
beside the planner's exact prediction (dfd_video.planning.memory.training_state).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_wan_memory import BENCH_NET  # noqa: E402
from result_file import add_out_flag, result_file  # noqa: E402

TEXT_LEN = 512


def setup(rank: int, d, adapter):
    """(student, teacher, fake denoisers, their two optimizers, the networks whose state counts)."""
    from diffusers import WanTransformer3DModel

    from dfd_video import distributed, lora
    nets = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        nets.append(WanTransformer3DModel(**BENCH_NET))
    teacher_net, student_net, fake_net = nets
    g = torch.Generator().manual_seed(0)
    uncond = {"text": torch.randn(TEXT_LEN, 64, generator=g)}
    if rank:
        info = {"rank": rank, "alpha": float(rank), "targets": adapter.lora_targets}
        teacher_net = fake_net = lora.shard_lora(lora.attach(teacher_net, info, 1), adapter, d, None, True)
        student_net = lora.shard_lora(lora.attach(student_net, info, 0), adapter, d, None, True)
        teacher = lora.AdaptersOff(adapter.denoiser(teacher_net, 5.0, uncond), teacher_net)
        counted = (student_net, teacher_net)
    else:
        for net, trainable in ((teacher_net, False), (student_net, True), (fake_net, True)):
            distributed.shard(net, adapter.blocks(net), d, None, adapter.fp32_islands(net), trainable, trainable)
        teacher = adapter.denoiser(teacher_net, 5.0, uncond)
        counted = (student_net, fake_net, teacher_net)
    adamw = lambda net: torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-5)
    opt_s, opt_f = adamw(student_net), adamw(fake_net)
    return (adapter.denoiser(student_net, None, None), teacher, adapter.denoiser(fake_net, None, None),
            opt_s, opt_f, counted)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, nargs="+", default=[8], help="LoRA ranks to compare with full weights")
    ap.add_argument("--latent", default="3x16x16", help="latent T x H x W of each clip (tokens = T H W / 4)")
    ap.add_argument("--batch", type=int, default=1, help="clips per step")
    ap.add_argument("--rounds", type=int, default=12, help="timed steps per setting (after one warm-up)")
    ap.add_argument("--clock", default="thread", choices=("thread", "wall"), help="thread: this thread's CPU time")
    add_out_flag(ap)
    args = ap.parse_args()
    with result_file(args.out, "LoRA vs full weights on the bench model (CPU)"):
        run(args)


def run(args: argparse.Namespace) -> None:
    import dfd
    import wan_dfd
    from dfd_video import distributed
    from dfd_video.planning import memory
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    torch.set_num_threads(1)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    adapter = wan_dfd.WanAdapter()
    d = distributed.setup_distributed("cpu")
    T, h, w = (int(v) for v in args.latent.split("x"))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(args.batch, 16, T, h, w, generator=g), torch.randn(args.batch, TEXT_LEN, 64, generator=g))
    c = dfd.DFDConfig(fake_updates=1, monitor_every=0)
    settings = [0, *args.rank]
    runs = {r: setup(r, d, adapter) for r in settings}
    times = {r: [] for r in settings}
    for i in range(args.rounds + 1):
        for r in settings:  # alternate, so a slow spell on a shared machine hits every setting
            student, teacher, fake, opt_s, opt_f, _ = runs[r]
            t0 = clock()
            dfd.fake_score_step(student, fake, opt_f, [batch], c, i, 0)
            dfd.student_step(student, teacher, fake, opt_s, [batch], c, i)
            if i:
                times[r].append(clock() - t0)
    state = {}
    for r in settings:
        student, teacher, fake, opt_s, opt_f, counted = runs[r]
        x, cond = batch
        for net in (student, fake):  # the gradients as they stand at the optimizer step (dfd zeroes them after it)
            net(x, torch.full((args.batch,), 0.5), cond).float().square().mean().backward()
        for net in counted:  # FSDP2 leaves a no-grad network's root gathered after its forward: count the shards
            net.reshard()
        state[r] = distributed.train_state_bytes(*counted, opt_s, opt_f)
    sizes = memory.network_sizes(adapter, memory.meta_network({"_class_name": "WanTransformer3DModel", **BENCH_NET}))
    predicted = {r: sum(sum(v.values()) for v in memory.training_state(
        sizes["shapes"], 1, lora_shapes=memory.lora_shapes(sizes, r) if r else ()).values()) for r in settings}
    distributed.teardown_distributed()
    n = sum(p.numel() for p in runs[0][5][0].parameters())
    print(f"bench model: {n / 1e6:.2f} M parameters per network, latents {args.batch} x 16 x {args.latent}, "
          f"{args.rounds} timed steps each (fake-score + student update), {args.clock} clock, CPU, 1 thread")
    print("| weights | step time (median, s) | step time / full | train state (MiB) | train state / full | "
          "planner's train state (exact) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    base_t = statistics.median(times[0])
    for r in settings:
        med = statistics.median(times[r])
        print(f"| {'LoRA r = ' + str(r) if r else 'full weights'} | {med:.3f} | {med / base_t:.3f} | "
              f"{state[r] / 2**20:.2f} | {state[r] / state[0]:.3f} | "
              f"{'equal' if predicted[r] == state[r] else f'DIFFERS: {predicted[r]} vs {state[r]}'} |")


if __name__ == "__main__":
    main()
