"""Tests of the 2D toy (toy/): the exact teacher, the metrics on known distributions (mode loss above all), the
theory checks, the pairings, the verdict, and seeded outcomes.

    python -m pytest tests/test_toy.py -q            # default share
    python -m pytest tests/test_toy.py -q -m slow    # mode recovery over the 4 tuning seeds at the study's budget

Seeded outcomes are chaotic in the floating-point path: ATEN_CPU_CAPABILITY=default vs avx2 vs avx512 gives a
different stage-1 student from the same seed. So every outcome asserted here is an effect several times larger
than the spread across seeds and float paths, and sums over seeds are preferred to one seed's margin; each test's
docstring gives the measured effect and spread.
"""
import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import dfd
from toy import gmm as gmm_lib
from toy import mixture, theory
from toy.metrics import evaluate, mode_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLPs: one thread is fastest and keeps the shared machine usable
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------
# The exact teacher.


@pytest.mark.parametrize("name", sorted(gmm_lib.DATASETS))
def test_score_tweedie_jacobian_against_finite_differences(name):
    gmm = gmm_lib.DATASETS[name]()
    gen = torch.Generator().manual_seed(0)
    n = 64
    y = gmm.sample_labels(n, gen) if gmm.conditional else None
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    x_t = dfd.forward_diffusion(gmm.sample(n, gen, y).double(), torch.randn(n, 2, generator=gen).double(), t)
    h = 1e-5
    for yy in ([None, y] if y is not None else [None]):
        score = gmm.score(x_t, t, yy)
        H = gmm.score_jacobian(x_t, t, yy)
        for i in range(2):
            e = torch.zeros(1, 2, dtype=torch.float64)
            e[0, i] = h
            fd = (gmm.log_prob_t(x_t + e, t, yy) - gmm.log_prob_t(x_t - e, t, yy)) / (2 * h)
            torch.testing.assert_close(score[:, i], fd, rtol=1e-5, atol=1e-6)
            fd_h = (gmm.score(x_t + e, t, yy) - gmm.score(x_t - e, t, yy)) / (2 * h)
            torch.testing.assert_close(H[:, :, i], fd_h, rtol=1e-4, atol=1e-4)
        # Tweedie: E[x0 | x_t] = (x_t + sigma_t^2 score) / alpha_t, and the x0 <-> score conversion of dfd
        x0 = gmm.x0(x_t, t, yy)
        torch.testing.assert_close(x0, (x_t + t[:, None] ** 2 * score) / (1 - t[:, None]), rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(dfd.score_from_x0(x_t, x0, t), score, rtol=1e-8, atol=1e-8)
        assert torch.allclose(H, H.transpose(1, 2), atol=1e-10)


def test_tweedie_matches_monte_carlo_posterior_mean():
    """E[x0 | x_t] by importance weighting of prior samples agrees with the closed form."""
    gmm = gmm_lib.ring()
    gen = torch.Generator().manual_seed(1)
    x0s = gmm.sample(200_000, gen).double()
    for t in (0.3, 0.7):
        x_t = torch.tensor([[1.0, 0.5], [-0.3, -1.2]], dtype=torch.float64)
        logw = -0.5 * ((x_t[:, None, :] - (1 - t) * x0s[None]) ** 2).sum(-1) / t**2  # [2, N]
        mc = (logw.softmax(-1)[:, :, None] * x0s[None]).sum(1)
        exact = gmm.x0(x_t, torch.full((2,), t, dtype=torch.float64))
        torch.testing.assert_close(exact, mc, atol=2e-2, rtol=0)


def test_cfg_teacher_is_uncond_plus_g_times_difference():
    gmm = gmm_lib.ring_cond()
    gen = torch.Generator().manual_seed(2)
    y = gmm.sample_labels(32, gen)
    x_t, t = torch.randn(32, 2, generator=gen), torch.rand(32, generator=gen)
    T = gmm_lib.ExactTeacher(gmm, g=3.0)
    u, c = gmm.x0(x_t, t), gmm.x0(x_t, t, y)
    torch.testing.assert_close(T(x_t, t, {"y": y}), u + 3.0 * (c - u))
    torch.testing.assert_close(gmm_lib.ExactTeacher(gmm, g=1.0)(x_t, t, {"y": y}), c)


@pytest.mark.parametrize("name", sorted(gmm_lib.DATASETS))
def test_lipschitz_grid_below_analytic_bound(name):
    gmm = gmm_lib.DATASETS[name]()
    for t in (0.05, 0.2, 0.5, 0.8, 0.95):
        grid, bound = gmm.lipschitz_grid(t, n=201), gmm.lipschitz_bound(t)
        assert grid <= bound * (1 + 1e-9), (t, grid, bound)
        # |eig| -> 1/v_t far from the modes (Cov_r -> 0); the grid reaches 6 noise std beyond them
        assert grid >= 0.95 / (gmm.std**2 * (1 - t) ** 2 + t**2)
        gx, bx = theory.x0_lipschitz_grid(gmm, t, n=201), theory.x0_lipschitz_bound(gmm, t)
        assert gx <= bx * (1 + 1e-9), (t, gx, bx)


# ---------------------------------------------------------------------------------------------------
# The theory checks.


@pytest.mark.parametrize("pairing", ["independent", "ot"])
@pytest.mark.parametrize("space", ["score", "x0"])
def test_prop1_bound_chain_holds_at_every_t(space, pairing):
    """Prop. 1 on an MLP generator. lhs <= jensen <= B_link are identities on the same samples (asserted as such);
    the checks that could fail are the Lipschitz link per sample (||d_i|| <= alpha_t L ||G_i - x_i|| with the
    analytic L) and the bound itself. With OT pairing delta^2 is ~0.4 (validity condition holds; independent:
    ~8) and the bound is still >= 20x loose at every t."""
    gmm = gmm_lib.ring()
    torch.manual_seed(0)
    G = theory.fit_generator(gmm, steps=150) if pairing == "ot" else theory.MLPGenerator(hidden=16)
    rows = theory.bound_chain(gmm, G, n=384, grid_n=161, space=space, pairing=pairing)
    for r in rows:
        assert r["lhs"] <= r["jensen"] * (1 + 1e-9) and r["jensen"] <= r["B_link"] * (1 + 1e-9), r  # identities
        assert r["lip_ratio_analytic"] <= 1 + 1e-9, r  # Condition 2 along the pairs, with the analytic L
        assert r["B_link"] <= r["L_link_analytic"] * (1 + 1e-9), r
        assert r["L_link_grid"] <= r["L_link_analytic"] * (1 + 1e-9), r
    if pairing == "ot":
        assert rows[0]["delta2"] < 1.0 and max(r["lhs_over_rhs"] for r in rows) < 0.05, rows
    else:  # how loose: never tight to better than a factor 2 here, and by orders of magnitude at low noise
        ratio = [r["L_link_grid"] / max(r["lhs"], 1e-300) for r in rows]
        assert min(ratio) > 2 and ratio[0] > 1e3, ratio


def test_e_delta_zero_is_an_identity():
    """Prop. A.1's E[Delta] = 0 is a sanity check, not evidence about DFD: x_t and x~_t have the same law for a
    perfect sampler, so E[f(x_t) - f(x~_t)] = 0 for any f, e.g. sin(3x) + x^2 in place of the score."""
    gmm = gmm_lib.ring()
    gen = torch.Generator().manual_seed(0)
    n = 8192
    G, k, _ = theory.perfect_sample(gmm, n, gen)
    x = theory.pair(gmm, G, k, "independent", gen, 256)
    eps, t = torch.randn(n, 2, generator=gen), torch.full((n,), 0.5)
    f = lambda u: torch.sin(3 * u) + u**2
    d = (f(dfd.forward_diffusion(x, eps, t)) - f(dfd.forward_diffusion(G, eps, t))).double()
    assert (d.mean(0).abs() < 3 * d.std(0) / math.sqrt(n)).all()


def test_prop_a1_zero_mean_but_biased_gradient():
    """E[Delta] = 0 for every pairing (Prop. A.1; a sanity check, see above), but the informative
    E[Delta^T dG/dtheta] is not: independent pairing leaves the perfect generator (means block), same-mode
    pairing still moves its std (score space: up; x0: down), and mini-batch OT shrinks the bias as the batch
    grows."""
    gmm = gmm_lib.ring()
    r = {}
    for space in ("score", "x0"):
        for pairing, batch in [("independent", 256), ("same_mode", 256), ("ot", 16), ("ot", 256)]:
            r[space, pairing, batch] = q = theory.discrepancy_gradient(gmm, 0.5, pairing, batch, n=8192, space=space)
            assert q["E_delta"] < 3 * q["E_delta_se"], q  # zero within Monte-Carlo noise
        ind, same = r[space, "independent", 256], r[space, "same_mode", 256]
        assert ind["E_delta_dG_mu"] > 10 * ind["E_delta_dG_mu_se"], ind
        assert same["E_delta_dG_mu"] < 3 * same["E_delta_dG_mu_se"], same
        assert abs(same["E_delta_dG_logstd"]) > 10 * same["E_delta_dG_logstd_se"], same
        assert r[space, "ot", 256]["E_delta_dG_mu"] < 0.5 * r[space, "ot", 16]["E_delta_dG_mu"]
        assert r[space, "ot", 256]["gap2"] < 0.25 * r[space, "ot", 16]["gap2"]
    # sign of the std pull: the update moves theta along +E[Delta dG/dtheta] at the optimum
    assert r["score", "same_mode", 256]["E_delta_dG_logstd"] > 0 > r["x0", "same_mode", 256]["E_delta_dG_logstd"]


# ---------------------------------------------------------------------------------------------------
# The pairings of the independent and OT arms (dfd's `pair` hook).


@pytest.mark.parametrize("kind", ["independent", "ot"])
@pytest.mark.parametrize("name", ["ring", "ring_cond"])
def test_pairing_is_a_permutation_within_each_class(kind, name):
    gmm = gmm_lib.DATASETS[name]()
    gen = torch.Generator().manual_seed(0)
    B = 64
    y = gmm.sample_labels(B, gen) if gmm.conditional else None
    x = gmm.sample(B, gen, y)
    G = x + 0.5 * torch.randn(B, 2, generator=gen)  # a student sample near its own x
    pair = mixture.Pairing(kind, seed=1)
    out = [pair(G, x, {"y": y}) for _ in range(2)]
    for xp in out:
        idx = torch.cdist(xp, x).argmin(1)  # the samples are distinct, so xp[i] = x[idx[i]] identifies idx
        assert torch.equal(xp, x[idx]) and torch.equal(idx.sort().values, torch.arange(B))  # a permutation
        if y is not None:
            assert torch.equal(y[idx], y)  # within the class
        if kind == "independent":  # no G keeps the x its input was made from
            assert (idx != torch.arange(B)).all()
    if kind == "independent":  # every call draws a fresh permutation
        assert not torch.equal(out[0], out[1])
    else:  # deterministic, and optimal: no swap of two same-class assignments lowers the cost
        assert torch.equal(out[0], out[1])
        cost = torch.cdist(G.double(), out[0].double()) ** 2  # cost[i, j] = ||G_i - x assigned to G_j||^2
        d = cost.diagonal()
        same = torch.ones(B, B, dtype=torch.bool) if y is None else y[:, None] == y[None, :]
        assert (d[:, None] + d[None, :] <= cost + cost.T + 1e-9)[same].all()
        assert d.sum() <= (G.double() - x.double()).pow(2).sum() + 1e-9  # no worse than the identity


def test_run_dfd_passes_the_pairing_and_the_warning_level(monkeypatch):
    """run_dfd hands the arm's pairing to dfd.train as `pair` (None for paired), and the toy's delta^2
    warning level is 2 x the data's per-dimension variance (4.08 on the ring, 16.08 on the grid)."""
    seen = []
    monkeypatch.setattr(mixture.dfd, "train", lambda *a, pair=None, **kw: seen.append((a[7].delta2_warn, pair)))
    for name, warn in (("ring", 4.08), ("grid", 16.08), ("ring_cond", 4.08)):
        gmm = mixture.dataset(mixture.ToyConfig(dataset=name))
        for arm, kind in (("dfd_p1", None), ("dfd_p0.5_indep", "independent"), ("dfd_p0.5_ot", "ot")):
            mixture.run_dfd(mixture.State(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)), None, gmm, CFG,
                            mixture.ARMS[arm], 1, seed=0)
            assert seen[-1][0] == pytest.approx(warn, rel=1e-6)
            assert (seen[-1][1] is None) if kind is None else seen[-1][1].kind == kind


