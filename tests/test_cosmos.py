"""cosmos_dfd.py on tiny random Cosmos-Predict2.5 models (tests/tiny_cosmos.py), CPU only.

The oracle is diffusers itself: Cosmos2_5_PredictBasePipeline run on the same tiny folder, image, prompt
embedding and seed gives the latents that cosmos_dfd's teacher adapter gives under a reference sampler, and the
exported student gives in the pipeline the latents of dfd.sample(..., renoise=False). End to end: synthetic mp4s -> prepare ->
train -> resume (same weights as an unbroken run) -> sample (first frame = the image) -> export; bad inputs.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cosmos_dfd as C
import dfd
import tiny_cosmos
import tiny_wan
import dfd_video.cli
import dfd_video.data
import dfd_video.export
import dfd_video.prepare
import dfd_video.video
import dfd_video.weights
import wan_dfd
from dfd_video.spec import FASTGEN_NEGATIVE_PROMPT

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W, FRAMES = 32, 32, 9  # latents [16, 3, 4, 4]: 1 conditioning + 2 generated latent frames
SIZE = ["--num-frames", str(FRAMES), "--height", str(H), "--width", str(W), "--fps", "8"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_cosmos.save_tiny_pipeline(str(tmp_path_factory.mktemp("cosmos") / "model"))


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return tiny_cosmos.load_pipeline(tiny_dir, transformer=C.CosmosAdapter().load_network(tiny_dir))


def encode_image(vae, video):
    """Normalised VAE latent (argmax), as the pipeline's prepare_latents computes it."""
    mean = torch.tensor(vae.config.latents_mean, device=video.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=video.device).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return (vae.encode(video.to(vae.dtype)).latent_dist.mode().float() - mean) / std


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


# ---------------------------------------------------------------------------------------------------
# torchvision stand-in


def test_resize_stand_in_is_torchvision_nearest():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 5, 7, generator=g)
    rows = [int(i * 5 / 3) for i in range(3)]  # torchvision NEAREST = torch legacy nearest: floor(i * in / out)
    cols = [int(j * 7 / 4) for j in range(4)]
    assert torch.equal(C._resize_nearest(img, [3, 4]), img[:, :, rows][:, :, :, cols])
    up = C._resize_nearest(img, [10, 3])
    assert torch.equal(up, img[:, :, [int(i * 5 / 10) for i in range(10)]][:, :, :, [int(j * 7 / 3) for j in range(3)]])
    assert C._resize_nearest(img, [5, 7]) is img  # torchvision returns the input when the size matches
    u8 = (torch.rand(3, 5, 7, generator=g) * 255).to(torch.uint8)  # [C, H, W] and an integer dtype
    assert torch.equal(C._resize_nearest(u8, [3, 4]), u8[:, rows][:, :, cols])
    assert C._resize_nearest(img.bfloat16(), [3, 4]).dtype == torch.bfloat16
    with pytest.raises(NotImplementedError):
        C._resize_nearest(img, [3, 4], "bilinear")


def test_stand_in_only_where_torchvision_is_missing():
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
    teacher = C.CosmosDenoiser(pipe.transformer, guidance_scale + 1, neg, cond_t=C.COND_T)  # the pipeline's time
    cond = C.CosmosCond(emb, c)
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
    # a wrong guidance mapping (g = guidance_scale) or no guidance would not match
    with torch.no_grad():
        t = sched.sigmas[1].expand(1)
        wrong = C.CosmosDenoiser(pipe.transformer, guidance_scale, neg)(out, t, cond)
        assert (wrong - teacher(out, t, cond)).abs().max() > 1e-3


def test_conditioning_frames_are_clean_in_every_network(pipe):
    """x0 of the conditioning frame is the image latent whatever x_t holds there, and the generated frames see
    it as the clean latent at the conditioning-frame time (0 by default, --cond-frame-t), whatever t the rest gets."""
    g = torch.Generator().manual_seed(3)
    net = C.CosmosDenoiser(pipe.transformer)
    c = torch.randn(2, 16, 1, 4, 4, generator=g)
    cond = C.CosmosCond(torch.randn(2, 512, tiny_cosmos.PROMPT_DIM, generator=g), c)
    x_t = torch.randn(2, 16, 3, 4, 4, generator=g)
    t = torch.tensor([0.9, 0.3])
    m = C.frame_mask(3, 1)
    with torch.no_grad():
        a = net(x_t, t, cond)
        b = net(torch.cat([torch.randn(2, 16, 1, 4, 4, generator=g), x_t[:, :, 1:]], 2), t, cond)
        v = net.velocity(C.with_image(x_t, c), m * net.cond_t + (1 - m) * t.view(2, 1, 1, 1, 1),
                         m.expand(2, 1, 3, 4, 4), cond.prompt)
        noisy_image = net.velocity(x_t, m * 0.5 + (1 - m) * t.view(2, 1, 1, 1, 1), m.expand(2, 1, 3, 4, 4), cond.prompt)
    assert torch.equal(a[:, :, :1], c.expand(2, -1, -1, -1, -1)) and torch.equal(b, a)
    assert torch.allclose(a[:, :, 1:], x_t[:, :, 1:] - t.view(2, 1, 1, 1, 1) * v[:, :, 1:], atol=1e-6)
    assert (noisy_image - v)[:, :, 1:].abs().max() > 1e-3  # the generated frames do depend on the image's state
    assert C.generated_mask(x_t, 1).flatten().tolist() == [0.0, 1.0, 1.0]


