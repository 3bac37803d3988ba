"""VBench-I2V background consistency with the input image ("I2V background"), after
vbench2_beta_i2v/i2v_background.py (github.com/Vchitect/VBench), with the preprocessing of vbench2_beta_i2v/utils.py
(dreamsim_transform, dreamsim_transform_Image) and the model of compute_i2v_background (`dreamsim(pretrained=True)`:
the DreamSim ensemble, dreamsim.py here).

Frames sampled: every frame of the video, and the conditioning image given with --i2v-images (one per prompt, or one
  for all), resized to cover the video's size and centre-cropped as for I2V subject (i2v_subject.py).
Model: DreamSim's ensemble embedding (DINO + CLIP + OpenCLIP ViT-B/16 with DreamSim's LoRA; --vbench-dreamsim).
Preprocessing (both the frames and the image): float 0..255, resized to 224 x 224 regardless of the aspect ratio
  (bicubic, antialiased: torchvision's default for tensors since 0.17, and what PIL does to VBench's image),
  divided by 255; no mean / std here (each DreamSim branch applies its own). VBench resizes the image with PIL,
  which clamps and rounds to uint8 after each of its two passes, so the two part at sharp edges; under torchvision
  older than 0.17 VBench's frames would be resized without antialiasing.
Score per video: the I2V subject formula on these embeddings,
  0.4 * max_t max(0, cos(g, f_t)) + 0.3 * mean_{t>=1} c_t + 0.3 * min_{t>=1} c_t,  c_t = max(0, cos(f_t, f_{t-1})),
and the dimension is the mean over videos."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dfd_video.evaluation.vbench.common import Dimension, batched, to_float_nchw
from dfd_video.evaluation.vbench.i2v_subject import i2v_score

NAME = "i2v_background"
SIZE = 224


def preprocess(frames: np.ndarray) -> torch.Tensor:
    """dreamsim_transform(224): uint8 [T, H, W, 3] -> float32 [T, 3, 224, 224] in about 0..1 (bicubic overshoot is
    kept, as torchvision keeps it on float tensors)."""
    x = to_float_nchw(frames)
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", align_corners=False, antialias=True)
    return x / 255.0


class I2VBackground(Dimension):
    name = NAME
    needs_image = True

    def __call__(self, frames: np.ndarray, image: np.ndarray | None = None, fps: float | None = None) -> float:
        if image is None:
            raise ValueError("i2v_background needs the conditioning image (--i2v-images)")
        embed = self.model.embed
        return i2v_score(batched(embed, preprocess(image[None]))[0], batched(embed, preprocess(frames)))
