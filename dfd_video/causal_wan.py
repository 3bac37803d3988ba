"""Block-causal Wan2.1 (Self-Forcing / CausVid students) on diffusers' WanTransformer3DModel weights and names.

A Self-Forcing student is Wan2.1-T2V-1.3B whose self-attention sees only its own block of latent frames and the blocks
before it (3 frames per block), generated block by block with a KV cache. This module gives:
  CausalWanTransformer   WanTransformer3DModel with the same parameters (so every diffusers folder, Self-Forcing /
                         CausVid .pt and FastGen CausalWan checkpoint loads through the project's loaders), whose
                         forward also takes per-frame timesteps, a block-causal mask (frames_per_block) or a KVCache.
                         Called as diffusers calls it, it IS diffusers' model (the teacher and critic use it so).
  rollout                Self-Forcing's training rollout (pipeline/self_forcing_training.py of guandeh17/Self-Forcing
                         and csy2077/DFD-self-forcing): the G that dfd.student_step trains, through dfd.train's
                         `generate` hook.
  stream_sample          Self-Forcing's inference (pipeline/causal_inference.py): block by block with the KV cache.
  save_self_forcing      the .pt that Self-Forcing's inference.py loads (`export`); its LMDB latents are read by
                         dfd_video/lmdb_latents.py (`prepare`).

wan_dfd.py holds the command-line side (flags, --preset sf-dfd, which checkpoints read as causal) and imports this
module only when a causal student is built, because diffusers is a slow import.
Conventions are wan_dfd.py's: x_t = (1 - t) x0 + t eps, t in [0, 1], the network takes t * 1000 and predicts
v = eps - x0; latents [B, C, T, H, W] (Self-Forcing stores [B, T, C, H, W]).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformerBlock

import dfd

# ---------------------------------------------------------------------------------------------------
# The network


@dataclass
class KVCache:
    """Self-attention keys and values of the committed (context) frames, per layer, RoPE already applied, one chunk
    [B, L_block, heads, head_dim] per committed call (chunks are never copied or changed: a block's backward, and
    its activation-checkpointing recompute, see the context as it was, and no step holds a second copy).
    A forward with commit=True appends its own; the next block attends to them. Built under no_grad, so no
    gradient flows into the context (Self-Forcing's rollout keeps none there either)."""
    k: list = field(default_factory=list)  # per layer: list of chunks
    v: list = field(default_factory=list)
    frames: int = 0  # latent frames committed; the RoPE time offset of the next call

    def layer(self, i: int):
        """(keys, values) of layer i as tuples of chunks (a snapshot), or None when nothing is committed."""
        return (tuple(self.k[i]), tuple(self.v[i])) if i < len(self.k) else None

    def commit(self, chunks: list) -> None:
        for i, (k, v) in enumerate(chunks):
            if i == len(self.k):
                self.k.append([])
                self.v.append([])
            self.k[i].append(k)
            self.v[i].append(v)


class CausalWanAttnProcessor(WanAttnProcessor):
    """diffusers' Wan self-attention, plus: keys and values of earlier frames (`prefix`: tuples of chunks) put in front
    of the current ones, and the current keys and values handed back in `store` for the cache. Without prefix and
    store it is diffusers' processor (the masked full-sequence path passes attention_mask through)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 prefix=None, store=None):
        if prefix is None and store is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))  # [B, L, heads, head_dim]
        cos, sin = rotary_emb
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if store is not None:
            store.append((k.detach(), v.detach()))
        if prefix is not None:
            k = torch.cat([*(c.to(k.dtype) for c in prefix[0]), k], 1)
            v = torch.cat([*(c.to(v.dtype) for c in prefix[1]), v], 1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan RoPE (interleaved pairs), as its processor applies it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out.type_as(x)


class CausalWanBlock(WanTransformerBlock):
    """diffusers' WanTransformerBlock with per-frame modulation (temb [B, F, 6, D]: every token of a frame shares
    its frame's timestep), an optional attention mask, and the KV-cache arguments of CausalWanAttnProcessor."""

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb, attention_mask=None, prefix=None,
                store=None):
        if temb.ndim != 4:  # [B, 6, D]: diffusers' own block
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        B, L, D = hidden_states.shape
        frames = temb.shape[1]
        per_frame = lambda x: x.unflatten(1, (frames, L // frames))  # [B, F, hw, D]
        mod = (self.scale_shift_table.unsqueeze(0) + temb.float()).unsqueeze(2)  # [B, F, 1, 6, D]
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (m.squeeze(3) for m in mod.chunk(6, dim=3))
        h = per_frame(hidden_states)
        norm = (self.norm1(h.float()) * (1 + scale_msa) + shift_msa).type_as(h).flatten(1, 2)
        kw = {} if prefix is None and store is None else {"prefix": prefix, "store": store}
        attn = per_frame(self.attn1(norm, None, attention_mask, rotary_emb, **kw))
        h = (h.float() + attn * gate_msa).type_as(h)
        flat = h.flatten(1, 2)
        flat = flat + self.attn2(self.norm2(flat.float()).type_as(flat), encoder_hidden_states, None, None)
        h = per_frame(flat)
        ff = per_frame(self.ffn((self.norm3(h.float()) * (1 + c_scale) + c_shift).type_as(h).flatten(1, 2)))
        return (h.float() + ff.float() * c_gate).type_as(h).flatten(1, 2)


class CausalWanTransformer(WanTransformer3DModel):
    """WanTransformer3DModel (same config, parameters and names) that can also run block-causally.

    forward(hidden_states [B, C, F, H, W], timestep [B] or per frame [B, F], encoder_hidden_states, ...,
            frames_per_block=None, cache=None, commit=False):
      neither frames_per_block nor cache, timestep [B]: diffusers' own forward (bidirectional);
      frames_per_block=n: one pass with the block-causal mask (a token sees its own block of n frames and the
        blocks before it: Self-Forcing's _prepare_blockwise_causal_attn_mask); n >= F is full attention;
      cache=KVCache: the frames continue the cache (RoPE time offset = cache.frames, attention over the cached
        context and themselves); commit=True appends their keys and values to it (call it under no_grad)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for block in self.blocks:
            block.__class__ = CausalWanBlock
            block.attn1.set_processor(CausalWanAttnProcessor())
    # diffusers' from_config reads the config keys off this signature: show it the parent's
    __init__.__signature__ = inspect.signature(WanTransformer3DModel.__init__)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                return_dict=True, attention_kwargs=None, frames_per_block: int | None = None,
                cache: KVCache | None = None, commit: bool = False):
        if frames_per_block is None and cache is None and timestep.ndim == 1:
            return super().forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                                   return_dict, attention_kwargs)
        if encoder_hidden_states_image is not None or attention_kwargs:
            raise NotImplementedError("the causal Wan path is text-to-video only, without attention_kwargs")
        B, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        start = cache.frames if cache is not None else 0
        rotary = rope_from(self.rope, frames // p_t, height // p_h, width // p_w, start // p_t)
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        t = timestep if timestep.ndim == 2 else timestep[:, None].expand(B, frames)  # [B, F]
        temb, proj, text, _ = self.condition_embedder(t.flatten(), encoder_hidden_states, None,
                                                      timestep_seq_len=frames)
        proj = proj.unflatten(2, (6, -1))  # [B, F, 6, D]
        mask = None
        if frames_per_block is not None and frames_per_block < frames:
            mask = block_causal_mask(frames // p_t, (height // p_h) * (width // p_w), frames_per_block // p_t,
                                     x.device)
        stores = [] if commit else None
        for i, block in enumerate(self.blocks):
            store = [] if commit else None
            prefix = cache.layer(i) if cache is not None else None
            extra = (mask, prefix, store) if cache is not None else (mask,)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, text, proj, rotary, *extra)
            else:
                x = block(x, text, proj, rotary, *extra)
            if commit:
                stores.append(store[0])
        if commit:
            cache.commit(stores)
            cache.frames += frames
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unsqueeze(2).chunk(2, dim=3)
        x = x.unflatten(1, (frames // p_t, -1))  # [B, F, hw, D]
        x = (self.norm_out(x.float()) * (1 + scale.squeeze(3)) + shift.squeeze(3)).type_as(x)
        x = self.proj_out(x.flatten(1, 2))
        x = x.reshape(B, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        out = x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def rope_from(rope: nn.Module, frames: int, height: int, width: int, start: int = 0):
    """diffusers' WanRotaryPosEmbed tables for a [frames, height, width] token grid whose first frame is frame
    `start` of the video (its forward starts at 0; the KV-cache path continues the time axis)."""
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        f, h, w = table.split(split, dim=1)
        grid = torch.cat([f[start:start + frames].view(frames, 1, 1, -1).expand(frames, height, width, -1),
                          h[:height].view(1, height, 1, -1).expand(frames, height, width, -1),
                          w[:width].view(1, 1, width, -1).expand(frames, height, width, -1)], dim=-1)
        out.append(grid.reshape(1, frames * height * width, 1, -1))
    return tuple(out)


def block_causal_mask(frames: int, tokens_per_frame: int, frames_per_block: int, device) -> torch.Tensor:
    """[L, L] bool, True where query token i may attend key j: block(j) <= block(i), blocks of frames_per_block frames."""
    block = torch.arange(frames, device=device).div(frames_per_block, rounding_mode="floor")
    block = block.repeat_interleave(tokens_per_frame)
    return block[None, :] <= block[:, None]


# ---------------------------------------------------------------------------------------------------
# Rollouts: Self-Forcing's training rollout and its streaming sampler


Block = Callable[..., torch.Tensor]  # (x_t, t [B], cond, cache=, commit=) -> x0: a CausalWanDenoiser


def _blocks(frames: int, frames_per_block: int) -> list[tuple[int, int]]:
    if frames % frames_per_block:
        raise ValueError(f"{frames} latent frames are not a whole number of blocks of {frames_per_block}")
    return [(s, s + frames_per_block) for s in range(0, frames, frames_per_block)]


def rollout(student: Block, noise: torch.Tensor, cond: Any, ts, exit_step: int, generator: torch.Generator,
            frames_per_block: int = 3, context_sigma: float = 0.0) -> torch.Tensor:
    """Self-Forcing's training rollout (SelfForcingTrainingPipeline.inference_with_trajectory, same_step_across_blocks):
    block by block, the few-step sampler with fresh noise between steps runs without grad up to step `exit_step`,
    whose x0 keeps its grad (the only place gradient reaches the student); then the block's x0, re-noised to
    context_sigma with fresh noise, runs once at t = 0 without grad to commit its keys and values to the KV cache.
    Self-Forcing noises that context with add_noise at timestep 0, which its scheduler turns into the smallest grid
    sigma (grid_sigma(0) = 0.00498); FastGen's rollout uses the clean x0 (context_sigma = 0).
    Draws, from `generator`, in Self-Forcing's order: per block, the re-noise of each skipped step, then the
    context noise (only when context_sigma > 0). Returns G [B, C, T, H, W]."""
    B = noise.shape[0]
    full = lambda t: torch.full((B,), float(t), device=noise.device)
    cache, out = KVCache(), []
    for s, e in _blocks(noise.shape[2], frames_per_block):
        x = noise[:, :, s:e]
        for i in range(exit_step):
            with torch.no_grad():
                x0 = student(x, full(ts[i]), cond, cache=cache)
                fresh = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
                x = dfd.forward_diffusion(x0, fresh, full(ts[i + 1]))
        x0 = student(x, full(ts[exit_step]), cond, cache=cache)  # with grad when grad is enabled
        out.append(x0)
        with torch.no_grad():
            ctx = x0.detach()
            if context_sigma > 0:
                fresh = torch.randn(ctx.shape, generator=generator, device=ctx.device, dtype=ctx.dtype)
                ctx = dfd.forward_diffusion(ctx, fresh, full(context_sigma))
            student(ctx, full(0.0), cond, cache=cache, commit=True)
    return torch.cat(out, dim=2)


def make_generate(ts, frames_per_block: int = 3, context_sigma: float = 0.0):
    """dfd.train's `generate` hook for Self-Forcing: G from a data-free rollout from fresh noise of x_real's shape,
    with one exit step for every block drawn uniformly from the student's steps (same_step_across_blocks), the same
    on every rank (Self-Forcing broadcasts it from rank 0: under FSDP every rank must make the same calls)."""
    ts = tuple(ts)

    def generate(student, x_real: torch.Tensor, cond: Any, generator: torch.Generator,
                 shared: torch.Generator) -> torch.Tensor:
        exit_step = int(torch.randint(len(ts), (), generator=shared, device=shared.device))
        noise = torch.randn(x_real.shape, generator=generator, device=x_real.device, dtype=x_real.dtype)
        return rollout(student, noise, cond, ts, exit_step, generator, frames_per_block, context_sigma)
    return generate


@torch.no_grad()
def stream_sample(student: Block, noise: torch.Tensor, cond: Any, ts, generator: torch.Generator | None = None,
                  renoise: bool = True, frames_per_block: int = 3, context_t: float = 0.0,
                  on_block: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Self-Forcing's CausalInferencePipeline: each block runs every step of the few-step sampler (dfd.sample's
    rule: fresh noise between steps when renoise, else the noise x_t implies), then its x0 runs once at
    t = context_t (Self-Forcing's context_noise, 0) to commit the block to the KV cache. on_block(x0 of the block)
    is called as each block is done (streaming). Returns the whole x0 [B, C, T, H, W]."""
    B = noise.shape[0]
    full = lambda t: torch.full((B,), float(t), device=noise.device)
    cache, out = KVCache(), []
    for s, e in _blocks(noise.shape[2], frames_per_block):
        block = lambda x_t, t, c: student(x_t, t, c, cache=cache)
        x0 = dfd.sample(block, noise[:, :, s:e], cond, ts, generator=generator, renoise=renoise)
        if on_block is not None:
            on_block(x0)
        out.append(x0)
        student(x0, full(context_t), cond, cache=cache, commit=True)
    return torch.cat(out, dim=2)


# ---------------------------------------------------------------------------------------------------
# Self-Forcing's .pt (export) and its LMDB latents (prepare)

_TO_ORIGINAL = [  # diffusers name -> original Wan name (the inverse of diffusers' convert_wan_transformer_to_diffusers)
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn2", "cross_attn"), ("attn1", "self_attn"),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("norm2", "norm__swap"), ("norm3", "norm2"), ("norm__swap", "norm3"),  # diffusers' norm2 is Wan's norm3
]


def to_original_wan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers WanTransformer3DModel state dict under the original Wan names (CausalWanModel's)."""
    out = {}
    for k, v in sd.items():
        if k == "scale_shift_table":
            k = "head.modulation"
        elif k.startswith("proj_out."):
            k = "head.head." + k[len("proj_out."):]
        elif k.endswith(".scale_shift_table"):
            k = k[: -len("scale_shift_table")] + "modulation"
        for a, b in _TO_ORIGINAL:
            k = k.replace(a, b)
        out[k] = v
    return out


def save_self_forcing(sd: dict[str, torch.Tensor], path: str) -> None:
    """{"generator": {"model." + original Wan name: tensor}}: what Self-Forcing's inference.py --checkpoint_path
    loads into its WanDiffusionWrapper (strict), written atomically."""
    import os
    from dfd_video.files import atomic_write, write_error
    gen = {"model." + k: v.detach().cpu().contiguous() for k, v in to_original_wan(sd).items()}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        atomic_write(path, lambda tmp: torch.save({"generator": gen}, tmp))
    except (OSError, RuntimeError) as e:
        raise ValueError(write_error(path, e)) from None
