"""DFD post-training of Cosmos-Predict2.5-2B image-to-video through diffusers (the paper's second setting).

The paper (Sec. 5.1.2, Table 2): Cosmos-Predict2.5-2B distilled into a 4-step student with DMD2, then 300 DFD
iterations (FastGen's unit, dfd_video/length.py) from that checkpoint; 81 frames at 480p, batch 16 (up to 128,
Sec. 5.3), CFG 3.0, lr 1e-5 for student and fake score, student update frequency 5 (FastGen's: 4 fake-score updates,
then 1 student update), p = 0.5. The loss and the loop are dfd.py's; this
file only says how Cosmos-Predict2.5 turns (x_t, t, condition) into an x0 estimate (CosmosAdapter); the
subcommands, flags, data shards, checkpoints, --resume, FSDP2 and logging are the shared package dfd_video/.

Launch lines (every subcommand has --help; a plain `python cosmos_dfd.py ...` runs as a world of one):
  torchrun --nproc_per_node=8 cosmos_dfd.py prepare --model-dir Cosmos-Predict2.5-2B --videos clips/ --out data/
  python cosmos_dfd.py check --dmd2-ckpt dmd2.pt --model-dir Cosmos-Predict2.5-2B --data data/   (preflight, docs/check.md)
  torchrun --nproc_per_node=8 cosmos_dfd.py --dmd2-ckpt dmd2.pt --model-dir Cosmos-Predict2.5-2B --data data/
  python cosmos_dfd.py sample --ckpt runs/dfd --model-dir Cosmos-Predict2.5-2B --prompts p.txt --images first.png
  python cosmos_dfd.py export --ckpt runs/dfd --model-dir Cosmos-Predict2.5-2B --out student/
  python cosmos_dfd.py evaluate --samples samples_dmd2/ samples_dfd/ --clip clip/ --dino dino/ --out eval/
Defaults are the paper's Cosmos ones (--guidance 3.0, --iterations 300 = 59 student updates, p = 0.5, 4 fake updates,
lr 1e-5, the 4-step t = [0.999, 0.937, 0.833, 0.624]) and, where the paper is silent, FastGen's Cosmos DMD2 config's
(docs/recipe.md; the conditioning frame at t = 0, --cond-frame-t). `prepare --text cache` (default) stores one
embedding per unique caption;
`--text online` stores captions and `train` encodes them with the FSDP-sharded text encoder.

Conventions of diffusers 0.42.1 (read from pipeline_cosmos2_5_predict.py and transformer_cosmos.py)
  classes      Cosmos2_5_PredictBasePipeline; CosmosTransformer3DModel (transformer/), AutoencoderKLWan, the
               Wan 2.1 VAE (vae/), Qwen2_5_VLForConditionalGeneration (text_encoder/, Cosmos-Reason1-7B) with
               its tokenizer (tokenizer/), UniPCMultistepScheduler (scheduler/: flow sigmas from a Karras
               schedule, sigma_max 200, sigma_min 0.01). The real weights live on the branch
               `diffusers/base/post-trained` of nvidia/Cosmos-Predict2.5-2B; every command takes a local folder.
  latents      z = (VAE latent - latents_mean) / latents_std, [B, 16, T, H/8, W/8] with T = (frames - 1) / 4 + 1
               (81 frames -> 21 latent frames). The encoder is causal: latent frame 0 sees pixel frame 0 only.
               `prepare` stores the clip as a seeded posterior sample (FastGen's trainer; --vae-latent mode: the
               mode) and the conditioning image as the mode (argmax), as both FastGen and the pipeline do.
  schedule     rectified flow, x_t = (1 - t) x0 + t eps. The transformer predicts the velocity v = eps - x0,
               so x0 = x_t - t v. Its `timestep` is t itself in [0, 1] (not 1000 t as in Wan), either [B] or per
               latent frame [B, 1, T, 1, 1]; the pipeline always passes the per-frame form.
  inputs       hidden_states [B, 16, T, h, w]; condition_mask [B, 1, T, h, w] (1 on conditioning frames), which
               the model concatenates as the 17th channel (in_channels = 17, so it is required);
               padding_mask [1, 1, H, W], which must have batch 1 (the model repeats it B times) and is all
               zeros in the pipeline; encoder_hidden_states [B, 512, 100352]. `fps` only rescales the temporal
               RoPE positions and the pipeline never passes it, so neither do we.
  image cond   the pipeline encodes the conditioning pixels with the VAE (argmax), normalises them to c, and
               marks the first latent frame(s) (1 for an image). At every step those frames enter the model as
               c itself with timestep 1e-4 (its `conditional_frame_timestep`, "t = 0"), the rest as x_t at t,
               and the velocity there is replaced by the true one. Here: `CosmosDenoiser` does the same in
               x0 form (the x0 of conditioning frames is c), for the teacher, the student and the fake score
               alike (the authors' fix: without it distillation gives incoherent video), with the conditioning
               frames' timestep set by --cond-frame-t (default 0, FastGen's since its PR #26; `pipeline`: 1e-4;
               `uniform`: FastGen before that PR), and the loss and the validity monitor cover only the
               generated frames (dfd's `mask`).
  text         Qwen2.5-VL run on a chat (system: "You are a helpful assistant who will provide prompts to an
               image generator.", user: the prompt), padded to 512 tokens with no attention mask; every layer's
               hidden state (28 layers x 3584) is normalised over channels and concatenated: [B, 512, 100352],
               103 MB per prompt in bf16, pad positions non-zero. We call the pipeline's own encoder method.
  guidance     the pipeline computes  v_cond + s (v_cond - v_uncond)  with s = guidance_scale = 7.0 by default
               and guidance only when s > 1. The paper (and every flag here) uses  uncond + g (cond - uncond),
               so g = s + 1: the paper's g = 3.0 is guidance_scale = 2.0, the pipeline's default 7.0 is g = 8.0.
               The unconditional branch keeps the image condition and swaps the prompt for the negative prompt.
               Default: FastGen's English Wan negative prompt (dfd_video.spec.FASTGEN_NEGATIVE_PROMPT) encoded
               by Qwen2.5-VL, because FastGen's Cosmos DMD2 config reuses the Wan video loader and so guided the
               teacher with it; `prepare --negative-prompt ""` stores the pipeline's DEFAULT_NEGATIVE_PROMPT
               instead. Guiding v or x0 is the same.
  export       the pipeline calls scheduler.set_timesteps(n) itself and keeps its conditioning frame clean only
               on a deterministic path (velocity there := eps0 - c, eps0 the initial noise); with fresh noise
               between steps (dfd.sample; stochastic_sampling=True) that frame ends far from c, a mix of the
               fresh noises and eps0 weighted by the later t. So the exported student comes with a
               FlowMatchEulerDiscreteScheduler (pipeline_scheduler) under which the pipeline computes
               dfd.sample(..., renoise=False): the implied instead of fresh noise between steps.
  torchvision  the transformer resizes its padding mask with torchvision, which the pipeline module imports
               only if it is installed; PyPI's torchvision does not import beside a CPU torch build.
               `ensure_padding_mask_resize` gives the transformer module the one function it calls where
               torchvision is missing. The pipeline's `image=` path needs torchvision too (to_tensor); a
               one-frame `video=` with num_latent_conditional_frames=1 is the same conditioning without it.
"""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import dfd
from dfd_video.cli import main as cli_main
from dfd_video.spec import FastGenRecipe, GuidedDenoiser, ModelSpec, load_transformer, one_step_scheduler
from dfd_video.vae import WanVAE
from dfd_video.video import read_video_frames

