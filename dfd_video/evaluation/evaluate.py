"""The `evaluate` subcommand: the paper's visual diversity (Eq. 11, App. B.3.1), camera-pose diversity (App. B.3.3),
a colour-saturation statistic and VBench's quality dimensions (dfd_video/evaluation/vbench/, one file each), on folders of
videos named as `sample` writes them (prompt<i>_seed<s>.mp4).

Model-free except the image encoders (any transformers image model with a pooled output, from a local folder) and
the VBench dimensions' models (local folders / files, each named by its flag)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Sequence

import numpy as np
import torch

from dfd_video.files import atomic_write, fail, write_text
from dfd_video.evaluation.vbench import (FOLLOWS as VBENCH_FOLLOWS, I2V_QUALITY, PAPER_AVERAGE as VBENCH_PAPER_AVERAGE,
                                         QUALITY, averages as vbench_averages, build as build_vbench)
from dfd_video.evaluation.vbench.common import quiet_transformers
from dfd_video.video import read_prompts, read_video_frames


def add_args(p: argparse.ArgumentParser, spec=None) -> None:
    """The flags of this subcommand (dfd_video.cli builds its parser only when it runs)."""
    p.add_argument("--samples", nargs="+", required=True, help="one folder of prompt<i>_seed<s>.mp4 per method "
                   "(as `sample` writes them; >= 2 seeds per prompt, the paper uses 8)")
    p.add_argument("--names", nargs="+", help="method names for the table (default: the folder names)")
    p.add_argument("--clip", help="local CLIP folder (transformers format, e.g. clip-vit-large-patch14) for the "
                   "CLIP diversity columns")
    p.add_argument("--dino", help="local DINO folder (e.g. dinov2-large) for the DINO diversity columns")
    p.add_argument("--encoder", action="append", metavar="NAME=FOLDER",
                   help="any other transformers image model with a pooled output (repeatable)")
    p.add_argument("--poses", nargs="+", help="one folder of camera-to-world poses per --samples folder: "
                   "<stem>.npy [N, 4, 4], <stem>.npz or a ViPE output folder (pose/<stem>.npz)")
    p.add_argument("--relative-poses", action="store_true", help="express each video's poses in its first camera's "
                   "frame (T_0^-1 T_t) before the cross-seed distances; default: as the estimator wrote them")
    p.add_argument("--prompts", help="the prompts file given to `sample` (one per line): labels the report and figure")
    p.add_argument("--frames", type=int, default=16, help="evenly spaced frames per video for the features")
    p.add_argument("--figure-prompts", type=int, nargs="*", help="prompt indices for the seed-grid figure "
                   "(default: the first prompt; the flag alone: no figure)")
    vbench_models = {  # the VBench dimensions' models (docs/evaluation.md): a dimension without its model is skipped
        "--vbench-dino": ("DIR", "local DINO ViT-B/16 folder (transformers ViTModel, facebook/dino-vitb16) for VBench "
                          "subject consistency (and I2V subject with --i2v-images)"),
        "--vbench-clip": ("DIR", "local CLIP ViT-B/32 folder (openai/clip-vit-base-patch32) for VBench background "
                          "consistency"),
        "--aesthetic-head": ("FILE", "LAION aesthetic predictor linear head (sa_0_4_vit_l_14_linear.pth) for VBench "
                             "aesthetic quality, on --aesthetic-clip's embeddings"),
        "--aesthetic-clip": ("DIR", "local CLIP ViT-L/14 folder (openai/clip-vit-large-patch14) under "
                             "--aesthetic-head (default: --clip)"),
        "--vbench-dreamsim": ("DIR", "local DreamSim cache folder (the ensemble checkpoint unpacked, and DINO's "
                              "backbone in checkpoints/) for VBench I2V background, with --i2v-images"),
        "--amt": ("FILE", "AMT-S weights (amt-s.pth, as VBench downloads it) for VBench motion smoothness"),
        "--raft": ("FILE", "RAFT weights (raft-things.pth from the RAFT release) for VBench dynamic degree"),
        "--musiq": ("FILE", "pyiqa's MUSIQ weights trained on SPAQ (musiq_spaq_ckpt-358bb6af.pth) for VBench "
                    "imaging quality")}
    for flag, (metavar, text) in vbench_models.items():
        p.add_argument(flag, metavar=metavar, help=text)
    p.add_argument("--temporal-flickering", action="store_true", help="VBench temporal flickering (model-free; "
                   "every frame of every video is decoded)")
    p.add_argument("--i2v-images", nargs="+", metavar="FILE", help="the conditioning image per prompt (in prompt "
                   "order, or one for all) given to `sample --images`: adds VBench I2V subject (with --vbench-dino) "
                   "and I2V background (with --vbench-dreamsim)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="where the encoders run")
    p.add_argument("--out", default="eval", help="output folder")
    p.add_argument("--no-cache", action="store_true", help="do not keep per-video features and statistics in "
                   "<out>/cache (kept by default: a rerun, e.g. with one more --samples folder or after a kill, "
                   "decodes and encodes only the videos it has not seen)")


SAMPLE_NAME = re.compile(r"^prompt(\d+)_seed(-?\d+)\.mp4$")
CAMERA_VIDEO_KEYS = ("path_length", "max_translation", "rotation_total", "max_rotation")
CAMERA_SEED_KEYS = ("endpoint_spread", "endpoint_distance", "trajectory_distance")


def pairwise_diversity(feats: torch.Tensor) -> float:
    """Eq. 11: 1 - mean cosine similarity over the L(L-1)/2 unordered pairs of the L seeds' features [L, D]."""
    f = torch.nn.functional.normalize(feats.double(), dim=-1)
    L = f.shape[0]
    i, j = torch.triu_indices(L, L, offset=1)
    return float(1.0 - (f[i] * f[j]).sum(-1).mean())