def test_student_step_ignores_the_real_clips_conditioning_frame(pipe):
    """A DFD student step (p = 1: the teacher sees the real clip) with the real clip's first latent frame
    replaced by garbage gives the same loss, delta^2, teacher gap and gradients: that frame enters every network
    as the clean image latent, and the loss and the validity monitor cover the generated frames only."""
    g = torch.Generator().manual_seed(4)
    adapter = C.CosmosAdapter()
    net = pipe.transformer  # teacher, student and fake score alike
    x_real = torch.randn(2, 16, 3, 4, 4, generator=g)
    cond = C.CosmosCond(torch.randn(2, 512, tiny_cosmos.PROMPT_DIM, generator=g), x_real[:, :, :1].clone())
    neg = torch.randn(1, 512, tiny_cosmos.PROMPT_DIM, generator=g)
    c = dfd.DFDConfig(p=1.0, monitor_every=1)
    runs = []
    for first in (x_real[:, :, :1], 100 * torch.randn(2, 16, 1, 4, 4, generator=g)):
        batch = (torch.cat([first, x_real[:, :, 1:]], 2), cond, C.generated_mask(x_real, 1))
        net.zero_grad(set_to_none=True)
        net.requires_grad_(True)
        logs = dfd.student_step(adapter.denoiser(net, None, None), adapter.denoiser(net, 3.0, {"text": neg[0]}),
                                adapter.denoiser(net, None, None), tiny_wan.Deferred(), [batch], c, step=0)
        runs.append((logs, [q.grad.clone() for q in net.parameters()]))
        net.requires_grad_(False)
    (a, ga), (b, gb) = runs
    for k in ("loss_student", "delta2", "teacher_gap", "dm_normaliser"):
        assert a[k] == pytest.approx(b[k], rel=1e-6), k
    assert a["delta2"] > 0 and all(torch.allclose(x, y, atol=1e-7) for x, y in zip(ga, gb))


def test_prompt_embeddings_match_pipeline(pipe, tiny_dir):
    tokenizer, text_encoder = C.load_text_encoder(tiny_dir, dtype=torch.float32)
    prompts = ["a red ball rolls", "waves on a beach at night"]
    ours = C.encode_prompts(tokenizer, text_encoder, prompts)
    with torch.no_grad():
        ref, neg = pipe.encode_prompt(prompts, negative_prompt=None, device="cpu")
        ref_neg = pipe.encode_prompt(C.CosmosAdapter().pipeline_negative_prompt(), do_classifier_free_guidance=False, device="cpu")[0]
    assert ours.shape == (2, C.TEXT_LEN, tiny_cosmos.PROMPT_DIM)
    assert torch.equal(ours, ref)
    assert torch.equal(neg[:1], ref_neg)  # the pipeline's default negative prompt is ours
    assert (ours[0] - ours[1]).abs().max() > 0.1  # different prompts, different embeddings
    assert ours[0, -1].abs().max() > 0  # pad positions are not zero (no attention mask)


def test_pipeline_scheduler_fits_student_times():
    sched, err = C.pipeline_scheduler(dfd.STUDENT_TS)
    sched.set_timesteps(4)
    assert sched.config.shift == 5.0 and sched.config.num_train_timesteps == 16
    torch.testing.assert_close(sched.sigmas, torch.tensor([1.0, 0.9375, 2.5 / 3, 0.625, 0.0]))
    assert 0.0009 < err < 0.0011  # the paper's 0.999 vs the scheduler's 1.0
    exact = [1.0, 0.9375, 2.5 / 3, 0.625]
    assert C.pipeline_scheduler(exact)[1] < 1e-6