# ---------------------------------------------------------------------------------------------------
# The metrics on known distributions: each test fails if the KL is reversed (KL(w || q) is infinite with a mode
# missing), the high-quality threshold is dropped (a 4x blur would read 100%), or the variance is truncated.

CFG = mixture.ToyConfig()  # the suite's defaults


def _known(name: str, n: int = 5000, seed: int = 0):
    gmm = gmm_lib.DATASETS[name]()
    gen = torch.Generator().manual_seed(seed)
    y = gmm.sample_labels(n, gen) if gmm.conditional else None
    x, k = gmm.sample(n, gen, y, return_mode=True)
    return gmm, gen, x, k, y, gmm.sample(2500, gen)


@pytest.mark.parametrize("name", ["ring", "grid", "ring_shared"])
def test_metrics_perfect_sampler(name):
    gmm, _, x, _, y, ref = _known(name)
    m = evaluate(x, gmm, ref, y)
    assert m["lost"] == 0 and min(m["shares"]) > 0.85
    assert m["hq"] == pytest.approx(100 * (1 - math.exp(-4.5)), abs=0.6)  # P(chi^2_2 <= 9) = 98.9%
    assert m["kl"] < 0.005 and m["var_ratio"] == pytest.approx(1.0, abs=0.06) and abs(m["shift"]) < 0.08
    assert m["energy"] < 0.01
    if gmm.conditional:
        assert m["kl_cond"] < 0.005 and m["off_class"] == 0.0


