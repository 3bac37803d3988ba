"""The `prepare` subcommand: videos + captions -> latent shards (dfd_video.data) for training."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys

import torch
import torch.distributed as dist

from dfd_video.data import MANIFEST, PromptStore, ShardWriter, write_manifest
from dfd_video.distributed import compute_dtype, setup_distributed
from dfd_video import lmdb_latents
from dfd_video.spec import SELF_FORCING_NEGATIVE_PROMPT, negative_prompt
from dfd_video.files import fail, first_names, write_text
from dfd_video.video import VIDEO_EXT, read_video_frames
from dfd_video.webdataset import list_sources, open_source, seed_root


def earlier_prepare(out: str) -> str:
    """What an earlier prepare left in `out` (its manifest, shards, progress files), as a short list; "" if none."""
    if not os.path.isdir(out):
        return ""
    names = sorted(f for f in os.listdir(out) if f == MANIFEST or re.fullmatch(r"(shard-.*\.safetensors|progress-r\d+\.json)", f))
    return first_names(names)


class TextStorer:
    """encode_text for the shards: the embedding itself per sample, or for text_store models (Cosmos) the caption's
    key, with the caption (and with --text cache its embedding, once per unique caption) in <out>/prompts/."""

    def __init__(self, spec, encoders, out: str, store_dtype: torch.dtype, cache: bool):
        self.encoders, self.store_dtype, self.cache = encoders, store_dtype, cache
        self.store = PromptStore(out) if spec.text_store else None

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.store is None:
            return self.encoders.encode_text(captions)
        new = [c for c in dict.fromkeys(captions) if self.cache and not os.path.exists(self.store.path(c, ".safetensors"))]
        emb = self.encoders.encode_text(new)["text"].to(self.store_dtype) if new else []
        for c, e in zip(new, emb):
            self.store.put(c, e)
        return {"text_key": torch.stack([self.store.put(c, None) for c in captions])}


def interrupted(args: argparse.Namespace) -> str:
    """What cli.main adds to the line of an interrupted prepare."""
    return "while preparing; the shards written so far are kept: add --resume to the same command to continue"


def run(spec, args: argparse.Namespace) -> dict:
    """Videos + captions -> shards of latents and text embeddings, plus the negative-prompt embedding.
    Under torchrun each rank encodes every world-th video into its own shards; rank 0 merges the manifests.
    A Self-Forcing latent LMDB as --videos is converted by dfd_video.lmdb_latents instead."""
    if lmdb_latents.environments(args.videos):
        if earlier_prepare(args.out):
            raise SystemExit(f"error: --out {args.out} already holds a prepared data set; give an empty --out")
        neg = SELF_FORCING_NEGATIVE_PROMPT if args.negative_prompt is None else negative_prompt(
            args.negative_prompt, spec.pipeline_negative_prompt())
        return lmdb_latents.prepare(spec, args, neg, storage_dtype(args))
    try:
        videos = list_sources(args.videos)  # a folder of videos, or WebDataset tar shards
    except ValueError as e:
        raise fail(e)
    if not videos:
        raise SystemExit(f"error: --videos {args.videos}: no video files ({', '.join(VIDEO_EXT)})")
    earlier = earlier_prepare(args.out)
    if earlier and not args.resume:  # a new prepare would leave the old shards beside its own, unlisted
        raise SystemExit(f"error: --out {args.out} already holds a prepared data set ({earlier}); pass --resume to "
                         "continue an interrupted prepare, or give an empty --out")
    d = setup_distributed(args.device)
    try:
        enc = spec.open_encoders(args.model_dir, d.device, compute_dtype(args.dtype, d.device) or torch.float32)
    except ValueError as e:
        raise fail(e)
    encode_text = TextStorer(spec, enc, args.out, storage_dtype(args), getattr(args, "text", "cache") == "cache")
    negative_text = negative_prompt(args.negative_prompt, spec.pipeline_negative_prompt())
    writer = ShardWriter(args.out, args.per_shard, prefix=f"shard-r{d.rank:02d}")
    skipped: list[dict] = []
    mine = videos[d.rank::d.world]
    # progress of this rank, rewritten after every shard, so that --resume continues after the last full shard
    progress = os.path.join(args.out, f"progress-r{d.rank:02d}.json")
    settings = {"world": d.world, "videos": len(videos), "adapter": spec.name, "num_frames": args.num_frames,
                "fps": args.fps, "height": args.height, "width": args.width, "store_dtype": args.store_dtype,
                "vae_latent": args.vae_latent}
    done = 0
    if args.resume and os.path.exists(progress):
        prev = json.load(open(progress))
        if prev["settings"] != settings:
            raise SystemExit(f"error: --resume: {progress} was written with {prev['settings']}, this run has {settings}")
        done, skipped = prev["done"], prev["skipped"]
        writer.shards, writer.shapes = prev["shards"], prev["shapes"]
    from tqdm import tqdm
    todo = tqdm(mine[done:], desc="prepare", disable=not d.main, file=sys.stderr, initial=done, total=len(mine))
    for i, (path, caption, why_not) in enumerate(todo, start=done):
        if why_not is not None:  # missing, empty or not UTF-8: this clip alone is skipped
            skipped.append({"file": path, "reason": why_not})
            continue
        try:
            frames = read_video_frames(open_source(path), args.num_frames, args.fps, args.height, args.width)
        except ValueError as e:
            skipped.append({"file": path, "reason": str(e)})
            continue
        with torch.no_grad():
            seed = video_seed(path, seed_root(args.videos)) if args.vae_latent == "sample" else None
            item = {**enc.encode_video(frames, seed), **{k: v[0] for k, v in encode_text([caption]).items()}}
        writer.add({k: v.to(storage_dtype(args)) for k, v in item.items()})
        if not writer.pending:  # a shard was just written
            write_text(progress, json.dumps({"settings": settings, "done": i + 1, "skipped": skipped,
                                             "shards": writer.shards, "shapes": writer.shapes}))
    with torch.no_grad():
        negative = {k: v[0].to(storage_dtype(args)) for k, v in enc.encode_text([negative_text]).items()}
    info = {"adapter": spec.name, "num_frames": args.num_frames, "fps": args.fps, "height": args.height,
            "width": args.width, "vae_latent": args.vae_latent, "negative_prompt": negative_text,
            "skipped": skipped}
    part = writer.close(info, negative if d.main else None)
    manifest = merge_manifests(part, d, args, len(videos))
    dist.barrier()
    if os.path.exists(progress):  # the manifest is complete: nothing left to resume
        os.remove(progress)
    return manifest


def merge_manifests(part: dict, d, args: argparse.Namespace, n_videos: int) -> dict:
    """Rank 0 merges every rank's shards and skips into the data set's manifest (a collective)."""
    parts = [None] * d.world
    dist.all_gather_object(parts, part)
    if sum(p["count"] for p in parts) == 0:  # every rank sees this, so all stop together
        first = next((sk["reason"] for p in parts for sk in p["skipped"]), "?")
        raise SystemExit(f"error: --videos {args.videos}: none of the {n_videos} videos was usable ({first})")
    if not d.main:
        return part
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
    return manifest


def video_seed(path: str, videos: str) -> int:
    """The seed of a video's VAE posterior sample: a hash of its path relative to --videos (for tar shards, to their
    folder: webdataset.seed_root), so the same clip gets the same latent whatever the number of ranks, the order or a
    --resume (one fixed sample per clip, where FastGen's trainer draws a fresh one every time it sees the clip)."""
    rel = os.path.relpath(path, videos)
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little") >> 1


def storage_dtype(args) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.store_dtype]