def test_export_takes_the_student_times_of_the_run(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step-000003"
    step.mkdir(parents=True)
    (step / "state.pt").write_bytes(b"")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-000003\n")
    (tmp_path / "run" / "args.json").write_text(json.dumps({"student_ts": [1.0, 0.5]}))
    assert dfd_video.export.trained_student_ts(str(tmp_path / "run")) == (1.0, 0.5)
    assert dfd_video.export.trained_student_ts(str(step)) == (1.0, 0.5)
    assert dfd_video.export.trained_student_ts(str(tmp_path / "dmd2.pt")) == dfd.STUDENT_TS  # not a run: the paper's


def test_every_dmd2_format_loads(tmp_path):
    """--dmd2-ckpt as a diffusers folder, a .safetensors, a FastGen-style .pt ({"generator", "critic"} with the
    original NVIDIA key names under `net.`) and a torch.distributed.checkpoint folder: identical weights."""
    import torch.distributed.checkpoint as dcp

    gen, critic = tiny_cosmos.tiny_transformer(5), tiny_cosmos.tiny_transformer(6)
    original = lambda net: {"net." + k: v for k, v in tiny_cosmos.to_original_keys(net.state_dict()).items()}
    paths = {"folder": str(tmp_path / "folder"), "safetensors": str(tmp_path / "g.safetensors"),
             "pt": str(tmp_path / "dmd2.pt"), "dcp": str(tmp_path / "dcp")}
    gen.save_pretrained(paths["folder"])
    save_file({k: v.contiguous() for k, v in gen.state_dict().items()}, paths["safetensors"])
    torch.save({"generator": original(gen), "critic": original(critic)}, paths["pt"])
    dcp.save({"model": {**{"net." + k: v for k, v in gen.state_dict().items()},
                        **{"fake_score." + k: v for k, v in critic.state_dict().items()}}},
             checkpoint_id=paths["dcp"], no_dist=True)
    adapter = C.CosmosAdapter()
    for fmt, path in paths.items():
        for role, ref in (("generator", gen), ("critic", critic)) if fmt in ("pt", "dcp") else (("generator", gen),):
            net = tiny_cosmos.tiny_transformer(7)
            dfd_video.weights.load_weights(net, dfd_video.weights.read_checkpoint(path, role), path, adapter.convert_state_dict)
            assert same_weights(net.state_dict(), ref.state_dict()), (fmt, role)
    # FastGen's FSDP checkpointer: one DCP folder per network, its CosmosPredict2 module's state dict (the original
    # NVIDIA names under `transformer.`, plus the RoPE buffers diffusers' converter drops)
    stem = str(tmp_path / "fastgen" / "0000040")
    for name, net in (("net", gen), ("fake_score", critic)):
        sd = {"transformer." + k: v.contiguous() for k, v in tiny_cosmos.to_original_keys(net.state_dict()).items()}
        dcp.save({**sd, "transformer.pos_embedder.seq": torch.arange(8.0)}, checkpoint_id=f"{stem}.{name}_model",
                 no_dist=True)
    torch.save({"scheduler": {}, "grad_scaler": {}, "callbacks": {}, "iteration": 40}, stem + ".pth")
    d = dfd_video.weights.describe_dmd2(stem + ".pth")
    assert d["format"] == "fastgen-fsdp" and not d["refusals"] and not d["warnings"]
    for role, ref in (("student", gen), ("fake_score", critic)):
        net, src = tiny_cosmos.tiny_transformer(7), d["networks"][role]
        dfd_video.weights.load_weights(net, dfd_video.weights.read_checkpoint(src["source"], src["role"]), "fastgen",
                                       adapter.convert_state_dict)
        assert same_weights(net.state_dict(), ref.state_dict()), role


# ---------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("cosmos_e2e")
    videos = root / "videos"
    tiny_wan.make_videos(str(videos), n=4, H=40, W=48, captions="txt", broken=1)
    (videos / "clip02.txt").write_text((videos / "clip00.txt").read_text())  # a repeated caption
    data = str(root / "data")
    C.main(["prepare", "--model-dir", tiny_dir, "--videos", str(videos), "--out", data, *SIZE,
            "--store-dtype", "fp32", "--device", "cpu"])
    online = str(root / "data_online")  # the same clips, captions only: train encodes them
    C.main(["prepare", "--model-dir", tiny_dir, "--videos", str(videos), "--out", online, *SIZE,
            "--store-dtype", "fp32", "--device", "cpu", "--text", "online"])
    gen, critic = C.CosmosAdapter().load_network(tiny_dir), tiny_cosmos.tiny_transformer(9)
    with torch.no_grad():  # a "DMD2 student": the teacher, perturbed
        for q in gen.parameters():
            q.add_(0.02 * torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())))
    dmd2 = str(root / "dmd2.pt")
    torch.save({"generator": gen.state_dict(), "critic": critic.state_dict()}, dmd2)
    image = str(root / "image.png")
    from PIL import Image
    Image.fromarray(tiny_wan.synthetic_frames(7, 1, 40, 48)[0]).save(image)
    return {"root": root, "model": tiny_dir, "videos": videos, "data": data, "online": online, "dmd2": dmd2,
            "image": image}