COND_T = 1e-4  # timestep of conditioning frames in the diffusers pipeline (its conditional_frame_timestep)
# --cond-frame-t: the timestep the conditioning frames enter the networks with (docs/recipe.md). None: the sample's t,
# as every frame
COND_FRAME_T = {"zero": 0.0,  # FastGen since its PR #26 (2026-05-16, by the DFD author): t = 0 on conditioning frames
                "pipeline": COND_T,  # diffusers' Cosmos2_5_PredictBasePipeline
                "uniform": None}  # FastGen at 34f30e8, before PR #26: one t for all frames, conditioning ones included
TEXT_LEN = 512  # prompt tokens, padded: the pipeline's max_sequence_length

# FastGen's Cosmos DMD2 configs (fastgen/configs/experiments/CosmosPredict2/, at 34f30e8), by (blocks, width): g = 3.0,
# lr 1e-5, 4-step students. The 2B's discriminator is set in config_dmd2.py (which config_dmd2_v2w.py, the image-to-
# world one, extends); config_dmd2_14b.py swaps in Discriminator_CosmosPredict2_14B_Config without setting its type or
# blocks, so the class defaults hold: dit_simple_conv3d on the middle block (36 // 2).
RECIPES = {(28, 2048): FastGenRecipe("CosmosPredict2/config_dmd2_v2w.py", 3.0, 1e-5, dfd.STUDENT_TS,
                                     "multiscale_down_mlp_large", (13, 20, 27)),
           (36, 5120): FastGenRecipe("CosmosPredict2/config_dmd2_14b.py", 3.0, 1e-5, dfd.STUDENT_TS,
                                     "dit_simple_conv3d", (18,))}


