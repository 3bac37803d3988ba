"""`prepare --videos` from WebDataset tar shards: FastGen's video shards (fastgen/datasets/wds_dataloaders.py, whose
VideoLoaderConfig reads key_map {"real": "mp4", "condition": "txt"}: the video and its caption), read with the
standard library's tarfile, so the webdataset package is not needed.

A shard is an uncompressed tar. The files of one sample share a key, the member name up to the first dot of its
basename (WebDataset's rule: 000123.mp4 and 000123.txt are sample 000123's video and caption). --videos names the
shards as FastGen's datatag does (a folder of .tar files, optionally written WDS:<folder>), as one .tar, or as a brace
pattern ("shards/{00000..00099}.tar", quoted so the shell leaves it alone). Every rank lists the same samples in the
same order (shards in name order, samples in tar order), so `prepare` splits and resumes them across ranks exactly
as it does a folder of videos. A sample is named <shard>/<member> (e.g. shards/00007.tar/000123.mp4) in skip reports,
and its VAE sample is seeded by that name relative to the shards' folder.
"""
from __future__ import annotations

import io
import os
import re
import tarfile

from dfd_video.video import VIDEO_EXT, list_videos

VIDEO_KEYS = tuple(e[1:] for e in VIDEO_EXT)  # "mp4" first: FastGen's key
CAPTION_KEY = "txt"  # FastGen's caption key (decoded as UTF-8 and stripped, as its decode_txt does)


class TarMember(str):
    """A sample's video inside a shard: the name <shard>/<member> as a str, and where its bytes lie in the tar."""

    shard: str
    offset: int
    size: int

    def __new__(cls, shard: str, member: tarfile.TarInfo) -> "TarMember":
        self = super().__new__(cls, os.path.join(shard, member.name))
        self.shard, self.offset, self.size = shard, member.offset_data, member.size
        return self

    def __reduce__(self):  # pickled (prepare gathers the skip reports of every rank) as its name alone
        return str, (str(self),)


class MemberBytes(io.BytesIO):
    """A member's bytes for PyAV, whose str() is the member's name, so read errors name the sample."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


def strip_tag(videos: str) -> str:
    """FastGen writes a shard folder as the datatag WDS:<folder>."""
    return videos[4:] if videos.startswith("WDS:") else videos


def is_webdataset(videos: str) -> bool:
    """--videos names tar shards: a WDS: tag, a brace pattern, a .tar file, or a folder holding only .tar files."""
    path = strip_tag(videos)
    if videos.startswith("WDS:") or "{" in path or path.endswith(".tar"):
        return True
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    tars = any(n.endswith(".tar") for n in names)
    if tars and any(n.lower().endswith(VIDEO_EXT) for n in names):
        raise ValueError(f"--videos {videos}: holds both video files and .tar shards; give a folder of one kind")
    return tars


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: {a,b,c} alternatives and {000..099} numeric ranges (zero-padded as written,
    optional step {0..10..2}), any number of groups, expanded left to right; nesting is not supported."""
    depth = 0
    for ch in pattern:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if not 0 <= depth <= 1:
            raise ValueError(f"--videos {pattern}: unbalanced or nested braces")
    if depth:
        raise ValueError(f"--videos {pattern}: unbalanced or nested braces")
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)(?:\.\.(\d+))?", body)
    if rng:
        lo, hi, step = int(rng[1]), int(rng[2]), int(rng[3] or 1)
        width = len(rng[1]) if rng[1].startswith("0") else 0
        sign = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + sign, sign * max(step, 1))]
    else:
        items = body.split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [x for item in items for x in expand_braces(head + item + tail)]


def shard_paths(videos: str) -> list[str]:
    """The tar files --videos names, in order: a folder's by name (numerically when every stem is a number, as
    FastGen sorts them), a pattern's as it expands. ValueError naming the first missing one."""
    path = strip_tag(videos)
    if os.path.isdir(path):
        names = [n for n in os.listdir(path) if n.endswith(".tar")]
        stems = [n.split(".")[0] for n in names]
        names.sort(key=(lambda n: int(n.split(".")[0])) if all(s.isdigit() for s in stems) else None)
        return [os.path.join(path, n) for n in names]
    paths = expand_braces(path)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more of the {len(paths)})" if len(missing) > 1 else ""
        raise ValueError(f"--videos {videos}: no such tar file {missing[0]}{more}")
    return paths


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension) of a member name: the extension starts at the first dot of the basename."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower() if dot else ""


def list_shard(shard: str) -> list[tuple[TarMember, str, str | None]]:
    """(video, caption, why not) of every sample of one shard that has a video, as dfd_video.video.list_videos lists
    a folder's: a sample whose txt is missing, empty or not UTF-8 has caption "" and the reason (that clip is
    skipped)."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.isreg():
                    key, ext = split_key(member.name)
                    samples.setdefault(key, {})[ext] = member
            out = []
            for files in samples.values():
                video = next((files[k] for k in VIDEO_KEYS if k in files), None)
                if video is None:
                    continue
                caption, why = "", f"no {CAPTION_KEY} caption in {shard} for {video.name}"
                if CAPTION_KEY in files:
                    raw = tar.extractfile(files[CAPTION_KEY]).read()
                    try:
                        caption = raw.decode("utf-8").strip()
                        why = None if caption else f"an empty caption in {shard} for {video.name}"
                    except UnicodeDecodeError as e:
                        why = f"{shard}: {files[CAPTION_KEY].name} is not UTF-8 text (byte {e.start})"
                out.append((TarMember(shard, video), caption, why))
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"--videos: {shard}: not a readable uncompressed tar file ({type(e).__name__}: {e})") from None
    return out


def list_sources(videos: str) -> list[tuple[str, str, str | None]]:
    """(video, caption, why not) of --videos: a folder of videos (dfd_video.video.list_videos) or WebDataset shards."""
    if not is_webdataset(videos):
        return list_videos(videos)
    shards = shard_paths(videos)
    if not shards:
        raise ValueError(f"--videos {videos}: no .tar shards")
    samples = [s for shard in shards for s in list_shard(shard)]
    if not samples:
        raise ValueError(f"--videos {videos}: none of its {len(shards)} tar shards holds a video ({', '.join(VIDEO_KEYS)} "
                         "key); FastGen's latent shards (latent.pth) are prepared data of another format, not videos")
    return samples


def open_source(video: str) -> str | MemberBytes:
    """What read_video_frames opens: a file's path, or a tar member's bytes (read with one seek)."""
    if not isinstance(video, TarMember):
        return video
    with open(video.shard, "rb") as f:
        f.seek(video.offset)
        return MemberBytes(f.read(video.size), str(video))


def seed_root(videos: str) -> str:
    """The folder the videos' seed names are relative to (prepare.video_seed): --videos itself when a folder, else
    the folder of its shards, so a folder, a pattern and a single shard name a sample alike."""
    path = strip_tag(videos)
    return path if os.path.isdir(path) else (os.path.dirname(path) or ".")
