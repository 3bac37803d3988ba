"""wan_dfd's Wan conventions against diffusers' own WanPipeline, on a tiny random model (CPU, float32).

The teacher adapter (v -> x0 with timestep t * 1000, CFG uncond + g (cond - uncond) against the stored
negative-prompt embedding) driven by a reference sampler must reproduce the pipeline's output latents for the
same inputs; the text encoding must equal the pipeline's."""
import os

import pytest
import torch

import dfd
import tiny_wan
import wan_dfd
from dfd_video.spec import FASTGEN_NEGATIVE_PROMPT, negative_prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
PROMPTS = ["a red ball rolls left", "blue square moves up slowly"]
SHAPE = (2, 16, 3, 4, 6)  # latents of 9 frames at 32 x 48


@pytest.fixture(scope="module")
def wan():
    from diffusers import WanPipeline
    path = tiny_wan.cached_pipeline()
    adapter = wan_dfd.WanAdapter()
    net = adapter.load_network(path)
    pipe = WanPipeline.from_pretrained(path, transformer=net)
    pipe.set_progress_bar_config(disable=True)
    enc = wan_dfd.WanEncoders(path, torch.device("cpu"))
    return adapter, net, pipe, enc


def fastgen_negative(enc) -> dict:
    """The negative-prompt tensors `prepare` stores by default (FastGen's text)."""
    return {"text": enc.encode_text([FASTGEN_NEGATIVE_PROMPT])["text"][0]}


def test_loaded_network_equals_saved_model(wan):
    _, net, _, _ = wan
    ref = tiny_wan.tiny_transformer()
    for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(1, 16, 3, 4, 6)
    args = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 512, 32),
                return_dict=False)
    with torch.no_grad():
        assert torch.allclose(net(**args)[0], ref(**args)[0], atol=1e-6)  # RoPE buffers rebuilt correctly


def test_text_embeddings_match_pipeline(wan):
    _, _, pipe, enc = wan
    cond, uncond = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
    mine = enc.encode_text(PROMPTS)["text"]
    assert mine.shape == (2, 512, 32)
    torch.testing.assert_close(mine, cond, atol=1e-5, rtol=0)
    # prepare --negative-prompt "": the pipeline's default negative prompt ""; by default FastGen's text
    empty = enc.encode_text([negative_prompt("", wan_dfd.WanAdapter().pipeline_negative_prompt())])["text"][0]
    torch.testing.assert_close(empty, uncond[0], atol=1e-5, rtol=0)
    fastgen = pipe.encode_prompt(PROMPTS[:1], negative_prompt=FASTGEN_NEGATIVE_PROMPT, device="cpu",
                                 max_sequence_length=512)[1]
    torch.testing.assert_close(fastgen_negative(enc)["text"], fastgen[0], atol=1e-5, rtol=0)
    n_tokens = len(PROMPTS[0].split()) + 1  # words + </s>
    assert mine[0, n_tokens:].abs().max() == 0 and mine[0, n_tokens - 1].abs().max() > 0  # cut, then zero-padded


def test_teacher_with_unipc_reproduces_pipeline(wan):
    """The pipeline's own sampler (UniPC, flow_prediction, flow_shift 3.0, CFG 5.0) stepping on v recovered from
    the adapter's guided x0 gives the pipeline's latents."""
    from diffusers import UniPCMultistepScheduler
    adapter, net, pipe, enc = wan
    lat = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = pipe(prompt=PROMPTS, height=32, width=48, num_frames=9, num_inference_steps=6, latents=lat.clone(),
               guidance_scale=5.0, negative_prompt=FASTGEN_NEGATIVE_PROMPT, output_type="latent").frames
    teacher = adapter.denoiser(net, 5.0, fastgen_negative(enc))
    sch = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    assert sch.config.prediction_type == "flow_prediction" and sch.config.flow_shift == 3.0
    sch.set_timesteps(6)
    x, cond = lat.clone(), enc.encode_text(PROMPTS)["text"]
    with torch.no_grad():
        for t in sch.timesteps:
            tt = (t / 1000).float().expand(2)
            x = sch.step(dfd.v_from_x0(x, teacher(x, tt, cond), tt), t, x).prev_sample
    assert out.abs().max() > 1.0  # the comparison is not between two zeros
    torch.testing.assert_close(x, out, atol=2e-5, rtol=1e-5)


def test_teacher_with_own_euler_reproduces_pipeline(wan):
    """An independent Euler loop in x0 form, x <- x0 + t_next (x - x0) / t, against the pipeline run with
    FlowMatchEulerDiscreteScheduler(shift=3): checks v = eps - x0, timestep = t * 1000 and the CFG form."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    adapter, net, pipe, enc = wan
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe.scheduler, old = sch, pipe.scheduler
    try:
        lat = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        out = pipe(prompt=PROMPTS, height=32, width=48, num_frames=9, num_inference_steps=5, latents=lat.clone(),
                   guidance_scale=5.0, negative_prompt=FASTGEN_NEGATIVE_PROMPT, output_type="latent").frames
    finally:
        pipe.scheduler = old
    ts = sch.sigmas.tolist()  # 5 shifted sigmas then 0
    teacher = adapter.denoiser(net, 5.0, fastgen_negative(enc))
    x, cond = lat.clone(), enc.encode_text(PROMPTS)["text"]
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            x0 = teacher(x, torch.full((2,), t), cond)
            x = x0 + t_next * (x - x0) / t
    torch.testing.assert_close(x, out, atol=2e-5, rtol=1e-5)
    # and the guidance matters: g = 1 (no CFG) gives something else
    plain = adapter.denoiser(net, 1.0, fastgen_negative(enc))
    with torch.no_grad():
        a = teacher(lat, torch.full((2,), 0.7), cond)
        b = plain(lat, torch.full((2,), 0.7), cond)
    assert (a - b).abs().max() > 1e-3
