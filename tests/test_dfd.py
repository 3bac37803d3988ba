"""Tests of the core module dfd.py: the loss, the coin, the schedule, one update step and the loop.

All on CPU with tiny tensors; the whole file runs in seconds. The two-rank coin test is in
tests/test_dfd_distributed.py.
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import dfd


@pytest.fixture(autouse=True)
def _one_thread():
    # the machine is shared; one thread also makes the bit-exact comparisons independent of thread count
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class MLP(torch.nn.Module):
    """A small denoiser (x_t, t, cond) -> x0_hat for tensors of any rank (flattened per sample)."""

    def __init__(self, d: int, hidden: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(d + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, d))

    def forward(self, x_t, t, cond=None):
        h = torch.cat([x_t.flatten(1), t.reshape(-1, 1).to(x_t.dtype)], dim=1)
        return self.net(h).reshape(x_t.shape)


class Recorder:
    """Wraps a denoiser and keeps a copy of every (x_t, t) it is called with."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x_t, t, cond=None):
        self.calls.append((x_t.detach().clone(), t.detach().clone()))
        return self.fn(x_t, t, cond)


# ---------------------------------------------------------------------------------------------------
# dm_loss


def reference_grad(x, x0_teacher, x0_fake, x_real=None, mask=None):
    """The documented formula, written out again: (x0_fake - x0_teacher [- (x - x_real)]) * w,
    w = 1 / (mean over the (masked) non-batch elements of |x - x0_teacher| + 1e-6), times the mask."""
    B = x.shape[0]
    m = torch.ones_like(x) if mask is None else mask.expand_as(x).to(x.dtype)
    n = ((x - x0_teacher).abs() * m).reshape(B, -1).sum(1) / m.reshape(B, -1).sum(1)
    d = x0_fake - x0_teacher if x_real is None else x0_fake - x0_teacher - (x - x_real)
    return d / (n.reshape(B, *[1] * (x.ndim - 1)) + 1e-6) * m, n


def loss_and_dx(x, x0_teacher, x0_fake, **kw):
    x = x.clone().requires_grad_(True)
    loss, stats = dfd.dm_loss(x, x0_teacher, x0_fake, **kw)
    loss.backward()
    return loss.detach(), x.grad, stats


