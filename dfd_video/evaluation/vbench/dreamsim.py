"""DreamSim (Fu et al., NeurIPS 2023), the image embedding VBench-I2V's I2V background compares frames with, restated
from github.com/ssundaram21/dreamsim (package 0.2.1: dreamsim/model.py, feature_extraction/extractor.py,
load_clip_as_dino.py, load_open_clip_as_dino.py, vision_transformer.py) because the package needs torchvision,
open_clip and timm, which this project's pins exclude. Only what `dreamsim(pretrained=True)` builds by default
(dreamsim_type "ensemble") and VBench calls (`embed`) is here, for inference.

The ensemble is three ViT-B/16 in DINO's layout (module and parameter names as DreamSim's, so its files load
unchanged), each with DreamSim's LoRA on every attention `qkv`, merged into the weights here:
  DINO ViT-B/16           feature: the CLS token of the last block's output, before the final norm (DreamSim's
                          "cls" feature hooks block 11), 768-d; input normalised with ImageNet's mean / std.
  OpenAI CLIP ViT-B/16    as DINO (load_clip_as_dino.py): ln_pre in place of pos_drop, QuickGELU, LayerNorm eps 1e-5;
                          feature: the final-normed CLS token @ proj, 512-d ("embedding"); CLIP's mean / std.
  OpenCLIP ViT-B/16       the same with GELU (load_open_clip_as_dino.py; LAION-400M weights); CLIP's mean / std
                          (DreamSim normalises both CLIPs with OpenAI's statistics).
embed(x), x [N, 3, 224, 224] in 0..1: the three features concatenated (1792-d), minus their mean over the 1792
entries, divided by their norm (normalize_embedding: embeddings are normalised by default).

Files, a DreamSim cache folder as `dreamsim(pretrained=True, cache_dir=DIR)` leaves it (the release zip
dreamsim_ensemble_checkpoint.zip unpacked into DIR, and DINO's backbone, which DreamSim fetches through torch.hub
with the hub folder set to DIR):
  checkpoints/dino_vitbase16_pretrain.pth   DINO's ViT-B/16 backbone (dl.fbaipublicfiles.com/dino/...)
  clip_vitb16_pretrain.pth.tar              {"state_dict": DINO-layout keys and "proj" [768, 512]}
  open_clip_vitb16_pretrain.pth.tar         the same for OpenCLIP
  ensemble_lora/adapter_config.json         peft's LoRA config (r, lora_alpha, target_modules ["qkv"])
  ensemble_lora/adapter_model.safetensors   (or adapter_model.bin) peft's LoRA weights
(DreamSim's dino_vitb16_pretrain.pth, DINO's projection head, is not used by the ensemble's features.) The release
zip's layout (files at its top level) is read from DreamSim's code, which checks its cache folder for them, not from
the zip itself.

Checked against the package's `dreamsim(pretrained=True)` (the commit in tests/data/vbench_reference.json) on
seeded random weights at a narrower width: tests/test_vbench_reference.py; live, at full size, with the package
installed: tests/test_dreamsim_reference.py."""
from __future__ import annotations

import json
import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from dfd_video.evaluation.vbench.common import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, read_state_dict

