"""DFD post-training of Wan2.1-T2V-1.3B (text-to-video) from a DMD2 student, under torchrun + FSDP2.

Paper: "Data-Forcing Distillation" (Sec. 4, Eq. 8-10; Table 2 for the defaults). The method lives in dfd.py;
this file only wires it to the real model through diffusers and adds the plumbing a cluster run needs.

Launch lines (every subcommand has --help):
  python wan_dfd.py prepare --model-dir Wan2.1-T2V-1.3B-Diffusers --videos clips/ --out data/
  torchrun --nproc_per_node=8 wan_dfd.py --dmd2-ckpt dmd2.pt --model-dir Wan2.1-T2V-1.3B-Diffusers --data data/
  torchrun --nproc_per_node=8 wan_dfd.py train --resume --out runs/dfd ...      (continue from the latest checkpoint)
  python wan_dfd.py sample --ckpt runs/dfd/checkpoints/latest --model-dir ... --prompts prompts.txt --seeds 0 1
  python wan_dfd.py export --ckpt runs/dfd/checkpoints/latest --model-dir ... --out student_transformer/
  python wan_dfd.py evaluate --samples samples_dmd2/ samples_dfd/ --names DMD2 DFD --clip clip-vit-large-patch14/ \
      --dino dinov2-large/ [--poses poses_dmd2/ poses_dfd/] --out eval/
A plain `python wan_dfd.py ...` (no torchrun) runs as a world of one.

The file has two halves.
(1) Generic, model-agnostic wiring, imported by cosmos_dfd.py (public names are stable):
    Dist / setup_distributed / teardown_distributed      torchrun env, gloo (CPU) or nccl (CUDA), a 1-D device mesh
    shard / full_state_dict / train_state_bytes          FSDP2: fully_shard per block, then the model; gathering
    cast_keeping_fp32                                    half precision for inference, as diffusers loads it
    read_checkpoint / load_weights / strip_prefixes      --dmd2-ckpt in four formats, with clear mismatch errors
    ShardWriter / LatentShards / read_manifest           the prepared data (safetensors shards + manifest.json)
    save_checkpoint / load_checkpoint / latest_checkpoint atomic training checkpoints and --resume
    MetricLog                                            JSONL metrics + tqdm on rank 0
    read_video_frames / write_mp4 / list_videos          PyAV decode / encode; videos with their captions
    read_prompts                                         a prompts file, numbered as `sample` numbers its videos
    pairwise_diversity / camera_motion / camera_spread / saturation_stats / ImageEncoder / evaluate_folder
                                                         the `evaluate` metrics (Eq. 11, App. B.3.3), model-free
                                                         except the image encoders
    run_prepare / run_train / run_sample / run_export / run_evaluate
                                                         the subcommand drivers, each taking an adapter
    add_*_args / check_args / dfd_config / main          the argparse pieces shared by subcommands
(2) The Wan adapter (WanAdapter). An adapter is any object with these members (cosmos_dfd implements the same):
    name: str                                 tag written into manifests and checkpoints
    data_keys: tuple[str, ...]                per-sample tensors the shards must hold (e.g. ("latents", "text"))
    load_network(model_dir) -> nn.Module      the base transformer, fp32 (teacher; also the architecture)
    convert_state_dict(sd) -> dict            original-repo key names -> the network's (identity when they match)
    blocks(net) -> list[nn.Module]            the repeated blocks (FSDP units, activation checkpointing)
    fp32_modules(net) -> list[nn.Module]      sub-modules kept in fp32 under bf16 mixed precision
    denoiser(net, guidance, uncond) -> nn.Module
                                              (x_t [B,C,T,H,W], t [B] in [0,1], cond) -> x0_hat; with guidance:
                                              uncond + g (cond - uncond) against the stored negative `uncond`
    make_batch(items: dict[str, Tensor], device) -> (x_real, cond[, mask])   one dfd.Batch from stacked samples
    make_cond(items, device) -> cond          the conditioning alone (sampling)
    compute_dtype: torch.dtype | None         set by the drivers before denoiser(): bf16 under mixed precision
    check_data(shapes: dict[str, tuple], net) -> None       raise ValueError when the data cannot feed `net`
    add_args(cmd, parser), configure(args)   optional: extra flags / defaults per subcommand; sees the parsed args
    open_encoders(args, device)  -> Encoders with .encode_video(frames uint8 [T,H,W,3])
        -> dict, .encode_text(list[str]) -> dict of [N, ...], .negative() -> dict (the unconditional branch)
    sample_items(args, device) -> list[dict]                per-prompt conditioning for `sample` (no batch dim)
    noise_shape(args) -> tuple                               latent shape of one sample [C, T, H, W]
    decode(latents [B,C,T,H,W], args) -> uint8 [B, T, H, W, 3]
    save_pretrained(net, out_dir)                            the export format

Conventions (Wan2.1, verified against diffusers 0.42.1 in tests/test_wan_oracle.py): x_t = (1 - t) x0 + t eps, the
transformer predicts v = eps - x0 and takes timestep t * 1000 as a float [B]; CFG is uncond + g (cond - uncond) with
g = 5.0 and the embedding of the pipeline's default negative prompt "" as uncond; UMT5 embeddings are cut to the real
token count and zero-padded to 512; latents are normalised as (z - latents_mean) / latents_std.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import dfd

# ===================================================================================================
# (1) Generic wiring
# ===================================================================================================

# ---------------------------------------------------------------------------------------------------
# Distributed set-up: the only place that knows about torchrun.


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh, 1-D over all ranks

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and starts a process group: nccl on CUDA, gloo on CPU.
    Without torchrun it starts a world of one (an in-process store), so FSDP2 code paths are identical."""
    from torch.distributed.device_mesh import init_device_mesh
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world, rank = dist.get_world_size(), dist.get_rank()
    return Dist(rank, world, local_rank, dev, init_device_mesh(dev.type, (world,)))


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# FSDP2


