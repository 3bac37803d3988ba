"""Throughput of a training run, logged with every step the way torchtitan logs it: samples and tokens per second,
and from a FLOP count of the networks' passes in a step, the achieved TFLOP/s per GPU and the MFU.

The count is of model FLOPs (what the step has to compute, PaLM's and torchtitan's convention): a forward of one clip
through the transformer is counted once, exactly, by torch's FlopCounterMode on the meta device (every matmul,
convolution and attention product; no memory, no compute); a backward is twice a forward (gradients of the
activations and of the weights; once with --lora-rank, whose frozen weights get none); the recomputation of
activation checkpointing is not counted. A student step of dfd.train runs, per micro-batch sample,
  each of the --fake-updates fake-score updates: a student forward (no grad) + a fake-score forward and backward,
  the student update: a student forward and backward + a fake-score forward + the teacher (two forwards with CFG),
  every --monitor-every steps: one more teacher call (teacher_gap),
  with --backward-sim: before each update, the student's expected forwards from noise to its input time,
and --grad-accum micro-batches of each. docs/tools.md has the formula and the hand count of the tiny test model.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn

# Dense bf16 tensor-core peak of one GPU in TFLOP/s (vendor datasheets, the numbers torchtitan uses), matched in this
# order against torch.cuda.get_device_name(): the first key the name contains wins ("H100 NVL" before "H100").
PEAK_BF16_TFLOPS = {"H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GB200": 2500.0,
                    "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "MI300X": 1300.0, "MI325X": 1300.0}


def forward_flops(spec, net: nn.Module, latent_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward of `net` (built on the meta device) on one clip of latents [C, T, H, W], with the
    spec's stand-in conditioning (check_items) of the shapes the network takes; no guidance."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        items, _ = spec.check_items(net, tuple(latent_shape), torch.Generator().manual_seed(0))
        items = {k: v[None] for k, v in items.items()}
        x_t, t = torch.zeros((1, *latent_shape)), torch.full((1,), 0.5)
    cond = spec.make_cond(items, torch.device("meta"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        spec.denoiser(net)(x_t, t, cond)
    return int(counter.get_total_flops())


def expected_simulation_forwards(n_times: int, batch: int) -> float:
    """--backward-sim: the student runs its first k steps from noise on the whole micro-batch, k the largest index
    drawn for its samples (each uniform in 0 .. n_times - 1): E[k] = sum_{j >= 1} P(k >= j) = sum (1 - (j/n)^B)."""
    return sum(1.0 - (j / n_times) ** batch for j in range(1, n_times))


def forwards_per_sample(args: argparse.Namespace, step: int, per_rank: int) -> float:
    """One-clip forwards (a backward counting 2, or 1 with --lora-rank) that student step `step` runs per micro-batch
    sample, summed over its fake-score updates, its student update and --grad-accum."""
    backward = 1 if getattr(args, "lora_rank", 0) else 2
    teacher = 2 if args.guidance not in (None, 1.0) else 1  # conditional + unconditional branch
    sim = expected_simulation_forwards(len(args.student_ts), per_rank) if args.backward_sim else 0.0
    fake_update = sim + 1 + (1 + backward)  # student sample (no grad); fake score forward and backward
    student_update = sim + (1 + backward) + 1 + teacher  # student forward and backward; fake score; teacher
    monitor = teacher if args.monitor_every and step % args.monitor_every == 0 else 0
    return args.grad_accum * (args.fake_updates * fake_update + student_update + monitor)


def peak_tflops(flag: float | None, device: torch.device, dtype: torch.dtype | None) -> float | None:
    """--peak-tflops when given; else, for bf16 on CUDA, the device's row of PEAK_BF16_TFLOPS; else None (no MFU)."""
    if flag:
        return flag
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class Throughput:
    """Per logged step: samples_per_s and tokens_per_s (global, every rank's micro-batches), tflops (achieved per
    GPU: this rank's model FLOPs over the step's wall time) and, when the peak is known, mfu_pct = 100 tflops / peak.
    forward: FLOPs of one clip's forward (None: not counted, no tflops); tokens: the transformer's tokens per clip."""

    def __init__(self, args: argparse.Namespace, per_rank: int, world: int, forward: int | None, tokens: int,
                 peak: float | None):
        self.args, self.per_rank, self.world = args, per_rank, world
        self.forward, self.tokens, self.peak = forward, tokens, peak
        self.clips_per_step = (args.fake_updates + 1) * args.grad_accum * per_rank * world  # data drawn per step

    def flops(self, step: int) -> float:
        """Model FLOPs one rank computes in student step `step`."""
        return forwards_per_sample(self.args, step, self.per_rank) * self.per_rank * self.forward

    def __call__(self, step: int, seconds: float) -> dict[str, float]:
        seconds = max(seconds, 1e-9)
        out = {"samples_per_s": self.clips_per_step / seconds, "tokens_per_s": self.clips_per_step * self.tokens / seconds}
        if self.forward is not None:
            out["tflops"] = self.flops(step) / seconds / 1e12
            if self.peak:
                out["mfu_pct"] = 100.0 * out["tflops"] / self.peak
        return out


def open_throughput(spec, args: argparse.Namespace, arch: nn.Module, latent_shape: tuple[int, ...], per_rank: int,
                    world: int, device: torch.device, dtype: torch.dtype | None, main: bool) -> Throughput:
    """The run's Throughput: the forward counted on `arch` (the transformer on the meta device), the peak looked up.
    A count that fails (a network the meta device cannot run) leaves tflops out, with one line saying so."""
    try:
        forward = forward_flops(spec, arch, latent_shape)
    except Exception as e:  # the count is a report, never a reason to stop a run
        forward = None
        if main:
            print(f"throughput: no FLOP count, so no tflops / mfu_pct in the log ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160] if str(e) else ''})", file=sys.stderr)
    peak = peak_tflops(getattr(args, "peak_tflops", None), device, dtype)
    if main and peak is None and device.type == "cuda" and forward is not None:
        print(f"throughput: no bf16 peak known for {torch.cuda.get_device_name(device)}, so no mfu_pct in the log "
              "(pass --peak-tflops)", file=sys.stderr)
    return Throughput(args, per_rank, world, forward, spec.tokens(arch, latent_shape), peak)
