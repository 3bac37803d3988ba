"""VBench background consistency, after vbench/background_consistency.py (github.com/Vchitect/VBench), with the
preprocessing of vbench/utils.py (clip_transform) and the model of init_submodules (CLIP ViT-B/32).

Frames sampled: every frame of the video (VBench's load_video without num_frames).
Model: OpenAI CLIP ViT-B/32 as a transformers CLIP folder (`hf download openai/clip-vit-base-patch32`); the feature
  is the projected image embedding (CLIP's encode_image: common.clip_image_embeds).
Preprocessing (clip_transform(224)): the frame as float 0..255, short side resized to 224 (bicubic, no
  antialiasing), centre-cropped to 224 x 224, divided by 255, CLIP's mean / std.
Score per video: the subject-consistency formula (subject_consistency.consistency_score) on these features;
the dimension is the mean over videos."""
from __future__ import annotations

import numpy as np
import torch

from dfd_video.evaluation.vbench.common import (CLIP_MEAN, CLIP_STD, Dimension, batched, center_crop, clip_image_embeds,
                                     normalize, resize_short_side, to_float_nchw)
from dfd_video.evaluation.vbench.subject_consistency import consistency_score

NAME = "background_consistency"


def preprocess(frames: np.ndarray) -> torch.Tensor:
    """clip_transform(224): uint8 [T, H, W, 3] -> float32 [T, 3, 224, 224]."""
    x = resize_short_side(to_float_nchw(frames), 224, mode="bicubic", antialias=False)
    return normalize(center_crop(x, 224) / 255.0, CLIP_MEAN, CLIP_STD)


class BackgroundConsistency(Dimension):
    name = NAME

    def __call__(self, frames: np.ndarray, image: np.ndarray | None = None, fps: float | None = None) -> float:
        return consistency_score(batched(lambda x: clip_image_embeds(self.model, x), preprocess(frames)))
