"""Peak GPU memory per rank of a `train` run: the older estimate (estimate_memory, bench/bench_wan_memory.py) and the
planner (plan_memory) that `plan` and `check` print.

An ESTIMATE, in two parts of different quality:
  exact   the bytes FSDP2 keeps per rank for the training state, as dfd_video.train builds it: every network
          sharded over the ranks on dim 0 (each tensor padded to a multiple of the world size), stored in fp32
          whatever the compute dtype (MixedPrecisionPolicy casts a gathered copy), so per network of N parameters
          about 4 N / world bytes of weights; the student and the fake score add fp32 gradients (4 N / world) and
          AdamW's two moments (8 N / world, and a 4-byte step count per tensor); the teacher and the EMA hold weights only.
  rough   what the forward and backward add on top: FSDP2's unsharded copies of the root and of the block being
          run and the one prefetched (in the compute dtype), and activations, counted as a few tensors of width D
          (or the MLP width F) per token and block, with activation checkpointing keeping only each block's input
          (the model of bench/bench_wan_memory.py and of the table in docs/training.md). A rule of thumb: attention kernels' own
          buffers, the allocator's caching and fragmentation, the CUDA context and NCCL buffers, and the text
          encoder of `--text online` are not modelled; read it as an order of magnitude.

`plan` and `check` (plan_memory) refine this: the exact part with LoRA (frozen bases stored fp32 without gradients
or AdamW state, adapter weights trained; the fake score on the teacher's base when it starts from the teacher), and
activations counted from what autograd actually saves for backward in the model's blocks (its table in
planning/tables.py, measured by bench/bench_memory_plan.py with saved_tensors_hooks), checked there against
measurement on the bench model. See docs/memory.md.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from dfd_video.planning.tables import PUBLIC_CONFIG, PUBLIC_CONFIGS, SAVED_FOR_BACKWARD

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
    rough part is the model of bench/bench_wan_memory.py (the 1.3B table in docs/training.md), so the two agree.
    """
    n = sharded_numel(param_shapes, world)
    exact = training_state(param_shapes, world, ema=ema)
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


# ---------------------------------------------------------------------------------------------------
# The planner (`plan`): exact training state with LoRA, activations from what the blocks save for backward.


def training_state(param_shapes: Sequence[Sequence[int]], world: int, *, ema: bool = False,
                   lora_shapes: Sequence[Sequence[int]] = (), shared_fake: bool = True) -> dict:
    """Exact bytes per rank of parameters, gradients and AdamW state, per network, as dfd_video.train builds them.

    Full weights (no lora_shapes): every network stores fp32 shards (4 B/element); the student and the fake score
    add fp32 gradients (4 B) and AdamW's exp_avg and exp_avg_sq (8 B) plus a 4-byte step count per tensor; teacher
    and EMA hold weights only. LoRA (lora_shapes: the adapter tensors of one network, lora_A [r, in] and lora_B
    [out, r] per target layer): the bases stay fp32 and frozen (no gradients, no AdamW state), the adapters train;
    with shared_fake the fake score's adapter sits on the teacher's base (dfd_video.lora), so the fake score adds no
    base of its own; the EMA covers the student's adapter only."""
    n = sharded_numel(param_shapes, world)
    frozen = lambda elems: {"params": 4 * elems, "grads": 0, "optimizer": 0}
    if not lora_shapes:
        # fp32 master weights and grads; AdamW's exp_avg and exp_avg_sq, plus its fp32 step counter per tensor
        train = {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n + 4 * len(param_shapes)}
        exact = {"student": dict(train), "fake_score": dict(train), "teacher": frozen(n)}
        if ema:
            exact["ema"] = frozen(n)
        return exact
    a = sharded_numel(lora_shapes, world)
    adapter = {"grads": 4 * a, "optimizer": 8 * a + 4 * len(lora_shapes)}
    exact = {"student": {"params": 4 * (n + a), **adapter},
             "fake_score": {"params": 4 * (a if shared_fake else n + a), **adapter},
             "teacher": frozen(n)}
    if ema:
        exact["ema"] = frozen(a)
    return exact


