"""Data-Forcing Distillation (DFD): the core, in one file that depends on torch alone.

Paper: "Data-Forcing Distillation: Restoring Diversity and Fidelity in Few-Step Video Generation"
(ICML 2026 FoGen workshop submission). Equations implemented here:
  Eq. 1 / 3   DMD's reverse-KL gradient  (s_fake(x~_t) - s_real(x~_t)) dG/dtheta,  x~_t = alpha_t G + sigma_t eps
  Eq. 8       DFD's gradient             (s_fake(x~_t) - s_real(x_t))  dG/dtheta,  x_t  = alpha_t x + sigma_t eps
              (x a real sample for the same condition, the SAME eps and t as x~_t)
  Eq. 9 / 10  the mix (1 - p) g_DMD + p g_DFD, realised by a coin with P(real) = p per student step
              (optionally a t-dependent p(t) = p for t >= p_t_min and 0 below: DFD at high noise only; not in the
              paper, default off)
  Eq. 7       the validity condition E||x - G||^2 <= delta^2, which the monitor logs
All scores enter in x0 form (a denoiser's estimate of the clean sample), as in DMD2 and the authors' code.

Networks are callables  denoise(x_t, t, cond) -> x0_hat  with t in [0, 1] of shape [B]; the same code
drives the 2D toy (toy/mixture.py) and the video models (wan_dfd.py, cosmos_dfd.py). Tensors of any
rank work: points (B, 2), images (B, C, H, W), videos (B, C, T, H, W).

Reading order: schedule -> guidance -> the loss (copy `dm_loss` alone into your repo) -> the DFD coin
-> fake-score loss -> sampler -> one update step -> the alternating loop. The steps take two optional hooks that
are not the paper's method and are off unless given: `generate` (how a student that is not one network call makes
G, e.g. a causal rollout) and an `Adversary` (DMD2's GAN head, which the paper removes for DFD).
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (x_t, t, cond) -> x0_hat
Pairing = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (G detached, x_real, cond) -> x per G
# (student, x_real, cond, generator, shared) -> G: how a student other than a one-call denoiser makes its sample, e.g.
# the autoregressive rollout of a causal video student (dfd_video/causal_wan.py). x_real gives the shape; `generator`
# is this rank's, `shared` draws the same on every rank (what must agree across ranks, e.g. how many network calls
# FSDP makes)
Generate = Callable[[Any, torch.Tensor, Any, torch.Generator, torch.Generator], torch.Tensor]
# An adversary (DMD2's GAN head, dfd_video/gan.py; the paper removes it for DFD) has three methods the steps call:
# gen_loss(x~_t, t, cond) -> (weighted loss with grad into G, stats); disc_loss(x~_t detached, x_real, eps, t, cond,
# generator) -> (its loss, stats), backward by the caller; step(step) -> stats, its optimizer step after the fake score's
Adversary = Any


# ---------------------------------------------------------------------------------------------------
# Rectified-flow schedule (Wan2.1, Cosmos-Predict2.5): x_t = alpha_t x0 + sigma_t eps, alpha_t = 1 - t,
# sigma_t = t, t in [0, 1]; the flow velocity the video transformers predict is v = eps - x0.


def expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshapes per-sample t [B] to [B, 1, ..., 1] so it broadcasts against x of any rank."""
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def shift_t(t: torch.Tensor | float, s: float) -> torch.Tensor | float:
    """Timestep shift t' = s t / (1 + (s - 1) t): s > 1 moves steps towards noise (Wan uses s = 3..5)."""
    return s * t / (1 + (s - 1) * t)


