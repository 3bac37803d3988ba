"""What a model contributes: the ModelSpec every driver reads, and the pieces Wan and Cosmos share.

A model script (wan_dfd.py, cosmos_dfd.py) subclasses ModelSpec and passes an instance to dfd_video.cli.main. Every
member a driver, the planner or the evaluation layer reads is declared here, once, with its contract; nothing else
reaches into a spec. A spec says what the model is (its networks, conditioning, encoders, export format), never what
a run decided: the dtype, the data folder, the student's times are arguments of the calls that need them.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, NamedTuple

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

# SF-DFD's negative prompt (csy2077/DFD-self-forcing configs/self_forcing_dfd.yaml; the original Wan repo's default),
# the teacher's unconditional branch there: `prepare` stores it for a Self-Forcing LMDB unless --negative-prompt says
# otherwise (docs/causal.md).
SELF_FORCING_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


class FastGenRecipe(NamedTuple):
    """What FastGen's DMD2 config for one architecture fixes (fastgen/configs/experiments/<config>): the guidance
    g, the lr of every network, the student's times, and the GAN head (discriminator type, teacher feature blocks)."""
    config: str
    guidance: float
    lr: float
    student_ts: tuple[float, ...]
    disc_type: str
    blocks: tuple[int, ...]


class ModelSpec:
    """The contract between a model and the drivers. Subclasses set the attributes and implement the methods."""

    # --- what the model is -------------------------------------------------------------------------------------
    name: str = ""                      # tag written into manifests and checkpoints ("wan", "cosmos")
    family: str = ""                    # the model family in messages ("Wan", "Cosmos-Predict2.5")
    transformer_class: str = ""         # the diffusers class of the base transformer, as its config.json names it
    #                                     (_class_name); a --model-dir naming another is refused before anything loads
    data_keys: tuple[str, ...] = ()     # per-sample tensors the prepared shards hold, e.g. ("latents", "text")
    defaults: dict[str, Any] = {}       # train / check flag defaults that differ from the shared ones (Wan's);
    #                                     "iterations": the run length when neither --iterations nor --student-steps
    #                                     is given (dfd_video.length)
    model_options: tuple[str, ...] = () # the dests of add_model_args' flags; drivers pass them to denoiser() as
    #                                     keyword arguments (model_options(spec, args))
    text_len: int = 512                 # conditioning tokens the cross-attention reads
    text_store: bool = False            # shards hold a caption key per sample; the data folder's prompts/ holds one
    #                                     embedding per unique caption (dfd_video.data.PromptStore)
    image_conditioned: bool = False     # the first latent frame is a clean conditioning image (`sample --images`)
    lora_targets: str = ""              # --lora-rank: regular expression peft matches against whole module names
    lora_loader: str = ""               # the diffusers LoRA mixin whose save_lora_weights writes `export --lora`
    base_model: str = ""                # the base model's Hugging Face id (the model card `export` writes)
    recipes: dict = {}                  # FastGen's DMD2 configs by (blocks, width): dfd_video.spec.FastGenRecipe

    # --- the networks ------------------------------------------------------------------------------------------
    def load_network(self, model_dir: str, meta: bool = False) -> nn.Module:
        """The base transformer in fp32 (the teacher; also the architecture of the student and fake score).
        meta=True: the architecture alone on the meta device; init_buffers fills what the weights do not hold."""
        raise NotImplementedError

    def init_buffers(self, net: nn.Module, device: torch.device | str) -> None:
        """Rebuilds the non-persistent buffers (e.g. RoPE tables) of a network allocated with to_empty."""

    def convert_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Original-repo key names -> the network's (identity when they already match)."""
        return sd

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        """The repeated blocks: FSDP2 units and activation-checkpointing units."""
        raise NotImplementedError

    def fp32_islands(self, net: nn.Module) -> Any:
        """What stays fp32 under bf16 mixed precision: a dfd_video.distributed.Islands."""
        from dfd_video.distributed import fp32_islands
        return fp32_islands(net)  # diffusers' _keep_in_fp32_modules

    def tokens(self, net: nn.Module, shape: tuple[int, ...]) -> int:
        """The transformer's sequence length for one clip's latents [C, T, H, W]: its patches (the log's tokens/s)."""
        pt, ph, pw = net.config.patch_size
        return (shape[1] // pt) * (shape[2] // ph) * (shape[3] // pw)

    def denoiser(self, net: nn.Module, guidance: float | None = None, uncond: dict | None = None,
                 dtype: torch.dtype | None = None, **options: Any) -> nn.Module:
        """(x_t [B, C, T, H, W], t [B] in [0, 1], cond) -> x0_hat, the network run in `dtype` (None: as stored).
        With guidance g: uncond + g (cond - uncond), against the negative-prompt tensors `uncond`. options: the
        model's own flags (model_options), their defaults when not given."""
        raise NotImplementedError

    def add_model_args(self, p: argparse.ArgumentParser, cmd: str) -> None:
        """The model's own flags of subcommand `cmd` ("train", "check", "sample", "export"), each with its default and
        source; those the denoiser takes are listed in model_options. None by default."""

    # --- DMD2's GAN head (--gan-weight, dfd_video/gan.py) and FastGen's recipe ----------------------------------
    def feature_grid(self, net: nn.Module, feature: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        """One block's output [B, N, D] (N tokens) as FastGen's discriminator reads it, [B, C, T, H, W], for latents
        of shape x_shape [B, C0, T0, H0, W0]."""
        raise NotImplementedError

    def feature_dim(self, net: nn.Module) -> int:
        """C of feature_grid: the discriminator's input channels (FastGen's inner_dim)."""
        raise NotImplementedError

    def fastgen_recipe(self, net: nn.Module) -> FastGenRecipe | None:
        """FastGen's DMD2 config for this architecture (`recipes`, matched on block count and width); None when it has
        none."""
        cfg = net.config
        return self.recipes.get((cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim))

    # --- conditioning and data ---------------------------------------------------------------------------------
    def make_batch(self, items: dict[str, torch.Tensor], device: torch.device) -> tuple:
        """(x_real, cond[, mask]): one dfd.Batch from stacked samples (text already looked up by the data code)."""
        raise NotImplementedError

    def make_cond(self, items: dict[str, torch.Tensor], device: torch.device) -> Any:
        """The conditioning alone, from stacked per-sample tensors without latents (sampling)."""
        raise NotImplementedError

    def check_data(self, shapes: dict[str, tuple], net: nn.Module) -> None:
        """Raises ValueError when prepared data of these per-sample shapes cannot feed `net`."""

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[C, T, H, W] of one clip's latents: the Wan 2.1 VAE's 4x time and 8x space compression (both models)."""
        return (16, (frames - 1) // 4 + 1, height // 8, width // 8)

    def open_encoders(self, model_dir: str, device: torch.device, dtype: torch.dtype, text: bool = True,
                      vae: bool = True) -> Any:
        """The base model's encoders: an object with encode_video(frames uint8 [T, H, W, 3], seed) -> dict (seed:
        the VAE posterior sample's; None: its mode), encode_text(list[str]) -> {"text": [N, L, D]}, .vae (a
        dfd_video.vae.WanVAE, whose decode gives uint8 videos) and .text_encoder (the module)."""
        raise NotImplementedError

    def pipeline_negative_prompt(self) -> str:
        """The diffusers pipeline's default negative prompt (`--negative-prompt ""`)."""
        return ""

    def text_encoder_blocks(self, text_encoder: nn.Module) -> list[nn.Module]:
        """The text encoder's FSDP2 units for online encoding under torchrun (text_store models)."""
        raise NotImplementedError

    def sample_items(self, encoders: Any, prompts: list[str] | None, embeddings: dict | None,
                     images: list[str] | None, size: tuple[int, int, int]) -> list[dict[str, torch.Tensor]]:
        """Per-video conditioning for `sample` (no batch dim) from prompts (encoded with `encoders`) or stored
        embeddings, and for image-conditioned models the images; size: (frames, height, width)."""
        raise NotImplementedError

    def export(self, net: nn.Module, out: str, student_ts: tuple[float, ...]) -> None:
        """Writes the export format into the folder `out` (the student's times: for a pipeline scheduler)."""
        net.save_pretrained(out, safe_serialization=True)

    def load_lines(self, student_ts: tuple[float, ...], transformer_from: str = "student") -> list[str]:
        """Python for the model card: loads the exported transformer (the folder in the variable `transformer_from`;
        `student` is the export folder, `base` the base model) into the model's diffusers pipeline as `pipe`; the
        last line samples a video."""
        raise NotImplementedError

    # --- students that are not one network call (the causal Wan, wan_dfd.CausalWanAdapter) ---------------------
    presets: dict[str, dict[str, Any]] = {}  # --preset NAME -> train flag defaults (a published recipe)
    describe_student: str = ""  # a line `train` logs about the student's architecture ("": nothing to say)

    def resolve(self, args: Any) -> "ModelSpec":
        """The spec of the student this command line names (e.g. Wan's causal one for a Self-Forcing .pt); the only
        member that reads args, called once by cli.main before the driver runs. Default: self."""
        return self

    def generate(self, student_ts: tuple[float, ...]) -> Any:
        """dfd.train's `generate` hook (how the student makes G), or None for dfd's one call on student_input."""
        return None

    def sample_video(self, student: nn.Module, noise: torch.Tensor, cond: Any, student_ts: tuple[float, ...],
                     generator: torch.Generator, renoise: bool) -> torch.Tensor:
        """The few-step sampler `sample` and the probes run: dfd.sample by default."""
        import dfd
        return dfd.sample(student, noise, cond, student_ts, generator=generator, renoise=renoise)

    # --- check: the preflight ----------------------------------------------------------------------------------
    def check_items(self, net: nn.Module, shape: tuple[int, ...],
                    generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Stand-in conditioning when `check` has no --data: (one sample's items as make_cond takes them, the
        negative-prompt tensors), random, of the shapes `net` takes, for latents of `shape` [C, T, H, W]."""
        raise NotImplementedError

    def pipeline_x0(self, net: nn.Module, x_t: torch.Tensor, t: float, cond: Any, uncond: dict, guidance: float,
                    dtype: torch.dtype | None, model_dir: str) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        """The diffusers pipeline's own guided x0 for one step from x_t [1, C, T, H, W] at t (its transformer calls
        and CFG, with one_step_scheduler(t)); returns (x0, the conditioning to give our denoiser for the same
        computation, the 0/1 mask of the elements to compare or None for all)."""
        raise NotImplementedError


def model_options(spec: ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    """The model's own flags (spec.model_options) that this subcommand has, for spec.denoiser(**options)."""
    return {k: getattr(args, k) for k in spec.model_options if hasattr(args, k)}


def negative_prompt(flag: str | None, pipeline_default: str) -> str:
    """The text of CFG's unconditional branch from --negative-prompt: None (not given) -> FastGen's, "" -> the
    diffusers pipeline's default (`pipeline_default`), anything else -> itself."""
    if flag is None:
        return FASTGEN_NEGATIVE_PROMPT
    return flag if flag else pipeline_default


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


def model_family_error(spec: ModelSpec, model_dir: str | None) -> str | None:
    """One line when the folder's model_index.json or transformer config names a transformer class other than the
    spec's (e.g. a Cosmos folder given to wan_dfd.py), read from the JSON files alone; None when it matches or the
    folder does not say."""
    if not model_dir or not spec.transformer_class or not os.path.isdir(model_dir):
        return None
    import json
    names = {}
    for file, pick in (("model_index.json", lambda d: (d.get("transformer") or [None, None])[1]),
                       ("transformer/config.json", lambda d: d.get("_class_name")),
                       ("config.json", lambda d: d.get("_class_name"))):
        try:
            with open(os.path.join(model_dir, file)) as f:
                found = pick(json.load(f))
        except (OSError, ValueError, AttributeError, IndexError, TypeError):
            continue
        if isinstance(found, str) and found.endswith("Model"):  # a transformer's class (not a pipeline's)
            names[file] = found
    wrong = {f: n for f, n in names.items() if n != spec.transformer_class}
    if not wrong:
        return None
    file, name = next(iter(wrong.items()))
    return (f"--model-dir {model_dir}: its {file} names a {name}, but this script is for {spec.family} models "
            f"({spec.transformer_class}); use the script of that model")


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