def network_sizes(spec, net) -> dict:
    """What the memory model needs from a network (real or on the meta device): parameter shapes, the largest block,
    widths, patch size, heads, the text width the network reads (text_dim) and the one its cross-attention reads
    (context_dim: D for Wan, whose text embedder maps to D; Cosmos's text_embed_dim), Cosmos's adaLN-LoRA width, the
    patch embedding's input per token, and the (in, out) of every linear layer --lora-rank targets."""
    import torch.nn as nn
    cfg = net.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    blocks = spec.blocks(net)
    per_block = [sum(p.numel() for p in b.parameters()) for b in blocks]
    targets = [(m.in_features, m.out_features) for n, m in net.named_modules()
               if isinstance(m, nn.Linear) and re.fullmatch(spec.lora_targets, n)]
    text_dim = getattr(cfg, "text_dim", None) or getattr(cfg, "text_embed_dim", None) or hidden
    if getattr(cfg, "use_crossattn_projection", False):  # Cosmos-Predict2.5: Qwen's 100352 channels -> text_embed_dim
        text_dim = cfg.crossattn_proj_in_channels
    return {"shapes": [tuple(p.shape) for p in net.parameters()], "n_blocks": len(blocks),
            "block_params": max(per_block, default=0),
            "root_params": sum(p.numel() for p in net.parameters()) - sum(per_block),
            "hidden": hidden, "mlp": getattr(cfg, "ffn_dim", None) or int(getattr(cfg, "mlp_ratio", 4.0) * hidden),
            "patch": tuple(cfg.patch_size), "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
            "text_dim": text_dim, "context_dim": getattr(cfg, "text_embed_dim", None) or hidden,
            "adaln_lora_dim": getattr(cfg, "adaln_lora_dim", None) or 0,
            "patch_in": (cfg.in_channels + bool(getattr(cfg, "concat_padding_mask", False)))
                        * math.prod(cfg.patch_size),
            "lora_targets": targets}


def lora_shapes(sizes: dict, rank: int) -> list[tuple[int, int]]:
    """peft's adapter tensors for rank r: lora_A.weight [r, in] and lora_B.weight [out, r] per target (no bias)."""
    return [s for i, o in sizes["lora_targets"] for s in ((rank, i), (o, rank))]


# the public transformer configs (with their sources), shared with tests/test_real_width.py
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def read_config(spec, model_dir: str | None, name: str | None = None) -> tuple[dict, str]:
    """The transformer's config.json: from --model-dir (its transformer/ folder, or the folder itself), else the
    public config `name` of the model in dfd_video/configs/ (None: its first; the file's "_source" says where the
    values come from). Returns (config, where it was read)."""
    if model_dir is None:
        if spec.name not in PUBLIC_CONFIG:
            raise ValueError(f"no public config of {spec.family} is stored; give --model-dir")
        path = os.path.join(CONFIGS, PUBLIC_CONFIGS[spec.name][name] if name else PUBLIC_CONFIG[spec.name])
    else:
        path = next((p for p in (os.path.join(model_dir, "transformer", "config.json"),
                                 os.path.join(model_dir, "config.json")) if os.path.exists(p)), None)
        if path is None:
            raise ValueError(f"--model-dir {model_dir}: no transformer/config.json or config.json")
    try:
        with open(path) as f:
            return json.load(f), path
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable config ({e})") from None


def meta_network(config: dict):
    """The transformer built on the meta device from its config (no weights, no memory)."""
    import diffusers
    import torch
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def gan_sizes(spec, net, disc_type: str | None = None, blocks=None) -> dict:
    """What DMD2's GAN head (--gan-weight > 0) adds to a run, from the network alone: the discriminator's parameter
    shapes (built on the meta device), its type and feature blocks (the flags, else FastGen's config for the
    architecture; dfd_video.gan.gan_settings), and the elements one head keeps for backward per input element."""
    import torch
    from dfd_video import gan
    disc_type, blocks, source = gan.gan_settings(spec, net, disc_type, blocks)
    with torch.device("meta"):
        disc = gan.Discriminator(disc_type, blocks, spec.feature_dim(net))
    if disc_type in gan.MULTISCALE:  # per scale: the 1x1 conv's output, its norm and activation at full size, then
        scales, reduction, _ = gan.MULTISCALE[disc_type]  # the same three after pooling by s in each dimension
        per_input = 1 + sum(3 + 3 / s**3 for s in scales) / reduction  # + the input the 1x1 convs share
    else:  # dit_simple_conv3d: the input, then conv / norm / activation at half the channels and 1/8 of the size
        per_input = 1 + 3 / 16
    return {"shapes": [tuple(q.shape) for q in disc.parameters()], "disc_type": disc_type, "blocks": blocks,
            "source": source, "heads": len(blocks), "per_input": per_input}


@dataclass
class PlanConfig:
    """One planned `train` run."""
    world: int = 1                  # ranks (GPUs); every network is sharded over all of them
    lora_rank: int = 0              # --lora-rank (0: full weights)
    shared_fake: bool = True        # LoRA: the fake score starts from the teacher and sits on its base
    compute_bytes: int = 2          # 2: bf16 compute (FSDP2 mixed precision), 4: fp32
    ema: bool = False               # --ema > 0
    batch_per_gpu: int = 1          # clips per rank per micro-batch
    latent: tuple = (16, 21, 60, 104)  # C, T, H, W of one clip's latents
    text_len: int = 512             # conditioning tokens the cross-attention reads
    checkpointing: bool = True      # activation checkpointing of every block of the trained networks
    kv_cache: bool = False          # a causal student (wan_dfd.CausalWanAdapter): its rollout's KV cache
    gan: dict | None = None         # gan_sizes(...) of a --gan-weight > 0 run (None: no GAN head)


