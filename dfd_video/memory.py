"""Estimated peak GPU memory per rank of a `train` run: what `check` prints before the first job.

An ESTIMATE, in two parts of different quality:
  exact   the bytes FSDP2 keeps per rank for the training state, as dfd_video.train builds it: every network
          sharded over the ranks on dim 0 (each tensor padded to a multiple of the world size), stored in fp32
          whatever the compute dtype (MixedPrecisionPolicy casts a gathered copy), so per network of N parameters
          about 4 N / world bytes of weights; the student and the fake score add fp32 gradients (4 N / world) and
          AdamW's two moments (8 N / world, and a 4-byte step count per tensor); the teacher and the EMA hold weights only.
  rough   what the forward and backward add on top: FSDP2's unsharded copies of the block being run and the one
          prefetched (in the compute dtype, plus fp32 gradients of one block), and activations, counted as a few
          tensors of width D (or the MLP width F) per token and block, with activation checkpointing keeping only
          each block's input. The activation formula is a rule of thumb (attention kernels, the allocator's caching
          and fragmentation, the text encoder of `--text online` are not modelled): read it as an order of magnitude.
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
                    block_params: int = 0, tokens: int = 0, batch_per_rank: int = 1, hidden: int = 0, mlp: int = 0,
                    n_blocks: int = 0, text_tokens: int = 0, checkpointing: bool = True) -> dict:
    """Bytes per rank for training with DFD (student + fake score trained with AdamW, teacher frozen, optional EMA).

    param_shapes: the shapes of one network's parameters (all four networks share the architecture).
    compute_bytes: bytes per element of the compute dtype (2 for bf16, 4 for fp32).
    block_params: parameters of the largest repeated block; tokens: video tokens per sample (T' h' w' after
    patching); hidden / mlp: the transformer width D and MLP width F; text_tokens: the cross-attention context.
    Returns {"exact": {net: {"params", "grads", "optimizer"}}, "rough": {...}, "total": ...}, all in bytes.
    """
    n = sharded_numel(param_shapes, world)
    # fp32 master weights and grads; AdamW's exp_avg and exp_avg_sq, plus its fp32 step counter per tensor
    train = {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n + 4 * len(param_shapes)}
    exact = {"student": dict(train), "fake_score": dict(train), "teacher": {"params": 4 * n, "grads": 0, "optimizer": 0}}
    if ema:
        exact["ema"] = {"params": 4 * n, "grads": 0, "optimizer": 0}
    # FSDP2: the running block and the prefetched one, unsharded in the compute dtype; one block's fp32 gradients
    gather = 2 * block_params * compute_bytes + 4 * block_params
    # activations per block and sample: ~12 tensors of width D (norms, q k v, attention out, residuals, modulation)
    # and ~2 of width F (the MLP), per video token; cross-attention keys / values over the text tokens
    per_block = (tokens * (12 * hidden + 2 * mlp) + text_tokens * 2 * hidden) * compute_bytes * batch_per_rank
    block_input = tokens * hidden * compute_bytes * batch_per_rank
    if checkpointing:  # each block's input is kept; one block's activations are rebuilt at a time in backward
        activations = n_blocks * block_input + per_block
    else:
        activations = n_blocks * per_block
    # the teacher runs without grad on a CFG batch of 2B: one block's activations at a time
    activations = max(activations, 2 * per_block)
    rough = {"fsdp_buffers": gather, "activations": activations}
    total = sum(sum(v.values()) for v in exact.values()) + sum(rough.values())
    return {"exact": exact, "rough": rough, "total": total, "world": world, "params_per_network": sum(
        math.prod(tuple(s)) for s in param_shapes), "sharded_elements_per_rank": n}
