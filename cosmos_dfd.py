"""DFD post-training of Cosmos-Predict2.5-2B image-to-video through diffusers (the paper's second setting).

The paper (Sec. 5.1.2, Table 2): Cosmos-Predict2.5-2B distilled into a 4-step student with DMD2, then 300 DFD
steps from that checkpoint; 81 frames at 480p, batch 16 (up to 128, Sec. 5.3), CFG 3.0, lr 1e-5 for student
and fake score, student update frequency 5 (FastGen's: 4 fake-score updates, then 1 student update), p = 0.5. The loss and the loop are dfd.py's; this
file only says how Cosmos-Predict2.5 turns (x_t, t, condition) into an x0 estimate (CosmosAdapter); the
subcommands, flags, data shards, checkpoints, --resume, FSDP2 and logging are the shared package dfd_video/.

Launch lines (every subcommand has --help; a plain `python cosmos_dfd.py ...` runs as a world of one):
  torchrun --nproc_per_node=8 cosmos_dfd.py prepare --model-dir Cosmos-Predict2.5-2B --videos clips/ --out data/
  python cosmos_dfd.py check --dmd2-ckpt dmd2.pt --model-dir Cosmos-Predict2.5-2B --data data/   (preflight, docs/check.md)
  torchrun --nproc_per_node=8 cosmos_dfd.py --dmd2-ckpt dmd2.pt --model-dir Cosmos-Predict2.5-2B --data data/
  python cosmos_dfd.py sample --ckpt runs/dfd --model-dir Cosmos-Predict2.5-2B --prompts p.txt --images first.png
  python cosmos_dfd.py export --ckpt runs/dfd --model-dir Cosmos-Predict2.5-2B --out student/
  python cosmos_dfd.py evaluate --samples samples_dmd2/ samples_dfd/ --clip clip/ --dino dino/ --out eval/
Defaults are the paper's Cosmos ones (--guidance 3.0, --steps 300, p = 0.5, 4 fake updates, lr 1e-5, the 4-step
t = [0.999, 0.937, 0.833, 0.624]) and, where the paper is silent, FastGen's Cosmos DMD2 config's (docs/recipe.md). `prepare --text cache` (default) stores one embedding per unique caption;
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
               alike (the authors' fix: without it distillation gives incoherent video), and the loss and the
               validity monitor cover only the generated frames (dfd's `mask`).
  text         Qwen2.5-VL run on a chat (system: "You are a helpful assistant who will provide prompts to an
               image generator.", user: the prompt), padded to 512 tokens with no attention mask; every layer's
               hidden state (28 layers x 3584) is normalised over channels and concatenated: [B, 512, 100352],
               103 MB per prompt in bf16, pad positions non-zero. We call the pipeline's own encoder method.
  guidance     the pipeline computes  v_cond + s (v_cond - v_uncond)  with s = guidance_scale = 7.0 by default
               and guidance only when s > 1. The paper (and every flag here) uses  uncond + g (cond - uncond),
               so g = s + 1: the paper's g = 3.0 is guidance_scale = 2.0, the pipeline's default 7.0 is g = 8.0.
               The unconditional branch keeps the image condition and swaps the prompt for the negative prompt.
               Default: FastGen's English Wan negative prompt (dfd_video.adapter.FASTGEN_NEGATIVE_PROMPT) encoded
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

import hashlib
import json
import os
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import dfd
from dfd_video.adapter import GuidedDenoiser, load_transformer, negative_prompt, one_step_scheduler
from dfd_video.cli import main as cli_main
from dfd_video.distributed import Islands, fp32_islands, setup_distributed, shard
from dfd_video.files import atomic_write
from dfd_video.runs import latest_checkpoint
from dfd_video.vae import WanVAE
from dfd_video.video import read_prompts, read_video_frames

COND_T = 1e-4  # timestep of conditioning frames: the pipeline's conditional_frame_timestep ("t = 0")
TEXT_LEN = 512  # prompt tokens, padded: the pipeline's max_sequence_length


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

    x_t [B, 16, T, h, w], t [B] in [0, 1]. Conditioning frames enter as the clean latent with timestep COND_T
    and come out as exactly that latent; generated frames give x0 = x_t - t v. With a guidance g and the
    negative-prompt embedding `uncond` [1, 512, D], x0 = uncond + g (cond - uncond) (the paper's form;
    guidance_scale = g - 1 in the pipeline), both branches in one forward of batch 2B. Gradients flow
    through the transformer (student, fake score); nothing is detached here.
    """

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
        t_in = m * COND_T + (1 - m) * t.float().reshape(B, 1, 1, 1, 1)  # [B, 1, T, 1, 1], fp32 like the pipeline
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
# Text: the pipeline's Qwen2.5-VL encoding, a per-unique-prompt store, and online encoding.


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