@pytest.mark.parametrize("name", ["ring", "grid", "ring_shared"])
def test_metrics_half_the_modes_dropped(name):
    """Every other mode missing: KL(q || w) = log 2 (the reversed KL would be infinite), half the modes covered."""
    gmm, _, x, k, y, ref = _known(name)
    keep = k % 2 == 0
    m = evaluate(x[keep], gmm, ref, None if y is None else y[keep])
    w = gmm.weights.double()
    q = torch.where(torch.arange(gmm.K) % 2 == 0, w, torch.zeros_like(w))
    q = q / q.sum()
    expected = (q[q > 0] * (q[q > 0] / w[q > 0]).log()).sum().item()  # log 2 for equal weights
    assert m["lost"] == gmm.K // 2 and [j for j, v in enumerate(m["shares"]) if v < 0.1] == list(range(1, gmm.K, 2))
    assert m["kl"] == pytest.approx(expected, abs=0.02)
    if name == "ring":
        assert m["kl"] == pytest.approx(math.log(2), abs=0.02)
    assert m["var_ratio"] == pytest.approx(1.0, abs=0.06)


@pytest.mark.parametrize("name", ["ring", "ring_shared"])
def test_metrics_means_scaled_by_1_05(name):
    """Every mode 5% further out: shift = 0.05 * 2 / 0.2 = 0.5 std outward; the fitted variance about the true
    mean grows by shift^2 / 2 per dimension; nothing else moves."""
    gmm, gen, _, k, y, ref = _known(name)
    x = 1.05 * gmm.means[k] + gmm.std * torch.randn(len(k), 2, generator=gen)
    m = evaluate(x, gmm, ref, y)
    assert m["shift"] == pytest.approx(0.5, abs=0.04)
    assert m["var_ratio"] == pytest.approx(1 + 0.5**2 / 2, abs=0.07)
    assert m["lost"] == 0 and m["kl"] < 0.005 and m["hq"] > 97