def train_args(s, out, steps, *more):
    return ["--model-dir", s["model"], "--data", s["data"], "--dmd2-ckpt", s["dmd2"], "--out", out, "--steps",
            str(steps), "--batch-size", "2", "--fake-updates", "1", "--save-every", "1", "--lr", "1e-4",
            "--lr-fake", "1e-4", "--monitor-every", "1", "--device", "cpu", *more]


def test_prepare_stores_image_latents_and_one_embedding_per_prompt(e2e):
    m = json.load(open(os.path.join(e2e["data"], "manifest.json")))
    assert m["count"] == 4 and m["adapter"] == "cosmos"
    assert m["shapes"] == {"latents": [16, 3, 4, 4], "image": [16, 1, 4, 4], "text_key": [8]}
    assert [os.path.basename(s["file"]) for s in m["skipped"]] == ["broken0.mp4"]
    data = dfd_video.data.LatentShards(e2e["data"], C.CosmosAdapter.data_keys)
    vae = wan_dfd.WanEncoders(e2e["model"], torch.device("cpu"), text=False).vae
    frames = dfd_video.video.read_video_frames(str(e2e["videos"] / "clip01.mp4"), FRAMES, 8, H, W)
    torch.testing.assert_close(data[1]["image"], vae.encode_video(frames[:1])["latents"], atol=1e-5, rtol=0)
    # the clip: a posterior sample seeded by its file name (prepare --vae-latent sample, the default); the image: the mode
    seed = dfd_video.prepare.video_seed(str(e2e["videos"] / "clip01.mp4"), str(e2e["videos"]))
    torch.testing.assert_close(data[1]["latents"], vae.encode_video(frames, seed)["latents"], atol=1e-5, rtol=0)
    mode = vae.encode_video(frames)["latents"]
    assert (data[1]["latents"] - mode).abs().max() > 1e-3
    # the causal VAE: the clip's first latent frame (as the mode) is the first frame's latent
    torch.testing.assert_close(mode[:, :1], data[1]["image"], atol=1e-5, rtol=0)
    assert m["vae_latent"] == "sample" and m["negative_prompt"] == FASTGEN_NEGATIVE_PROMPT
    prompts = os.path.join(e2e["data"], dfd_video.data.PROMPTS)
    assert len([f for f in os.listdir(prompts) if f.endswith(".safetensors")]) == 3  # 4 clips, 3 captions
    tok, te = C.load_text_encoder(e2e["model"], torch.float32)
    caption = (e2e["videos"] / "clip01.txt").read_text().strip()
    store = dfd_video.data.PromptStore(e2e["data"])
    torch.testing.assert_close(data[1]["text"], C.encode_prompts(tok, te, [caption])[0])
    keys = torch.stack([data.handles[0].get_slice("text_key")[i] for i in range(4)])  # as the shards store them
    assert torch.equal(keys[0], keys[2])  # same caption, same key
    # FastGen's Cosmos DMD2 config feeds the Wan loader's English negative prompt (prepare --negative-prompt "":
    # the pipeline's DEFAULT_NEGATIVE_PROMPT)
    torch.testing.assert_close(data.negative["text"], C.encode_prompts(tok, te, [FASTGEN_NEGATIVE_PROMPT])[0])
    # online encoding (prepare --text online stores the captions only) gives the cached embeddings
    online = dfd_video.data.PromptStore(e2e["data"])
    online.encoder = lambda captions: C.encode_prompts(tok, te, captions)
    torch.testing.assert_close(online.get(keys, "cpu"), store.get(keys, "cpu"))


