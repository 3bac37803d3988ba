"""Training probes (--probe-every): the drift statistics on frames with known answers, and on a tiny Wan run that
probes change nothing of the training (same weights), write their series and grids, continue on --resume and stop
the run on --stop-on-drift."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_wan
import wan_dfd
from dfd_video.evaluation.probes import hf_energy, video_stats

torch.set_num_threads(1)


def test_hf_energy_of_known_frames():
    flat = np.full((2, 16, 16, 3), 120, np.uint8)
    assert hf_energy(flat) == 0.0  # no signal beside the mean
    checker = (np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)[None, ..., None].repeat(3, -1)
    assert hf_energy(checker) == pytest.approx(1.0)  # all power at (0.5, 0.5) cycles/pixel
    wave = 127.5 + 100 * np.cos(2 * np.pi * np.arange(16) / 16)  # 1/16 cycles/pixel, periodic in the frame
    smooth = wave[None, None, :, None].repeat(16, 1).repeat(3, 3).round().astype(np.uint8)
    assert hf_energy(smooth) < 1e-3  # only uint8 rounding reaches the high frequencies
    white = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    # white noise spreads its power evenly: the share of the band [-1/2, 1/2]^2 beyond radius 1/4 is 1 - pi / 16
    assert hf_energy(white) == pytest.approx(1 - np.pi / 16, abs=0.03)
    s = video_stats(flat)
    assert set(s) == {"saturation", "clipped", "hf_energy"} and s["saturation"] == 0.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    g = torch.Generator().manual_seed(0)
    from dfd_video.data import ShardWriter
    w = ShardWriter(str(root / "data"), per_shard=4)
    for _ in range(4):
        w.add({"latents": torch.randn(16, 3, 4, 6, generator=g), "text": torch.randn(512, 32, generator=g)})
    w.close({"adapter": "wan"}, {"text": torch.randn(512, 32, generator=g)})
    dmd2 = tiny_wan.write_dmd2_checkpoints(str(root / "dmd2"), tiny_wan.tiny_transformer(5), tiny_wan.tiny_transformer(6))
    return {"root": root, "pipe": tiny_wan.cached_pipeline(), "data": str(root / "data"), "dmd2": dmd2["dcp"]}


def train(s, out, *more):
    return wan_dfd.main(["--model-dir", s["pipe"], "--data", s["data"], "--dmd2-ckpt", s["dmd2"], "--out", str(out),
                         "--batch-size", "2", "--fake-updates", "1", "--lr", "1e-4", "--lr-fake", "1e-4",
                         "--monitor-every", "0", "--device", "cpu", "--save-every", "2", *more])


def test_probes_leave_training_unchanged_and_resume_their_series(data, tmp_path):
    train(data, tmp_path / "plain", "--steps", "4")
    probe = ["--probe-every", "2", "--probe-seeds", "0", "1", "--probe-count", "2"]
    train(data, tmp_path / "probed", "--steps", "2", *probe)
    train(data, tmp_path / "probed", "--steps", "4", "--resume", *probe)
    for name in ("student", "fake"):
        a = load_file(str(tmp_path / "plain" / "checkpoints" / "step-000003" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "probed" / "checkpoints" / "step-000003" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name  # bit-identical (dfd.train draws its own generators,
        #                                                      probes touch neither the nets' settings nor the data)
    rows = [json.loads(x) for x in open(tmp_path / "probed" / "probes.jsonl")]
    assert [r["step"] for r in rows] == [-1, 1, 3]  # the start, then every 2 steps; the resume continued the series
    assert [r["iteration"] for r in rows] == [0, 4, 8]  # FastGen iterations done: 2 per student step (--fake-updates 1)
    for r in rows:
        assert 0 <= r["saturation"] <= 1 and 0 <= r["clipped"] <= 1 and 0 <= r["hf_energy"] <= 1
    assert rows[0] != rows[2]  # the student moved, and the probe sees it
    grids = sorted(os.listdir(tmp_path / "probed" / "probes"))
    assert grids == sorted(f"{n}{ext}" for n in ("start", "step-000001", "step-000003") for ext in (".mp4", ".png"))


def test_stop_on_drift_ends_the_run_after_a_checkpoint(data, tmp_path):
    out = tmp_path / "drift"
    with pytest.raises(SystemExit, match=r"--stop-on-drift: stopped after student step 0: \w+ moved .* from the first "
                                         r"probe .*; checkpoint .*step-000000"):
        train(data, out, "--steps", "4", "--probe-every", "1", "--probe-seeds", "0", "--stop-on-drift", "1e-9")
    assert os.path.isdir(out / "checkpoints" / "step-000000")
    assert [json.loads(x)["step"] for x in open(out / "probes.jsonl")] == [-1, 0]


def test_probe_flags_are_checked(data, tmp_path):
    with pytest.raises(SystemExit, match="--stop-on-drift needs --probe-every"):
        train(data, tmp_path / "x", "--steps", "1", "--stop-on-drift", "0.2")
    with pytest.raises(SystemExit, match="--probe-prompts .*: no such file"):
        train(data, tmp_path / "x", "--steps", "1", "--probe-every", "1", "--probe-prompts", str(tmp_path / "none.txt"))
