"""Self-Forcing's latent LMDBs (SF-DFD's ViPE training data) as `prepare` input: `prepare --videos <lmdb folder>`.

The layout is Self-Forcing's utils/lmdb.py as its utils/dataset.py reads it: one LMDB environment (a folder with
data.mdb) or a folder of them (ShardingLMDBDataset), each holding
  b"latents_shape"       "N T C H W" (or "N S T C H W": S steps of an ODE trajectory, noise first, clean last)
  b"latents_{i}_data"    row i as float16 bytes, [T, C, H, W] (already VAE-normalised, Self-Forcing's
                         WanVAEWrapper: (z - mean) / std, which is also this project's latent convention)
  b"prompts_{i}_data"    row i's caption, utf-8
prepare turns each row into one sample: latents [C, T, H, W] (the clean end of a trajectory) and the caption's text
embedding from --model-dir's encoder, plus the negative prompt (Self-Forcing's by default for this input).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator

import numpy as np
import torch

from dfd_video.data import ShardWriter
from dfd_video.distributed import compute_dtype, setup_distributed
from dfd_video.files import fail


def environments(path: str) -> list[str]:
    """The LMDB environments under `path`: itself when it holds data.mdb, else its sub-folders that do ([] if none)."""
    if not os.path.isdir(path):
        return []
    if os.path.exists(os.path.join(path, "data.mdb")):
        return [path]
    subs = [os.path.join(path, n) for n in sorted(os.listdir(path))]
    return [s for s in subs if os.path.exists(os.path.join(s, "data.mdb"))]


def read_rows(path: str) -> Iterator[tuple[torch.Tensor, str]]:
    """(latents [C, T, H, W] float32, caption) for every row of every environment under `path`, in order."""
    import lmdb
    for env_path in environments(path):
        env = lmdb.open(env_path, readonly=True, lock=False, readahead=False, meminit=False)
        with env.begin() as txn:
            raw = txn.get(b"latents_shape")
            if raw is None:
                raise ValueError(f"{env_path}: no latents_shape key (not a Self-Forcing latent LMDB, utils/lmdb.py)")
            shape = tuple(int(x) for x in raw.decode().split())
            if len(shape) not in (5, 6):
                raise ValueError(f"{env_path}: latents_shape {shape}; expected N T C H W (or N S T C H W)")
            for i in range(shape[0]):
                row, cap = txn.get(f"latents_{i}_data".encode()), txn.get(f"prompts_{i}_data".encode())
                if row is None or cap is None:
                    raise ValueError(f"{env_path}: row {i} of {shape[0]} has no latents_{i}_data / prompts_{i}_data")
                lat = np.frombuffer(row, dtype=np.float16).reshape(shape[1:])
                if lat.ndim == 5:  # an ODE trajectory: its clean end
                    lat = lat[-1]
                yield torch.from_numpy(lat.astype(np.float32)).permute(1, 0, 2, 3).contiguous(), cap.decode()
        env.close()


def prepare(spec, args: argparse.Namespace, negative_text: str, store: torch.dtype) -> dict:
    """The LMDB rows -> shards of latents and text embeddings (one process; the text encoder of --model-dir)."""
    if args.resume:
        raise SystemExit(f"error: --resume: an LMDB --videos {args.videos} is converted in one go; give an empty --out")
    d = setup_distributed(args.device)
    if d.world > 1:
        raise SystemExit("error: prepare from an LMDB runs as one process (no torchrun)")
    try:
        enc = spec.open_encoders(args.model_dir, d.device, compute_dtype(args.dtype, d.device) or torch.float32,
                                 vae=False)
        writer = ShardWriter(args.out, args.per_shard)
        from tqdm import tqdm
        for lat, caption in tqdm(read_rows(args.videos), desc="prepare (LMDB)", file=sys.stderr):
            with torch.no_grad():
                text = {k: v[0] for k, v in enc.encode_text([caption]).items()}
            writer.add({"latents": lat.to(store), **{k: v.to(store) for k, v in text.items()}})
        with torch.no_grad():
            negative = {k: v[0].to(store) for k, v in enc.encode_text([negative_text]).items()}
    except ValueError as e:
        raise fail(e)
    info = {"adapter": spec.name, "source": "lmdb", "lmdb": os.path.abspath(args.videos),
            "negative_prompt": negative_text, "skipped": []}
    manifest = writer.close(info, negative)
    if manifest["count"] == 0:
        raise SystemExit(f"error: --videos {args.videos}: the LMDB holds no rows")
    print(f"prepared {manifest['count']} samples in {len(manifest['shards'])} shards -> {args.out} (from the LMDB "
          f"{args.videos})", file=sys.stderr)
    return manifest