def test_dm_loss_gradient_is_grad_over_numel():
    g = gen(0)
    x, xt, xf = (torch.randn(4, 3, 5, generator=g) for _ in range(3))
    loss, dx, stats = loss_and_dx(x, xt, xf)
    grad, n = reference_grad(x, xt, xf)
    torch.testing.assert_close(dx, grad / x.numel(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, 0.5 * (grad**2).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats["dm_normaliser"], n.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats["dm_grad_norm"], grad.flatten(1).norm(dim=1).mean(), rtol=1e-6, atol=0)
    # the sign: descending the loss moves x towards x0_teacher - x0_fake
    assert torch.all((-dx * (xt - xf)) >= 0)


def test_dm_loss_zero_when_fake_equals_teacher():
    g = gen(1)
    x, xt = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    loss, dx, stats = loss_and_dx(x, xt, xt.clone())
    assert loss.item() == 0.0
    assert torch.count_nonzero(dx) == 0
    assert stats["dm_grad_norm"].item() == 0.0


def test_dm_loss_detaches_teacher_and_fake():
    g = gen(2)
    x = torch.randn(2, 6, generator=g, requires_grad=True)
    xt = torch.randn(2, 6, generator=g, requires_grad=True)
    xf = torch.randn(2, 6, generator=g, requires_grad=True)
    loss, _ = dfd.dm_loss(x, xt, xf)
    loss.backward()
    assert xt.grad is None and xf.grad is None and x.grad is not None


def test_dm_loss_mask_normalises_over_masked_elements_only():
    g = gen(3)
    x, xt, xf = (torch.randn(3, 2, 4, 5, generator=g) for _ in range(3))
    mask = (torch.rand(3, 1, 4, 1, generator=g) > 0.4).float()  # e.g. generated frames only
    mask[:, :, 0] = 1.0  # every sample keeps at least one frame
    loss, dx, stats = loss_and_dx(x, xt, xf, mask=mask)
    grad, n = reference_grad(x, xt, xf, mask=mask)
    msum = mask.expand_as(x).sum()
    torch.testing.assert_close(dx, grad * mask / msum, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, 0.5 * (grad**2).sum() / msum, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats["dm_normaliser"], n.mean(), rtol=1e-6, atol=0)
    # elements outside the mask get no gradient, and changing them changes nothing
    assert torch.count_nonzero(dx * (1 - mask)) == 0
    x2 = torch.where(mask.bool().expand_as(x), x, x + 100.0)
    xt2 = torch.where(mask.bool().expand_as(x), xt, xt - 50.0)
    loss2, dx2, _ = loss_and_dx(x2, xt2, xf, mask=mask)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(dx2, dx, rtol=1e-6, atol=0)


def test_dm_loss_score_space_adds_minus_x_minus_real():
    g = gen(4)
    x, xt, xf, xr = (torch.randn(4, 3, 6, generator=g) for _ in range(4))
    _, dx0, _ = loss_and_dx(x, xt, xf)
    _, dxs, _ = loss_and_dx(x, xt, xf, x_real=xr)
    _, n = reference_grad(x, xt, xf)
    w = 1 / (n.reshape(-1, 1, 1) + 1e-6)
    torch.testing.assert_close((dxs - dx0) * x.numel(), -(x - xr) * w, rtol=1e-5, atol=1e-6)
    # with x_real == x (a DMD sample) the two forms are the same
    loss_a, dx_a, _ = loss_and_dx(x, xt, xf)
    loss_b, dx_b, _ = loss_and_dx(x, xt, xf, x_real=x.clone())
    assert torch.equal(loss_a, loss_b) and torch.equal(dx_a, dx_b)


def test_score_space_term_matches_eq8_in_score_units():
    """The identity in dm_loss's docstring: s_fake(x~_t) - s_real(x_t) = a/s^2 [(x0_fake - x0_teacher) - (G - x)]."""
    g = gen(5)
    G, x, eps, xf, xt = (torch.randn(3, 4, dtype=torch.float64, generator=g) for _ in range(5))
    t = torch.rand(3, dtype=torch.float64, generator=g) * 0.9 + 0.05
    x_tilde, x_t = dfd.forward_diffusion(G, eps, t), dfd.forward_diffusion(x, eps, t)
    lhs = dfd.score_from_x0(x_tilde, xf, t) - dfd.score_from_x0(x_t, xt, t)
    a, s = (1 - t).reshape(-1, 1), t.reshape(-1, 1)
    torch.testing.assert_close(lhs, a / s**2 * ((xf - xt) - (G - x)), rtol=1e-10, atol=1e-10)


def test_dm_loss_bool_mask_same_as_float_mask():
    g = gen(17)
    x, xt, xf = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    mask = torch.tensor([True, False, True]).reshape(1, 3, 1)
    la, da, sa = loss_and_dx(x, xt, xf, mask=mask)
    lb, db, sb = loss_and_dx(x, xt, xf, mask=mask.float())
    assert torch.equal(la, lb) and torch.equal(da, db) and torch.equal(sa["dm_normaliser"], sb["dm_normaliser"])


def test_fake_score_loss():
    """E || fake(alpha_t G + sigma_t eps, t) - G ||^2, G detached; with a mask the mean runs over the mask."""
    g = gen(18)
    G = torch.randn(3, 2, 5, generator=g, requires_grad=True)
    eps, t = torch.randn(3, 2, 5, generator=g), torch.rand(3, generator=g)
    fake = Recorder(lambda x_t, t, c: 0.3 * x_t)
    loss = dfd.fake_score_loss(fake, G, eps, t, None)
    x_t = dfd.forward_diffusion(G.detach(), eps, t)
    assert torch.equal(fake.calls[0][0], x_t) and torch.equal(fake.calls[0][1], t)
    torch.testing.assert_close(loss, ((0.3 * x_t - G.detach()) ** 2).mean(), rtol=1e-6, atol=0)
    assert not loss.requires_grad  # G is detached and this fake has no parameters
    mask = torch.tensor([1.0, 0.0]).reshape(1, 2, 1)
    lm = dfd.fake_score_loss(fake, G, eps, t, None, mask)
    torch.testing.assert_close(lm, ((0.3 * x_t - G.detach())[:, :1] ** 2).mean(), rtol=1e-6, atol=0)


def dmd2_reference(latents, x_t, t, eps_real, eps_fake):
    """DMD2's distribution-matching loss (tianweiy/DMD2, sd_guidance.py, compute_distribution_matching_loss),
    re-derived from its description: eps-prediction networks, their eps converted to x0 with the
    rectified-flow schedule, p_real = latents - x0_real, p_fake = latents - x0_fake,
    grad = (p_real - p_fake) / mean|p_real| per sample, loss = 0.5 mse(latents, (latents - grad).detach())."""
    a = (1 - t).reshape(-1, *[1] * (latents.ndim - 1))
    s = t.reshape(-1, *[1] * (latents.ndim - 1))
    pred_real_image = (x_t - s * eps_real) / a
    pred_fake_image = (x_t - s * eps_fake) / a
    p_real = latents - pred_real_image
    p_fake = latents - pred_fake_image
    dims = list(range(1, latents.ndim))
    # DMD2 divides by mean|p_real| alone; dm_loss adds 1e-6 to it (against division by zero, where DMD2
    # instead applies nan_to_num afterwards). Returned separately so the test can use either.
    normaliser = p_real.abs().mean(dim=dims, keepdim=True)
    return p_real - p_fake, normaliser


@pytest.mark.parametrize("shape", [(4, 2), (3, 4, 8, 8), (2, 4, 3, 6, 6)])
def test_dm_loss_parity_with_dmd2(shape):
    g = gen(6)
    latents = torch.randn(shape, generator=g)
    eps_real, eps_fake = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    t = torch.rand(shape[0], generator=g) * 0.8 + 0.1
    x_t = dfd.forward_diffusion(latents, noise, t)

    diff, normaliser = dmd2_reference(latents, x_t, t, eps_real, eps_fake)
    ref_lat = latents.clone().requires_grad_(True)
    ref_grad = diff / (normaliser + 1e-6)
    ref_loss = 0.5 * F.mse_loss(ref_lat, (ref_lat - ref_grad).detach(), reduction="mean")
    ref_loss.backward()

    loss, dx, stats = loss_and_dx(latents, dfd.x0_from_eps(x_t, eps_real, t), dfd.x0_from_eps(x_t, eps_fake, t))
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
    assert rel(loss, ref_loss.detach()) <= 1e-6
    assert rel(dx, ref_lat.grad) <= 1e-6
    # against DMD2 literally (no 1e-6 in the normaliser) the difference is bounded by 1e-6 / normaliser
    lit = 0.5 * F.mse_loss(latents, latents - diff / normaliser)
    assert rel(loss, lit) <= 2.5e-6 / normaliser.min().item() + 1e-6


def test_dm_loss_same_per_sample_on_points_images_videos():
    g = gen(7)
    B, k = 3, 24
    x, xt, xf = (torch.randn(B, 2 * k, generator=g) for _ in range(3))
    out = {}
    for name, shape in {"points": (B, 2 * k), "image": (B, 3, 4, 4), "video": (B, 2, 3, 2, 4)}.items():
        xs, xts, xfs = (v.reshape(shape) for v in (x, xt, xf))
        loss, dx, stats = loss_and_dx(xs, xts, xfs)
        # per sample: the loss of each sample alone, the normaliser and the grad norm
        per = [dfd.dm_loss(xs[b:b + 1], xts[b:b + 1], xfs[b:b + 1]) for b in range(B)]
        out[name] = (loss, dx.reshape(B, -1), stats["dm_normaliser"], stats["dm_grad_norm"],
                     torch.stack([l for l, _ in per]), torch.stack([s["dm_normaliser"] for _, s in per]))
    for name in ("image", "video"):
        for a, b in zip(out["points"], out[name]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# schedule and guidance


def test_schedule_identities():
    g = gen(8)
    x0, eps = torch.randn(5, 3, 4, dtype=torch.float64, generator=g), torch.randn(5, 3, 4, dtype=torch.float64, generator=g)
    t = torch.rand(5, dtype=torch.float64, generator=g) * 0.9 + 0.05
    x_t = dfd.forward_diffusion(x0, eps, t)
    te = t.reshape(-1, 1, 1)
    torch.testing.assert_close(x_t, (1 - te) * x0 + te * eps, rtol=0, atol=0)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dfd.x0_from_eps(x_t, eps, t), x0, **tol)
    torch.testing.assert_close(dfd.eps_from_x0(x_t, x0, t), eps, **tol)
    v = eps - x0
    torch.testing.assert_close(dfd.v_from_x0(x_t, x0, t), v, **tol)
    torch.testing.assert_close(dfd.x0_from_v(x_t, v, t), x0, **tol)
    # round trips through a wrong x0 guess too (the conversions are exact inverses, not just at the truth)
    y = torch.randn(x0.shape, dtype=torch.float64, generator=g)
    torch.testing.assert_close(dfd.x0_from_v(x_t, dfd.v_from_x0(x_t, y, t), t), y, **tol)
    torch.testing.assert_close(dfd.x0_from_eps(x_t, dfd.eps_from_x0(x_t, y, t), t), y, **tol)
    # Tweedie for a Gaussian: the score of N(alpha x0, sigma^2) at x_t is -(x_t - alpha x0) / sigma^2 = -eps / sigma
    torch.testing.assert_close(dfd.score_from_x0(x_t, x0, t), -eps / te, **tol)
    # the ends of the schedule
    zero, one = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    assert torch.equal(dfd.forward_diffusion(x0, eps, zero), x0)
    assert torch.equal(dfd.forward_diffusion(x0, eps, one), eps)


@pytest.mark.parametrize("s", [0.5, 1.0, 3.0, 5.0])
def test_shift_t_monotone_onto_unit_interval(s):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    ts = dfd.shift_t(t, s)
    assert ts[0].item() == 0.0 and ts[-1].item() == 1.0
    assert torch.all(ts[1:] > ts[:-1])
    if s > 1:  # moves steps towards noise
        assert torch.all(ts[1:-1] > t[1:-1])
    assert dfd.shift_t(0.5, 5.0) == pytest.approx(5 / 6)


def test_cfg():
    g = gen(9)
    c, u = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    # u + 1 (c - u) is c up to one rounding of the subtraction and the addition
    torch.testing.assert_close(dfd.cfg(c, u, 1.0), c, rtol=0, atol=1e-6)
    assert torch.equal(dfd.cfg(c, u, 0.0), u)
    assert not torch.allclose(dfd.cfg(c, u, 5.0), c)
    for s in (0.5, 2.0, 4.0):
        torch.testing.assert_close(c + s * (c - u), dfd.cfg(c, u, s + 1), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# the coin and pick


def test_dfd_coin_deterministic_shapes_and_ends():
    for step in range(50):
        assert torch.equal(dfd.dfd_coin(step, 0.5, seed=3), dfd.dfd_coin(step, 0.5, seed=3))
        assert torch.equal(dfd.dfd_coin(step, 0.5, 3, batch=7, rank=1), dfd.dfd_coin(step, 0.5, 3, batch=7, rank=1))
        assert dfd.dfd_coin(step, 0.5).shape == ()
        assert dfd.dfd_coin(step, 0.5, batch=7).shape == (7,)
        assert dfd.dfd_coin(step, 0.5, batch=7).dtype == torch.bool
        assert not dfd.dfd_coin(step, 0.0) and dfd.dfd_coin(step, 1.0)
        assert not dfd.dfd_coin(step, 0.0, batch=7).any() and dfd.dfd_coin(step, 1.0, batch=7).all()
    per_step = torch.stack([dfd.dfd_coin(s, 0.5, seed=3) for s in range(200)])
    assert not torch.equal(per_step, torch.stack([dfd.dfd_coin(s, 0.5, seed=4) for s in range(200)]))
    # per-sample coins differ between ranks (ranks do not mirror each other); per-step ones do not depend on rank
    r0 = torch.stack([dfd.dfd_coin(s, 0.5, batch=8, rank=0) for s in range(20)])
    r1 = torch.stack([dfd.dfd_coin(s, 0.5, batch=8, rank=1) for s in range(20)])
    assert not torch.equal(r0, r1)
    assert all(torch.equal(dfd.dfd_coin(s, 0.5, rank=0), dfd.dfd_coin(s, 0.5, rank=1)) for s in range(50))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dfd_coin_frequency(p):
    # N draws: the frequency has std sqrt(p(1-p)/N) <= 0.0079 for N = 4000; 5 std (two-sided false-alarm
    # probability 6e-7 for a fair generator) is the tolerance. Same for the per-sample coin (N = 200 x 20).
    N = 4000
    f = torch.stack([dfd.dfd_coin(s, p, seed=11) for s in range(N)]).float().mean().item()
    assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / N)
    fs = torch.stack([dfd.dfd_coin(s, p, seed=11, batch=20) for s in range(200)]).float().mean().item()
    assert abs(fs - p) <= 5 * math.sqrt(p * (1 - p) / N)
    # and no serial correlation to speak of between consecutive steps (lag-1 autocorrelation)
    c = torch.stack([dfd.dfd_coin(s, p, seed=11) for s in range(N)]).float()
    c = c - c.mean()
    assert abs((c[1:] * c[:-1]).mean() / (c * c).mean()) <= 5 / math.sqrt(N)


def test_pick():
    G = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(4, 3)
    assert torch.equal(dfd.pick(G, x, torch.tensor(True)), x)
    out = dfd.pick(G, x, torch.tensor(False))
    assert torch.equal(out, G.detach()) and not out.requires_grad
    coin = torch.tensor([True, False, False, True])
    out = dfd.pick(G, x, coin)
    assert torch.equal(out[coin], x[coin]) and torch.equal(out[~coin], G.detach()[~coin]) and not out.requires_grad


# ---------------------------------------------------------------------------------------------------
# sampler and student input


def test_sample_shapes_and_times():
    student = Recorder(lambda x_t, t, c: 0.5 * x_t)
    noise = torch.randn(3, 2, 4, 5, 5, generator=gen(10))
    out = dfd.sample(student, noise, None, generator=gen(11))
    assert out.shape == noise.shape
    assert [c[1].tolist() for c in student.calls] == [[t] * 3 for t in torch.tensor(dfd.STUDENT_TS).tolist()]
    # first call sees the noise itself; each later one sees 0.5 x re-noised to the next t with fresh noise
    assert torch.equal(student.calls[0][0], noise)
    g = gen(11)
    x = noise
    for i, t in enumerate(dfd.STUDENT_TS[1:]):
        x = (1 - t) * (0.5 * x) + t * torch.randn(x.shape, generator=g)
        torch.testing.assert_close(student.calls[i + 1][0], x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, 0.5 * x, rtol=1e-6, atol=1e-6)


def test_sample_deterministic_ode_step():
    """renoise=False re-noises with the noise the prediction implies: x' = (1 - t') x0_hat + t' eps_hat."""
    student = Recorder(lambda x_t, t, c: 0.5 * x_t)
    noise = torch.randn(4, 3, generator=gen(16))
    out = dfd.sample(student, noise, None, renoise=False)
    x = noise
    for i, (t, t_next) in enumerate(zip(dfd.STUDENT_TS[:-1], dfd.STUDENT_TS[1:])):
        x0 = 0.5 * x
        x = (1 - t_next) * x0 + t_next * (x - (1 - t) * x0) / t
        torch.testing.assert_close(student.calls[i + 1][0], x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, 0.5 * x, rtol=1e-6, atol=1e-6)
    # and it is deterministic: no generator is consumed
    assert torch.equal(out, dfd.sample(lambda x_t, t, c: 0.5 * x_t, noise, None, renoise=False))


def test_student_input_noised_data():
    x_real = torch.randn(6, 2, 3, generator=gen(12))
    x_in, t_in = dfd.student_input(x_real, dfd.STUDENT_TS, gen(13))
    assert x_in.shape == x_real.shape and t_in.shape == (6,)
    g = gen(13)
    idx = torch.randint(len(dfd.STUDENT_TS), (6,), generator=g)
    noise = torch.randn(x_real.shape, generator=g)
    assert torch.equal(t_in, torch.tensor(dfd.STUDENT_TS)[idx])
    torch.testing.assert_close(x_in, dfd.forward_diffusion(x_real, noise, t_in), rtol=0, atol=0)


def test_student_input_backward_simulation_stops_at_each_t_in():
    ts = dfd.STUDENT_TS
    B = 16
    net = lambda x_t, t, c: 0.7 * x_t + 0.1 * t.reshape(-1, 1, 1)  # depends on t so a wrong t shows up
    student = Recorder(net)
    x_real = torch.randn(B, 2, 3, generator=gen(14))
    x_in, t_in = dfd.student_input(x_real, ts, gen(15), student=student)
    assert x_in.shape == x_real.shape and t_in.shape == (B,)
    # re-draw what student_input drew and simulate each sample alone
    g = gen(15)
    idx = torch.randint(len(ts), (B,), generator=g)
    assert torch.equal(t_in, torch.tensor(ts)[idx])
    assert set(idx.tolist()) == set(range(len(ts)))  # every stopping point is exercised
    noise = torch.randn(x_real.shape, generator=g)
    fresh = [torch.randn(x_real.shape, generator=g) for _ in range(int(idx.max()))]
    # the student is only ever called at the few-step times before the last t_in, in order
    assert [c[1][0].item() for c in student.calls] == pytest.approx(list(ts[:int(idx.max())]))
    for b in range(B):
        x = noise[b:b + 1]
        for k in range(int(idx[b])):  # sample b gets exactly idx[b] student steps
            x = dfd.forward_diffusion(net(x, torch.tensor([ts[k]]), None), fresh[k][b:b + 1], torch.tensor([ts[k + 1]]))
        torch.testing.assert_close(x_in[b:b + 1], x, rtol=1e-6, atol=1e-6)
    assert torch.equal(x_in[idx == 0], noise[idx == 0])  # samples at the first time are pure noise


# ---------------------------------------------------------------------------------------------------
# one student step


def _setup(d=4, B=8, seed=0):
    student = MLP(d, seed=seed)
    fake = MLP(d, seed=seed + 1)
    teacher_net = MLP(d, seed=seed + 2)
    teacher = lambda x_t, t, c: teacher_net(x_t, t, c)
    x_real = torch.randn(B, d, generator=gen(seed + 3))
    return student, fake, teacher, x_real


def test_p0_reproduces_dmd_bit_for_bit():
    c = dfd.DFDConfig(p=0.0, seed=5)
    student, fake, teacher, x_real = _setup()
    ref = copy.deepcopy(student)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    step = 7
    for s in (step, step + 1):
        dfd.student_step(student, teacher, fake, opt, [(x_real, None)], c, s)

        # the DMD step by hand: same draws from the same (seed, step, -1, micro-batch, rank) generator
        g = torch.Generator().manual_seed(dfd._seed(c.seed, s, -1, 0, 0))
        x_in, t_in = dfd.student_input(x_real, c.student_ts, g)
        G = ref(x_in, t_in, None)
        eps = torch.randn(x_real.shape, generator=g)
        t = dfd.sample_t(x_real.shape[0], c, g, "cpu")
        with torch.no_grad():
            x_tilde = dfd.forward_diffusion(G.detach(), eps, t)  # the teacher sees the student's sample
            x0_fake, x0_teacher = fake(x_tilde, t, None), teacher(x_tilde, t, None)
        loss, _ = dfd.dm_loss(G, x0_teacher, x0_fake)
        loss.backward()
        if s == step:
            grads = [q.grad.clone() for q in ref.parameters()]
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), c.grad_clip)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        for a, b in zip(student.parameters(), ref.parameters()):
            assert torch.equal(a, b)
    assert any(gr.abs().sum() > 0 for gr in grads)  # the step did something