def shard(net: nn.Module, blocks: Sequence[nn.Module], d: Dist, param_dtype: torch.dtype | None = None,
          fp32_modules: Sequence[nn.Module] = (), checkpointing: bool = False, trainable: bool = True) -> nn.Module:
    """fully_shard each block, then the fp32 islands, then the whole net (pytorch/examples FSDP2 order).

    param_dtype=bf16 gives MixedPrecisionPolicy(bf16 params for compute, fp32 gradient reduction); the stored
    (sharded) parameters, gradients and Adam state stay fp32. Load the net in fp32 first: fully_shard refuses
    mixed dtypes. The root does not cast its inputs, so the timestep stays fp32 (the adapter casts the rest).
    checkpointing: activation checkpointing of every block through the model's own switch (keeps key names)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if checkpointing:
        if not hasattr(net, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(net).__name__} has no enable_gradient_checkpointing()")
        net.enable_gradient_checkpointing()
    low = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    high = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    root = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for b in blocks:
        fully_shard(b, mesh=d.mesh, mp_policy=low)
    for m in fp32_modules:
        fully_shard(m, mesh=d.mesh, mp_policy=high)
    fully_shard(net, mesh=d.mesh, mp_policy=root)
    net.requires_grad_(trainable)
    return net


def full_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU; a collective: call on every rank (empty on ranks > 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def set_full_state_dict(net: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(net, sd, options=StateDictOptions(full_state_dict=True))


def cast_keeping_fp32(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Casts parameters and buffers to `dtype` except those diffusers keeps in fp32 when it loads the model in
    half precision (`_keep_in_fp32_modules`: for Wan the RoPE tables, time embedder, modulation tables, norms)."""
    keep = set(getattr(net, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, t in [*net.named_parameters(), *net.named_buffers()]:
            if t.is_floating_point() and not keep & set(name.split(".")):
                t.data = t.data.to(dtype)
    return net


def train_state_bytes(*nets_and_opts) -> int:
    """Bytes this rank holds for parameters, gradients and optimizer state (local shards only)."""
    seen, total = set(), 0
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    for obj in nets_and_opts:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += local(p).numel() * local(p).element_size()
                    if p.grad is not None:
                        total += local(p.grad).numel() * local(p.grad).element_size()
        else:  # an optimizer
            for st in obj.state.values():
                for v in st.values():
                    if torch.is_tensor(v):
                        total += local(v).numel() * local(v).element_size()
    return total


# ---------------------------------------------------------------------------------------------------
# Reading DMD2 checkpoints (--dmd2-ckpt) in every layout we know.

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


def _read_raw(path: str) -> dict[str, torch.Tensor]:
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
                        sd.update(_read_raw(os.path.join(folder, f)))
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
    sd = strip_prefixes(_read_raw(path))
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


# ---------------------------------------------------------------------------------------------------
# Prepared data: safetensors shards of per-sample tensors + manifest.json.

MANIFEST = "manifest.json"
NEGATIVE = "negative.safetensors"
DATA_FORMAT = "dfd-latent-shards"


class ShardWriter:
    """Accumulates per-sample tensor dicts and writes shard-00000.safetensors, ... every `per_shard` samples;
    close() writes the manifest (and the negative-prompt tensors) and returns it."""

    def __init__(self, out: str, per_shard: int = 64, prefix: str = "shard"):
        os.makedirs(out, exist_ok=True)
        self.out, self.per_shard, self.prefix = out, per_shard, prefix
        self.pending: list[dict[str, torch.Tensor]] = []
        self.shards: list[dict] = []
        self.shapes: dict[str, list[int]] | None = None

    def add(self, item: dict[str, torch.Tensor]) -> None:
        shapes = {k: list(v.shape) for k, v in item.items()}
        if self.shapes is None:
            self.shapes = shapes
        elif shapes != self.shapes:
            raise ValueError(f"sample shapes {shapes} differ from the first sample's {self.shapes}")
        self.pending.append({k: v.detach().cpu().contiguous() for k, v in item.items()})
        if len(self.pending) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file
        if not self.pending:
            return
        name = f"{self.prefix}-{len(self.shards):05d}.safetensors"
        batch = {k: torch.stack([it[k] for it in self.pending]) for k in self.pending[0]}
        _atomic(os.path.join(self.out, name), lambda p: save_file(batch, p))
        self.shards.append({"file": name, "count": len(self.pending)})
        self.pending = []

    def close(self, info: dict, negative: dict[str, torch.Tensor] | None = None) -> dict:
        from safetensors.torch import save_file
        self.flush()
        manifest = {"format": DATA_FORMAT, "version": 1, **info, "shapes": self.shapes or {},
                    "count": sum(s["count"] for s in self.shards), "shards": self.shards}
        if negative is not None:
            neg = {k: v.detach().cpu().contiguous() for k, v in negative.items()}
            _atomic(os.path.join(self.out, NEGATIVE), lambda p: save_file(neg, p))
            manifest["negative"] = NEGATIVE
        write_manifest(self.out, manifest)
        return manifest


def write_manifest(folder: str, manifest: dict) -> None:
    write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise ValueError(f"--data {folder}: no such folder (run `prepare` first)")
    if not os.path.exists(path):
        raise ValueError(f"--data {folder}: no {MANIFEST}; not a prepared data folder (run `prepare` first)")
    try:
        m = json.load(open(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if m.get("format") != DATA_FORMAT or not isinstance(m.get("shards"), list):
        raise ValueError(f"{path}: not a {DATA_FORMAT} manifest")
    return m


class LatentShards:
    """Random access to prepared samples; every shard is checked against the manifest when opened.

    batches(position, B, d) is the training stream: micro-batch k of rank r holds global positions
    (k * world + r) * B ... + B - 1 of an endless sequence of epochs, each a permutation seeded by (seed, epoch).
    The stream is a pure function of k, so resuming at k = position repeats the unbroken run."""

    def __init__(self, folder: str, keys: Sequence[str], need_negative: bool = True):
        from safetensors import safe_open
        self.folder, self.manifest = folder, read_manifest(folder)
        self.keys = tuple(keys)
        shapes = self.manifest.get("shapes", {})
        lost = [k for k in self.keys if k not in shapes]
        if lost:
            raise ValueError(f"--data {folder}: manifest has no {', '.join(lost)} (has {', '.join(shapes) or 'nothing'})")
        self.shapes = {k: tuple(shapes[k]) for k in self.keys}
        self.index: list[tuple[int, int]] = []
        self.handles = []
        for si, s in enumerate(self.manifest["shards"]):
            path = os.path.join(folder, s["file"])
            if not os.path.exists(path):
                raise ValueError(f"--data: shard {path} is listed in the manifest but missing")
            try:
                h = safe_open(path, "pt")
                for k in self.keys:
                    if k not in h.keys():
                        raise ValueError(f"shard {path} has no tensor {k!r} (has {', '.join(h.keys())})")
                    got = tuple(h.get_slice(k).get_shape())
                    if got != (s["count"], *self.shapes[k]):
                        raise ValueError(f"shard {path}: {k!r} has shape {got}, manifest says {(s['count'], *self.shapes[k])}")
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(f"shard {path}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None
            self.handles.append(h)
            self.index += [(si, i) for i in range(s["count"])]
        if not self.index:
            raise ValueError(f"--data {folder}: the manifest lists no samples")
        self.negative: dict[str, torch.Tensor] | None = None
        if need_negative:
            neg = os.path.join(folder, self.manifest.get("negative", NEGATIVE))
            if not os.path.exists(neg):
                raise ValueError(f"--data {folder}: no negative-prompt embedding ({neg}); re-run `prepare`")
            from safetensors.torch import load_file
            self.negative = load_file(neg)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, n: int) -> dict[str, torch.Tensor]:
        si, i = self.index[n]
        return {k: self.handles[si].get_slice(k)[i] for k in self.keys}

    def order(self, epoch: int, seed: int) -> torch.Tensor:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(dfd._seed(seed, epoch, 0xDA)))

    def batches(self, position: int, batch: int, rank: int, world: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        cache: dict[int, torch.Tensor] = {}
        k = position
        while True:
            items = []
            for i in range(batch):
                g = (k * world + rank) * batch + i
                epoch, j = divmod(g, len(self))
                if epoch not in cache:
                    cache.clear()
                    cache[epoch] = self.order(epoch, seed)
                items.append(self[int(cache[epoch][j])])
            yield {key: torch.stack([it[key] for it in items]) for key in self.keys}
            k += 1


# ---------------------------------------------------------------------------------------------------
# Atomic files and training checkpoints.


def _atomic(path: str, write: Callable[[str], Any]) -> None:
    """Writes through a temporary name in the same folder, then renames: readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    _atomic(path, write)


CKPT_DIR = "checkpoints"
CKPT_FILES = ("student", "fake", "ema")


def save_checkpoint(folder: str, step: int, nets: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer],
                    extra: dict, d: Dist, keep: int = 2) -> str | None:
    """A collective: gathers full state dicts and optimizer states, rank 0 writes out/checkpoints/step-NNNNNN
    through a temporary folder and a rename, then points `latest` at it; keeps the newest `keep`."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    opt_full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {name: full_state_dict(net) for name, net in nets.items()}
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
        state = {"step": step, "optim": optim, "rng": _rng_state(), **extra}
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


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------------------------------
# Metrics: JSONL on rank 0 (one line per student step) and a progress bar.


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


def _mean_over_ranks(logs: dict[str, float], device: torch.device) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return logs
    keys = sorted(logs)
    v = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(v)
    return dict(zip(keys, (v / dist.get_world_size()).tolist()))


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------
# Video files (PyAV).


def _cover_crop(rgb: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [h, w, 3] -> uint8 [height, width, 3]: resized (antialiased) to cover the target, centre-cropped."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[0, :, top:top + height, left:left + width].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)


def read_video_frames(path: str, num_frames: int, fps: float, height: int, width: int) -> torch.Tensor:
    """`num_frames` frames at `fps` from the start of the video (the frame shown at each time k / fps), resized
    so the frame covers height x width and centre-cropped: uint8 [T, H, W, 3]. ValueError if unreadable or too
    short. Frames are streamed: only the chosen ones are converted, and each is resized at once, so memory does
    not grow with the source resolution times the clip length."""
    import av
    want = [k / fps for k in range(num_frames)]
    picked: list[torch.Tensor] = []
    last, last_t, step = None, 0.0, 0.0
    small = None  # `last`, converted and resized (a frame can be picked more than once when fps > the source's)

    def take():
        nonlocal small
        if small is None:
            small = _cover_crop(last.to_ndarray(format="rgb24"), height, width)
        picked.append(small)

    try:
        with av.open(path) as box:
            stream = box.streams.video[0]
            for frame in box.decode(stream):
                t = float(frame.time) if frame.time is not None else len(picked) / fps
                while len(picked) < num_frames and last is not None and t > want[len(picked)] + 1e-6:
                    take()  # the frame on screen at the wanted time
                if len(picked) == num_frames:
                    break
                last, last_t, small = frame, t, None
            step = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
            if last is not None and len(picked) == num_frames - 1 and want[-1] < last_t + step - 1e-6:
                take()  # the last wanted time falls on the clip's final frame
    except Exception as e:
        raise ValueError(f"{path}: unreadable video ({type(e).__name__}: {str(e)[:120]})") from None
    if len(picked) < num_frames:
        raise ValueError(f"{path}: too short ({len(picked)} of {num_frames} frames at {fps:g} fps)")
    return torch.stack(picked)


def write_mp4(path: str, frames: torch.Tensor | np.ndarray, fps: float) -> None:
    """frames: uint8 [T, H, W, 3] -> H.264 (yuv420p) mp4, written atomically. H and W must be even."""
    import av
    frames = np.asarray(frames.cpu() if torch.is_tensor(frames) else frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_mp4: need uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")

    def write(tmp: str) -> None:
        with av.open(tmp, "w", format="mp4") as box:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            s = box.add_stream(codec, rate=round(fps))
            s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            for f in frames:
                for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    box.mux(pkt)
            for pkt in s.encode():
                box.mux(pkt)
    _atomic(path, write)


VIDEO_EXT = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


def read_prompts(path: str) -> list[str]:
    """A prompts file: one prompt per line, blank lines skipped. Prompt i of `sample` (prompt{i:03d}_seed{s}.mp4)
    is the i-th of these, which is how `evaluate --prompts` labels its rows."""
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def list_videos(folder: str) -> list[tuple[str, str]]:
    """(video path, caption) pairs: from captions.csv / captions.jsonl (columns video|file|path and
    caption|text|prompt) when present, else each video's sidecar .txt. Videos without a caption are listed
    with caption None so the caller can report them."""
    if not os.path.isdir(folder):
        raise ValueError(f"--videos {folder}: no such folder")
    pick = lambda row, names: next((row[n] for n in names if n in row and row[n] not in (None, "")), None)
    rows = None
    if os.path.exists(os.path.join(folder, "captions.csv")):
        with open(os.path.join(folder, "captions.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
    elif os.path.exists(os.path.join(folder, "captions.jsonl")):
        with open(os.path.join(folder, "captions.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if rows is not None:
        out = []
        for row in rows:
            v = pick(row, ("video", "file", "path"))
            if v is None:
                raise ValueError(f"{folder}: caption manifest row without a video/file/path column: {row}")
            out.append((os.path.join(folder, v), pick(row, ("caption", "text", "prompt"))))
        return out
    out = []
    for name in sorted(os.listdir(folder)):
        if name.lower().endswith(VIDEO_EXT):
            side = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
            out.append((os.path.join(folder, name), open(side).read().strip() if os.path.exists(side) else None))
    return out


# ---------------------------------------------------------------------------------------------------
# Evaluation (`evaluate`): the paper's visual diversity (Eq. 11, App. B.3.1), camera-pose diversity (App. B.3.3)
# and a colour-saturation statistic, on folders of videos named as `sample` writes them.

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
        from transformers.utils import logging as hf_logging
        if not os.path.isdir(folder):
            raise ValueError(f"{flag} {folder}: no such folder")
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the PIL fallback without torchvision warns on every load
        hf_logging.disable_progress_bar()
        try:
            self.model = AutoModel.from_pretrained(folder).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(folder)
        except Exception as e:
            raise ValueError(f"{flag} {folder}: not a transformers image model with a preprocessor config "
                             f"({type(e).__name__}: {str(e)[:160]})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
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
                  need_middle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, float], np.ndarray | None]:
    """(features per encoder [num_frames, D], saturation_stats, the middle frame or None) of one video. With a
    cache_dir, the numbers are stored per video (keyed by its path, size and mtime, num_frames and each encoder's
    folder), so an interrupted or extended evaluation decodes and encodes each video once."""
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
    missing = [e for e in encoders.values() if e.key not in stored]
    mid = None
    if need_middle or missing or "saturation" not in stored:
        frames, mid, stats = read_eval_video(path, num_frames)
        if missing or "saturation" not in stored:  # new numbers: compute and store them (a middle frame alone is not)
            stored.update({e.key: e(frames).numpy() for e in missing})
            stored.update({k: np.asarray(v) for k, v in stats.items()})
            if cache is not None:
                def write(tmp: str) -> None:
                    with open(tmp, "wb") as f:
                        np.savez(f, **stored)
                os.makedirs(cache_dir, exist_ok=True)
                _atomic(cache, write)
    feats = {name: torch.from_numpy(stored[e.key]) for name, e in encoders.items()}
    return feats, {k: float(stored[k]) for k in ("saturation", "clipped")}, mid


def evaluate_folder(folder: str, encoders: dict[str, ImageEncoder], poses_dir: str | None = None,
                    num_frames: int = 16, figure_prompts: Sequence[int] = (), relative_poses: bool = False,
                    cache_dir: str | None = None) -> dict:
    """All metrics of one method's sample folder: {"summary", "per_prompt", "per_video"} plus the middle frames of
    the figure prompts (key "middle", prompt -> seed -> uint8 [H, W, 3]; dropped from the JSON report)."""
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
        video_feats, stats, mid = measure_video(path, num_frames, encoders, cache_dir, need_middle=i in middle)
        row = dict(prompt=i, seed=s, **stats)
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
    return {"folder": folder, "prompts": len(index), "videos": len(jobs), "summary": summary,
            "per_prompt": {str(i): r for i, r in per_prompt.items()}, "per_video": per_video, "middle": middle}


def _column_label(key: str) -> str:
    for suffix, what in (("_mean", "mean"), ("_per_frame", "per-frame")):
        if key.endswith(suffix):
            name = key[:-len(suffix)]
            return f"{name.upper() if name in ('clip', 'dino') else name} ({what})"
    return {"endpoint_distance": "endpoint dist.", "trajectory_distance": "trajectory dist.",
            "endpoint_spread": "endpoint spread", "path_length": "path length", "max_translation": "max transl.",
            "rotation_total": "rot. total (deg)", "max_rotation": "max rot. (deg)", "saturation": "saturation",
            "clipped": "clipped"}[key]


def report_markdown(report: dict) -> str:
    """One row per method (the paper's Table 1 layout for the columns it has), then what each column means."""
    methods = report["methods"]
    keys = list(methods[0]["summary"])
    lines = ["# Evaluation", "",
             "| method | prompts | videos | " + " | ".join(_column_label(k) for k in keys) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " |"]
    for m in methods:
        lines.append(f"| {m['name']} | {m['prompts']} | {m['videos']} | "
                     + " | ".join(f"{round(m['summary'][k], 4) + 0.0:.4f}" for k in keys) + " |")  # no -0.0000
    s = report["settings"]
    lines += ["", f"Frames per video: {s['frames']} evenly spaced. Encoders: "
              + (", ".join(f"{k} = {v['folder']} ({v['class']})" for k, v in s["encoders"].items()) or "none") + ".",
              "", "Higher = more diverse / more camera motion, in every column but the last two: saturation and "
              "clipped are lower for less saturated videos, and their target is the level of real (or teacher) "
              "videos, not 0. "
              f"Diversity (mean) is Eq. 11 on per-video features ({s['frames']} frame features, mean-pooled); "
              "diversity (per-frame) is Eq. 11 on each sampled frame position, averaged over positions; both are "
              "averaged over prompts. Camera columns follow App. B.3.3: path length, max translation and rotations "
              "per video, averaged over videos; endpoint and trajectory distances and endpoint spread per prompt "
              "across seeds, averaged over prompts. Saturation: mean HSV saturation; clipped: fraction of pixels "
              "with a channel at 0 or 255."]
    if s.get("note"):
        lines += ["", s["note"]]
    for path in report.get("figures", []):
        lines += ["", f"![{os.path.basename(path)}]({os.path.basename(path)})"]
    return "\n".join(lines) + "\n"


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
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def run_evaluate(adapter, args: argparse.Namespace) -> dict:
    """Sample folders (one per method) -> <out>/report.json, report.md and seeds_prompt<i>.png. Returns the report."""
    names = args.names or [os.path.basename(os.path.normpath(f)) or f for f in args.samples]
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
    if args.device == "cuda" and not torch.cuda.is_available():
        bad.append("--device cuda: no CUDA device here")
    if bad:
        raise SystemExit("error: " + bad[0])
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
    texts: dict[int, str] = {}
    if args.prompts is not None:
        try:
            lines = read_prompts(args.prompts)
        except OSError as e:
            raise SystemExit(f"error: --prompts {args.prompts}: unreadable ({e.strerror})")
        top = max(max(p) for p in prompt_sets)
        if top >= len(lines):
            raise SystemExit(f"error: --prompts {args.prompts}: {len(lines)} prompt(s), but the folders hold "
                             f"prompt index {top}")
        texts = dict(enumerate(lines))
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    try:
        encoders = {k: ImageEncoder(v, device, "--encoder" if k not in ("clip", "dino") else f"--{k}")
                    for k, v in enc_dirs.items()}
        results = [evaluate_folder(f, encoders, None if args.poses is None else args.poses[m], args.frames,
                                   figure_prompts, args.relative_poses,
                                   None if args.no_cache else os.path.join(args.out, "cache"))
                   for m, f in enumerate(args.samples)]
    except ValueError as e:
        raise _fail(e)
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
                           "poses": args.poses, "relative_poses": args.relative_poses, "prompts": args.prompts},
              "methods": [{"name": n, **r} for n, r in zip(names, results)], "figures": figures}
    write_text(os.path.join(args.out, "report.json"), json.dumps(report, indent=1))
    write_text(os.path.join(args.out, "report.md"), report_markdown(report))
    print(report_markdown(report).split("\n\n")[1], file=sys.stderr)  # the table
    print(f"wrote {args.out}/report.json, report.md" + (f" and {len(figures)} figure(s)" if figures else ""),
          file=sys.stderr)
    return report


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="where the encoders run")
    p.add_argument("--out", default="eval", help="output folder")
    p.add_argument("--no-cache", action="store_true", help="do not keep per-video features and statistics in "
                   "<out>/cache (kept by default: a rerun, e.g. with one more --samples folder or after a kill, "
                   "decodes and encodes only the videos it has not seen)")


# ---------------------------------------------------------------------------------------------------
# Command line: shared pieces and checks.


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", required=True, help="local diffusers-format base model folder")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: CUDA when available")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="compute dtype of the networks (auto: bf16 on CUDA, fp32 on CPU); weights stay fp32")


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    p.add_argument("--dmd2-ckpt", help="the DMD2 student to start from: diffusers folder, .safetensors, .pt/.pth "
                   "(generator / generator_ema / critic), or torch.distributed.checkpoint folder")
    p.add_argument("--init-from", default="generator_ema", choices=("generator_ema", "generator"),
                   help="which network of a DMD2 checkpoint starts the student (falls back to generator)")
    p.add_argument("--data", required=True, help="folder written by `prepare`")
    p.add_argument("--out", default="runs/dfd", help="run folder: checkpoints/, metrics.jsonl, args.json")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoint folder (no value: the latest one in --out)")
    p.add_argument("--steps", type=int, default=100, help="student updates in total (paper, Wan DFD: 100)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch: ranks x grad-accum x per-rank batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update (each network)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW lr of the student (paper: 1e-5)")
    p.add_argument("--lr-fake", type=float, default=1e-5, help="AdamW lr of the fake score (paper: 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, both networks")
    p.add_argument("--p", type=float, default=0.5, help="P(teacher sees the real video) per student step, Eq. 10; "
                   "0 = plain DMD, 1 = DFD only")
    p.add_argument("--per-sample-coin", action="store_true", help="one DFD coin per sample instead of per step")
    p.add_argument("--space", default="x0", choices=("x0", "score"), help="x0: the authors' loss; score: Eq. 8 literally")
    p.add_argument("--guidance", type=float, default=5.0, help="teacher CFG g in uncond + g (cond - uncond)")
    p.add_argument("--fake-updates", type=int, default=5, help="fake-score updates before each student update "
                   "(5: 6 iterations per cycle; FastGen's student_update_freq=5 is --fake-updates 4)")
    p.add_argument("--student-ts", type=float, nargs="+", default=list(dfd.STUDENT_TS),
                   help="the few-step student's times t (decreasing, in (0, 1])")
    p.add_argument("--backward-sim", action="store_true",
                   help="student input by backward simulation from noise instead of the real video noised to t_s")
    p.add_argument("--t-min", type=float, default=0.02, help="DMD / fake-score noise level t ~ U[t-min, t-max] ...")
    p.add_argument("--t-max", type=float, default=0.98, help="... before the shift")
    p.add_argument("--t-shift", type=float, default=5.0, help="shift of that t (5.0: the student schedule's shift)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm, both networks (<= 0: off)")
    p.add_argument("--ema", type=float, default=0.0, help="student EMA decay (0: no EMA)")
    p.add_argument("--seed", type=int, default=0, help="seeds data order, noise, t and the DFD coin")
    p.add_argument("--monitor-every", type=int, default=10, help="every N steps log teacher_gap (one extra teacher call)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N student steps (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--no-checkpointing", action="store_true", help="turn off activation checkpointing")


def check_args(args: argparse.Namespace) -> None:
    """One line per bad value, before any model is loaded."""
    bad = []
    if hasattr(args, "p") and not 0.0 <= args.p <= 1.0:
        bad.append(f"--p {args.p}: must be in [0, 1]")
    for name in ("steps", "batch_size", "grad_accum"):
        if hasattr(args, name) and getattr(args, name) < 1:
            bad.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    for name in ("lr", "lr_fake"):
        if hasattr(args, name) and not getattr(args, name) > 0:
            bad.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0")
    if hasattr(args, "fake_updates") and args.fake_updates < 0:
        bad.append(f"--fake-updates {args.fake_updates}: must be >= 0")
    if hasattr(args, "guidance") and args.guidance < 0:
        bad.append(f"--guidance {args.guidance}: must be >= 0")
    if hasattr(args, "ema") and not 0.0 <= args.ema < 1.0:
        bad.append(f"--ema {args.ema}: must be in [0, 1)")
    for name in ("per_shard", "keep"):
        if hasattr(args, name) and getattr(args, name) < 1:
            bad.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if hasattr(args, "monitor_every") and args.monitor_every < 0:
        bad.append(f"--monitor-every {args.monitor_every}: must be >= 0 (0: off)")
    if hasattr(args, "save_every") and args.save_every < 0:
        bad.append(f"--save-every {args.save_every}: must be >= 0")
    if hasattr(args, "t_min") and not 0.0 <= args.t_min < args.t_max <= 1.0:
        bad.append(f"--t-min {args.t_min} / --t-max {args.t_max}: need 0 <= t-min < t-max <= 1")
    ts = getattr(args, "student_ts", None)
    if ts is not None and (not all(0 < t <= 1 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:]))):
        bad.append(f"--student-ts {ts}: must be strictly decreasing values in (0, 1]")
    if hasattr(args, "num_frames") and (args.num_frames < 1 or (args.num_frames - 1) % 4):
        bad.append(f"--num-frames {args.num_frames}: must be 4k + 1 (the VAE compresses time 4x)")
    for name in ("height", "width"):
        if hasattr(args, name) and (getattr(args, name) < 16 or getattr(args, name) % 16):
            bad.append(f"--{name} {getattr(args, name)}: must be a positive multiple of 16")
    if hasattr(args, "fps") and not args.fps > 0:
        bad.append(f"--fps {args.fps}: must be > 0")
    if getattr(args, "seeds", None) is not None and not args.seeds:
        bad.append("--seeds: give at least one seed")
    for name in ("model_dir",):
        v = getattr(args, name, None)
        if v is not None and not os.path.isdir(v):
            bad.append(f"--model-dir {v}: no such folder")
    for name, flag in (("dmd2_ckpt", "--dmd2-ckpt"), ("prompts", "--prompts"), ("embeddings", "--embeddings"),
                       ("ckpt", "--ckpt")):
        v = getattr(args, name, None)
        if v is not None and not os.path.exists(v):
            bad.append(f"{flag} {v}: no such file or folder")
    if bad:
        raise SystemExit("error: " + bad[0])


def compute_dtype(args: argparse.Namespace, d: Dist) -> torch.dtype | None:
    """None (fp32, no casting) or bf16 for FSDP2's mixed precision."""
    if args.dtype == "bf16" or (args.dtype == "auto" and d.device.type == "cuda"):
        return torch.bfloat16
    return None


def dfd_config(args: argparse.Namespace) -> dfd.DFDConfig:
    """The method settings (dfd.DFDConfig) from the train flags."""
    return dfd.DFDConfig(p=args.p, per_sample_coin=args.per_sample_coin, space=args.space,
                         fake_updates=args.fake_updates, grad_accum=args.grad_accum,
                         student_ts=tuple(args.student_ts), backward_sim=args.backward_sim, t_min=args.t_min,
                         t_max=args.t_max, t_shift=args.t_shift, grad_clip=args.grad_clip, ema=args.ema,
                         seed=args.seed, monitor_every=args.monitor_every)


# ---------------------------------------------------------------------------------------------------
# The subcommand drivers: generic, an adapter supplies the model.


def _fail(e: Exception) -> SystemExit:
    return SystemExit(f"error: {e}")


def run_train(adapter, args: argparse.Namespace) -> dict:
    """DFD post-training (dfd.train) with FSDP2, checkpoints and resume. Returns the last logged metrics."""
    check_args(args)
    d = setup_distributed(args.device)
    per_rank, rem = divmod(args.batch_size, d.world * args.grad_accum)
    if rem or per_rank < 1:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not a multiple of ranks x --grad-accum "
                         f"= {d.world} x {args.grad_accum}")
    if args.resume is None and args.dmd2_ckpt is None:
        raise SystemExit("error: --dmd2-ckpt is required (DFD post-trains a DMD2 student; or pass --resume)")
    dtype = compute_dtype(args, d)
    adapter.compute_dtype = dtype
    ckpt = not args.no_checkpointing

    def build(weights: dict | None, source: str, trainable: bool, mixed: bool = True, convert: bool = True):
        """One network: the base weights, then `weights` over them, then sharded at once, so the host holds one
        full fp32 copy at a time (fully_shard moves the rank's shard to the device and frees the rest)."""
        net = adapter.load_network(args.model_dir)
        if weights is not None:
            load_weights(net, weights, source, adapter.convert_state_dict if convert else None)
        return shard(net, adapter.blocks(net), d, dtype if mixed else None,
                     adapter.fp32_modules(net) if mixed else (), ckpt and trainable and mixed, trainable)

    try:
        c = dfd_config(args)
        data = LatentShards(args.data, adapter.data_keys)
        resume, resumed_from = None, None
        if args.resume is not None:
            resumed_from = latest_checkpoint(args.out if args.resume == "latest" else args.resume)
            resume = load_checkpoint(resumed_from)
        teacher_net = adapter.load_network(args.model_dir)
        adapter.check_data(data.shapes, teacher_net)
        teacher_net = shard(teacher_net, adapter.blocks(teacher_net), d, dtype, adapter.fp32_modules(teacher_net),
                            False, False)
        if resume is None:  # student from the DMD2 generator, fake score from its critic (else the teacher)
            sd = read_checkpoint(args.dmd2_ckpt, args.init_from)
            if sd is None:
                raise ValueError(f"--dmd2-ckpt {args.dmd2_ckpt}: holds no generator weights")
            src = f"--dmd2-ckpt {args.dmd2_ckpt}"
            student_net = build(sd, f"{src} (student)", True)
            ema_net = build(sd, f"{src} (EMA)", False, mixed=False) if args.ema > 0 else None
            del sd
            fake_net = build(read_checkpoint(args.dmd2_ckpt, "critic"), f"{src} (critic)", True)
        else:
            w = resume[0]
            src = f"--resume {resumed_from}"
            student_w = w.pop("student")
            student_net = build(student_w, f"{src} (student)", True, convert=False)
            ema_w = w.pop("ema", student_w)  # a run that turns the EMA on at resume starts it from the student
            del student_w
            ema_net = build(ema_w, f"{src} (EMA)", False, mixed=False, convert=False) if args.ema > 0 else None
            del ema_w
            fake_net = build(w.pop("fake"), f"{src} (fake)", True, convert=False)
    except ValueError as e:
        raise _fail(e)
    uncond = {k: v.to(d.device) for k, v in data.negative.items()} if data.negative else None
    teacher = adapter.denoiser(teacher_net, args.guidance, uncond)
    student = adapter.denoiser(student_net, None, None)
    fake = adapter.denoiser(fake_net, None, None)
    ema = adapter.denoiser(ema_net, None, None) if ema_net is not None else None
    adamw = lambda net, lr: torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999),
                                              weight_decay=args.weight_decay)
    opt_s, opt_f = adamw(student_net, args.lr), adamw(fake_net, args.lr_fake)
    start, position = 0, 0
    if resume is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        st = resume[1]
        if st.get("world") is not None and st["world"] * st.get("per_rank_batch", per_rank) != d.world * per_rank:
            raise SystemExit(f"error: --resume: checkpoint used global batch {st['world'] * st['per_rank_batch']}, "
                             f"this run {d.world * per_rank}")
        for name, net, opt in (("student", student_net, opt_s), ("fake", fake_net, opt_f)):
            set_optimizer_state_dict(net, opt, st["optim"][name], options=StateDictOptions(full_state_dict=True))
        start, position = st["step"] + 1, st["position"]
        _set_rng_state(st["rng"])
    if start >= args.steps:
        raise SystemExit(f"error: --resume: checkpoint is at step {start}, nothing left of --steps {args.steps}")
    per_step = (c.fake_updates + 1) * c.grad_accum  # micro-batches dfd.train draws per student step
    stream = data.batches(position, per_rank, d.rank, d.world, args.seed)
    batches = (adapter.make_batch({k: v.to(d.device) for k, v in item.items()}, d.device) for item in stream)
    if d.main:
        os.makedirs(args.out, exist_ok=True)
        json.dump(vars(args), open(os.path.join(args.out, "args.json"), "w"), indent=1)
    log = MetricLog(os.path.join(args.out, "metrics.jsonl"), args.steps, start, d.main)
    last: dict = {}
    clock = [time.perf_counter()]
    saved = [resumed_from]

    def on_log(step: int, logs: dict) -> None:
        now = time.perf_counter()
        logs = _mean_over_ranks(logs, d.device)
        logs.update(step_time_s=now - clock[0], peak_mem_gb=_peak_memory_gb(d.device), lr=opt_s.param_groups[0]["lr"],
                    samples=(step + 1) * per_step * per_rank * d.world)
        clock[0] = now
        last.clear()
        last.update(step=step, **logs)
        log(step, logs)

    def on_step_end(step: int) -> None:
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps:
            nets = {"student": student_net, "fake": fake_net, **({"ema": ema_net} if ema_net is not None else {})}
            extra = {"position": (step + 1 - start) * per_step + position, "world": d.world,
                     "per_rank_batch": per_rank, "adapter": adapter.name, "args": vars(args)}
            saved[0] = save_checkpoint(args.out, step, nets, {"student": opt_s, "fake": opt_f}, extra, d, args.keep)
            clock[0] = time.perf_counter()  # do not bill the save to the next step

    # FSDP2 warns that the transformer returns a view; the adapters never modify outputs in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    try:
        dfd.train(student, teacher, fake, opt_s, opt_f, batches, args.steps, c, start_step=start, rank=d.rank,
                  ema=ema, log=on_log, on_step_end=on_step_end)
    except FloatingPointError as e:
        where = f"the last good checkpoint {saved[0]} is untouched" if saved[0] else "no checkpoint was written"
        raise SystemExit(f"error: training stopped: {e}; {where}")
    finally:
        log.close()
    return last