def per_frame_diversity(feats: torch.Tensor) -> float:
    """The per-frame variant: Eq. 11 across seeds at each sampled frame position of feats [L, F, D], averaged over F."""
    return float(np.mean([pairwise_diversity(feats[:, k]) for k in range(feats.shape[1])]))


def rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    """Angle of rotation matrices R [..., 3, 3] in degrees, in [0, 180]. atan2 of the sine (from the skew part) and
    cosine (from the trace): accurate near 0 and 180 degrees, where arccos of the trace alone loses digits."""
    cos = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    skew = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    return np.degrees(np.arctan2(np.linalg.norm(skew, axis=-1) / 2.0, cos))


def camera_motion(poses: np.ndarray) -> dict[str, float]:
    """Per-video motion magnitude (App. B.3.3) from camera-to-world poses [N, 4, 4]: translation path length,
    max distance from the start, accumulated frame-to-frame rotation and max rotation from the start (degrees)."""
    p, R = poses[:, :3, 3], poses[:, :3, :3]
    step_rot = R[1:] @ np.swapaxes(R[:-1], -1, -2)    # R_{t+1} R_t^T
    from_start = R @ R[0].T                           # R_t R_0^T
    return {"path_length": float(np.linalg.norm(np.diff(p, axis=0), axis=-1).sum()),
            "max_translation": float(np.linalg.norm(p - p[0], axis=-1).max()),
            "rotation_total": float(rotation_angle_deg(step_rot).sum()),
            "max_rotation": float(rotation_angle_deg(from_start).max())}


def camera_spread(trajs: np.ndarray) -> dict[str, float]:
    """Cross-seed trajectory diversity (App. B.3.3) of one prompt's camera positions trajs [L, N, 3]: the l2 norm of
    the per-axis (population, ddof=0) std of the endpoints, the mean pairwise endpoint distance, and the mean over
    pairs of the per-frame distance averaged over the N frames."""
    e = trajs[:, -1]
    i, j = np.triu_indices(len(trajs), k=1)
    return {"endpoint_spread": float(np.linalg.norm(e.std(axis=0))),
            "endpoint_distance": float(np.linalg.norm(e[i] - e[j], axis=-1).mean()),
            "trajectory_distance": float(np.linalg.norm(trajs[i] - trajs[j], axis=-1).mean())}


def saturation_stats(frames: np.ndarray) -> dict[str, float]:
    """Colour statistics of uint8 RGB frames [T, H, W, 3] for tracking over-saturation without a model:
    saturation = mean HSV saturation (max - min) / max over the channels (0 for black pixels), in [0, 1];
    clipped = fraction of pixels with some channel at 0 or 255 (colour pushed past what 8 bits hold)."""
    hi = frames.max(-1).astype(np.float64)
    lo = frames.min(-1).astype(np.float64)
    s = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)
    return {"saturation": float(s.mean()), "clipped": float(((hi == 255) | (lo == 0)).mean())}


