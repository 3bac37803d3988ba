"""Prepared data: safetensors shards of per-sample tensors + manifest.json, and the training stream over them."""
from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import torch

import dfd
from dfd_video.files import atomic_write, write_text


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
        atomic_write(os.path.join(self.out, name), lambda p: save_file(batch, p))
        self.shards.append({"file": name, "count": len(self.pending)})
        self.pending = []

    def close(self, info: dict, negative: dict[str, torch.Tensor] | None = None) -> dict:
        from safetensors.torch import save_file
        self.flush()
        manifest = {"format": DATA_FORMAT, "version": 1, **info, "shapes": self.shapes or {},
                    "count": sum(s["count"] for s in self.shards), "shards": self.shards}
        if negative is not None:
            neg = {k: v.detach().cpu().contiguous() for k, v in negative.items()}
            atomic_write(os.path.join(self.out, NEGATIVE), lambda p: save_file(neg, p))
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