def run_prepare(adapter, args: argparse.Namespace) -> dict:
    """Videos + captions -> shards of latents and text embeddings, plus the negative-prompt embedding.
    Under torchrun each rank encodes every world-th video into its own shards; rank 0 merges the manifests."""
    check_args(args)
    try:
        videos = list_videos(args.videos)
    except ValueError as e:
        raise _fail(e)
    if not videos:
        raise SystemExit(f"error: --videos {args.videos}: no video files ({', '.join(VIDEO_EXT)})")
    d = setup_distributed(args.device)
    try:
        enc = adapter.open_encoders(args, d.device)
    except ValueError as e:
        raise _fail(e)
    writer = ShardWriter(args.out, args.per_shard, prefix=f"shard-r{d.rank:02d}")
    skipped: list[dict] = []
    mine = videos[d.rank::d.world]
    # progress of this rank, rewritten after every shard, so that --resume continues after the last full shard
    progress = os.path.join(args.out, f"progress-r{d.rank:02d}.json")
    settings = {"world": d.world, "videos": len(videos), "adapter": adapter.name, "num_frames": args.num_frames,
                "fps": args.fps, "height": args.height, "width": args.width, "store_dtype": args.store_dtype}
    done = 0
    if args.resume and os.path.exists(progress):
        prev = json.load(open(progress))
        if prev["settings"] != settings:
            raise SystemExit(f"error: --resume: {progress} was written with {prev['settings']}, this run has {settings}")
        done, skipped = prev["done"], prev["skipped"]
        writer.shards, writer.shapes = prev["shards"], prev["shapes"]
    from tqdm import tqdm
    for i, (path, caption) in enumerate(tqdm(mine, desc="prepare", disable=not d.main, file=sys.stderr, initial=done)):
        if i < done:
            continue
        if caption is None:
            skipped.append({"file": path, "reason": "no caption"})
            continue
        try:
            frames = read_video_frames(path, args.num_frames, args.fps, args.height, args.width)
        except ValueError as e:
            skipped.append({"file": path, "reason": str(e)})
            continue
        with torch.no_grad():
            item = {**enc.encode_video(frames), **{k: v[0] for k, v in enc.encode_text([caption]).items()}}
        writer.add({k: v.to(_storage_dtype(args)) for k, v in item.items()})
        if not writer.pending:  # a shard was just written
            write_text(progress, json.dumps({"settings": settings, "done": i + 1, "skipped": skipped,
                                             "shards": writer.shards, "shapes": writer.shapes}))
    with torch.no_grad():
        negative = {k: v.to(_storage_dtype(args)) for k, v in enc.negative().items()}
    info = {"adapter": adapter.name, "num_frames": args.num_frames, "fps": args.fps, "height": args.height,
            "width": args.width, "skipped": skipped}
    part = writer.close(info, negative if d.main else None)
    parts = [None] * d.world
    dist.all_gather_object(parts, part)
    if sum(p["count"] for p in parts) == 0:  # every rank sees this, so all stop together
        first = next((sk["reason"] for p in parts for sk in p["skipped"]), "?")
        raise SystemExit(f"error: --videos {args.videos}: none of the {len(videos)} videos was usable ({first})")
    manifest = part
    if d.main:
        shapes = [p["shapes"] for p in parts if p["shapes"]]
        if any(s != shapes[0] for s in shapes):
            raise SystemExit("error: ranks produced samples of different shapes")
        manifest = {**part, "shapes": shapes[0] if shapes else {}, "shards": [s for p in parts for s in p["shards"]],
                    "skipped": [s for p in parts for s in p["skipped"]], "count": sum(p["count"] for p in parts)}
        write_manifest(args.out, manifest)
        for s in manifest["skipped"]:
            print(f"skipped {s['file']}: {s['reason']}", file=sys.stderr)
        print(f"prepared {manifest['count']} samples in {len(manifest['shards'])} shards -> {args.out} "
              f"({len(manifest['skipped'])} skipped)", file=sys.stderr)
    dist.barrier()
    if os.path.exists(progress):  # the manifest is complete: nothing left to resume
        os.remove(progress)
    return manifest