def test_grad_accum_averages_micro_batches():
    """grad_accum = 2: the update uses the mean of the two micro-batches' gradients, each micro-batch with
    its own draws from the (seed, step, -1, a, rank) generator; the logs are micro-batch means too."""
    c = dfd.DFDConfig(p=0.0, seed=3, grad_accum=2, grad_clip=0.0)
    student, fake, teacher, x_real = _setup(seed=12)
    x_real2 = torch.randn(x_real.shape, generator=gen(99))
    ref = copy.deepcopy(student)
    step = 4
    logs = dfd.student_step(student, teacher, fake, torch.optim.SGD(student.parameters(), lr=1.0),
                            [(x_real, None), (x_real2, None)], c, step)
    losses = []
    for a, xr in enumerate((x_real, x_real2)):
        g = torch.Generator().manual_seed(dfd._seed(c.seed, step, -1, a, 0))
        x_in, t_in = dfd.student_input(xr, c.student_ts, g)
        G = ref(x_in, t_in, None)
        eps = torch.randn(xr.shape, generator=g)
        t = dfd.sample_t(xr.shape[0], c, g, "cpu")
        with torch.no_grad():
            x_tilde = dfd.forward_diffusion(G.detach(), eps, t)
            x0_teacher, x0_fake = teacher(x_tilde, t, None), fake(x_tilde, t, None)
        loss, _ = dfd.dm_loss(G, x0_teacher, x0_fake)
        loss.backward()
        losses.append(loss.item())
    for new, old in zip(student.parameters(), ref.parameters()):
        torch.testing.assert_close(new, old.detach() - old.grad / 2, rtol=1e-6, atol=1e-7)
    assert logs["loss_student"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert losses[0] != pytest.approx(losses[1])  # the two micro-batches really differ


def test_micro_batches_of_different_sizes():
    """A short last micro-batch (the end of a data set) works and draws t for its own size."""
    student, fake, teacher_net, x_real = _setup(seed=13)
    teacher = Recorder(teacher_net)
    logs = dfd.student_step(student, teacher, fake, torch.optim.SGD(student.parameters(), lr=0.1),
                            [(x_real, None), (x_real[:3], None)], dfd.DFDConfig(p=1.0, grad_accum=2), 0)
    assert [c[1].shape for c in teacher.calls] == [(8,), (3,)]
    assert math.isfinite(logs["loss_student"])


def test_per_sample_coin_with_micro_batches_of_different_sizes():
    """The per-sample coin covers every sample of the step once: micro-batches get consecutive slices."""
    student, fake, teacher_net, x_real = _setup(seed=14)
    c = dfd.DFDConfig(p=0.5, grad_accum=2, per_sample_coin=True, seed=5)
    teacher = Recorder(teacher_net)
    logs = dfd.student_step(student, teacher, fake, torch.optim.SGD(student.parameters(), lr=0.0),
                            [(x_real, None), (x_real[:3], None)], c, 7)
    coins = dfd.dfd_coin(7, 0.5, seed=5, batch=11)
    assert [call[1].shape for call in teacher.calls] == [(8,), (3,)]
    assert logs["dfd"] == pytest.approx(coins.float().mean().item())


def test_p0_p1_teacher_inputs_and_shared_eps_t():
    """p = 1: the teacher sees the real sample noised with the SAME eps and t as the fake's input
    (x_t - x~_t = alpha_t (x - G)); p = 0: the teacher sees exactly the fake's input."""
    student, fake_net, teacher_net, x_real = _setup(seed=3)
    for p in (0.0, 1.0):
        for step in range(4):
            teacher, fake = Recorder(teacher_net), Recorder(fake_net)
            s = copy.deepcopy(student)
            opt = torch.optim.SGD(s.parameters(), lr=0.0)
            c = dfd.DFDConfig(p=p, seed=step)
            dfd.student_step(s, teacher, fake, opt, [(x_real, None)], c, step)
            assert len(teacher.calls) == 1 and len(fake.calls) == 1
            (xt_T, t_T), (xt_F, t_F) = teacher.calls[0], fake.calls[0]
            assert torch.equal(t_T, t_F)
            if p == 0.0:
                assert torch.equal(xt_T, xt_F)
            else:
                # G of this step: the same draws as the step (lr = 0, so s is unchanged)
                g = torch.Generator().manual_seed(dfd._seed(c.seed, step, -1, 0, 0))
                x_in, t_in = dfd.student_input(x_real, c.student_ts, g)
                with torch.no_grad():
                    G = s(x_in, t_in, None)
                eps = torch.randn(x_real.shape, generator=g)
                alpha = (1 - t_T).reshape(-1, 1)
                torch.testing.assert_close(xt_T - xt_F, alpha * (x_real - G), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(xt_T, dfd.forward_diffusion(x_real, eps, t_T), rtol=0, atol=0)
                torch.testing.assert_close(xt_F, dfd.forward_diffusion(G, eps, t_T), rtol=0, atol=0)


def test_pair_hook_chooses_the_teachers_real_sample():
    """pair(G, x_real, cond) re-assigns the real sample the teacher and the delta^2 monitor see; the student's
    input is still made from the batch's x_real (same G); pair=None is the batch's own x_real."""
    student, fake_net, teacher_net, x_real = _setup(seed=15)
    perm = torch.arange(x_real.shape[0]).flip(0)
    c, step, out = dfd.DFDConfig(p=1.0, seed=4), 3, {}
    for name, pair in [("none", None), ("swap", lambda G, x, cond: x[perm])]:
        teacher, fake, s, seen = Recorder(teacher_net), Recorder(fake_net), copy.deepcopy(student), []
        hook = pair and (lambda G, x, cond, f=pair: (seen.append((G, x, cond)), f(G, x, cond))[1])
        out[name] = logs = dfd.student_step(s, teacher, fake, torch.optim.SGD(s.parameters(), lr=0.0),
                                            [(x_real, "c")], c, step, pair=hook)
        g = torch.Generator().manual_seed(dfd._seed(c.seed, step, -1, 0, 0))
        x_in, t_in = dfd.student_input(x_real, c.student_ts, g)  # from the batch's x_real in both cases
        with torch.no_grad():
            G = s(x_in, t_in, None)
        eps = torch.randn(x_real.shape, generator=g)
        x = x_real if pair is None else x_real[perm]
        (xt_T, t_T), (xt_F, _) = teacher.calls[0], fake.calls[0]
        torch.testing.assert_close(xt_T, dfd.forward_diffusion(x, eps, t_T), rtol=0, atol=0)
        torch.testing.assert_close(xt_F, dfd.forward_diffusion(G, eps, t_T), rtol=0, atol=0)
        assert logs["delta2"] == pytest.approx(((x - G) ** 2).mean().item(), rel=1e-6)
        if pair is not None:  # called once, with G detached, the batch's x_real and its cond
            (G_seen, x_seen, cond_seen), = seen
            assert not G_seen.requires_grad and torch.equal(G_seen, G) and x_seen is x_real and cond_seen == "c"
    assert out["none"]["delta2"] != pytest.approx(out["swap"]["delta2"])


def test_per_sample_coin_mixes_within_the_batch():
    student, fake_net, teacher_net, x_real = _setup(seed=4)
    c = dfd.DFDConfig(p=0.5, per_sample_coin=True, seed=1)
    step = 2
    coin = dfd.dfd_coin(step, 0.5, 1, batch=x_real.shape[0])
    assert 0 < coin.sum() < len(coin)
    teacher, fake = Recorder(teacher_net), Recorder(fake_net)
    logs = dfd.student_step(student, teacher, fake, torch.optim.SGD(student.parameters(), lr=0.0),
                            [(x_real, None)], c, step)
    assert logs["dfd"] == pytest.approx(coin.float().mean().item())
    (xt_T, t), (xt_F, _) = teacher.calls[0], fake.calls[0]
    assert torch.equal(xt_T[~coin], xt_F[~coin])
    assert not torch.equal(xt_T[coin], xt_F[coin])


def test_score_space_step_differs_only_on_dfd_steps():
    student, fake, teacher, x_real = _setup(seed=6)
    out = {}
    for p in (0.0, 1.0):
        for space in ("x0", "score"):
            s = copy.deepcopy(student)
            opt = torch.optim.SGD(s.parameters(), lr=0.1)
            dfd.student_step(s, teacher, fake, opt, [(x_real, None)], dfd.DFDConfig(p=p, space=space), 0)
            out[p, space] = torch.cat([q.flatten() for q in s.parameters()])
    assert torch.equal(out[0.0, "x0"], out[0.0, "score"])
    assert not torch.allclose(out[1.0, "x0"], out[1.0, "score"])


# ---------------------------------------------------------------------------------------------------
# non-finite values and bad settings


def test_nan_teacher_raises_naming_student_loss():
    student, fake, _, x_real = _setup()
    nan_teacher = lambda x_t, t, c: torch.full_like(x_t, float("nan"))
    before = [q.clone() for q in student.parameters()]
    with pytest.raises(FloatingPointError, match="student loss"):
        dfd.student_step(student, nan_teacher, fake, torch.optim.SGD(student.parameters(), lr=0.1),
                         [(x_real, None)], dfd.DFDConfig(), 0)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def test_nan_gradient_caught_before_optimizer_step():
    student, fake, teacher, x_real = _setup()
    inner = student.forward
    student.forward = lambda x_t, t, c=None: _NaNGrad.apply(inner(x_t, t, c))
    before = [q.clone() for q in student.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="student gradient norm"):
        dfd.student_step(student, teacher, fake, opt, [(x_real, None)], dfd.DFDConfig(grad_clip=0.0), 0)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    # the same for the fake score
    fake.forward = (lambda f: lambda x_t, t, c=None: _NaNGrad.apply(f(x_t, t, c)))(fake.forward)
    fb = [q.clone() for q in fake.parameters()]
    with pytest.raises(FloatingPointError, match="fake-score gradient norm"):
        dfd.fake_score_step(MLP(4), fake, torch.optim.SGD(fake.parameters(), lr=0.1), [(x_real, None)],
                            dfd.DFDConfig(), 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(fb, fake.parameters()))


def test_fake_score_clip_is_its_own_setting():
    """grad_clip_fake caps the fake score's update (SGD, lr 1: the step is the clipped gradient); None follows
    grad_clip; 0 leaves it unclipped whatever grad_clip is (FastGen clips the student only)."""
    student, fake, _, x_real = _setup()

    def step_norm(**kw):
        f = copy.deepcopy(fake)
        before = torch.cat([q.detach().flatten() for q in f.parameters()])
        logs = dfd.fake_score_step(student, f, torch.optim.SGD(f.parameters(), lr=1.0), [(x_real, None)],
                                   dfd.DFDConfig(seed=2, **kw), 0, 0)
        return (torch.cat([q.detach().flatten() for q in f.parameters()]) - before).norm().item(), logs["grad_norm_fake"]

    free, g = step_norm(grad_clip=0.0)
    assert g > 0.05 and free == pytest.approx(g, rel=1e-4)  # unclipped: the step is the whole gradient
    assert step_norm(grad_clip=0.0, grad_clip_fake=0.01)[0] == pytest.approx(0.01, rel=1e-4)
    assert step_norm(grad_clip=0.02)[0] == pytest.approx(0.02, rel=1e-4)  # None: the student's setting
    assert step_norm(grad_clip=0.02, grad_clip_fake=0.0)[0] == pytest.approx(free, rel=1e-6)


def test_sample_t_is_fastgens_shifted_draw():
    """U[t_min, t_max], shift s, then clamped to [t_min, t_max]: at s = 5 the top 0.4 % of the range lands on t_max."""
    c = dfd.DFDConfig(t_min=0.001, t_max=0.999, t_shift=5.0)
    t = dfd.sample_t(200_000, c, gen(0), "cpu")
    assert t.min() >= 0.001 and t.max() == pytest.approx(0.999)
    u_top = 0.999 / (5 - 4 * 0.999)  # shift(u) = 0.999
    assert (t >= 0.999 - 1e-7).float().mean().item() == pytest.approx((0.999 - u_top) / 0.998, abs=1e-3)
    assert t.min().item() == pytest.approx(dfd.shift_t(0.001, 5.0), abs=1e-4)


@pytest.mark.parametrize("kw", [dict(p=-0.1), dict(p=1.5), dict(space="eps"), dict(fake_updates=-1),
                                dict(grad_accum=0), dict(t_min=0.5, t_max=0.4), dict(t_max=1.2)])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        dfd.DFDConfig(**kw)


# ---------------------------------------------------------------------------------------------------
# the validity monitor


def test_monitor_delta2_and_teacher_gap():
    student, fake, teacher_net, x_real = _setup(seed=8)
    teacher = Recorder(teacher_net)
    c = dfd.DFDConfig(p=0.5, monitor_every=3, seed=2)
    for step in range(7):
        teacher.calls.clear()
        s = copy.deepcopy(student)
        logs = dfd.student_step(s, teacher, fake, torch.optim.SGD(s.parameters(), lr=0.0), [(x_real, None)], c, step)
        g = torch.Generator().manual_seed(dfd._seed(c.seed, step, -1, 0, 0))
        x_in, t_in = dfd.student_input(x_real, c.student_ts, g)
        with torch.no_grad():
            G = s(x_in, t_in, None)
        assert logs["delta2"] == pytest.approx(((x_real - G) ** 2).sum(1).mean().item() / x_real.shape[1], rel=1e-6)
        if step % 3 == 0:
            assert len(teacher.calls) == 2 and "teacher_gap" in logs
            with torch.no_grad():  # one call saw x_t, the other x~_t, same t
                a = teacher_net(*teacher.calls[0], None)
                b = teacher_net(*teacher.calls[1], None)
            assert torch.equal(teacher.calls[0][1], teacher.calls[1][1])
            assert logs["teacher_gap"] == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-5)
            assert logs["teacher_gap"] > 0
        else:
            assert len(teacher.calls) == 1 and "teacher_gap" not in logs


def test_monitor_off_by_default_and_mask_delta2():
    student, fake, teacher, x_real = _setup(seed=9)
    x_real = x_real.reshape(8, 2, 2)
    mask = torch.tensor([1.0, 0.0]).reshape(1, 2, 1)
    # a student that is exactly the real data on the masked part and far off elsewhere
    G_of = lambda x_t, t, c: torch.cat([x_real[:, :1], x_real[:, 1:] + 10.0], 1) + 0 * student(x_t, t, c)
    logs = dfd.student_step(student, teacher, fake, torch.optim.SGD(student.parameters(), lr=0.0),
                            [(x_real, None, mask)], dfd.DFDConfig(), 0)
    assert "teacher_gap" not in logs
    s = torch.nn.Module()
    s.forward = G_of
    s.p = torch.nn.Parameter(torch.zeros(1))
    logs = dfd.student_step(s, teacher, fake, torch.optim.SGD(s.parameters(), lr=0.0),
                            [(x_real, None, mask)], dfd.DFDConfig(), 0)
    assert logs["delta2"] == 0.0  # the unmasked part does not count


def _data(d=2, B=16, seed=0):
    """An endless, deterministic stream of 2D batches: batch i depends on (seed, i) only."""
    i = 0
    while True:
        g = gen(1000 * seed + i)
        centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
        x = centres[torch.randint(2, (B,), generator=g)] + 0.3 * torch.randn(B, d, generator=g)
        yield x, None
        i += 1


def test_warns_once_when_delta2_exceeds_threshold():
    student, fake, teacher, _ = _setup(d=2)
    c = dfd.DFDConfig(fake_updates=1, delta2_warn=0.5)
    logs = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dfd.train(student, teacher, fake, torch.optim.SGD(student.parameters(), lr=0.0),
                  torch.optim.SGD(fake.parameters(), lr=0.0), _data(), 5, c, log=lambda s, l: logs.append(l))
    hits = [x for x in w if "validity condition" in str(x.message)]
    assert all(l["delta2"] > 0.5 for l in logs)  # an untrained student is far from the data at every step
    assert len(hits) == 1
    with warnings.catch_warnings(record=True) as w:  # below the threshold: silent
        warnings.simplefilter("always")
        dfd.train(student, teacher, fake, torch.optim.SGD(student.parameters(), lr=0.0),
                  torch.optim.SGD(fake.parameters(), lr=0.0), _data(), 5, dfd.DFDConfig(fake_updates=1, delta2_warn=1e9))
    assert not [x for x in w if "validity condition" in str(x.message)]


# ---------------------------------------------------------------------------------------------------
# EMA and the loop


def test_ema_update():
    model, ema = MLP(3, seed=1), MLP(3, seed=2)
    before = [q.clone() for q in ema.parameters()]
    dfd.ema_update(ema, model, 0.9)
    for e, b, m in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * m, rtol=1e-6, atol=1e-7)
    dfd.ema_update(ema, model, 0.0)  # decay 0 copies the model
    assert all(torch.allclose(e, m) for e, m in zip(ema.parameters(), model.parameters()))