def test_train_resume_sample_export(e2e):
    s, root = e2e, e2e["root"]
    run_a, run_b = str(root / "run_a"), str(root / "run_b")
    C.main(train_args(s, run_a, 2))  # no subcommand: train
    logs = [json.loads(line) for line in open(os.path.join(run_a, "metrics.jsonl"))]
    assert [r["step"] for r in logs] == [0, 1]
    assert all(np.isfinite(r[k]) for r in logs for k in ("loss_student", "loss_fake", "delta2", "teacher_gap"))
    assert json.load(open(os.path.join(run_a, "args.json")))["guidance"] == 3.0  # the paper's Cosmos CFG
    C.main(train_args(s, run_b, 1))  # stops after step 0 (as if killed after its checkpoint) ...
    C.main(train_args(s, run_b, 2, "--resume"))  # ... and continues
    for name in ("student", "fake"):
        a = load_file(os.path.join(run_a, "checkpoints", "step-000001", f"{name}.safetensors"))
        b = load_file(os.path.join(run_b, "checkpoints", "step-000001", f"{name}.safetensors"))
        assert same_weights(a, b), name
    student = load_file(os.path.join(run_a, "checkpoints", "step-000001", "student.safetensors"))
    first = load_file(os.path.join(run_a, "checkpoints", "step-000000", "student.safetensors"))
    assert not same_weights(student, first)  # training moved the weights

    # sample: the conditioning frame of every video is the encoded image
    prompts = root / "prompts.txt"
    prompts.write_text("a red ball rolls\nwaves on a beach\n")
    out = str(root / "samples")
    written = C.main(["sample", "--model-dir", s["model"], "--ckpt", run_a, "--prompts", str(prompts), "--images",
                      s["image"], "--seeds", "0", "1", "--out", out, "--save-latents", "--device", "cpu", *SIZE])
    assert sorted(os.path.basename(p) for p in written) == [f"prompt00{i}_seed{k}.mp4" for i in (0, 1) for k in (0, 1)]
    vae = wan_dfd.WanEncoders(s["model"], torch.device("cpu"), text=False).vae
    c = vae.encode_video(C.read_image(s["image"], H, W))["latents"]
    first = vae.decode(c[None])[0, 0]  # the image through the VAE: the first frame of every video
    for p in written:
        assert dfd_video.video.read_video_frames(p, FRAMES, 8, H, W).shape == (FRAMES, H, W, 3)  # playable, 9 frames
        x0 = load_file(p[:-4] + ".safetensors")["latents"]
        assert torch.equal(x0[:, :1], c)
        assert torch.equal(vae.decode(x0[None])[0, 0], first)  # the causal decoder: frame 0 sees latent 0 only
    x_a, x_b = (load_file(os.path.join(out, f"prompt000_seed{k}.safetensors"))["latents"] for k in (0, 1))
    assert (x_a - x_b)[:, 1:].abs().max() > 1e-3  # seeds differ
    # precomputed conditioning (--embeddings: "text" and "image") gives the same videos
    tok, te = C.load_text_encoder(s["model"], torch.float32)
    emb_file = str(root / "emb.safetensors")
    save_file({"text": C.encode_prompts(tok, te, ["a red ball rolls"]), "image": c[None]}, emb_file)
    again = C.main(["sample", "--model-dir", s["model"], "--ckpt", run_a, "--embeddings", emb_file, "--seeds", "1",
                    "--out", str(root / "samples_emb"), "--save-latents", "--device", "cpu", *SIZE])
    torch.testing.assert_close(load_file(again[0][:-4] + ".safetensors")["latents"], x_b, atol=1e-5, rtol=0)

    # export: loads back to the student, and the diffusers pipeline with the exported scheduler gives the
    # latents of dfd.sample(renoise=False) (every frame, the conditioning one included)
    exported = str(root / "exported")
    C.main(["export", "--model-dir", s["model"], "--ckpt", run_a, "--out", exported])
    adapter = C.CosmosAdapter()
    net = adapter.load_network(exported)
    assert same_weights(net.state_dict(), student)  # trained without EMA: the student itself
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(exported, "scheduler"))
    p = tiny_cosmos.load_pipeline(s["model"], transformer=net, scheduler=sched)
    emb = C.encode_prompts(tok, te, ["a red ball rolls"])
    pixels = C.read_image(s["image"], H, W).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # [1, 3, 1, H, W]
    via_pipe = p(video=pixels, prompt_embeds=emb, height=H, width=W, num_frames=FRAMES, num_inference_steps=4,
                 guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent",
                 num_latent_conditional_frames=1).frames
    sched.set_timesteps(4)
    noise = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = dfd.sample(C.CosmosDenoiser(net, cond_t=C.COND_T), noise, C.CosmosCond(emb, c[None]),
                          sched.sigmas[:-1].tolist(), renoise=False)
    assert (ours - via_pipe).abs().max() < 1e-4 * via_pipe.abs().max()
    # `sample --sampler ode` at the scheduler's times is that same computation
    ode = C.main(["sample", "--model-dir", s["model"], "--ckpt", exported, "--embeddings", emb_file, "--seeds", "0",
                  "--sampler", "ode", "--student-ts", *map(str, sched.sigmas[:-1].tolist()),
                  "--out", str(root / "samples_ode"), "--save-latents", "--device", "cpu", *SIZE])
    x_ode = load_file(ode[0][:-4] + ".safetensors")["latents"]
    assert (x_ode[None] - via_pipe).abs().max() < 1e-4 * via_pipe.abs().max()
    assert (via_pipe[:, :, :1] - c).abs().max() < 1e-4  # the pipeline keeps the image on this path
    # ... and not with fresh noise between steps (dfd.sample's default): the first frame is lost
    p.scheduler = FlowMatchEulerDiscreteScheduler.from_config(sched.config, stochastic_sampling=True)
    torch.manual_seed(0)
    renoised = p(video=pixels, prompt_embeds=emb, height=H, width=W, num_frames=FRAMES, num_inference_steps=4,
                 guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent",
                 num_latent_conditional_frames=1).frames
    assert (renoised[:, :, :1] - c).abs().mean() > 0.5 * (renoised[:, :, :1]).abs().mean()


