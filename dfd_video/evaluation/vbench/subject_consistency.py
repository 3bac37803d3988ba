"""VBench subject consistency, after vbench/subject_consistency.py (github.com/Vchitect/VBench), with the
preprocessing of vbench/utils.py (dino_transform) and the model of init_submodules (DINO ViT-B/16, dino_vitb16).

Frames sampled: every frame of the video (VBench's load_video without num_frames).
Model: DINO ViT-B/16 (facebookresearch/dino), as a transformers ViTModel folder (`hf download facebook/dino-vitb16`);
  the feature is the final-layer-normed CLS token, which is what DINO's VisionTransformer.forward returns.
Preprocessing (dino_transform(224)): the frame as float 0..255, short side resized to 224 (bilinear, no
  antialiasing; long side int(224 * long / short)), NOT cropped, divided by 255, ImageNet mean / std. The
  non-square input reaches the ViT with its position embeddings interpolated the way DINO's
  interpolate_pos_encoding does it (bicubic, scale factor (n + 0.1) / sqrt(N), see dino_pos_embed).
Score per video: with f_t the L2-normalised features of frame t (t = 0..T-1),
  (1 / (T - 1)) * sum_{t>=1} (max(0, cos(f_t, f_{t-1})) + max(0, cos(f_t, f_0))) / 2,
and the dimension is the mean over videos (VBench divides the sum over all frame pairs by their count, the same
number when the videos have one length, as a `sample` folder's do)."""
from __future__ import annotations

import math
import types

import numpy as np
import torch
import torch.nn.functional as F

from dfd_video.evaluation.vbench.common import (IMAGENET_MEAN, IMAGENET_STD, Dimension, batched, load_pretrained,
                                     normalize, resize_short_side, to_float_nchw)

NAME = "subject_consistency"


def consistency_score(feats: torch.Tensor) -> float:
    """VBench's consistency formula on per-frame features [T, D] (T >= 2): the mean over t >= 1 of the average of
    the clipped-at-0 cosine similarities to the previous frame and to the first frame."""
    f = F.normalize(feats.double(), dim=-1)
    to_prev = (f[1:] * f[:-1]).sum(-1).clamp(min=0)
    to_first = (f[1:] * f[:1]).sum(-1).clamp(min=0)
    return float(((to_prev + to_first) / 2).mean())


def preprocess(frames: np.ndarray) -> torch.Tensor:
    """dino_transform(224): uint8 [T, H, W, 3] -> float32 [T, 3, 224, W'] (short side 224, no crop)."""
    x = resize_short_side(to_float_nchw(frames), 224, mode="bilinear", antialias=False)
    return normalize(x / 255.0, IMAGENET_MEAN, IMAGENET_STD)


def dino_pos_embed(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINO's VisionTransformer.interpolate_pos_encoding (facebookresearch/dino, vision_transformer.py) for a
    transformers ViTEmbeddings: unchanged for a square input with the trained patch count, else the patch grid's
    embeddings resized bicubically by scale factor ((H // p + 0.1) / sqrt(N), (W // p + 0.1) / sqrt(N)) (the
    0.1 avoids a floating-point error in the output size). transformers resizes to the exact size instead,
    which samples the grid at slightly different points."""
    pos = self.position_embeddings
    n_patch, N = embeddings.shape[1] - 1, pos.shape[1] - 1
    if n_patch == N and height == width:
        return pos
    side, dim = int(math.sqrt(N)), pos.shape[-1]
    h0, w0 = height // self.patch_size + 0.1, width // self.patch_size + 0.1
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(h0 / math.sqrt(N), w0 / math.sqrt(N)), mode="bicubic")
    assert grid.shape[-2:] == (int(h0), int(w0))
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def load_dino(folder: str, device, flag: str = "--vbench-dino"):
    """A ViTModel (no pooler) from `folder` whose position embeddings interpolate like DINO's."""
    from transformers import ViTModel
    model = load_pretrained(ViTModel, folder, flag, add_pooling_layer=False).to(device)
    model.embeddings.interpolate_pos_encoding = types.MethodType(dino_pos_embed, model.embeddings)
    return model


def dino_cls(model, x: torch.Tensor) -> torch.Tensor:
    """The CLS token after the final layer norm, [N, 768] for ViT-B/16, for preprocessed frames x [N, 3, H, W]."""
    out = model(pixel_values=x.to(model.device), interpolate_pos_encoding=True)
    return out.last_hidden_state[:, 0]


class SubjectConsistency(Dimension):
    name = NAME

    def __call__(self, frames: np.ndarray, image: np.ndarray | None = None, fps: float | None = None) -> float:
        return consistency_score(batched(lambda x: dino_cls(self.model, x), preprocess(frames)))
