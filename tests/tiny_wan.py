"""Tiny random Wan2.1 models and data in the real on-disk layouts, for the CPU tests of wan_dfd.py.

build_pipeline(dir)        a diffusers WanPipeline folder (transformer/, vae/, text_encoder/, tokenizer/,
                           scheduler/, model_index.json) with a 2-layer transformer, a 4x-time / 8x-space VAE,
                           a 1-layer UMT5 and a WordLevel tokenizer, loadable with HF_HUB_OFFLINE=1.
make_videos(dir, ...)      synthetic mp4s with captions (sidecar .txt, or a CSV / JSONL manifest).
to_original_keys(sd)       a diffusers transformer state dict renamed to the original Wan key names
                           (the inverse of diffusers' convert_wan_transformer_to_diffusers).
write_dmd2_checkpoints     one DMD2 checkpoint in every format --dmd2-ckpt accepts.
random_data(dir)           a prepared data folder of random latents [16, 3, 4, 6] and text embeddings [512, 32].
kill_at_first_checkpoint   runs a command and SIGKILLs it once its first training checkpoint exists.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import torch

TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                   out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
WORDS = ("a red ball rolls left right blue square moves up down green circle grows shrinks over the "
         "slowly quickly on white black background cat dog jumps").split()


def tiny_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TRANSFORMER)
    with torch.no_grad():  # diffusers zero-inits nothing here, but make the output layer non-trivial anyway
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4,
                     relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    return UMT5EncoderModel(cfg).eval()


def build_pipeline(path: str, seed: int = 0) -> str:
    """Saves a tiny WanPipeline at `path` (the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(**VAE).eval()
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                    num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_text_encoder(seed + 2), vae=vae,
                       scheduler=sched, transformer=tiny_transformer(seed))
    pipe.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------
# Videos


def write_video(path: str, frames: np.ndarray, fps: int) -> None:
    """frames: uint8 [T, H, W, 3] -> mp4 (the project's own writer)."""
    import dfd_video.video
    dfd_video.video.write_mp4(path, frames, fps)