@pytest.mark.parametrize("name", ["ring", "grid"])
def test_metrics_4x_blur(name):
    """std x 2 (variance x 4): the variance ratio reads 4 (the old window-truncated ratio read 3.2 on the ring),
    % HQ = P(chi^2_2 <= 9 / 4) = 67.5% (100% if the threshold were dropped), modes and KL unchanged."""
    gmm, gen, _, k, _, ref = _known(name)
    x = gmm.means[k] + 2 * gmm.std * torch.randn(len(k), 2, generator=gen)
    m = evaluate(x, gmm, ref)
    assert m["var_ratio"] == pytest.approx(4.0, rel=0.06)
    assert m["hq"] == pytest.approx(100 * (1 - math.exp(-9 / 8)), abs=2.0)
    assert m["lost"] == 0 and m["kl"] < 0.01 and abs(m["shift"]) < 0.1


@pytest.mark.parametrize("name, k", [("ring", 0), ("ring", 1), ("ring", 7), ("ring_shared", 3), ("grid", 7)])
def test_a_sampler_missing_k_modes_reads_k_lost(name, k):
    """Perfect samples with k modes (a seeded choice) removed read exactly k lost, at those modes. The threshold:
    mode 0 thinned to 5% of its samples reads lost, thinned to 20% reads kept (lost is < 10% of the data's share;
    the share is relative to the thinned sample's size, frac / (1 - w_0 (1 - frac)))."""
    gmm, gen, x, kk, y, _ = _known(name, n=2000, seed=k)
    ref = x[:500]
    gone = torch.randperm(gmm.K, generator=gen)[:k]
    keep = ~torch.isin(kk, gone)
    m = evaluate(x[keep], gmm, ref, None if y is None else y[keep])
    assert m["lost"] == k and sorted(j for j, v in enumerate(m["shares"]) if v < 0.1) == sorted(gone.tolist())
    for frac, lost in ((0.05, 1), (0.2, 0)):  # keep exactly that fraction of mode 0's samples
        in0 = torch.nonzero(kk == 0).flatten()
        keep = torch.ones(len(kk), dtype=torch.bool)
        keep[in0[round(frac * len(in0)):]] = False
        m = evaluate(x[keep], gmm, ref, None if y is None else y[keep])
        share = frac * len(in0) / (keep.sum().item() * gmm.weights[0].item())  # of the thinned sample's size
        assert m["lost"] == lost and m["shares"][0] == pytest.approx(share, rel=0.2), (frac, m["shares"])  # HQ tail


