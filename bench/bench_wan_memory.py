"""Per-rank train-state memory of wan_dfd's FSDP2 set-up, measured at 1 and 2 ranks (CPU / gloo), and the
memory table it predicts for the real Wan2.1-T2V-1.3B on 8 x 80 GB GPUs.

  python bench/bench_wan_memory.py                 # measure (launches torchrun 1 and 2 ranks), then the table
  python bench/bench_wan_memory.py --table-only    # the computed table alone
  python bench/bench_wan_memory.py --out bench/results/wan_memory.md    # the result file docs/training.md quotes

Measured: bytes each rank holds for parameters + gradients + AdamW state (local FSDP2 shards of the student and
the fake score, plus the frozen teacher's parameter shard), after real dfd.train steps on a small random Wan; and the
mean time of one student step (with its fake-score updates). Target: 2 ranks <= 0.55 x 1 rank.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from result_file import add_out_flag, result_file  # noqa: E402

BENCH_NET = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
                 text_dim=64, freq_dim=32, ffn_dim=512, num_layers=4, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
REAL_NET = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)  # Wan2.1-T2V-1.3B config.json


def worker(out: str, steps: int) -> None:
    """Runs under torchrun: shard three networks, train `steps` DFD steps, report this rank's bytes."""
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel

    import dfd
    import dfd_video.distributed
    import wan_dfd
    torch.set_num_threads(1)
    d = dfd_video.distributed.setup_distributed("cpu")
    adapter = wan_dfd.WanAdapter()
    nets = []
    for seed in (0, 1, 2):  # teacher, student, fake: identical on every rank before sharding
        torch.manual_seed(seed)
        nets.append(WanTransformer3DModel(**BENCH_NET))
    teacher_net, student_net, fake_net = nets
    for net, trainable in ((teacher_net, False), (student_net, True), (fake_net, True)):
        dfd_video.distributed.shard(net, adapter.blocks(net), d, None, adapter.fp32_islands(net), checkpointing=trainable,
                      trainable=trainable)
    g = torch.Generator().manual_seed(d.rank)
    uncond = {"text": torch.randn(512, 64, generator=g)}
    teacher = adapter.denoiser(teacher_net, 5.0, uncond)
    student, fake = adapter.denoiser(student_net, None, None), adapter.denoiser(fake_net, None, None)
    opt_s = torch.optim.AdamW(student_net.parameters(), lr=1e-5)
    opt_f = torch.optim.AdamW(fake_net.parameters(), lr=1e-5)
    per_rank_batch = 2 // d.world  # the same global batch (2) at every world size

    def data():
        while True:
            yield torch.randn(per_rank_batch, 16, 2, 8, 8, generator=g), torch.randn(per_rank_batch, 512, 64, generator=g)

    c = dfd.DFDConfig(fake_updates=1, monitor_every=0)
    times = []
    clock = [time.perf_counter()]

    def on_log(step, logs):
        now = time.perf_counter()
        times.append(now - clock[0])
        clock[0] = now

    dfd.train(student, teacher, fake, opt_s, opt_f, data(), steps, c, rank=d.rank, log=on_log)
    x, cond = next(data())
    t = torch.full((per_rank_batch,), 0.5)
    for net in (student, fake):  # gradients as they stand at the optimizer step
        net(x, t, cond).float().square().mean().backward()
    states = dfd_video.distributed.train_state_bytes(student_net, fake_net, opt_s, opt_f)
    frozen = dfd_video.distributed.train_state_bytes(teacher_net)
    full = sum(p.numel() for p in student_net.parameters())  # global parameter count (DTensor numel is global)
    got = [None] * d.world
    dist.all_gather_object(got, {"trained": states, "teacher": frozen})
    if d.main:
        json.dump({"world": d.world, "per_rank": got, "params": full, "step_s": times[1:] or times}, open(out, "w"))
    dfd_video.distributed.teardown_distributed()


def measure(steps: int) -> list[dict]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    for world in (1, 2):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   os.path.abspath(__file__), "--worker", f.name, "--steps", str(steps)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"the {world}-rank worker failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
            rows.append(json.load(open(f.name)))
    return rows


# ---------------------------------------------------------------------------------------------------
# The computed table for the real model.

GB = 1e9