# ---------------------------------------------------------------------------------------------------
# torchvision stand-in: the one call diffusers' Cosmos transformer makes.


class _InterpolationMode:
    NEAREST = "nearest"  # torchvision's InterpolationMode.NEAREST.value


def _resize_nearest(img: torch.Tensor, size, interpolation: str = "nearest", max_size=None, antialias=True):
    """torchvision.transforms.functional.resize(img, [h, w], NEAREST) for tensors [..., H, W] (3-D or 4-D):
    torch's legacy 'nearest' (source index floor(i * H / h)), computed in float32 and cast back, rounding
    first for integer dtypes, and `img` itself when the size already matches (as torchvision does)."""
    if interpolation != _InterpolationMode.NEAREST:
        raise NotImplementedError(f"the torchvision stand-in implements NEAREST only, got {interpolation!r}")
    size = [int(s) for s in size]
    if len(size) != 2 or img.ndim not in (3, 4):
        raise ValueError(f"the torchvision stand-in resizes [C, H, W] or [N, C, H, W] to [h, w]; got "
                         f"{tuple(img.shape)} to {size}")
    if list(img.shape[-2:]) == size:
        return img
    x = img if img.ndim == 4 else img.unsqueeze(0)
    out = F.interpolate(x if x.dtype in (torch.float32, torch.float64) else x.float(), size=size, mode="nearest")
    if not img.dtype.is_floating_point:
        out = out.round()
    out = out.to(img.dtype)
    return out if img.ndim == 4 else out.squeeze(0)


def ensure_padding_mask_resize() -> None:
    """Gives diffusers' Cosmos transformer module a `transforms` namespace when torchvision is not installed
    (diffusers imports it there only if available). Changes nothing where torchvision exists."""
    import diffusers.models.transformers.transformer_cosmos as tc

    if not hasattr(tc, "transforms"):
        tc.transforms = types.SimpleNamespace(functional=types.SimpleNamespace(resize=_resize_nearest),
                                              InterpolationMode=_InterpolationMode)


# ---------------------------------------------------------------------------------------------------
# The denoiser adapter: x0 from the transformer, with the image kept clean.


@dataclass
class CosmosCond:
    """What the networks are conditioned on, for a batch of B videos.
    prompt: [B, 512, D] text embedding (D = 100352 for the real model).
    image:  [B, 16, Tc, h, w] normalised clean latent of the conditioning frame(s) (Tc = 1: the image)."""

    prompt: torch.Tensor
    image: torch.Tensor


def frame_mask(T: int, n_cond: int, device=None) -> torch.Tensor:
    """[1, 1, T, 1, 1], 1 on the first n_cond (conditioning) latent frames, 0 on the generated ones."""
    m = torch.zeros(1, 1, T, 1, 1, device=device)
    m[:, :, :n_cond] = 1.0
    return m


def generated_mask(x: torch.Tensor, n_cond: int) -> torch.Tensor:
    """dfd's loss mask: [1, 1, T, 1, 1], 1 on the generated frames of x [B, C, T, h, w]."""
    return 1.0 - frame_mask(x.shape[2], n_cond, x.device)