def test_mode_status_against_stage1():
    """An arm's modes read against the stage-1 student: kept, recovered (lost before), lost (in both), dropped (lost
    only now); without a reference only kept / lost."""
    before, after = [0.5, 0.02, 0.09, 0.3, 0.0], [0.4, 0.15, 0.05, 0.08, 0.1]
    assert mode_status(before, after) == ["kept", "recovered", "lost", "dropped", "recovered"]
    assert mode_status(None, after) == ["kept", "kept", "lost", "lost", "kept"]


def test_metrics_class_conditional_kl():
    """ring_shared with each class's shared modes at half their weight (what guidance does): KL per class equals
    the hand-computed value; samples put on another class's mode count as off-class."""
    gmm = gmm_lib.ring_shared()
    gen = torch.Generator().manual_seed(3)
    n = 6000
    y = gmm.sample_labels(n, gen)
    w = gmm.cond_weights.clone()
    w[:, 0::2] *= 0.5  # the even (shared) modes
    w = w / w.sum(1, keepdim=True)
    k = torch.multinomial(w[y], 1, generator=gen).squeeze(1)
    x = gmm.means[k] + gmm.std * torch.randn(n, 2, generator=gen)
    m = evaluate(x, gmm, gmm.sample(2000, gen), y)
    expected = (w[0][w[0] > 0] * (w[0][w[0] > 0] / gmm.cond_weights[0][w[0] > 0]).log()).sum().item()  # same per class
    assert m["kl_cond"] == pytest.approx(expected, abs=0.01) and m["off_class"] < 0.1
    m = evaluate(x, gmm, gmm.sample(2000, gen), (y + 1) % 4)  # wrong labels: most samples are off their class
    assert m["off_class"] > 50


# ---------------------------------------------------------------------------------------------------
# The mode-loss regime (ring_shared, g = 5): the guided teacher's own target, stage-1 DMD with and without guidance,
# and (slow) recovery by stage 2.


def test_guided_teacher_target_loses_the_shared_modes_at_g5_only():
    """The exact guided teacher's 200-step flow-ODE samples (no training, so no chaos): at Wan's g = 5 the target
    itself puts ~2% of the data's share on each shared (even) mode, so exactly those 4 read lost, and it
    over-saturates (modes ~1.9 std outward); Cosmos's g = 3 keeps every mode (~20% of the share) but re-weights
    them (KL per class ~0.58); g = 1 is the data."""
    gmm = gmm_lib.ring_shared()
    ref = gmm.sample(1500, torch.Generator().manual_seed(1))
    out = {}
    for g in (1.0, 3.0, 5.0):
        x, y = mixture.draw(gmm_lib.ExactTeacher(gmm, g), gmm, 1500, 3, ts=mixture.TEACHER_TS, renoise=False)
        out[g] = evaluate(x, gmm, ref, y)
    assert out[1.0]["lost"] == 0 and out[1.0]["kl_cond"] < 0.01 and abs(out[1.0]["shift"]) < 0.1
    assert out[3.0]["lost"] == 0 and min(out[3.0]["shares"]) > 0.12 and out[3.0]["kl_cond"] > 0.45
    shared = out[5.0]["shares"][0::2]
    assert out[5.0]["lost"] == 4 and max(shared) < 0.05 and min(out[5.0]["shares"][1::2]) > 2, out[5.0]["shares"]
    assert out[5.0]["shift"] > 1.5 and out[3.0]["shift"] > 0.9, out


SHORT = mixture.ToyConfig(fit_steps=100, stage1_steps=100, n_eval=1500)