def _run(steps, start_step=0, state=None, data_pos=0, c=None):
    c = c or dfd.DFDConfig(p=0.5, fake_updates=2, grad_accum=2, ema=0.9, monitor_every=4, seed=1)
    student, fake, teacher, _ = _setup(d=2, seed=11)
    ema = copy.deepcopy(student)
    so = torch.optim.Adam(student.parameters(), lr=1e-3)
    fo = torch.optim.Adam(fake.parameters(), lr=1e-3)
    if state is not None:
        for obj, sd in zip((student, fake, ema, so, fo), state):
            obj.load_state_dict(copy.deepcopy(sd))
    data = _data()
    for _ in range(data_pos):
        next(data)
    logs = []
    dfd.train(student, teacher, fake, so, fo, data, steps, c, start_step=start_step, ema=ema,
              log=lambda s, l: logs.append((s, l)))
    return (student, fake, ema, so, fo), logs


def _params(m):
    return torch.cat([q.detach().flatten() for q in m.parameters()])


@pytest.mark.filterwarnings("ignore:validity condition")
def test_train_deterministic_and_resumable():
    steps, k = 24, 10
    (s1, f1, e1, *_), logs1 = _run(steps)
    (s2, f2, e2, *_), logs2 = _run(steps)
    for a, b in ((s1, s2), (f1, f2), (e1, e2)):
        assert torch.equal(_params(a), _params(b))
    assert logs1 == logs2
    assert [s for s, _ in logs1] == list(range(steps))
    assert {l["dfd"] for _, l in logs1} == {0.0, 1.0}  # both branches ran
    assert set(logs1[0][1]) == {"loss_fake", "grad_norm_fake", "dfd", "loss_student", "t_mean", "dm_grad_norm",
                                "dm_normaliser", "delta2", "teacher_gap", "grad_norm_student"}
    assert "teacher_gap" not in logs1[1][1]
    # the student moved
    assert not torch.equal(_params(s1), _params(_setup(d=2, seed=11)[0]))
    # resume: run k steps, keep the state, continue in fresh objects with the data at the matching position
    objs, _ = _run(k)
    state = [o.state_dict() for o in objs]
    per_step = 3 * 2  # (fake_updates + 1) * grad_accum batches per student step
    (s3, f3, e3, *_), logs3 = _run(steps, start_step=k, state=state, data_pos=k * per_step)
    for a, b in ((s1, s3), (f1, f3), (e1, e3)):
        assert torch.equal(_params(a), _params(b))
    assert logs3 == logs1[k:]
    # a different seed gives different weights
    (s4, *_), _ = _run(steps, c=dfd.DFDConfig(p=0.5, fake_updates=2, grad_accum=2, ema=0.9, monitor_every=4, seed=2))
    assert not torch.equal(_params(s1), _params(s4))


