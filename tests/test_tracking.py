"""--tracker tensorboard | wandb (dfd_video/tracking.py): every metrics.jsonl key, the probes' statistics, seed grids
and clips, and the configuration reach the tracker, read back from TensorBoard's event files and from wandb's offline
run files (WANDB_MODE=offline); a resumed run continues the same record; the method path imports neither package."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import tiny_tools
import tiny_wan
import wan_dfd
from dfd_video import tracking
from dfd_video.video import write_mp4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def events(folder: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def gif_frames(data: bytes) -> int:
    from PIL import Image
    im = Image.open(io.BytesIO(data))
    return getattr(im, "n_frames", 1)


def test_tensorboard_gets_every_metric_probe_and_the_config():
    pytest.importorskip("tensorboard")
    s = tiny_tools.tiny_run()
    run = s["run"]
    acc = events(os.path.join(run, "tensorboard"))
    logs = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in logs] == [0, 1, 2]
    for row in logs:
        for key, value in row.items():
            if key == "step":
                continue
            got = {e.step: e.value for e in acc.Scalars(key)}
            assert got[row["step"]] == pytest.approx(np.float32(value), rel=1e-6), (key, row["step"])
    assert "teacher_gap" in logs[0] and "tflops" in logs[0] and "samples_per_s" in logs[0]
    # the probes: the starting checkpoint at step 0 under probes/start/, the one after step 1 at step 1
    probes = [json.loads(x) for x in open(os.path.join(run, "probes.jsonl"))]
    assert [p["step"] for p in probes] == [-1, 1]
    for prefix, step, row, name in (("probes/start", 0, probes[0], "start"), ("probes", 1, probes[1], "step-000001")):
        for k in ("saturation", "clipped", "hf_energy"):
            assert [(e.step, e.value) for e in acc.Scalars(f"{prefix}/{k}")] == [(step, pytest.approx(row[k], rel=1e-6))]
        grid = acc.Images(f"{prefix}/seed_grid")
        assert [e.step for e in grid] == [step]
        assert grid[0].encoded_image_string == open(os.path.join(run, "probes", name + ".png"), "rb").read()
        clip = acc.Images(f"{prefix}/clip")
        assert [e.step for e in clip] == [step] and gif_frames(clip[0].encoded_image_string) == 9  # 9-frame clips
        assert os.path.getsize(os.path.join(run, "probes", name + ".mp4")) > 0
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '| student_steps | 3 |' in text and '| tracker | "tensorboard" |' in text and "| world | 1 |" in text
    assert json.load(open(os.path.join(run, "tracking.json"))) == {"tensorboard": "tensorboard"}


def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    """A run killed after logging steps 0-3 and resumed from the checkpoint after step 1: TensorBoard shows steps 2
    and 3 once, with the resumed run's values (purge_step), and the configuration of both starts."""
    pytest.importorskip("tensorboard")
    out = str(tmp_path)
    first = tracking.open_tracker("tensorboard", out, {"steps": 4}, 0)
    for step in range(4):
        first.log(step, {"loss": float(step)})
    first.close()
    again = tracking.open_tracker("tensorboard", out, {"steps": 4}, 2)
    for step in (2, 3):
        again.log(step, {"loss": 10.0 + step})
    again.close()
    acc = events(os.path.join(out, "tensorboard"))
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0)]
    assert [e.step for e in acc.Tensors("config/text_summary")] == [0, 2]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_logs_metrics_media_config_and_resumes_the_same_run(tmp_path, offline_wandb):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = str(tmp_path / "run")
    os.makedirs(out)
    grid, clip = os.path.join(out, "grid.png"), os.path.join(out, "clip.mp4")
    plt.figure(figsize=(1, 1)).savefig(grid)
    write_mp4(clip, np.zeros((5, 16, 16, 3), np.uint8), 8)
    first = tracking.open_tracker("wandb", out, {"steps": 3, "p": 0.5}, 0, project="dfd-test")
    first.probe({"step": -1, "row": {"step": -1, "saturation": 0.25}, "grid": grid, "clip": clip, "fps": 8})
    first.log(0, {"loss_student": 1.5})
    first.log(1, {"loss_student": 0.5})
    first.probe({"step": 1, "row": {"step": 1, "saturation": 0.5}, "grid": grid, "clip": clip, "fps": 8})
    first.close()
    run_id = json.load(open(os.path.join(out, "tracking.json")))["wandb"]
    again = tracking.open_tracker("wandb", out, {"steps": 4, "p": 0.5}, 2, project="dfd-test")  # --steps raised
    again.log(2, {"loss_student": 0.25})
    again.close()
    assert json.load(open(os.path.join(out, "tracking.json"))) == {"wandb": run_id}
    runs = tiny_tools.wandb_records(out)
    assert [r[0] for r in runs] == [run_id, run_id]  # the resumed run logs to the same wandb run
    h1, h2 = (tiny_tools.history(r[1]) for r in runs)
    assert sorted(h1) == [0, 1] and sorted(h2) == [2]
    assert json.loads(h1[0]["loss_student"]) == 1.5 and json.loads(h2[2]["loss_student"]) == 0.25
    assert json.loads(h1[0]["probes/start/saturation"]) == 0.25 and json.loads(h1[1]["probes/saturation"]) == 0.5
    assert json.loads(h1[0]["probes/start/seed_grid/_type"]) == "image-file"
    assert json.loads(h1[1]["probes/clip/_type"]) == "video-file"
    config = [r.run.config for r in runs[1][1] if r.WhichOneof("record_type") == "run"]
    values = {i.key: json.loads(i.value_json) for c in config for i in c.update}
    assert values["steps"] == 4 and values["p"] == 0.5


