"""Opt-in runs on the real Wan2.1-T2V-1.3B: `DFD_WAN_DIR=/path/to/Wan2.1-T2V-1.3B-Diffusers pytest -m gpu`.
Optional DFD_WAN_DMD2=<any --dmd2-ckpt format> (default: the base transformer stands in for the DMD2 student).
Skipped without CUDA or without the weights."""
import json
import os
import subprocess
import sys

import pytest
import torch

import tiny_wan
import dfd_video.data
import dfd_video.distributed
import wan_dfd
from dfd_video.spec import FASTGEN_NEGATIVE_PROMPT

WAN = os.environ.get("DFD_WAN_DIR")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not WAN, reason="set DFD_WAN_DIR to a local Wan2.1-T2V-1.3B-Diffusers folder")]
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "wan_dfd.py")
PROMPTS = ["A fox steps cautiously into a snowy clearing at dusk.", "A barista pulls an espresso shot."]


def test_real_teacher_matches_pipeline():
    """bf16 on GPU: the guided teacher adapter stepping the pipeline's UniPC gives the pipeline's latents."""
    import dfd
    from diffusers import UniPCMultistepScheduler, WanPipeline
    adapter = wan_dfd.WanAdapter()
    net = dfd_video.distributed.cast_keeping_fp32(adapter.load_network(WAN), torch.bfloat16).to("cuda")  # as diffusers loads bf16
    pipe = WanPipeline.from_pretrained(WAN, transformer=net, torch_dtype=torch.bfloat16).to("cuda")
    lat = torch.randn(1, 16, 5, 30, 52, generator=torch.Generator().manual_seed(0)).cuda()
    out = pipe(prompt=PROMPTS[0], height=240, width=416, num_frames=17, num_inference_steps=4, latents=lat.clone(),
               output_type="latent").frames
    enc = wan_dfd.WanEncoders(WAN, torch.device("cuda"), torch.bfloat16, vae=False)
    negative = {"text": enc.encode_text([FASTGEN_NEGATIVE_PROMPT])["text"][0]}
    teacher = adapter.denoiser(net, 5.0, negative, torch.bfloat16)
    sch = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    sch.set_timesteps(4, device="cuda")
    x, cond = lat.clone(), enc.encode_text(PROMPTS[:1])["text"]
    with torch.no_grad():
        for t in sch.timesteps:
            tt = (t / 1000).float().expand(1)
            x = sch.step(dfd.v_from_x0(x, teacher(x, tt, cond), tt), t, x).prev_sample
    assert (x - out).abs().mean() < 2e-2 * out.abs().mean()


def test_real_train_and_sample(tmp_path):
    enc = wan_dfd.WanEncoders(WAN, torch.device("cuda"), torch.bfloat16, vae=False)
    text = enc.encode_text(PROMPTS)["text"]
    negative = {"text": enc.encode_text([FASTGEN_NEGATIVE_PROMPT])["text"][0]}
    w = dfd_video.data.ShardWriter(str(tmp_path / "data"))
    g = torch.Generator().manual_seed(0)
    for i in range(2):  # random latents: this checks the plumbing and memory, not the learning
        w.add({"latents": torch.randn(16, 21, 60, 104, generator=g).bfloat16(), "text": text[i].cpu().bfloat16()})
    w.close({"adapter": "wan"}, {k: v.cpu().bfloat16() for k, v in negative.items()})
    del enc
    torch.cuda.empty_cache()
    out = str(tmp_path / "run")
    args = ["train", "--model-dir", WAN, "--data", str(tmp_path / "data"), "--dmd2-ckpt",
            os.environ.get("DFD_WAN_DMD2", os.path.join(WAN, "transformer")), "--out", out, "--steps", "2",
            "--batch-size", "1", "--fake-updates", "1", "--save-every", "2"]
    r = subprocess.run([sys.executable, SCRIPT, *args], env=tiny_wan.quiet_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(x["loss_student"])) for x in logs)
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    r = subprocess.run([sys.executable, SCRIPT, "sample", "--model-dir", WAN, "--ckpt", out, "--prompts",
                        str(tmp_path / "p.txt"), "--out", str(tmp_path / "s")], env=tiny_wan.quiet_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    import av
    with av.open(str(tmp_path / "s" / "prompt000_seed0.mp4")) as box:
        frames = [f for f in box.decode(video=0)]
    assert len(frames) == 81 and (frames[0].width, frames[0].height) == (832, 480)
