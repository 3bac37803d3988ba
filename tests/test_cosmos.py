"""cosmos_dfd.py on tiny random Cosmos-Predict2.5 models (tests/tiny_cosmos.py), CPU only.

The oracle is diffusers itself: Cosmos2_5_PredictBasePipeline run on the same tiny folder, image, prompt
embedding and seed must give the latents that cosmos_dfd's teacher adapter gives under a reference sampler.
"""
import os

import pytest
import torch

import cosmos_dfd as C
import dfd
import tiny_cosmos

H = W = 32  # pixels; latents are [B, 16, T, 4, 4]
FRAMES = 9  # -> 3 latent frames: 1 conditioning + 2 generated


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_cosmos.save_tiny_pipeline(str(tmp_path_factory.mktemp("cosmos") / "model"))


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    torch.set_num_threads(1)
    return tiny_cosmos.load_pipeline(tiny_dir, transformer=C.load_transformer(os.path.join(tiny_dir, "transformer")))


def encode_image(vae, video):
    """Normalised VAE latent (argmax), as the pipeline's prepare_latents computes it."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return (vae.encode(video).latent_dist.mode() - mean) / std


# ---------------------------------------------------------------------------------------------------
# torchvision stand-in


def test_resize_stand_in_is_torchvision_nearest():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 5, 7, generator=g)
    out = C._resize_nearest(img, [3, 4])
    rows = [int(i * 5 / 3) for i in range(3)]  # torchvision NEAREST = torch legacy nearest: floor(i * in / out)
    cols = [int(j * 7 / 4) for j in range(4)]
    assert torch.equal(out, img[:, :, rows][:, :, :, cols])
    up = C._resize_nearest(img, [10, 3])
    assert torch.equal(up, img[:, :, [int(i * 5 / 10) for i in range(10)]][:, :, :, [int(j * 7 / 3) for j in range(3)]])
    assert C._resize_nearest(img, [5, 7]) is img  # torchvision returns the input when the size matches
    u8 = (torch.rand(3, 5, 7, generator=g) * 255).to(torch.uint8)  # [C, H, W] and integer dtype round trip
    assert torch.equal(C._resize_nearest(u8, [3, 4]), u8[:, rows][:, :, cols])
    bf = img.bfloat16()
    assert C._resize_nearest(bf, [3, 4]).dtype == torch.bfloat16
    with pytest.raises(NotImplementedError):
        C._resize_nearest(img, [3, 4], "bilinear")


def test_stand_in_only_where_torchvision_is_missing():
    import importlib.util

    import diffusers.models.transformers.transformer_cosmos as tc

    C.ensure_padding_mask_resize()
    uses_stand_in = tc.transforms.functional.resize is C._resize_nearest
    assert uses_stand_in == (importlib.util.find_spec("torchvision") is None)


# ---------------------------------------------------------------------------------------------------
# The adapter against the pipeline


def test_teacher_adapter_reproduces_pipeline(pipe):
    """Teacher adapter (g = guidance_scale + 1) under a reference loop driving the pipeline's own UniPC
    scheduler reproduces the pipeline's latents for a one-frame video, a prompt embedding and a seed."""
    from diffusers import UniPCMultistepScheduler

    with torch.no_grad():
        emb, neg = pipe.encode_prompt("a red ball rolls", negative_prompt=None, device="cpu")
    image = torch.rand(1, 3, 1, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    steps, guidance_scale = 4, 2.0  # the paper's g = 3.0
    out = pipe(video=image, prompt_embeds=emb, negative_prompt_embeds=neg, height=H, width=W, num_frames=FRAMES,
               num_inference_steps=steps, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0),
               output_type="latent", num_latent_conditional_frames=1).frames
    c = encode_image(pipe.vae, image)  # the image alone: the causal VAE gives the pipeline's first latent frame
    teacher = C.CosmosDenoiser(pipe.transformer, g=guidance_scale + 1)
    cond = C.CosmosCond(emb, c, neg)
    sched = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    eps = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    x = eps
    with torch.no_grad():
        for i, timestep in enumerate(sched.timesteps):
            t = sched.sigmas[i].expand(1)
            x = sched.step(dfd.v_from_x0(x, teacher(x, t, cond), t), timestep, x).prev_sample
    scale = out[:, :, 1:].abs().max()
    assert scale > 1.0  # a non-trivial video
    assert (x[:, :, 1:] - out[:, :, 1:]).abs().max() < 1e-5 * scale  # generated frames
    assert (x[:, :, :1] - c).abs().max() < 1e-6  # ours: the conditioning frame is the image latent
    # the pipeline's conditioning frame drifts: it starts at eps, not on the path (1 - t0) c + t0 eps, and its
    # replaced velocity eps - c keeps that offset to the end: out = c + (1 - t0)(eps - c)
    t0 = sched.sigmas[0]
    assert (out[:, :, :1] - c).abs().max() > 1e-3
    assert (out[:, :, :1] - (c + (1 - t0) * (eps[:, :, :1] - c))).abs().max() < 1e-5


def test_conditioning_frames_are_clean_in_every_network(pipe):
    """x0 of the conditioning frame is the image latent whatever x_t holds there, and the generated frames
    see it as the clean latent at t = 1e-4, whatever t the rest gets."""
    g = torch.Generator().manual_seed(3)
    net = C.CosmosDenoiser(pipe.transformer)
    c = torch.randn(2, 16, 1, 4, 4, generator=g)
    cond = C.CosmosCond(torch.randn(2, 512, tiny_cosmos.PROMPT_DIM, generator=g), c)
    x_t = torch.randn(2, 16, 3, 4, 4, generator=g)
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        a = net(x_t, t, cond)
        b = net(torch.cat([torch.randn(2, 16, 1, 4, 4, generator=g), x_t[:, :, 1:]], 2), t, cond)
        v = net.velocity(C.with_image(x_t, c), C.frame_mask(3, 1) * C.COND_T + (1 - C.frame_mask(3, 1)) * t.view(2, 1, 1, 1, 1),
                         C.frame_mask(3, 1).expand(2, 1, 3, 4, 4), cond.prompt)
    assert torch.equal(a[:, :, :1], c) and torch.equal(b, a)
    assert torch.allclose(a[:, :, 1:], x_t[:, :, 1:] - t.view(2, 1, 1, 1, 1) * v[:, :, 1:], atol=1e-6)
    mask = C.generated_mask(x_t, 1)
    assert mask.flatten().tolist() == [0.0, 1.0, 1.0]
