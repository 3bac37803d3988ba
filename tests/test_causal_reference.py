"""Opt-in parity of dfd_video/causal_wan.py with the reference code: DFD_SELF_FORCING_REPO=<checkout of csy2077/DFD-self-forcing>
(the Self-Forcing fork SF-DFD ran; needs einops, regex, ftfy). On tiny random weights, at fixed draws:
  1. CausalWanModel's KV-cache forward (wan/modules/causal_model.py), block by block, vs ours;
  2. SelfForcingTrainingPipeline.inference_with_trajectory (the training rollout) vs causal_wan.rollout;
  3. DMD.compute_distribution_matching_loss (model/dmd.py; DMD and DFD branches) vs dfd.dm_loss with our teacher and
     critic, value and gradient;
  4. `export`'s model.pt loaded as their inference.py loads it (strict load_state_dict into WanDiffusionWrapper).
Their flash-attention calls are replaced by fp32 scaled_dot_product_attention (their own CPU fallback casts to bf16),
their rank-0 broadcasts by the fixed draws, and `.cuda()` by the identity; nothing else of theirs is changed."""
import importlib.util
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from dfd_video import causal_wan
import dfd
import tiny_wan
import wan_dfd

REPO = os.environ.get("DFD_SELF_FORCING_REPO")
pytestmark = pytest.mark.skipif(not REPO, reason="set DFD_SELF_FORCING_REPO to a csy2077/DFD-self-forcing checkout")
B, FRAMES, H, W = 1, 6, 4, 6
TOKENS = (H // 2) * (W // 2)  # per latent frame


def close(what: str, got: torch.Tensor, want: torch.Tensor, **tol) -> None:
    """assert_close, printing the largest difference (pytest -s shows it; docs/causal.md quotes it)."""
    diff = (got.double() - want.double()).abs().max().item()
    print(f"\n{what}: max |ours - reference| = {diff:.1e} (reference max |x| = {want.abs().max().item():.2g})")
    torch.testing.assert_close(got, want, **tol)


def sdpa(q, k, v, **_):  # [B, L, heads, d] like flash_attention / attention
    return F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                          v.transpose(1, 2).float()).transpose(1, 2)


@pytest.fixture(scope="module")
def ref():
    """Their modules, imported without their package __init__ files (which pull in the VAE / T5 / demo code)."""
    for name in ("wan", "wan.modules", "utils", "pipeline", "model"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(REPO, *name.split("."))]
        sys.modules.setdefault(name, pkg)
    # the text encoder / VAE modules utils/wan_wrapper.py imports (t5.py asks CUDA for a device at import): unused here
    for name, attr in (("wan.modules.t5", "umt5_xxl"), ("wan.modules.vae", "_video_vae"),
                       ("wan.modules.tokenizers", "HuggingfaceTokenizer")):
        sys.modules.setdefault(name, types.SimpleNamespace(**{attr: None}))
    import wan.modules.causal_model as C
    import wan.modules.model as M
    M.flash_attention, C.attention = sdpa, sdpa
    spec = importlib.util.spec_from_file_location("pipeline.self_forcing_training",
                                                  os.path.join(REPO, "pipeline", "self_forcing_training.py"))
    P = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(P)
    sys.modules["pipeline"].SelfForcingTrainingPipeline = P.SelfForcingTrainingPipeline
    from utils.scheduler import FlowMatchScheduler
    from utils.wan_wrapper import WanDiffusionWrapper
    return types.SimpleNamespace(C=C, M=M, P=P, FlowMatchScheduler=FlowMatchScheduler, Wrapper=WanDiffusionWrapper)


def their_net(ref, diffusers_net, causal: bool):
    cfg = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=24, ffn_dim=32, freq_dim=32,
               text_dim=32, out_dim=16, num_heads=2, num_layers=2, qk_norm=True, cross_attn_norm=True, eps=1e-6)
    net = (ref.C.CausalWanModel if causal else ref.M.WanModel)(**cfg)
    net.load_state_dict(causal_wan.to_original_wan(diffusers_net.state_dict()), strict=True)
    return net.eval()


