"""The exact teacher: an isotropic Gaussian mixture and its noised marginals under the rectified-flow schedule.

Data p_real = sum_k w_k N(mu_k, s^2 I) in 2D (one std s for every component). Under x_t = alpha_t x0 + sigma_t eps
(alpha_t = 1 - t, sigma_t = t, as in dfd.forward_diffusion) component k becomes N(alpha_t mu_k, v_t I) with
v_t = alpha_t^2 s^2 + sigma_t^2, so everything the paper needs is closed form:

  responsibilities  r_k(x_t) = w_k N(x_t; alpha_t mu_k, v_t I) / sum_l (...)
  score             s(x_t)   = sum_k r_k m_k,            m_k = (alpha_t mu_k - x_t) / v_t
  Tweedie x0        E[x0|x_t] = sum_k r_k (mu_k + alpha_t s^2 (x_t - alpha_t mu_k) / v_t)
  score Jacobian    H(x_t)   = -I / v_t + Cov_r(m_k)  (the Hessian of log p_t; symmetric)

Cov_r(m_k) is the covariance of the points alpha_t mu_k / v_t under the weights r, so it is PSD with operator norm
<= alpha_t^2 D^2 / (4 v_t^2), D the diameter of the means (Popoviciu's inequality). Hence the analytic
Lipschitz bound of Condition 2 (App. A.2):  L(t) <= max(1 / v_t, alpha_t^2 D^2 / (4 v_t^2) - 1 / v_t).

A class-conditional mixture has a joint table P(class c, mode k) [C, K]; the class-c teacher uses the weights
P(k | c) (a mode may belong to several classes: `ring_shared`), and the guided teacher is
dfd.cfg(x0_cond, x0_uncond, g).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import dfd


@dataclass
class GMM:
    """An isotropic 2D Gaussian mixture; `joint` (optional) makes it class-conditional."""

    means: torch.Tensor  # [K, 2]
    weights: torch.Tensor  # [K], sums to 1
    std: float  # s, the same for every component
    joint: torch.Tensor | None = None  # [C, K] P(class c, mode k); its column sums are `weights`
    name: str = "gmm"

    @property
    def conditional(self) -> bool:
        return self.joint is not None

    @property
    def class_weights(self) -> torch.Tensor:
        """[C] P(c)."""
        return self.joint.sum(1)

    @property
    def cond_weights(self) -> torch.Tensor:
        """[C, K] P(k | c)."""
        return self.joint / self.joint.sum(1, keepdim=True)

    @property
    def K(self) -> int:
        return self.means.shape[0]

    @property
    def n_classes(self) -> int:
        return 0 if self.joint is None else self.joint.shape[0]

    @property
    def diameter(self) -> float:
        return torch.cdist(self.means, self.means).max().item()

    # --- sampling -------------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None, y: torch.Tensor | None = None,
               return_mode: bool = False):
        """n samples [n, 2]; with y [n] (class labels) each sample comes from its class's modes."""
        logw = self._logw(y, n)
        k = torch.multinomial(logw.softmax(-1), 1, generator=generator).squeeze(1)  # [n]
        x = self.means[k] + self.std * torch.randn(n, 2, generator=generator)
        return (x, k) if return_mode else x

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Class labels with the classes' total weights (only for a conditional mixture)."""
        return torch.multinomial(self.class_weights, n, replacement=True, generator=generator)

    # --- the noised marginal ---------------------------------------------------------------------------

    def _logw(self, y: torch.Tensor | None, B: int) -> torch.Tensor:
        """log weights [B, K]; with y, log P(k | y) (-inf for the modes outside class y)."""
        if y is None:
            return self.weights.log().expand(B, self.K)
        return self.cond_weights[y].log()

    def _parts(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None):
        """alpha_t [B,1], v_t [B,1], responsibilities r [B, K], m_k [B, K, 2]; all in float64 for exactness."""
        x = x_t.double()
        t = t.double().reshape(-1, 1).expand(x.shape[0], 1)
        a = 1 - t
        v = a**2 * self.std**2 + t**2
        mu = self.means.double()
        m = (a[:, :, None] * mu[None] - x[:, None, :]) / v[:, :, None]  # [B, K, 2]
        # log N(x_t; a mu_k, v I) up to the shared -log(2 pi v) term
        logits = self._logw(y, x.shape[0]).double() - 0.5 * v * (m**2).sum(-1)
        r = logits.softmax(-1)
        return a, v, r, m

    def score(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """grad log p_t(x_t) [B, 2]."""
        _, _, r, m = self._parts(x_t, t, y)
        return (r[:, :, None] * m).sum(1).to(x_t.dtype)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Tweedie's posterior mean E[x0 | x_t] [B, 2], written per component so it stays exact as alpha_t -> 0."""
        a, v, r, m = self._parts(x_t, t, y)
        mu = self.means.double()
        post = mu[None] - (a * self.std**2)[:, :, None] * m  # E[x0 | x_t, k] = mu_k + a s^2 (x_t - a mu_k) / v
        return (r[:, :, None] * post).sum(1).to(x_t.dtype)

    def score_jacobian(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """H(x_t) = d score / d x_t [B, 2, 2] = -I / v_t + Cov_r(m_k)."""
        _, v, r, m = self._parts(x_t, t, y)
        mbar = (r[:, :, None] * m).sum(1)  # [B, 2]
        d = m - mbar[:, None, :]
        cov = torch.einsum("bk,bki,bkj->bij", r, d, d)
        eye = torch.eye(2, dtype=cov.dtype)
        return (cov - eye / v[:, :, None]).to(x_t.dtype)

    # --- Lipschitz constant of the score at noise level t (Condition 2, App. A.2) -----------------------

    def lipschitz_bound(self, t: float) -> float:
        """Analytic L(t) >= sup_x ||H(x)||_op (see the module docstring)."""
        a = 1 - t
        v = a**2 * self.std**2 + t**2
        return max(1 / v, a**2 * self.diameter**2 / (4 * v**2) - 1 / v)

    def lipschitz_grid(self, t: float, n: int = 301, margin: float = 6.0, y: torch.Tensor | None = None) -> float:
        """max ||H(x)||_op over an n x n grid reaching `margin` noise std sqrt(v_t) beyond the noised means (a
        lower estimate of the sup; |eig| -> 1 / v_t only far from every mode, where Cov_r -> 0)."""
        a = 1 - t
        lim = a * self.means.abs().max().item() + margin * math.sqrt(a**2 * self.std**2 + t**2)
        g = torch.linspace(-lim, lim, n, dtype=torch.float64)
        xy = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        tt = torch.full((xy.shape[0],), t, dtype=torch.float64)
        yy = None if y is None else y.expand(xy.shape[0])
        eig = torch.linalg.eigvalsh(self.score_jacobian(xy, tt, yy))  # symmetric -> real eigenvalues
        return eig.abs().max().item()

    def log_prob_t(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p_t(x_t) [B] of the noised marginal (the function score() differentiates)."""
        a, v, r, m = self._parts(x_t, t, y)
        logits = self._logw(y, x_t.shape[0]).double() - 0.5 * v * (m**2).sum(-1) - torch.log(2 * math.pi * v)
        return torch.logsumexp(logits, -1).to(x_t.dtype)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p_real(x) [B] of the clean mixture (for density contours)."""
        d2 = ((x[:, None, :].double() - self.means.double()[None]) ** 2).sum(-1)
        logn = -0.5 * d2 / self.std**2 - math.log(2 * math.pi * self.std**2)
        return torch.logsumexp(self.weights.double().log()[None] + logn, -1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# The datasets. VEEGAN (Srivastava et al., 2017) and PacGAN (Lin et al., 2018) use a ring of 8 modes of radius 2
# and a 5x5 grid with spacing 2 on [-4, 4]^2, both with std 0.02. We keep the geometry and a larger std by
# default (see docs/toy.md: with std 0.02 the "high quality" window 3 std = 0.06 is narrower than what a small
# MLP student resolves in a few hundred steps, which would measure the network, not the loss). We use 0.2:
# neighbouring ring modes are still 7.7 std apart, grid modes 10 std. --std changes it.


def ring(std: float = 0.2, radius: float = 2.0, n_modes: int = 8) -> GMM:
    ang = torch.arange(n_modes) * (2 * math.pi / n_modes)
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    return GMM(means, torch.full((n_modes,), 1 / n_modes), std, name="ring")


def grid(std: float = 0.2, spacing: float = 2.0, side: int = 5) -> GMM:
    c = (torch.arange(side) - (side - 1) / 2) * spacing
    means = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    return GMM(means, torch.full((side * side,), 1 / side**2), std, name="grid")


def ring_cond(std: float = 0.2, radius: float = 2.0, n_modes: int = 8, n_classes: int = 4) -> GMM:
    """The ring with class labels: class c holds modes c and c + n_classes (opposite each other), so the
    class-conditional teacher is bimodal and guidance pushes each mode away from its neighbours of other classes."""
    m = ring(std, radius, n_modes)
    labels = torch.arange(n_modes) % n_classes
    m.joint = (labels[None, :] == torch.arange(n_classes)[:, None]).float() * m.weights[None]
    m.name = "ring_cond"
    return m


def ring_shared(std: float = 0.2, radius: float = 2.0, n_classes: int = 4) -> GMM:
    """8 ring modes, 4 classes that share modes: class c holds modes 2c, 2c + 1, 2c + 2 (mod 8) with P(k | c) = 1/3,
    so each even mode belongs to two classes and each odd one to one. Under CFG the guided class-c target
    p(x | c)^g p(x)^(1 - g) weights a shared mode (twice as likely unconditionally) by 2^(1 - g) relative to the
    class's own mode: 1/4 at g = 3 (Cosmos), 1/16 at g = 5 (Wan); the exact CFG teacher's own samples are more
    extreme still (~20% and ~2% of the data's share on each shared mode, toy/RESULTS.md). This is the CFG-induced
    diversity loss of few-step video students (guidance suppresses what a prompt shares with others) in 2D."""
    n_modes = 2 * n_classes
    m = ring(std, radius, n_modes)
    joint = torch.zeros(n_classes, n_modes)
    for c in range(n_classes):
        joint[c, [2 * c, 2 * c + 1, (2 * c + 2) % n_modes]] = 1.0 / (3 * n_classes)
    return GMM(m.means, joint.sum(0), std, joint, name="ring_shared")


DATASETS = {"ring": ring, "grid": grid, "ring_cond": ring_cond, "ring_shared": ring_shared}


class ExactTeacher:
    """The exact mixture as a dfd Denoiser: (x_t [B,2], t [B], cond) -> x0_hat [B,2].

    cond is None (unconditional) or a dict with "y" (class labels [B]); with labels and g != 1 the result is
    dfd.cfg(x0 | y, x0 unconditional, g), the guided teacher the paper distils (g = 5 Wan, 3 Cosmos).
    """

    def __init__(self, gmm: GMM, g: float = 1.0):
        self.gmm, self.g = gmm, g

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        y = None if cond is None else cond.get("y")
        x0_u = self.gmm.x0(x_t, t)
        if y is None:
            return x0_u
        x0_c = self.gmm.x0(x_t, t, y)
        return dfd.cfg(x0_c, x0_u, self.g)

    def score(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return dfd.score_from_x0(x_t, self(x_t, t, cond), t)