def sample_index(folder: str) -> dict[int, dict[int, str]]:
    """prompt index -> seed -> path for the prompt{i}_seed{s}.mp4 files of `folder` (other files are ignored)."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder")
    index: dict[int, dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        m = SAMPLE_NAME.match(name)
        if m:
            index.setdefault(int(m[1]), {})[int(m[2])] = os.path.join(folder, name)
    if not index:
        raise ValueError(f"{folder}: no videos named prompt<i>_seed<s>.mp4 (as `sample` writes them)")
    few = [i for i, seeds in index.items() if len(seeds) < 2]
    if few:
        raise ValueError(f"{folder}: prompt {few[0]} has {len(index[few[0]])} seed(s); diversity needs at least 2 "
                         f"videos per prompt ({len(few)} prompt(s) affected)")
    return dict(sorted(index.items()))


def read_poses(path: str) -> np.ndarray:
    """Camera-to-world poses float64 [N, 4, 4] from .npy, or .npz with key "data" (ViPE's pose/<name>.npz) or one array."""
    try:
        obj = np.load(path)
        if isinstance(obj, np.lib.npyio.NpzFile):
            with obj:
                names = obj.files
                poses = obj["data"] if "data" in names else (obj[names[0]] if len(names) == 1 else None)
        else:
            poses = obj
    except Exception as e:
        raise ValueError(f"{path}: unreadable pose file ({type(e).__name__}: {str(e)[:120]})") from None
    if poses is None:
        raise ValueError(f"{path}: .npz without a 'data' array and with several arrays; expected camera-to-world "
                         "[N, 4, 4]")
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(poses) < 2:
        raise ValueError(f"{path}: expected camera-to-world poses [N >= 2, 4, 4], got shape {tuple(poses.shape)}")
    if not np.isfinite(poses).all():
        raise ValueError(f"{path}: non-finite pose values")
    return poses


def relative_to_first(poses: np.ndarray) -> np.ndarray:
    """T_0^{-1} T_t: every pose in the first camera's frame, so that videos whose estimator picked different world
    frames become comparable across seeds (per-video motion statistics do not change)."""
    return np.linalg.inv(poses[0]) @ poses


def find_pose_file(poses_dir: str, stem: str) -> str:
    """<dir>/<stem>.npy, <dir>/<stem>.npz or <dir>/pose/<stem>.npz (a ViPE output folder), the first that exists."""
    tries = [os.path.join(poses_dir, stem + ".npy"), os.path.join(poses_dir, stem + ".npz"),
             os.path.join(poses_dir, "pose", stem + ".npz")]
    for path in tries:
        if os.path.exists(path):
            return path
    raise ValueError(f"{tries[0]}: missing pose file for {stem}.mp4 (also looked for {tries[1]} and {tries[2]})")


def read_eval_video(path: str, num_frames: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(num_frames evenly spaced frames uint8 [num_frames, H, W, 3], the middle frame [H, W, 3], saturation_stats over
    all frames) of one video; ValueError naming the file when it is unreadable or shorter than num_frames."""
    import av
    frames, stats = [], []
    try:
        with av.open(path) as box:
            for f in box.decode(box.streams.video[0]):
                frames.append(f.to_ndarray(format="rgb24"))
                stats.append(saturation_stats(frames[-1][None]))  # per frame: no second copy of the whole clip
    except Exception as e:
        raise ValueError(f"{path}: unreadable video ({type(e).__name__}: {str(e)[:120]})") from None
    n = len(frames)
    if n < num_frames:
        raise ValueError(f"{path}: {n} frames, fewer than the {num_frames} to sample (--frames)")
    picks = np.linspace(0, n - 1, num_frames).round().astype(int)
    return (np.stack([frames[k] for k in picks]), frames[n // 2],
            {k: float(np.mean([st[k] for st in stats])) for k in stats[0]})  # frames share one size: mean of means


def _digest(*parts) -> str:
    import hashlib
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


class ImageEncoder:
    """A transformers image model from a local folder (AutoModel + AutoImageProcessor): uint8 frames [K, H, W, 3]
    -> features float32 [K, D]. CLIP-like models give get_image_features (the projected embedding); others their
    image_embeds or pooler_output (DINOv2: the layer-normed CLS token)."""

    def __init__(self, folder: str, device: str | torch.device = "cpu", flag: str = "--clip"):
        from transformers import AutoImageProcessor, AutoModel
        if not os.path.isdir(folder):
            raise ValueError(f"{flag} {folder}: no such folder")
        try:
            with quiet_transformers():  # the PIL fallback without torchvision warns on every load
                self.model = AutoModel.from_pretrained(folder).to(device).eval()
                self.processor = AutoImageProcessor.from_pretrained(folder)
        except Exception as e:
            raise ValueError(f"{flag} {folder}: not a transformers image model with a preprocessor config "
                             f"({type(e).__name__}: {str(e)[:160]})") from None
        self.device, self.flag, self.folder = device, flag, folder
        self.name = type(self.model).__name__
        stamp = max(os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder))
        self.key = "feat_" + _digest(os.path.abspath(folder), self.name, stamp)  # cache entries of this model

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        px = self.processor(images=list(frames), return_tensors="pt")["pixel_values"].to(self.device)
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=px)
        else:
            out = self.model(pixel_values=px)
        if not torch.is_tensor(out):
            out = next((getattr(out, k) for k in ("image_embeds", "pooler_output") if getattr(out, k, None) is not None),
                       None)
        if out is None:
            raise ValueError(f"{self.flag} {self.folder}: {self.name} gives no pooled image feature "
                             "(image_embeds / pooler_output)")
        return out.float().cpu()


def measure_video(path: str, num_frames: int, encoders: dict[str, ImageEncoder], cache_dir: str | None = None,
                  need_middle: bool = False, vbench: Sequence = (), image: str | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float], np.ndarray | None, dict[str, float]]:
    """(features per encoder [num_frames, D], saturation_stats, the middle frame or None, VBench scores) of one
    video. `vbench`: dimension objects of dfd_video.evaluation.vbench, scored on every frame (decoded again, only when one of
    them is not cached yet); `image`: the conditioning image file, for the dimensions with needs_image. With a
    cache_dir, the numbers are stored per video (keyed by its path, size and mtime, num_frames, each encoder's
    folder, each VBench dimension's model files and image), so an interrupted or extended evaluation decodes and
    encodes each video once."""
    from dfd_video.evaluation.vbench.common import read_all_frames
    st = os.stat(path)
    cache = None if cache_dir is None else os.path.join(
        cache_dir, _digest(os.path.abspath(path), st.st_size, st.st_mtime_ns, num_frames) + ".npz")
    stored: dict[str, np.ndarray] = {}
    if cache is not None and os.path.exists(cache):
        try:
            with np.load(cache) as z:
                stored = {k: z[k] for k in z.files}
        except Exception:  # a damaged entry is recomputed
            stored = {}
    vb_keys = {d.name: d.key if not d.needs_image else
               d.key + "_" + _digest(os.path.abspath(image), os.stat(image).st_mtime_ns) for d in vbench}
    missing = [e for e in encoders.values() if e.key not in stored]
    missing_vb = [d for d in vbench if vb_keys[d.name] not in stored]
    mid, new = None, bool(missing or missing_vb or "saturation" not in stored)
    if need_middle or missing or "saturation" not in stored:
        frames, mid, stats = read_eval_video(path, num_frames)
        stored.update({e.key: e(frames).numpy() for e in missing})
        stored.update({k: np.asarray(v) for k, v in stats.items()})
    if missing_vb:
        frames, fps = read_all_frames(path)
        cond = None if image is None else read_video_frames(image, 1, 1.0, *frames.shape[1:3])[0].numpy()
        stored.update({vb_keys[d.name]: np.asarray(d(frames, cond, fps)) for d in missing_vb})
    if cache is not None and new:  # a middle frame alone is not stored
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **stored)
        os.makedirs(cache_dir, exist_ok=True)
        atomic_write(cache, write)
    feats = {name: torch.from_numpy(stored[e.key]) for name, e in encoders.items()}
    return (feats, {k: float(stored[k]) for k in ("saturation", "clipped")}, mid,
            {d.name: float(stored[vb_keys[d.name]]) for d in vbench})


def evaluate_folder(folder: str, encoders: dict[str, ImageEncoder], poses_dir: str | None = None,
                    num_frames: int = 16, figure_prompts: Sequence[int] = (), relative_poses: bool = False,
                    cache_dir: str | None = None, vbench: Sequence = (), images: Sequence[str] = ()) -> dict:
    """All metrics of one method's sample folder: {"summary", "per_prompt", "per_video"} plus the middle frames of
    the figure prompts (key "middle", prompt -> seed -> uint8 [H, W, 3]; dropped from the JSON report).
    vbench: VBench dimension objects (dfd_video.evaluation.vbench), scored per video and averaged over videos; images: the
    conditioning image of each prompt index (one file: every prompt's), for the image-to-video dimensions."""
    from tqdm import tqdm
    index = sample_index(folder)
    per_video: dict[str, dict] = {}
    per_prompt: dict[int, dict] = {}
    middle: dict[int, dict[int, np.ndarray]] = {i: {} for i in figure_prompts}
    jobs = [(i, s, path) for i, seeds in index.items() for s, path in seeds.items()]
    pose_files = {} if poses_dir is None else {  # all looked up first: a missing one fails before any decoding
        path: find_pose_file(poses_dir, os.path.basename(path)[:-4]) for _, _, path in jobs}
    feats: dict[str, dict[int, list[torch.Tensor]]] = {name: {} for name in encoders}
    trajs: dict[int, list[np.ndarray]] = {}
    for i, s, path in tqdm(jobs, desc=os.path.basename(os.path.normpath(folder)), disable=len(jobs) < 8):
        stem = os.path.basename(path)[:-4]
        image = None if not images else images[0] if len(images) == 1 else images[i]
        video_feats, stats, mid, scores = measure_video(path, num_frames, encoders, cache_dir, need_middle=i in middle,
                                                        vbench=vbench, image=image)
        row = dict(prompt=i, seed=s, **stats, **scores)
        if i in middle:
            middle[i][s] = mid
        for name in encoders:
            feats[name].setdefault(i, []).append(video_feats[name])   # [F, D]
        if poses_dir is not None:
            poses = read_poses(pose_files[path])
            if relative_poses:
                poses = relative_to_first(poses)
            row.update(camera_motion(poses))
            trajs.setdefault(i, []).append(poses[:, :3, 3])
        per_video[stem] = row
    for i in index:
        row: dict[str, float] = {"seeds": len(index[i])}
        for name in encoders:
            f = torch.stack(feats[name][i])                     # [L, F, D]
            row[f"{name}_mean"] = pairwise_diversity(f.mean(1))  # mean-pooled per video, then Eq. 11
            row[f"{name}_per_frame"] = per_frame_diversity(f)
        if poses_dir is not None:
            lengths = sorted({len(t) for t in trajs[i]})
            if len(lengths) > 1:
                raise ValueError(f"{poses_dir}: the pose files of prompt {i} have different lengths {lengths}; the "
                                 "cross-seed distances compare frame t of every seed")
            row.update(camera_spread(np.stack(trajs[i])))
        per_prompt[i] = row
    summary: dict[str, float] = {}
    for name in encoders:
        for k in (f"{name}_mean", f"{name}_per_frame"):
            summary[k] = float(np.mean([r[k] for r in per_prompt.values()]))
    if poses_dir is not None:
        summary.update({k: float(np.mean([r[k] for r in per_video.values()])) for k in CAMERA_VIDEO_KEYS})
        summary.update({k: float(np.mean([r[k] for r in per_prompt.values()])) for k in CAMERA_SEED_KEYS})
    for k in ("saturation", "clipped"):
        summary[k] = float(np.mean([r[k] for r in per_video.values()]))
    for d in vbench:
        summary[d.name] = float(np.mean([r[d.name] for r in per_video.values()]))
    summary.update(vbench_averages(summary, i2v=bool(images)))
    return {"folder": folder, "prompts": len(index), "videos": len(jobs), "summary": summary,
            "per_prompt": {str(i): r for i, r in per_prompt.items()}, "per_video": per_video, "middle": middle}


VBENCH_LABELS = {"subject_consistency": "subject cons.", "background_consistency": "background cons.",
                 "temporal_flickering": "temporal flicker.", "aesthetic_quality": "aesthetic",
                 "i2v_subject": "I2V subject", "i2v_background": "I2V background", "dynamic_degree": "dynamic degree",
                 "imaging_quality": "imaging quality", "motion_smoothness": "motion smooth.",
                 "paper_average": "paper mean", "vbench_quality_score": "VBench quality"}


def _column_label(key: str) -> str:
    for suffix, what in (("_mean", "mean"), ("_per_frame", "per-frame")):
        if key.endswith(suffix):
            name = key[:-len(suffix)]
            return f"{name.upper() if name in ('clip', 'dino') else name} ({what})"
    if key in VBENCH_LABELS:
        return VBENCH_LABELS[key]
    return {"endpoint_distance": "endpoint dist.", "trajectory_distance": "trajectory dist.",
            "endpoint_spread": "endpoint spread", "path_length": "path length", "max_translation": "max transl.",
            "rotation_total": "rot. total (deg)", "max_rotation": "max rot. (deg)", "saturation": "saturation",
            "clipped": "clipped"}[key]


def report_markdown(report: dict) -> str:
    """One row per method (the paper's Table 1 layout for the columns it has), then what each column means."""
    methods = report["methods"]
    keys = list(methods[0]["summary"])
    labels = [_column_label(k) for k in keys]
    q = report["settings"].get("vbench_quality_score")
    if q and q["missing"]:  # a partial score says so in its header
        n = len(q["dimensions"])
        labels[keys.index("vbench_quality_score")] += f" ({n} of {n + len(q['missing'])})"
    lines = ["# Evaluation", "",
             "| method | prompts | videos | " + " | ".join(labels) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " |"]
    for m in methods:
        lines.append(f"| {m['name']} | {m['prompts']} | {m['videos']} | "
                     + " | ".join(f"{round(m['summary'][k], 4) + 0.0:.4f}" for k in keys) + " |")  # no -0.0000
    s = report["settings"]
    lines += ["", f"Frames per video: {s['frames']} evenly spaced. Encoders: "
              + (", ".join(f"{k} = {v['folder']} ({v['class']})" for k, v in s["encoders"].items()) or "none") + ".",
              "", "Higher = more diverse / more camera motion in the diversity and camera columns; saturation and "
              "clipped are lower for less saturated videos, and their target is the level of real (or teacher) "
              "videos, not 0. "
              f"Diversity (mean) is Eq. 11 on per-video features ({s['frames']} frame features, mean-pooled); "
              "diversity (per-frame) is Eq. 11 on each sampled frame position, averaged over positions; both are "
              "averaged over prompts. Camera columns follow App. B.3.3: path length, max translation and rotations "
              "per video, averaged over videos; endpoint and trajectory distances and endpoint spread per prompt "
              "across seeds, averaged over prompts. Saturation: mean HSV saturation; clipped: fraction of pixels "
              "with a channel at 0 or 255."]
    if s.get("vbench"):
        lines += ["", vbench_note(s)]
    if s.get("note"):
        lines += ["", s["note"]]
    for path in report.get("figures", []):
        lines += ["", f"![{os.path.basename(path)}]({os.path.basename(path)})"]
    return "\n".join(lines) + "\n"


def vbench_note(s: dict) -> str:
    """What the VBench columns and the two averages of report.md are, from the report's settings."""
    vb = s["vbench"]
    models = {k: " + ".join(p for p in (v["model"], v.get("head")) if p) or "no model" for k, v in vb.items()}
    named = "; ".join(f"{VBENCH_LABELS[k]} = `{v['follows']}` ({models[k]})" for k, v in vb.items())
    text = ("VBench columns (higher is better; scored per video, averaged over videos), each as in the VBench file "
            f"named: {named}.")
    if s.get("paper_average"):
        text += (f" Paper mean = the plain mean of {', '.join(s['paper_average'])}, as the paper's \"Average VBench\" "
                 "(Table 1) and \"Average\" (Tables 3, 4) are taken; compare methods only on means over the same "
                 "dimensions.")
    q = s.get("vbench_quality_score")
    if q:
        text += (f" VBench quality = {q['name']} (VBench's scripts/constant.py bounds and weights: each dimension "
                 "normalised to its (x - Min) / (Max - Min), dynamic degree weighted 1/2) over "
                 f"{', '.join(q['dimensions'])}")
        text += (f"; {', '.join(q['missing'])} not computed, so this is the same formula over the "
                 f"{len(q['dimensions'])} of {len(q['dimensions']) + len(q['missing'])} present, not VBench's "
                 "number." if q["missing"] else ".")
    return text


def vbench_settings(vbench: Sequence, i2v: bool) -> dict:
    """The report's record of the VBench dimensions run: the file each follows and its model, and the dimensions
    behind the paper mean and the VBench quality score."""
    names = [d.name for d in vbench]
    wanted = I2V_QUALITY if i2v else QUALITY
    quality = [k for k in wanted if k in names]
    return {"vbench": {d.name: {"follows": VBENCH_FOLLOWS[d.name], "model": d.folder,
                                **({"head": d.head_path} if hasattr(d, "head_path") else {})} for d in vbench},
            "paper_average": [k for k in VBENCH_PAPER_AVERAGE if k in names],
            "vbench_quality_score": {"name": "VBench-I2V's Quality Score" if i2v else "VBench's Quality Score",
                                     "dimensions": quality, "missing": [k for k in wanted if k not in names]}
            if quality else None}


def seeds_figure(path: str, prompt: int, names: list[str], middles: list[dict[int, dict[int, np.ndarray]]],
                 text: str | None = None) -> None:
    """The paper's Fig. 8: middle frames of every seed of one prompt; two columns (seeds) per method, rows are the
    seed pairs (the same seeds in a row across methods)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seeds = sorted(set().union(*(m[prompt].keys() for m in middles)))
    rows = (len(seeds) + 1) // 2
    h, w = next(iter(middles[0][prompt].values())).shape[:2]
    fig, axes = plt.subplots(rows, 2 * len(names), figsize=(2 * len(names) * 2.0 * w / h, rows * 2.35 + 0.5),
                             squeeze=False)
    for r in range(rows):
        for m, (name, mid) in enumerate(zip(names, middles)):
            for c in range(2):
                ax = axes[r, 2 * m + c]
                ax.set_xticks([]), ax.set_yticks([])
                k = 2 * r + c
                if k < len(seeds) and seeds[k] in mid[prompt]:
                    ax.imshow(mid[prompt][seeds[k]])
                    ax.set_title(f"{name}, seed {seeds[k]}", fontsize=7)
                else:
                    ax.axis("off")
    title = f"prompt {prompt}: middle frame of each seed"
    if text:
        title += "\n" + (text if len(text) <= 140 else text[:137] + "...")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def check_args(args: argparse.Namespace) -> list[str]:
    """One line per bad flag, before any video is decoded or model loaded."""
    names = method_names(args)
    bad = []
    if len(names) != len(args.samples):
        bad.append(f"--names: {len(names)} name(s) for {len(args.samples)} --samples folder(s)")
    elif len(set(names)) != len(names):
        bad.append(f"--names {names}: method names must differ (pass --names when the folders share a name)")
    if args.poses is not None and len(args.poses) != len(args.samples):
        bad.append(f"--poses: {len(args.poses)} folder(s) for {len(args.samples)} --samples folder(s)")
    for p in args.poses or []:
        if not os.path.isdir(p):
            bad.append(f"--poses {p}: no such folder")
    if args.frames < 1:
        bad.append(f"--frames {args.frames}: must be >= 1")
    enc_dirs = {k: v for k, v in (("clip", args.clip), ("dino", args.dino)) if v is not None}
    for spec in args.encoder or []:
        name, _, folder = spec.partition("=")
        if not name or not folder or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            bad.append(f"--encoder {spec}: expected NAME=FOLDER")
        elif name in enc_dirs:
            bad.append(f"--encoder {spec}: the name {name} is taken")
        enc_dirs[name] = folder
    for flag, path in (("--vbench-dino", args.vbench_dino), ("--vbench-clip", args.vbench_clip),
                       ("--aesthetic-clip", args.aesthetic_clip), ("--vbench-dreamsim", args.vbench_dreamsim)):
        if path is not None and not os.path.isdir(path):
            bad.append(f"{flag} {path}: no such folder")
    if args.aesthetic_head is not None and (args.aesthetic_clip or args.clip) is None:
        bad.append(f"--aesthetic-head {args.aesthetic_head}: needs the CLIP ViT-L/14 it scores (--aesthetic-clip, "
                   "or --clip)")
    for path in args.i2v_images or []:
        if not os.path.isfile(path):
            bad.append(f"--i2v-images {path}: no such file")
    if args.i2v_images and args.vbench_dino is None and args.vbench_dreamsim is None:
        bad.append("--i2v-images: I2V subject needs --vbench-dino, I2V background --vbench-dreamsim; neither given")
    if args.vbench_dreamsim is not None and not args.i2v_images:
        bad.append(f"--vbench-dreamsim {args.vbench_dreamsim}: I2V background compares frames with the conditioning "
                   "image: give --i2v-images")
    if args.device == "cuda" and not torch.cuda.is_available():
        bad.append("--device cuda: no CUDA device here")
    return bad


def method_names(args: argparse.Namespace) -> list[str]:
    return args.names or [os.path.basename(os.path.normpath(f)) or f for f in args.samples]


def prompt_texts(args: argparse.Namespace, prompt_sets: list[set[int]]) -> dict[int, str]:
    """{prompt index: text} from --prompts (empty without it); --prompts and --i2v-images must cover every index."""
    top = max(max(p) for p in prompt_sets)
    if args.i2v_images and len(args.i2v_images) > 1 and top >= len(args.i2v_images):
        raise SystemExit(f"error: --i2v-images: {len(args.i2v_images)} image(s), but the folders hold prompt "
                         f"index {top} (give one image per prompt, in prompt order, or one for all)")
    if args.prompts is None:
        return {}
    try:
        lines = read_prompts(args.prompts)
    except OSError as e:
        raise SystemExit(f"error: --prompts {args.prompts}: unreadable ({e.strerror})")
    if top >= len(lines):
        raise SystemExit(f"error: --prompts {args.prompts}: {len(lines)} prompt(s), but the folders hold "
                         f"prompt index {top}")
    return dict(enumerate(lines))


def run(spec, args: argparse.Namespace) -> dict:
    """Sample folders (one per method) -> <out>/report.json, report.md and seeds_prompt<i>.png. Returns the report."""
    names = method_names(args)
    enc_dirs = {k: v for k, v in (("clip", args.clip), ("dino", args.dino)) if v is not None}
    enc_dirs.update(entry.partition("=")[::2] for entry in args.encoder or [])
    try:  # the file names first (cheap), so a wrong flag fails before any video is decoded
        prompt_sets = [set(sample_index(f)) for f in args.samples]
    except ValueError as e:
        raise SystemExit(f"error: --samples {e}")
    common = sorted(set.intersection(*prompt_sets))
    note = "" if all(s == prompt_sets[0] for s in prompt_sets) else (
        "Note: the folders hold different prompt sets; each row averages over its own prompts "
        f"({len(common)} in common).")
    figure_prompts = args.figure_prompts if args.figure_prompts is not None else common[:1]
    for i in figure_prompts:
        if i not in common:
            raise SystemExit(f"error: --figure-prompts {i}: not a prompt index of every --samples folder")
    texts = prompt_texts(args, prompt_sets)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    try:
        encoders = {k: ImageEncoder(v, device, "--encoder" if k not in ("clip", "dino") else f"--{k}")
                    for k, v in enc_dirs.items()}
        vbench = build_vbench(device, args.vbench_dino, args.vbench_clip, args.aesthetic_clip or args.clip,
                              args.aesthetic_head, args.temporal_flickering, bool(args.i2v_images), args.raft,
                              args.musiq, args.amt, args.vbench_dreamsim)
        results = [evaluate_folder(f, encoders, None if args.poses is None else args.poses[m], args.frames,
                                   figure_prompts, args.relative_poses,
                                   None if args.no_cache else os.path.join(args.out, "cache"), vbench,
                                   args.i2v_images or ())
                   for m, f in enumerate(args.samples)]
    except ValueError as e:
        raise fail(e)
    middles = [r.pop("middle") for r in results]
    for r in results:
        for i, row in r["per_prompt"].items():
            if texts:
                row["text"] = texts[int(i)]
    os.makedirs(args.out, exist_ok=True)
    figures = [os.path.join(args.out, f"seeds_prompt{i:03d}.png") for i in figure_prompts]
    for i, path in zip(figure_prompts, figures):
        seeds_figure(path, i, names, middles, texts.get(i))
    report = {"settings": {"frames": args.frames, "device": str(device), "note": note,
                           "encoders": {k: {"folder": e.folder, "class": e.name,
                                            "processor": type(e.processor).__name__} for k, e in encoders.items()},
                           "poses": args.poses, "relative_poses": args.relative_poses, "prompts": args.prompts,
                           **vbench_settings(vbench, bool(args.i2v_images)), "i2v_images": args.i2v_images},
              "methods": [{"name": n, **r} for n, r in zip(names, results)], "figures": figures}
    write_text(os.path.join(args.out, "report.json"), json.dumps(report, indent=1))
    write_text(os.path.join(args.out, "report.md"), report_markdown(report))
    print(report_markdown(report).split("\n\n")[1], file=sys.stderr)  # the table
    print(f"wrote {args.out}/report.json, report.md" + (f" and {len(figures)} figure(s)" if figures else ""),
          file=sys.stderr)
    return report