def with_image(x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """x [B, C, T, h, w] with its first Tc latent frames replaced by the clean condition image [B, C, Tc, h, w]."""
    return torch.cat([image.to(x.dtype).expand(x.shape[0], -1, -1, -1, -1), x[:, :, image.shape[2]:]], dim=2)


class CosmosDenoiser(GuidedDenoiser):
    """denoise(x_t, t, cond) -> x0 for Cosmos-Predict2.5, with image conditioning and optional guidance.

    x_t [B, 16, T, h, w], t [B] in [0, 1]. Conditioning frames enter as the clean latent with timestep cond_t (None:
    the sample's t, as FastGen before its PR #26) and come out as exactly that latent; generated frames give
    x0 = x_t - t v. With a guidance g and the
    negative-prompt embedding `uncond` [1, 512, D], x0 = uncond + g (cond - uncond) (the paper's form;
    guidance_scale = g - 1 in the pipeline), both branches in one forward of batch 2B. Gradients flow
    through the transformer (student, fake score); nothing is detached here.
    """

    def __init__(self, net: nn.Module, guidance: float | None = None, uncond: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None, cond_t: float | None = COND_FRAME_T["zero"]):
        super().__init__(net, guidance, uncond, compute_dtype)
        self.cond_t = cond_t

    def velocity(self, x_in: torch.Tensor, t_in: torch.Tensor, cond_mask: torch.Tensor,
                 prompt: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype or x_in.dtype
        padding_mask = x_in.new_zeros(1, 1, *x_in.shape[-2:], dtype=dt)  # all zeros, batch 1, as in the pipeline
        return self.net(hidden_states=x_in.to(dt), timestep=t_in.float(), encoder_hidden_states=prompt.to(dt),
                        condition_mask=cond_mask.to(dt), padding_mask=padding_mask, return_dict=False)[0].float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: CosmosCond) -> torch.Tensor:
        B, _, T, h, w = x_t.shape
        m = frame_mask(T, cond.image.shape[2], x_t.device)  # [1, 1, T, 1, 1]
        x_in = with_image(x_t.float(), cond.image.float())
        t_all = t.float().reshape(B, 1, 1, 1, 1)
        t_in = (m * self.cond_t + (1 - m) * t_all if self.cond_t is not None  # [B, 1, T, 1, 1], fp32 like the pipeline
                else t_all.expand(B, 1, T, 1, 1))
        cond_mask = m.expand(B, 1, T, h, w)
        if self.guided:
            prompt = torch.cat([cond.prompt, self.uncond.expand(B, -1, -1).to(cond.prompt.dtype)])
            v_c, v_u = self.velocity(x_in.repeat(2, 1, 1, 1, 1), t_in.repeat(2, 1, 1, 1, 1),
                                     cond_mask.repeat(2, 1, 1, 1, 1), prompt).chunk(2)
            x0 = dfd.cfg(x_in - t_in * v_c, x_in - t_in * v_u, self.guidance)
        else:
            x0 = x_in - t_in * self.velocity(x_in, t_in, cond_mask, cond.prompt)
        return with_image(x0, cond.image.float()).to(x_t.dtype)


def pipeline_scheduler(ts) -> tuple[Any, float]:
    """A FlowMatchEulerDiscreteScheduler whose set_timesteps(len(ts)) gives (nearly) the student's times, and
    the largest difference. Its sigmas are shift_s(linspace(1, u, n)) with u = s / (N + s - 1) for config
    (shift s, num_train_timesteps N); the paper's times are s = 5, N = 16: [1, .9375, .8333, .625]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    n, best = len(ts), None
    for s in [1.0 + 0.5 * k for k in range(39)]:  # shifts 1 .. 20
        u_last = ts[-1] / (s - (s - 1) * ts[-1])  # inverse shift of the last time
        N = max(2, round(s / u_last - s + 1))
        u = torch.linspace(1.0, s / (N + s - 1), n, dtype=torch.float64)
        err = (dfd.shift_t(u, s) - torch.tensor(ts, dtype=torch.float64)).abs().max().item()
        if best is None or err < best[0]:
            best = (err, s, N)
    err, s, N = best
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=s), err


# ---------------------------------------------------------------------------------------------------
# Text: the pipeline's Qwen2.5-VL encoding (the per-caption store is dfd_video.data.PromptStore).


def load_text_encoder(model_dir: str, dtype: torch.dtype = torch.bfloat16):
    """(tokenizer, Qwen2.5-VL text encoder) from the pipeline folder's tokenizer/ and text_encoder/."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    for sub in ("tokenizer", "text_encoder"):
        if not os.path.isdir(os.path.join(model_dir, sub)):
            raise ValueError(f"--model-dir {model_dir}: no {sub}/ folder (expected a Cosmos-Predict2.5 diffusers folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
        text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(model_dir, "text_encoder"),
                                                                          dtype=dtype)
    except Exception as e:
        raise ValueError(f"--model-dir {model_dir}: cannot load the text encoder "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return tokenizer, text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device=None) -> torch.Tensor:
    """[B, 512, D] prompt embeddings exactly as the pipeline makes them: its own `_get_prompt_embeds` (chat
    template, padding to 512, every layer normalised and concatenated), run on a stand-in for the pipeline
    object so that neither the transformer nor the VAE is loaded. Works on an FSDP-sharded encoder."""
    from diffusers import Cosmos2_5_PredictBasePipeline

    device = device or next(text_encoder.parameters()).device
    host = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, _execution_device=device)
    return Cosmos2_5_PredictBasePipeline._get_prompt_embeds(host, prompt=list(prompts), max_sequence_length=TEXT_LEN,
                                                            device=device, dtype=text_encoder.dtype)