def _storage_dtype(args) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.store_dtype]


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


def _student(adapter, args) -> nn.Module:
    net = adapter.load_network(args.model_dir)
    load_weights(net, load_student_weights(args.ckpt, args.weights), f"--ckpt {args.ckpt}", adapter.convert_state_dict)
    return net


def run_sample(adapter, args: argparse.Namespace) -> list[str]:
    """Prompts -> mp4s with the few-step sampler (dfd.sample); files prompt{i:03d}_seed{s}.mp4."""
    check_args(args)
    d = setup_distributed(args.device)
    adapter.compute_dtype = compute_dtype(args, d)
    try:
        net = _student(adapter, args).to(d.device).eval()
        items = adapter.sample_items(args, d.device)
    except ValueError as e:
        raise _fail(e)
    if adapter.compute_dtype is not None:
        cast_keeping_fp32(net, adapter.compute_dtype)
    student = adapter.denoiser(net, None, None)
    os.makedirs(args.out, exist_ok=True)
    jobs = [(i, s) for i in range(len(items)) for s in args.seeds][d.rank::d.world]
    written = []
    for i, seed in jobs:
        g = torch.Generator(d.device).manual_seed(seed)
        noise = torch.randn((1, *adapter.noise_shape(args)), generator=g, device=d.device)
        cond = adapter.make_cond({k: v[None].to(d.device) for k, v in items[i].items()}, d.device)
        with torch.no_grad():
            x0 = dfd.sample(student, noise, cond, tuple(args.student_ts), generator=g, renoise=args.sampler == "renoise")
            frames = adapter.decode(x0, args)[0]
        path = os.path.join(args.out, f"prompt{i:03d}_seed{seed}.mp4")
        write_mp4(path, frames, args.fps)
        written.append(path)
        if args.save_latents:
            from safetensors.torch import save_file
            save_file({"latents": x0[0].float().cpu().contiguous()}, path[:-4] + ".safetensors")
    dist.barrier()
    return written


