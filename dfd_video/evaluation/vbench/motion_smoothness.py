"""VBench motion smoothness, after vbench/motion_smoothness.py (github.com/Vchitect/VBench) and the AMT it vendors
(vbench/third_party/amt, config cfgs/AMT-S.yaml; here dfd_video/evaluation/vbench/amt.py).

Frames sampled: every frame of the video, RGB, at full resolution: the even-indexed frames (0, 2, 4, ...) are the
  inputs, the odd-indexed ones the targets.
Model: AMT-S (`amt-s.pth`, --amt), interpolating the middle frame (t = 1/2) of each consecutive pair of inputs;
  inputs in 0..1, replicate-padded to multiples of 16 (split evenly), the prediction cropped back and turned into
  uint8 by truncation (x * 255 clipped to 0..255, as VBench's tensor2img does). VBench shrinks the frames first
  only when a GPU's memory is too small for them (not for a 480 x 832 frame on any current GPU); here they are never
  shrunk.
Score per video: with D the mean over pixels and channels of |prediction - odd frame| (0..255), averaged over the
predicted frames, (255 - D) / 255; 1 when every odd frame is exactly where the interpolation puts it. The dimension
is the mean over videos."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dfd_video.evaluation.vbench.common import Dimension

NAME = "motion_smoothness"


def pad_16(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Replicate-pad [N, C, H, W] to multiples of 16 (the extra split evenly, the odd pixel after); also the pads."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % 16, (-w) % 16
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return F.pad(x, list(pads), mode="replicate"), pads


def smoothness_score(frames: np.ndarray, interpolate) -> float:
    """(255 - mean |interpolated - actual odd frame|) / 255 for uint8 frames [T, H, W, 3] (T >= 3);
    interpolate(img0, img1) -> the middle frame, all [1, 3, h, w] in 0..1 (AMT-S; a test can pass another)."""
    if len(frames) < 3:
        raise ValueError(f"motion smoothness: {len(frames)} frames; it interpolates between frames 0 and 2, so needs 3")
    inputs = torch.from_numpy(np.ascontiguousarray(frames[0::2])).permute(0, 3, 1, 2).float() / 255.0
    H, W = frames.shape[1:3]
    padded, (left, _, top, _) = pad_16(inputs)
    diffs = []
    for k in range(len(inputs) - 1):
        mid = interpolate(padded[k:k + 1], padded[k + 1:k + 2])[0, :, top:top + H, left:left + W]
        pred = (mid * 255.0).permute(1, 2, 0).cpu().numpy().clip(0, 255).astype(np.uint8)
        diffs.append(np.abs(pred.astype(np.int16) - frames[2 * k + 1].astype(np.int16)).mean())
    return float((255.0 - np.mean(diffs)) / 255.0)


class MotionSmoothness(Dimension):
    name = NAME

    def __call__(self, frames: np.ndarray, image: np.ndarray | None = None, fps: float | None = None) -> float:
        if min(frames.shape[1:3]) < 113:  # padded to 16s, under 128: AMT's coarsest correlation level would vanish
            raise ValueError(f"motion smoothness: {frames.shape[2]}x{frames.shape[1]} frames; AMT's correlation "
                             "pyramid needs at least 128 x 128 after padding to multiples of 16")
        device = next(self.model.parameters()).device
        return smoothness_score(frames, lambda a, b: self.model(a.to(device), b.to(device)).cpu())
