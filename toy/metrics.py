"""Sample-quality metrics for the 2D mixtures (VEEGAN / PacGAN style, plus over-saturation and energy distance).

All take samples [N, 2] from the student's 4-step sampler and the true mixture.
"""
from __future__ import annotations

import math

import torch

from toy.gmm import GMM

COVER_FRACTION = 0.1  # a mode is covered when it holds >= 10% of its expected share of high-quality samples


def assign(x: torch.Tensor, gmm: GMM) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest mode [N], distance to it in units of the data std [N])."""
    d = torch.cdist(x.double(), gmm.means.double())  # [N, K]
    dist, k = d.min(1)
    return k, dist / gmm.std


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (>= 0, 0 iff equal in law); V-statistic."""
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def evaluate(x: torch.Tensor, gmm: GMM, x_ref: torch.Tensor) -> dict[str, float]:
    """Metrics of samples x [N, 2] against the mixture (x_ref [M, 2]: fresh data samples for the energy distance).

    modes:     number of modes with >= COVER_FRACTION * N * w_k high-quality samples
    hq:        % of samples within 3 std of the nearest mean (VEEGAN's "high quality")
    kl:        KL(q || w), q the histogram of high-quality samples over modes (PacGAN's mode KL; log(K/m) when
               m of K equal modes are covered evenly)
    var_ratio: mean over covered modes of (per-dimension variance of the samples nearest to that mode) / s^2;
               < 1 is over-sharpened, > 1 blurred. Samples are those within half the distance to the nearest
               other mode, so the ratio is not truncated at 3 std the way "hq" is.
    shift:     mean over covered modes (with |mu_k| > 0) of the outward radial offset of the mode's sample mean,
               (mean - mu_k) . mu_k / |mu_k|, in units of s; > 0 means pushed beyond the data (over-saturation)
    energy:    energy distance to x_ref
    """
    N = x.shape[0]
    k, dist = assign(x, gmm)
    hq = dist <= 3
    counts = torch.bincount(k[hq], minlength=gmm.K).double()
    w = gmm.weights.double()
    covered = counts >= COVER_FRACTION * N * w
    q = counts / counts.sum().clamp_min(1)
    kl = (q[q > 0] * (q[q > 0] / w[q > 0]).log()).sum().item() if counts.sum() > 0 else math.inf
    mm = torch.cdist(gmm.means.double(), gmm.means.double())
    half_gap = (mm + torch.eye(gmm.K, dtype=mm.dtype) * 1e9).min(1).values / 2  # [K]
    var_ratios, shifts = [], []
    for j in torch.nonzero(covered).flatten().tolist():
        sel = x[(k == j) & (dist * gmm.std <= half_gap[j])].double()
        if sel.shape[0] < 10:
            continue
        var_ratios.append((sel.var(0).mean() / gmm.std**2).item())
        mu = gmm.means[j].double()
        if mu.norm() > 1e-6:
            shifts.append(((sel.mean(0) - mu) @ (mu / mu.norm()) / gmm.std).item())
    mean = lambda v: sum(v) / len(v) if v else math.nan
    return {
        "modes": int(covered.sum()),
        "hq": 100.0 * hq.double().mean().item(),
        "kl": kl,
        "var_ratio": mean(var_ratios),
        "shift": mean(shifts),
        "energy": energy_distance(x, x_ref),
    }
