"""Real widths (slow, CPU): the public Wan2.1-T2V-1.3B and Cosmos-Predict2.5-2B transformer configs (dfd_video/configs/,
each with its source) cut to one block, random init, through the commands users run: one DFD training step under
FSDP2 with bf16 mixed precision (the fp32 islands included), then one `sample` from its checkpoint at a small latent
size. The tiny test models do not exercise the real head dims (128), RoPE tables (Wan: 1024 positions x 64
complex pairs; Cosmos: 3-D, rope_scale 1/3/3), text widths (UMT5 4096 x 512 tokens; Qwen2.5-VL 28-layer concat
100352 x 512 projected to 1024) or the 4x / 8960 MLPs. The VAE is the tests' tiny one: only the transformer is
under test here.

    python -m pytest -m slow tests/test_real_width.py --durations=0 -s   # ~8 min on 2 cores; peak 3.2 GB (Wan), 8.2 GB (Cosmos)
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import tiny_wan
import dfd_video.data

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "dfd_video", "configs")
WAN_CONFIG = os.path.join(CONFIGS, "wan2.1_t2v_1.3b_transformer.json")
COSMOS_CONFIG = os.path.join(CONFIGS, "cosmos_predict2.5_2b_transformer.json")
LATENT = (16, 2, 4, 4)  # [C, T, h, w]: 5 frames at 32 x 32 pixels
SIZE = ["--num-frames", "5", "--height", "32", "--width", "32", "--fps", "8"]


def real_transformer(path: str, seed: int, layers: int = 1):
    from diffusers import CosmosTransformer3DModel, WanTransformer3DModel
    cfg = json.load(open(path))
    cls = {"WanTransformer3DModel": WanTransformer3DModel, "CosmosTransformer3DModel": CosmosTransformer3DModel}[cfg["_class_name"]]
    torch.manual_seed(seed)
    return cls.from_config({**cfg, "num_layers": layers})


def model_dir(root, net) -> str:
    """transformer/ at real width and the tests' tiny Wan 2.1 VAE (16 latent channels, 4x time, 8x space)."""
    from diffusers import AutoencoderKLWan
    net.save_pretrained(os.path.join(root, "transformer"), safe_serialization=True)
    torch.manual_seed(0)
    AutoencoderKLWan(**tiny_wan.VAE).save_pretrained(os.path.join(root, "vae"))
    return str(root)


def run(script: str, argv: list[str]) -> float:
    t0 = time.perf_counter()
    env = {**tiny_wan.quiet_env(), "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    return time.perf_counter() - t0


def check_run(run_dir: str, start: dict, mem_gb: float) -> dict:
    logs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert len(logs) == 1 and all(torch.isfinite(torch.tensor(logs[0][k])) for k in ("loss_student", "loss_fake"))
    got = load_file(os.path.join(run_dir, "checkpoints", "step-000000", "student.safetensors"))
    assert got.keys() == start.keys()
    assert max((got[k] - start[k]).abs().max().item() for k in got) > 1e-7  # one AdamW step moved the student
    assert logs[0]["peak_mem_gb"] < mem_gb, logs[0]["peak_mem_gb"]
    return logs[0]


def check_sample(out: str) -> None:
    lat = load_file(os.path.join(out, "prompt000_seed0.safetensors"))["latents"]
    assert tuple(lat.shape) == LATENT and torch.isfinite(lat).all() and lat.std() > 0.01
    assert os.path.getsize(os.path.join(out, "prompt000_seed0.mp4")) > 0


def test_wan_real_width_step_and_sample(tmp_path):
    teacher = real_transformer(WAN_CONFIG, 0)
    cfg = teacher.config
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.ffn_dim, cfg.text_dim) == (12, 128, 8960, 4096)
    assert tuple(teacher.rope.freqs_cos.shape) == (1024, 128)  # RoPE over 1024 positions, the full head dim
    md = model_dir(tmp_path / "model", teacher)
    del teacher
    student = real_transformer(WAN_CONFIG, 1).state_dict()
    torch.save({"generator": student, "critic": real_transformer(WAN_CONFIG, 2).state_dict()}, tmp_path / "dmd2.pt")
    g = torch.Generator().manual_seed(0)
    w = dfd_video.data.ShardWriter(str(tmp_path / "data"))
    text = lambda n: torch.cat([torch.randn(n, 4096, generator=g), torch.zeros(512 - n, 4096)])  # UMT5, 0-padded
    for n in (7, 12):
        w.add({"latents": torch.randn(*LATENT, generator=g), "text": text(n)})
    w.close({"adapter": "wan"}, {"text": text(2)})
    run_dir = str(tmp_path / "run")
    train_s = run("wan_dfd.py", ["train", "--model-dir", md, "--data", str(tmp_path / "data"), "--dmd2-ckpt",
                                 str(tmp_path / "dmd2.pt"), "--out", run_dir, "--steps", "1", "--batch-size", "1",
                                 "--fake-updates", "1", "--device", "cpu", "--dtype", "bf16"])
    log = check_run(run_dir, student, mem_gb=5.0)
    from safetensors.torch import save_file
    save_file({"text": text(9)[None].contiguous()}, str(tmp_path / "emb.safetensors"))
    out = str(tmp_path / "samples")
    sample_s = run("wan_dfd.py", ["sample", "--ckpt", run_dir, "--model-dir", md, "--embeddings",
                                  str(tmp_path / "emb.safetensors"), "--seeds", "0", "--out", out, "--save-latents",
                                  "--device", "cpu", "--dtype", "bf16", *SIZE])
    check_sample(out)
    print(f"\nWan real width, 1 block: train step {train_s:.0f} s (peak {log['peak_mem_gb']:.1f} GB), "
          f"sample {sample_s:.0f} s")


