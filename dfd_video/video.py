"""Video files (PyAV), prompts files, and folders of videos with captions."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import torch

from dfd_video.files import atomic_write, read_text


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
            while last is not None and len(picked) < num_frames and want[len(picked)] < last_t + step - 1e-6:
                take()  # wanted times that fall on the clip's final frame (while it is on screen)
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
    atomic_write(path, write)


VIDEO_EXT = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


def read_prompts(path: str) -> list[str]:
    """A prompts file: one prompt per line, blank lines skipped. Prompt i of `sample` (prompt{i:03d}_seed{s}.mp4)
    is the i-th of these, which is how `evaluate --prompts` labels its rows. A ValueError names the file and the
    line that is not UTF-8 text."""
    return [ln.strip() for ln in read_text(path).splitlines() if ln.strip()]


def _not_utf8(text: str) -> str | None:
    """For text decoded with errors="surrogateescape": the first undecodable byte, as 0x.., or None."""
    bad = next((c for c in text if "\udc80" <= c <= "\udcff"), None)
    return None if bad is None else f"0x{ord(bad) - 0xdc00:02x}"


def _sidecar_caption(video: str) -> tuple[str, str | None]:
    """(caption, None) from the video's .txt next to it, or ("", why it cannot be used)."""
    side = os.path.splitext(video)[0] + ".txt"
    if not os.path.exists(side):
        return "", "no caption"
    try:
        text = read_text(side).strip()
    except ValueError as e:
        return "", str(e)
    return (text, None) if text else ("", f"empty caption file {side}")


def list_videos(folder: str) -> list[tuple[str, str, str | None]]:
    """(video path, caption, why not) triples: from captions.csv / captions.jsonl (columns video|file|path and
    caption|text|prompt) when present, else each video's sidecar .txt. A video whose caption is missing, empty or
    not UTF-8 text has caption "" and the reason, so that the caller skips that clip alone and says why."""
    if not os.path.isdir(folder):
        raise ValueError(f"--videos {folder}: no such folder")
    pick = lambda row, names: next((row[n].strip() for n in names if n in row and isinstance(row[n], str)
                                    and row[n].strip()), None)
    rows, table = None, None
    for name in ("captions.csv", "captions.jsonl"):
        table = os.path.join(folder, name)
        if os.path.exists(table):
            with open(table, encoding="utf-8", errors="surrogateescape", newline="") as f:
                rows = list(csv.DictReader(f)) if name.endswith(".csv") else _jsonl_rows(f, table)
            break
    if rows is not None:
        out = []
        for n, row in enumerate(rows, start=1):
            v = pick(row, ("video", "file", "path"))
            if v is None:
                raise ValueError(f"{table}: row {n} has no video/file/path column: {row}")
            caption = pick(row, ("caption", "text", "prompt"))
            byte = _not_utf8(caption or "") or _not_utf8(v)
            why = (f"{table} row {n} is not UTF-8 text (byte {byte})" if byte else
                   None if caption else f"no caption in {table} row {n}")
            out.append((os.path.join(folder, v), caption if why is None else "", why))
        return out
    return [(os.path.join(folder, name), *_sidecar_caption(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder)) if name.lower().endswith(VIDEO_EXT)]


def _jsonl_rows(lines, path: str) -> list[dict]:
    rows = []
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}: line {n} is not a JSON object ({e})") from None
            if not isinstance(rows[-1], dict):
                raise ValueError(f"{path}: line {n} is not a JSON object")
    return rows
