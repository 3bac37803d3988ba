"""--tracker wandb | tensorboard: what a training run logs (every metrics.jsonl key, the probes' statistics, seed
grids as images and clips as videos, the run's configuration) sent to Weights & Biases or TensorBoard as well.

An optional layer: `train` imports this module only when --tracker is given, and the module imports its package
only when it opens. Rank 0 alone logs. A resumed run continues the same record, from what the run folder keeps in
tracking.json: the wandb run id (the run is reopened with resume="allow"; steps it had already logged before the
kill are skipped, and an exact resume would log the same numbers again) and the TensorBoard folder <out>/tensorboard
(reopened with purge_step at the resumed step, so TensorBoard drops the events of the killed attempt from there on).
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
from typing import Any

from dfd_video.files import write_text

STATE = "tracking.json"  # in the run folder: {"wandb": run id, "tensorboard": log folder relative to it}
TB_DIR = "tensorboard"


def missing_package(kind: str) -> str | None:
    """One line saying what to install when the package of --tracker `kind` is missing, else None (not imported)."""
    if importlib.util.find_spec(kind) is None:
        return f"--tracker {kind}: the {kind} package is not installed (pip install {kind})"
    return None


def read_state(out: str) -> dict:
    path = os.path.join(out, STATE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e}); it holds the tracker's run id, delete it to start a new "
                         "record") from None


class Tracker:
    """Rank 0's link to an experiment tracker. Steps are student steps (metrics.jsonl's "step")."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def image(self, step: int, tag: str, path: str) -> None:
        raise NotImplementedError

    def video(self, step: int, tag: str, path: str, fps: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def probe(self, result: dict) -> None:
        """A probe's result (dfd_video.evaluation.probes.Probes.last): its statistics, seed grid and clip, at the
        student step it followed; the probe of the starting checkpoint (step -1) under probes/start/ at step 0."""
        step, prefix = (0, "probes/start") if result["step"] < 0 else (result["step"], "probes")
        self.log(step, {f"{prefix}/{k}": v for k, v in result["row"].items() if k != "step"})
        self.image(step, f"{prefix}/seed_grid", result["grid"])
        if result.get("clip"):
            self.video(step, f"{prefix}/clip", result["clip"], result["fps"])


class WandbTracker(Tracker):
    """Weights & Biases: one wandb run per training run, its files in <out>/wandb (WANDB_MODE=offline: synced later
    with `wandb sync`); project --wandb-project, entity from WANDB_ENTITY or the account's default."""

    def __init__(self, out: str, config: dict, project: str):
        import wandb
        self.wandb = wandb
        state = read_state(out)
        try:  # a new run gets its id from wandb; a resumed one reopens the id it kept
            self.run = wandb.init(project=project, id=state.get("wandb"), resume="allow", dir=out, config=config,
                                  name=os.path.basename(os.path.abspath(out)), allow_val_change=True)
        except Exception as e:  # no login, no network: one line, and every rank stops (train: on_main_rank)
            raise ValueError(f"--tracker wandb: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]} "
                             "(WANDB_MODE=offline logs without an account)") from None
        write_text(os.path.join(out, STATE), json.dumps({**state, "wandb": self.run.id}))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if step >= self.run.step:  # a resumed online run already holds the steps up to the kill
            self.run.log(metrics, step=step)

    def image(self, step: int, tag: str, path: str) -> None:
        self.log(step, {tag: self.wandb.Image(path)})

    def video(self, step: int, tag: str, path: str, fps: float) -> None:
        self.log(step, {tag: self.wandb.Video(path, fps=round(fps), format="mp4")})

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker(Tracker):
    """TensorBoard event files in <out>/tensorboard (`tensorboard --logdir <out>`): scalars, the configuration as a
    text table at each (re)start, PNG images and clips as animated GIFs (TensorBoard has no video player)."""

    GIF_WIDTH = 320  # clips are shrunk to this width: a GIF of 81 full-size frames would be tens of MB

    def __init__(self, out: str, config: dict, start: int):
        from torch.utils.tensorboard import SummaryWriter
        state = read_state(out)
        self.writer = SummaryWriter(os.path.join(out, TB_DIR), purge_step=start if start > 0 else None)
        rows = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in sorted(config.items()))
        self.writer.add_text("config", "| setting | value |\n| --- | --- |\n" + rows, start)
        write_text(os.path.join(out, STATE), json.dumps({**state, "tensorboard": TB_DIR}))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, float(v), step)

    def _encoded(self, step: int, tag: str, data: bytes, width: int, height: int) -> None:
        """An image event holding already-encoded bytes (PNG, GIF): SummaryWriter.add_image would decode and
        re-encode, and its add_video needs moviepy."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=data)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def image(self, step: int, tag: str, path: str) -> None:
        from PIL import Image
        with open(path, "rb") as f:
            data = f.read()
        width, height = Image.open(io.BytesIO(data)).size
        self._encoded(step, tag, data, width, height)

    def video(self, step: int, tag: str, path: str, fps: float) -> None:
        import av
        from PIL import Image
        with av.open(path) as box:
            frames = [f.to_image() for f in box.decode(video=0)]
        scale = min(1.0, self.GIF_WIDTH / frames[0].width)
        size = (max(2, round(frames[0].width * scale)), max(2, round(frames[0].height * scale)))
        frames = [f.resize(size) for f in frames]
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
        self._encoded(step, tag, buf.getvalue(), *size)

    def close(self) -> None:
        self.writer.close()


def open_tracker(kind: str, out: str, config: dict, start: int, project: str = "dfd") -> Tracker:
    """The --tracker of a run whose folder is `out`, resumed at student step `start` (0: a new run)."""
    missing = missing_package(kind)
    if missing:
        raise ValueError(missing)
    if kind == "wandb":
        return WandbTracker(out, config, project)
    return TensorBoardTracker(out, config, start)