def run_export(adapter, args: argparse.Namespace) -> str:
    check_args(args)
    d = setup_distributed("cpu")
    try:
        net = _student(adapter, args)
    except ValueError as e:
        raise _fail(e)
    if d.main:
        adapter.save_pretrained(net, args.out)
        print(f"exported the student to {args.out}", file=sys.stderr)
    return args.out


def add_sample_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    p.add_argument("--ckpt", required=True, help="training checkpoint (step folder, run folder or `latest`) or any "
                   "--dmd2-ckpt format")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "student"),
                   help="auto: the EMA when the checkpoint has one")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file, one prompt per line (encoded with the base text encoder)")
    src.add_argument("--embeddings", help="safetensors with precomputed conditioning (as `prepare` stores it, [N, ...])")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one video per prompt and seed")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--num-frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--student-ts", type=float, nargs="+", default=list(dfd.STUDENT_TS), help="sampler times")
    p.add_argument("--sampler", default="renoise", choices=("renoise", "ode"),
                   help="renoise: fresh noise between steps (DMD2's sampler, as trained); ode: the noise x_t implies "
                        "(deterministic; what a diffusers pipeline with an Euler scheduler computes)")
    p.add_argument("--save-latents", action="store_true", help="also write the final latents next to each mp4")


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", required=True, help="base model folder (architecture config)")
    p.add_argument("--ckpt", required=True, help="training checkpoint or any --dmd2-ckpt format")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "student"))
    p.add_argument("--out", required=True, help="output folder (config.json + safetensors)")


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    p.add_argument("--videos", required=True, help="folder of videos with sidecar .txt captions, or captions.csv / "
                   "captions.jsonl (columns video, caption)")
    p.add_argument("--out", required=True, help="output data folder")
    p.add_argument("--num-frames", type=int, default=81, help="frames per clip (4k + 1)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--fps", type=float, default=16.0, help="frames are sampled at this rate from the start")
    p.add_argument("--per-shard", type=int, default=64, help="samples per shard file")
    p.add_argument("--store-dtype", default="bf16", choices=("bf16", "fp32"), help="dtype of the stored tensors")
    p.add_argument("--resume", action="store_true", help="continue an interrupted prepare into the same --out "
                   "(after its last complete shard; same videos, settings and number of ranks)")