def test_a_missing_tracker_package_is_one_line(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    (tmp_path / "ckpt.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        wan_dfd.main(["train", "--model-dir", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                      "--dmd2-ckpt", str(tmp_path / "ckpt.safetensors"), "--tracker", "wandb"])
    assert str(e.value.code) == "error: --tracker wandb: the wandb package is not installed (pip install wandb)"
    assert not (tmp_path / "run").exists()


def module_level_imports(module: str) -> set[str]:
    """The modules `module` imports at module level (not inside functions), and theirs, within this repository."""
    import ast
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = os.path.join(ROOT, *name.split(".")) + ".py"
        if name in seen or not os.path.exists(path):
            seen.add(name)
            continue
        seen.add(name)
        body = list(ast.parse(open(path).read()).body)
        while body:
            node = body.pop()
            if isinstance(node, (ast.If, ast.Try)):
                body += node.body + node.orelse + getattr(node, "finalbody", []) + \
                    [x for h in getattr(node, "handlers", []) for x in h.body]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return seen


def test_the_method_path_imports_no_tracker_at_module_level():
    """What the scripts and the method path's drivers import at module level holds neither the tracking layer nor
    its packages (nor the evaluation or planning layers): `train` imports tracking only with --tracker."""
    found = set().union(*(module_level_imports(m) for m in ("wan_dfd", "cosmos_dfd", "dfd_video.train",
                                                              "dfd_video.prepare", "dfd_video.export", "dfd_video.sample")))
    assert "dfd_video.throughput" in found and "dfd_video.webdataset" in found  # the walk does see the new modules
    bad = sorted(m for m in found if m.split(".")[0] in ("wandb", "tensorboard") or
                 m.startswith(("dfd_video.tracking", "dfd_video.evaluation", "dfd_video.planning")))
    assert bad == []


@pytest.mark.slow
def test_the_method_path_imports_no_tracker():
    """The same, as Python sees it: importing the scripts and drivers loads none of them."""
    code = ("import sys, wan_dfd, dfd_video.train, dfd_video.prepare, dfd_video.export, dfd_video.sample; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'tensorboard') or "
            "m.startswith(('dfd_video.tracking', 'dfd_video.evaluation', 'dfd_video.planning'))))")
    r = subprocess.run([sys.executable, "-c", code], env=tiny_wan.quiet_env(), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


@pytest.mark.slow
def test_wandb_train_killed_and_resumed_continues_the_same_run(tmp_path, offline_wandb):
    """End to end: a wandb run of `train` with probes, killed after logging step 2 but before checkpointing it (its
    checkpoint removed: what a kill leaves), resumed from step 1's checkpoint: the same wandb run id, steps 0-2 in the
    first file and 2 again in the second (offline files hold each attempt), every metrics.jsonl key in both."""
    s = tiny_tools.inputs()
    out = str(tmp_path / "run")
    argv = tiny_tools.train_argv(s, out, "--tracker", "wandb", "--probe-every", "1", "--probe-count", "1",
                                 "--probe-seeds", "0")
    torch.set_num_threads(1)
    wan_dfd.main(argv)
    shutil.rmtree(os.path.join(out, "checkpoints", "step-000002"))
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write("step-000001\n")
    wan_dfd.main([*argv, "--resume"])
    run_id = json.load(open(os.path.join(out, "tracking.json")))["wandb"]
    runs = tiny_tools.wandb_records(out)
    assert [r[0] for r in runs] == [run_id, run_id]
    h1, h2 = (tiny_tools.history(r[1]) for r in runs)
    assert sorted(h1) == [0, 1, 2] and sorted(h2) == [2]
    logs = {json.loads(x)["step"]: json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))}
    for h in (h1, h2):
        for step, row in h.items():
            assert all(k in row for k in logs[step] if k != "step"), step
            assert json.loads(row["loss_student"]) == pytest.approx(logs[step]["loss_student"], rel=1e-6)
    assert json.loads(h1[0]["probes/start/seed_grid/_type"]) == "image-file"
    assert json.loads(h2[2]["probes/clip/_type"]) == "video-file"
