"""Sample-quality metrics for the 2D mixtures (VEEGAN / PacGAN style mode counts, a per-mode variance that does not
saturate, over-saturation, energy distance). All take samples [N, 2] from a sampler and the true mixture; the unit
tests on known distributions (perfect sampler, a sampler missing k modes, means x 1.05, a 4x blur) are in
tests/test_toy.py.
"""
from __future__ import annotations

import math

import torch

from toy.gmm import GMM

COVER_FRACTION = 0.1  # a mode is lost when it holds < 10% of the data's share of high-quality samples
HQ_STD = 3.0  # "high quality": within 3 std of the nearest mean (VEEGAN)


def assign(x: torch.Tensor, gmm: GMM) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest mode [N], distance to it in units of the data std [N])."""
    dist, k = torch.cdist(x.double(), gmm.means.double()).min(1)
    return k, dist / gmm.std


def mode_shares(x: torch.Tensor, gmm: GMM) -> torch.Tensor:
    """[K] each mode's count of high-quality samples over what the data would put there (N w_k): 1 = the data's
    share, 0 = no sample within HQ_STD std of that mode."""
    k, dist = assign(x, gmm)
    counts = torch.bincount(k[dist <= HQ_STD], minlength=gmm.K).double()
    return counts / (x.shape[0] * gmm.weights.double())


def mode_status(before: list[float] | None, after: list[float]) -> list[str]:
    """Per mode, from the shares (mode_shares) of a reference sampler (`before`, e.g. the stage-1 student) and of
    the sampler measured (`after`): "kept" (not lost in either), "recovered" (lost before, not after), "lost" (lost
    in both) or "dropped" (lost only after). before=None: "kept" or "lost" on `after` alone."""
    out = []
    for j, a in enumerate(after):
        lost_now = a < COVER_FRACTION
        lost_before = before is not None and before[j] < COVER_FRACTION
        if before is None:
            out.append("lost" if lost_now else "kept")
        else:
            out.append({(False, False): "kept", (True, False): "recovered", (True, True): "lost",
                        (False, True): "dropped"}[(lost_before, lost_now)])
    return out


def mode_variances(x: torch.Tensor, gmm: GMM, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-mode isotropic variance / s^2 [K], fitted weights [K], responsibilities [N, K]) of a mixture fitted to x
    by EM with the means held at the true means. Well specified for a sampler that blurs the true modes, so a 4x
    blur reads 4: nothing is truncated (a window of 3 std, or half-way to the next mode, saturates at ~3.2 for the
    ring). A mode displaced by d adds |d|^2 / 2 per dimension: this is the spread about the true mean."""
    x, mu = x.double(), gmm.means.double()
    d2 = ((x[:, None] - mu[None]) ** 2).sum(-1)  # [N, K]
    v = torch.full((gmm.K,), 4 * gmm.std**2, dtype=torch.float64)
    w = torch.full((gmm.K,), 1.0 / gmm.K, dtype=torch.float64)
    for _ in range(iters):
        r = (w.clamp_min(1e-300).log() - d2 / (2 * v) - v.log()).softmax(1)  # 2D Gaussian: -log(2 pi v)
        nk = r.sum(0)
        w = nk / nk.sum()
        v = ((r * d2).sum(0) / (2 * nk.clamp_min(1e-12))).clamp_min(1e-10)
    r = (w.clamp_min(1e-300).log() - d2 / (2 * v) - v.log()).softmax(1)
    return v / gmm.std**2, w, r


def kl(q: torch.Tensor, w: torch.Tensor) -> float:
    """KL(q || w) = sum_k q_k log(q_k / w_k) over q_k > 0 (PacGAN's mode KL; log(K/m) when m of K equal modes are
    hit evenly; finite when modes are missing, which KL(w || q) is not)."""
    q, w = q.double(), w.double()
    m = q > 0
    return (q[m] * (q[m] / w[m]).log()).sum().item()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (>= 0, 0 iff equal in law); V-statistic."""
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def evaluate(x: torch.Tensor, gmm: GMM, x_ref: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics of samples x [N, 2] (x_ref [M, 2]: fresh data samples for the energy distance; y [N]: the samples'
    class labels, for the class-conditional KL).

    lost:      number of modes with < COVER_FRACTION of the data's share of high-quality samples (mode_shares)
    shares:    [K] mode_shares as a list (what mode_status reads)
    hq:        % of samples within HQ_STD std of the nearest mean (VEEGAN's "high quality")
    kl:        KL(q || w), q the histogram of high-quality samples over modes, w the true weights
    kl_cond:   with y: the class-weighted mean over classes c of KL(q_c || P(k | c)), q_c the histogram of class
               c's high-quality samples on class c's own modes (what guidance changes; nan without y)
    off_class: with y: % of high-quality samples on a mode outside their class (nan without y)
    var_ratio: mean over covered modes of the EM-fitted per-mode variance / s^2 (mode_variances; 1 = as sharp as
               the data, > 1 blurred, < 1 over-sharpened)
    shift:     mean over covered modes (|mu_k| > 0) of the outward radial offset of the mode's mean under the EM
               responsibilities, (mean_k - mu_k) . mu_k / |mu_k|, in units of s; > 0: beyond the data
    energy:    energy distance to x_ref
    """
    k, dist = assign(x, gmm)
    hq = dist <= HQ_STD
    counts = torch.bincount(k[hq], minlength=gmm.K).double()
    w = gmm.weights.double()
    shares = counts / (x.shape[0] * w)  # mode_shares, from the counts above
    covered = shares >= COVER_FRACTION
    kl_all = kl(counts / counts.sum(), w) if counts.sum() > 0 else math.inf
    kl_cond = off_class = math.nan
    if y is not None and gmm.conditional:
        kl_cond, cw, own = 0.0, gmm.class_weights.double(), gmm.cond_weights > 0  # own: [C, K]
        for c in range(gmm.n_classes):
            cc = torch.bincount(k[hq & (y == c)], minlength=gmm.K).double() * own[c]
            kl_cond += cw[c].item() * (kl(cc / cc.sum(), gmm.cond_weights[c]) if cc.sum() > 0 else math.inf)
        off_class = 100.0 * (~own[y[hq], k[hq]]).double().mean().item() if hq.any() else math.nan
    var, _, r = mode_variances(x, gmm)
    shifts = []
    for j in torch.nonzero(covered).flatten().tolist():
        mu = gmm.means[j].double()
        if mu.norm() > 1e-6:
            mean_j = (r[:, j:j + 1] * x.double()).sum(0) / r[:, j].sum()
            shifts.append(((mean_j - mu) @ (mu / mu.norm()) / gmm.std).item())
    return {
        "lost": int((~covered).sum()),
        "shares": shares.tolist(),
        "hq": 100.0 * hq.double().mean().item(),
        "kl": kl_all,
        "kl_cond": kl_cond,
        "off_class": off_class,
        "var_ratio": var[covered].mean().item() if covered.any() else math.nan,
        "shift": sum(shifts) / len(shifts) if shifts else math.nan,
        "energy": energy_distance(x, x_ref),
    }