def test_guidance_makes_the_stage1_student_lose_the_shared_modes():
    """Stage-1 DMD from one stage-0 fit (seed 0, a short budget), with the g = 5 and the g = 1 teacher. Measured on
    seeds 0-2 under the native, avx2 and default CPU kernels: the shared modes hold 0.003-0.036 of the data's share
    on average with g = 5 (3-5 modes lost; the kernels differ by <= 0.001) vs 0.386-0.440 with g = 1 (none lost).
    Asserted: < 0.2 vs > 0.3, >= 2 lost vs 0."""
    gmm = mixture.dataset(SHORT)
    init = mixture.fit_teacher_mlp(gmm, SHORT, 0)
    m = {}
    for g in (1.0, 5.0):
        st = mixture.State(copy.deepcopy(init), copy.deepcopy(init))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="validity condition")
            mixture.run_dfd(st, gmm_lib.ExactTeacher(gmm, g), gmm, SHORT, mixture.ARMS["dmd"], SHORT.stage1_steps,
                            seed=1)
        x, y = mixture.draw(st.student, gmm, SHORT.n_eval, 30_000)
        m[g] = evaluate(x, gmm, x, y)
    shared = {g: sum(v["shares"][0::2]) / 4 for g, v in m.items()}
    assert shared[5.0] < 0.2 and shared[1.0] > 0.3 and m[5.0]["lost"] >= 2 and m[1.0]["lost"] == 0, (shared, m)


@pytest.mark.slow
def test_stage1_loses_modes_and_dfd_and_the_pull_bring_some_back():
    """The study's budget on the tuning seeds 0-3 (the suite's own code path). Measured there (native kernels):
    stage 1 lost 13 of the 16 shared mode-seeds; brought back: continued DMD 1, DFD p = 1 5, DMD + pull 5 (passes
    under the native and the default CPU kernels). Asserted:
    stage 1 loses >= 8, and DFD p = 1 and the pull each bring back more than continued DMD, summed over seeds."""
    rec = {a: 0 for a in ("dmd", "dfd_p1", "dmd_pull")}
    lost1 = 0
    for seed in mixture.TUNING_SEEDS:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="validity condition")
            r = mixture.run_seed(CFG, list(rec), seed, keep_samples=False)
        lost1 += r["stage1"]["metrics"]["lost"]
        for a in rec:
            rec[a] += int(mixture._value(r, a, "recovered"))
    assert lost1 >= 8 and rec["dfd_p1"] > rec["dmd"] and rec["dmd_pull"] > rec["dmd"], (lost1, rec)


FAST = mixture.ToyConfig(dataset="ring", fit_steps=200, stage1_steps=100, steps=60)


@pytest.fixture(scope="module")
def ring_stage1():
    torch.set_num_threads(1)  # module fixtures run before the autouse one
    gmm = mixture.dataset(FAST)
    init = mixture.fit_teacher_mlp(gmm, FAST, 0)
    teacher = gmm_lib.ExactTeacher(gmm)
    st = mixture.State(copy.deepcopy(init), copy.deepcopy(init))
    with warnings.catch_warnings():  # paired delta^2 (~1.8 per dim) stays below the toy's level 2 x 2.04
        warnings.filterwarnings("error", message="validity condition")
        logs = mixture.run_dfd(st, teacher, gmm, FAST, mixture.ARMS["dmd"], FAST.stage1_steps, seed=1)
    assert 1.0 < sum(l["delta2"] for l in logs[-10:]) / 10 < 4.08
    return gmm, teacher, st


def _arm(ring_stage1, name, steps):
    gmm, teacher, st = ring_stage1
    s = copy.deepcopy(st)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="validity condition")  # the score-space arm diverges
        logs = mixture.run_dfd(s, teacher, gmm, FAST, mixture.ARMS[name], steps, seed=2)
    return s, sum(l["delta2"] for l in logs[-10:]) / 10


def test_ot_pairing_shrinks_delta2(ring_stage1):
    """Mini-batch OT pairs G with a nearby x: delta^2 (Eq. 7) drops ~20x (seed 0: 0.09 vs 1.78)."""
    _, d_paired = _arm(ring_stage1, "dfd_p0.5", 30)
    _, d_ot = _arm(ring_stage1, "dfd_p0.5_ot", 30)
    assert d_ot < 0.2 * d_paired, (d_ot, d_paired)


