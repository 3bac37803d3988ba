"""Probes: while a run trains, every N student steps, sample fixed conditions and seeds with the current student and
log what drifts (saturation, high-frequency energy, Eq. 11 diversity), with a seed grid per probe.

Reports on DMD/DFD-style training describe quality drifting with longer training (high-frequency noise, washed-out or
over-saturated colour, collapse to static or single-colour videos); a probe series shows it while the run goes on.
Probes use their own torch.Generator per video, never the global RNG, so a run with probes ends with the same weights
as one without (tests/test_probes.py).

Files (rank 0): <out>/probes.jsonl, one line per probe {"step", "iteration", "saturation", "clipped", "hf_energy"[,
"diversity"]}, step -1 (iteration 0) being the starting checkpoint, iteration the FastGen iterations done;
<out>/probes/start.png and step-NNNNNN.png, the middle frame of every (condition, seed); start.mp4 and
step-NNNNNN.mp4, the clip of the first condition and seed (rank 0 sampled it). `Probes.last` holds rank 0's latest
result for --tracker (dfd_video.tracking.Tracker.probe).
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from dfd_video.evaluation.evaluate import ImageEncoder, pairwise_diversity, saturation_stats
from dfd_video.files import atomic_write, write_text
from dfd_video.video import read_prompts, write_mp4

FRAMES = 8  # evenly spaced frames per video for the statistics and the encoder


def hf_energy(frames: np.ndarray, cutoff: float = 0.25) -> float:
    """Fraction of the spectral power of the luminance above `cutoff` cycles/pixel (half the Nyquist frequency),
    DC excluded, averaged over frames uint8 [K, H, W, 3]. Rises with high-frequency noise and grain."""
    y = frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # [K, H, W]
    power = np.abs(np.fft.fft2(y - y.mean(axis=(1, 2), keepdims=True))) ** 2
    fy, fx = np.fft.fftfreq(y.shape[1])[:, None], np.fft.fftfreq(y.shape[2])[None, :]
    high = np.sqrt(fy ** 2 + fx ** 2) > cutoff
    total = power.sum(axis=(1, 2))
    return float(np.mean(np.divide(power[:, high].sum(axis=1), total, out=np.zeros_like(total), where=total > 0)))


def video_stats(frames: np.ndarray) -> dict[str, float]:
    """saturation_stats (mean HSV saturation, clipped fraction) and hf_energy of uint8 frames [K, H, W, 3]."""
    return {**saturation_stats(frames), "hf_energy": hf_energy(frames)}


def seed_grid(path: str, middles: list[list[np.ndarray]], seeds: list[int], step: int) -> None:
    """Rows: conditions; columns: seeds; each cell the video's middle frame."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = len(middles), len(seeds)
    h, w = middles[0][0].shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols * w / h, 2.4 * rows + 0.4), squeeze=False)
    for i, row in enumerate(middles):
        for j, frame in enumerate(row):
            ax = axes[i][j]
            ax.imshow(frame)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"seed {seeds[j]}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"condition {i}", fontsize=8)
    fig.suptitle("starting checkpoint" if step < 0 else f"after student step {step}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


class Probes:
    """conds: per-condition tensors without batch dim (what spec.make_cond takes, batched); seeds: noise seeds;
    vae: decodes the sampled latents.
    Every rank calls __call__ at the same steps: the (condition, seed) videos are split over the ranks, each rank
    running the same number of forwards (FSDP2 gathers parameters collectively), and rank 0 writes the results."""

    def __init__(self, spec, args: argparse.Namespace, conds: list[dict[str, torch.Tensor]], seeds: list[int],
                 noise_shape: tuple[int, ...], d, start: int, vae, length, encoder: ImageEncoder | None = None,
                 fps: float = 16.0):
        self.spec, self.args, self.conds, self.seeds, self.d, self.vae = spec, args, conds, list(seeds), d, vae
        self.length = length  # the run's dfd_video.length.RunLength: FastGen iterations of a step
        self.noise_shape, self.encoder, self.fps = tuple(noise_shape), encoder, fps
        self.last: dict | None = None  # rank 0: {"step", "row", "grid", "clip", "fps"} of the latest probe
        self.every, self.drift = args.probe_every, args.stop_on_drift
        self.path = os.path.join(args.out, "probes.jsonl")
        self.first: dict | None = None
        if d.main:  # a resumed run continues the series: keep the probes before its start, and its first one
            kept = []
            if os.path.exists(self.path):
                kept = [json.loads(x) for x in open(self.path) if x.strip()]
                kept = [r for r in kept if r["step"] < start]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.first = kept[0] if kept else None
            os.makedirs(os.path.join(args.out, "probes"), exist_ok=True)

    def due(self, step: int) -> bool:
        return self.every > 0 and (step + 1) % self.every == 0

    @torch.no_grad()
    def __call__(self, step: int, student) -> str | None:
        """Samples, measures and (rank 0) logs; returns a drift message when --stop-on-drift is exceeded."""
        jobs = [(i, s) for i in range(len(self.conds)) for s in self.seeds]
        mine = jobs[self.d.rank::self.d.world]
        per_rank = math.ceil(len(jobs) / self.d.world)
        results = []
        for k in range(per_rank):  # every rank the same number of forwards; a rank short of jobs repeats one
            i, seed = mine[k] if k < len(mine) else jobs[0]
            dev = self.d.device
            g = torch.Generator(dev).manual_seed(seed)
            noise = torch.randn((1, *self.noise_shape), generator=g, device=dev)
            cond = self.spec.make_cond({key: v[None].to(dev) for key, v in self.conds[i].items()}, dev)
            x0 = self.spec.sample_video(student, noise, cond, tuple(self.args.student_ts), g,
                                        self.args.probe_sampler == "renoise")
            if k >= len(mine):
                continue
            video = self.vae.decode(x0)[0].cpu().numpy()  # uint8 [T, H, W, 3]
            if k == 0:
                clip = video  # jobs[0] on rank 0: the first condition and seed
            pick = np.linspace(0, len(video) - 1, min(FRAMES, len(video))).round().astype(int)
            frames = video[pick]
            feat = self.encoder(frames).mean(0) if self.encoder is not None else None
            results.append((i, seed, video_stats(frames), video[len(video) // 2], feat))
        gathered = [None] * self.d.world
        dist.all_gather_object(gathered, results)
        message = None
        if self.d.main:
            found = {(i, s): r for part in gathered for (i, s, *r) in part}
            stats = [found[j][0] for j in jobs]
            # step: the student step the probe follows (-1: the start); iteration: FastGen iterations done by then
            row = {"step": step, "iteration": self.length.iteration(step),
                   **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]}}
            if self.encoder is not None and len(self.seeds) > 1:
                row["diversity"] = float(np.mean([pairwise_diversity(torch.stack([found[(i, s)][2] for s in self.seeds]))
                                                  for i in range(len(self.conds))]))
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            middles = [[found[(i, s)][1] for s in self.seeds] for i in range(len(self.conds))]
            name = f"step-{step:06d}" if step >= 0 else "start"
            grid, clip_path = (os.path.join(self.args.out, "probes", name + ext) for ext in (".png", ".mp4"))
            seed_grid(grid, middles, self.seeds, step)
            write_mp4(clip_path, clip, self.fps)
            self.last = {"step": step, "row": row, "grid": grid, "clip": clip_path, "fps": self.fps}
            self.first = self.first or row
            message = self._drifted(row)
        flag = [message]
        dist.broadcast_object_list(flag, src=0)  # every rank stops together
        return flag[0]

    def _drifted(self, row: dict) -> str | None:
        if not self.drift or self.first is None or row is self.first:
            return None
        for key in ("saturation", "hf_energy"):
            ref = self.first[key]
            change = abs(row[key] - ref) / max(abs(ref), 1e-8)
            if change > self.drift:
                return (f"{key} moved {change:.0%} from the first probe ({ref:.4g} -> {row[key]:.4g}), past "
                        f"--stop-on-drift {self.drift:g}")
        return None


def open_probes(spec, args: argparse.Namespace, d, data, start: int, dtype, length) -> Probes:
    """The run's probes: conditions from --probe-prompts (encoded once, then the text encoder is freed) or the first
    --probe-count samples of the data, the data's latent shape, and the --probe-encoder if given."""
    if args.probe_prompts:
        if spec.image_conditioned:
            raise ValueError(f"--probe-prompts: {spec.family} probes need a conditioning image per prompt and take "
                             "their conditions from --data (first --probe-count samples); drop --probe-prompts")
        prompts = read_prompts(args.probe_prompts)
        if not prompts:
            raise ValueError(f"--probe-prompts {args.probe_prompts}: no prompts (one per line)")
        enc = spec.open_encoders(args.model_dir, d.device, dtype or torch.float32, vae=False)
        conds = [{"text": t.float().cpu()} for t in enc.encode_text(prompts)["text"]]
        del enc
    else:
        conds = [{k: v for k, v in data[i].items() if k != "latents"} for i in range(min(args.probe_count, len(data)))]
    encoder = ImageEncoder(args.probe_encoder, d.device, "--probe-encoder") if args.probe_encoder else None
    vae = spec.open_encoders(args.model_dir, d.device, torch.float32, text=False).vae
    return Probes(spec, args, conds, args.probe_seeds, data.shapes["latents"], d, start, vae, length, encoder,
                  fps=float(data.manifest.get("fps", 16.0)))
