"""VBench temporal flickering, after vbench/temporal_flickering.py (github.com/Vchitect/VBench).

Frames sampled: every frame of the video, at full resolution (VBench reads them all with cv2; the channel order
  does not matter to the score).
Model: none.
Score per video: with MAE_t the mean absolute difference over all pixels and channels between frames t and t+1
(float32, 0..255), (255 - mean_t MAE_t) / 255; 1 for a static clip. The dimension is the mean over videos.
VBench's own benchmark scores this dimension only on its static-scene prompts; here it is scored on every video,
as VBench does for custom videos, so camera and object motion lower it too."""
from __future__ import annotations

import numpy as np

NAME = "temporal_flickering"


def flicker_score(frames: np.ndarray) -> float:
    """(255 - mean over consecutive pairs of the mean absolute difference) / 255, for uint8 frames [T, H, W, C]."""
    maes = [np.mean(np.abs(frames[t + 1].astype(np.float32) - frames[t].astype(np.float32)))
            for t in range(len(frames) - 1)]
    return float((255.0 - np.mean(maes)) / 255.0)


class TemporalFlickering:
    name = NAME
    key = "vb_" + NAME
    folder = None
    needs_image = False

    def __call__(self, frames: np.ndarray, image: np.ndarray | None = None, fps: float | None = None) -> float:
        return flicker_score(frames)
