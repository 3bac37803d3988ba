"""VBench-I2V subject consistency with the input image ("I2V subject"), after vbench2_beta_i2v/i2v_subject.py
(github.com/Vchitect/VBench), with the preprocessing of vbench2_beta_i2v/utils.py (dino_transform_internet,
dino_transform_Image_internet) and the model of its init_submodules (DINO ViT-B/16, dino_vitb16).

Frames sampled: every frame of the video, and the conditioning image given with --i2v-images (one per prompt, or
  one for all). VBench-I2V reads an image already cropped to the video's aspect ratio; here the image is
  resized to cover the video's size and centre-cropped, the way `cosmos_dfd.py sample --images` conditions on it.
Model: DINO ViT-B/16 as for subject consistency (--vbench-dino; the normed CLS token).
Preprocessing (both the frames and the image): float 0..255, short side resized to 256 (bicubic, antialiased:
  torchvision's default for tensors, and what PIL does to VBench's image), centre-cropped to 224 x 224, divided by
  255, ImageNet mean / std.
Score per video: with f_t the L2-normalised frame features and g the image's,
  0.4 * max_t max(0, cos(g, f_t)) + 0.3 * mean_{t>=1} c_t + 0.3 * min_{t>=1} c_t,  c_t = max(0, cos(f_t, f_{t-1})),
and the dimension is the mean over videos."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dfd_video.evaluation.vbench.common import (IMAGENET_MEAN, IMAGENET_STD, Dimension, batched, center_crop,
                                     normalize, resize_short_side, to_float_nchw)
from dfd_video.evaluation.vbench.subject_consistency import dino_cls

NAME = "i2v_subject"
MAX_WEIGHT, MEAN_WEIGHT, MIN_WEIGHT = 0.4, 0.3, 0.3


def i2v_score(image_feat: torch.Tensor, feats: torch.Tensor) -> float:
    """VBench-I2V's weighted score from the image's features [D] and the frames' [T, D] (T >= 2)."""
    g = F.normalize(image_feat.double(), dim=-1)
    f = F.normalize(feats.double(), dim=-1)
    to_image = (f @ g).clamp(min=0)
    consec = (f[1:] * f[:-1]).sum(-1).clamp(min=0)
    return float(MAX_WEIGHT * to_image.max() + MEAN_WEIGHT * consec.mean() + MIN_WEIGHT * consec.min())


def preprocess(frames: np.ndarray) -> torch.Tensor:
    """dino_transform_internet(256, 224): uint8 [T, H, W, 3] -> float32 [T, 3, 224, 224]."""
    x = resize_short_side(to_float_nchw(frames), 256, mode="bicubic", antialias=True)
    return normalize(center_crop(x, 224) / 255.0, IMAGENET_MEAN, IMAGENET_STD)


class I2VSubject(Dimension):
    name = NAME
    needs_image = True

    def __call__(self, frames: np.ndarray, image: np.ndarray | None = None, fps: float | None = None) -> float:
        if image is None:
            raise ValueError("i2v_subject needs the conditioning image (--i2v-images)")
        embed = lambda x: dino_cls(self.model, x)  # noqa: E731
        return i2v_score(batched(embed, preprocess(image[None]))[0], batched(embed, preprocess(frames)))
