"""Prepared data: safetensors shards of per-sample tensors + manifest.json, and the training stream over them."""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Callable, Iterator, Sequence

import torch

import dfd
from dfd_video.files import atomic_write, write_text


MANIFEST = "manifest.json"
NEGATIVE = "negative.safetensors"
DATA_FORMAT = "dfd-latent-shards"
PROMPTS = "prompts"  # data sub-folder of text_store models: <key>.txt (the caption), <key>.safetensors (its embedding)
TextEncoder = Callable[[list[str]], torch.Tensor]  # captions -> [N, L, D] embeddings


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


# ---------------------------------------------------------------------------------------------------
# The caption store of text_store models (Cosmos: 103 MB per embedding, so one per unique caption, not per clip).


def prompt_key(caption: str) -> torch.Tensor:
    """The first 8 bytes of sha256(caption) as 8 integers in [0, 255]: exact in every storage dtype (bf16
    included), so shards can carry it as an ordinary tensor. [8] float32."""
    return torch.tensor(list(hashlib.sha256(caption.encode()).digest()[:8]), dtype=torch.float32)


def key_name(key: torch.Tensor) -> str:
    return bytes(int(b) for b in key.round().tolist()).hex()


class PromptStore:
    """A data folder's prompts/: one caption file per unique caption and, when cached, its embedding.

    get(keys [B, 8]) -> [B, L, D]: the cached embedding (read once, kept while it is in use) or, when the data were
    prepared with --text online (no embedding stored), the captions encoded now by `encoder`."""

    MEMO = 16  # embeddings kept in memory: 16 x 103 MB for the real Cosmos encoder

    def __init__(self, data: str):
        self.folder = os.path.join(data, PROMPTS)
        self.encoder: TextEncoder | None = None
        self.memo: OrderedDict[str, torch.Tensor] = OrderedDict()

    def path(self, caption: str, ext: str) -> str:
        return os.path.join(self.folder, key_name(prompt_key(caption)) + ext)

    @property
    def online(self) -> bool:
        """True when no embedding is stored: `train` encodes the captions (set `encoder`)."""
        return not any(f.endswith(".safetensors") for f in os.listdir(self.folder))

    def put(self, caption: str, embedding: torch.Tensor | None) -> torch.Tensor:
        """Writes the caption (and its embedding) once; returns its key. Files are written atomically, so
        ranks that meet the same caption at the same time both write it harmlessly."""
        from safetensors.torch import save_file

        os.makedirs(self.folder, exist_ok=True)
        if not os.path.exists(self.path(caption, ".txt")):
            write_text(self.path(caption, ".txt"), caption)
        if embedding is not None and not os.path.exists(self.path(caption, ".safetensors")):
            atomic_write(self.path(caption, ".safetensors"), lambda p: save_file({"text": embedding.contiguous().cpu()}, p))
        return prompt_key(caption)

    def get(self, keys: torch.Tensor, device=None) -> torch.Tensor:
        from safetensors.torch import load_file

        names = [key_name(k) for k in keys.reshape(-1, 8).cpu()]
        if self.encoder is not None:  # online: encode the batch's captions now
            captions = []
            for n in names:
                path = os.path.join(self.folder, n + ".txt")
                if not os.path.exists(path):
                    raise ValueError(f"{path}: caption missing (data prepared without it?)")
                captions.append(open(path, encoding="utf-8").read())
            return self.encoder(captions).float().to(device)
        out = []
        for n in names:
            if n not in self.memo:
                path = os.path.join(self.folder, n + ".safetensors")
                if not os.path.exists(path):
                    raise ValueError(f"{path}: cached prompt embedding missing (prepare with --text cache, "
                                     "or train on data prepared with --text online)")
                self.memo[n] = load_file(path)["text"]
                if len(self.memo) > self.MEMO:
                    self.memo.popitem(last=False)
            self.memo.move_to_end(n)
            out.append(self.memo[n])
        return torch.stack(out).to(device).float()


def online_text_encoder(spec, model_dir: str, d, dtype: torch.dtype) -> TextEncoder:
    """Captions -> embeddings while training, for data prepared with --text online: the spec's text encoder in the
    compute dtype, under torchrun sharded with FSDP2 over spec.text_encoder_blocks (each rank holds 1/world of it)."""
    from dfd_video.distributed import shard

    enc = spec.open_encoders(model_dir, d.device if d.world == 1 else torch.device("cpu"), dtype, vae=False)
    if d.world > 1:
        shard(enc.text_encoder, spec.text_encoder_blocks(enc.text_encoder), d, None, None, checkpointing=False,
              trainable=False)
        enc.device = d.device
    return lambda captions: enc.encode_text(captions)["text"]


# ---------------------------------------------------------------------------------------------------
# Reading prepared data: random access and the training stream.


class LatentShards:
    """Random access to prepared samples; every shard is checked against the manifest when opened. A sample is a dict
    of the stored tensors, with a text_store model's caption key ("text_key") replaced by its embedding ("text").

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
        self.prompts = None
        if "text_key" in self.keys:
            if not os.path.isdir(os.path.join(folder, PROMPTS)):
                raise ValueError(f"--data {folder}: no {PROMPTS}/ folder (the captions of its text keys)")
            self.prompts = PromptStore(folder)
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
        return self.with_text({k: self.handles[si].get_slice(k)[i] for k in self.keys})

    def with_text(self, items: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """items (one sample, or stacked) with "text_key" looked up in the caption store as "text"."""
        if self.prompts is None:
            return items
        items = dict(items)
        key = items.pop("text_key")
        text = self.prompts.get(key)
        items["text"] = text if key.ndim > 1 else text[0]
        return items

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
                si, i = self.index[int(cache[epoch][j])]
                items.append({key: self.handles[si].get_slice(key)[i] for key in self.keys})
            yield self.with_text({key: torch.stack([it[key] for it in items]) for key in self.keys})
            k += 1
