"""DMD2's GAN head as FastGen trains it (--gan-weight > 0; the paper drops it for DFD, Table 5, Fig. 7a): a
discriminator on the frozen teacher's block features, its losses, and the adversary dfd's steps call (`GAN`).

What FastGen computes (fastgen/methods/distribution_matching/dmd2.py, fastgen/methods/common_loss.py), and so we:
  student phase   the teacher's conditional branch (no CFG) runs on x~_t = alpha_t G + sigma_t eps, the same eps and
                  t as the DMD loss, with grad into G; its block outputs go to the discriminator (eval mode, frozen):
                  loss += w * mean softplus(-D(fake)), w = --gan-weight (FastGen's gan_loss_weight_gen, 0.03).
  fake phase      with the fake-score update, on the same detached G, eps and t: D(features of x~_t) and D(features of
                  x_t = alpha_t x + sigma_t eps) (the same t and eps: gan_use_same_t_noise, both video configs; else
                  fresh ones), both under no_grad through the teacher, discriminator in train mode (its Dropout on):
                  mean softplus(D(fake)) + mean softplus(-D(real)), optionally + r1 * mse(D(real), D(features of
                  x + alpha n at the same t)), n ~ N(0, I) (the "approximate R1" of APT; FastGen perturbs the clean x,
                  not x_t). Its own AdamW (lr 1e-5, no clipping) steps with the fake score's.
The discriminator is FastGen's Discriminator_VideoDiT with FastGen's parameter names, so a DMD2 checkpoint's
`<iter>.discriminator_model/` (or the `discriminator` entry of its .pth) loads into it. Only the two head families
FastGen's Wan and Cosmos DMD2 configs use are built here ("multiscale_*" and "dit_simple_conv3d").
docs/gan.md: flags, sources, costs.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import dfd

# FastGen's Discriminator_VideoDiT.ARCHITECTURES, the families built here: (scales, channel_reduction, mlp_hidden_dim)
MULTISCALE = {"multiscale_down_mlp": ((1, 2, 4, 8), 2, 512), "multiscale_down_mlp_efficient": ((1, 2, 4), 4, 256),
              "multiscale_down_mlp_medium": ((1, 2, 4, 8), 2, 768),
              "multiscale_down_mlp_large": ((1, 2, 4, 8, 16), 1, 1024)}
DISC_TYPES = (*MULTISCALE, "dit_simple_conv3d")


# ---------------------------------------------------------------------------------------------------
# The losses (fastgen/methods/common_loss.py): logits [B, heads], one per feature block.


def gen_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's non-saturating loss, mean softplus(-D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def disc_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss, mean softplus(D(fake)) + mean softplus(-D(real))."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def r1_loss(real_logits: torch.Tensor, perturbed_logits: torch.Tensor) -> torch.Tensor:
    """Approximate R1: mean squared change of the logits when the real sample is perturbed slightly."""
    return F.mse_loss(real_logits.float(), perturbed_logits.float())


# ---------------------------------------------------------------------------------------------------
# The discriminator, in FastGen's module layout (so its state-dict keys are FastGen's).


def norm_groups(channels: int) -> int:
    """GroupNorm's group count as FastGen picks it: channels // 4 (at least 1) up to 32 channels, else the largest
    divisor of `channels` that is <= 32."""
    if channels <= 32:
        return max(1, channels // 4)
    return next(g for g in range(32, 0, -1) if channels % g == 0)


class MultiScaleHead(nn.Module):
    """One feature block's head: per scale a 1x1x1 conv, average pooling by the scale, a 3x3x3 conv, global pooling;
    the scales concatenated into an MLP (with FastGen's Dropout 0.1) -> one logit."""

    def __init__(self, dim: int, scales: Sequence[int], reduction: int, hidden: int):
        super().__init__()
        c = dim // reduction
        act = lambda: nn.LeakyReLU(0.2)
        self.scale_branches = nn.ModuleList(nn.Sequential(
            nn.Conv3d(dim, c, kernel_size=1), nn.GroupNorm(norm_groups(c), c), act(),
            nn.AvgPool3d(kernel_size=s, stride=s) if s > 1 else nn.Identity(),
            nn.Conv3d(c, c, kernel_size=3, padding=1), nn.GroupNorm(norm_groups(c), c), act(),
            nn.AdaptiveAvgPool3d((1, 1, 1)), nn.Flatten()) for s in scales)
        self.classifier = nn.Sequential(nn.Linear(len(scales) * c, hidden), act(), nn.Dropout(0.1),
                                        nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat([b(x) for b in self.scale_branches], dim=1))


def simple_head(dim: int) -> nn.Sequential:
    """FastGen's "dit_simple_conv3d" head: a strided 3-D conv to dim / 2 channels, GroupNorm, a 1x1x1 conv to one
    channel, global pooling -> one logit."""
    c = dim // 2
    return nn.Sequential(nn.Conv3d(dim, c, kernel_size=(2, 4, 4), stride=(2, 2, 2), padding=(0, 1, 1)),
                         nn.GroupNorm(norm_groups(c), c), nn.LeakyReLU(0.2), nn.Conv3d(c, 1, kernel_size=1),
                         nn.AdaptiveAvgPool3d((1, 1, 1)), nn.Flatten())


class Discriminator(nn.Module):
    """FastGen's Discriminator_VideoDiT: one head per feature block (`cls_pred_heads`, in block order), features
    [B, dim, T, H, W] in, logits [B, heads] out."""

    def __init__(self, disc_type: str, blocks: Sequence[int], dim: int):
        super().__init__()
        if disc_type not in DISC_TYPES:
            raise ValueError(f"--gan-disc-type {disc_type}: not built here (one of {', '.join(DISC_TYPES)})")
        self.disc_type, self.blocks = disc_type, tuple(sorted(set(blocks)))
        make = (lambda: MultiScaleHead(dim, *MULTISCALE[disc_type])) if disc_type in MULTISCALE else \
            (lambda: simple_head(dim))
        self.cls_pred_heads = nn.ModuleList(make() for _ in self.blocks)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([head(f) for head, f in zip(self.cls_pred_heads, feats)], dim=1)


def fresh_state_dict(disc_type: str, blocks: Sequence[int], dim: int, seed: int) -> dict[str, torch.Tensor]:
    """A new discriminator's weights: PyTorch's default initialisation (FastGen adds none), drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Discriminator(disc_type, blocks, dim).state_dict()


# ---------------------------------------------------------------------------------------------------
# Features: the teacher's block outputs, captured with forward hooks on a normal forward.


@contextlib.contextmanager
def block_outputs(blocks: Sequence[nn.Module], indices: Sequence[int]):
    """Collects {index: output} of blocks[index] while the context is open (the last call wins, so an activation-
    checkpointing recomputation after the context changes nothing)."""
    got: dict[int, torch.Tensor] = {}
    hooks = [blocks[i].register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, out)) for i in indices]
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


Features = Callable[[torch.Tensor, torch.Tensor, Any], list]  # (x_t, t, cond) -> [B, C, T, H, W] per feature block


def teacher_features(spec, net: nn.Module, denoiser: nn.Module, indices: Sequence[int], dtype) -> Features:
    """(x_t, t, cond) -> the outputs of the teacher's blocks `indices` (sorted) on its conditional branch, each in
    the layout FastGen's discriminator reads (spec.feature_grid), in the discriminator's compute dtype. `denoiser` is
    the teacher network's unguided denoiser; FastGen stops the forward after the last feature block, this runs it
    to the end (the same features; for the shipped configs' last block that is the final layer alone)."""
    blocks, indices = spec.blocks(net), sorted(indices)

    def features(x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> list:
        with block_outputs(blocks, indices) as got:
            denoiser(x_t, t, cond)
        return [spec.feature_grid(net, got[i], x_t.shape).to(dtype or torch.float32) for i in indices]
    return features


# ---------------------------------------------------------------------------------------------------
# The adversary dfd's steps call.


class GAN:
    """DMD2's GAN head: `disc` (sharded or not) with its optimizer, the teacher's `features`, FastGen's settings. The
    adversary dfd's steps call when given one (without it they are exactly the plain method):
      gen_loss(x~_t, t, cond)     the student's extra loss (weighted) on G noised as the fake score sees it, with
                                  grad into G; and stats to log
      disc_loss(x~_t, x, eps, t, cond, generator)
                                  the discriminator's loss on a detached x~_t against the real x (noised with the
                                  same eps and t, or fresh draws from `generator`); the caller's backward fills its
                                  gradients
      step(step)                  its optimizer step after the fake-score phase's gradients; stats to log"""

    def __init__(self, disc: nn.Module, opt: torch.optim.Optimizer, features: Features, weight: float,
                 c: dfd.DFDConfig, same_t_noise: bool = True, r1_weight: float = 0.0, r1_alpha: float = 0.1):
        self.disc, self.opt, self.features, self.weight, self.c = disc, opt, features, weight, c
        self.same_t_noise, self.r1_weight, self.r1_alpha = same_t_noise, r1_weight, r1_alpha

    def gen_loss(self, x_noisy, t, cond):
        self.disc.eval().requires_grad_(False)  # as FastGen's student phase: no Dropout, no discriminator gradients
        loss = gen_loss(self.disc(self.features(x_noisy, t, cond)))
        return self.weight * loss, {"gan_loss_gen": loss.detach()}

    def disc_loss(self, x_noisy, x_real, eps, t, cond, generator):
        self.disc.train().requires_grad_(True)
        t_real, eps_real = t, eps
        if not self.same_t_noise:  # fresh t and noise for the real sample, drawn after everything the step drew
            t_real = dfd.sample_t(x_real.shape[0], self.c, generator, x_real.device)
            eps_real = torch.randn(x_real.shape, generator=generator, device=x_real.device, dtype=x_real.dtype)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.no_grad():
            fake = self.features(x_noisy, t, cond)
            real = self.features(dfd.forward_diffusion(x_real, eps_real, t_real), t_real, cond)
            if self.r1_weight > 0:
                n = torch.randn(x_real.shape, generator=generator, device=x_real.device, dtype=x_real.dtype)
                perturbed = self.features(x_real + self.r1_alpha * n, t_real, cond)
        devices = [x_real.device] if x_real.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the Dropout masks: a function of (seed, step, rank) too
            torch.manual_seed(seed)
            real_logits = self.disc(real)
            loss = disc_loss(real_logits, self.disc(fake))
            stats = {"gan_loss_disc": loss.detach()}
            if self.r1_weight > 0:
                r1 = r1_loss(real_logits, self.disc(perturbed))
                loss = loss + self.r1_weight * r1
                stats["gan_loss_r1"] = r1.detach()
        return loss, stats

    def step(self, step):  # clip 0: measured, not clipped (FastGen clips the student only)
        return {"grad_norm_disc": dfd._apply(self.disc, self.opt, 0.0, "discriminator", step).item()}


# ---------------------------------------------------------------------------------------------------
# The run's GAN head: settings, weights, sharding (train calls open_gan only with --gan-weight > 0).


def gan_settings(spec, net: nn.Module, disc_type: str | None, blocks: Sequence[int] | None) -> tuple[str, tuple, str]:
    """(head type, feature blocks, where they come from): the flags, else FastGen's DMD2 config for the
    architecture. ValueError for an architecture FastGen has no config for, or blocks the teacher does not have."""
    recipe = spec.fastgen_recipe(net)
    if recipe is None and (disc_type is None or blocks is None):
        raise ValueError(f"--gan-weight: FastGen ships no DMD2 config for a {spec.family} transformer of "
                         f"{len(spec.blocks(net))} blocks; give --gan-blocks and --gan-disc-type")
    source = "the flags" if disc_type and blocks else f"FastGen's {recipe.config}"
    blocks = tuple(sorted(set(blocks or recipe.blocks)))
    n = len(spec.blocks(net))
    if max(blocks) >= n:
        raise ValueError(f"--gan-blocks {' '.join(map(str, blocks))}: the teacher has blocks 0..{n - 1}")
    return disc_type or recipe.disc_type, blocks, source


def open_gan(spec, args, d, dtype, teacher_net: nn.Module, features_of: nn.Module, desc: dict | None,
             resume_folder: str | None, c: dfd.DFDConfig) -> GAN:
    """The GAN of a run: its discriminator sharded like the networks (every rank allocates its shard; rank 0 reads the
    weights: the --resume checkpoint's, else the DMD2 checkpoint's `discriminator`, else a fresh one from the seed),
    its AdamW, the teacher's features. Rank 0 logs where the discriminator came from."""
    from dfd_video.distributed import on_main_rank, set_full_state_dict, shard
    from dfd_video.runs import read_weights
    from dfd_video.weights import fit_state_dict, read_checkpoint
    disc_type, blocks, source = gan_settings(spec, teacher_net, args.gan_disc_type, args.gan_blocks)
    dim = spec.feature_dim(teacher_net)
    with torch.device("meta"):
        disc = Discriminator(disc_type, blocks, dim)
    found = (desc or {}).get("networks", {}).get("discriminator")

    def read() -> tuple[dict, str]:  # rank 0
        if resume_folder is not None:
            sd = read_weights(resume_folder, "discriminator")
            where = f"--resume {resume_folder}" if sd is not None else "a fresh one (the --resume checkpoint holds none)"
        elif found is not None:
            sd, where = read_checkpoint(found["source"], found["role"]), found["source"]
        else:
            sd, where = None, "a fresh one (the DMD2 checkpoint holds none)"
        if sd is None:
            return fresh_state_dict(disc_type, blocks, dim, args.seed + 2), where
        return {k: v.float() for k, v in fit_state_dict(disc, sd, f"discriminator ({where})").items()}, where
    full, where = on_main_rank(d, read) or ({}, "")
    disc = shard(disc, list(disc.cls_pred_heads), d, dtype, None, False, True)
    disc.to_empty(device=d.device)
    set_full_state_dict(disc, full, from_rank0=True)
    if d.main:
        count = sum(v.numel() for v in full.values())
        print(f"GAN head (--gan-weight {args.gan_weight:g}): {disc_type} on teacher blocks "
              f"{' '.join(map(str, blocks))} ({source}), {dim} channels, {count / 1e6:.2f} M parameters"
              + (f"\n  discriminator <- {where}" if desc is None else ""), file=sys.stderr)  # else describe_lines said
    opt = torch.optim.AdamW(disc.parameters(), lr=args.gan_lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    features = teacher_features(spec, teacher_net, features_of, blocks, dtype)
    return GAN(disc, opt, features, args.gan_weight, c, not args.gan_fresh_noise, args.gan_r1_weight,
               args.gan_r1_alpha)