def synthetic_frames(i: int, T: int, H: int, W: int) -> np.ndarray:
    """A coloured square moving across a gradient; different for every i."""
    rng = np.random.default_rng(i)
    base = np.linspace(0, 255, W, dtype=np.float32)[None, None, :, None] * rng.uniform(0.2, 1, 3)
    frames = np.broadcast_to(base, (T, H, W, 3)).copy()
    col = rng.integers(0, 256, 3)
    for t in range(T):
        x = (i * 7 + 3 * t) % max(W - 8, 1)
        frames[t, H // 4:H // 4 + 8, x:x + 8] = col
    return frames.astype(np.uint8)


def make_videos(path: str, n: int = 4, T: int = 12, H: int = 40, W: int = 56, fps: int = 8,
                captions: str = "txt", broken: int = 0) -> list[str]:
    """n synthetic mp4s (plus `broken` unreadable ones) with captions as sidecar .txt, or a
    captions.csv / captions.jsonl manifest. Returns the captions in file order."""
    os.makedirs(path, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"clip{i:02d}.mp4"
        write_video(os.path.join(path, name), synthetic_frames(i, T, H, W), fps)
        rows.append((name, " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4))))
    for i in range(broken):
        name = f"broken{i}.mp4"
        with open(os.path.join(path, name), "wb") as f:
            f.write(b"this is not a video")
        rows.append((name, "broken clip"))
    if captions == "txt":
        for name, cap in rows:
            with open(os.path.join(path, name[:-4] + ".txt"), "w") as f:
                f.write(cap + "\n")
    elif captions == "csv":
        with open(os.path.join(path, "captions.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["video", "caption"])
            w.writerows(rows)
    elif captions == "jsonl":
        with open(os.path.join(path, "captions.jsonl"), "w") as f:
            for name, cap in rows:
                f.write(json.dumps({"video": name, "caption": cap}) + "\n")
    return [cap for _, cap in rows]


# ---------------------------------------------------------------------------------------------------
# DMD2 checkpoints in every accepted format

_TO_ORIGINAL = [  # diffusers name -> original Wan name, applied in this order
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn2", "cross_attn"), ("attn1", "self_attn"),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("norm2", "norm__swap"), ("norm3", "norm2"), ("norm__swap", "norm3"),
]


def to_original_keys(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k == "scale_shift_table":
            k = "head.modulation"
        elif k.startswith("proj_out."):
            k = "head.head." + k[len("proj_out."):]
        elif k.endswith(".scale_shift_table"):
            k = k[: -len("scale_shift_table")] + "modulation"
        for a, b in _TO_ORIGINAL:
            k = k.replace(a, b)
        out[k] = v.clone()
    return out


def write_dmd2_checkpoints(path: str, generator: torch.nn.Module, critic: torch.nn.Module,
                           generator_ema: torch.nn.Module | None = None) -> dict[str, str]:
    """Writes the same generator (and critic) as: a diffusers folder, a .safetensors file, a Self-Forcing
    style .pt (original keys under FSDP / DDP prefixes), and a torch.distributed.checkpoint folder
    (FastGen style: {"model": {"net.*", "fake_score.*"}, "optimizer": ...}). Returns {format: path}."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    g = {k: v.detach().clone().contiguous() for k, v in generator.state_dict().items()}
    c = {k: v.detach().clone().contiguous() for k, v in critic.state_dict().items()}
    ge = g if generator_ema is None else {k: v.detach().clone() for k, v in generator_ema.state_dict().items()}
    out = {}
    out["folder"] = os.path.join(path, "dmd2_diffusers")
    generator.save_pretrained(out["folder"])
    out["safetensors"] = os.path.join(path, "dmd2.safetensors")
    save_file(g, out["safetensors"])
    out["pt"] = os.path.join(path, "dmd2.pt")
    wrap = lambda sd, pre: {pre + k: v for k, v in to_original_keys(sd).items()}
    torch.save({"generator": wrap(g, "model._fsdp_wrapped_module."),
                "generator_ema": wrap(ge, "module."),
                "critic": wrap(c, "model._fsdp_wrapped_module.")}, out["pt"])
    out["dcp"] = os.path.join(path, "dmd2_dcp")
    state = {"model": {**{"net." + k: v for k, v in g.items()}, **{"fake_score." + k: v for k, v in c.items()}},
             "optimizer": {"state": {"net." + k: {"exp_avg": torch.zeros_like(v)} for k, v in list(g.items())[:3]}},
             "iteration": torch.tensor(25000)}
    dcp.save(state, checkpoint_id=out["dcp"], no_dist=True)
    return out


def write_fastgen_fsdp(folder: str, iteration: int, nets: dict[str, torch.nn.Module], prefix: str = "transformer.") -> str:
    """A FastGen FSDPCheckpointer checkpoint (fastgen/utils/checkpointer.py): per network one DCP folder
    <iteration:07d>.<name>_model/ of the FastGen module's state dict (the diffusers transformer under `transformer.`),
    an optimizer folder for the student, and <iteration>.pth holding the scheduler state only. nets: e.g.
    {"net": ..., "fake_score": ..., "ema": ...}. Returns the prefix <folder>/<iteration:07d>."""
    import torch.distributed.checkpoint as dcp
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"{iteration:07d}")
    for name, net in nets.items():
        sd = {prefix + k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
        dcp.save(sd, checkpoint_id=f"{stem}.{name}_model", no_dist=True)
    first = next(iter(nets.values())).state_dict()
    dcp.save({"state": {f"{prefix}{k}.exp_avg": torch.zeros_like(v) for k, v in list(first.items())[:2]}},
             checkpoint_id=f"{stem}.net_optim", no_dist=True)
    torch.save({"scheduler": {n: {"last_epoch": iteration, "base_lrs": [1e-5]} for n in nets if n in ("net", "fake_score")},
                "grad_scaler": {}, "callbacks": {}, "iteration": iteration}, f"{stem}.pth")
    return stem


_CACHE: dict[str, str] = {}


def cached_pipeline() -> str:
    """One tiny pipeline folder per test session (built on first use, removed at exit)."""
    if "pipe" not in _CACHE:
        import atexit
        import shutil
        import tempfile
        root = tempfile.mkdtemp(prefix="tiny_wan_")
        atexit.register(shutil.rmtree, root, True)
        _CACHE["pipe"] = build_pipeline(os.path.join(root, "wan"))
    return _CACHE["pipe"]


def random_data(folder, n: int = 4, seed: int = 0) -> None:
    """A prepared Wan data folder (3 samples per shard) of n random latents and text embeddings, and the negative."""
    import dfd_video.data
    g = torch.Generator().manual_seed(seed)
    w = dfd_video.data.ShardWriter(str(folder), per_shard=3)
    for _ in range(n):
        w.add({"latents": torch.randn(16, 3, 4, 6, generator=g), "text": torch.randn(512, 32, generator=g)})
    w.close({"adapter": "wan"}, {"text": torch.randn(512, 32, generator=g)})


def kill_at_first_checkpoint(cmd: list[str], run_dir: str, timeout: float) -> str:
    """Starts `cmd` and SIGKILLs it as soon as the run's checkpoints/latest pointer exists (what a crash or a
    preempted job leaves), or after `timeout` s or when it ends first; returns the pointer's path."""
    import signal
    import subprocess
    import time
    proc = subprocess.Popen(cmd, env=quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(run_dir, "checkpoints", "latest")
    t0 = time.time()
    while not os.path.exists(latest) and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return latest


def interrupted_prepare(argv: list[str], at: int) -> None:
    """wan_dfd.main(argv), a prepare, with a Ctrl-C at its `at`-th video read (prepare's own name for the reader is
    what it calls); checks that it ends as cli.run_driver ends one: a SystemExit of status 130."""
    import pytest
    import dfd_video.prepare
    import wan_dfd
    calls = {"n": 0}
    real = dfd_video.prepare.read_video_frames

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*a, **k)
    dfd_video.prepare.read_video_frames = dies
    try:
        with pytest.raises(SystemExit) as e:
            wan_dfd.main(argv)
        assert e.value.code == 130
    finally:
        dfd_video.prepare.read_video_frames = real


def quiet_env() -> dict:
    """Environment for subprocess runs: offline hub, one thread, repo root on the path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_script(argv: list[str], launch=(sys.executable,), script: str = "wan_dfd.py", **kw) -> subprocess.CompletedProcess:
    """`launch script *argv` (script relative to the repo root) in quiet_env(); the test fails with the end of its
    stderr unless it exits 0."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([*launch, os.path.join(root, script), *argv], env=quiet_env(), capture_output=True, text=True,
                       **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


# ---------------------------------------------------------------------------------------------------
# The single-process reference for distributed runs (adapter-agnostic: also used for Cosmos)


class Deferred:
    """Optimizer stand-in for dfd's step functions: gradients accumulate across emulated ranks."""

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


def emulate_ranks(adapter, args, steps: int, world: int = 2):
    """What `torchrun --nproc_per_node=world <script> train <args>` computes, in one process without FSDP: dfd's
    own update steps once per rank (that rank's data stream and seeds), gradients averaged before each AdamW step
    (FSDP2's reduce-scatter). Needs --grad-clip 0 (clipping would act on partial sums). Returns the student and
    fake-score state dicts and the rank-averaged (loss_student, delta2, dfd) per step.
    With --lora-rank: the student and the fake score get dfd_video.lora's adapters (same seeds), and the fake score
    is a network of its own (the run under test shares the teacher's), so the sharing is checked too."""
    import dfd
    import dfd_video.data
    import dfd_video.lora
    import dfd_video.train
    import dfd_video.weights
    assert args.grad_clip <= 0, "emulate_ranks needs --grad-clip 0"
    teacher_net, student_net, fake_net = (adapter.load_network(args.model_dir) for _ in range(3))
    for net, role in ((student_net, "generator"), (fake_net, "critic")):
        sd = dfd_video.weights.read_checkpoint(args.dmd2_ckpt, role)
        if sd is not None:  # no critic: the fake score starts from the teacher
            dfd_video.weights.load_weights(net, sd, role, adapter.convert_state_dict)
    if getattr(args, "lora_rank", 0):
        info = dfd_video.lora.lora_info(args, adapter)
        dfd_video.lora.attach(student_net, info, args.seed)
        dfd_video.lora.attach(fake_net, info, args.seed + 1)
    data = dfd_video.data.LatentShards(args.data, adapter.data_keys)
    teacher = adapter.denoiser(teacher_net, args.guidance, data.negative)
    student, fake = adapter.denoiser(student_net, None, None), adapter.denoiser(fake_net, None, None)
    adamw = lambda net, lr: torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=lr,
                                              betas=(args.adam_beta1, 0.999), weight_decay=args.weight_decay)
    opt_s, opt_f = adamw(student_net, args.lr), adamw(fake_net, args.lr_fake)
    generate = adapter.generate(tuple(args.student_ts))  # the causal student's rollout; None: one call
    c = dfd_video.train.dfd_config(args)
    per_rank = args.batch_size // (world * args.grad_accum)
    streams = [data.batches(0, per_rank, r, world, args.seed) for r in range(world)]
    batches = lambda r: [adapter.make_batch(next(streams[r]), torch.device("cpu")) for _ in range(c.grad_accum)]

    def average_and_step(net, opt):
        for q in net.parameters():
            if q.grad is not None:
                q.grad /= world
        opt.step()
        opt.zero_grad(set_to_none=True)

    logs = []
    for step in range(steps):
        for j in range(c.fake_updates):
            for r in range(world):
                dfd.fake_score_step(student, fake, Deferred(), batches(r), c, step, j, rank=r, generate=generate)
            average_and_step(fake_net, opt_f)
        ranks = [dfd.student_step(student, teacher, fake, Deferred(), batches(r), c, step, rank=r, generate=generate)
                 for r in range(world)]
        average_and_step(student_net, opt_s)
        logs.append({k: sum(x[k] for x in ranks) / world for k in ("loss_student", "delta2", "dfd")})
    return student_net.state_dict(), fake_net.state_dict(), logs