def default_negative_prompt() -> str:
    """The pipeline's DEFAULT_NEGATIVE_PROMPT, the unconditional branch with `prepare --negative-prompt ""`."""
    from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import DEFAULT_NEGATIVE_PROMPT

    return DEFAULT_NEGATIVE_PROMPT


PROMPTS = "prompts"  # data sub-folder: <key>.txt (the caption) and, with --text cache, <key>.safetensors


def prompt_key(caption: str) -> torch.Tensor:
    """The first 8 bytes of sha256(caption) as 8 integers in [0, 255]: exact in every storage dtype (bf16
    included), so shards can carry it as an ordinary tensor. [8] float32."""
    return torch.tensor(list(hashlib.sha256(caption.encode()).digest()[:8]), dtype=torch.float32)


def key_name(key: torch.Tensor) -> str:
    return bytes(int(b) for b in key.round().tolist()).hex()


class PromptStore:
    """The data folder's prompts/: one caption file per unique prompt and, when cached, its embedding.

    get(keys [B, 8]) -> [B, 512, D]: the cached embedding (read once, kept while it is in use) or, when the
    data were prepared with --text online, the caption encoded now by `encoder` (tokenizer, text encoder)."""

    MEMO = 16  # 16 x 103 MB for the real encoder

    def __init__(self, folder: str, encoder=None):
        self.folder, self.encoder = os.path.join(folder, PROMPTS), encoder
        self.memo: OrderedDict[str, torch.Tensor] = OrderedDict()  # the last MEMO embeddings read

    def path(self, caption: str, ext: str) -> str:
        return os.path.join(self.folder, key_name(prompt_key(caption)) + ext)

    def put(self, caption: str, embedding: torch.Tensor | None) -> torch.Tensor:
        """Writes the caption (and its embedding) once; returns its key. Files are written atomically, so
        ranks that meet the same caption at the same time both write it harmlessly."""
        from safetensors.torch import save_file

        os.makedirs(self.folder, exist_ok=True)
        if not os.path.exists(self.path(caption, ".txt")):
            atomic_write(self.path(caption, ".txt"), lambda p: open(p, "w").write(caption))
        if embedding is not None and not os.path.exists(self.path(caption, ".safetensors")):
            atomic_write(self.path(caption, ".safetensors"),
                            lambda p: save_file({"text": embedding.contiguous().cpu()}, p))
        return prompt_key(caption)

    def get(self, keys: torch.Tensor, device) -> torch.Tensor:
        from safetensors.torch import load_file

        names = [key_name(k) for k in keys.cpu()]
        if self.encoder is not None:  # online: encode the batch's captions now
            captions = []
            for n in names:
                path = os.path.join(self.folder, n + ".txt")
                if not os.path.exists(path):
                    raise ValueError(f"{path}: caption missing (data prepared without it?)")
                captions.append(open(path).read())
            return encode_prompts(*self.encoder, captions, device).float()
        out = []
        for n in names:
            if n not in self.memo:
                path = os.path.join(self.folder, n + ".safetensors")
                if not os.path.exists(path):
                    raise ValueError(f"{path}: cached prompt embedding missing (prepare with --text cache, "
                                     "or train on data prepared with --text online)")
                self.memo[n] = load_file(path)["text"]
                if len(self.memo) > self.MEMO:
                    self.memo.popitem(last=False)
            self.memo.move_to_end(n)
            out.append(self.memo[n])
        return torch.stack(out).to(device).float()


# ---------------------------------------------------------------------------------------------------
# Encoders for prepare / sample: the Wan 2.1 VAE (dfd_video.vae, the same class and normalisation as Wan)
# and Qwen2.5-VL.


def encoder_dtype(args, device: torch.device) -> torch.dtype:
    """--dtype for the text encoder: bf16 when asked or on CUDA (auto), else fp32."""
    return torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda") else torch.float32


