"""DFD post-training of Cosmos-Predict2.5-2B image-to-video through diffusers (the paper's second setting).

The paper (Sec. 5.1.2, Table 2): Cosmos-Predict2.5-2B distilled into a 4-step student with DMD2, then 300 DFD
steps from that checkpoint; 81 frames at 480p, batch 16 (up to 128, Sec. 5.4), CFG 3.0, lr 1e-5 for student
and fake score, 5 fake-score updates per student update, p = 0.5. The loss and the loop are dfd.py's; this
file only says how Cosmos-Predict2.5 turns (x_t, t, condition) into an x0 estimate.

Conventions of diffusers 0.42.1 (read from pipeline_cosmos2_5_predict.py and transformer_cosmos.py)
  classes      Cosmos2_5_PredictBasePipeline; CosmosTransformer3DModel (transformer/), AutoencoderKLWan, the
               Wan 2.1 VAE (vae/), Qwen2_5_VLForConditionalGeneration (text_encoder/, Cosmos-Reason1-7B) with
               its tokenizer (tokenizer/), UniPCMultistepScheduler (scheduler/: flow sigmas from a Karras
               schedule, sigma_max 200, sigma_min 0.01). The real weights live on the branch
               `diffusers/base/post-trained` of nvidia/Cosmos-Predict2.5-2B; every command takes a local folder.
  latents      z = (VAE mode - latents_mean) / latents_std, [B, 16, T, H/8, W/8] with T = (frames - 1) / 4 + 1
               (81 frames -> 21 latent frames). The encoder is causal: latent frame 0 sees pixel frame 0 only.
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
               The unconditional branch keeps the image condition and swaps the prompt for the negative prompt
               (the pipeline's DEFAULT_NEGATIVE_PROMPT unless one is given). Guiding v or x0 is the same.
  torchvision  the transformer resizes its padding mask with torchvision, which the pipeline module imports
               only if it is installed; PyPI's torchvision does not import beside a CPU torch build.
               `ensure_padding_mask_resize` gives the transformer module the one function it calls where
               torchvision is missing. The pipeline's `image=` path needs torchvision too (to_tensor); a
               one-frame `video=` with num_latent_conditional_frames=1 is the same conditioning without it.
"""
from __future__ import annotations

import json
import os
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import dfd

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
# Loading.


def load_transformer(folder: str, dtype: torch.dtype = torch.float32):
    """CosmosTransformer3DModel from a diffusers folder (config.json + safetensors, sharded or not), built from
    its config and filled with load_state_dict so that it works without `accelerate` (diffusers' from_pretrained
    needs it for this class). fp32 by default: FSDP's MixedPrecisionPolicy casts for compute."""
    from diffusers import CosmosTransformer3DModel
    from safetensors.torch import load_file

    ensure_padding_mask_resize()
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder}: not a diffusers transformer folder (no config.json)")
    model = CosmosTransformer3DModel.from_config(CosmosTransformer3DModel.load_config(folder))
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"{folder}: missing weight file {name}")
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match config.json; missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model = model if dtype == torch.float32 else model.to(dtype)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# The condition and the denoiser adapter.


@dataclass
class CosmosCond:
    """What the networks are conditioned on, for a batch of B videos.

    prompt:   [B, 512, D] text embedding (D = 100352 for the real model).
    image:    [B, 16, Tc, h, w] normalised clean latent of the conditioning frame(s) (Tc = 1: the image).
    negative: [B or 1, 512, D] embedding of the negative prompt, used by a guided teacher only.
    """

    prompt: torch.Tensor
    image: torch.Tensor
    negative: torch.Tensor | None = None

    def to(self, device, dtype: torch.dtype | None = None) -> "CosmosCond":
        move = lambda x: None if x is None else x.to(device=device, dtype=dtype or x.dtype)
        return CosmosCond(move(self.prompt), self.image.to(device), move(self.negative))


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


class CosmosDenoiser(torch.nn.Module):
    """denoise(x_t, t, cond) -> x0 for Cosmos-Predict2.5, with image conditioning and optional guidance.

    x_t [B, 16, T, h, w], t [B] in [0, 1]. Conditioning frames enter as the clean latent with timestep COND_T
    and come out as exactly that latent; generated frames give x0 = x_t - t v. With g != 1 and a negative
    embedding in `cond`, x0 = uncond + g (cond - uncond) (the paper's form; guidance_scale = g - 1 in the
    pipeline). Wraps the transformer so that the student and the fake score are trainable modules
    (gradients flow through the transformer; nothing is detached here).
    """

    def __init__(self, transformer: torch.nn.Module, g: float = 1.0):
        super().__init__()
        self.transformer = transformer
        self.g = g

    def velocity(self, x_in: torch.Tensor, t_in: torch.Tensor, cond_mask: torch.Tensor,
                 prompt: torch.Tensor) -> torch.Tensor:
        dtype = next(self.transformer.parameters()).dtype
        padding_mask = x_in.new_zeros(1, 1, *x_in.shape[-2:], dtype=dtype)  # all zeros, as in the pipeline
        return self.transformer(hidden_states=x_in.to(dtype), timestep=t_in,  # t stays fp32, as in the pipeline
                                encoder_hidden_states=prompt.to(dtype), condition_mask=cond_mask.to(dtype),
                                padding_mask=padding_mask, return_dict=False)[0].float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: CosmosCond) -> torch.Tensor:
        B, _, T, h, w = x_t.shape
        m = frame_mask(T, cond.image.shape[2], x_t.device)  # [1, 1, T, 1, 1]
        x_in = with_image(x_t.float(), cond.image.float())
        t_in = m * COND_T + (1 - m) * t.float().reshape(B, 1, 1, 1, 1)  # [B, 1, T, 1, 1]
        cond_mask = m.expand(B, 1, T, h, w)
        if self.g != 1.0 and cond.negative is not None:  # one call on the doubled batch [cond; uncond]
            prompt = torch.cat([cond.prompt, cond.negative.expand(B, -1, -1).to(cond.prompt.dtype)])
            v_c, v_u = self.velocity(torch.cat([x_in, x_in]), torch.cat([t_in, t_in]),
                                     cond_mask.repeat(2, 1, 1, 1, 1), prompt).chunk(2)
            x0 = dfd.cfg(x_in - t_in * v_c, x_in - t_in * v_u, self.g)
        else:
            x0 = x_in - t_in * self.velocity(x_in, t_in, cond_mask, cond.prompt)
        return with_image(x0, cond.image.float()).to(x_t.dtype)
