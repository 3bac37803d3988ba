"""Benchmark: what a DFD student step costs next to a DMD step and next to the network passes it is made of.

    python bench/bench_step.py                      # both sizes, about a minute on one CPU thread
    python bench/bench_step.py --sizes video --repeats 60 --threads 2 --clock wall
    python bench/bench_step.py --out bench/results/step.md    # the result file docs/method.md quotes

For each size, on the same three networks (student, fake score, teacher) in one process, it times
  dmd    dfd.student_step with p = 0 (the teacher sees x~_t, the student's noised sample)
  dfd    dfd.student_step with p = 1 (the teacher sees x_t, the real sample with the same eps and t)
  bare   the passes a step consists of: student forward + backward, one fake-score forward, one teacher
         forward (no grad), on inputs prepared beforehand
The variants are interleaved (rotating order each round) so that drift in machine load hits all of them
alike; after a warm-up the median of the repeats is reported. By default the clock is the thread's CPU time
with one torch thread, which other processes on a shared machine barely disturb (--clock wall for elapsed). DFD adds no network call, so dfd / dmd should
be 1.00 +- 0.03; the step's own work (input draws, loss, clipping, the optimizer) should be small next to the
networks when they are big: step / bare <= 1.05 at the video size. At the 2D-point size the networks are tiny
and the fixed per-step overhead dominates; that ratio is printed for information only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dfd  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from result_file import add_out_flag, result_file  # noqa: E402


class PointMLP(torch.nn.Module):
    """Denoiser for 2D points: (x_t [B, 2], t [B]) -> x0_hat [B, 2]."""

    def __init__(self, hidden: int = 256, depth: int = 3):
        super().__init__()
        layers, d = [], 3
        for _ in range(depth):
            layers += [torch.nn.Linear(d, hidden), torch.nn.SiLU()]
            d = hidden
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(d, 2))

    def forward(self, x_t, t, cond=None):
        return self.net(torch.cat([x_t, t[:, None].to(x_t.dtype)], 1))


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
        self.mod = torch.nn.Linear(dim, 2 * dim)  # t-conditioned shift/scale, as in DiT-style video models

    def forward(self, h, temb):
        shift, scale = self.mod(temb)[:, None].chunk(2, -1)
        a = self.norm1(h) * (1 + scale) + shift
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class VideoDiT(torch.nn.Module):
    """A small transformer-like denoiser on latents [B, C, T, H, W]: 1x2x2 patches, t embedding, blocks."""

    def __init__(self, channels: int, dim: int, depth: int, heads: int, patch: int = 2):
        super().__init__()
        self.p = patch
        self.embed = torch.nn.Linear(channels * patch * patch, dim)
        self.temb = torch.nn.Sequential(torch.nn.Linear(1, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim))
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.out = torch.nn.Linear(dim, channels * patch * patch)

    def forward(self, x_t, t, cond=None):
        B, C, T, H, W = x_t.shape
        p = self.p
        tok = x_t.reshape(B, C, T, H // p, p, W // p, p).permute(0, 2, 3, 5, 1, 4, 6).reshape(B, -1, C * p * p)
        h = self.embed(tok)
        temb = self.temb(t[:, None].to(x_t.dtype))
        for blk in self.blocks:
            h = blk(h, temb)
        y = self.out(h).reshape(B, T, H // p, W // p, C, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return y.reshape(B, C, T, H, W)


def build(size: str, a) -> tuple[callable, tuple[int, ...]]:
    if size == "points":
        return (lambda: PointMLP(a.mlp_hidden)), (a.mlp_batch, 2)
    return (lambda: VideoDiT(a.channels, a.dim, a.depth, a.heads)), (a.batch, a.channels, a.frames, a.height, a.height)


def bench(size: str, a) -> dict[str, list[float]]:
    make, shape = build(size, a)
    torch.manual_seed(0)
    student, fake, teacher_net = make(), make(), make()
    teacher_net.requires_grad_(False)
    teacher = lambda x_t, t, cond: teacher_net(x_t, t, cond)
    opt = torch.optim.Adam(student.parameters(), lr=1e-5)
    x_real = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    batch = [(x_real, None)]
    cfg = {"dmd": dfd.DFDConfig(p=0.0), "dfd": dfd.DFDConfig(p=1.0)}

    # inputs for the bare passes, drawn once
    g = torch.Generator().manual_seed(2)
    x_in, t_in = dfd.student_input(x_real, dfd.STUDENT_TS, g)
    eps = torch.randn(shape, generator=g)
    t = torch.rand(shape[0], generator=g)
    upstream = torch.randn(shape, generator=g) / x_real.numel()

    def bare():
        x_gen = student(x_in, t_in, None)
        with torch.no_grad():  # in the order of a step: both score forwards while G's graph is alive
            x_t = dfd.forward_diffusion(x_gen.detach(), eps, t)
            fake(x_t, t, None)
            teacher(x_t, t, None)
        x_gen.backward(upstream)  # the same backward pass as the loss's; only the incoming gradient differs
        for q in student.parameters():
            q.grad = None

    state = {"step": 0}

    def step(name):
        def run():
            dfd.student_step(student, teacher, fake, opt, batch, cfg[name], state["step"])
            state["step"] += 1
        return run

    variants = {"dmd": step("dmd"), "dfd": step("dfd"), "bare": bare}
    names = list(variants)
    times = {n: [] for n in names}
    wall = {n: [] for n in names}
    for r in range(a.warmup + a.repeats[size]):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate so no variant always runs first
        for n in order:
            c0, w0 = time.thread_time(), time.perf_counter()
            variants[n]()
            c1, w1 = time.thread_time(), time.perf_counter()
            if r >= a.warmup:
                times[n].append(c1 - c0)
                wall[n].append(w1 - w0)
    return times if a.clock == "cpu" else wall


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["points", "video"], choices=["points", "video"])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: steadiest on a shared machine)")
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                    help="cpu: this thread's CPU time (needs --threads 1; insensitive to other processes "
                         "sharing the cores); wall: elapsed time")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (default 200 points, 20 video)")
    ap.add_argument("--mlp-hidden", type=int, default=256)
    ap.add_argument("--mlp-batch", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--height", type=int, default=32, help="latent height = width (even)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    add_out_flag(ap)
    a = ap.parse_args(argv)
    if a.threads < 1 or a.warmup < 0 or (a.repeats is not None and a.repeats < 1):
        raise SystemExit("bench_step.py: --threads and --repeats must be >= 1 and --warmup >= 0")
    if a.clock == "cpu" and a.threads != 1:
        raise SystemExit("bench_step.py: --clock cpu measures one thread; use --threads 1 or --clock wall")
    if a.height % 2 or a.dim % a.heads:
        raise SystemExit("bench_step.py: --height must be even and --dim divisible by --heads")
    a.repeats = {"points": a.repeats or 200, "video": a.repeats or 20}
    torch.set_num_threads(a.threads)
    with result_file(a.out, "DMD vs DFD student step against the bare network passes (CPU)"):
        run(a)


def run(a: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {a.threads} thread(s), {a.clock} clock; "
          "median (and 25-75% range) in ms over the timed rounds")
    rows = []
    for size in a.sizes:
        times = bench(size, a)
        med = {n: statistics.median(v) for n, v in times.items()}
        for n, v in times.items():
            q = statistics.quantiles(v, n=4)
            print(f"  {size:6s} {n:5s} {1e3 * med[n]:9.3f}   ({1e3 * q[0]:.3f} - {1e3 * q[2]:.3f})   n={len(v)}")
        rows.append((size, med["dfd"] / med["dmd"], med["dmd"] / med["bare"], med["dfd"] / med["bare"]))
    print("\n  size    DFD/DMD   DMD step/bare   DFD step/bare")
    for size, r1, r2, r3 in rows:
        print(f"  {size:6s} {r1:8.3f}   {r2:13.3f}   {r3:13.3f}")
    print("  targets: DFD/DMD 1.00 +- 0.03; step/bare <= 1.05 at the video size")


if __name__ == "__main__":
    main()