def test_lora_trains_on_the_critic_and_exports(e2e):
    """--lora-rank on Cosmos, whose DMD2 checkpoint here has a critic: the fake score is the critic's frozen weights
    plus its own LoRA (not the teacher's); the run trains adapters only, and export --lora writes a LoRA that the
    pipeline's loader puts on the DMD2 student to give the merged export's output."""
    import dfd_video.lora as lora
    from diffusers import Cosmos2_5_PredictBasePipeline
    s, root = e2e, e2e["root"]
    run = str(root / "run_lora")
    C.main(train_args(s, run, 2, "--lora-rank", "2", "--lora-alpha", "4", "--lr", "1e-3", "--lr-fake", "1e-3"))
    ck = os.path.join(run, "checkpoints", "step-000001")
    state = torch.load(os.path.join(ck, "state.pt"), weights_only=False)
    assert state["lora"]["fake_base"] == "critic" and state["lora"]["rank"] == 2
    for name in ("student", "fake"):
        w = load_file(os.path.join(ck, f"{name}.safetensors"))
        assert len(w) == 2 * 2 * 10 and all(lora.is_lora_param(k) for k in w)
    exp = str(root / "export_lora")
    C.main(["export", "--model-dir", s["model"], "--ckpt", run, "--out", exp, "--lora"])
    merged, base = C.CosmosAdapter().load_network(exp), C.CosmosAdapter().load_network(s["model"])
    dfd_video.weights.load_weights(base, dfd_video.weights.read_checkpoint(s["dmd2"], "generator"), "dmd2")
    sd, meta = Cosmos2_5_PredictBasePipeline.lora_state_dict(os.path.join(exp, "lora"), return_lora_metadata=True)
    Cosmos2_5_PredictBasePipeline.load_lora_into_transformer(sd, base, metadata=meta)
    data = dfd_video.data.LatentShards(s["data"], C.CosmosAdapter.data_keys)
    x, t = data[0]["latents"][None], torch.tensor([0.6])
    cond = C.CosmosCond(torch.randn(1, 512, tiny_cosmos.PROMPT_DIM, generator=torch.Generator().manual_seed(0)),
                        data[0]["image"][None])
    with torch.no_grad():
        got, want = C.CosmosAdapter().denoiser(base, None, None)(x, t, cond), C.CosmosAdapter().denoiser(merged, None, None)(x, t, cond)
        base.disable_adapters()
        plain = C.CosmosAdapter().denoiser(base, None, None)(x, t, cond)
    assert (want - plain).abs().max() > 1e-4  # the adapter trained
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_online_text_encoding_trains_like_the_cache(e2e):
    """prepare --text online stores captions only; train encodes them (with the text encoder, sharded under
    torchrun) and takes exactly the steps it takes from the per-prompt cache."""
    s, root, online = e2e, e2e["root"], e2e["online"]
    names = os.listdir(os.path.join(online, dfd_video.data.PROMPTS))
    assert len(names) == 3 and all(n.endswith(".txt") for n in names)
    logs = {}
    for name, data in (("cache", s["data"]), ("online", online)):
        argv = train_args(s, str(root / f"run_{name}"), 1)
        argv[argv.index("--data") + 1] = data
        C.main(argv)
        logs[name] = json.loads(open(os.path.join(root, f"run_{name}", "metrics.jsonl")).readline())
    for k in ("loss_student", "loss_fake", "delta2", "grad_norm_student", "teacher_gap"):
        assert logs["online"][k] == pytest.approx(logs["cache"][k], rel=1e-5), k


# ---------------------------------------------------------------------------------------------------
# Bad inputs: one clear line each


def fails(argv, match):
    with pytest.raises(SystemExit, match=match):
        C.main(argv)


