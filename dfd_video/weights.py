"""Reading network weights: DMD2 checkpoints (--dmd2-ckpt) in every layout we know, base-model folders, and
student weights for `sample` / `export`; copying them into a network with clear mismatch errors."""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

from dfd_video.runs import latest_checkpoint, load_checkpoint


WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
LEADING = ("module.", "model.", "net.", "transformer.", "diffusion_model.")
NOT_WEIGHTS = {"optimizer", "optimizers", "optim", "optimizer_state", "scheduler", "lr_scheduler", "scaler",
               "grad_scaler"}
ROLES = {  # names a training checkpoint uses for each network
    "generator_ema": ("generator_ema", "ema", "net_ema", "student_ema", "ema_model"),
    "generator": ("generator", "net", "student", "model_student"),
    "critic": ("critic", "fake_score", "fake_score_net", "fake", "fake_net"),
}


def _flatten(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if torch.is_tensor(obj):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    return out  # ints, strings, optimizer lists... are not weights


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes wrapper parts anywhere in a key (FSDP1, activation checkpointing, torch.compile) and leading
    `module.` (DDP) / `model.` repeatedly, while every key shares them."""
    out = {}
    for k, v in sd.items():
        for w in WRAPPER_PARTS:
            k = k.replace(w, "")
        out[k] = v
    changed = True
    while changed and out:
        changed = False
        for lead in ("module.", "model."):
            if all(k.startswith(lead) for k in out):
                out = {k[len(lead):]: v for k, v in out.items()}
                changed = True
    return out


def _is_dcp(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, ".metadata"))


def read_raw(path: str) -> dict[str, torch.Tensor]:
    """Every tensor in the file or folder, flattened to dotted keys, on CPU."""
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or folder")
    try:
        if os.path.isdir(path):
            if _is_dcp(path):
                return _read_dcp(path)
            for sub in ("", "transformer"):  # a transformer folder, or a whole pipeline folder
                folder = os.path.join(path, sub)
                files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
                if files:
                    sd = {}
                    for f in files:
                        sd.update(read_raw(os.path.join(folder, f)))
                    return sd
            raise ValueError(f"{path}: folder holds neither *.safetensors weights, transformer/*.safetensors, "
                             "nor a torch.distributed.checkpoint (.metadata)")
        if path.endswith(".safetensors"):
            return load_file(path)
        if path.endswith((".pt", ".pth", ".bin", ".ckpt")):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
            return _flatten(obj)
    except ValueError:
        raise
    except Exception as e:  # truncated / corrupt file: one line, no traceback
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    raise ValueError(f"{path}: expected a .safetensors / .pt / .pth file, a diffusers folder or a DCP folder")


def _read_dcp(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a torch.distributed.checkpoint folder: allocate them from its metadata, then load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = dcp.FileSystemReader(path)
    meta = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


def read_checkpoint(path: str, role: str = "generator") -> dict[str, torch.Tensor] | None:
    """The state dict of one network from a DMD2 checkpoint, wrapper prefixes stripped.

    role: "generator", "generator_ema" or "critic". A checkpoint without role names (a diffusers folder or a
    plain .safetensors) is the generator; asking it for the critic returns None. "generator_ema" falls back to
    "generator" when the checkpoint holds no EMA."""
    sd = strip_prefixes(read_raw(path))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] in NOT_WEIGHTS:  # optimizer moments etc. also carry network names
            continue
        # the role name may sit under a wrapper level or two ({"model": {"net": ...}} in FastGen's DCP)
        at = next((i for i, part in enumerate(parts[:3]) if any(part in names for names in ROLES.values())), None)
        if at is not None and at + 1 < len(parts):
            owner = next(r for r, names in ROLES.items() if parts[at] in names)
            groups.setdefault(owner, {})[".".join(parts[at + 1:])] = v
        else:
            plain[k] = v
    if not groups:
        groups["generator"] = plain
    if role == "generator_ema" and "generator_ema" not in groups:
        role = "generator"
    if role not in groups:
        return None
    return strip_prefixes(groups[role])


def load_weights(net: nn.Module, sd: dict[str, torch.Tensor], source: str,
                 convert: Callable[[dict], dict] | None = None) -> None:
    """Copies `sd` into `net` exactly: any missing / unexpected key or shape mismatch is a ValueError that
    lists them. Leading wrapper names (net., model., ...) are dropped when that makes the keys match, and
    `convert` (original-repo names -> the net's) is applied when the keys look foreign."""
    want = net.state_dict()
    best = sd
    for _ in range(4):  # peel leading names one at a time while it improves the overlap
        overlap = len(want.keys() & best.keys())
        if overlap == len(want):
            break
        heads = {k.partition(".")[0] + "." for k in best}
        if len(heads) == 1 and next(iter(heads)) in LEADING:
            best = {k.partition(".")[2]: v for k, v in best.items()}
            continue
        if convert is not None:
            conv = convert(dict(best))
            if len(want.keys() & conv.keys()) > overlap:
                best = conv
                continue
        break
    missing = sorted(want.keys() - best.keys())
    unexpected = sorted(best.keys() - want.keys())
    shapes = [f"{k}: file {tuple(best[k].shape)} vs model {tuple(want[k].shape)}" for k in sorted(want.keys() & best.keys())
              if tuple(best[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        show = lambda xs: ", ".join(xs[:6]) + (f" ... (+{len(xs) - 6})" if len(xs) > 6 else "")
        parts = [f"{len(missing)} missing [{show(missing)}]" if missing else "",
                 f"{len(unexpected)} unexpected [{show(unexpected)}]" if unexpected else "",
                 f"{len(shapes)} shape mismatches [{show(shapes)}]" if shapes else ""]
        raise ValueError(f"{source}: weights do not fit {type(net).__name__}: " + "; ".join(p for p in parts if p))
    with torch.no_grad():
        for k, t in want.items():
            t.copy_(best[k].to(t.dtype))


def load_student_weights(path: str, weights: str = "auto") -> dict[str, torch.Tensor]:
    """Student weights from a training checkpoint (its EMA when it has one and weights is auto/ema) or from
    anything --dmd2-ckpt accepts (its generator, or generator_ema with weights=ema)."""
    try:
        folder = latest_checkpoint(path)
    except ValueError:
        folder = None
    if folder is not None:
        w, _ = load_checkpoint(folder)
        name = "ema" if weights in ("auto", "ema") and "ema" in w else "student"
        if weights == "ema" and "ema" not in w:
            raise ValueError(f"{path}: the checkpoint has no EMA (trained with --ema 0)")
        return w[name]
    sd = read_checkpoint(path, "generator_ema" if weights == "ema" else "generator")
    if sd is None:
        raise ValueError(f"{path}: holds no generator weights")
    return sd
