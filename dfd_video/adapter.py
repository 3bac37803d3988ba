"""What a model contributes: the Adapter interface the drivers call, and the pieces Wan and Cosmos share.

A model script (wan_dfd.py, cosmos_dfd.py) defines one adapter object and passes it to dfd_video.cli.main. The
drivers never look inside the networks: they only call these members.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Protocol

import torch
import torch.nn as nn

from dfd_video.weights import load_weights, read_raw

# The negative prompt FastGen's video data loader feeds the teacher's unconditional branch (its preset
# "neg_prompt_wan", fastgen/datasets/wds_dataloaders.py, wired by VideoLoaderConfig in fastgen/configs/data.py).
# Its Wan and its Cosmos DMD2 configs both use that loader, so a FastGen DMD2 student and critic of either model
# were distilled against this text (for Cosmos, encoded by Cosmos' own text encoder). docs/recipe.md has the sources.
FASTGEN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards")


def negative_prompt(flag: str | None, pipeline_default: str) -> str:
    """The text of CFG's unconditional branch from --negative-prompt: None (not given) -> FastGen's, "" -> the
    diffusers pipeline's default (`pipeline_default`), anything else -> itself."""
    if flag is None:
        return FASTGEN_NEGATIVE_PROMPT
    return flag if flag else pipeline_default


