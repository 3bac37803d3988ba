"""DMD2's GAN head (--gan-weight, dfd_video/gan.py) as FastGen computes it: the losses and R1 by hand, what the
discriminator is fed, FastGen's parameter names loading from a FastGen FSDP folder and a .pth (and latest_ar.*), the
feature layouts, the method untouched at weight 0; a tiny GAN run; and (slow) kill / resume bit-identical at 1 and 2
ranks, 2 ranks equal to a single-process emulation."""
import argparse
import functools
import json
import math
import os
import re
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import cosmos_dfd
import dfd
import tiny_wan
import wan_dfd
import dfd_video.cli
import dfd_video.data
import dfd_video.train
from dfd_video import gan
from dfd_video.weights import describe_dmd2, describe_lines, fit_state_dict, read_checkpoint

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "wan_dfd.py")
LR = 1e-3
softplus = lambda x: math.log1p(math.exp(x))


def test_losses_by_hand():
    fake, real, perturbed = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[1.5, 0.5]])
    assert gan.gen_loss(fake).item() == pytest.approx((softplus(-0.5) + softplus(1.0)) / 2, rel=1e-6)
    want = (softplus(0.5) + softplus(-1.0)) / 2 + (softplus(-2.0) + softplus(0.0)) / 2
    assert gan.disc_loss(real, fake).item() == pytest.approx(want, rel=1e-6)
    assert gan.r1_loss(real, perturbed).item() == pytest.approx((0.5**2 + 0.5**2) / 2, rel=1e-6)
    # GroupNorm's groups as FastGen's _get_optimal_groups picks them
    assert [gan.norm_groups(c) for c in (3, 6, 20, 32, 36, 384, 1280, 2048)] == [1, 1, 5, 8, 18, 32, 32, 32]


