"""Shared by the tests of the tools around training (test_tracking, test_throughput, test_model_card,
test_webdataset, test_cluster): one tiny Wan training run per test session, a reader of wandb's offline run files,
and WebDataset shards written in FastGen's layout.

tiny_run()          a 3-step train on the tiny random Wan (tests/tiny_wan.py) with --tracker tensorboard and probes
                    (the starting checkpoint and after step 1): its run folder, data, pipeline and DMD2 checkpoint.
wandb_records(dir)  every record of the offline wandb runs under a run folder, as wandb's protobuf Records.
write_shards(...)   tar shards of mp4 + txt samples (000000.mp4, 000000.txt, ...), FastGen's video shards.
"""
from __future__ import annotations

import glob
import os
import shutil
import struct
import tarfile
import tempfile

import torch

import tiny_wan

_CACHE: dict[str, dict] = {}
STEPS = 3


def train_argv(s: dict, out: str, *more: str) -> list[str]:
    return ["train", "--model-dir", s["pipe"], "--data", s["data"], "--dmd2-ckpt", s["dmd2"], "--out", out,
            "--steps", str(STEPS), "--batch-size", "2", "--fake-updates", "1", "--lr", "1e-4", "--save-every", "2",
            "--monitor-every", "2", "--device", "cpu", *more]


def inputs() -> dict:
    """The tiny pipeline, a prepared data folder and a DMD2 checkpoint (the generator as .safetensors)."""
    if "inputs" not in _CACHE:
        import atexit
        from safetensors.torch import save_file
        root = tempfile.mkdtemp(prefix="tiny_tools_")
        atexit.register(shutil.rmtree, root, True)
        tiny_wan.random_data(os.path.join(root, "data"))
        dmd2 = os.path.join(root, "dmd2.safetensors")
        save_file({k: v.contiguous() for k, v in tiny_wan.tiny_transformer(5).state_dict().items()}, dmd2)
        _CACHE["inputs"] = {"root": root, "pipe": tiny_wan.cached_pipeline(), "data": os.path.join(root, "data"),
                            "dmd2": dmd2}
    return _CACHE["inputs"]


def tiny_run() -> dict:
    """inputs() and "run": a finished 3-step run with --tracker tensorboard, probes at the start and after step 1."""
    if "run" not in _CACHE:
        import wan_dfd
        s = dict(inputs())
        s["run"] = os.path.join(s["root"], "run")
        torch.set_num_threads(1)
        wan_dfd.main(train_argv(s, s["run"], "--tracker", "tensorboard", "--probe-every", "2", "--probe-count", "1",
                                "--probe-seeds", "0", "1"))
        _CACHE["run"] = s
    return _CACHE["run"]


def read_leveldb_log(path: str) -> list[bytes]:
    """The records of a wandb transaction log (.wandb): a 7-byte header (":W&B", magic, version), then LevelDB's
    log format, 32 KiB blocks of chunks [crc32 4, length 2, type 1] (1 full, 2 first, 3 middle, 4 last)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    out, part, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            out.append(part)
            part = b""
    return out


def wandb_records(run_folder: str) -> list[tuple[str, list]]:
    """(run id, records) of every offline wandb run under <run_folder>/wandb, oldest first by the start time its run
    record holds (not by folder name: a second run started in the same second gets the folder <first>-1)."""
    from wandb.proto import wandb_internal_pb2 as pb
    found = []
    for path in glob.glob(os.path.join(run_folder, "wandb", "offline-run-*", "run-*.wandb")):
        records = []
        for raw in read_leveldb_log(path):
            r = pb.Record()
            r.ParseFromString(raw)
            records.append(r)
        start = next(r.run.start_time for r in records if r.WhichOneof("record_type") == "run")
        found.append(((start.seconds, start.nanos), os.path.basename(path)[4:-6], records))
    return [(run_id, records) for _, run_id, records in sorted(found, key=lambda x: x[0])]


def history(records: list) -> dict[int, dict[str, str]]:
    """step -> {key: JSON value} of a wandb run's history records (media as key/path etc.)."""
    rows: dict[int, dict[str, str]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            rows.setdefault(int(items["_step"]), {}).update(items)
    return rows


def write_shards(folder: str, videos: str, groups: list[list[int]], extra: dict[str, bytes] | None = None) -> list[str]:
    """Tar shards 00000.tar, ... in `folder`: shard k holds the samples of groups[k], sample i being
    videos/clip{i:02d}.mp4 and its caption clip{i:02d}.txt (tiny_wan.make_videos) as {i:06d}.mp4 and {i:06d}.txt.
    extra: more members written into the first shard (name -> bytes)."""
    import io
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, group in enumerate(groups):
        path = os.path.join(folder, f"{k:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in group:
                for ext in ("mp4", "txt"):
                    src = os.path.join(videos, f"clip{i:02d}.{ext}")
                    if os.path.exists(src):
                        tar.add(src, arcname=f"{i:06d}.{ext}")
            for name, data in (extra or {}).items() if k == 0 else ():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