# ---------------------------------------------------------------------------------------------------
# Encoders for prepare / sample: the Wan 2.1 VAE (dfd_video.vae, the same class and normalisation as Wan)
# and Qwen2.5-VL.


class CosmosEncoders:
    """The Wan 2.1 VAE and Qwen2.5-VL: encode_video(frames) -> latents of the clip and of its first frame alone;
    encode_text(captions) -> {"text": [N, 512, D]} as the pipeline encodes them."""

    def __init__(self, model_dir: str, device: torch.device, dtype: torch.dtype, text: bool = True, vae: bool = True):
        self.device = device
        self.vae = WanVAE(model_dir, device) if vae else None
        self.tokenizer, self.text_encoder = load_text_encoder(model_dir, dtype) if text else (None, None)
        if self.text_encoder is not None:
            self.text_encoder.to(device)

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor, seed: int | None = None) -> dict[str, torch.Tensor]:
        """uint8 [T, H, W, 3] -> {"latents": [16, T', h, w], "image": [16, 1, h, w]}. The clip is a posterior
        sample with `seed` (None: the mode); the image latent is the first frame encoded alone, as the pipeline
        (and FastGen) encode the conditioning image: the mode. Stored separately so training never depends on the
        causal VAE giving the same first latent frame."""
        return {"latents": self.vae.encode_video(frames, seed)["latents"],
                "image": self.vae.encode_video(frames[:1])["latents"]}

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return {"text": encode_prompts(self.tokenizer, self.text_encoder, captions, self.device)}