class Adapter(Protocol):
    name: str                                   # tag written into manifests and checkpoints
    data_keys: tuple[str, ...]                  # per-sample tensors the shards must hold, e.g. ("latents", "text")
    compute_dtype: torch.dtype | None           # set by the drivers before denoiser(): bf16 under mixed precision

    def load_network(self, model_dir: str, meta: bool = False) -> nn.Module:
        """The base transformer in fp32 (the teacher; also the architecture of the student and fake score).
        meta=True: the architecture alone on the meta device; init_buffers fills what the weights do not hold."""

    def init_buffers(self, net: nn.Module, device: torch.device) -> None:
        """Rebuilds the non-persistent buffers (not in any state dict, e.g. RoPE tables) of a network whose storage
        was allocated empty (to_empty) after a meta-device build."""

    def convert_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Original-repo key names -> the network's (identity when they already match)."""

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        """The repeated blocks: FSDP2 units and activation-checkpointing units."""

    def fp32_islands(self, net: nn.Module) -> Any:
        """What stays fp32 under bf16 mixed precision: a dfd_video.distributed.Islands (modules, bare parameter
        names); for a diffusers model, dfd_video.distributed.fp32_islands(net) (its _keep_in_fp32_modules)."""

    def denoiser(self, net: nn.Module | None, guidance: float | None, uncond: dict | None) -> nn.Module:
        """(x_t [B, C, T, H, W], t [B] in [0, 1], cond) -> x0_hat. With guidance g: uncond + g (cond - uncond),
        against the stored negative-prompt conditioning `uncond`."""

    def make_batch(self, items: dict[str, torch.Tensor], device: torch.device) -> tuple:
        """(x_real, cond[, mask]): one dfd.Batch from stacked samples."""

    def make_cond(self, items: dict[str, torch.Tensor], device: torch.device) -> Any:
        """The conditioning alone (sampling)."""

    def check_data(self, shapes: dict[str, tuple], net: nn.Module) -> None:
        """Raise ValueError when prepared data of these per-sample shapes cannot feed `net`."""

    def open_encoders(self, args: argparse.Namespace, device: torch.device) -> Any:
        """For `prepare`: an object with encode_video(frames uint8 [T, H, W, 3], seed) -> dict (seed: the VAE posterior
        sample's, None: its mode), encode_text(list[str]) -> dict of [N, ...], negative() -> dict (the unconditional
        branch, from --negative-prompt via negative_prompt()) and negative_prompt (that text)."""

    def sample_items(self, args: argparse.Namespace, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Per-video conditioning for `sample` (no batch dim)."""

    def noise_shape(self, args: argparse.Namespace) -> tuple[int, ...]:
        """Latent shape of one sample [C, T, H, W]."""

    def decode(self, latents: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
        """Latents [B, C, T, H, W] -> uint8 video [B, T, H, W, 3]."""

    def save_pretrained(self, net: nn.Module, out: str) -> None:
        """The export format."""

    # For `check`:
    def check_items(self, net: nn.Module, shape: tuple[int, ...],
                    generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Stand-in conditioning when no --data is given: (one sample's items as make_cond takes them, the
        negative-prompt tensors), random, of the shapes `net` takes, for latents of `shape` [C, T, H, W]."""

    def pipeline_x0(self, net: nn.Module, x_t: torch.Tensor, t: float, cond: Any, uncond: dict, guidance: float,
                    args: argparse.Namespace) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        """The diffusers pipeline's own guided x0 for one step from x_t [1, C, T, H, W] at t (its transformer calls
        and CFG, with one_step_scheduler(t)); returns (x0, the conditioning to give our denoiser for the same
        computation, the 0/1 mask of the elements to compare or None for all)."""

    # Optional: add_args(cmd, parser) adds flags / changes defaults per subcommand; configure(args) sees the parsed
    # arguments before the driver runs; probe_items(args, device) -> list[dict] gives the training probes the
    # conditions of --probe-prompts (without it, probes use the data's conditions).
    # For --lora-rank / export --lora (dfd_video/lora.py): lora_targets, a regular expression peft matches against
    # whole module names, and lora_loader, the name of the diffusers LoRA mixin of the model's pipeline.


class GuidedDenoiser(nn.Module):
    """Base of the flow-matching denoisers: holds the network, the guidance g (None or 1.0: no guidance), the
    negative-prompt embedding `uncond` [1, L, D] for the unconditional branch, and the compute dtype. Subclasses
    implement forward(x_t, t, cond) -> x0."""

    def __init__(self, net: nn.Module, guidance: float | None = None, uncond: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.net, self.guidance, self.compute_dtype = net, guidance, compute_dtype
        if guidance is not None and uncond is None:
            raise ValueError("guidance needs the negative-prompt embedding")
        self.register_buffer("uncond", uncond, persistent=False)

    @property
    def guided(self) -> bool:
        return self.guidance is not None and self.guidance != 1.0


def transformer_folder(model_dir: str, family: str) -> str:
    """model_dir/transformer (a pipeline folder) or model_dir itself (a transformer folder), with a config.json."""
    folder = os.path.join(model_dir, "transformer") if os.path.isdir(os.path.join(model_dir, "transformer")) else model_dir
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise ValueError(f"--model-dir {model_dir}: no transformer/config.json (expected a diffusers {family} folder)")
    return folder


def load_transformer(cls: type, model_dir: str, family: str, fix: Any = None, meta: bool = False) -> nn.Module:
    """A diffusers transformer class from its folder in fp32: built from config.json on the meta device, then filled
    with load_weights, so a corrupt or mismatched folder gets one clear line (and no accelerate is needed).
    fix(net) rebuilds what the file does not hold (non-persistent buffers). meta=True: the architecture alone, on
    the meta device (no memory, no weights read; fix is the caller's once the weights are allocated)."""
    folder = transformer_folder(model_dir, family)
    try:
        with torch.device("meta"):
            net = cls.from_config(cls.load_config(folder))
    except Exception as e:
        raise ValueError(f"{os.path.join(folder, 'config.json')}: not a {cls.__name__} config "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if meta:
        return net.eval()
    net = net.to_empty(device="cpu")
    if fix is not None:
        fix(net)
    load_weights(net, read_raw(folder), f"--model-dir {folder}")
    return net.eval()


def one_step_scheduler(t: float):
    """A FlowMatchEulerDiscreteScheduler (shift 1) that a diffusers pipeline, whatever num_inference_steps it asks
    for, runs as one Euler step from sigma = t to 0: x_t - t v, the pipeline's own x0 estimate at t."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    set_timesteps = sched.set_timesteps
    sched.set_timesteps = lambda num_inference_steps=None, device=None, **kw: set_timesteps(sigmas=[float(t)],
                                                                                            device=device)
    return sched
