"""VBench aesthetic quality, after vbench/aesthetic_quality.py (github.com/Vchitect/VBench), with the preprocessing
of vbench/utils.py (clip_transform) and the models of init_submodules (CLIP ViT-L/14 and the LAION aesthetic
predictor's linear head).

Frames sampled: every frame of the video (VBench's load_video without num_frames).
Models: OpenAI CLIP ViT-L/14 as a transformers CLIP folder (`hf download openai/clip-vit-large-patch14`; its
  projected image embedding, 768-d), and the LAION aesthetic predictor v2 linear head `sa_0_4_vit_l_14_linear.pth`
  (github.com/LAION-AI/aesthetic-predictor: a torch state dict {"weight": [1, 768], "bias": [1]} of nn.Linear(768, 1)).
Preprocessing (clip_transform(224)): the frame as float 0..255, short side resized to 224 (bicubic, no
  antialiasing), centre-cropped to 224 x 224, divided by 255, CLIP's mean / std.
Score per video: the mean over frames of head(e_t / |e_t|) / 10, with e_t the frame's CLIP embedding (the head
predicts a 1-10 rating, so the score is about 0.1-1). The dimension is the mean over videos."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dfd_video.evaluation.vbench.common import (CLIP_MEAN, CLIP_STD, Dimension, batched, center_crop, clip_image_embeds,
                                     model_key, normalize, read_state_dict, resize_short_side, to_float_nchw)

NAME = "aesthetic_quality"


def preprocess(frames: np.ndarray) -> torch.Tensor:
    """clip_transform(224): uint8 [T, H, W, 3] -> float32 [T, 3, 224, 224]."""
    x = resize_short_side(to_float_nchw(frames), 224, mode="bicubic", antialias=False)
    return normalize(center_crop(x, 224) / 255.0, CLIP_MEAN, CLIP_STD)


def load_head(path: str, dim: int, flag: str = "--aesthetic-head") -> torch.nn.Linear:
    """The LAION linear head nn.Linear(dim, 1) from its state-dict file; ValueError naming the flag when the file
    is missing, unreadable, or not a [1, dim] weight and [1] bias."""
    sd = read_state_dict(path, flag)
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in sd.items()}
    if shapes != {"weight": (1, dim), "bias": (1,)}:
        raise ValueError(f"{flag} {path}: expected LAION's linear head {{weight: (1, {dim}), bias: (1,)}} for the "
                         f"CLIP embedding size {dim}, got {shapes}")
    head = torch.nn.Linear(dim, 1)
    head.load_state_dict({k: v.float() for k, v in sd.items()})
    return head.eval()


def aesthetic_score(embeds: torch.Tensor, head: torch.nn.Linear) -> float:
    """Mean over frames of head(normalised embedding) / 10, for CLIP embeddings [T, D]."""
    with torch.no_grad():
        return float((head(F.normalize(embeds.float(), dim=-1)).squeeze(-1) / 10).mean())


class AestheticQuality(Dimension):
    name = NAME

    def __init__(self, clip_model, clip_folder: str, head_path: str):
        super().__init__(clip_model, clip_folder)
        self.head_path = head_path
        self.head = load_head(head_path, clip_model.config.projection_dim)  # on the CPU, with the embeddings
        self.key = model_key(NAME, clip_folder, head_path)

    def __call__(self, frames: np.ndarray, image: np.ndarray | None = None, fps: float | None = None) -> float:
        embeds = batched(lambda x: clip_image_embeds(self.model, x), preprocess(frames))
        return aesthetic_score(embeds, self.head)
