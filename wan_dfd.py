"""DFD post-training of Wan2.1-T2V-1.3B (text-to-video) from a DMD2 student, under torchrun + FSDP2.

Paper: "Data-Forcing Distillation" (Sec. 4, Eq. 8-10; Table 2 for the defaults). The method lives in dfd.py;
this file is the Wan adapter (how WanTransformer3DModel turns (x_t, t, text) into x0, its encoders and export
format) and the command users run; the plumbing a cluster run needs is the shared package dfd_video/.

Launch lines (every subcommand has --help):
  python wan_dfd.py prepare --model-dir Wan2.1-T2V-1.3B-Diffusers --videos clips/ --out data/
  python wan_dfd.py check --dmd2-ckpt dmd2.pt --model-dir Wan2.1-T2V-1.3B-Diffusers --data data/   (preflight, docs/check.md)
  torchrun --nproc_per_node=8 wan_dfd.py --dmd2-ckpt dmd2.pt --model-dir Wan2.1-T2V-1.3B-Diffusers --data data/
  torchrun --nproc_per_node=8 wan_dfd.py train --resume --out runs/dfd ...      (continue from the latest checkpoint)
  python wan_dfd.py sample --ckpt runs/dfd/checkpoints/latest --model-dir ... --prompts prompts.txt --seeds 0 1
  python wan_dfd.py export --ckpt runs/dfd/checkpoints/latest --model-dir ... --out student_transformer/
  python wan_dfd.py evaluate --samples samples_dmd2/ samples_dfd/ --names DMD2 DFD --clip clip-vit-large-patch14/ \
      --dino dinov2-large/ [--poses poses_dmd2/ poses_dfd/] --out eval/
A plain `python wan_dfd.py ...` (no torchrun) runs as a world of one; no subcommand means train.
A Self-Forcing / CausVid model.pt is a block-causal student: it trains through Self-Forcing's KV-cache rollout
(dfd_video/causal_wan.py); `--preset sf-dfd` is SF-DFD's recipe (docs/causal.md).

Conventions (Wan2.1, verified against diffusers 0.42.1 in tests/test_wan_oracle.py): x_t = (1 - t) x0 + t eps, the
transformer predicts v = eps - x0 and takes timestep t * 1000 as a float [B]; CFG is uncond + g (cond - uncond) with
g = 5.0; UMT5 embeddings are cut to the real token count and zero-padded to 512; latents are normalised as
(z - latents_mean) / latents_std.

Where the authors' recipe (FastGen's Wan DMD2 config, docs/recipe.md) and the diffusers pipeline differ, the defaults
are the recipe's and a flag gives the pipeline's: the uncond of CFG is the embedding of FastGen's English negative
prompt (dfd_video.spec.FASTGEN_NEGATIVE_PROMPT; `prepare --negative-prompt ""` stores the pipeline's default, the
empty string), real videos are encoded with a seeded VAE posterior sample (`prepare --vae-latent mode`: the mode), and
`sample` runs the deterministic ODE sampler (`--sampler renoise`: fresh noise between steps).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.nn as nn

import dfd
from dfd_video.cli import main as cli_main
from dfd_video.runs import checkpoint_run, run_args
from dfd_video.spec import (SELF_FORCING_NEGATIVE_PROMPT, FastGenRecipe, GuidedDenoiser, ModelSpec, load_transformer,
                            one_step_scheduler)
from dfd_video.vae import WanVAE
from dfd_video.weights import describe_dmd2

WAN_TEXT_LEN = 512  # the pipeline's max_sequence_length: UMT5 output cut to the real length, zero-padded to 512

# FastGen's Wan DMD2 configs (fastgen/configs/experiments/WanT2V/, at 34f30e8), by (blocks, width): all guide with
# g = 5.0 at lr 1e-5 and put the GAN head (multiscale_down_mlp_large) on three teacher blocks; the 14B and the
# Wan2.2-5B ones train 2-step students (t_list [0.999, 0.833, 0]).
RECIPES = {(30, 1536): FastGenRecipe("WanT2V/config_dmd2.py", 5.0, 1e-5, dfd.STUDENT_TS, "multiscale_down_mlp_large",
                                     (15, 22, 29)),
           (40, 5120): FastGenRecipe("WanT2V/config_dmd2_14b.py", 5.0, 1e-5, (0.999, 0.833),
                                     "multiscale_down_mlp_large", (21, 30, 39)),
           (30, 3072): FastGenRecipe("WanT2V/config_dmd2_wan22_5b.py", 5.0, 1e-5, (0.999, 0.833),
                                     "multiscale_down_mlp_large", (15, 22, 29))}


# ---------------------------------------------------------------------------------------------------
# Causal (Self-Forcing / CausVid) students: the command-line side. The network and its rollouts are in
# dfd_video/causal_wan.py, imported only when a causal student is built (diffusers is a slow import; --help and the
# flag checks stay fast).

FRAMES_PER_BLOCK = 3  # Self-Forcing's num_frame_per_block (configs/self_forcing_dmd.yaml, self_forcing_dfd.yaml)
# Self-Forcing's denoising_step_list [1000, 750, 500, 250] under warp_denoising_step: the timesteps of its 1000-step
# shift-5 FlowMatchScheduler at those indices, i.e. shift(1 - k/4) for k = 0..3 (model/base.py).
SELF_FORCING_TS = (1.0, 0.9375, 2.5 / 3.0, 0.625)


def grid_sigma(t: float, shift: float = 5.0, steps: int = 1000) -> float:
    """The sigma Self-Forcing's FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True) with 1000 training steps
    uses for timestep t * 1000: the nearest of its grid. Its add_noise at timestep 0 (the context frames' "no
    noise") therefore noises with the smallest grid sigma, shift(1/1000) = 0.00498, not 0."""
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    grid = shift * grid / (1 + (shift - 1) * grid)
    return float(grid[(grid * steps - t * steps).abs().argmin()])


# SF-DFD's recipe (csy2077/DFD-self-forcing configs/self_forcing_dfd.yaml, trainer/distillation_dfd.py, README;
# docs/recipe.md has a row per value). Train-flag defaults applied by --preset sf-dfd; grad_accum is filled in for
# the world size (global batch 64 at one sample per rank and pass).
SF_DFD_PRESET: dict[str, Any] = dict(
    p=0.5, per_micro_coin=True, guidance=4.0, lr=2e-6, lr_fake=4e-7, adam_beta1=0.0, weight_decay=0.01,
    ema=0.99, ema_init="checkpoint", fake_updates=5, student_ts=list(SELF_FORCING_TS), t_min=0.0, t_max=0.999,
    t_clamp=[0.02, 0.98], t_shift=5.0, fake_loss="flow", grad_clip=10.0, grad_clip_fake=10.0, batch_size=64,
    student_steps=32, fake_init="critic", grad_accum=lambda world: max(1, 64 // world))  # 1 sample per rank and pass


def preset_notes(args) -> list[str]:
    """Where a train command line with --preset sf-dfd differs from SF-DFD in what the preset cannot set."""
    if getattr(args, "preset", None) != "sf-dfd":
        return []
    notes = []
    if not reads_causal(args):
        notes.append("the student is read as bidirectional; SF-DFD trains a block-causal Self-Forcing student")
    try:
        with open(os.path.join(args.data, "manifest.json")) as f:
            neg = json.load(f).get("negative_prompt")
    except (OSError, ValueError, TypeError):
        neg = None
    if neg is not None and neg != SELF_FORCING_NEGATIVE_PROMPT:
        notes.append(f"--data {args.data} stores the negative prompt {neg[:40]!r}...; SF-DFD guides against its Chinese "
                     "one (prepare --negative-prompt, or prepare from its LMDB, which stores it)")
    return notes


def add_causal_args(p, cmd: str) -> None:
    """The causal student's flags (wan_dfd.py train / check / sample / export)."""
    g = p.add_argument_group("causal students", "Self-Forcing / CausVid block-causal Wan students (docs/causal.md)")
    g.add_argument("--causal", action="store_true", help="read the student as block-causal whatever its layout "
                   "(e.g. FastGen's CausalWan <iter>.net_model/); a Self-Forcing / CausVid .pt is read so without it")
    g.add_argument("--frames-per-block", type=int, default=FRAMES_PER_BLOCK,
                   help="latent frames per causal block (Self-Forcing's num_frame_per_block)")
    if cmd in ("train", "check"):
        g.add_argument("--context-sigma", type=float, default=grid_sigma(0.0), help="noise level of the context "
                       "frames the rollout commits to the KV cache (Self-Forcing: its add_noise at timestep 0, the "
                       "smallest grid sigma; FastGen: 0)")


def _run_args(ckpt: str) -> dict | None:
    """The flags of the training run a checkpoint (step folder, run folder or `latest`) belongs to, else None."""
    found = checkpoint_run(ckpt)
    return None if found is None else run_args(found[0])


def reads_causal(args) -> bool:
    """Whether this command line's student is block-causal: --causal; else not with --bidirectional-ckpt; else a
    training run's own record (--resume, --ckpt of a run); else a Self-Forcing / CausVid .pt (describe_dmd2)."""
    if getattr(args, "causal", False):
        return True
    if getattr(args, "bidirectional_ckpt", False):
        return False
    if getattr(args, "resume", None) is not None:
        return bool((_run_args(args.out if args.resume == "latest" else args.resume) or {}).get("causal_student"))
    path = getattr(args, "ckpt", None) or getattr(args, "dmd2_ckpt", None)
    if path is None:
        return False
    run = _run_args(path)
    if run is not None:
        return bool(run.get("causal_student"))
    return describe_dmd2(path)["format"] == "self-forcing"


class WanDenoiser(GuidedDenoiser):
    """(x_t, t, cond) -> x0 for WanTransformer3DModel (v = eps - x0, timestep t * 1000 as float [B]).

    cond: text embedding [B, 512, D]. With guidance g, the unconditional branch (the stored negative-prompt
    embedding [1, 512, D]) runs in the same forward as the conditional one (batch 2B) and the result is
    uncond + g (cond - uncond) (dfd.cfg; guiding x0 equals guiding v, the affine map is shared)."""

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, **causal) -> torch.Tensor:
        """causal: the KV-cache arguments of causal_wan.CausalWanTransformer (cache=, commit=), unguided only."""
        B = x_t.shape[0]
        guided = self.guided
        text = torch.cat([cond, self.uncond.expand(B, -1, -1)]) if guided else cond
        x_in = torch.cat([x_t, x_t]) if guided else x_t
        t_in = torch.cat([t, t]) if guided else t
        dt = self.compute_dtype or x_t.dtype
        v = self.net(hidden_states=x_in.to(dt), timestep=(t_in * 1000).float(), encoder_hidden_states=text.to(dt),
                     return_dict=False, **causal)[0].float()
        x0 = dfd.x0_from_v(x_in.float(), v, t_in.float())
        if guided:
            x0_cond, x0_uncond = x0.chunk(2)
            x0 = dfd.cfg(x0_cond, x0_uncond, self.guidance)
        return x0.to(x_t.dtype)


class WanEncoders:
    """The base model's VAE (dfd_video.vae.WanVAE) and UMT5 text encoder, used by `prepare`, `sample` and probes."""

    def __init__(self, model_dir: str, device: torch.device, dtype: torch.dtype = torch.float32,
                 text: bool = True, vae: bool = True):
        from transformers import AutoTokenizer, UMT5EncoderModel
        self.device = device
        for sub in (["vae"] if vae else []) + (["text_encoder", "tokenizer"] if text else []):
            if not os.path.isdir(os.path.join(model_dir, sub)):
                raise ValueError(f"--model-dir {model_dir}: no {sub}/ folder (expected a diffusers Wan pipeline)")
        self.vae = WanVAE(model_dir, device) if vae else None
        self.text_encoder = None
        if text:
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
                self.text_encoder = UMT5EncoderModel.from_pretrained(os.path.join(model_dir, "text_encoder"),
                                                                     dtype=dtype).to(device).eval()
            except Exception as e:
                raise ValueError(f"--model-dir {model_dir}: cannot load the text encoder "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None

    def encode_video(self, frames: torch.Tensor, seed: int | None = None) -> dict[str, torch.Tensor]:
        return self.vae.encode_video(frames, seed)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding: cleaned prompt, UMT5 over 512 tokens with the attention mask, output cut
        to the real token count and zero-padded back to 512 -> {"text": [N, 512, D]}."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean
        tok = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=WAN_TEXT_LEN,
                             truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        h = self.text_encoder(ids, mask).last_hidden_state.float()
        keep = (torch.arange(WAN_TEXT_LEN, device=self.device)[None] < mask.gt(0).sum(1, keepdim=True))[..., None]
        return {"text": h * keep}


class WanAdapter(ModelSpec):
    """Wan2.1 text-to-video: the ModelSpec (dfd_video/spec.py) of WanTransformer3DModel."""

    name, family = "wan", "Wan"
    transformer_class = "WanTransformer3DModel"
    data_keys = ("latents", "text")
    text_len = WAN_TEXT_LEN
    # --lora-rank: the attention q/k/v/out projections (self and cross) and the two FFN linears of every block
    lora_targets = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|blocks\.\d+\.ffn\.net\.(0\.proj|2)"
    lora_loader = "WanLoraLoaderMixin"  # WanPipeline's: export --lora writes what its load_lora_weights reads
    base_model = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    recipes = RECIPES
    presets = {"sf-dfd": SF_DFD_PRESET}  # --preset: SF-DFD's recipe for Self-Forcing students

    def add_model_args(self, p, cmd: str) -> None:
        if cmd in ("train", "check", "sample", "export"):
            add_causal_args(p, cmd)

    def resolve(self, args) -> ModelSpec:
        """CausalWanAdapter for a block-causal student (reads_causal), recorded in the run's args.json."""
        if args.cmd == "train" and os.environ.get("RANK", "0") == "0":
            for note in preset_notes(args):
                print(f"--preset {args.preset}: {note}", file=sys.stderr)
        if args.cmd not in ("train", "check", "sample", "export") or not reads_causal(args):
            return self
        args.causal_student = True
        return CausalWanAdapter(args.frames_per_block, getattr(args, "context_sigma", 0.0))

    def load_network(self, model_dir: str, meta: bool = False) -> nn.Module:
        """WanTransformer3DModel from model_dir/transformer (or model_dir itself) in fp32."""
        from diffusers import WanTransformer3DModel
        return load_transformer(WanTransformer3DModel, model_dir, self.family, fix=self.init_buffers, meta=meta)

    def init_buffers(self, net: nn.Module, device: torch.device | str = "cpu") -> None:
        """The RoPE tables are non-persistent buffers (not in the file): rebuilt after the weights are allocated."""
        net.rope = type(net.rope)(net.rope.attention_head_dim, net.rope.patch_size, net.rope.max_seq_len).to(device)

    def convert_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Original Wan key names (Self-Forcing / CausVid checkpoints) -> diffusers', with diffusers' own converter."""
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
        if not any(k.startswith(("blocks.", "head.", "patch_embedding", "text_embedding", "time_")) and
                   ("self_attn" in k or "head.head" in k or "text_embedding" in k) for k in sd):
            return sd
        return convert_wan_transformer_to_diffusers(dict(sd))

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        return list(net.blocks)

    def denoiser(self, net, guidance=None, uncond=None, dtype=None, **options) -> nn.Module:
        return WanDenoiser(net, guidance, None if uncond is None else uncond["text"][None].float(), dtype)

    def feature_grid(self, net, feature, x_shape) -> torch.Tensor:
        """FastGen's Wan features (fastgen/networks/Wan/network.py, _unpatchify_features): each token's D channels
        read as (p_t, p_h, p_w, D / p_t p_h p_w) and put back on the latent grid, [B, D / 4, T, H, W]."""
        B, _, T, H, W = x_shape
        pt, ph, pw = net.config.patch_size
        f = feature.reshape(B, T // pt, H // ph, W // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return f.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def feature_dim(self, net) -> int:
        cfg = net.config  # the token's D channels over the p_t p_h p_w latent positions it covers
        pt, ph, pw = cfg.patch_size
        return cfg.num_attention_heads * cfg.attention_head_dim // (pt * ph * pw)

    def make_batch(self, items: dict[str, torch.Tensor], device: torch.device) -> tuple:
        return items["latents"].float(), self.make_cond(items, device)

    def make_cond(self, items: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        return items["text"].float().to(device)

    def check_data(self, shapes: dict[str, tuple], net: nn.Module) -> None:
        cfg = net.config
        lat, text = shapes["latents"], shapes["text"]
        if len(lat) != 4 or lat[0] != cfg.in_channels:
            raise ValueError(f"data latents have shape {lat}; the transformer wants [{cfg.in_channels}, T, H, W]")
        if lat[2] % cfg.patch_size[1] or lat[3] % cfg.patch_size[2]:
            raise ValueError(f"data latents {lat}: H, W must be multiples of the patch size {cfg.patch_size[1:]}")
        if len(text) != 2 or text[1] != cfg.text_dim:
            raise ValueError(f"data text embeddings have shape {text}; the transformer wants [L, {cfg.text_dim}]")

    def open_encoders(self, model_dir, device, dtype, text=True, vae=True) -> WanEncoders:
        return WanEncoders(model_dir, device, dtype, text=text, vae=vae)

    def sample_items(self, encoders, prompts, embeddings, images, size) -> list[dict[str, torch.Tensor]]:
        text = encoders.encode_text(prompts)["text"] if prompts is not None else embeddings.get("text")
        if text is None or text.ndim != 3:
            raise ValueError("--embeddings: need a tensor 'text' of shape [N, 512, D]")
        return [{"text": t.float().cpu()} for t in text]

    def load_lines(self, student_ts, transformer_from: str = "student") -> list[str]:
        """The model card's Python (docs/wan.md): the transformer from the folder in the variable `transformer_from`
        into WanPipeline from `base`, FlowMatchEulerDiscreteScheduler at the student's times (its ODE sampler, no
        CFG); the last line samples."""
        return ["import functools", "import torch",
                "from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel",
                "sched = FlowMatchEulerDiscreteScheduler(shift=1.0)  # Euler at the student's times",
                f"sched.set_timesteps = functools.partial(sched.set_timesteps, sigmas={list(student_ts)})",
                f"transformer = WanTransformer3DModel.from_pretrained({transformer_from}, torch_dtype=torch.bfloat16)",
                "pipe = WanPipeline.from_pretrained(base, transformer=transformer, scheduler=sched, "
                "torch_dtype=torch.bfloat16).to('cuda')",
                f"video = pipe('a fox in the snow', num_inference_steps={len(student_ts)}, guidance_scale=1.0).frames[0]"]

    # --- check ---------------------------------------------------------------------------------------

    def check_items(self, net: nn.Module, shape, generator: torch.Generator):
        """Random text embeddings [512, text_dim] for the prompt and the negative prompt (no --data)."""
        text = lambda: torch.randn(WAN_TEXT_LEN, net.config.text_dim, generator=generator)
        return {"text": text()}, {"text": text()}

    def pipeline_x0(self, net, x_t, t, cond, uncond, guidance, dtype, model_dir):
        """WanPipeline.__call__ itself (prompt embeddings given, so no text encoder; latents out, so no VAE) for one
        Euler step to t = 0: its two transformer calls and noise_uncond + g (noise_pred - noise_uncond)."""
        from diffusers import WanPipeline
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=one_step_scheduler(t), transformer=net)
        pipe.set_progress_bar_config(disable=True)
        _, _, T, h, w = x_t.shape
        neg = uncond["text"][None].to(x_t.device).expand(x_t.shape[0], -1, -1)
        x0 = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, height=8 * h, width=8 * w, num_frames=4 * (T - 1) + 1,
                  num_inference_steps=1, guidance_scale=guidance, latents=x_t, output_type="latent").frames
        return x0.float(), cond, None


class CausalWanAdapter(WanAdapter):
    """A block-causal Wan student (Self-Forcing / CausVid; dfd_video/causal_wan.py): the same weights and names, G from
    Self-Forcing's autoregressive rollout with the KV cache, samples streamed block by block. The teacher and the
    critic stay bidirectional: the same class called without a cache is diffusers' WanTransformer3DModel."""

    presets = {}  # the train presets apply to both readings (WanAdapter.presets)

    def __init__(self, frames_per_block: int = FRAMES_PER_BLOCK, context_sigma: float = 0.0):
        self.frames_per_block, self.context_sigma = frames_per_block, context_sigma
        self.describe_student = (f"  causal     <- the student is block-causal ({frames_per_block} latent frames per "
                                 "block, Self-Forcing's KV-cache rollout; --bidirectional-ckpt reads it as a "
                                 "full-sequence student)")

    def load_network(self, model_dir: str, meta: bool = False) -> nn.Module:
        from dfd_video.causal_wan import CausalWanTransformer
        return load_transformer(CausalWanTransformer, model_dir, self.family, fix=self.init_buffers, meta=meta)

    def generate(self, student_ts):
        from dfd_video import causal_wan
        return causal_wan.make_generate(student_ts, self.frames_per_block, self.context_sigma)

    def sample_video(self, student, noise, cond, student_ts, generator, renoise):
        from dfd_video import causal_wan
        return causal_wan.stream_sample(student, noise, cond, student_ts, generator, renoise, self.frames_per_block)

    def check_data(self, shapes: dict[str, tuple], net: nn.Module) -> None:
        super().check_data(shapes, net)
        if shapes["latents"][1] % self.frames_per_block:
            raise ValueError(f"data latents have {shapes['latents'][1]} frames: the causal student needs a multiple of "
                             f"--frames-per-block {self.frames_per_block} (Self-Forcing: 21 = 7 blocks of 3)")

    def export(self, net: nn.Module, out: str, student_ts: tuple[float, ...]) -> None:
        """<out>/model.pt in Self-Forcing's layout ({"generator": WanDiffusionWrapper's state dict}), what its
        inference.py --checkpoint_path loads; diffusers has no causal Wan pipeline (docs/causal.md)."""
        from dfd_video.causal_wan import save_self_forcing
        save_self_forcing(net.state_dict(), os.path.join(out, "model.pt"))


def main(argv=None):
    """The subcommands (dfd_video's drivers) with the Wan adapter; no subcommand means train."""
    return cli_main(WanAdapter(), argv, description=__doc__)


if __name__ == "__main__":
    main()