def test_score_space_pure_dfd_blows_up_x0_space_does_not(ring_stage1):
    """Eq. 8 taken literally in score space pushes G away from x (docs/toy.md): with p = 1 the samples leave the
    data; the authors' x0-space form stays on it (seed 0, 30 steps: energy distance 1.82 vs 0.020 under both the
    native and the default CPU kernels; asserted > 5x). This is also the mutation check: if the teacher always saw
    G, the score-space term (x - G) would vanish and the two arms would coincide
    (test_mutation_teacher_always_sees_G_turns_red)."""
    _score_space_check(ring_stage1)


def _score_space_check(ring_stage1):
    gmm = ring_stage1[0]
    x_ref = gmm.sample(2500, torch.Generator().manual_seed(9))
    e = {}
    for name in ("dfd_p1", "dfd_p1_score"):
        s, _ = _arm(ring_stage1, name, 30)
        e[name] = evaluate(mixture.draw(s.student, gmm, 2500, seed=4)[0], gmm, x_ref)["energy"]
    assert e["dfd_p1_score"] > 5 * e["dfd_p1"], e


def test_mutation_teacher_always_sees_G_turns_red(ring_stage1, monkeypatch):
    """A broken DFD whose teacher always sees the student's sample (dfd.pick returns G) must fail the outcome
    test above: it does, because the two arms then coincide."""
    monkeypatch.setattr(mixture.dfd, "pick", lambda x_gen, x_real, use_real: x_gen.detach())
    with pytest.raises(AssertionError):
        _score_space_check(ring_stage1)


def test_x0_space_dfd_pulls_G_toward_its_real_sample(ring_stage1):
    """x0-space DFD adds about (I + sigma_t^2 H)(x - G) to the target (docs/toy.md), so 60 steps of dfd_p1
    lower delta^2 = E||x - G||^2 / d relative to continued DMD from the same checkpoint (seed 0: 1.28 vs 1.84)."""
    _, d_dfd = _arm(ring_stage1, "dfd_p1", FAST.steps)
    _, d_dmd = _arm(ring_stage1, "dmd", FAST.steps)
    assert d_dfd < 0.85 * d_dmd, (d_dfd, d_dmd)


# ---------------------------------------------------------------------------------------------------
# The verdict line: it must follow from the numbers of the run, whatever they are.


def _fake_run(shares: dict[str, list[float]]) -> dict:
    """One seed's run as run_seed returns it, from the mode shares of each row (the rest of the metrics zero)."""
    m = lambda sh: {"shares": sh, "lost": sum(v < 0.1 for v in sh), "hq": 0.0, "off_class": 0.0, "kl_cond": 0.0,
                    "energy": 0.0, "var_ratio": 1.0, "shift": 0.0}
    base = {"data": [1.0] * 8, "teacher": [0.02, 1.9] * 4, "init": [1.0] * 8}
    return {r: {"metrics": m(sh), "delta2": []} for r, sh in {**base, **shares}.items()}


def _shares(lost: list[int]) -> list[float]:
    return [0.03 if j in lost else 0.8 for j in range(8)]


def test_verdict_one_seed_states_its_counts():
    run = _fake_run({"stage1": _shares([0, 2]), "dmd": _shares([0, 2, 4]), "dfd_p1": _shares([])})
    v = mixture.verdict({0: run}, ["dmd", "dfd_p1"])
    assert v.startswith("verdict (seed 0): the guided target lacks 4 of 8 modes; stage 1 lost 2 of 8 modes;"), v
    assert "continued DMD 0 (dropped 1), DFD p = 1 2 (dropped 0)" in v, v
    assert v.endswith("DFD p = 1 brought back more modes than continued DMD on this seed (one seed is no evidence: "
                      "see --all)"), v
    run = _fake_run({"stage1": _shares([0, 2]), "dmd": _shares([]), "dfd_p1": _shares([2])})
    assert "brought back fewer modes than continued DMD" in mixture.verdict({0: run}, ["dmd", "dfd_p1"])
    run = _fake_run({"stage1": _shares([]), "dmd": _shares([4]), "dfd_p1": _shares([])})
    assert mixture.verdict({0: run}, ["dmd", "dfd_p1"]).endswith("stage 1 lost 0 of 8 modes; with no mode lost, no "
                                                                 "arm had one to bring back")


@pytest.mark.parametrize("dfd_rec, dmd_rec, word", [
    ([2, 1, 2, 2, 1], [0, 0, 1, 0, 0], "DFD p = 1 brings back more modes than continued DMD"),
    ([0, 0, 1, 0, 0], [2, 1, 2, 2, 1], "DFD p = 1 brings back fewer modes than continued DMD"),
    ([1, 0, 2, 0, 1], [0, 1, 1, 1, 0], "no clear difference between DFD p = 1 and continued DMD")])