def their_wrapper(ref, net, causal: bool):
    """WanDiffusionWrapper around `net`, built as its __init__ builds it minus the from_pretrained."""
    w = ref.Wrapper.__new__(ref.Wrapper)
    torch.nn.Module.__init__(w)
    w.model, w.uniform_timestep, w.seq_len = net, not causal, FRAMES * TOKENS
    w.scheduler = ref.FlowMatchScheduler(shift=5.0, sigma_min=0.0, extra_one_step=True)
    w.scheduler.set_timesteps(1000, training=True)
    w.post_init()
    return w


def caches(layers: int, frames: int):
    kv = [{"k": torch.zeros(B, frames * TOKENS, 2, 12), "v": torch.zeros(B, frames * TOKENS, 2, 12),
           "global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0])} for _ in range(layers)]
    cross = [{"k": torch.zeros(B, 512, 2, 12), "v": torch.zeros(B, 512, 2, 12), "is_init": False} for _ in range(layers)]
    return kv, cross


def test_kv_cache_forward_matches_causal_wan_model(ref):
    torch.manual_seed(0)
    diff = tiny_wan.tiny_transformer(1)
    theirs = their_net(ref, diff, causal=True)
    ours = causal_wan.CausalWanTransformer(**tiny_wan.TRANSFORMER)
    ours.load_state_dict(diff.state_dict())
    x, text = torch.randn(B, 16, FRAMES, H, W), torch.randn(B, 512, 32)
    kv, cross = caches(2, FRAMES)
    cache = causal_wan.KVCache()
    with torch.no_grad():
        for s, t in ((0, 937.5), (0, 0.0), (3, 625.0)):  # block 0 at a student step, committed at t = 0, then block 1
            commit = (s, t) == (0, 0.0)
            want = theirs(x[:, :, s:s + 3], t=torch.full((B, 3), t), context=text, seq_len=FRAMES * TOKENS,
                          kv_cache=kv, crossattn_cache=cross, current_start=s * TOKENS)
            got = ours(x[:, :, s:s + 3], torch.full((B,), t), text, cache=cache, commit=commit, return_dict=False)[0]
            close(f"KV-cache forward, frames {s}-{s + 2}, t = {t:g}", got, want, atol=1e-4, rtol=1e-4)


def test_export_loads_as_inference_py_loads_it(ref, tmp_path):
    """`export`'s model.pt into their WanDiffusionWrapper, as inference.py --checkpoint_path does (strict)."""
    diff = tiny_wan.tiny_transformer(5)
    causal_wan.save_self_forcing(diff.state_dict(), str(tmp_path / "model.pt"))
    wrapper = their_wrapper(ref, their_net(ref, tiny_wan.tiny_transformer(6), causal=True), causal=True)
    wrapper.load_state_dict(torch.load(str(tmp_path / "model.pt"), map_location="cpu")["generator"])
    want = causal_wan.to_original_wan(diff.state_dict())
    assert all(torch.equal(v, want[k]) for k, v in wrapper.model.state_dict().items())


def test_rollout_matches_self_forcing_training_pipeline(ref, monkeypatch):
    diff = tiny_wan.tiny_transformer(2)
    gen = their_wrapper(ref, their_net(ref, diff, causal=True), causal=True)
    ours = causal_wan.CausalWanTransformer(**tiny_wan.TRANSFORMER)
    ours.load_state_dict(diff.state_dict())
    steps = torch.tensor([1000, 750, 500, 250])
    warped = torch.cat([gen.scheduler.timesteps, torch.zeros(1)])[1000 - steps]  # model/base.py, warp_denoising_step
    torch.testing.assert_close(warped / 1000, torch.tensor(wan_dfd.SELF_FORCING_TS), atol=1e-6, rtol=0)
    torch.manual_seed(1)
    noise, text = torch.randn(B, 16, FRAMES, H, W), torch.randn(B, 512, 32)
    draws = [torch.randn(B, 16, 3, H, W) for _ in range(2 * 4)]  # every fresh draw of the rollout, our layout
    for exit_step in (0, 2):
        pipe = ref.P.SelfForcingTrainingPipeline(warped, gen.scheduler, gen, num_frame_per_block=3,
                                                 same_step_across_blocks=True, num_max_frames=FRAMES, context_noise=0)
        pipe.num_transformer_blocks, pipe.frame_seq_length, pipe.kv_cache_size = 2, TOKENS, FRAMES * TOKENS
        monkeypatch.setattr(pipe, "generate_and_sync_list", lambda n, k, device: [exit_step] * n)
        monkeypatch.setattr(pipe, "_initialize_kv_cache", lambda batch_size, dtype, device: setattr(
            pipe, "kv_cache1", caches(2, FRAMES)[0]))
        monkeypatch.setattr(pipe, "_initialize_crossattn_cache", lambda batch_size, dtype, device: setattr(
            pipe, "crossattn_cache", caches(2, FRAMES)[1]))
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        queue = iter([d.permute(0, 2, 1, 3, 4).flatten(0, 1) for d in draws])
        monkeypatch.setattr(torch, "randn_like", lambda x, **k: next(queue).to(x.dtype))
        with torch.no_grad():
            want = pipe.inference_with_trajectory(noise.permute(0, 2, 1, 3, 4), prompt_embeds=text)[0]
        monkeypatch.undo()
        queue = iter(draws)
        randn = torch.randn
        monkeypatch.setattr(torch, "randn", lambda *a, generator=None, **k: next(queue))
        with torch.no_grad():
            got = causal_wan.rollout(wan_dfd.WanDenoiser(ours), noise, text, wan_dfd.SELF_FORCING_TS, exit_step,
                                     None, context_sigma=wan_dfd.grid_sigma(0.0))
        monkeypatch.setattr(torch, "randn", randn)
        close(f"rollout, exit step {exit_step}", got, want.permute(0, 2, 1, 3, 4), atol=1e-4, rtol=1e-4)


def test_dmd_and_dfd_loss_match_model_dmd(ref, monkeypatch):
    """One generator loss of SF-DFD's DMD (guidance 3 = our g 4, shift 5, clamp [20, 980]) against dfd.dm_loss."""
    import model.dmd as D
    teacher, critic = tiny_wan.tiny_transformer(3), tiny_wan.tiny_transformer(4)
    dmd = D.DMD.__new__(D.DMD)
    torch.nn.Module.__init__(dmd)
    dmd.real_score = their_wrapper(ref, their_net(ref, teacher, False), False)
    dmd.fake_score = their_wrapper(ref, their_net(ref, critic, False), False)
    dmd.scheduler = dmd.real_score.scheduler
    vars(dmd).update(num_frame_per_block=3, timestep_shift=5.0, min_step=20, max_step=980, real_guidance_scale=3.0,
                     fake_guidance_scale=0.0, ts_schedule=False, ts_schedule_max=False, min_score_timestep=0,
                     num_train_timestep=1000, device="cpu", independent_first_frame=False)
    torch.manual_seed(2)
    G, x, eps = (torch.randn(B, FRAMES, 16, H, W) for _ in range(3))  # their layout [B, F, C, H, W]
    text, neg = torch.randn(B, 512, 32), torch.randn(B, 512, 32)
    t = dfd.shift_t(0.7, 5.0)  # their randint 700, shifted: a point of their sigma grid
    to_ours = lambda v: v.permute(0, 2, 1, 3, 4)
    ours_teacher = wan_dfd.WanDenoiser(teacher, 4.0, neg)
    ours_fake = wan_dfd.WanDenoiser(critic)
    for clean in (None, x):
        g1 = G.clone().requires_grad_(True)
        monkeypatch.setattr(torch, "randint", lambda lo, hi, size, **k: torch.full(size, 700, dtype=torch.long))
        monkeypatch.setattr(torch, "randn_like", lambda v, **k: eps.to(v.dtype))
        loss, _ = dmd.compute_distribution_matching_loss(g1, {"prompt_embeds": text}, {"prompt_embeds": neg},
                                                         clean_latent=clean)
        monkeypatch.undo()
        loss.backward()
        g2 = to_ours(G).clone().requires_grad_(True)
        tt = torch.full((B,), t)
        with torch.no_grad():
            x0_fake = ours_fake(dfd.forward_diffusion(g2.detach(), to_ours(eps), tt), tt, text)
            seen = to_ours(G) if clean is None else to_ours(clean)
            x0_teacher = ours_teacher(dfd.forward_diffusion(seen, to_ours(eps), tt), tt, text)
        ours, _ = dfd.dm_loss(g2, x0_teacher, x0_fake)
        ours.backward()
        branch = "DMD" if clean is None else "DFD"
        close(f"{branch} loss", ours.double(), loss, atol=0, rtol=1e-4)
        close(f"{branch} gradient wrt G", g2.grad, to_ours(g1.grad).float(), atol=1e-9, rtol=1e-3)
