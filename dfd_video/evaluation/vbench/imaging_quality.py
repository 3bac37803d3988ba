"""VBench imaging quality, after vbench/imaging_quality.py (github.com/Vchitect/VBench), with the model of its
init_submodules (pyiqa's MUSIQ with the SPAQ checkpoint musiq_spaq_ckpt-358bb6af.pth; here dfd_video/evaluation/vbench/musiq.py).

Frames sampled: every frame of the video (VBench's load_video without num_frames).
Model: MUSIQ trained on SPAQ (--musiq), one quality score per frame (0-100 scale).
Preprocessing (VBench's default "longer" mode): the frame as float 0..255; when its longer side exceeds 512, resized
  (bilinear, no antialiasing) to (int(s H), int(s W)) with s = 512 / max(H, W); divided by 255. MUSIQ then builds
  its own multi-scale patches (musiq.multiscale_patches).
Score per video: the mean over frames of the MUSIQ score, / 100; the dimension is the mean over videos (VBench
divides that mean by 100 instead: the same number).
The paper leaves this dimension out of its quality average, and so does the report's."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dfd_video.evaluation.vbench.common import Dimension, batched, to_float_nchw

NAME = "imaging_quality"


def preprocess(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H', W'] in 0..1, the longer side at most 512."""
    x = to_float_nchw(frames)
    h, w = x.shape[-2:]
    if max(h, w) > 512:
        s = 512.0 / max(h, w)
        x = F.interpolate(x, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False, antialias=False)
    return x / 255.0


class ImagingQuality(Dimension):
    name = NAME

    def __call__(self, frames: np.ndarray, image: np.ndarray | None = None, fps: float | None = None) -> float:
        device = next(self.model.parameters()).device
        scores = batched(lambda x: self.model(x.to(device)), preprocess(frames), batch=8)
        return float(scores.double().mean()) / 100.0