class CosmosEncoders:
    """encode_video(frames) -> latents of the clip and of its first frame alone; encode_text(captions) ->
    prompt keys (the captions, and with --text cache their embeddings, go to <out>/prompts/); negative()."""

    def __init__(self, args, device: torch.device):
        dtype = encoder_dtype(args, device)
        self.vae = WanVAE(args.model_dir, device)
        self.tokenizer, self.text_encoder = load_text_encoder(args.model_dir, dtype)
        self.text_encoder.to(device)
        self.device, self.cache = device, args.text == "cache"
        self.store = PromptStore(args.out)
        self.store_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.store_dtype]
        self.negative_prompt = negative_prompt(args.negative_prompt, default_negative_prompt())

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor, seed: int | None = None) -> dict[str, torch.Tensor]:
        """uint8 [T, H, W, 3] -> {"latents": [16, T', h, w], "image": [16, 1, h, w]}. The clip is a posterior
        sample with `seed` (None: the mode); the image latent is the first frame encoded alone, as the pipeline
        (and FastGen) encode the conditioning image: the mode. Stored separately so training never depends on the
        causal VAE giving the same first latent frame."""
        return {"latents": self.vae.encode_video(frames, seed)["latents"],
                "image": self.vae.encode_video(frames[:1])["latents"]}

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """{"text_key": [N, 8]}; with --text cache, captions not seen before are encoded and stored."""
        new = [c for c in dict.fromkeys(captions) if self.cache and not os.path.exists(self.store.path(c, ".safetensors"))]
        emb = encode_prompts(self.tokenizer, self.text_encoder, new, self.device).to(self.store_dtype) if new else []
        for c, e in zip(new, emb):
            self.store.put(c, e)
        return {"text_key": torch.stack([self.store.put(c, None) for c in captions])}

    def negative(self) -> dict[str, torch.Tensor]:
        return {"text": encode_prompts(self.tokenizer, self.text_encoder, [self.negative_prompt], self.device)[0]}