def test_cosmos_real_width_step_and_sample(tmp_path):
    import cosmos_dfd as C
    teacher = real_transformer(COSMOS_CONFIG, 0)
    cfg = teacher.config
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.crossattn_proj_in_channels,
            cfg.encoder_hidden_states_channels, cfg.in_channels) == (16, 128, 100352, 1024, 17)
    md = model_dir(tmp_path / "model", teacher)
    del teacher
    student = real_transformer(COSMOS_CONFIG, 1).state_dict()
    torch.save({"generator": student}, tmp_path / "dmd2.pt")  # no critic: the fake score starts from the teacher
    g = torch.Generator().manual_seed(0)
    data = str(tmp_path / "data")
    store = dfd_video.data.PromptStore(data)
    qwen = lambda: torch.randn(512, 100352, generator=g).bfloat16()  # the 28-layer concat, stored bf16 as prepare does
    key = store.put("a robot arm picks up a cube", qwen())
    w = dfd_video.data.ShardWriter(data)
    for _ in range(2):
        x = torch.randn(*LATENT, generator=g)
        w.add({"latents": x, "image": x[:, :1].clone(), "text_key": key})
    w.close({"adapter": "cosmos"}, {"text": qwen()})
    run_dir = str(tmp_path / "run")
    train_s = run("cosmos_dfd.py", ["train", "--model-dir", md, "--data", data, "--dmd2-ckpt", str(tmp_path / "dmd2.pt"),
                                    "--out", run_dir, "--steps", "1", "--batch-size", "1", "--fake-updates", "1",
                                    "--device", "cpu", "--dtype", "bf16"])
    log = check_run(run_dir, student, mem_gb=10.0)
    del student
    from safetensors.torch import save_file
    x = torch.randn(1, *LATENT, generator=g)
    save_file({"text": qwen()[None].contiguous(), "image": x[:, :, :1].contiguous()}, str(tmp_path / "emb.safetensors"))
    out = str(tmp_path / "samples")
    sample_s = run("cosmos_dfd.py", ["sample", "--ckpt", run_dir, "--model-dir", md, "--embeddings",
                                     str(tmp_path / "emb.safetensors"), "--seeds", "0", "--out", out, "--save-latents",
                                     "--device", "cpu", "--dtype", "bf16", *SIZE])
    check_sample(out)
    print(f"\nCosmos real width, 1 block: train step {train_s:.0f} s (peak {log['peak_mem_gb']:.1f} GB), "
          f"sample {sample_s:.0f} s")
