"""Numerical checks of the paper's theory (App. A) against the exact mixture teacher.

    python toy/theory.py [--out out/toy]      # ~10 s: tables + figure; also run by toy/mixture.py --all

Prop. A.1 (zero-mean discrepancy). A "perfect" generator is a mixture sampler whose parameters equal the data's:
G(z) = mu_k + s z', z = (k, z'), theta = (mu_1..mu_K, log s). With x_t = alpha_t x + sigma_t eps and
x~_t = alpha_t G + sigma_t eps (shared eps), Delta = s_real(x_t) - s_real(x~_t) (Eq. 5 on the noised path).
E[Delta] = 0 holds for every pairing of x with z, since x_t and x~_t are both distributed as p_real,t. What
the gradient needs (Eq. 4) is E[Delta^T dG/dtheta], and at the optimum g_DMD = 0, so g_DFD(theta*) =
-E[Delta^T dG/dtheta]: DFD leaves the perfect generator unless that is zero too. We measure it per pairing
(independent x; same mode, independent offset; mini-batch OT) against the batch size, in score space (Eq. 8)
and in x0 space (the authors' code: x0_T(x_t) - x0_T(x~_t) replaces Delta).

Prop. 1 (bounded MSE). For an MLP generator G_theta and x independent of z, each link of the proof:
  LHS    ||E[(s(x~_t) - s(x_t))^T dG/dtheta]||^2                         (U-statistic, unbiased in N)
  <= J   E||(s(x~_t) - s(x_t))^T dG/dtheta||^2                            (Jensen)
  <= B   B^2 E||s(x~_t) - s(x_t)||^2,  B = max_i ||dG(z_i)/dtheta||_op     (Condition 3, torch.func per sample)
  <= L   B^2 L(t)^2 alpha_t^2 delta^2,  delta^2 = E||x - G||^2             (Condition 2 with L from a dense
                                                                           grid; and with the analytic bound)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn as nn
from torch.func import functional_call, jacrev, vmap

import dfd
from toy import gmm as gmm_lib

T_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


# ---------------------------------------------------------------------------------------------------
# Prop. A.1 and the gradient-level quantity.


def perfect_sample(gmm: gmm_lib.GMM, n: int, gen: torch.Generator):
    """G(z) of the perfect mixture sampler: (G [n,2], k [n], z' [n,2])."""
    k = torch.multinomial(gmm.weights, n, replacement=True, generator=gen)
    z = torch.randn(n, 2, generator=gen)
    return gmm.means[k] + gmm.std * z, k, z


def pair(gmm: gmm_lib.GMM, G: torch.Tensor, k: torch.Tensor, pairing: str, gen: torch.Generator, batch: int):
    """The real sample x for each G [n, 2] (n a multiple of batch for "ot")."""
    n = G.shape[0]
    if pairing == "independent":
        return gmm.sample(n, gen)
    if pairing == "same_mode":  # the mode of G, an independent offset inside it
        return gmm.means[k] + gmm.std * torch.randn(n, 2, generator=gen)
    if pairing == "ot":
        from scipy.optimize import linear_sum_assignment

        x = gmm.sample(n, gen)
        out = torch.empty_like(x)
        for b in range(0, n, batch):
            cost = (torch.cdist(G[b:b + batch].double(), x[b:b + batch].double()) ** 2).numpy()
            r, c = linear_sum_assignment(cost)
            out[b + r] = x[b + c]
        return out
    raise ValueError(f"pairing: expected independent | same_mode | ot, got {pairing!r}")


def discrepancy_gradient(gmm: gmm_lib.GMM, t: float, pairing: str, batch: int, n: int = 32768, seed: int = 0,
                         space: str = "score") -> dict[str, float]:
    """Prop. A.1 with a perfect generator at noise level t, over n samples in batches of `batch`.

    Returns the size of E[Delta] and of E[Delta^T dG/dtheta] (split into the means block and the log-std
    entry), each with its Monte-Carlo noise floor (*_se), so size / noise floor >> 1 means a real non-zero value.
    space = "x0": Delta is replaced by x0_T(x_t) - x0_T(x~_t), what the authors' x0-space code feeds in.
    """
    gen = torch.Generator().manual_seed(seed)
    n = n // batch * batch
    G, k, z = perfect_sample(gmm, n, gen)
    x = pair(gmm, G, k, pairing, gen, batch)
    eps = torch.randn(n, 2, generator=gen)
    tt = torch.full((n,), t)
    x_t, xg_t = dfd.forward_diffusion(x, eps, tt), dfd.forward_diffusion(G, eps, tt)
    if space == "score":
        d = (gmm.score(x_t.double(), tt, None) - gmm.score(xg_t.double(), tt, None)).double()
    else:
        d = (gmm.x0(x_t.double(), tt) - gmm.x0(xg_t.double(), tt)).double()
    # per-sample Delta^T dG/dtheta: dG/dmu_j = 1[k = j] I, dG/dlog s = s z'
    per_mu = torch.zeros(n, gmm.K, 2, dtype=torch.float64)
    per_mu[torch.arange(n), k] = d
    per_logs = gmm.std * (d * z.double()).sum(1)  # [n]
    # batch means are the units (OT couples the samples of a batch)
    nb = n // batch
    m_mu = per_mu.reshape(nb, batch, -1).mean(1)  # [nb, 2K]
    m_ls = per_logs.reshape(nb, batch).mean(1)
    m_d = d.reshape(nb, batch, 2).mean(1)

    def norm_se(v):  # ||mean over batches|| and its noise floor sqrt(sum of squared standard errors):
        # with a zero true mean, E||mean||^2 = sum se^2, so norm / floor ~ 1 is "zero within noise"
        mean = v.mean(0)
        se = v.std(0) / math.sqrt(v.shape[0]) if v.shape[0] > 1 else torch.full_like(mean, math.nan)
        return mean.norm().item(), se.norm().item()

    e_d, e_d_se = norm_se(m_d)
    e_mu, e_mu_se = norm_se(m_mu)
    e_ls, e_ls_se = m_ls.mean().item(), (m_ls.std() / math.sqrt(nb)).item()
    return {"t": t, "pairing": pairing, "batch": batch, "space": space,
            "E_delta": e_d, "E_delta_se": e_d_se, "E_delta_dG_mu": e_mu, "E_delta_dG_mu_se": e_mu_se,
            "E_delta_dG_logstd": e_ls, "E_delta_dG_logstd_se": e_ls_se,
            "gap2": ((x - G) ** 2).sum(1).mean().item()}


# ---------------------------------------------------------------------------------------------------
# Prop. 1: the bound chain for an MLP generator.


class MLPGenerator(nn.Module):
    """A small one-step generator z [B, 2] -> x [B, 2] (the per-sample Jacobian stays cheap)."""

    def __init__(self, hidden: int = 32, scale: float = 2.0):
        super().__init__()
        self.scale = scale
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * self.net(z)


def per_sample_jacobian(G: nn.Module, z: torch.Tensor, chunk: int = 512):
    """Yields (z chunk, J [b, 2, P]) with J_i = dG(z_i)/dtheta, via torch.func (vmap of jacrev)."""
    params = {k: v.detach() for k, v in G.named_parameters()}

    def g(p, zi):
        return functional_call(G, p, (zi[None],))[0]

    jac = vmap(jacrev(g), in_dims=(None, 0))
    for b in range(0, z.shape[0], chunk):
        J = jac(params, z[b:b + chunk])
        yield z[b:b + chunk], torch.cat([j.reshape(j.shape[0], 2, -1) for j in J.values()], 2)


def bound_chain(gmm: gmm_lib.GMM, G: nn.Module, ts=T_GRID, n: int = 2048, seed: int = 0, grid_n: int = 301,
                space: str = "score", pairing: str = "independent") -> list[dict]:
    """Every link of Prop. 1's proof at each t (shared eps). pairing: "independent" (x independent of z: delta^2 is
    about twice the data variance, so the validity condition, Eq. 7, does not hold) or "ot" (x re-assigned to the
    G(z) by optimal transport over all n samples: small delta^2, the regime Prop. 1 is meant for). space = "x0"
    runs the same chain for the authors' x0-space difference x0_T(x~_t) - x0_T(x_t), with L the Lipschitz
    constant of x_t -> x0_T(x_t), i.e. sup ||(I + sigma_t^2 H) / alpha_t||_op.

    Which links can fail: lhs <= jensen (Jensen) and jensen <= B_link (||d^T J|| <= ||J||_op ||d||, B the max over
    the same samples) are identities on any numbers. B_link <= L_link_* is the informative one: it holds only if
    L is a true Lipschitz constant of the teacher along the pairs; `lip_ratio_*` = max over samples of
    ||d_i|| / (alpha_t L ||G_i - x_i||), which must be <= 1 (the grid L is a lower estimate of the sup)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=gen)
    x = gmm.sample(n, gen)
    eps = torch.randn(n, 2, generator=gen)
    with torch.no_grad():
        Gz = G(z)
    if pairing == "ot":
        from scipy.optimize import linear_sum_assignment

        r, c = linear_sum_assignment((torch.cdist(Gz.double(), x.double()) ** 2).numpy())
        x = x[torch.as_tensor(c)[torch.as_tensor(r).argsort()]]
    elif pairing != "independent":
        raise ValueError(f"pairing: expected independent | ot, got {pairing!r}")
    delta2 = ((x - Gz) ** 2).sum(1).mean().item()  # E||x - G||^2 (Condition 1 with equality)
    Js = [J.double() for _, J in per_sample_jacobian(G, z)]
    J = torch.cat(Js)  # [n, 2, P]
    B = torch.linalg.matrix_norm(J, ord=2).max().item()  # Condition 3
    rows = []
    for t in ts:
        tt = torch.full((n,), t, dtype=torch.float64)
        a = 1 - t
        x_t = dfd.forward_diffusion(x.double(), eps.double(), tt)
        xg_t = dfd.forward_diffusion(Gz.double(), eps.double(), tt)
        if space == "score":
            d = gmm.score(xg_t, tt) - gmm.score(x_t, tt)
            L_grid, L_an = gmm.lipschitz_grid(t, grid_n), gmm.lipschitz_bound(t)
        else:
            d = gmm.x0(xg_t, tt) - gmm.x0(x_t, tt)
            L_grid, L_an = x0_lipschitz_grid(gmm, t, grid_n), x0_lipschitz_bound(gmm, t)
        v = torch.einsum("ni,nip->np", d, J)  # per-sample d^T dG/dtheta [n, P]
        gap = (Gz.double() - x.double()).norm(dim=1).clamp_min(1e-12)
        lip = {k: (d.norm(dim=1) / (a * L * gap)).max().item() for k, L in (("grid", L_grid), ("analytic", L_an))}
        s = v.sum(0)
        lhs = ((s @ s - (v * v).sum()) / (n * (n - 1))).item()  # unbiased ||E v||^2
        jensen = (v * v).sum(1).mean().item()
        b_link = B**2 * (d * d).sum(1).mean().item()
        rows.append({"t": t, "alpha_t": a, "B": B, "delta2": delta2, "L_grid": L_grid, "L_analytic": L_an,
                     "lhs": lhs, "lhs_plugin": (s @ s).item() / n**2, "jensen": jensen, "B_link": b_link,
                     "L_link_grid": B**2 * L_grid**2 * a**2 * delta2,
                     "L_link_analytic": B**2 * L_an**2 * a**2 * delta2,
                     "eq6_ratio": (d * d).sum(1).mean().item() / (L_grid**2 * a**2 * delta2),
                     "lhs_over_rhs": lhs / (B**2 * L_grid**2 * a**2 * delta2),
                     "lip_ratio_grid": lip["grid"], "lip_ratio_analytic": lip["analytic"]})
    return rows


def x0_lipschitz_grid(gmm: gmm_lib.GMM, t: float, n: int = 301, margin: float = 6.0) -> float:
    """max over a grid of ||d x0_T / d x_t||_op = ||(I + sigma_t^2 H) / alpha_t||_op (Tweedie: x0 = (x_t +
    sigma_t^2 s) / alpha_t); the grid is the one of GMM.lipschitz_grid."""
    a = 1 - t
    lim = a * gmm.means.abs().max().item() + margin * math.sqrt(a**2 * gmm.std**2 + t**2)
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    xy = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    H = gmm.score_jacobian(xy, torch.full((xy.shape[0],), t, dtype=torch.float64))
    Jx0 = (torch.eye(2, dtype=H.dtype) + t**2 * H) / a
    return torch.linalg.eigvalsh(Jx0).abs().max().item()


def x0_lipschitz_bound(gmm: gmm_lib.GMM, t: float) -> float:
    """The same from H's eigenvalues in [-1/v, -1/v + alpha^2 D^2 / (4 v^2)]: (1 + sigma^2 lambda) / alpha."""
    a = 1 - t
    v = a**2 * gmm.std**2 + t**2
    lo, hi = -1 / v, -1 / v + a**2 * gmm.diameter**2 / (4 * v**2)
    return max(abs(1 + t**2 * lo), abs(1 + t**2 * hi)) / a


# ---------------------------------------------------------------------------------------------------
# Report.


def fit_generator(gmm: gmm_lib.GMM, steps: int = 300, seed: int = 0) -> MLPGenerator:
    """An MLP generator near the data, so delta^2 is in the regime the paper describes: trained with the
    sliced energy distance to the mixture (a proper, non-adversarial loss; cheap)."""
    torch.manual_seed(seed)
    G = MLPGenerator()
    opt = torch.optim.Adam(G.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        z = torch.randn(256, 2, generator=gen)
        x = gmm.sample(256, gen)
        y = G(z)
        loss = 2 * torch.cdist(y, x).mean() - torch.cdist(y, y).mean()  # energy distance up to a constant
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return G


def _md_table(rows: list[dict], cols: list[str], fmt: str = "{:.3g}") -> str:
    head = "| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|\n"
    body = "\n".join("| " + " | ".join(fmt.format(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols)
                     + " |" for r in rows)
    return head + body


def report(out_dir: str, dataset: str = "ring", std: float = 0.2, quick: bool = False) -> dict:
    from toy import plots

    os.makedirs(out_dir, exist_ok=True)
    gmm = gmm_lib.DATASETS[dataset](std=std)
    res: dict = {"dataset": dataset, "std": std}
    # Prop. A.1 and E[Delta dG/dtheta] per pairing and batch size, at t = 0.5
    a1 = []
    for space in ("score", "x0"):
        for pairing in ("independent", "same_mode", "ot"):
            for batch in ((16, 256) if quick else (16, 64, 256, 1024)):
                if pairing != "ot" and batch != 256:
                    continue  # the batch only matters for OT
                a1.append(discrepancy_gradient(gmm, 0.5, pairing, batch, n=8192 if quick else 32768, space=space))
    res["prop_a1"] = a1
    # Prop. 1 chain
    G = fit_generator(gmm, steps=100 if quick else 300)
    chain = {(sp, pr): bound_chain(gmm, G, n=512 if quick else 2048, space=sp, pairing=pr)
             for sp in ("score", "x0") for pr in ("independent", "ot")}
    res["prop1"] = {f"{sp}_{pr}": rows for (sp, pr), rows in chain.items()}
    cols_a1 = ["space", "pairing", "batch", "E_delta", "E_delta_se", "E_delta_dG_mu", "E_delta_dG_mu_se",
               "E_delta_dG_logstd", "E_delta_dG_logstd_se", "gap2"]
    cols_p1 = ["t", "L_grid", "L_analytic", "lhs", "jensen", "B_link", "L_link_grid", "L_link_analytic",
               "lhs_over_rhs", "eq6_ratio", "lip_ratio_grid", "lip_ratio_analytic"]
    md = [f"**Prop. A.1, perfect mixture sampler on {dataset} (std {std}), t = 0.5.** E_delta = 0 is a sanity check "
          "only (x_t and x~_t have the same law, so it holds for any function in place of the score); the "
          "informative columns are E_delta_dG_*.", "", _md_table(a1, cols_a1)]
    for (sp, pr), rows in chain.items():
        r0 = rows[0]
        md += ["", f"**Prop. 1 chain ({sp} space, x {pr} of z), MLP generator: B = {r0['B']:.3g}, delta^2 = "
               f"{r0['delta2']:.3g}** (lhs <= jensen <= B_link are identities; B_link <= L_link and "
               "lip_ratio <= 1 are the checks that could fail; lhs_over_rhs = lhs / L_link_grid)", "",
               _md_table(rows, cols_p1)]
        plots.theory_figure([r["t"] for r in rows],
                            {k: [r[k] for r in rows] for k in ("lhs", "jensen", "B_link", "L_link_grid",
                                                               "L_link_analytic")},
                            os.path.join(out_dir, f"theory_prop1_{sp}_{pr}.png"),
                            f"Prop. 1 chain, {sp} space, x {pr} of z ({dataset}, std {std})")
    text = "\n".join(md)
    write_atomic(os.path.join(out_dir, "theory.md"), text + "\n")
    write_atomic(os.path.join(out_dir, "theory.json"), json.dumps(res, indent=1))
    print(text)
    return res


def write_atomic(path: str, text: str) -> None:
    """Through a temporary name and a rename: a killed run never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def earlier_results(out_dir: str, names: tuple[str, ...]) -> list[str]:
    """Which of the files a toy run writes `out_dir` already holds (an earlier run's)."""
    return [n for n in names if os.path.exists(os.path.join(out_dir, n))]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Prop. A.1 and Prop. 1 checked against the exact mixture")
    ap.add_argument("--out", default=os.path.join("out", "toy"), help="output folder (default out/toy)")
    ap.add_argument("--overwrite", action="store_true", help="replace theory.md / theory.json of an earlier run")
    ap.add_argument("--dataset", default="ring", choices=sorted(gmm_lib.DATASETS))
    ap.add_argument("--std", type=float, default=0.2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    held = earlier_results(a.out, ("theory.md", "theory.json"))
    if held and not a.overwrite:
        raise SystemExit(f"error: --out {a.out} already holds {', '.join(held)} of an earlier run; pass --overwrite "
                         "to replace them, or give another --out")
    torch.set_num_threads(1)
    report(a.out, a.dataset, a.std, a.quick)