def forward_diffusion(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = expand(t, x0)
    return (1 - t) * x0 + t * eps


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = expand(t, x_t)
    return (x_t - t * eps) / (1 - t)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = expand(t, x_t)
    return (x_t - (1 - t) * x0) / t


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x_t - expand(t, x_t) * v  # x_t = x0 + t (eps - x0)


def v_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (x_t - x0) / expand(t, x_t)


def score_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Tweedie: grad log p_t(x_t) = (alpha_t x0_hat - x_t) / sigma_t^2."""
    t = expand(t, x_t)
    return ((1 - t) * x0 - x_t) / t**2


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance.


def cfg(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, g: float) -> torch.Tensor:
    """uncond + g (cond - uncond), the paper's form (g = 5.0 for Wan, 3.0 for Cosmos; g = 1 is no guidance).

    Some repos (diffusers' Cosmos pipeline, the original DMD2) write cond + s (cond - uncond); that is the
    same with g = s + 1. Because x0, eps, v and the score are affine in one another with the same
    coefficients for both branches, guiding any of them gives the same result.
    """
    return x0_uncond + g * (x0_cond - x0_uncond)


# ---------------------------------------------------------------------------------------------------
# The distribution-matching loss: the piece to copy.


def dm_loss(
    x: torch.Tensor,
    x0_teacher: torch.Tensor,
    x0_fake: torch.Tensor,
    x_real: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DMD / DFD student loss in x0 form (Eq. 1, 3, 8; the coin of Eq. 9 / 10 decides what x0_teacher saw).

    x:          the student's sample G [B, ...], with grad.
    x0_teacher: the guided teacher's x0 estimate at x~_t (DMD) or at x_t (DFD); treated as a constant.
    x0_fake:    the fake score's x0 estimate at x~_t; treated as a constant.
    x_real:     None for the x0-space form the authors run. Pass the real sample x to take Eq. 8 literally
                in score space: with s = (alpha_t x0_hat - x_t) / sigma_t^2 and x~_t - x_t = alpha_t (G - x),
                  s_fake(x~_t) - s_real(x_t) = (alpha_t / sigma_t^2) [(x0_fake - x0_teacher) - (G - x)],
                so after the usual alpha_t / sigma_t^2 -> x0 conversion the score form adds -(G - x), with
                weight exactly 1 (alpha_t / sigma_t^2 in score units). In DMD (x = G) the term vanishes.
                In the 2D toy (toy/mixture.py) it diverged at p = 1 on all three datasets; the x0 form did not.
    mask:       optional 0/1 tensor broadcastable to x marking the elements the loss covers (e.g. the generated
                frames in image-to-video); the normaliser and the mean run over those elements only.

    grad = (x0_fake - x0_teacher [- (x - x_real)]) * w,  w = 1 / (mean |x - x0_teacher| + 1e-6) per sample,
    computed in fp32 under no_grad (DMD2's normaliser). loss = 0.5 * mse(x, (x - grad).detach()), so
    d loss / d x = grad / x.numel() (grad * mask / mask.sum() with a mask): descending it moves G along
    x0_teacher - x0_fake. Nothing else is differentiated: teacher, fake score and the target are detached.
    """
    xf = x.float()
    m = torch.ones_like(xf) if mask is None else mask.float().expand_as(xf)
    dims = tuple(range(1, x.ndim))
    with torch.no_grad():
        gap = (xf - x0_teacher.float()).abs()
        normaliser = (gap * m).sum(dims, keepdim=True) / m.sum(dims, keepdim=True).clamp_min(1)  # [B, 1, ...]
        direction = x0_fake.float() - x0_teacher.float()
        if x_real is not None:
            direction = direction - (xf - x_real.float())
        grad = direction / (normaliser + 1e-6) * m
    loss = 0.5 * ((xf - (xf - grad).detach()) ** 2 * m).sum() / m.sum()
    stats = {
        "dm_grad_norm": grad.flatten(1).norm(dim=1).mean(),  # per-sample L2 norm of grad, batch mean
        "dm_normaliser": normaliser.mean(),  # mean |G - x0_teacher|
    }
    return loss, stats


# ---------------------------------------------------------------------------------------------------
# The DFD change: a coin decides, per student step, whether the teacher sees the real sample.


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def dfd_coin(step: int, p: float, seed: int = 0, batch: int | None = None, rank: int = 0,
             micro: int | None = None) -> torch.Tensor:
    """True where the teacher sees the real sample (Eq. 10). A pure function of (seed, step), so every rank
    of a distributed run draws the same coin without communicating, and a resumed run draws what the
    unbroken run drew. batch=None: one coin for the step (the authors' choice; shape []). batch=B: one coin
    per sample (shape [B]), also varying with rank so that ranks do not mirror each other. micro=a: one coin
    for micro-batch a of the step, the same on every rank (SF-DFD's draw, one per gradient-accumulation pass)."""
    if micro is not None:
        g = torch.Generator().manual_seed(_seed(seed, step, micro, 0xC2))
        return torch.rand((), generator=g) < p
    if batch is None:
        g = torch.Generator().manual_seed(_seed(seed, step, 0xC0))
        return torch.rand((), generator=g) < p
    g = torch.Generator().manual_seed(_seed(seed, step, rank, 0xC1))
    return torch.rand(batch, generator=g) < p


def pick(x_gen: torch.Tensor, x_real: torch.Tensor, use_real: torch.Tensor) -> torch.Tensor:
    """The one line DFD changes: the clean sample the teacher will see, noised with the SAME eps and t as
    the student's. `use_real` is [] (one coin per step) or [B] (per sample). Detached either way."""
    if use_real.ndim == 0:
        return x_real.detach() if bool(use_real) else x_gen.detach()
    return torch.where(expand(use_real, x_gen).bool(), x_real, x_gen).detach()


# ---------------------------------------------------------------------------------------------------
# Fake score: denoising score matching on the student's samples, in x0 form.


def fake_score_loss(fake: Denoiser, x_gen: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond: Any,
                    mask: torch.Tensor | None = None, space: str = "x0") -> torch.Tensor:
    """E || fake(alpha_t G + sigma_t eps, t) - G ||^2 with G detached (the fake score tracks p_fake, Eq. 1).
    space="flow": the same error measured on the flow velocity, || v_hat - (eps - G) ||^2 = || x0_hat - G ||^2 / t^2."""
    x_gen = x_gen.detach()
    err = (fake(forward_diffusion(x_gen, eps, t), t, cond).float() - x_gen.float()) ** 2
    if space == "flow":
        err = err / expand(t, err).float() ** 2
    return err.mean() if mask is None else (err * mask).sum() / mask.float().expand_as(err).sum()


# ---------------------------------------------------------------------------------------------------
# Few-step student: t list, training input, and the sampler.

# The 4-step student's times: [1, .75, .5, .25] shifted by s = 5 (.9375, .8333, .625), written as in FastGen's
# Wan configs, the codebase the paper's experiments use.
STUDENT_TS = (0.999, 0.937, 0.833, 0.624)


def sample(student: Denoiser, noise: torch.Tensor, cond: Any, ts=STUDENT_TS,
           generator: torch.Generator | None = None, renoise: bool = True) -> torch.Tensor:
    """The few-step sampler. renoise=True (DMD2 style, the default): predict x0, re-noise it with fresh noise
    to the next t, repeat. renoise=False: re-noise with the noise the prediction implies instead,
    eps_hat = (x_t - alpha_t x0_hat) / sigma_t, i.e. the deterministic flow-ODE (Euler / DDIM) step."""
    x = noise
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        x0 = student(x, tt, cond)
        if i + 1 < len(ts):
            if renoise:
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            else:
                eps = eps_from_x0(x, x0, tt)
            x = forward_diffusion(x0, eps, torch.full_like(tt, ts[i + 1]))
    return x0


def student_input(x_real: torch.Tensor, ts, generator: torch.Generator, student: Denoiser | None = None,
                  cond: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's training input (x_in, t_in) at one of the few-step times, per sample.
    student=None: the real sample noised to t_in (the authors' text-to-video recipe; couples G to x_real).
    Otherwise backward simulation: run the student from pure noise, without grad, up to t_in."""
    B = x_real.shape[0]
    dev = x_real.device
    idx = torch.randint(len(ts), (B,), generator=generator, device=dev)
    t_in = torch.tensor(ts, device=dev, dtype=torch.float32)[idx]
    noise = torch.randn(x_real.shape, generator=generator, device=dev, dtype=x_real.dtype)
    if student is None:
        return forward_diffusion(x_real, noise, t_in), t_in
    x = noise
    with torch.no_grad():  # step k of sample(), stopping where each sample's t_in is reached
        for k in range(int(idx.max())):
            tt = torch.full((B,), float(ts[k]), device=dev)
            fresh = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
            nxt = forward_diffusion(student(x, tt, cond), fresh, torch.full_like(tt, ts[k + 1]))
            x = torch.where(expand(idx > k, x).bool(), nxt, x)
    return x, t_in


# ---------------------------------------------------------------------------------------------------
# One update of each network, and the alternating loop.


@dataclass
class DFDConfig:
    """Settings of the method: the paper's where it fixes them (Sec. 4.2, Table 2: p, the update ratio, the student's
    times); the noise range and clipping are plain defaults, the video scripts pass FastGen's (docs/recipe.md)."""

    p: float = 0.5  # P(teacher sees the real sample) per student step (Eq. 10); 0 = DMD, 1 = pure DFD
    per_sample_coin: bool = False  # one coin per sample instead of per step
    per_micro_coin: bool = False  # one coin per micro-batch (gradient-accumulation pass) instead of per step
    p_t_min: float = 0.0  # > 0: p(t) = p for the noise level t >= p_t_min, 0 below (DFD at high noise only;
    #                       per-sample coins, since t is per sample; t compared after the shift). 0: off
    space: str = "x0"  # "x0": the authors' code; "score": Eq. 8 taken literally (see dm_loss)
    fake_loss: str = "x0"  # the fake score's loss: "x0" (FastGen's video configs) or "flow" (the velocity error:
    #                        Self-Forcing's critic)
    fake_updates: int = 4  # fake-score updates before each student update: the paper's "student update
    #                        frequency 5" (FastGen's student_update_freq=5: 4 fake-score iterations, then 1 student one)
    grad_accum: int = 1  # micro-batches per update (each network)
    student_ts: tuple[float, ...] = STUDENT_TS  # the few-step student's times
    backward_sim: bool = False  # student input by backward simulation from noise instead of noised data
    t_min: float = 0.02  # range of the DMD / fake-score noise level t, before the shift (the video scripts use
    t_max: float = 0.98  # FastGen's 0.001, 0.999 with shift 5)
    t_shift: float = 1.0  # shift applied to t ~ U[t_min, t_max]; the result is clamped to [t_min, t_max]
    t_clamp: tuple[float, float] | None = None  # clamp the shifted t to this range instead (Self-Forcing: draw on
    #                                             [0, 1), clamp to [0.02, 0.98])
    grad_clip: float = 1.0  # max global grad norm of the student (<= 0: no clipping)
    grad_clip_fake: float | None = None  # ... of the fake score (None: grad_clip; FastGen clips the student only)
    zero_nonfinite: bool = False  # the student's non-finite gradients zeroed and stepped over, as FastGen does
    #                               (default: stop the run)
    ema: float = 0.0  # EMA decay of the student (0: no EMA)
    seed: int = 0  # seeds every draw: (seed, step, rank) -> noise, t, coin
    monitor_every: int = 0  # every N student steps, one extra teacher call for the score discrepancy (0: off)
    delta2_warn: float = 2.0  # warn once when delta^2 per element exceeds this (2.0: two independent
    #                           unit-variance samples)

    def __post_init__(self):
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        if self.space not in ("x0", "score"):
            raise ValueError(f"space must be 'x0' or 'score', got {self.space!r}")
        if self.fake_loss not in ("x0", "flow"):
            raise ValueError(f"fake_loss must be 'x0' or 'flow', got {self.fake_loss!r}")
        if self.per_micro_coin and (self.per_sample_coin or self.p_t_min > 0):
            raise ValueError("per_micro_coin excludes per_sample_coin and p_t_min (one coin per micro-batch)")
        if self.fake_updates < 0 or self.grad_accum < 1:
            raise ValueError(f"need fake_updates >= 0 and grad_accum >= 1, got {self.fake_updates}, {self.grad_accum}")
        if not 0.0 <= self.p_t_min <= 1.0:
            raise ValueError(f"p_t_min must be in [0, 1], got {self.p_t_min}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")


Batch = tuple  # (x_real [B, ...], cond) or (x_real, cond, mask)


def _unpack(batch: Batch):
    return batch[0], batch[1], (batch[2] if len(batch) > 2 else None)


def sample_t(B: int, c: DFDConfig, generator: torch.Generator, device) -> torch.Tensor:
    """t ~ U[t_min, t_max], shifted, clamped back to [t_min, t_max] (FastGen's "shifted" draw: a shift > 1 pushes
    the top of the range past t_max, e.g. 0.999 -> 0.9998 at s = 5)."""
    u = torch.rand(B, generator=generator, device=device)
    lo, hi = c.t_clamp if c.t_clamp is not None else (c.t_min, c.t_max)
    return shift_t(c.t_min + (c.t_max - c.t_min) * u, c.t_shift).clamp(lo, hi)


def _finite(name: str, value: torch.Tensor, step: int) -> None:
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"non-finite {name} at student step {step}: {value.item() if value.numel() == 1 else value}")


def _apply(module: torch.nn.Module, opt: torch.optim.Optimizer, clip: float, name: str, step: int,
           zero_nonfinite: bool = False) -> torch.Tensor:
    params = [q for q in module.parameters() if q.grad is not None]
    if zero_nonfinite:  # FastGen's GradClipCallback.nan_to_num: NaN -> 0, +-inf -> the largest finite value
        for q in params:
            torch.nan_to_num_(q.grad.to_local() if hasattr(q.grad, "to_local") else q.grad, nan=0.0)
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor
    if not zero_nonfinite:
        _finite(f"{name} gradient norm", norm, step)  # checked before the weights change
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def _generator(c: DFDConfig, device, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(c.seed, *parts))


def make_sample(student, x_real: torch.Tensor, cond: Any, c: DFDConfig, g: torch.Generator,
                generate: Generate | None = None, *parts: int) -> torch.Tensor:
    """The student's sample G for a batch: `generate` when given (its shared generator seeded by `parts`, the
    caller's draw key without the rank), else one call on student_input."""
    if generate is not None:
        return generate(student, x_real, cond, g, _generator(c, x_real.device, *parts, -1))
    x_in, t_in = student_input(x_real, c.student_ts, g, student if c.backward_sim else None, cond)
    return student(x_in, t_in, cond)


def fake_score_step(student, fake, opt, batches: list[Batch], c: DFDConfig, step: int, j: int, rank: int = 0,
                    generate: Generate | None = None, adversary: Adversary | None = None):
    """One fake-score update (j-th before student step `step`) on fresh, detached student samples; with an
    adversary, its update too, on the same samples (as DMD2 updates its discriminator with the fake score)."""
    logs = {"loss_fake": 0.0}
    for a, batch in enumerate(batches):
        x_real, cond, mask = _unpack(batch)
        g = _generator(c, x_real.device, step, j, a, rank)
        with torch.no_grad():
            x_gen = make_sample(student, x_real, cond, c, g, generate, step, j, a)
        eps = torch.randn(x_real.shape, generator=g, device=x_real.device, dtype=x_real.dtype)
        t = sample_t(x_real.shape[0], c, g, x_real.device)
        loss = fake_score_loss(fake, x_gen, eps, t, cond, mask, c.fake_loss)
        _finite("fake-score loss", loss.detach(), step)
        (loss / len(batches)).backward()
        logs["loss_fake"] += loss.item() / len(batches)
        if adversary is not None:
            loss, stats = adversary.disc_loss(forward_diffusion(x_gen.detach(), eps, t), x_real, eps, t, cond, g)
            _finite("discriminator loss", loss.detach(), step)
            (loss / len(batches)).backward()
            for k, v in stats.items():
                logs[k] = logs.get(k, 0.0) + float(v) / len(batches)
    logs["grad_norm_fake"] = _apply(fake, opt, c.grad_clip if c.grad_clip_fake is None else c.grad_clip_fake,
                                    "fake-score", step).item()
    if adversary is not None:
        logs.update(adversary.step(step))
    return logs


def student_step(student, teacher: Denoiser, fake: Denoiser, opt, batches: list[Batch], c: DFDConfig,
                 step: int, rank: int = 0, pair: Pairing | None = None,
                 generate: Generate | None = None, adversary: Adversary | None = None) -> dict[str, float]:
    """One student update with the DMD (Eq. 3) or DFD (Eq. 8) gradient, chosen by the coin (Eq. 10).
    The student's input is always made from the batch's x_real; `pair(G, x_real, cond)` picks which real sample
    the teacher (and the delta^2 monitor) sees for each G: None = the same one ("paired"), e.g. a shuffle
    within the condition ("independent") or a mini-batch optimal-transport assignment ("OT").
    `generate(student, x_real, cond, generator)` makes G instead of one student call (see make_sample). An
    adversary adds its loss on x~_t (G noised), whichever sample the coin showed the teacher."""
    sizes = [b[0].shape[0] for b in batches]
    per_sample = c.per_sample_coin or c.p_t_min > 0
    if c.per_micro_coin:
        coins = torch.stack([dfd_coin(step, c.p, c.seed, micro=a) for a in range(len(batches))])
    else:
        coins = dfd_coin(step, c.p, c.seed, sum(sizes) if per_sample else None, rank)
    logs: dict[str, float] = {"dfd": coins.float().mean().item()}  # the fraction of DFD samples (or passes)
    for a, batch in enumerate(batches):
        x_real, cond, mask = _unpack(batch)
        use_real = coins.split(sizes)[a] if per_sample else coins[a] if c.per_micro_coin else coins
        g = _generator(c, x_real.device, step, -1, a, rank)
        x_gen = make_sample(student, x_real, cond, c, g, generate, step, -1, a)  # G, with grad
        x_real = x_real if pair is None else pair(x_gen.detach(), x_real, cond)  # the x the teacher sees for G
        eps = torch.randn(x_real.shape, generator=g, device=x_real.device, dtype=x_real.dtype)
        t = sample_t(x_real.shape[0], c, g, x_real.device)  # micro-batches may differ in size
        if c.p_t_min > 0:  # p(t): no DFD below p_t_min; the log counts only the samples that saw x
            high = t.to(use_real.device) >= c.p_t_min
            logs["dfd"] -= (use_real & ~high).float().sum().item() / sum(sizes)
            use_real = use_real & high
        x_clean = pick(x_gen, x_real, use_real.to(x_real.device))  # G (DMD) or x (DFD)
        with torch.no_grad():
            x0_fake = fake(forward_diffusion(x_gen.detach(), eps, t), t, cond)  # s_fake(x~_t)
            x0_teacher = teacher(forward_diffusion(x_clean, eps, t), t, cond)  # s_real(x~_t) or s_real(x_t)
        # score space: the extra -(G - x) term of Eq. 8; on DMD samples x_clean is G and it is exactly 0
        loss, stats = dm_loss(x_gen, x0_teacher, x0_fake, x_clean if c.space == "score" else None, mask)
        if adversary is not None:
            extra, more = adversary.gen_loss(forward_diffusion(x_gen, eps, t), t, cond)
            loss = loss + extra
            stats.update(more)
        _finite("student loss", loss.detach(), step)
        (loss / len(batches)).backward()
        with torch.no_grad():  # validity monitor (Eq. 7); every batch here pairs G with a real sample
            m = (torch.ones_like(x_real) if mask is None else mask.expand_as(x_real)).float().flatten(1)
            per_elem = lambda d: ((d.float().flatten(1) ** 2 * m).sum(1) / m.sum(1).clamp_min(1)).mean()
            stats["delta2"] = per_elem(x_real - x_gen)  # E||x - G||^2 / d
            if c.monitor_every and step % c.monitor_every == 0:  # the other branch: one extra teacher call
                x_other = pick(x_gen, x_real, ~use_real.to(x_real.device))
                x0_other = teacher(forward_diffusion(x_other, eps, t), t, cond)
                stats["teacher_gap"] = per_elem(x0_teacher - x0_other)  # ||x0_T(x_t) - x0_T(x~_t)||^2 / d
        for k, v in {"loss_student": loss.detach(), "t_mean": t.mean(), **stats}.items():
            logs[k] = logs.get(k, 0.0) + float(v) / len(batches)
    logs["grad_norm_student"] = _apply(student, opt, c.grad_clip, "student", step, c.zero_nonfinite).item()
    return logs


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)


def train(student: torch.nn.Module, teacher: Denoiser, fake: torch.nn.Module, student_opt, fake_opt,
          data: Iterator[Batch], steps: int, c: DFDConfig, start_step: int = 0, rank: int = 0,
          ema: torch.nn.Module | None = None, log: Callable[[int, dict], None] | None = None,
          on_step_end: Callable[[int], None] | None = None, pair: Pairing | None = None,
          generate: Generate | None = None, adversary: Adversary | None = None, tail: int = 0) -> None:
    """The alternating loop: per student step, `fake_updates` fake-score updates, then one student update,
    each on `grad_accum` fresh micro-batches from `data`. Every draw is a function of (seed, step, rank),
    so resuming at `start_step` with `data` at the matching position repeats an unbroken run exactly.
    `pair` goes to student_step (which real sample the teacher sees for each G; None: the batch's own);
    `generate` (how the student makes G; None: one call on dfd.student_input) and an `adversary` (DMD2's GAN
    head) to both steps. `tail` > 0: that many more fake-score updates after the last student step, logged and
    ended as step `steps` (a run counted in FastGen's iterations can stop inside a cycle: docs/recipe.md)."""
    warned = False
    for step in range(start_step, steps + (tail > 0)):
        fakes = c.fake_updates if step < steps else tail
        logs: dict[str, float] = {}
        for j in range(fakes):  # logged: the mean over the step's fake-score updates
            batches = [next(data) for _ in range(c.grad_accum)]
            for k, v in fake_score_step(student, fake, fake_opt, batches, c, step, j, rank, generate,
                                               adversary).items():
                logs[k] = logs.get(k, 0.0) + v / fakes
        if step < steps:
            batches = [next(data) for _ in range(c.grad_accum)]
            logs.update(student_step(student, teacher, fake, student_opt, batches, c, step, rank, pair, generate,
                                     adversary))
            if ema is not None and c.ema > 0:
                ema_update(ema, student, c.ema)
            if logs["delta2"] > c.delta2_warn and not warned:
                warned = True
                warnings.warn(f"validity condition (Eq. 7): delta^2 = {logs['delta2']:.3g} per element exceeds "
                              f"{c.delta2_warn:g} at step {step}; DFD needs a student already close to the data "
                              "(start from a DMD2 checkpoint)", stacklevel=2)
        if log is not None:
            log(step, logs)
        if on_step_end is not None:
            on_step_end(step)