def test_verdict_over_seeds_follows_the_paired_interval(dfd_rec, dmd_rec, word):
    """Stage 1 loses modes 0 and 2 on every seed; each arm brings back the first n of them. The verdict quotes the
    totals and the paired mean and interval of paired(), and says "more" only if the interval excludes 0."""
    lost = [0, 2]
    runs = {s: _fake_run({"stage1": _shares(lost), "dmd": _shares(lost[b:]), "dfd_p1": _shares(lost[a:])})
            for s, (a, b) in enumerate(zip(dfd_rec, dmd_rec))}
    d = mixture.paired(runs, ["dmd", "dfd_p1"])
    v = mixture.verdict(runs, ["dmd", "dfd_p1"], d)
    r = d["dfd_p1"]["recovered"]
    assert r["mean"] == pytest.approx((sum(dfd_rec) - sum(dmd_rec)) / 5)
    assert "stage 1 lost 10 modes in all (40 mode-seeds)" in v
    assert f"continued DMD {sum(dmd_rec)} (dropped 0), DFD p = 1 {sum(dfd_rec)} (dropped 0)" in v
    assert f"{r['mean']:+.1f} modes [{r['lo']:+.1f}, {r['hi']:+.1f}] (95% interval): {word}" in v, v


def test_cli_refuses_world_size_and_bad_flags(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="WORLD_SIZE"):
        mixture.main([])
    monkeypatch.setenv("WORLD_SIZE", "1")
    for argv, flag in [(["--arms", "nope"], "--arms"), (["--dataset", "moons"], "--dataset"),
                       (["--steps", "0"], "--steps"), (["--seeds", "0"], "--seeds"),
                       (["--student-ts", "0.5,0.9"], "--student-ts"), (["--all", "--guidance", "3"], "--guidance")]:
        with pytest.raises(SystemExit, match=flag):
            mixture.main(argv)


def test_cli_writes_table_json_figure_and_verdict(tmp_path, monkeypatch):
    """A tiny end-to-end run of the entry point (a subprocess, as a user runs it): the JSON round-trips, the printed
    table has the recovered column and no "± 0", and the last line is the verdict, the same as the JSON's and read
    from its numbers. A second run into the same --out is refused; --overwrite moves the first one aside, whole."""
    import json

    out = tmp_path / "toy"
    argv = ["--arms", "dmd,dfd_p1", "--steps", "5", "--stage1-steps", "5", "--fit-steps", "20", "--n-eval", "500",
            "--out", str(out)]
    r = subprocess.run([sys.executable, "toy/mixture.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "results.json").read_text())
    cell = rep["cells"]["ring_shared"]["run"]
    assert set(cell["summary"]) == {"data", "teacher", "init", "stage1", "dmd", "dfd_p1"}
    assert (out / "ring_shared.png").stat().st_size > 1000
    lost = cell["summary"]["dmd"]["lost"]["mean"]
    rec = cell["summary"]["dfd_p1"]["recovered"]["mean"]
    assert f"| dmd | {lost:.1f} |" in r.stdout and "| dfd_p1 | " in r.stdout and "± 0" not in r.stdout
    assert "| row | modes lost | recovered |" in r.stdout
    last = r.stdout.strip().splitlines()[-1]
    assert last == rep["verdict"] and f"DFD p = 1 {rec:.0f} (dropped" in last, last
    stage1 = cell["per_seed"]["0"]["stage1"]["status"].count("lost")
    assert f"stage 1 lost {stage1} of 8 modes" in last
    assert f"wrote results.json, results.md, ring_shared.png to {out}" in r.stdout
    # a second run into the same --out is refused (it would mix its files with the first run's) ...
    with pytest.raises(SystemExit, match=f"error: --out {out} already holds an earlier run \\(results.json, "
                       "results.md\\); pass --overwrite to move it aside and start afresh, or give another --out"):
        mixture.main(argv)
    # ... and --overwrite moves the first run aside, whole, before the new run starts (run_suite stubbed: what a
    # run writes is checked above)
    ran = []
    monkeypatch.setattr(mixture, "run_suite", lambda cells, out_dir, *a, **kw: ran.append(out_dir) or {})
    mixture.main([*argv, "--overwrite"])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("toy.old-")]
    assert len(aside) == 1 and json.loads((aside[0] / "results.json").read_text()) == rep
    assert ran == [str(out)] and not out.exists()