def shape_elements(sizes: dict, cfg: PlanConfig) -> dict[str, int]:
    """Elements of each symbolic shape the saved_for_backward tables count, for one clip of cfg.latent."""
    S = math.prod(cfg.latent[1:]) // math.prod(sizes["patch"])  # video tokens
    T, D, F, H, r = cfg.text_len, sizes["hidden"], sizes["mlp"], sizes["heads"], cfg.lora_rank
    frames = cfg.latent[1] // sizes["patch"][0]
    return {"S*D": S * D, "S*F": S * F, "S*H": S * H, "S": S, "T*D": T * D, "T": T, "S*r": S * r, "T*r": T * r,
            "D": D, "latent": math.prod(cfg.latent), "T*text": T * sizes["text_dim"], "S*head_dim": S * sizes["head_dim"],
            # Cosmos: its adaLN-LoRA modulation runs per token (timestep per latent frame), S x adaln_lora_dim; its
            # cross-attention reads text of width context_dim != D and normalises the keys per head (T x H); its
            # patch embedding is a linear layer on patch_in channels per token (latent, condition and padding masks);
            # its time embedding runs once per latent frame
            "S*A": S * sizes["adaln_lora_dim"], "T*ctx": T * sizes["context_dim"], "T*H": T * H,
            "S*patch": S * sizes["patch_in"], "frames": frames, "frames*D": frames * D}


def activation_bytes(sizes: dict, saved: dict, cfg: PlanConfig) -> dict:
    """Bytes autograd keeps for backward while the trained network (student or fake score) runs with grad, per clip
    and for cfg.batch_per_gpu clips, from `saved` (the model's table in planning/tables.py: how many tensors of each shape
    one block saves, counted by bench/bench_memory_plan.py) and its root (embeddings, rope, head, and what every
    block reads and saves once: the RoPE tables, the text).

    Without checkpointing every block's saves are alive at the end of the forward. With it, each block keeps only its
    inputs (the hidden states, tokens x D in the compute dtype; and, once for all blocks, the shared inputs no
    backward needs without checkpointing, the table's optional "checkpointed": Cosmos's per-token time embedding) and
    backward recomputes one block at a time. The tables are counted under bf16 compute; under fp32 compute an
    optional "full_fp32" / "lora_fp32" table takes their place (where a bf16 block's fp32 copies are the tensors
    themselves, e.g. Cosmos's q / k RMSNorm inputs)."""
    size = shape_elements(sizes, cfg)
    S, D, c = size["S"], sizes["hidden"], cfg.compute_bytes
    k = "lora" if cfg.lora_rank else "full"
    k = saved.get(f"{k}_fp32", saved[k]) if c == 4 else saved[k]
    count = lambda table: sum(size[shape] * (n_c * c + n_32 * 4) for shape, (n_c, n_32) in table.items())
    block, root = count(k["block"]), count(k["root"])
    inputs = sizes["n_blocks"] * S * D * c + count(k.get("checkpointed", {}))
    per_clip = (inputs + block if cfg.checkpointing else sizes["n_blocks"] * block) + root
    return {"per_clip": per_clip, "block": block, "root": root, "checkpointed_inputs": inputs if cfg.checkpointing else 0,
            "tokens": S, "total": per_clip * cfg.batch_per_gpu}


