"""Estimated peak GPU memory per rank of a `train` run: what `check` prints before the first job.

An ESTIMATE, in two parts of different quality:
  exact   the bytes FSDP2 keeps per rank for the training state, as dfd_video.train builds it: every network
          sharded over the ranks on dim 0 (each tensor padded to a multiple of the world size), stored in fp32
          whatever the compute dtype (MixedPrecisionPolicy casts a gathered copy), so per network of N parameters
          about 4 N / world bytes of weights; the student and the fake score add fp32 gradients (4 N / world) and
          AdamW's two moments (8 N / world, and a 4-byte step count per tensor); the teacher and the EMA hold weights only.
  rough   what the forward and backward add on top: FSDP2's unsharded copies of the root and of the block being
          run and the one prefetched (in the compute dtype), and activations, counted as a few tensors of width D
          (or the MLP width F) per token and block, with activation checkpointing keeping only each block's input
          (the model of bench/bench_wan_memory.py and the README's table). A rule of thumb: attention kernels' own
          buffers, the allocator's caching and fragmentation, the CUDA context and NCCL buffers, and the text
          encoder of `--text online` are not modelled; read it as an order of magnitude.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

GiB = 2**30


def sharded_numel(shapes: Iterable[Sequence[int]], world: int) -> int:
    """Elements one rank holds when every tensor is split on dim 0 over `world` ranks (FSDP2's Shard(0), padded)."""
    total = 0
    for s in shapes:
        s = tuple(s)
        if not s:
            total += 1
            continue
        total += math.ceil(s[0] / world) * math.prod(s[1:])
    return total


def estimate_memory(param_shapes: Sequence[Sequence[int]], world: int, *, compute_bytes: int = 2, ema: bool = False,
                    block_params: int = 0, root_params: int = 0, tokens: int = 0, batch_per_rank: int = 1,
                    hidden: int = 0, mlp: int = 0, n_blocks: int = 0, checkpointing: bool = True) -> dict:
    """Bytes per rank for training with DFD (student + fake score trained with AdamW, teacher frozen, optional EMA).

    param_shapes: the shapes of one network's parameters (all four networks share the architecture).
    compute_bytes: bytes per element of the compute dtype (2 for bf16, 4 for fp32).
    block_params: parameters of the largest repeated block; root_params: those outside the blocks; tokens: video
    tokens per sample (T' h' w' after patching); hidden / mlp: the transformer width D and MLP width F.
    Returns {"exact": {net: {"params", "grads", "optimizer"}}, "rough": {...}, "total": ...}, all in bytes. The
    rough part is the model of bench/bench_wan_memory.py (the README's 1.3B table), so the two agree.
    """
    n = sharded_numel(param_shapes, world)
    # fp32 master weights and grads; AdamW's exp_avg and exp_avg_sq, plus its fp32 step counter per tensor
    train = {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n + 4 * len(param_shapes)}
    exact = {"student": dict(train), "fake_score": dict(train), "teacher": {"params": 4 * n, "grads": 0, "optimizer": 0}}
    if ema:
        exact["ema"] = {"params": 4 * n, "grads": 0, "optimizer": 0}
    # FSDP2, for the one network running at a time: the root (embeddings, head) and the running and the prefetched
    # block, unsharded in the compute dtype
    gather = (root_params + 2 * block_params) * compute_bytes
    # activations per sample of the network run with grad: with checkpointing each block's input (tokens x D), and
    # one block recomputed in backward, ~ tokens x (14 D + 2 F) (q, k, v, attention out, norms and their fp32
    # temporaries, modulated inputs, the MLP's hidden state and its activation; SDPA, no tokens^2 matrix; the
    # cross-attention over 512 text tokens is negligible). The no-grad forwards (the teacher with CFG: 2 branches;
    # the fake score) hold one block's ~ tokens x (6 D + F) per branch at a time and end before the backward.
    block = tokens * (14 * hidden + 2 * mlp) * compute_bytes
    nograd = 2 * tokens * (6 * hidden + mlp) * compute_bytes
    if checkpointing:
        per_sample = n_blocks * tokens * hidden * compute_bytes + max(block, nograd)
    else:
        per_sample = max(n_blocks * block, nograd)
    rough = {"fsdp_buffers": gather, "activations": per_sample * batch_per_rank}
    total = sum(sum(v.values()) for v in exact.values()) + sum(rough.values())
    return {"exact": exact, "rough": rough, "activations_per_sample": per_sample, "total": total, "world": world,
            "params_per_network": sum(math.prod(tuple(s)) for s in param_shapes), "sharded_elements_per_rank": n}
