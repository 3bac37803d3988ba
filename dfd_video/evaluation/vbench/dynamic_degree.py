"""VBench dynamic degree, after vbench/dynamic_degree.py (github.com/Vchitect/VBench) and the RAFT it vendors
(vbench/third_party/RAFT, unchanged from princeton-vl/RAFT; here dfd_video/evaluation/vbench/raft.py).

Frames sampled: every max(1, round(fps / 8))-th frame from the first (about 8 per second), at full resolution,
  RGB 0..255; each consecutive pair is padded by edge replication to multiples of 8 (split evenly between the two
  sides, RAFT's InputPadder "sintel" mode).
Model: RAFT trained on FlyingThings (`raft-things.pth` from the RAFT release, --raft), 20 refinement iterations; the
  upsampled flow from frame k to frame k+1 of the sampled frames.
Score per video: per pair, the mean of the largest int(0.05 * h * w) flow magnitudes sqrt(u^2 + v^2) over the padded
h x w frame; the video is dynamic (1) when at least round(4 * n / 16) pairs score above 6 * min(H, W) / 256, with n
the number of sampled frames and H x W the frame size (Python's round: halves go to the even number), else 0. The
dimension is the fraction of dynamic videos. RAFT at full resolution is slow on a CPU: use --device cuda."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dfd_video.evaluation.vbench.common import Dimension, to_float_nchw

NAME = "dynamic_degree"
ITERS = 20


def frame_step(fps: float) -> int:
    """The sampling interval in frames: about 8 frames per second."""
    return max(1, round(fps / 8))


def pad_to_8(x: torch.Tensor) -> torch.Tensor:
    """Replicate-pad [N, C, H, W] so H and W are multiples of 8, the extra split evenly (the odd pixel after)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % 8, (-w) % 8
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], mode="replicate")


def pair_score(flow: torch.Tensor) -> float:
    """Mean of the largest 5% (int(0.05 h w) values) of the flow magnitudes of one flow field [2, h, w]."""
    mag = flow.double().pow(2).sum(0).sqrt().flatten()
    k = int(mag.numel() * 0.05)
    return float(torch.topk(mag, k).values.mean())


def is_dynamic(scores: list[float], height: int, width: int, n_frames: int) -> bool:
    """VBench's rule: at least round(4 n / 16) of the pair scores above 6 min(H, W) / 256 (none scored: False)."""
    threshold = 6.0 * min(height, width) / 256.0
    need = round(4 * n_frames / 16.0)
    return len(scores) > 0 and sum(s > threshold for s in scores) >= need


def dynamic_degree_score(frames: np.ndarray, fps: float, flow_fn) -> float:
    """1.0 if the clip uint8 [T, H, W, 3] is dynamic else 0.0; flow_fn(img1, img2) -> flow [1, 2, h, w] on padded
    float 0..255 images [1, 3, h, w] (RAFT; a test can pass a known flow)."""
    picked = to_float_nchw(frames[::frame_step(fps)])
    scores = [pair_score(flow_fn(pad_to_8(a[None]), pad_to_8(b[None]))[0]) for a, b in zip(picked[:-1], picked[1:])]
    return float(is_dynamic(scores, frames.shape[1], frames.shape[2], len(picked)))


class DynamicDegree(Dimension):
    name = NAME

    def __call__(self, frames: np.ndarray, image: np.ndarray | None = None, fps: float | None = None) -> float:
        if fps is None:
            raise ValueError("dynamic_degree needs the video's frame rate")
        if min(frames.shape[1:3]) < 128:  # the coarsest of RAFT's 4 correlation levels would be under 2 x 2
            raise ValueError(f"dynamic degree: {frames.shape[2]}x{frames.shape[1]} frames; RAFT's correlation "
                             "pyramid needs at least 128 x 128")
        device = next(self.model.parameters()).device
        return dynamic_degree_score(frames, fps, lambda a, b: self.model(a.to(device), b.to(device), ITERS).cpu())