@pytest.mark.filterwarnings("ignore:validity condition")
def test_fake_updates_counting():
    """fake_updates = k means k fake-score updates, then one student update, per student step."""
    student, fake, teacher, _ = _setup(d=2)
    calls = {"fake": 0, "student": 0}
    so, fo = torch.optim.SGD(student.parameters(), lr=0.0), torch.optim.SGD(fake.parameters(), lr=0.0)
    for opt, name in ((so, "student"), (fo, "fake")):
        opt.step = (lambda f, n: lambda *a, **kw: (calls.__setitem__(n, calls[n] + 1), f(*a, **kw))[1])(opt.step, name)
    dfd.train(student, teacher, fake, so, fo, _data(), 3, dfd.DFDConfig(fake_updates=4))
    assert calls == {"fake": 12, "student": 3}


# ---------------------------------------------------------------------------------------------------
# the t-dependent p (DFDConfig.p_t_min)


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_p_t_min_dfd_only_at_high_noise(p):
    """p_t_min > 0: per-sample coins (dfd_coin with batch=B), and a sample whose t is below p_t_min never sees the
    real sample; at or above it, exactly the coin decides. logs["dfd"] is the fraction that saw it."""
    student, fake_net, teacher_net, x_real = _setup(seed=21)
    B, step = x_real.shape[0], 5
    c = dfd.DFDConfig(p=p, p_t_min=0.5, seed=3)
    teacher, fake = Recorder(teacher_net), Recorder(fake_net)
    logs = dfd.student_step(student, teacher, fake, torch.optim.SGD(student.parameters(), lr=0.0),
                            [(x_real, None)], c, step)
    (xt_T, t), (xt_F, _) = teacher.calls[0], fake.calls[0]
    coin = dfd.dfd_coin(step, p, 3, batch=B)
    real = coin & (t >= 0.5)
    assert (t < 0.5).any() and real.any()  # both cases occur in this draw
    assert torch.equal(xt_T[~real], xt_F[~real])  # DMD: the teacher sees x~_t
    assert (xt_T[real] != xt_F[real]).all()  # DFD: x_t from the real sample
    assert logs["dfd"] == pytest.approx(real.float().mean().item())


