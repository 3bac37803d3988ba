"""What the VBench dimensions share that is not preprocessing: reading every frame of a video, the two geometric
steps torchvision's transforms apply (short-side resize, centre crop, restated here because torchvision is not
installable beside this project's CPU torch), loading a model folder quietly with an error that names its flag
(evaluate's image encoders load theirs quietly too), and the cache key of a model. Each dimension's own file composes its preprocessing from these steps, in VBench's order."""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def read_all_frames(path: str) -> tuple[np.ndarray, float]:
    """Every frame of a video, uint8 RGB [T, H, W, 3], and its frame rate (VBench's load_video reads all frames for
    the dimensions here); ValueError naming the file when it is unreadable or has fewer than 2 frames. Decoded by
    PyAV, where VBench uses decord or OpenCV: their YUV-to-RGB conversions can differ by a grey level."""
    import av
    try:
        with av.open(path) as box:
            stream = box.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = [f.to_ndarray(format="rgb24") for f in box.decode(stream)]
    except Exception as e:
        raise ValueError(f"{path}: unreadable video ({type(e).__name__}: {str(e)[:120]})") from None
    if len(frames) < 2:
        raise ValueError(f"{path}: {len(frames)} frame(s); the VBench dimensions compare frames, so need at least 2")
    return np.stack(frames), fps


def to_float_nchw(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W] in 0..255 (VBench's load_video: torch.Tensor(frames).permute)."""
    frames = np.ascontiguousarray(frames) if frames.flags.writeable else frames.copy()  # torch wants writable
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float()


def resize_short_side(x: torch.Tensor, size: int, mode: str, antialias: bool) -> torch.Tensor:
    """torchvision's Resize(size) on a float tensor [N, C, H, W]: the short side becomes `size`, the long side
    int(size * long / short) (truncated, as torchvision computes it), no clamping or rounding of float values."""
    h, w = x.shape[-2:]
    if h <= w:
        new = (size, int(size * w / h))
    else:
        new = (int(size * h / w), size)
    if (h, w) == new:
        return x
    return F.interpolate(x, size=new, mode=mode, align_corners=False, antialias=antialias)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop(size) for an input at least size x size: offsets int(round((H - size) / 2))."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"centre crop {size} of a {h}x{w} image")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """torchvision's Normalize on [N, 3, H, W]: (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def read_state_dict(path: str, flag: str) -> dict:
    """A torch state dict file (tensors only); ValueError naming the flag when it is missing or not one."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{flag} {path}: not a torch state dict ({type(e).__name__})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{flag} {path}: not a state dict ({type(sd).__name__})")
    return sd


class Dimension:
    """A VBench dimension with one model: `name`, `folder` (the model), `key` (its per-video cache entry), and in
    each subclass `__call__(frames uint8 [T, H, W, 3], image uint8 [H, W, 3] | None, fps) -> float` (the video's
    score)."""
    name = ""
    needs_image = False

    def __init__(self, model, folder: str):
        self.model, self.folder = model, folder
        self.key = model_key(self.name, folder)


def model_key(name: str, *paths: str) -> str:
    """A cache key for `name` computed with the model files at `paths` (absolute path and newest mtime of each; a
    folder's files are walked, subfolders included)."""
    parts = [name]
    for p in paths:
        files = [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs] if os.path.isdir(p) else [p]
        files = files or [p]
        parts += [os.path.abspath(p), str(max(os.stat(f).st_mtime_ns for f in files))]
    return "vb_" + name + "_" + hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging at errors only and its progress bars off, restored afterwards (loading a local model
    folder without torchvision warns on every load)."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(cls, folder: str, flag: str, **kwargs):
    """cls.from_pretrained(folder) in eval mode, quietly; ValueError naming the flag and the folder when it fails, when
    the folder holds another kind of model, or when weights are missing (they would be random)."""
    from transformers import AutoConfig
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {folder}: no such folder")
    try:
        with quiet_transformers():
            kind = AutoConfig.from_pretrained(folder).model_type
            if kind != cls.config_class.model_type:  # transformers would load it anyway, mostly randomly initialised
                raise ValueError(f"a {kind!r} model, not {cls.config_class.model_type!r}")
            model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
        if info["missing_keys"]:
            raise ValueError(f"{len(info['missing_keys'])} weight(s) missing, e.g. {sorted(info['missing_keys'])[0]}")
        return model.eval()
    except Exception as e:
        raise ValueError(f"{flag} {folder}: not a transformers {cls.__name__} folder "
                         f"({type(e).__name__}: {str(e)[:160]})") from None


def load_clip(folder: str, device, flag: str):
    """A transformers CLIPModel folder (the text tower is loaded too: reading the vision tower alone depends on
    the folder's config carrying projection_dim in vision_config, which not every folder does)."""
    from transformers import CLIPModel
    return load_pretrained(CLIPModel, folder, flag).to(device)


def clip_image_embeds(model, x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's encode_image for preprocessed images x [N, 3, S, S]: the vision tower's post-layer-normed CLS
    token through the visual projection, [N, projection_dim] (not normalised)."""
    return model.visual_projection(model.vision_model(pixel_values=x.to(model.device)).pooler_output)


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """fn over x [N, ...] in chunks of `batch` (bounded memory on long clips), concatenated, float32 on the CPU.
    VBench runs the frames one at a time; batches change only the floating-point rounding."""
    return torch.cat([fn(x[i:i + batch]).float().cpu() for i in range(0, len(x), batch)])