def test_bad_inputs(e2e, tmp_path):
    s = e2e
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    sample = ["sample", "--model-dir", s["model"], "--ckpt", s["dmd2"], "--prompts", str(prompts), "--out",
              str(tmp_path / "o"), "--device", "cpu", *SIZE]
    from PIL import Image
    small = str(tmp_path / "small.png")
    Image.fromarray(np.zeros((16, 40, 3), np.uint8)).save(small)
    fails([*sample, "--images", small], r"small.png: image is 40x16, smaller than the video 32x32")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    fails([*sample, "--images", str(broken)], r"broken.jpg: unreadable image")
    fails(sample, r"missing conditioning frame: give --images")
    fails([*sample, "--images", s["image"], s["image"]], r"--images: 2 images for 1 prompts")
    fails([*sample, "--images", s["image"], "--num-frames", "1"], r"--num-frames 1: the first latent frame is the image")
    emb = str(tmp_path / "emb.safetensors")
    save_file({"text": torch.zeros(1, 512, tiny_cosmos.PROMPT_DIM)}, emb)
    with_emb = [a if a != str(prompts) else emb for a in sample]
    with_emb[with_emb.index("--prompts")] = "--embeddings"
    fails(with_emb, r"missing conditioning frame")
    save_file({"text": torch.zeros(1, 512, tiny_cosmos.PROMPT_DIM), "image": torch.zeros(1, 16, 1, 8, 8)}, emb)
    fails(with_emb, r"conditioning image latents have shape \(1, 16, 1, 8, 8\); need \[1, 16, 1, 4, 4\]")
    # shards without an image latent (e.g. prepared for Wan)
    wan_data = tmp_path / "wan_data"
    w = dfd_video.data.ShardWriter(str(wan_data))
    w.add({"latents": torch.zeros(16, 3, 4, 4), "text": torch.zeros(512, tiny_cosmos.PROMPT_DIM)})
    w.close({"adapter": "wan"}, {"text": torch.zeros(512, tiny_cosmos.PROMPT_DIM)})
    train = train_args(s, str(tmp_path / "run"), 1)
    train[train.index("--data") + 1] = str(wan_data)
    fails(train, r"manifest has no image, text_key")
    fails(train_args(s, str(tmp_path / "run"), 1, "--p", "1.5"), r"--p 1.5: must be in \[0, 1\]")


# ---------------------------------------------------------------------------------------------------
# Distributed: torchrun on 2 CPU ranks against one process emulating them


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(e2e, tmp_path):
    """`torchrun --nproc_per_node=2 cosmos_dfd.py ...` (gloo, FSDP2, bare launch line = train) on the online-text
    data (the text encoder sharded over both ranks) ends with the weights of one process that runs each rank's
    share on the cached embeddings and averages the gradients."""
    steps, lr = 2, 1e-4
    out = str(tmp_path / "run")
    argv = [*train_args(e2e, out, steps), "--grad-clip", "0", "--save-every", "0", "--monitor-every", "0"]
    online = [e2e["online"] if a == e2e["data"] else a for a in argv]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "cosmos_dfd.py"), *online], env=tiny_wan.quiet_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = os.path.join(out, "checkpoints", f"step-{steps - 1:06d}")
    assert torch.load(os.path.join(ck, "state.pt"), weights_only=True)["world"] == 2
    parser = __import__("argparse").ArgumentParser()
    dfd_video.cli.add_train_args(parser, C.CosmosAdapter())
    args = parser.parse_args(argv)
    student_ref, fake_ref, logs_ref = tiny_wan.emulate_ranks(C.CosmosAdapter(), args, steps)
    start = torch.load(e2e["dmd2"], weights_only=True)["generator"]
    assert max((student_ref[k] - start[k]).abs().max().item() for k in start) > lr  # the weights moved
    for name, ref in (("student", student_ref), ("fake", fake_ref)):
        got = load_file(os.path.join(ck, f"{name}.safetensors"))
        # Adam steps are ~lr: agreement to 0.1% of one step, beyond the few ulps a weight of size |w| carries in fp32
        # (an element near 8 rounds in steps of 2^-20 ~ 1e-6, so summing in another order can move it by that)
        worst = max(((got[k] - ref[k]).abs() - 4 * torch.finfo(torch.float32).eps * ref[k].abs()).max().item()
                    for k in ref)
        assert worst < 1e-3 * lr, (name, worst)
    logs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    for a, b in zip(logs, logs_ref, strict=True):
        assert a["dfd"] == b["dfd"]
        assert abs(a["loss_student"] - b["loss_student"]) <= 1e-5 * max(1.0, abs(b["loss_student"]))
        assert abs(a["delta2"] - b["delta2"]) <= 1e-5 * b["delta2"]


# ---------------------------------------------------------------------------------------------------
# Real weights (opt-in: pytest -m gpu with DFD_COSMOS_DIR set to the diffusers/base/post-trained folder)