def test_p_t_min_zero_is_the_default_path():
    """p_t_min = 0 (the default) is the paper's coin: one per student step, so a step's teacher sees either every real
    sample or every G (never a mix, which p_t_min > 0 with its per-sample coins gives); with p = 1 it sees the real
    sample for every G."""
    student, fake_net, teacher_net, x_real = _setup(seed=22)

    def saw_real(c: dfd.DFDConfig, step: int) -> torch.Tensor:
        teacher, fake = Recorder(teacher_net), Recorder(fake_net)
        logs = dfd.student_step(copy.deepcopy(student), teacher, fake, torch.optim.SGD(student.parameters(), lr=0.0),
                                [(x_real, None)], c, step)
        real = (teacher.calls[0][0] != fake.calls[0][0]).any(dim=1)  # per sample: the teacher's x_t is not x~_t
        assert logs["dfd"] == real.float().mean().item()
        return real

    default = [saw_real(dfd.DFDConfig(p=0.5, seed=1), step) for step in range(8)]
    assert all(r.all() or not r.any() for r in default) and any(r.all() for r in default) and any(not r.any() for r in default)
    per_sample = [saw_real(dfd.DFDConfig(p=0.5, seed=1, p_t_min=1e-6), step) for step in range(8)]
    assert any(r.any() and not r.all() for r in per_sample)  # the comparison above can tell the two apart
    assert all(saw_real(dfd.DFDConfig(p=1.0, seed=1), step).all() for step in range(3))
    with pytest.raises(ValueError):
        dfd.DFDConfig(p_t_min=1.5)


def test_p_t_min_one_is_dmd():
    """p_t_min = 1 > every sampled t (t_max = 0.98): DMD whatever p is."""
    student, fake_net, teacher_net, x_real = _setup(seed=23)
    teacher, fake = Recorder(teacher_net), Recorder(fake_net)
    logs = dfd.student_step(student, teacher, fake, torch.optim.SGD(student.parameters(), lr=0.0),
                            [(x_real, None)], dfd.DFDConfig(p=1.0, p_t_min=1.0), 0)
    assert torch.equal(teacher.calls[0][0], fake.calls[0][0]) and logs["dfd"] == 0.0
