"""Peak host memory (RSS) per rank while `train` builds its networks, at 2 ranks (CPU / gloo), beyond the rank's own
parameter shards, as a multiple of one network's fp32 bytes. Goal: <= 1.5. With --resume, the same while
`train --resume` builds its networks and loads both optimizers' states from a checkpoint (own AdamW shards subtracted
too; a full optimizer state is 2 networks x 2 moments = 4 networks' fp32 bytes). With --lora, a --lora-rank 16 run
(the fake score's adapter on the teacher's base: two frozen bases and two adapters, all subtracted).

  python bench/bench_host_memory.py                    # this checkout
  python bench/bench_host_memory.py --resume           # resuming from a step-0 checkpoint instead
  python bench/bench_host_memory.py --lora             # a --lora-rank 16 run (two bases: teacher, student)
  python bench/bench_host_memory.py --code OTHER_DIR   # another checkout of the project (e.g. an older commit)
  python bench/bench_host_memory.py --out bench/results/host_memory.md   # the result file docs/training.md quotes

A random Wan transformer of ~70 M parameters (280 MB in fp32, large next to the ~0.4 GB torch itself takes) is saved
as the base model, a second one as the DMD2 student (.safetensors: the fake score then starts from the teacher), and
`train` runs under torchrun until its networks are built (teacher, student, fake score; no EMA), where each rank
reports its peak RSS above what it held before `train` started. On CPU the rank's own fp32 shards of the three
networks live in host memory too (on a GPU they go to the device); they are counted exactly (FSDP2's dim-0 split,
padded) and subtracted, so what is left is what loading costs the host.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_RANK = 16
NET = dict(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=128, in_channels=16, out_channels=16,
           text_dim=64, freq_dim=64, ffn_dim=4096, num_layers=4, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


def worker(code: str, folder: str, mode: str) -> None:
    """Under torchrun: `train` from this folder's model / checkpoint / data, stopped once the networks are built
    (mode "build", or "lora" with --lora-rank LORA_RANK), or once they are built and the optimizer states loaded
    from the checkpoint a "save" run left (mode "resume"); mode "save" trains one step and writes that checkpoint."""
    sys.path.insert(0, code)
    import torch.distributed as dist

    import torch
    from diffusers import WanTransformer3DModel

    import dfd
    import wan_dfd
    rank = int(os.environ["RANK"])
    with torch.device("meta"):  # diffusers' lazy imports happen here, not inside what is measured
        WanTransformer3DModel(**NET)
    base = rss()

    class Built(Exception):
        pass

    def stop(*a, **k):  # dfd.train is called right after the networks and optimizers exist
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump({"base": base, "peak": peak}, f)
        dist.barrier()
        raise Built

    argv = ["train", "--model-dir", os.path.join(folder, "model"), "--data", os.path.join(folder, "data"),
            "--dmd2-ckpt", os.path.join(folder, "dmd2.safetensors"), "--out", os.path.join(folder, "run"),
            "--device", "cpu", "--batch-size", "2", "--monitor-every", "0"]
    if mode == "save":
        wan_dfd.main([*argv, "--steps", "1", "--save-every", "1"])
        return
    dfd.train = stop
    try:
        wan_dfd.main([*argv, "--steps", "2", *(["--resume", "latest"] if mode == "resume" else []),
                      *(["--lora-rank", str(LORA_RANK)] if mode == "lora" else [])])
    except Built:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--code", default=ROOT, help="the checkout whose wan_dfd.py to measure (default: this one)")
    ap.add_argument("--resume", action="store_true", help="measure `train --resume` (networks + optimizer states)")
    ap.add_argument("--lora", action="store_true", help=f"measure a --lora-rank {LORA_RANK} run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="build", help=argparse.SUPPRESS)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from result_file import add_out_flag, result_file
    add_out_flag(ap)
    args = ap.parse_args()
    if args.worker:
        return worker(args.code, args.worker, args.mode)
    what = "a train --resume" if args.resume else f"a --lora-rank {LORA_RANK} train" if args.lora else "a train"
    with result_file(args.out, f"Peak host memory per rank while {what} run loads its networks (2 ranks, CPU / gloo)"):
        run(args)


def run(args: argparse.Namespace) -> None:
    sys.path.insert(0, ROOT)
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from dfd_video.data import ShardWriter
    from dfd_video.planning.memory import lora_shapes, network_sizes, sharded_numel
    from wan_dfd import WanAdapter
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        net = WanTransformer3DModel(**NET)
        net.save_pretrained(os.path.join(folder, "model", "transformer"))
        n = sum(p.numel() for p in net.parameters())
        net_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
        own = sharded_numel([p.shape for p in net.parameters()], 2)
        shards = 3 * 4 * own  # teacher, student, fake; fp32
        if args.lora:  # the teacher's and the student's bases, and two adapters (student, fake on the teacher's base)
            shards = 2 * 4 * own + 2 * 4 * sharded_numel(lora_shapes(network_sizes(WanAdapter(), net), LORA_RANK), 2)
        if args.resume:  # AdamW's exp_avg and exp_avg_sq shards of the student and the fake score, fp32
            shards += 2 * 8 * own
        torch.manual_seed(1)
        save_file({k: v.contiguous() for k, v in WanTransformer3DModel(**NET).state_dict().items()},
                  os.path.join(folder, "dmd2.safetensors"))
        del net
        w = ShardWriter(os.path.join(folder, "data"), per_shard=4)
        for _ in range(4):
            w.add({"latents": torch.randn(16, 1, 4, 4), "text": torch.randn(512, NET["text_dim"])})
        w.close({"adapter": "wan"}, {"text": torch.randn(512, NET["text_dim"])})
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        for mode in (("save", "resume") if args.resume else ("lora",) if args.lora else ("build",)):
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                os.path.abspath(__file__), "--worker", folder, "--code", os.path.abspath(args.code),
                                "--mode", mode], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"the torchrun workers failed ({mode}):\n{r.stderr[-3000:]}")
        ranks = [json.load(open(os.path.join(folder, f"rank{k}.json"))) for k in range(2)]
    what = ("teacher, student and fake score built and both optimizer states loaded by `train --resume`" if args.resume
            else f"teacher, student and fake score of a --lora-rank {LORA_RANK} run built" if args.lora
            else "teacher, student and fake score built")
    code = "this checkout" if os.path.abspath(args.code) == ROOT else args.code
    print(f"{code}: a {n / 1e6:.1f} M-parameter Wan, {net_bytes / 2**20:.0f} MiB in fp32 per network; {what} "
          "at 2 ranks")
    print("| rank | peak RSS above the start of `train` | - own shards | = loading cost | / one network's fp32 bytes |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for k, r in enumerate(ranks):
        cost = r["peak"] - r["base"] - shards
        worst = max(worst, cost / net_bytes)
        print(f"| {k} | {(r['peak'] - r['base']) / 2**20:.0f} MiB | {shards / 2**20:.0f} MiB | {cost / 2**20:.0f} MiB | "
              f"{cost / net_bytes:.2f} |")
    if args.resume or args.lora:
        print(f"worst rank: {worst:.2f} x one network")
    else:
        print(f"worst rank: {worst:.2f} x one network (goal <= 1.5): {'ok' if worst <= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
