"""The run folder: training checkpoints (atomic, with --resume) and the metric log."""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from dfd_video.distributed import Dist, full_state_dict, on_main_rank
from dfd_video.files import write_error, write_text


CKPT_DIR = "checkpoints"
CKPT_FILES = ("student", "fake", "ema")


RUN_FILES = (CKPT_DIR, "metrics.jsonl", "args.json")  # what makes a folder a training run's


def run_files(out: str) -> list[str]:
    """The parts of a training run `out` already holds: a second run there without --resume would mix with it."""
    return [x for x in RUN_FILES if os.path.lexists(os.path.join(out, x))]


def start_run_folder(out: str, overwrite: bool) -> None:
    """Rank 0, before training writes anything: with `overwrite`, renames an earlier run in `out` to
    out.old-<time> (and says so); removes the temporaries a killed run left (*.tmpPID, *.oldPID); creates `out`."""
    if overwrite and run_files(out):
        base = os.path.abspath(out)
        aside = stamped = f"{base}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        for i in range(1, 1000):
            if not os.path.lexists(aside):
                break
            aside = f"{stamped}-{i}"
        os.rename(base, aside)
        print(f"--overwrite: moved the earlier run in {out} to {aside}", file=sys.stderr)
    for folder in (out, os.path.join(out, CKPT_DIR)):
        for x in os.listdir(folder) if os.path.isdir(folder) else []:
            if re.fullmatch(r".+\.(tmp|old)\d+", x):
                path = os.path.join(folder, x)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)


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
    final = os.path.join(folder, CKPT_DIR, f"step-{step:06d}")

    def write() -> None:
        root = os.path.dirname(final)
        os.makedirs(root, exist_ok=True)
        tmp = f"{final}.tmp{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for name, sd in weights.items():
                save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, f"{name}.safetensors"))
            state = {"step": step, "optim": optim, "rng": rng_state(), **extra}
            torch.save(state, os.path.join(tmp, "state.pt"))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(write_error(final, e)) from None
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
    on_main_rank(d, write)  # every rank stops with rank 0 if the disk is full
    return final if d.main else None


def latest_checkpoint(path: str) -> str:
    """Resolves a run folder, its checkpoints/ folder, a `latest` pointer or a step folder to a step folder."""
    for cand in (path, os.path.join(path, CKPT_DIR)):
        ptr = os.path.join(cand, "latest") if os.path.isdir(cand) else cand
        if os.path.basename(ptr) == "latest" and os.path.isfile(ptr):
            return os.path.join(os.path.dirname(ptr), open(ptr).read().strip())
    if os.path.isfile(os.path.join(path, "state.pt")):
        return path
    raise ValueError(f"{path}: no training checkpoint (expected a step folder with state.pt, or a `latest` pointer)")


def load_checkpoint(path: str, state: bool = True, weights: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(weights by name, state) from a step folder written by save_checkpoint. state.pt is read with
    weights_only=True: tensors and plain values only, so a run folder from elsewhere cannot run code on --resume.
    state=False reads the weights alone (sample, export), as any checkpoint's safetensors can be; weights=False the
    state alone (train reads each network's weights on rank 0 only, with read_weights)."""
    from safetensors.torch import load_file
    folder = latest_checkpoint(path)
    try:
        st = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True) if state else {}
        found = {n: load_file(os.path.join(folder, f"{n}.safetensors")) for n in CKPT_FILES
                 if weights and os.path.exists(os.path.join(folder, f"{n}.safetensors"))}
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(f"{folder}/state.pt holds a pickled Python object ({found[1] if found else '?'}), and "
                         "unpickling can run any code: refused (a training checkpoint holds tensors and plain values "
                         "only; one written before this check pickled numpy's RNG state and cannot be resumed, but "
                         "sample and export still read its weights)") from None
    except Exception as e:
        raise ValueError(f"{folder}: corrupt training checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    return found, st


def read_weights(path: str, name: str) -> dict[str, torch.Tensor] | None:
    """One network's weights ("student", "fake", "ema") of a training checkpoint; None when it has none."""
    from safetensors.torch import load_file
    file = os.path.join(latest_checkpoint(path), f"{name}.safetensors")
    if not os.path.exists(file):
        return None
    try:
        return load_file(file)
    except Exception as e:
        raise ValueError(f"{file}: corrupt training checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (numpy's key array as a list), for weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": [name, keys.tolist(), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
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
            shown = ("loss_student", "loss_fake", "delta2", "dfd", "samples_per_s", "mfu_pct")
            self.bar.set_postfix({k: f"{logs[k]:.3g}" for k in shown if k in logs})

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.bar:
            self.bar.close()