def real_table(gpus: int = 8, hbm_gb: float = 80.0, reserve_gb: float = 6.0) -> tuple[str, int]:
    """Memory per GPU for DFD on Wan2.1-T2V-1.3B at 81 x 480 x 832, as wan_dfd stores it under FSDP2 with
    bf16 mixed precision and activation checkpointing. Returns (markdown table, largest per-GPU batch)."""
    from diffusers import WanTransformer3DModel
    with torch.device("meta"):
        net = WanTransformer3DModel(**REAL_NET)
    P = sum(p.numel() for p in net.parameters())
    P_block = sum(p.numel() for p in net.blocks[0].parameters())
    dim, ffn, layers = 1536, REAL_NET["ffn_dim"], REAL_NET["num_layers"]
    L = 21 * (60 // 2) * (104 // 2)  # tokens: latent 21 x 60 x 104, patch 1 x 2 x 2
    text = 512
    rows = []
    sharded = lambda b: b / gpus
    rows.append(("student: fp32 params + fp32 grads + AdamW m, v (16 B/param), sharded", sharded(16 * P)))
    rows.append(("fake score: same", sharded(16 * P)))
    rows.append(("teacher: fp32 params, frozen, sharded", sharded(4 * P)))
    rows.append(("student EMA (only with --ema > 0): fp32, sharded", sharded(4 * P)))
    # unsharded bf16 copies while a network computes: the root (embeddings, head) + the current block + the
    # prefetched next block (FSDP2 default), for the one network running at a time
    gathered = 2 * (P - layers * P_block) + 2 * 2 * P_block
    rows.append(("all-gathered bf16 params in flight (root + 2 blocks)", gathered))
    fixed = sum(b for _, b in rows)
    # activations, per sample, of the one network run with grad (student or fake score):
    #   checkpointed inputs of every block:       layers x L x dim x 2 B (bf16)
    #   one block recomputed during backward:    ~ L x (14 dim + 2 ffn) x 2 B (q, k, v, attention out, two norms
    #     and their fp32 temporaries ~ 4 x dim x 4 B, modulated inputs, the FFN's hidden and its GELU) + cross-attn
    #     over 512 text tokens (negligible) -- attention itself by SDPA (flash / memory-efficient), no L x L matrix
    ckpt_inputs = layers * L * dim * 2
    block = L * (14 * dim + 2 * ffn) * 2
    # the no-grad forwards (teacher with CFG: batch 2B; fake score) hold one block's activations at a time
    nograd = 2 * L * (6 * dim + ffn) * 2
    per_sample = ckpt_inputs + max(block, nograd)  # the no-grad forwards end before the backward recomputes
    usable = hbm_gb * GB - reserve_gb * GB
    batch = int((usable - fixed) // per_sample)
    md = ["| per GPU (8 x 80 GB, FSDP2 over 8 ranks) | GB |", "| --- | ---: |"]
    md += [f"| {name} | {b / GB:.2f} |" for name, b in rows]
    md += [f"| **fixed total** | **{fixed / GB:.2f}** |",
           f"| activations per sample: {layers} checkpointed block inputs ({L} tokens x {dim} x bf16) | {ckpt_inputs / GB:.2f} |",
           f"| + the larger of: one block recomputed in backward ({block / GB:.2f}) and the no-grad teacher (CFG, "
           f"2x batch) / fake forwards, one block at a time ({nograd / GB:.2f}) | {max(block, nograd) / GB:.2f} |",
           f"| **activations per sample** | **{per_sample / GB:.2f}** |",
           f"| usable (80 GB - {reserve_gb:g} GB CUDA context, NCCL buffers, fragmentation) | {usable / GB:.2f} |",
           f"| **largest per-GPU batch** | **{batch}** (global {batch * gpus}) |"]
    head = (f"Wan2.1-T2V-1.3B: {P / 1e9:.3f} B parameters ({layers} blocks of {P_block / 1e6:.1f} M + "
            f"{(P - layers * P_block) / 1e6:.1f} M outside the blocks); three networks, two trained.")
    return head + "\n\n" + "\n".join(md), batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help="DFD student steps per measurement")
    ap.add_argument("--table-only", action="store_true", help="print the computed 1.3B table and exit")
    add_out_flag(ap)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps)
    with result_file(args.out, "Per-rank train state of the FSDP2 set-up at 1 and 2 ranks (CPU / gloo), and the "
                     "older rule of thumb for Wan2.1-T2V-1.3B"):
        run(args)


def run(args: argparse.Namespace) -> None:
    if not args.table_only:
        rows = measure(args.steps)
        one = max(r["trained"] + r["teacher"] for r in rows[0]["per_rank"])
        print(f"bench model: {rows[0]['params'] / 1e6:.2f} M parameters per network; global batch 2; CPU / gloo")
        print("| ranks | train state per rank (params + grads + AdamW, student + fake) | + teacher params | total | vs 1 rank | step time (s) |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            worst = max(r["per_rank"], key=lambda x: x["trained"] + x["teacher"])
            tot = worst["trained"] + worst["teacher"]
            step = sum(r["step_s"]) / len(r["step_s"])
            print(f"| {r['world']} | {worst['trained'] / 2**20:.2f} MiB | {worst['teacher'] / 2**20:.2f} MiB | "
                  f"{tot / 2**20:.2f} MiB | {tot / one:.3f} | {step:.3f} |")
        ratio = max(x["trained"] + x["teacher"] for x in rows[1]["per_rank"]) / one
        print(f"ratio 2 ranks / 1 rank = {ratio:.3f} (target <= 0.55): {'ok' if ratio <= 0.55 else 'MISSED'}")
    table, _ = real_table()
    print()
    print(table)


if __name__ == "__main__":
    main()