DINO_FILE = os.path.join("checkpoints", "dino_vitbase16_pretrain.pth")
CLIP_FILE, OPEN_CLIP_FILE = "clip_vitb16_pretrain.pth.tar", "open_clip_vitb16_pretrain.pth.tar"
LORA_DIR = "ensemble_lora"
HEAD_DIM = 64  # every DINO / CLIP ViT (S, B, L) has 64-wide heads: the head count is not in the weights


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, act: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), act, nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, eps: float, act: nn.Module):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), Attention(dim)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), Mlp(dim, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class ViT(nn.Module):
    """DINO's VisionTransformer at a fixed input size (224 x 224: the position embeddings are used as they are).
    clip=True: CLIP as DreamSim converts it (ln_pre as pos_drop, LayerNorm eps 1e-5), quick_gelu for OpenAI's."""

    def __init__(self, dim: int, depth: int, patch: int, tokens: int, clip: bool, quick_gelu: bool = False):
        super().__init__()
        eps = 1e-5 if clip else 1e-6
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.pos_drop = nn.LayerNorm(dim, eps=eps) if clip else nn.Identity()
        self.blocks = nn.ModuleList(Block(dim, eps, QuickGELU() if quick_gelu else nn.GELU()) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output [N, tokens, dim] (before the final norm)."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"DreamSim takes 224 x 224 images, got {x.shape[1] - 1} patches")
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return x


class Branch(nn.Module):
    """One backbone and, for the CLIPs, its projection (DreamSim's ViTExtractor: `.model`, `.proj`)."""

    def __init__(self, model: ViT, proj: torch.Tensor | None, mean, std):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std
        self.register_buffer("proj", proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.new_tensor(self.mean).view(1, 3, 1, 1)) / x.new_tensor(self.std).view(1, 3, 1, 1)
        tokens = self.model.tokens(x)
        if self.proj is None:  # DINO: "cls", the unnormed CLS token of block 11
            return tokens[:, 0]
        return self.model.norm(tokens)[:, 0] @ self.proj  # CLIP: "embedding", encode_image


class DreamSim(nn.Module):
    """The ensemble (DreamSim's PerceptualModel: `extractor_list` in the order DINO, CLIP, OpenCLIP)."""

    def __init__(self, branches: list[Branch]):
        super().__init__()
        self.extractor_list = nn.ModuleList(branches)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, 224, 224] in 0..1 -> [N, 1792]: concatenated features, centred and unit-normed per image."""
        x = x.to(self.extractor_list[0].model.cls_token)
        e = torch.cat([b(x) for b in self.extractor_list], dim=-1)
        e = e - e.mean(dim=-1, keepdim=True)
        return e / e.norm(dim=-1, keepdim=True)


def vit_from_state_dict(sd: dict, clip: bool, quick_gelu: bool, where: str) -> ViT:
    """A ViT sized from its weights, loaded strictly; ValueError naming `where` when they do not fit."""
    try:
        dim = sd["cls_token"].shape[-1]
        patch = sd["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        model = ViT(dim, depth, patch, sd["pos_embed"].shape[1], clip, quick_gelu)
        model.load_state_dict(sd, strict=True)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: not a DINO-layout ViT state dict ({type(e).__name__}: {str(e)[:160]})") from None
    if dim % HEAD_DIM or (224 // patch) ** 2 + 1 != sd["pos_embed"].shape[1]:
        raise ValueError(f"{where}: width {dim} and {sd['pos_embed'].shape[1]} tokens: not a ViT with 64-wide heads "
                         "on 224 x 224 images")
    return model


def merge_lora(model: nn.Module, folder: str, where: str) -> int:
    """Adds peft's LoRA update scale * B @ A (scale = lora_alpha / r) to each targeted Linear of `model`, whose
    module names are those the adapter was saved with (after peft's "base_model.model." prefix). Every adapter
    entry must name a module and every module the config targets must have one. Returns the count merged."""
    from safetensors.torch import load_file
    try:
        with open(os.path.join(folder, "adapter_config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}/adapter_config.json: unreadable ({type(e).__name__})") from None
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out") if cfg.get(k)]
    if unsupported or cfg.get("bias", "none") != "none":
        raise ValueError(f"{where}/adapter_config.json: {unsupported or ['bias']} set; DreamSim's adapter has none")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{where}/adapter_config.json: no LoRA rank r / lora_alpha (got {r!r}, {alpha!r})")
    scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    path = os.path.join(folder, "adapter_model.safetensors")
    if os.path.isfile(path):
        sd = load_file(path)
    else:
        path = os.path.join(folder, "adapter_model.bin")
        sd = read_state_dict(path, where)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ValueError(f"{path}: unexpected entry {key}")
        pairs.setdefault(name, {})[part[0]] = value
    modules = dict(model.named_modules())
    targets = cfg.get("target_modules") or []
    # peft: a list names modules by their last name(s); a string is a regular expression over the full name
    hit = ((lambda n: re.fullmatch(targets, n) is not None) if isinstance(targets, str) else
           (lambda n: any(n == t or n.endswith("." + t) for t in targets)))
    wanted = {n for n, m in modules.items() if isinstance(m, nn.Linear) and hit(n)}
    if set(pairs) != wanted:
        extra, missing = sorted(set(pairs) - wanted), sorted(wanted - set(pairs))
        raise ValueError(f"{path}: LoRA entries do not match the model's {targets!r} layers "
                         f"({len(missing)} without one, e.g. {missing[:1]}; {len(extra)} unknown, e.g. {extra[:1]})")
    for name, ab in pairs.items():
        weight = modules[name].weight
        if set(ab) != {"A", "B"} or ab["B"].shape[0] != weight.shape[0] or ab["A"].shape[1] != weight.shape[1]:
            raise ValueError(f"{path}: {name}: LoRA A / B missing or of the wrong shape for {tuple(weight.shape)}")
        with torch.no_grad():
            weight += (scale * ab["B"].double() @ ab["A"].double()).to(weight.dtype)
    return len(pairs)


def load_dreamsim(folder: str, device, flag: str) -> DreamSim:
    """The DreamSim ensemble from a DreamSim cache folder (see the module docstring), LoRA merged, in eval mode;
    ValueError naming the flag and the missing or malformed file."""
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {folder}: no such folder")
    where = lambda name: f"{flag} {os.path.join(folder, name)}"  # noqa: E731
    for name in (DINO_FILE, CLIP_FILE, OPEN_CLIP_FILE, os.path.join(LORA_DIR, "adapter_config.json")):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"{where(name)}: missing (a DreamSim cache folder holds {DINO_FILE}, {CLIP_FILE}, "
                             f"{OPEN_CLIP_FILE} and {LORA_DIR}/; docs/evaluation.md says how to get them)")
    dino = read_state_dict(os.path.join(folder, DINO_FILE), flag)
    branches = [Branch(vit_from_state_dict(dino, False, False, where(DINO_FILE)), None, IMAGENET_MEAN, IMAGENET_STD)]
    for name, quick in ((CLIP_FILE, True), (OPEN_CLIP_FILE, False)):
        sd = read_state_dict(os.path.join(folder, name), flag)
        sd = dict(sd.get("state_dict", sd))
        if not isinstance(sd.get("proj"), torch.Tensor):
            raise ValueError(f"{where(name)}: no 'proj' entry (DreamSim's CLIP-as-DINO files carry one)")
        proj = sd.pop("proj")
        branches.append(Branch(vit_from_state_dict(sd, True, quick, where(name)), proj, CLIP_MEAN, CLIP_STD))
    model = DreamSim(branches)
    merge_lora(model, os.path.join(folder, LORA_DIR), where(LORA_DIR))
    return model.eval().requires_grad_(False).to(device)