@pytest.mark.gpu
def test_real_teacher_matches_pipeline():
    """The adapter on the real 2B model in bf16 on a GPU reproduces two steps of the pipeline (480x832, 9 frames)."""
    folder = os.environ.get("DFD_COSMOS_DIR")
    if not folder or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and DFD_COSMOS_DIR (Cosmos-Predict2.5-2B, branch diffusers/base/post-trained)")
    from diffusers import UniPCMultistepScheduler

    net = C.CosmosAdapter().load_network(folder).to("cuda", torch.bfloat16)
    p = tiny_cosmos.load_pipeline(folder, transformer=net, torch_dtype=torch.bfloat16).to("cuda")
    with torch.no_grad():
        emb, neg = p.encode_prompt("a robot arm welds a metal frame", device="cuda")
    image = torch.rand(1, 3, 1, 480, 832, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = p(video=image.cuda(), prompt_embeds=emb, negative_prompt_embeds=neg, height=480, width=832, num_frames=9,
            num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="latent",
            num_latent_conditional_frames=1).frames.float()
    c = encode_image(p.vae, image.cuda())  # in the pipeline's VAE dtype, as it encodes
    teacher = C.CosmosDenoiser(net, 3.0, neg, torch.bfloat16, C.COND_T)  # the pipeline's conditioning-frame time
    sched = UniPCMultistepScheduler.from_config(p.scheduler.config)
    sched.set_timesteps(2, device="cuda")
    x = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        for i, timestep in enumerate(sched.timesteps):
            t = sched.sigmas[i].expand(1).cuda()
            x = sched.step(dfd.v_from_x0(x, teacher(x, t, C.CosmosCond(emb, c)), t), timestep, x).prev_sample
    assert (x[:, :, 1:] - out[:, :, 1:]).abs().mean() < 2e-2 * out[:, :, 1:].abs().mean()  # bf16


@pytest.mark.slow
def test_torchrun_two_rank_prepare_holds_the_same_samples(e2e, tmp_path):
    """prepare under torchrun: each rank encodes every other clip into its own shards and both write into the
    shared prompts/ folder; the samples, keys and cached embeddings equal the single-process prepare's."""
    out = str(tmp_path / "two")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "cosmos_dfd.py"), "prepare", "--model-dir", e2e["model"], "--videos",
                        str(e2e["videos"]), "--out", out, *SIZE, "--store-dtype", "fp32", "--device", "cpu"],
                       env=tiny_wan.quiet_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = C.CosmosAdapter.data_keys
    one, two = dfd_video.data.LatentShards(e2e["data"], keys), dfd_video.data.LatentShards(out, keys)
    assert len(one) == len(two) == 4
    by_latents = lambda d: sorted((d[i] for i in range(len(d))), key=lambda it: it["latents"].sum().item())
    for a, b in zip(by_latents(one), by_latents(two), strict=True):
        assert a.keys() == b.keys() == {"latents", "image", "text"}  # the caption key looked up in prompts/
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert sorted(os.listdir(os.path.join(out, dfd_video.data.PROMPTS))) == sorted(os.listdir(os.path.join(e2e["data"], dfd_video.data.PROMPTS)))
    for name in os.listdir(os.path.join(out, dfd_video.data.PROMPTS)):
        if name.endswith(".safetensors"):
            torch.testing.assert_close(load_file(os.path.join(out, dfd_video.data.PROMPTS, name))["text"],
                                       load_file(os.path.join(e2e["data"], dfd_video.data.PROMPTS, name))["text"])


def test_export_takes_the_student_times_of_the_segment_an_iteration_checkpoint_ends(tmp_path):
    """A run counted in FastGen iterations (the default) names its checkpoints iteration-NNNNNNN: export reads the
    student times of the segment that trained it, not the last segment's."""
    run = tmp_path / "run"
    for name in ("iteration-0000010", "iteration-0000020"):
        (run / "checkpoints" / name).mkdir(parents=True)
        (run / "checkpoints" / name / "state.pt").write_bytes(b"")
    (run / "args.json").write_text(json.dumps({"student_ts": [1.0, 0.5]}))
    (run / "segments.jsonl").write_text("".join(json.dumps({"start_step": s, "args": {"student_ts": ts}}) + "\n"
                                                for s, ts in ((0, [1.0, 0.5]), (2, [1.0, 0.25]))))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "iteration": 5 * (s + 1)}) + "\n"
                                               for s in range(4)))
    assert dfd_video.export.trained_student_ts(str(run / "checkpoints" / "iteration-0000010")) == (1.0, 0.5)
    assert dfd_video.export.trained_student_ts(str(run / "checkpoints" / "iteration-0000020")) == (1.0, 0.25)