def read_image(path: str, height: int, width: int) -> torch.Tensor:
    """A conditioning image as uint8 [1, H, W, 3], resized to cover height x width and centre-cropped exactly
    like the training clips' frames (dfd_video.video.read_video_frames; PyAV reads still images too). ValueError when
    it cannot be read or is smaller than the video (it would be upscaled)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:
        raise ValueError(f"--images {path}: unreadable image ({type(e).__name__})") from None
    if h < height or w < width:
        raise ValueError(f"--images {path}: image is {w}x{h}, smaller than the video {width}x{height} "
                         "(give a larger image or lower --width/--height)")
    try:
        return read_video_frames(path, 1, 1.0, height, width)
    except ValueError as e:
        raise ValueError(f"--images {path}: unreadable image ({str(e).partition(': ')[2]})") from None


# ---------------------------------------------------------------------------------------------------
# The spec dfd_video's drivers read (dfd_video/spec.py).


class CosmosAdapter(ModelSpec):
    """Cosmos-Predict2.5 image-to-video. Data: latents [16, T, h, w], image [16, 1, h, w], text_key [8] (the
    caption's key in the data folder's prompts/ store: 103 MB per embedding, so one per unique caption)."""

    name, family = "cosmos", "Cosmos-Predict2.5"
    transformer_class = "CosmosTransformer3DModel"
    data_keys = ("latents", "image", "text_key")
    defaults = {"guidance": 3.0, "iterations": 300}  # paper Table 2 / Sec. 5.1.2: CFG 3.0, 300 DFD iterations
    model_options = ("cond_frame_t",)
    text_len = TEXT_LEN
    text_store = True
    image_conditioned = True
    # --lora-rank: the attention q/k/v/out projections (self and cross) and the two FFN linears of every block
    lora_targets = (r"transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
                    r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)")
    lora_loader = "CosmosLoraLoaderMixin"  # Cosmos2_5_PredictBasePipeline's load_lora_weights reads the export
    base_model = "nvidia/Cosmos-Predict2.5-2B"  # its diffusers folder: branch diffusers/base/post-trained
    recipes = RECIPES

    def load_network(self, model_dir: str, meta: bool = False) -> nn.Module:
        """CosmosTransformer3DModel from model_dir/transformer (or model_dir itself), fp32."""
        from diffusers import CosmosTransformer3DModel

        ensure_padding_mask_resize()
        return load_transformer(CosmosTransformer3DModel, model_dir, self.family, meta=meta)

    def convert_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Original Cosmos key names (FastGen / cosmos-predict2.5 checkpoints, `net.` stripped) -> diffusers',
        with diffusers' own single-file converter."""
        from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

        if not any(k.startswith(("blocks.", "x_embedder.", "final_layer.", "t_embedder.")) for k in sd):
            return sd
        return convert_cosmos_transformer_checkpoint_to_diffusers(dict(sd))

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        return list(net.transformer_blocks)

    def add_model_args(self, p, cmd) -> None:
        p.add_argument("--cond-frame-t", default="zero", choices=tuple(COND_FRAME_T),
                       help="the timestep the conditioning frame enters every network with: zero (t = 0, FastGen "
                            "since its PR #26, reportedly what the DFD fork runs), pipeline (1e-4, the diffusers "
                            "pipeline's conditional_frame_timestep), uniform (the sample's t like every frame: "
                            "FastGen at 34f30e8, before PR #26, so a DMD2 checkpoint trained before that fix saw this)")

    def denoiser(self, net, guidance=None, uncond=None, dtype=None, cond_frame_t: str = "zero") -> nn.Module:
        return CosmosDenoiser(net, guidance, None if uncond is None else uncond["text"][None].float(), dtype,
                              COND_FRAME_T[cond_frame_t])

    def feature_grid(self, net, feature, x_shape) -> torch.Tensor:
        """FastGen's Cosmos features (fastgen/networks/cosmos_predict2/network.py): the block's tokens on their
        patch grid, [B, D, T / p_t, H / p_h, W / p_w]."""
        B, _, T, H, W = x_shape
        pt, ph, pw = net.config.patch_size
        return feature.reshape(B, T // pt, H // ph, W // pw, -1).permute(0, 4, 1, 2, 3)

    def feature_dim(self, net) -> int:
        return net.config.num_attention_heads * net.config.attention_head_dim

    def make_cond(self, items: dict[str, torch.Tensor], device: torch.device) -> CosmosCond:
        return CosmosCond(items["text"].float().to(device), items["image"].float().to(device))

    def make_batch(self, items: dict[str, torch.Tensor], device: torch.device) -> tuple:
        x_real = items["latents"].float()
        return x_real, self.make_cond(items, device), generated_mask(x_real, items["image"].shape[2])

    def check_data(self, shapes: dict[str, tuple], net: nn.Module) -> None:
        cfg = net.config
        lat, img = tuple(shapes["latents"]), tuple(shapes["image"])
        ph, pw = cfg.patch_size[1:]
        if not (len(lat) == 4 and lat[0] == cfg.out_channels and lat[2] % ph == 0 and lat[3] % pw == 0):
            raise ValueError(f"data latents have shape {lat}; the transformer wants [{cfg.out_channels}, T, H, W] "
                             f"with H, W multiples of its patch size {ph}, {pw}")
        if len(img) != 4 or img[0] != lat[0] or tuple(img[2:]) != tuple(lat[2:]) or not 1 <= img[1] < lat[1]:
            raise ValueError(f"data image latents have shape {img}; need [{lat[0]}, Tc, {lat[2]}, {lat[3]}] with "
                             f"1 <= Tc < {lat[1]} (conditioning frames, then at least one generated frame)")

    def open_encoders(self, model_dir, device, dtype, text=True, vae=True) -> CosmosEncoders:
        return CosmosEncoders(model_dir, device, dtype, text=text, vae=vae)

    def pipeline_negative_prompt(self) -> str:
        """The pipeline's DEFAULT_NEGATIVE_PROMPT."""
        from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import DEFAULT_NEGATIVE_PROMPT

        return DEFAULT_NEGATIVE_PROMPT

    def text_encoder_blocks(self, text_encoder: nn.Module) -> list[nn.Module]:
        """Qwen2.5-VL's decoder layers, and its vision tower as a unit of its own that is never gathered."""
        return list(text_encoder.model.language_model.layers) + [text_encoder.model.visual]

    def sample_items(self, encoders, prompts, embeddings, images, size) -> list[dict[str, torch.Tensor]]:
        """Per video: {"text": [512, D], "image": [16, 1, h, w]}; from prompts + images, or embeddings (tensors
        "text" [N, 512, D] and, unless images are given, "image" [N, 16, 1, h, w])."""
        frames, height, width = size
        if frames < 5:
            raise ValueError(f"--num-frames {frames}: the first latent frame is the image; ask for at least 5 frames "
                             "(one generated latent frame)")
        embeddings = embeddings or {}
        text = encoders.encode_text(prompts)["text"] if prompts else embeddings.get("text")
        if text is None or text.ndim != 3:
            raise ValueError("--embeddings: need a tensor 'text' of shape [N, 512, D]")
        text = text.float()
        h, w = height // 8, width // 8
        if images:
            if len(images) not in (1, len(text)):
                raise ValueError(f"--images: {len(images)} images for {len(text)} prompts (give one, or one per "
                                 "prompt); every video needs its conditioning frame")
            paths = images * len(text) if len(images) == 1 else images
            image = torch.stack([encoders.vae.encode_video(read_image(p, height, width))["latents"] for p in paths])
        elif "image" in embeddings:
            image = embeddings["image"].float()
        else:
            raise ValueError("missing conditioning frame: give --images (one per prompt, or one for all) or "
                             "--embeddings with an 'image' tensor [N, 16, 1, h, w]")
        if image.ndim != 5 or image.shape[1] != 16 or tuple(image.shape[3:]) != (h, w) or len(image) != len(text):
            raise ValueError(f"conditioning image latents have shape {tuple(image.shape)}; need [{len(text)}, 16, 1, "
                             f"{h}, {w}] for --height {height} --width {width}")
        return [{"text": t.cpu(), "image": i.cpu()} for t, i in zip(text, image)]

    def export(self, net: nn.Module, out: str, student_ts: tuple[float, ...]) -> None:
        """The transformer folder (config.json + safetensors; CosmosTransformer3DModel.from_pretrained(out)) and
        out/scheduler/, the FlowMatchEulerDiscreteScheduler under which the pipeline runs
        dfd.sample(..., renoise=False)."""
        net.save_pretrained(out, safe_serialization=True)
        scheduler, err = pipeline_scheduler(student_ts)
        scheduler.save_pretrained(os.path.join(out, "scheduler"))
        scheduler.set_timesteps(len(student_ts))
        if err > 0.01:
            print(f"warning: no FlowMatchEulerDiscreteScheduler config reproduces the student times {list(student_ts)}; "
                  "the pipeline will run the nearest ones below", file=sys.stderr)
        print(f"pipeline scheduler: FlowMatchEulerDiscreteScheduler(shift={scheduler.config.shift}, "
              f"num_train_timesteps={scheduler.config.num_train_timesteps}), {len(student_ts)} steps at "
              f"{[round(x, 4) for x in scheduler.sigmas[:-1].tolist()]} (student times {list(student_ts)}, max diff "
              f"{err:.2g})", file=sys.stderr)

    def load_lines(self, student_ts, transformer_from: str = "student") -> list[str]:
        """The model card's Python (docs/cosmos.md): the transformer from the folder in the variable `transformer_from`
        and the scheduler export wrote into `student`/scheduler, into the pipeline from `base`; the last line samples
        from a first frame (the pipeline also wants NVIDIA's cosmos_guardrail safety checker)."""
        return ["import torch",
                "from diffusers import Cosmos2_5_PredictBasePipeline, CosmosTransformer3DModel, "
                "FlowMatchEulerDiscreteScheduler",
                f"transformer = CosmosTransformer3DModel.from_pretrained({transformer_from}, torch_dtype=torch.bfloat16)",
                "sched = FlowMatchEulerDiscreteScheduler.from_pretrained(student, subfolder='scheduler')",
                "pipe = Cosmos2_5_PredictBasePipeline.from_pretrained(base, revision='diffusers/base/post-trained', "
                "transformer=transformer, scheduler=sched, torch_dtype=torch.bfloat16).to('cuda')",
                "video = pipe(video=[first_frame], prompt=prompt, num_frames=81, height=480, width=832, "
                f"num_inference_steps={len(student_ts)}, guidance_scale=1.0, num_latent_conditional_frames=1).frames[0]"]

    # --- check ---------------------------------------------------------------------------------------

    def check_items(self, net: nn.Module, shape, generator: torch.Generator):
        """Random prompt embeddings [512, D] (prompt, negative prompt) and a random image latent [16, 1, h, w]."""
        cfg = net.config
        dim = cfg.crossattn_proj_in_channels if cfg.use_crossattn_projection else cfg.text_embed_dim
        text = lambda: torch.randn(TEXT_LEN, dim, generator=generator)
        image = torch.randn(shape[0], 1, *shape[2:], generator=generator)
        return {"text": text(), "image": image}, {"text": text()}

    def pipeline_x0(self, net, x_t, t, cond, uncond, guidance, dtype, model_dir):
        """Cosmos2_5_PredictBasePipeline.__call__ itself for one Euler step to t = 0, conditioned on the image that
        cond.image decodes to (a one-frame `video=`; it re-encodes it with its VAE, so our side is given that
        latent), with guidance_scale = g - 1; compared on the generated frames only (the pipeline's conditioning
        frame drifts by design, see the module docstring)."""
        from diffusers import Cosmos2_5_PredictBasePipeline

        if 1.0 < guidance <= 2.0:
            raise ValueError(f"--guidance {guidance}: the pipeline guides only when g - 1 > 1; compare at g = 1 or g > 2")
        vae = WanVAE(model_dir, x_t.device)
        frames = vae.decode(cond.image)  # uint8 [1, Tc', H, W, 3]
        image = torch.stack([vae.encode_video(f)["latents"] for f in frames])  # what the pipeline's VAE sees
        video = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # [1, 3, 1, H, W] in [-1, 1]
        pipe = Cosmos2_5_PredictBasePipeline(text_encoder=None, tokenizer=None, transformer=net, vae=vae.vae,
                                             scheduler=one_step_scheduler(t), safety_checker=_LatentsOnly())
        pipe.set_progress_bar_config(disable=True)
        _, _, T, h, w = x_t.shape
        dt = dtype or torch.float32  # as its text encoder would hand them over (the pipeline does not cast)
        neg = uncond["text"][None].to(x_t.device, dt).expand(x_t.shape[0], -1, -1)
        x0 = pipe(video=video, prompt_embeds=cond.prompt.to(dt), negative_prompt_embeds=neg, height=8 * h, width=8 * w,
                  num_frames=4 * (T - 1) + 1, num_inference_steps=1, guidance_scale=guidance - 1.0, latents=x_t,
                  output_type="latent", num_latent_conditional_frames=1).frames
        return x0.float(), CosmosCond(cond.prompt, image), generated_mask(x_t, image.shape[2])


class _LatentsOnly:
    """The pipeline's safety-checker slot for `check`'s one-step comparison: the pipeline checks prompt text (we give
    embeddings) and decoded videos (we ask for latents), so neither check applies; nothing is shown to anyone."""

    def to(self, *args, **kwargs):
        return self


def main(argv=None) -> Any:
    """The subcommands (dfd_video's drivers) with the Cosmos adapter; no subcommand means train."""
    return cli_main(CosmosAdapter(), argv, description=__doc__)


if __name__ == "__main__":
    main()
