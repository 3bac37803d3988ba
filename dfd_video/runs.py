"""The run folder: training checkpoints (atomic, with --resume) and the metric log."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from dfd_video.distributed import Dist, full_state_dict
from dfd_video.files import write_text


CKPT_DIR = "checkpoints"
CKPT_FILES = ("student", "fake", "ema")


def save_checkpoint(folder: str, step: int, nets: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer],
                    extra: dict, d: Dist, keep: int = 2, weights_of=None) -> str | None:
    """A collective: gathers full state dicts and optimizer states, rank 0 writes out/checkpoints/step-NNNNNN
    through a temporary folder and a rename, then points `latest` at it; keeps the newest `keep`.
    weights_of(net): what is saved of each network (default full_state_dict; LoRA runs: the adapter weights)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    opt_full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {name: (weights_of or full_state_dict)(net) for name, net in nets.items()}
    optim = {name: get_optimizer_state_dict(nets[name], opt, options=opt_full) for name, opt in opts.items()}
    final = None
    if d.main:
        root = os.path.join(folder, CKPT_DIR)
        os.makedirs(root, exist_ok=True)
        final = os.path.join(root, f"step-{step:06d}")
        tmp = f"{final}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, sd in weights.items():
            save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, f"{name}.safetensors"))
        state = {"step": step, "optim": optim, "rng": rng_state(), **extra}
        torch.save(state, os.path.join(tmp, "state.pt"))
        if os.path.exists(final):  # re-saving a step after a resume: move the old one out of the way first
            old = f"{final}.old{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        write_text(os.path.join(root, "latest"), os.path.basename(final) + "\n")
        done = sorted(x for x in os.listdir(root) if re.fullmatch(r"step-\d{6}", x))
        for x in done[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, x), ignore_errors=True)
    dist.barrier()
    return final


def latest_checkpoint(path: str) -> str:
    """Resolves a run folder, its checkpoints/ folder, a `latest` pointer or a step folder to a step folder."""
    for cand in (path, os.path.join(path, CKPT_DIR)):
        ptr = os.path.join(cand, "latest") if os.path.isdir(cand) else cand
        if os.path.basename(ptr) == "latest" and os.path.isfile(ptr):
            return os.path.join(os.path.dirname(ptr), open(ptr).read().strip())
    if os.path.isfile(os.path.join(path, "state.pt")):
        return path
    raise ValueError(f"{path}: no training checkpoint (expected a step folder with state.pt, or a `latest` pointer)")


def load_checkpoint(path: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(weights by name, state) from a step folder written by save_checkpoint."""
    from safetensors.torch import load_file
    folder = latest_checkpoint(path)
    try:
        state = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=False)
        weights = {n: load_file(os.path.join(folder, f"{n}.safetensors")) for n in CKPT_FILES
                   if os.path.exists(os.path.join(folder, f"{n}.safetensors"))}
    except Exception as e:
        raise ValueError(f"{folder}: corrupt training checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    return weights, state


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class MetricLog:
    """Appends to `path`; lines of steps >= start (logged after the checkpoint a resumed run restarts from) are
    dropped first, so the file holds each step once."""

    def __init__(self, path: str | None, total: int, start: int, main: bool):
        self.main = main
        if main and path and os.path.exists(path):
            keep = [line for line in open(path) if line.strip() and json.loads(line).get("step", -1) < start]
            write_text(path, "".join(keep))
        self.file = open(path, "a") if (main and path) else None
        self.bar = None
        if main:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, step: int, logs: dict[str, float]) -> None:
        if not self.main:
            return
        if self.file:
            self.file.write(json.dumps({"step": step, **logs}) + "\n")
            self.file.flush()
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{logs[k]:.3g}" for k in ("loss_student", "loss_fake", "delta2", "dfd") if k in logs})

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.bar:
            self.bar.close()