def fastgen_keys(disc_type: str, heads: int, dim: int) -> dict[str, tuple]:
    """The state dict FastGen's Discriminator_VideoDiT has (fastgen/networks/discriminators.py), written out."""
    keys = {}
    for h in range(heads):
        p = f"cls_pred_heads.{h}."
        if disc_type == "dit_simple_conv3d":
            c = dim // 2
            keys.update({p + "0.weight": (c, dim, 2, 4, 4), p + "0.bias": (c,), p + "1.weight": (c,), p + "1.bias": (c,),
                         p + "3.weight": (1, c, 1, 1, 1), p + "3.bias": (1,)})
            continue
        scales, c, hidden = {"multiscale_down_mlp_large": (5, dim, 1024),
                             "multiscale_down_mlp_efficient": (3, dim // 4, 256)}[disc_type]
        for s in range(scales):
            b = f"{p}scale_branches.{s}."
            keys.update({b + "0.weight": (c, dim, 1, 1, 1), b + "0.bias": (c,), b + "1.weight": (c,), b + "1.bias": (c,),
                         b + "4.weight": (c, c, 3, 3, 3), b + "4.bias": (c,), b + "5.weight": (c,), b + "5.bias": (c,)})
        keys.update({p + "classifier.0.weight": (hidden, scales * c), p + "classifier.0.bias": (hidden,),
                     p + "classifier.3.weight": (1, hidden), p + "classifier.3.bias": (1,)})
    return keys


@pytest.mark.parametrize("disc_type,heads,dim", [("multiscale_down_mlp_large", 3, 384), ("dit_simple_conv3d", 1, 5120),
                                                 ("multiscale_down_mlp_efficient", 2, 16)])
def test_discriminator_has_fastgens_names(disc_type, heads, dim):
    with torch.device("meta"):
        disc = gan.Discriminator(disc_type, range(heads), dim)
    assert {k: tuple(v.shape) for k, v in disc.state_dict().items()} == fastgen_keys(disc_type, heads, dim)


def tiny_disc(seed: int, disc_type="multiscale_down_mlp_efficient", blocks=(0, 1), dim=6) -> dict:
    return gan.fresh_state_dict(disc_type, blocks, dim, seed)


def test_fastgen_discriminator_loads(tmp_path):
    """<iter>.discriminator_model/ (FSDP checkpointer), the `discriminator` of a non-FSDP <iter>.pth, and the
    auto-resume save latest_ar.* all give the discriminator, key for key."""
    d_sd = tiny_disc(1)
    with torch.device("meta"):
        meta = gan.Discriminator("multiscale_down_mlp_efficient", (0, 1), 6)
    disc = gan.Discriminator("multiscale_down_mlp_efficient", (0, 1), 6)
    disc.load_state_dict(d_sd)
    fg = str(tmp_path / "fg")
    tiny_wan.write_fastgen_fsdp(fg, 500, {"discriminator": disc}, prefix="")  # FastGen saves the module itself
    stem = tiny_wan.write_fastgen_fsdp(fg, 500, {"net": tiny_wan.tiny_transformer(5)})
    desc = describe_dmd2(stem)
    src = desc["networks"]["discriminator"]
    assert src["source"].endswith("0000500.discriminator_model") and src["tensors"] == len(d_sd)
    got = fit_state_dict(meta, read_checkpoint(src["source"], src["role"]), "test")
    assert all(torch.equal(got[k], d_sd[k]) for k in d_sd)
    lines = describe_lines(desc, gan=True)
    assert f"  discriminator <- {src['source']} ({len(d_sd)} tensors)" in lines
    assert any(x.startswith("  its discriminator is not used") for x in describe_lines(desc))
    # the non-FSDP checkpointer's single .pth
    pth = tmp_path / "ddp" / "0000500.pth"
    os.makedirs(pth.parent)
    net = {f"transformer.{k}": v for k, v in tiny_wan.tiny_transformer(5).state_dict().items()}
    torch.save({"model": {"net": net, "fake_score": net, "discriminator": d_sd}, "iteration": 500}, pth)
    desc = describe_dmd2(str(pth))
    assert desc["format"] == "fastgen-pth" and desc["networks"]["discriminator"]["role"] == "discriminator"
    got = fit_state_dict(meta, read_checkpoint(str(pth), "discriminator"), "test")
    assert all(torch.equal(got[k], d_sd[k]) for k in d_sd)
    # latest_ar.*: read like <iter>.*, named for what its .pth records; a checkpoints folder keeps FastGen's latest
    for f in os.listdir(fg):
        os.rename(os.path.join(fg, f), os.path.join(fg, f.replace("0000500", "latest_ar")))
    tiny_wan.write_fastgen_fsdp(fg, 400, {"net": tiny_wan.tiny_transformer(5)})
    desc = describe_dmd2(os.path.join(fg, "latest_ar.pth"))
    assert "auto-resume save, iteration 500" in desc["summary"] and desc["networks"]["discriminator"] is not None
    desc = describe_dmd2(fg)
    assert "iteration 400" in desc["summary"] and any("latest_ar" in w for w in desc["warnings"])


def test_feature_grids_are_fastgens():
    """Wan: a token's D channels are (p_t, p_h, p_w, D / 4), put back on the latent grid; Cosmos: the patch grid.
    Checked against the patchify written out element by element."""
    B, C, T, H, W, (pt, ph, pw) = 1, 3, 2, 4, 6, (1, 2, 2)
    x = torch.randn(B, C, T, H, W)
    tokens = torch.empty(B, T * (H // ph) * (W // pw), pt * ph * pw * C)
    for t in range(T):
        for h in range(H // ph):
            for w in range(W // pw):
                for i in range(ph):
                    for j in range(pw):
                        for c in range(C):
                            tokens[0, (t * (H // ph) + h) * (W // pw) + w, (i * pw + j) * C + c] = x[0, c, t, h * ph + i,
                                                                                                      w * pw + j]
    net = type("Net", (), {"config": type("Cfg", (), {"patch_size": (pt, ph, pw)})})()
    assert torch.equal(wan_dfd.WanAdapter().feature_grid(net, tokens, x.shape), x)
    grid = cosmos_dfd.CosmosAdapter().feature_grid(net, tokens, x.shape)
    assert grid.shape == (B, pt * ph * pw * C, T, H // ph, W // pw)
    assert torch.equal(grid[0, :, 1, 1, 2], tokens[0, (1 * (H // ph) + 1) * (W // pw) + 2])


class Recorder(nn.Module):
    """Stand-in teacher features: the input itself as one feature block, every call recorded."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, cond):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return [x.float()]


def small_gan(weight=0.03, **kw):
    disc = gan.Discriminator("dit_simple_conv3d", (0,), 4)
    disc.load_state_dict(gan.fresh_state_dict("dit_simple_conv3d", (0,), 4, 0))
    c = dfd.DFDConfig(t_min=0.001, t_max=0.999, t_shift=5.0)
    return gan.GAN(disc, torch.optim.AdamW(disc.parameters(), lr=1e-3), Recorder(), weight, c, **kw), c


@pytest.mark.parametrize("same", [True, False])
def test_discriminator_sees_what_fastgen_feeds(same):
    """Fake: x~_t as given. Real: x_t from the same t and eps (gan_use_same_t_noise) or fresh ones. R1: the clean x
    plus alpha-scaled noise, at the real branch's t. The loss is disc_loss + r1 * mse of the logits."""
    adv, c = small_gan(same_t_noise=same, r1_weight=2.0, r1_alpha=0.1)
    g = torch.Generator().manual_seed(3)
    x_real, eps, x_noisy = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 4, 2, 4, 4, generator=g), \
        torch.randn(2, 4, 2, 4, 4, generator=g)
    t = torch.tensor([0.3, 0.9])
    gen = torch.Generator().manual_seed(7)
    loss, stats = adv.disc_loss(x_noisy, x_real, eps, t, None, gen)
    ref = torch.Generator().manual_seed(7)  # the draws, in disc_loss's order
    if not same:
        t = dfd.sample_t(2, c, ref, "cpu")
        eps = torch.randn(x_real.shape, generator=ref)
    torch.randint(0, 2**62, (1,), generator=ref)  # the Dropout seed
    n = torch.randn(x_real.shape, generator=ref)
    (fx, ft), (rx, rt), (px, pt) = adv.features.seen
    assert torch.equal(fx, x_noisy) and torch.equal(ft, torch.tensor([0.3, 0.9]))
    assert torch.equal(rt, t) and torch.equal(pt, t)
    torch.testing.assert_close(rx, (1 - t.view(2, 1, 1, 1, 1)) * x_real + t.view(2, 1, 1, 1, 1) * eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(px, x_real + 0.1 * n, rtol=0, atol=1e-6)
    with torch.no_grad():
        logits = [adv.disc([v]) for v in (rx, fx, px)]
    want = gan.disc_loss(logits[0], logits[1]) + 2.0 * gan.r1_loss(logits[0], logits[2])
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    loss.backward()
    assert all(q.grad is not None for q in adv.disc.parameters())
    # the student phase: gradient into G through the features, none into the discriminator
    adv.disc.zero_grad(set_to_none=True)
    x = x_noisy.clone().requires_grad_(True)
    extra, st = adv.gen_loss(x, t, None)
    torch.testing.assert_close(extra.detach(), 0.03 * gan.gen_loss(adv.disc([x_noisy])).detach(), rtol=1e-6, atol=0)
    extra.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and all(q.grad is None for q in adv.disc.parameters())


class Toy(nn.Module):
    """A tiny denoiser on [B, 4, 2, 4, 4]."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x, t, cond):
        return self.conv(x) * (1 - dfd.expand(t, x))


def test_the_method_is_untouched_by_the_gan_hook():
    """An adversary changes the student only through its loss: at weight 0 both steps update the networks bit for
    bit as without one (its draws come after the method's), at weight > 0 the student moves differently."""
    c = dfd.DFDConfig(fake_updates=1, t_min=0.001, t_max=0.999, t_shift=5.0, grad_clip=10.0)
    batch = [(torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1)), None)]
    out = {}
    for name, weight in (("none", None), ("zero", 0.0), ("on", 0.5)):
        student, fake, teacher = Toy(0), Toy(1), Toy(2)
        adv = small_gan(weight)[0] if weight is not None else None
        opt_s, opt_f = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (student, fake))
        dfd.fake_score_step(student, fake, opt_f, batch, c, 0, 0, adversary=adv)
        dfd.student_step(student, teacher, fake, opt_s, batch, c, 0, adversary=adv)
        out[name] = [q.detach().clone() for q in (*student.parameters(), *fake.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(out["none"], out["zero"]))
    assert not torch.equal(out["none"][0], out["on"][0]) and torch.equal(out["none"][-1], out["on"][-1])


# ---------------------------------------------------------------------------------------------------
# The training run


def gan_data(folder, n: int = 4) -> None:
    """A prepared Wan data folder whose latents [16, 4, 8, 8] give the tiny teacher a feature grid the multiscale
    heads (pooling by 4) can read."""
    g = torch.Generator().manual_seed(0)
    w = dfd_video.data.ShardWriter(str(folder), per_shard=3)
    for _ in range(n):
        w.add({"latents": torch.randn(16, 4, 8, 8, generator=g), "text": torch.randn(512, 32, generator=g)})
    w.close({"adapter": "wan"}, {"text": torch.randn(512, 32, generator=g)})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gan")
    gan_data(root / "data")
    disc = gan.Discriminator("multiscale_down_mlp_efficient", (0, 1), 6)
    disc.load_state_dict(tiny_disc(1))
    fg = str(root / "fg")
    tiny_wan.write_fastgen_fsdp(fg, 25000, {"discriminator": disc}, prefix="")
    stem = tiny_wan.write_fastgen_fsdp(fg, 25000, {"net": tiny_wan.tiny_transformer(5),
                                                   "fake_score": tiny_wan.tiny_transformer(6)})
    return {"root": root, "pipe": tiny_wan.cached_pipeline(), "data": str(root / "data"), "dmd2": stem, "disc": disc}


def gan_argv(s, out, *more):
    return ["train", "--model-dir", s["pipe"], "--data", s["data"], "--dmd2-ckpt", s["dmd2"], "--out", out,
            "--batch-size", "2", "--fake-updates", "2", "--lr", str(LR), "--lr-fake", str(LR), "--gan-lr", str(LR),
            "--gan-weight", "0.5", "--gan-blocks", "0", "1", "--gan-disc-type", "multiscale_down_mlp_efficient",
            "--gan-r1-weight", "1", "--monitor-every", "0", "--device", "cpu", *more]


def test_train_gan_in_fastgen_iterations(setup, tmp_path, capfd):
    """--iterations 8 at --fake-updates 2: FastGen runs iterations 1..7, the student on 3 and 6, then one fake-score
    update. The discriminator starts from the FastGen folder (and says so), trains in the fake-score phase (the tail's
    too), is saved with its optimizer; checkpoints are named by FastGen iterations done, metrics say both units, plot
    draws them against FastGen iterations; the run's last state cannot be continued."""
    from dfd_video.evaluation import plot
    out = str(tmp_path / "run")
    argv = [*gan_argv(setup, out, "--save-every", "1", "--keep", "9"), "--iterations"]
    wan_dfd.main([*argv, "8"])
    err = capfd.readouterr().err
    assert f"  discriminator <- {setup['dmd2']}.discriminator_model" in err
    assert "GAN head (--gan-weight 0.5): multiscale_down_mlp_efficient on teacher blocks 0 1 (the flags)" in err
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["step"], r["iteration"], r["student_updates"]) for r in rows] == [(0, 3, 1), (1, 6, 2), (2, 7, 2)]
    assert "loss_student" in rows[1] and "loss_student" not in rows[2] and rows[2]["samples"] == 7 * 2
    for k in ("gan_loss_gen", "gan_loss_disc", "gan_loss_r1", "grad_norm_disc"):
        assert math.isfinite(rows[0][k]), k
    ck = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(ck)) == ["iteration-0000003", "iteration-0000006", "iteration-0000007", "latest"]
    a, b = (torch.load(os.path.join(ck, f"iteration-000000{i}", "state.pt"), weights_only=True) for i in (6, 7))
    assert b["length"] == {"unit": "iterations", "count": 8} and b["tail_done"] and b["position"] == 7
    adam = lambda st, net, k: st["optim"][net]["state"][k]["step"]
    assert adam(a, "fake", "proj_out.weight") + 1 == adam(b, "fake", "proj_out.weight")  # the tail trained the fake
    assert adam(a, "student", "proj_out.weight") == adam(b, "student", "proj_out.weight")  # score, not the student
    k = "cls_pred_heads.0.classifier.3.weight"
    assert adam(a, "discriminator", k) + 1 == adam(b, "discriminator", k)  # and the discriminator with it
    saved = load_file(os.path.join(ck, "iteration-0000007", "discriminator.safetensors"))
    start = setup["disc"].state_dict()
    assert saved.keys() == start.keys() and max((saved[k] - start[k]).abs().max() for k in saved) > 1e-4
    assert plot.run_unit(out) == "iterations"
    assert plot.read_series(os.path.join(out, "metrics.jsonl"), "iteration")["loss_fake"][0] == [3, 6, 7]
    with pytest.raises(SystemExit, match="trailing fake-score updates"):
        wan_dfd.main([*argv, "11", "--resume"])


def emulate(s, argv, steps: int, world: int):
    """The run of `argv` at `world` ranks in one process without FSDP (tiny_wan.emulate_ranks, with the GAN): dfd's
    steps once per emulated rank, gradients of each network averaged before its AdamW step."""
    p = argparse.ArgumentParser()
    dfd_video.cli.add_train_args(p, wan_dfd.WanAdapter())
    args = p.parse_args(argv[1:])
    adapter = wan_dfd.WanAdapter()
    teacher_net, student_net, fake_net = (adapter.load_network(args.model_dir) for _ in range(3))
    for net, name in ((student_net, "net"), (fake_net, "fake_score")):
        net.load_state_dict({k[len("transformer."):]: v for k, v in read_checkpoint(f"{s['dmd2']}.{name}_model").items()})
    disc = gan.Discriminator(args.gan_disc_type, args.gan_blocks, 6)
    disc.load_state_dict(setup_disc(s))
    data = dfd_video.data.LatentShards(args.data, adapter.data_keys)
    teacher = adapter.denoiser(teacher_net, args.guidance, data.negative)
    student, fake = adapter.denoiser(student_net), adapter.denoiser(fake_net)
    c = dfd_video.train.dfd_config(args)
    features = gan.teacher_features(adapter, teacher_net, adapter.denoiser(teacher_net), args.gan_blocks, None)
    adv = gan.GAN(disc, tiny_wan.Deferred(), features, args.gan_weight, c, True, args.gan_r1_weight, args.gan_r1_alpha)
    adamw = lambda net, lr: torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    opts = {"student": adamw(student_net, args.lr), "fake": adamw(fake_net, args.lr_fake), "disc": adamw(disc, args.gan_lr)}
    streams = [data.batches(0, args.batch_size // world, r, world, args.seed) for r in range(world)]
    batches = lambda r: [adapter.make_batch(next(streams[r]), torch.device("cpu"))]

    def step(*nets):
        for net in nets:
            for q in net.parameters():
                if q.grad is not None:
                    q.grad /= world
        for net, name in zip(nets, ("fake", "disc") if len(nets) == 2 else ("student",)):
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
    for k in range(steps):
        for j in range(c.fake_updates):
            for r in range(world):
                dfd.fake_score_step(student, fake, tiny_wan.Deferred(), batches(r), c, k, j, r, adversary=adv)
            step(fake_net, disc)
        for r in range(world):
            dfd.student_step(student, teacher, fake, tiny_wan.Deferred(), batches(r), c, k, r, None, adversary=adv)
        step(student_net)
    return {"student": student_net.state_dict(), "fake": fake_net.state_dict(), "discriminator": disc.state_dict()}


def setup_disc(s) -> dict:
    return {k: v.clone() for k, v in s["disc"].state_dict().items()}


run = functools.partial(tiny_wan.run_script, timeout=1200)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_gan_run_resumes_bit_identically(setup, tmp_path, world):
    """Killed after its first checkpoint and resumed, a GAN run (Dropout in the discriminator included) ends bit for
    bit where the unbroken run does; at 2 ranks both equal the single-process emulation."""
    launch = (sys.executable,) if world == 1 else (sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={world}")
    argv = lambda out: gan_argv(setup, out, "--student-steps", "3", "--save-every", "1", "--keep", "5",
                                "--grad-clip", "0")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(argv(a), launch)
    if world == 1:
        latest = tiny_wan.kill_at_first_checkpoint([*launch, SCRIPT, *argv(b)], b, timeout=1200)
        assert os.path.exists(latest)
        run([*argv(b), "--resume"], launch)
    else:  # torchrun's workers outlive a killed launcher; its first checkpoint is what a kill leaves
        run([*argv(b), "--resume", os.path.join(a, "checkpoints", "step-000000")], launch)
    for name in ("student", "fake", "discriminator"):
        x, y = (load_file(os.path.join(r, "checkpoints", "step-000002", f"{name}.safetensors")) for r in (a, b))
        assert all(torch.equal(x[k], y[k]) for k in x), name
    if world == 2:
        ref = emulate(setup, argv(a), 3, world)
        ck = os.path.join(a, "checkpoints", "step-000002")
        optim = torch.load(os.path.join(ck, "state.pt"), weights_only=True)["optim"]
        for name, want in ref.items():
            got = load_file(os.path.join(ck, f"{name}.safetensors"))
            for k in want:
                if re.fullmatch(r".*scale_branches\.\d+\.[04]\.bias", k):
                    # a conv bias before a one-channel GroupNorm (this tiny head has 1 channel per branch): its
                    # gradient is exactly 0 but for rounding, and Adam steps by LR in the direction of that rounding,
                    # which no summation order keeps; bounded by one step per update (6 updates)
                    assert (got[k] - want[k]).abs().max() <= 2 * 6 * LR, (name, k)
                    continue
                # as tests/test_wan_dist.py: 0.1% of an Adam step, plus what Adam makes of rounding where an element's
                # gradient scale sqrt(v) is far below the tensor's typical one; the tiny discriminator's one-channel
                # tensors have no typical scale but their own: 1% of a step there (a wrong sum moves them by steps)
                scale = optim[name]["state"][k]["exp_avg_sq"].sqrt()
                tol = 1e-3 * LR + LR * 1e-4 * scale.median() / (scale + 1e-8)
                if name == "discriminator":
                    tol = torch.clamp(tol, min=1e-2 * LR)
                assert ((got[k] - want[k]).abs() / tol).max() < 1.0, (name, k)


@pytest.mark.slow
def test_lora_gan_run_resumes_bit_identically(setup, tmp_path):
    """--lora-rank with the fake score on the teacher's base (a .safetensors DMD2 student: no critic): the GAN's
    teacher features run with that adapter off and without activation checkpointing; a run resumed after 2 steps
    ends where the unbroken 3-step run does (adapters, EMA, discriminator)."""
    dmd2 = tiny_wan.write_dmd2_checkpoints(str(tmp_path / "dmd2"), tiny_wan.tiny_transformer(5),
                                           tiny_wan.tiny_transformer(6))["safetensors"]
    argv = lambda out, n: [*gan_argv({**setup, "dmd2": dmd2}, out, "--lora-rank", "4", "--ema", "0.9"),
                           "--student-steps", n]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    wan_dfd.main(argv(a, "3"))
    wan_dfd.main(argv(b, "2"))
    wan_dfd.main([*argv(b, "3"), "--resume"])
    for name in ("student", "fake", "ema", "discriminator"):
        x, y = (load_file(os.path.join(r, "checkpoints", "step-000002", f"{name}.safetensors")) for r in (a, b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