def read_tensors(path: str, flag: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:
        raise ValueError(f"{flag} {path}: not a readable safetensors file ({type(e).__name__})") from None


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
# The adapter dfd_video's drivers call (the interface: dfd_video.adapter.Adapter).


class CosmosAdapter:
    """Cosmos-Predict2.5 image-to-video. Data: latents [16, T, h, w], image [16, 1, h, w], text_key [8]."""

    name = "cosmos"
    data_keys = ("latents", "image", "text_key")
    # --lora-rank: the attention q/k/v/out projections (self and cross) and the two FFN linears of every block
    lora_targets = (r"transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
                    r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)")
    lora_loader = "CosmosLoraLoaderMixin"  # Cosmos2_5_PredictBasePipeline's load_lora_weights reads the export
    public_config = "cosmos_predict2.5_2b_transformer.json"  # `plan` without --model-dir (dfd_video/configs/)
    text_len = TEXT_LEN  # `plan`: the prompt tokens the cross-attention reads
    # `plan`: what autograd keeps for backward per clip while the network runs with grad, as {shape: (tensors in the
    # compute dtype, fp32 tensors)}; the keys are dfd_video.memory.shape_elements' (A: adaLN-LoRA width, ctx: the text
    # width after the Qwen projection, text: Qwen's concatenated width, patch: the patch embedding's input per token).
    # Counted with saved_tensors_hooks in diffusers 0.42.1's CosmosTransformerBlock under FSDP2 bf16 on torch 2.13's
    # CPU kernels (bench/bench_memory_plan.py --model cosmos: --count --dtype bf16 prints it, without --count the
    # check): per block the three adaLN modulations, per token since the timestep is per latent frame (each an [S, 3D]
    # shift / scale / gate, 9 of S x D, and an S x A hidden state), the LayerNorms' inputs and statistics, q / k / v
    # before and after RMSNorm (with its fp32 copies and statistics), SDPA's output and log-sum-exp, the FFN's hidden
    # state and GELU; the root: the patch embedding's input, the Qwen projection's input and output, the per-frame time
    # embedding, the per-token embedded timestep, the RoPE tables, the head's norm. "checkpointed": the [S, 3D] time
    # embedding every block reads, which checkpointing keeps (with LoRA the embedded timestep too, which the frozen
    # modulation does not save). With LoRA the frozen base saves less and each target layer adds its rank-r hidden
    # state.
    saved_for_backward = {
        "full": {"block": {"S*D": (39, 3), "S*F": (2, 0), "S*H": (0, 5), "S": (6, 0), "S*A": (3, 0), "T*D": (4, 1),
                           "T*H": (0, 1)},
                 "root": {"latent": (0, 1), "frames": (0, 2), "frames*D": (4, 0), "S*patch": (1, 0), "T*text": (1, 0),
                          "T*ctx": (2, 0), "S*D": (6, 0), "S": (2, 0), "S*A": (1, 0), "S*head_dim": (0, 2)},
                 "checkpointed": {"S*D": (3, 0)}},
        "lora": {"block": {"S*D": (27, 3), "S*F": (2, 0), "S*H": (0, 5), "S": (6, 0), "T*D": (3, 1), "T*H": (0, 1),
                           "S*r": (8, 0), "T*r": (2, 0)},
                 "root": {"latent": (0, 1), "frames": (0, 2), "T*ctx": (1, 0), "S*D": (2, 0), "S": (2, 0),
                          "S*head_dim": (0, 2)},
                 "checkpointed": {"S*D": (4, 0)}}}
    # under fp32 compute the RMSNorms' fp32 copies of q / k (3 of S x D and 1 of T x D per block) are the tensors
    # themselves: the same tables without them (--count --dtype fp32 counts 39 / 4, LoRA 27 / 3)
    for _k in ("full", "lora"):
        _b = saved_for_backward[_k]["block"]
        saved_for_backward[f"{_k}_fp32"] = {**saved_for_backward[_k],
                                            "block": {**_b, "S*D": (_b["S*D"][0], 0), "T*D": (_b["T*D"][0], 0)}}
    del _k, _b

    def __init__(self):
        self.compute_dtype: torch.dtype | None = None
        self.args = None
        self._vae = None
        self._prompts: PromptStore | None = None

    def configure(self, args) -> None:
        self.args = args

    def add_args(self, cmd: str, p) -> None:
        """Cosmos's flags and defaults on top of the shared ones."""
        if cmd == "prepare":
            self.add_prepare_args(p)
        elif cmd == "check":
            p.set_defaults(guidance=3.0, steps=300)  # as train
        elif cmd == "train":
            p.set_defaults(guidance=3.0, steps=300)  # paper Table 2 / Sec. 5.1.2: CFG 3.0, 300 DFD iterations
            p.description = "DFD post-training (default); --guidance is g in uncond + g (cond - uncond), 3.0"
        elif cmd == "sample":
            p.add_argument("--images", nargs="+", help="conditioning image per prompt (or one for all prompts); "
                           "resized to cover --height x --width and centre-cropped like the training frames")
        elif cmd == "export":
            p.add_argument("--student-ts", type=float, nargs="+", default=None,
                           help="the student's times, for the pipeline scheduler written to out/scheduler "
                                "(default: the training run's, else the paper's)")

    def load_network(self, model_dir: str, meta: bool = False) -> nn.Module:
        """CosmosTransformer3DModel from model_dir/transformer (or model_dir itself), fp32."""
        from diffusers import CosmosTransformer3DModel

        ensure_padding_mask_resize()
        return load_transformer(CosmosTransformer3DModel, model_dir, "Cosmos-Predict2.5", meta=meta)

    def init_buffers(self, net: nn.Module, device: torch.device | str = "cpu") -> None:
        pass  # no non-persistent buffers: RoPE is computed in forward

    def convert_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Original Cosmos key names (FastGen / cosmos-predict2.5 checkpoints, `net.` stripped) -> diffusers',
        with diffusers' own single-file converter."""
        from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

        if not any(k.startswith(("blocks.", "x_embedder.", "final_layer.", "t_embedder.")) for k in sd):
            return sd
        return convert_cosmos_transformer_checkpoint_to_diffusers(dict(sd))

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        return list(net.transformer_blocks)

    def fp32_islands(self, net: nn.Module) -> Islands:
        return fp32_islands(net)  # diffusers' list: learnable_pos_embed (absent from Predict2.5)

    def denoiser(self, net: nn.Module | None, guidance: float | None, uncond: dict | None) -> nn.Module:
        return CosmosDenoiser(net, guidance, None if uncond is None else uncond["text"][None].float(), self.compute_dtype)

    def _store(self, device) -> PromptStore:
        if self._prompts is None:
            folder = self.args.data
            online = not any(f.endswith(".safetensors") for f in os.listdir(os.path.join(folder, PROMPTS)))
            encoder = open_sharded_text_encoder(self.args, device) if online else None
            self._prompts = PromptStore(folder, encoder)
        return self._prompts

    def make_cond(self, items: dict[str, torch.Tensor], device: torch.device) -> CosmosCond:
        prompt = items["text"].float() if "text" in items else self._store(device).get(items["text_key"], device)
        return CosmosCond(prompt.to(device), items["image"].float().to(device))

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
        if not os.path.isdir(os.path.join(self.args.data, PROMPTS)):
            raise ValueError(f"--data {self.args.data}: no {PROMPTS}/ folder (prepare it with cosmos_dfd.py)")

    # --- prepare / sample / export ------------------------------------------------------------------

    def add_prepare_args(self, p) -> None:
        p.add_argument("--text", default="cache", choices=("cache", "online"),
                       help="cache: store one embedding per unique caption (103 MB each for the real encoder); "
                            "online: store captions only, `train` encodes them with the sharded text encoder")

    def open_encoders(self, args, device: torch.device) -> CosmosEncoders:
        return CosmosEncoders(args, device)

    def sample_items(self, args, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Per video: {"text": [512, D], "image": [16, 1, h, w]}; from --prompts + --images, or --embeddings
        (tensors "text" [N, 512, D] and, unless --images is given, "image" [N, 16, 1, h, w])."""
        if args.num_frames < 5:
            raise ValueError(f"--num-frames {args.num_frames}: the first latent frame is the image; ask for at least "
                             "5 frames (one generated latent frame)")
        emb = read_tensors(args.embeddings, "--embeddings") if args.embeddings else {}
        if args.prompts is not None:
            prompts = read_prompts(args.prompts)
            tokenizer, te = load_text_encoder(args.model_dir, self.compute_dtype or torch.float32)
            text = encode_prompts(tokenizer, te.to(device), prompts, device).float() if prompts else None
        else:
            text = emb.get("text")
        if text is None or text.ndim != 3:
            raise ValueError(f"--prompts {args.prompts}: no prompts (one per line)" if args.prompts else
                             f"--embeddings {args.embeddings}: need a tensor 'text' of shape [N, 512, D]")
        text = text.float()
        h, w = args.height // 8, args.width // 8
        if args.images:
            if len(args.images) not in (1, len(text)):
                raise ValueError(f"--images: {len(args.images)} images for {len(text)} prompts (give one, or one "
                                 "per prompt); every video needs its conditioning frame")
            paths = args.images * len(text) if len(args.images) == 1 else args.images
            vae = self._decoder(args, device)
            image = torch.stack([vae.encode_video(read_image(p, args.height, args.width))["latents"] for p in paths])
        elif "image" in emb:
            image = emb["image"].float()
        else:
            raise ValueError("missing conditioning frame: give --images (one per prompt, or one for all) or "
                             "--embeddings with an 'image' tensor [N, 16, 1, h, w]")
        if image.ndim != 5 or tuple(image.shape[1:2]) != (16,) or tuple(image.shape[3:]) != (h, w) or len(image) != len(text):
            raise ValueError(f"conditioning image latents have shape {tuple(image.shape)}; need [{len(text)}, 16, 1, "
                             f"{h}, {w}] for --height {args.height} --width {args.width}")
        return [{"text": t.cpu(), "image": i.cpu()} for t, i in zip(text, image)]

    def noise_shape(self, args) -> tuple[int, int, int, int]:
        return (16, (args.num_frames - 1) // 4 + 1, args.height // 8, args.width // 8)

    def _decoder(self, args, device) -> WanVAE:
        if self._vae is None:
            self._vae = WanVAE(args.model_dir, device)
        return self._vae

    def decode(self, latents: torch.Tensor, args) -> torch.Tensor:
        return self._decoder(args, latents.device).decode(latents)

    def save_pretrained(self, net: nn.Module, out: str) -> None:
        """The transformer folder (config.json + safetensors; CosmosTransformer3DModel.from_pretrained(out)) and
        out/scheduler/, the FlowMatchEulerDiscreteScheduler under which the pipeline runs
        dfd.sample(..., renoise=False)."""
        net.save_pretrained(out, safe_serialization=True)
        ts = tuple(self.args.student_ts or trained_student_ts(self.args.ckpt))
        scheduler, err = pipeline_scheduler(ts)
        scheduler.save_pretrained(os.path.join(out, "scheduler"))
        scheduler.set_timesteps(len(ts))
        if err > 0.01:
            print(f"warning: no FlowMatchEulerDiscreteScheduler config reproduces the student times {list(ts)}; "
                  "the pipeline will run the nearest ones below", file=sys.stderr)
        print(f"pipeline scheduler: FlowMatchEulerDiscreteScheduler(shift={scheduler.config.shift}, "
              f"num_train_timesteps={scheduler.config.num_train_timesteps}), {len(ts)} steps at "
              f"{[round(x, 4) for x in scheduler.sigmas[:-1].tolist()]} (student times {list(ts)}, max diff {err:.2g})",
              file=sys.stderr)


    # --- check ---------------------------------------------------------------------------------------

    def check_items(self, net: nn.Module, shape, generator: torch.Generator):
        """Random prompt embeddings [512, D] (prompt, negative prompt) and a random image latent [16, 1, h, w]."""
        cfg = net.config
        dim = cfg.crossattn_proj_in_channels if cfg.use_crossattn_projection else cfg.text_embed_dim
        text = lambda: torch.randn(TEXT_LEN, dim, generator=generator)
        image = torch.randn(shape[0], 1, *shape[2:], generator=generator)
        return {"text": text(), "image": image}, {"text": text()}

    def pipeline_x0(self, net: nn.Module, x_t: torch.Tensor, t: float, cond: CosmosCond, uncond: dict,
                    guidance: float, args):
        """Cosmos2_5_PredictBasePipeline.__call__ itself for one Euler step to t = 0, conditioned on the image that
        cond.image decodes to (a one-frame `video=`; it re-encodes it with its VAE, so our side is given that
        latent), with guidance_scale = g - 1; compared on the generated frames only (the pipeline's conditioning
        frame drifts by design, see the module docstring)."""
        from diffusers import Cosmos2_5_PredictBasePipeline

        if 1.0 < guidance <= 2.0:
            raise ValueError(f"--guidance {guidance}: the pipeline guides only when g - 1 > 1; compare at g = 1 or g > 2")
        vae = self._decoder(args, x_t.device)
        frames = vae.decode(cond.image)  # uint8 [1, Tc', H, W, 3]
        image = torch.stack([vae.encode_video(f)["latents"] for f in frames])  # what the pipeline's VAE sees
        video = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # [1, 3, 1, H, W] in [-1, 1]
        pipe = Cosmos2_5_PredictBasePipeline(text_encoder=None, tokenizer=None, transformer=net, vae=vae.vae,
                                             scheduler=one_step_scheduler(t), safety_checker=_LatentsOnly())
        pipe.set_progress_bar_config(disable=True)
        _, _, T, h, w = x_t.shape
        dt = self.compute_dtype or torch.float32  # as its text encoder would hand them over (the pipeline does not cast)
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


def trained_student_ts(ckpt: str) -> tuple[float, ...]:
    """The --student-ts a training run used (its args.json, next to checkpoints/), else the paper's."""
    try:
        run = os.path.dirname(os.path.dirname(latest_checkpoint(ckpt)))
        with open(os.path.join(run, "args.json")) as f:
            return tuple(json.load(f)["student_ts"])
    except (ValueError, OSError, KeyError, json.JSONDecodeError):
        return dfd.STUDENT_TS


def open_sharded_text_encoder(args, device: torch.device):
    """(tokenizer, text encoder) for online prompt encoding during training: loaded in the compute dtype and,
    under torchrun, sharded with FSDP2 per decoder layer (its vision tower is a unit of its own that is never
    gathered), so each rank holds 1/world of the 8.3B parameters."""
    d = setup_distributed(args.device)  # idempotent: the driver has already started the group
    dtype = encoder_dtype(args, device)
    tokenizer, te = load_text_encoder(args.model_dir, dtype)
    if d.world > 1:
        layers = list(te.model.language_model.layers) + [te.model.visual]
        shard(te, layers, d, None, None, checkpointing=False, trainable=False)
    else:
        te.to(device)
    return tokenizer, te


def main(argv=None) -> Any:
    """The subcommands (dfd_video's drivers) with the Cosmos adapter; no subcommand means train."""
    return cli_main(CosmosAdapter(), argv, description=__doc__)


if __name__ == "__main__":
    main()