def plan_memory(sizes: dict, cfg: PlanConfig, saved: dict | None = None) -> dict:
    """Bytes per GPU by part for one planned run. Exact: parameters, gradients, optimizer state, teacher (the
    training state, as dfd_video.train builds it). Counted: activations (what the blocks save for backward, from
    `saved`; None: the rough rule of estimate_memory). Rough: FSDP2's gathered parameters (the running network's root
    and two blocks in the compute dtype, plus one block's fp32 unsharded gradient before its reduce-scatter when all
    weights train) and the working buffers (the no-grad teacher with CFG, 2 branches per clip: an fp32 residual and
    norm and the MLP hidden state per token and branch)."""
    lshapes = lora_shapes(sizes, cfg.lora_rank) if cfg.lora_rank else ()
    exact = training_state(sizes["shapes"], cfg.world, ema=cfg.ema, lora_shapes=lshapes, shared_fake=cfg.shared_fake)
    trained = [v for name, v in exact.items() if name != "teacher"]
    c, D, F = cfg.compute_bytes, sizes["hidden"], sizes["mlp"]
    gathered = (sizes["root_params"] + 2 * sizes["block_params"]) * c + (0 if cfg.lora_rank else 4 * sizes["block_params"])
    if saved is not None:
        act = activation_bytes(sizes, saved, cfg)
    else:
        S = math.prod(cfg.latent[1:]) // math.prod(sizes["patch"])
        rough = estimate_memory(sizes["shapes"], 1, compute_bytes=c, tokens=S, hidden=D, mlp=F,
                                n_blocks=sizes["n_blocks"], checkpointing=cfg.checkpointing)
        act = {"per_clip": rough["activations_per_sample"], "tokens": S,
               "total": rough["activations_per_sample"] * cfg.batch_per_gpu}
    working_per_clip = 2 * act["tokens"] * (2 * D * 4 + F * c)
    # the causal rollout (causal_wan.rollout) keeps every layer's keys and values of all frames in the compute dtype
    # until the student's backward; its exit forwards with grad save what one full-video forward saves (the
    # activations above, which count the recompute of a whole-video block: an upper bound for a 3-frame block)
    kv = sizes["n_blocks"] * 2 * act["tokens"] * D * c if cfg.kv_cache else 0
    parts = {"parameters": sum(v["params"] for v in trained), "gradients": sum(v["grads"] for v in trained),
             "optimizer": sum(v["optimizer"] for v in trained), "teacher": exact["teacher"]["params"],
             "gathered": gathered, "activations": act["total"], "working": working_per_clip * cfg.batch_per_gpu,
             **({"kv_cache": kv * cfg.batch_per_gpu} if kv else {})}
    gan_per_clip = 0
    if cfg.gan is not None:
        # exact: the discriminator trains like the networks (fp32 shards, gradients, AdamW); rough: the student's
        # GAN term backpropagates through the teacher (checkpointed like a trained network), and the discriminator
        # keeps what its convolutions save, per head, for the real and the fake features at once (fake phase)
        n = sharded_numel(cfg.gan["shapes"], cfg.world)
        exact["discriminator"] = {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n + 4 * len(cfg.gan["shapes"])}
        parts["discriminator"] = sum(exact["discriminator"].values())
        disc = 2 * cfg.gan["heads"] * cfg.gan["per_input"] * act["tokens"] * D * c
        gan_per_clip = act["per_clip"] + int(disc)
        parts["gan_activations"] = gan_per_clip * cfg.batch_per_gpu
    state = sum(sum(v.values()) for v in exact.values())
    return {"parts": parts, "exact": exact, "state": state, "activations": act["total"],
            "activation_detail": act, "per_clip": act["per_clip"] + working_per_clip + kv + gan_per_clip,
            "fixed": state + gathered, "total": sum(parts.values()), "counted": saved is not None,
            "adapter_params": sum(math.prod(s) for s in lshapes)}


def plan_model(spec, sizes: dict, **cfg) -> dict:
    """plan_memory for a model's network: PlanConfig(**cfg) with the spec's text length, and the model's table of
    what autograd saves (planning/tables.py; a model without one gets the rough rule)."""
    return plan_memory(sizes, PlanConfig(text_len=spec.text_len, **cfg), SAVED_FOR_BACKWARD.get(spec.name))


def part_rows(plan: dict, lora: bool, ema: bool, batch: int) -> list[tuple[str, float, str]]:
    """plan_memory's parts as (what, bytes per GPU, exact / counted / rough) rows, as `plan` and `check` print them."""
    parts = plan["parts"]
    return [("parameters: student, fake score" + (", EMA" if ema else "") + " (fp32 shards)", parts["parameters"],
             "exact"),
            ("gradients (fp32 shards)", parts["gradients"], "exact"),
            ("optimizer state (AdamW m, v, step)", parts["optimizer"], "exact"),
            ("teacher (fp32 shards, frozen)", parts["teacher"], "exact"),
            ("gathered parameters in flight (root + 2 blocks" + ("" if lora else ", + 1 block's fp32 gradient") + ")",
             parts["gathered"], "rough"),
            (f"activations ({batch} clip(s))", parts["activations"], "counted" if plan["counted"] else "rough"),
            ("working buffers (the no-grad teacher with CFG)", parts["working"], "rough"),
            *([("KV cache of the causal student's rollout (every layer, all frames)", parts["kv_cache"], "exact")]
              if "kv_cache" in parts else [])] + (
        [("GAN discriminator (fp32 shards, gradients, AdamW)", parts["discriminator"], "exact"),
         (f"GAN activations (the teacher with grad, the discriminator; {batch} clip(s))", parts["gan_activations"],
          "rough")] if "discriminator" in parts else [])


def largest_batch(plan: dict, gpu_bytes: float, reserve_bytes: float) -> int:
    """Clips per GPU that fit: (GPU - reserve - fixed) // per clip (0: not even one)."""
    return max(0, int((gpu_bytes - reserve_bytes - plan["fixed"]) // plan["per_clip"]))