SUBCOMMANDS = ("prepare", "train", "sample", "export", "evaluate")


def main(adapter, argv: Sequence[str] | None = None, description: str = "") -> Any:
    """argparse with the subcommands; no subcommand means train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    parser = argparse.ArgumentParser(description=description)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, add, helptext in (("prepare", add_prepare_args, "videos + captions -> latent shards"),
                                ("train", add_train_args, "DFD post-training (default)"),
                                ("sample", add_sample_args, "checkpoint + prompts -> mp4s"),
                                ("export", add_export_args, "student -> diffusers transformer folder"),
                                ("evaluate", add_evaluate_args, "sample folders -> diversity / camera / saturation "
                                 "report")):
        sp = sub.add_parser(name, help=helptext, description=helptext)
        add(sp)
        if hasattr(adapter, "add_args"):  # the adapter's own flags and defaults
            adapter.add_args(name, sp)
    args = parser.parse_args(argv)
    if hasattr(adapter, "configure"):
        adapter.configure(args)
    run = {"prepare": run_prepare, "train": run_train, "sample": run_sample, "export": run_export,
           "evaluate": run_evaluate}[args.cmd]
    try:
        return run(adapter, args)
    finally:
        teardown_distributed()


# ===================================================================================================
# (2) The Wan2.1 adapter
# ===================================================================================================

WAN_TEXT_LEN = 512  # the pipeline's max_sequence_length: UMT5 output cut to the real length, zero-padded to 512


class WanDenoiser(nn.Module):
    """(x_t, t, cond) -> x0 for WanTransformer3DModel (v = eps - x0, timestep t * 1000 as float [B]).

    cond: text embedding [B, 512, D]. With guidance g, the unconditional branch (the stored negative-prompt
    embedding [1, 512, D]) runs in the same forward as the conditional one (batch 2B) and the result is
    uncond + g (cond - uncond) (dfd.cfg; guiding x0 equals guiding v, the affine map is shared)."""

    def __init__(self, net: nn.Module, guidance: float | None = None, uncond: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.net, self.guidance, self.compute_dtype = net, guidance, compute_dtype
        if guidance is not None and uncond is None:
            raise ValueError("guidance needs the negative-prompt embedding")
        self.register_buffer("uncond", uncond, persistent=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B = x_t.shape[0]
        guided = self.guidance is not None and self.guidance != 1.0
        text = torch.cat([cond, self.uncond.expand(B, -1, -1)]) if guided else cond
        x_in = torch.cat([x_t, x_t]) if guided else x_t
        t_in = torch.cat([t, t]) if guided else t
        dt = self.compute_dtype or x_t.dtype
        v = self.net(hidden_states=x_in.to(dt), timestep=(t_in * 1000).float(), encoder_hidden_states=text.to(dt),
                     return_dict=False)[0].float()
        x0 = dfd.x0_from_v(x_in.float(), v, t_in.float())
        if guided:
            x0_cond, x0_uncond = x0.chunk(2)
            x0 = dfd.cfg(x0_cond, x0_uncond, self.guidance)
        return x0.to(x_t.dtype)


class WanEncoders:
    """The base model's VAE and UMT5 text encoder, used by `prepare` and `sample`."""

    def __init__(self, model_dir: str, device: torch.device, dtype: torch.dtype = torch.float32,
                 text: bool = True, vae: bool = True):
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel
        self.device, self.dtype = device, dtype
        for sub in (["vae"] if vae else []) + (["text_encoder", "tokenizer"] if text else []):
            if not os.path.isdir(os.path.join(model_dir, sub)):
                raise ValueError(f"--model-dir {model_dir}: no {sub}/ folder (expected a diffusers Wan pipeline)")
        try:
            self.vae = AutoencoderKLWan.from_pretrained(os.path.join(model_dir, "vae")).to(device).eval() if vae else None
            if text:
                self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
                self.text_encoder = UMT5EncoderModel.from_pretrained(os.path.join(model_dir, "text_encoder"),
                                                                     dtype=dtype).to(device).eval()
        except Exception as e:
            raise ValueError(f"--model-dir {model_dir}: cannot load VAE / text encoder "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        return (torch.tensor(cfg.latents_mean).view(shape).to(self.device),
                torch.tensor(cfg.latents_std).view(shape).to(self.device))

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [T, H, W, 3] -> {"latents": [16, (T-1)/4+1, H/8, W/8]}, normalised (z - mean) / std, the
        inverse of the pipeline's decode; z is the posterior mode (deterministic)."""
        x = frames.to(self.device).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # [1, 3, T, H, W] in [-1, 1]
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode().float()
        mean, std = self._stats()
        return {"latents": ((z - mean) / std)[0]}

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding: cleaned prompt, UMT5 over 512 tokens with the attention mask, output cut
        to the real token count and zero-padded back to 512 -> {"text": [N, 512, D]}."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean
        tok = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=WAN_TEXT_LEN,
                             truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        h = self.text_encoder(ids, mask).last_hidden_state.float()
        keep = (torch.arange(WAN_TEXT_LEN, device=self.device)[None] < mask.gt(0).sum(1, keepdim=True))[..., None]
        return {"text": h * keep}

    def negative(self) -> dict[str, torch.Tensor]:
        """The pipeline's default negative prompt (the empty string), the unconditional branch of CFG."""
        return {k: v[0] for k, v in self.encode_text([""]).items()}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 16, T', h, w] normalised latents -> uint8 [B, T, H, W, 3], as the pipeline decodes."""
        mean, std = self._stats()
        z = latents.float() * std + mean
        video = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()  # [B, 3, T, H, W] in [-1, 1]
        return ((video / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


class WanAdapter:
    """Wan2.1 text-to-video. See the module docstring for the adapter interface."""

    name = "wan"
    data_keys = ("latents", "text")

    def __init__(self):
        self._decoder: WanEncoders | None = None
        self.compute_dtype: torch.dtype | None = None

    def load_network(self, model_dir: str) -> nn.Module:
        """WanTransformer3DModel from model_dir/transformer (or model_dir itself) in fp32, built from its config and
        filled with load_weights (so a corrupt or mismatched folder gets one clear line; needs no accelerate)."""
        from diffusers import WanTransformer3DModel
        folder = os.path.join(model_dir, "transformer") if os.path.isdir(os.path.join(model_dir, "transformer")) else model_dir
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.exists(cfg_path):
            raise ValueError(f"--model-dir {model_dir}: no transformer/config.json (expected a diffusers Wan folder)")
        try:
            config = WanTransformer3DModel.load_config(folder)
            with torch.device("meta"):
                net = WanTransformer3DModel.from_config(config)
        except Exception as e:
            raise ValueError(f"{cfg_path}: not a WanTransformer3DModel config ({type(e).__name__}: {str(e)[:200]})") from None
        net = net.to_empty(device="cpu")
        # the RoPE tables are non-persistent buffers (not in the file): rebuild them on CPU
        net.rope = type(net.rope)(net.rope.attention_head_dim, net.rope.patch_size, net.rope.max_seq_len)
        load_weights(net, _read_raw(folder), f"--model-dir {folder}")
        return net.eval()

    def convert_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Original Wan key names (Self-Forcing / CausVid checkpoints) -> diffusers', with diffusers' own converter."""
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
        if not any(k.startswith(("blocks.", "head.", "patch_embedding", "text_embedding", "time_")) and
                   ("self_attn" in k or "head.head" in k or "text_embedding" in k) for k in sd):
            return sd
        return convert_wan_transformer_to_diffusers(dict(sd))

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        return list(net.blocks)

    def fp32_modules(self, net: nn.Module) -> list[nn.Module]:
        return [net.condition_embedder.time_embedder]  # diffusers keeps it fp32 (_keep_in_fp32_modules)

    def denoiser(self, net: nn.Module | None, guidance: float | None, uncond: dict | None) -> nn.Module:
        return WanDenoiser(net, guidance, None if uncond is None else uncond["text"][None].float(), self.compute_dtype)

    def make_batch(self, items: dict[str, torch.Tensor], device: torch.device) -> tuple:
        return items["latents"].float(), self.make_cond(items, device)

    def make_cond(self, items: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        return items["text"].float()

    def check_data(self, shapes: dict[str, tuple], net: nn.Module) -> None:
        cfg = net.config
        lat, text = shapes["latents"], shapes["text"]
        if len(lat) != 4 or lat[0] != cfg.in_channels:
            raise ValueError(f"data latents have shape {lat}; the transformer wants [{cfg.in_channels}, T, H, W]")
        if lat[2] % cfg.patch_size[1] or lat[3] % cfg.patch_size[2]:
            raise ValueError(f"data latents {lat}: H, W must be multiples of the patch size {cfg.patch_size[1:]}")
        if len(text) != 2 or text[1] != cfg.text_dim:
            raise ValueError(f"data text embeddings have shape {text}; the transformer wants [L, {cfg.text_dim}]")

    # --- prepare / sample ---------------------------------------------------------------------------

    def add_args(self, cmd: str, p: argparse.ArgumentParser) -> None:
        pass  # Wan needs nothing beyond the shared flags, and their defaults are Wan's

    def open_encoders(self, args, device: torch.device) -> WanEncoders:
        dtype = torch.bfloat16 if (args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")) else torch.float32
        return WanEncoders(args.model_dir, device, dtype)

    def sample_items(self, args, device: torch.device) -> list[dict[str, torch.Tensor]]:
        if args.prompts is not None:
            prompts = read_prompts(args.prompts)
            if not prompts:
                raise ValueError(f"--prompts {args.prompts}: no prompts (one per line)")
            text = WanEncoders(args.model_dir, device, self.compute_dtype or torch.float32, vae=False).encode_text(prompts)["text"]
        else:
            from safetensors.torch import load_file
            try:
                emb = load_file(args.embeddings)
            except Exception as e:
                raise ValueError(f"--embeddings {args.embeddings}: unreadable ({type(e).__name__})") from None
            if "text" not in emb or emb["text"].ndim != 3:
                raise ValueError(f"--embeddings {args.embeddings}: need a tensor 'text' of shape [N, 512, D]")
            text = emb["text"]
        return [{"text": t.float().cpu()} for t in text]

    def noise_shape(self, args) -> tuple[int, int, int, int]:
        return (16, (args.num_frames - 1) // 4 + 1, args.height // 8, args.width // 8)

    def decode(self, latents: torch.Tensor, args) -> torch.Tensor:
        if self._decoder is None:
            self._decoder = WanEncoders(args.model_dir, latents.device, text=False)
        return self._decoder.decode(latents)

    def save_pretrained(self, net: nn.Module, out: str) -> None:
        net.save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    wan = WanAdapter()
    main(wan, description=__doc__.split("\n")[0])
