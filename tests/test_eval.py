"""The `evaluate` subcommand of wan_dfd.py / cosmos_dfd.py (visual diversity, Eq. 11 and Appendix B.3.1;
camera-pose diversity, Appendix B.3.3; saturation), checked against values worked out by hand or with
independent numpy code here, never with the functions under test: the metric functions on hand examples,
frame picking on a clip whose brightness counts its frames, the file readers' errors, and the whole command
on two folders of tiny clips with tiny random CLIP / DINOv2 encoders and known camera trajectories."""
import json
import math
import os
import re
import shutil

import av
import numpy as np
import pytest
import torch

import tiny_vision as tv
import dfd_video.evaluation.evaluate
import wan_dfd

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------------
# Independent references (numpy, float64).


def ref_diversity(x) -> float:
    """Eq. 11: 1 - the mean cosine similarity over the L(L-1)/2 unordered pairs."""
    x = np.asarray(x, np.float64)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    L = len(u)
    return 1.0 - sum(float(u[i] @ u[j]) for i in range(L) for j in range(i + 1, L)) * 2 / (L * (L - 1))


def ref_spread(trajs) -> dict:
    """Appendix B.3.3's cross-seed metrics, by loops: trajs [L, N, 3]."""
    trajs = np.asarray(trajs, np.float64)
    L, N = trajs.shape[:2]
    e = trajs[:, -1]
    pairs = [(i, j) for i in range(L) for j in range(i + 1, L)]
    return {"endpoint_spread": float(np.sqrt(sum(np.var(e[:, a]) for a in range(3)))),
            "endpoint_distance": float(np.mean([np.linalg.norm(e[i] - e[j]) for i, j in pairs])),
            "trajectory_distance": float(np.mean([sum(np.linalg.norm(trajs[i, t] - trajs[j, t]) for t in range(N)) / N
                                                  for i, j in pairs]))}


def ref_saturation(frames: np.ndarray) -> tuple[float, float]:
    """(mean HSV saturation, fraction of pixels with a channel at 0 or 255) of uint8 [..., 3]."""
    x = frames.reshape(-1, 3).astype(np.float64)
    hi, lo = x.max(1), x.min(1)
    s = np.where(hi > 0, (hi - lo) / np.where(hi > 0, hi, 1), 0.0)
    clipped = ((x == 0) | (x == 255)).any(1)
    return float(s.mean()), float(clipped.mean())


def decode_all(path: str) -> np.ndarray:
    with av.open(path) as box:
        return np.stack([f.to_ndarray(format="rgb24") for f in box.decode(video=0)])


def even_indices(n: int, k: int) -> np.ndarray:
    return np.linspace(0, n - 1, k).round().astype(int)


# ---------------------------------------------------------------------------------------------------
# Visual diversity, Eq. 11.


def test_pairwise_diversity_identical_orthogonal_and_opposite():
    v = torch.tensor([0.3, -1.2, 2.0, 0.5])
    d = dfd_video.evaluation.evaluate.pairwise_diversity(v.repeat(5, 1))
    assert isinstance(d, float) and abs(d) < 1e-6
    assert dfd_video.evaluation.evaluate.pairwise_diversity(torch.eye(4)) == pytest.approx(1.0, abs=1e-6)  # every cosine is 0
    assert dfd_video.evaluation.evaluate.pairwise_diversity(torch.stack([v, -v])) == pytest.approx(2.0, abs=1e-6)  # cosine -1


def test_pairwise_diversity_hand_example():
    # a = (1, 0), b = (0, 1), c = (1, 1): cos(a, b) = 0, cos(a, c) = cos(b, c) = 1/sqrt(2);
    # 3 pairs -> 1 - (2 / sqrt(2)) / 3 = 1 - sqrt(2) / 3. (Counting ordered pairs with the diagonal would give
    # 1 - (3 + 2 sqrt(2)) / 9, a different number.)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert dfd_video.evaluation.evaluate.pairwise_diversity(x) == pytest.approx(1 - math.sqrt(2) / 3, abs=1e-6)
    # cosine ignores each vector's length
    assert dfd_video.evaluation.evaluate.pairwise_diversity(x * torch.tensor([[3.0], [0.01], [250.0]])) == pytest.approx(1 - math.sqrt(2) / 3,
                                                                                                      abs=1e-6)


def test_pairwise_diversity_random_against_loop_and_scale_invariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 12, generator=g) + 0.5
    want = ref_diversity(x.numpy())
    assert dfd_video.evaluation.evaluate.pairwise_diversity(x) == pytest.approx(want, abs=1e-6)
    scale = torch.rand(8, 1, generator=g) * 100 + 0.01
    assert dfd_video.evaluation.evaluate.pairwise_diversity(x * scale) == pytest.approx(want, abs=1e-6)


def test_per_frame_diversity_against_loop():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(5, 4, 7, generator=g) + torch.randn(1, 4, 7, generator=g)  # [L, F, D]
    want = float(np.mean([ref_diversity(feats[:, f].numpy()) for f in range(4)]))
    got = dfd_video.evaluation.evaluate.per_frame_diversity(feats)
    assert isinstance(got, float) and got == pytest.approx(want, abs=1e-6)
    # the per-frame number is not the pooled one (so the two summary keys carry different information)
    assert abs(want - ref_diversity(feats.mean(1).numpy())) > 1e-2


# ---------------------------------------------------------------------------------------------------
# Camera-pose diversity, Appendix B.3.3.


def test_rotation_angle_deg_generic_axes_and_batch_shape():
    g = np.random.default_rng(0)
    axes = g.normal(size=(2, 3, 3))
    degs = g.uniform(0, 180, (2, 3))
    R = np.stack([np.stack([tv.rodrigues(axes[i, j], degs[i, j]) for j in range(3)]) for i in range(2)])
    got = dfd_video.evaluation.evaluate.rotation_angle_deg(R)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, degs, atol=1e-8)


@pytest.mark.parametrize("deg", [0.0, 1e-7, 5e-7, 1e-6, 1e-5, 1e-3, 90.0, 180 - 1e-3, 180 - 1e-5, 180 - 1e-6,
                                 180 - 1e-7, 180.0])
def test_rotation_angle_deg_near_0_and_180(deg):
    R = tv.rodrigues([0.3, -0.5, 0.8], deg)
    got = np.asarray(dfd_video.evaluation.evaluate.rotation_angle_deg(R[None]))
    assert np.isfinite(got).all() and abs(float(got[0]) - deg) < 1e-6


def test_rotation_angle_deg_rounding_past_the_ends_is_not_nan():
    # float rounding can push (trace - 1) / 2 just past +-1; the angle must stay finite and at the end
    up = np.eye(3) * (1 + 4e-16)
    down = np.diag([-1.0, -1.0, 1.0]) * (1 + 4e-16)  # 180 degrees about z
    got = np.asarray(dfd_video.evaluation.evaluate.rotation_angle_deg(np.stack([up, down])))
    assert np.isfinite(got).all()
    assert abs(got[0]) < 1e-6 and abs(got[1] - 180.0) < 1e-6


def test_camera_motion_line_and_yaw_past_90_degrees():
    # p_t = p0 + t (0.3, 0.4, 0): |v| = 0.5 per step, N = 10 -> path 9 * 0.5 = 4.5, farthest 4.5 (the end);
    # R_t = Rz(15 t) R0: each step turns 15 deg -> total 135; R_t R0^T = Rz(15 t) -> max 135 (past 90).
    T = tv.pose_trajectory(10, (0.3, 0.4, 0.0), 15.0, p0=(1.0, -2.0, 0.5))
    m = dfd_video.evaluation.evaluate.camera_motion(T)
    assert set(m) == {"path_length", "max_translation", "rotation_total", "max_rotation"}
    assert all(isinstance(v, float) for v in m.values())
    assert m["path_length"] == pytest.approx(4.5, abs=1e-9)
    assert m["max_translation"] == pytest.approx(4.5, abs=1e-9)
    assert m["rotation_total"] == pytest.approx(135.0, abs=1e-6)
    assert m["max_rotation"] == pytest.approx(135.0, abs=1e-6)


def test_camera_motion_yaw_past_180_wraps_and_there_and_back():
    # 25 deg per step, N = 10: the total keeps adding (9 * 25 = 225), but the deviation from the start is an
    # angle in [0, 180]: 25 t for t <= 7 is at most 175, and t = 8, 9 (200, 225) are 160, 135 away -> max 175.
    T = tv.pose_trajectory(10, (0.0, 0.0, 0.0), 25.0)
    m = dfd_video.evaluation.evaluate.camera_motion(T)
    assert m["rotation_total"] == pytest.approx(225.0, abs=1e-6)
    assert m["max_rotation"] == pytest.approx(175.0, abs=1e-6)
    assert m["path_length"] == pytest.approx(0.0, abs=1e-12) and m["max_translation"] == pytest.approx(0.0, abs=1e-12)
    # out 2 along x and back, then 1 along y: path 2 + 2 + 1 = 5; farthest from p_0 is 2 (at t = 2)
    xs = [(0, 0, 0), (1, 0, 0), (2, 0, 0), (1, 0, 0), (0, 0, 0), (0, 1, 0)]
    T = tv.pose_trajectory(len(xs), (0.0, 0.0, 0.0), 0.0)
    T[:, :3, 3] = np.asarray(xs, np.float64) + (5.0, 5.0, 5.0)
    m = dfd_video.evaluation.evaluate.camera_motion(T)
    assert m["path_length"] == pytest.approx(5.0, abs=1e-9)
    assert m["max_translation"] == pytest.approx(2.0, abs=1e-9)
    assert m["rotation_total"] == pytest.approx(0.0, abs=1e-6) and m["max_rotation"] == pytest.approx(0.0, abs=1e-6)


def test_camera_spread_hand_example():
    # endpoints (0,0,0), (3,0,0), (0,4,0) (+ a shared offset): population std per axis x: sqrt(2),
    # y: sqrt(32/9), z: 0 -> spread sqrt(2 + 32/9) = 5 sqrt(2) / 3 (with ddof=1 it would be sqrt(25/3));
    # pairwise endpoint distances 3, 4, 5 -> 4. Trajectories p_t = offset + e * t / (N - 1) with N = 3:
    # per-frame distance t / 2 * |e_i - e_j| -> mean over t (1/N) = 0.5 |e_i - e_j| -> 2.
    e = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    offset = np.array([1.0, 2.0, -3.0])
    trajs = offset + e[:, None] * np.array([0.0, 0.5, 1.0])[None, :, None]  # [3, 3, 3]
    s = dfd_video.evaluation.evaluate.camera_spread(trajs)
    assert set(s) == {"endpoint_spread", "endpoint_distance", "trajectory_distance"}
    assert all(isinstance(v, float) for v in s.values())
    assert s["endpoint_spread"] == pytest.approx(5 * math.sqrt(2) / 3, abs=1e-9)
    assert s["endpoint_distance"] == pytest.approx(4.0, abs=1e-9)
    assert s["trajectory_distance"] == pytest.approx(2.0, abs=1e-9)


def test_camera_spread_random_against_loop():
    trajs = np.random.default_rng(3).normal(size=(4, 6, 3))
    got, want = dfd_video.evaluation.evaluate.camera_spread(trajs), ref_spread(trajs)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


# ---------------------------------------------------------------------------------------------------
# Saturation.


@pytest.mark.parametrize("rgb,s,clipped", [((255, 0, 0), 1.0, 1.0), ((128, 128, 128), 0.0, 0.0),
                                           ((0, 0, 0), 0.0, 1.0), ((200, 100, 50), 0.75, 0.0),
                                           ((255, 255, 255), 0.0, 1.0), ((40, 30, 10), 0.75, 0.0)])
def test_saturation_single_colours(rgb, s, clipped):
    frames = np.broadcast_to(np.array(rgb, np.uint8), (2, 3, 4, 3)).copy()
    got = dfd_video.evaluation.evaluate.saturation_stats(frames)
    assert got["saturation"] == pytest.approx(s, abs=1e-6)
    assert got["clipped"] == pytest.approx(clipped, abs=1e-12)


def test_saturation_mixed_pixels():
    # red (S 1, clipped), grey (0, no), black (0, clipped), (200, 100, 50) (0.75, no) -> S 0.4375, clipped 0.5;
    # uint8 arithmetic (255 - 0 wrapping, integer division) would get these wrong.
    px = np.array([[[255, 0, 0], [128, 128, 128]], [[0, 0, 0], [200, 100, 50]]], np.uint8)[None]  # [1, 2, 2, 3]
    got = dfd_video.evaluation.evaluate.saturation_stats(px)
    assert got["saturation"] == pytest.approx(1.75 / 4, abs=1e-6)
    assert got["clipped"] == pytest.approx(0.5, abs=1e-12)
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    got = dfd_video.evaluation.evaluate.saturation_stats(frames)
    s, c = ref_saturation(frames)
    assert got["saturation"] == pytest.approx(s, abs=1e-6) and got["clipped"] == pytest.approx(c, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# Reading clips: evenly spaced frames, the middle frame, saturation over every frame.


@pytest.fixture(scope="module")
def counter_clip(tmp_path_factory):
    # 20 frames; the right half is coloured only in frames 2, 7, 12, 17: exactly the ones that 16 evenly spaced
    # picks (0, 1, 3, 4, 5, 6, 8, ...) skip, so saturation over the picked frames differs from over all frames.
    path = str(tmp_path_factory.mktemp("clip") / "counter.mp4")
    return tv.write_video(path, tv.counter_frames(20, colored=(2, 7, 12, 17)))


def left_level(frames: np.ndarray) -> np.ndarray:
    """The counter grey level of each frame (the left half's interior, away from the codec's edges)."""
    return frames[..., 4:-4, 4:20, :].reshape(*frames.shape[:-3], -1).mean(-1)


def test_read_eval_video_picks_evenly_spaced_frames(counter_clip):
    frames, middle, sat = dfd_video.evaluation.evaluate.read_eval_video(counter_clip, 16)
    assert frames.dtype == np.uint8 and frames.shape == (16, 32, 48, 3)
    assert middle.dtype == np.uint8 and middle.shape == (32, 48, 3)
    idx = even_indices(20, 16)
    assert list(idx) == [0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16, 18, 19]
    # levels are 10 apart; the codec moves them by ~2, so a neighbouring index cannot pass within 4
    want = np.array([tv.counter_value(k) for k in idx], np.float64)
    np.testing.assert_array_less(np.abs(left_level(frames) - want), 4.0)
    assert abs(left_level(middle) - tv.counter_value(10)) < 4.0  # frame n // 2
    # saturation over all 20 decoded frames, not over the 16 picked
    decoded = decode_all(counter_clip)
    assert len(decoded) == 20
    s_all, c_all = ref_saturation(decoded)
    s_picked, _ = ref_saturation(decoded[idx])
    assert abs(s_all - s_picked) > 0.02  # the clip is built so that these differ
    assert sat["saturation"] == pytest.approx(s_all, abs=1e-5)
    assert sat["clipped"] == pytest.approx(c_all, abs=1e-9)
    # every picked frame is the decoded frame at its index
    np.testing.assert_array_equal(frames, decoded[idx])
    np.testing.assert_array_equal(middle, decoded[10])


def test_read_eval_video_other_counts(counter_clip):
    frames, _, _ = dfd_video.evaluation.evaluate.read_eval_video(counter_clip, 20)  # every frame
    np.testing.assert_array_less(np.abs(left_level(frames) - [tv.counter_value(k) for k in range(20)]), 4.0)
    frames, _, _ = dfd_video.evaluation.evaluate.read_eval_video(counter_clip, 4)  # 0, 6.33, 12.67, 19 -> 0, 6, 13, 19
    np.testing.assert_array_less(np.abs(left_level(frames) - [tv.counter_value(k) for k in (0, 6, 13, 19)]), 4.0)


def test_read_eval_video_errors(counter_clip, tmp_path):
    with pytest.raises(ValueError, match=re.escape(counter_clip)):
        dfd_video.evaluation.evaluate.read_eval_video(counter_clip, 21)  # 20 frames < 21
    bad = tmp_path / "prompt000_seed0.mp4"
    bad.write_text("not a video\n")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        dfd_video.evaluation.evaluate.read_eval_video(str(bad), 4)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "missing.mp4"))):
        dfd_video.evaluation.evaluate.read_eval_video(str(tmp_path / "missing.mp4"), 4)


# ---------------------------------------------------------------------------------------------------
# Sample folders and pose files.


def touch(folder, *names):
    os.makedirs(folder, exist_ok=True)
    for n in names:
        open(os.path.join(folder, n), "wb").close()


def test_sample_index_groups_by_prompt_and_seed(tmp_path):
    d = str(tmp_path / "s")
    touch(d, "prompt000_seed0.mp4", "prompt000_seed1.mp4", "prompt000_seed7.mp4", "prompt002_seed3.mp4",
          "prompt002_seed4.mp4", "prompt12_seed0.mp4", "prompt12_seed1.mp4",
          "notes.txt", "prompt001_seed0.png", "prompt000_seed2.txt", "other.mp4", "prompt001.mp4")
    idx = dfd_video.evaluation.evaluate.sample_index(d)
    assert sorted(idx) == [0, 2, 12]
    assert {i: sorted(v) for i, v in idx.items()} == {0: [0, 1, 7], 2: [3, 4], 12: [0, 1]}
    assert os.path.samefile(idx[2][4], os.path.join(d, "prompt002_seed4.mp4"))
    assert os.path.samefile(idx[12][1], os.path.join(d, "prompt12_seed1.mp4"))


def test_sample_index_errors(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=re.escape(missing)):
        dfd_video.evaluation.evaluate.sample_index(missing)
    empty = str(tmp_path / "empty")
    touch(empty, "notes.txt", "clip.mp4")
    with pytest.raises(ValueError, match=re.escape(empty)):
        dfd_video.evaluation.evaluate.sample_index(empty)
    lonely = str(tmp_path / "lonely")
    touch(lonely, "prompt000_seed0.mp4", "prompt000_seed1.mp4", "prompt007_seed3.mp4")
    with pytest.raises(ValueError) as e:
        dfd_video.evaluation.evaluate.sample_index(lonely)
    assert re.search(r"prompt\D{0,3}0*7(?!\d)", str(e.value)), str(e.value)


def test_read_poses_formats(tmp_path):
    T = tv.pose_trajectory(5, (0.1, 0.2, 0.3), 7.0)
    np.save(tmp_path / "a.npy", T.astype(np.float32))
    np.savez(tmp_path / "vipe.npz", data=T, inds=np.arange(5))  # ViPE's pose/<stem>.npz
    np.savez(tmp_path / "single.npz", T)
    for name, tol in (("a.npy", 1e-6), ("vipe.npz", 0), ("single.npz", 0)):
        P = dfd_video.evaluation.evaluate.read_poses(str(tmp_path / name))
        assert P.dtype == np.float64 and P.shape == (5, 4, 4), name
        np.testing.assert_allclose(P, T, atol=tol, rtol=0)


@pytest.mark.parametrize("case", ["shape", "one_frame", "nan", "garbage", "missing", "npz_two_arrays"])
def test_read_poses_errors(tmp_path, case):
    T = tv.pose_trajectory(5, (0.1, 0.2, 0.3), 7.0)
    path = str(tmp_path / ("p.npz" if case == "npz_two_arrays" else "p.npy"))
    if case == "shape":
        np.save(path, T[:, :3, :])  # [N, 3, 4]
    elif case == "one_frame":
        np.save(path, T[:1])
    elif case == "nan":
        T[2, 0, 3] = np.nan
        np.save(path, T)
    elif case == "garbage":
        open(path, "w").write("hello")
    elif case == "npz_two_arrays":
        np.savez(path, poses=T, other=T)  # no "data" key and not a single array
    with pytest.raises(ValueError, match=re.escape(path)):
        dfd_video.evaluation.evaluate.read_poses(path)


def test_find_pose_file_order_and_error(tmp_path):
    d = str(tmp_path)
    touch(os.path.join(d, "pose"), "prompt000_seed0.npz", "prompt001_seed0.npz")
    touch(d, "prompt001_seed0.npz", "prompt002_seed0.npz", "prompt002_seed0.npy")
    assert os.path.samefile(dfd_video.evaluation.evaluate.find_pose_file(d, "prompt000_seed0"), os.path.join(d, "pose", "prompt000_seed0.npz"))
    assert os.path.samefile(dfd_video.evaluation.evaluate.find_pose_file(d, "prompt001_seed0"), os.path.join(d, "prompt001_seed0.npz"))
    assert os.path.samefile(dfd_video.evaluation.evaluate.find_pose_file(d, "prompt002_seed0"), os.path.join(d, "prompt002_seed0.npy"))
    with pytest.raises(ValueError, match="prompt003_seed1"):
        dfd_video.evaluation.evaluate.find_pose_file(d, "prompt003_seed1")


# ---------------------------------------------------------------------------------------------------
# Image encoders (tiny random CLIP and DINOv2 in their real on-disk formats).


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {"clip": tv.build_clip(str(root / "clip")), "dino": tv.build_dino(str(root / "dino"))}


class RefEncoder:
    """The reference features, straight from transformers: CLIP's projected image embedding
    (visual_projection of the vision tower's pooled output), DINOv2's pooled output."""

    def __init__(self, folder: str):
        from transformers import AutoImageProcessor, AutoModel
        self.model = AutoModel.from_pretrained(folder).eval()
        self.proc = AutoImageProcessor.from_pretrained(folder)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        pv = self.proc(images=list(frames), return_tensors="pt")["pixel_values"]
        if hasattr(self.model, "visual_projection"):
            return self.model.visual_projection(self.model.vision_model(pixel_values=pv).pooler_output).double().numpy()
        return self.model(pixel_values=pv).pooler_output.double().numpy()


def cosine_rows(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("name,dim", [("clip", tv.CLIP_DIM), ("dino", tv.DINO_DIM)])
def test_image_encoder_features(encoders, name, dim):
    frames = np.stack([tv.random_frames(s, T=1, height=40, width=48)[0] for s in range(5)])
    enc = dfd_video.evaluation.evaluate.ImageEncoder(encoders[name], "cpu", flag=f"--{name}")
    f = enc(frames)
    assert torch.is_tensor(f) and f.dtype == torch.float32 and f.device.type == "cpu" and tuple(f.shape) == (5, dim)
    # the same direction as transformers' own features (Eq. 11 only sees directions); for CLIP that means the
    # projected embedding (8-d), not the vision tower's 16-d pooled output
    np.testing.assert_allclose(cosine_rows(f.numpy(), RefEncoder(encoders[name])(frames)), 1.0, atol=1e-5)
    # frames are encoded independently: one at a time gives the same features
    np.testing.assert_allclose(enc(frames[2:3]).numpy(), f[2:3].numpy(), atol=1e-5)


def test_image_encoder_errors(tmp_path):
    missing = str(tmp_path / "no_clip")
    with pytest.raises(ValueError) as e:
        dfd_video.evaluation.evaluate.ImageEncoder(missing, "cpu", flag="--clip")
    assert "--clip" in str(e.value) and missing in str(e.value)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("not a model")
    with pytest.raises(ValueError) as e:
        dfd_video.evaluation.evaluate.ImageEncoder(str(junk), "cpu", flag="--dino")
    assert "--dino" in str(e.value) and str(junk) in str(e.value)


# ---------------------------------------------------------------------------------------------------
# The whole command: two methods x 3 prompts x 3 seeds of tiny clips, tiny encoders, known camera paths.

PROMPTS, SEEDS, N_POSES, T_CLIP = 3, 3, 12, 20


def motion_of(method: str, i: int, s: int) -> dict:
    """Each clip's camera: p_t = p0 + t v, R_t = Rz(t * yaw) R0 (tiny_vision.pose_trajectory)."""
    if method == "same":
        return dict(velocity=(0.1 * (s + 1), 0.05 * i, 0.0), yaw=5.0 * (s + 1) + i, p0=(float(i), 0.0, 0.0))
    return dict(velocity=(0.0, 0.2 * (s + 1), 0.1 * i), yaw=10.0 + 7 * s + 3 * i, p0=(0.0, 0.0, float(s)))


def expected_camera(method: str) -> dict:
    """By hand: on a straight line the path length and the farthest point are both (N - 1) |v|; the yaw adds
    up to (N - 1) * yaw; the largest deviation is the largest wrapped t * yaw. Cross-seed numbers from the
    loop reference on the known positions, per prompt, then averaged over prompts."""
    per_video, cross = [], []
    for i in range(PROMPTS):
        trajs = []
        for s in range(SEEDS):
            m = motion_of(method, i, s)
            speed = float(np.linalg.norm(m["velocity"]))
            per_video.append({"path_length": (N_POSES - 1) * speed, "max_translation": (N_POSES - 1) * speed,
                              "rotation_total": (N_POSES - 1) * m["yaw"],
                              "max_rotation": max(tv.wrapped_angle(t * m["yaw"]) for t in range(N_POSES))})
            trajs.append([np.add(m["p0"], np.multiply(t, m["velocity"])) for t in range(N_POSES)])
        cross.append(ref_spread(trajs))
    out = {k: float(np.mean([v[k] for v in per_video])) for k in per_video[0]}
    out.update({k: float(np.mean([c[k] for c in cross])) for k in cross[0]})
    return out


def expected_visual(folder: str, enc: RefEncoder, frames: int = 16) -> tuple[float, float]:
    """(pooled, per-frame) diversity, App. B.3.1: 16 evenly spaced frames per clip, per-frame features
    mean-pooled into one vector per clip, Eq. 11 over the seeds of a prompt, averaged over prompts."""
    pooled, per_frame = [], []
    for i in range(PROMPTS):
        feats = []
        for s in range(SEEDS):
            all_frames = decode_all(os.path.join(folder, f"prompt{i:03d}_seed{s}.mp4"))
            feats.append(enc(all_frames[even_indices(len(all_frames), frames)]))
        feats = np.stack(feats)  # [L, F, D]
        pooled.append(ref_diversity(feats.mean(1)))
        per_frame.append(np.mean([ref_diversity(feats[:, f]) for f in range(frames)]))
    return float(np.mean(pooled)), float(np.mean(per_frame))


def expected_saturation(folder: str) -> tuple[float, float]:
    stats = [ref_saturation(decode_all(os.path.join(folder, f"prompt{i:03d}_seed{s}.mp4")))
             for i in range(PROMPTS) for s in range(SEEDS)]
    return float(np.mean([a for a, _ in stats])), float(np.mean([b for _, b in stats]))


@pytest.fixture(scope="module")
def methods(tmp_path_factory):
    """same/: the seeds of each prompt are byte-identical copies (diversity exactly 0); varied/: every seed
    differs. Poses: same/ as <stem>.npy, varied/ in ViPE's layout pose/<stem>.npz with key "data"."""
    root = tmp_path_factory.mktemp("methods")
    out = {}
    for method in ("same", "varied"):
        folder, poses = str(root / method), str(root / f"poses_{method}")
        os.makedirs(os.path.join(poses, "pose"))
        for i in range(PROMPTS):
            for s in range(SEEDS):
                stem = f"prompt{i:03d}_seed{s}"
                path = os.path.join(folder, stem + ".mp4")
                if method == "same" and s > 0:
                    shutil.copy(os.path.join(folder, f"prompt{i:03d}_seed0.mp4"), path)
                else:
                    tv.write_video(path, tv.random_frames(100 + i if method == "same" else 10 * i + s + 1, T=T_CLIP))
                m = motion_of(method, i, s)
                T = tv.pose_trajectory(N_POSES, m["velocity"], m["yaw"], p0=m["p0"])
                if method == "same":
                    np.save(os.path.join(poses, stem + ".npy"), T)
                else:
                    np.savez(os.path.join(poses, "pose", stem + ".npz"), data=T, inds=np.arange(N_POSES))
        open(os.path.join(folder, "notes.txt"), "w").write("not a sample\n")
        out[method] = {"folder": folder, "poses": poses}
    return out


@pytest.fixture(scope="module")
def report(methods, encoders, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    argv = ["evaluate", "--samples", methods["same"]["folder"], methods["varied"]["folder"], "--names", "Same", "Varied",
            "--clip", encoders["clip"], "--dino", encoders["dino"], "--encoder", f"dinob={encoders['dino']}",
            "--poses", methods["same"]["poses"], methods["varied"]["poses"], "--figure-prompts", "1",
            "--device", "cpu", "--out", out]
    return {"out": out, "result": wan_dfd.main(argv)}


def test_evaluate_report_files(report, methods):
    out, result = report["out"], report["result"]
    saved = json.load(open(os.path.join(out, "report.json")))
    assert saved == json.loads(json.dumps(result))  # the return value is what was written
    assert [m["name"] for m in saved["methods"]] == ["Same", "Varied"]
    assert [os.path.normpath(m["folder"]) for m in saved["methods"]] == [os.path.normpath(methods[k]["folder"])
                                                                          for k in ("same", "varied")]
    for m in saved["methods"]:
        assert len(m["per_prompt"]) == PROMPTS and len(m["per_video"]) == PROMPTS * SEEDS
    md = open(os.path.join(out, "report.md")).read()
    rows = [line for line in md.splitlines() if line.lstrip().startswith("|")]
    assert sum("Same" in r for r in rows) == 1 and sum("Varied" in r for r in rows) == 1, md
    import matplotlib.image
    img = matplotlib.image.imread(os.path.join(out, "seeds_prompt001.png"))
    assert img.ndim == 3 and img.shape[0] >= 32 and img.shape[1] >= 2 * 48  # middle frames side by side
    assert not os.path.exists(os.path.join(out, "seeds_prompt000.png"))  # only the prompts asked for


def test_evaluate_visual_diversity(report, methods, encoders):
    same, varied = (m["summary"] for m in report["result"]["methods"])
    for enc in ("clip", "dino", "dinob"):
        assert abs(same[f"{enc}_mean"]) < 1e-6 and abs(same[f"{enc}_per_frame"]) < 1e-6, enc  # identical seeds
        assert varied[f"{enc}_mean"] > 1e-3 and varied[f"{enc}_per_frame"] > 1e-3, enc
    for enc in ("clip", "dino"):
        pooled, per_frame = expected_visual(methods["varied"]["folder"], RefEncoder(encoders[enc]))
        assert varied[f"{enc}_mean"] == pytest.approx(pooled, abs=1e-5), enc
        assert varied[f"{enc}_per_frame"] == pytest.approx(per_frame, abs=1e-5), enc
    assert varied["dinob_mean"] == pytest.approx(varied["dino_mean"], abs=1e-6)  # --encoder NAME=DIR


def test_evaluate_camera_numbers(report):
    for m, method in zip(report["result"]["methods"], ("same", "varied")):
        want = expected_camera(method)
        for k, v in want.items():
            assert m["summary"][k] == pytest.approx(v, abs=1e-6), (method, k)
    # the varied yaws reach 11 * 30 = 330 deg: a wrapped maximum, so the two rotation numbers must differ
    v = report["result"]["methods"][1]["summary"]
    assert v["rotation_total"] > v["max_rotation"] + 10


def test_evaluate_saturation(report, methods):
    for m, method in zip(report["result"]["methods"], ("same", "varied")):
        s, c = expected_saturation(methods[method]["folder"])
        assert m["summary"]["saturation"] == pytest.approx(s, abs=1e-5), method
        assert m["summary"]["clipped"] == pytest.approx(c, abs=1e-9), method


def test_evaluate_through_cosmos_script(report, methods, encoders, tmp_path):
    import cosmos_dfd
    got = cosmos_dfd.main(["evaluate", "--samples", methods["varied"]["folder"], "--clip", encoders["clip"],
                           "--device", "cpu", "--figure-prompts", "0", "--out", str(tmp_path)])
    want = report["result"]["methods"][1]["summary"]
    s = got["methods"][0]["summary"]
    assert s["clip_mean"] == pytest.approx(want["clip_mean"], abs=1e-6)
    assert s["saturation"] == pytest.approx(want["saturation"], abs=1e-9)
    assert "dino_mean" not in s and "path_length" not in s  # no --dino, no --poses
    assert os.path.exists(tmp_path / "report.json") and os.path.exists(tmp_path / "seeds_prompt000.png")


# ---------------------------------------------------------------------------------------------------
# Bad input: one SystemExit line naming the flag or the file.


def evaluate_error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        wan_dfd.main(["evaluate", *argv, "--device", "cpu"])
    return str(e.value)


def copy_method(methods, method, dest) -> tuple[str, str]:
    folder, poses = str(dest / method), str(dest / f"poses_{method}")
    shutil.copytree(methods[method]["folder"], folder)
    shutil.copytree(methods[method]["poses"], poses)
    return folder, poses


def test_evaluate_missing_pose_file(methods, encoders, tmp_path):
    folder, poses = copy_method(methods, "same", tmp_path)
    os.remove(os.path.join(poses, "prompt001_seed2.npy"))
    msg = evaluate_error(["--samples", folder, "--clip", encoders["clip"], "--poses", poses, "--out", str(tmp_path / "o")])
    assert "prompt001_seed2" in msg, msg


def test_evaluate_prompt_with_one_seed(methods, encoders, tmp_path):
    folder, _ = copy_method(methods, "varied", tmp_path)
    for s in (1, 2):
        os.remove(os.path.join(folder, f"prompt002_seed{s}.mp4"))
    msg = evaluate_error(["--samples", folder, "--clip", encoders["clip"], "--out", str(tmp_path / "o")])
    assert re.search(r"prompt\D{0,3}0*2(?!\d)", msg) and folder in msg, msg


def test_evaluate_unreadable_and_short_videos(methods, encoders, tmp_path):
    folder, _ = copy_method(methods, "varied", tmp_path)
    msg = evaluate_error(["--samples", folder, "--clip", encoders["clip"], "--frames", str(T_CLIP + 1),
                          "--out", str(tmp_path / "o1")])
    assert re.search(r"prompt\d{3}_seed\d\.mp4", msg), msg  # too short for --frames 21
    open(os.path.join(folder, "prompt001_seed2.mp4"), "w").write("not a video\n")
    msg = evaluate_error(["--samples", folder, "--clip", encoders["clip"], "--out", str(tmp_path / "o2")])
    assert "prompt001_seed2.mp4" in msg, msg


def test_evaluate_flag_errors(methods, encoders, tmp_path):
    same, varied = methods["same"], methods["varied"]
    out = ["--out", str(tmp_path / "o")]
    msg = evaluate_error(["--samples", same["folder"], varied["folder"], "--names", "A", "--clip", encoders["clip"], *out])
    assert "--names" in msg, msg
    msg = evaluate_error(["--samples", same["folder"], varied["folder"], "--poses", same["poses"],
                          "--clip", encoders["clip"], *out])
    assert "--poses" in msg, msg
    missing = str(tmp_path / "no_samples")
    msg = evaluate_error(["--samples", missing, "--clip", encoders["clip"], *out])
    assert missing in msg, msg
    msg = evaluate_error(["--samples", same["folder"], "--clip", str(tmp_path / "no_clip"), *out])
    assert "--clip" in msg and "no_clip" in msg, msg
    msg = evaluate_error(["--samples", same["folder"], "--encoder", encoders["dino"], *out])  # not NAME=DIR
    assert "--encoder" in msg, msg


def test_evaluate_pose_lengths_differ_across_seeds(methods, tmp_path):
    # the cross-seed distances compare frame t of every seed, so the seeds of a prompt need equally long pose files
    folder, poses = copy_method(methods, "same", tmp_path)
    np.save(os.path.join(poses, "prompt001_seed2.npy"), tv.pose_trajectory(7, (0.1, 0.0, 0.0), 3.0))
    msg = evaluate_error(["--samples", folder, "--poses", poses, "--out", str(tmp_path / "o")])
    assert poses in msg, msg


def test_evaluate_figure_prompt_not_in_folder(methods, tmp_path):
    msg = evaluate_error(["--samples", methods["same"]["folder"], "--figure-prompts", "9", "--out", str(tmp_path / "o")])
    assert "--figure-prompts" in msg, msg


def test_evaluate_script_entry_point_reports_one_line(methods, tmp_path):
    """`python cosmos_dfd.py evaluate ...` (cleanrl style, as a user runs it): a bad flag count exits non-zero
    with the message on stderr and no traceback."""
    import subprocess
    import sys
    import tiny_wan
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "cosmos_dfd.py"), "evaluate", "--samples",
                        methods["same"]["folder"], methods["varied"]["folder"], "--names", "A", "--device", "cpu",
                        "--out", str(tmp_path / "o")], env=tiny_wan.quiet_env(), capture_output=True, text=True)
    assert r.returncode != 0 and "--names" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_evaluate_prompts_file_labels_rows(methods, tmp_path):
    # line k of the prompts file (blank lines skipped, as `sample --prompts` numbers them) labels prompt k
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n\na blue square\na green circle\n")
    got = wan_dfd.main(["evaluate", "--samples", methods["same"]["folder"], "--prompts",
                        str(prompts), "--device", "cpu", "--out", str(tmp_path / "o")])
    rows = got["methods"][0]["per_prompt"]
    assert [rows[k]["text"] for k in sorted(rows, key=int)] == ["a red ball", "a blue square", "a green circle"]
    prompts.write_text("only one\n")
    msg = evaluate_error(["--samples", methods["same"]["folder"], "--prompts", str(prompts), "--out", str(tmp_path / "p")])
    assert "--prompts" in msg, msg


def test_evaluate_relative_poses_removes_each_videos_world_frame(methods, tmp_path):
    """--relative-poses: T_0^-1 T_t. Each seed's path starts at the identity and is then written in its own
    arbitrary world frame W_s (T'_t = W_s T_t, as an estimator that fixes the world differently per video would);
    relative to the first camera the paths are the original ones again, so the cross-seed numbers equal the
    loop reference on p_t = t v_s, while the per-video motion is the same with and without the flag."""
    folder, poses = copy_method(methods, "same", tmp_path)
    rng = np.random.default_rng(0)
    paths = {}
    for i in range(PROMPTS):
        for s in range(SEEDS):
            v = (0.1 * (s + 1), 0.05 * (i + 1), -0.02 * s)
            T = tv.pose_trajectory(N_POSES, v, 4.0 * (s + 1), R0=np.eye(3))
            W = np.eye(4)
            W[:3, :3], W[:3, 3] = tv.rodrigues(rng.normal(size=3), rng.uniform(20, 160)), rng.normal(size=3) * 5
            np.save(os.path.join(poses, f"prompt{i:03d}_seed{s}.npy"), W @ T)
            paths.setdefault(i, []).append(T[:, :3, 3])
    want = [ref_spread(paths[i]) for i in range(PROMPTS)]
    runs = {flag: wan_dfd.main(["evaluate", "--samples", folder, "--poses", poses, *flag,
                                "--device", "cpu", "--figure-prompts", "--out",
                                str(tmp_path / f"o{len(flag)}")])["methods"][0]["summary"]
            for flag in ((), ("--relative-poses",))}
    for k in want[0]:
        assert runs[("--relative-poses",)][k] == pytest.approx(np.mean([w[k] for w in want]), abs=1e-9), k
        assert abs(runs[()][k] - np.mean([w[k] for w in want])) > 0.1, k  # the world frames do matter without it
    for k in dfd_video.evaluation.evaluate.CAMERA_VIDEO_KEYS:
        assert runs[()][k] == pytest.approx(runs[("--relative-poses",)][k], abs=1e-9), k


def test_evaluate_cache_resumes_and_invalidates(methods, encoders, tmp_path, monkeypatch):
    """<out>/cache keeps each video's features and statistics: a run stopped part-way resumes without decoding
    what it had finished; an added encoder computes only its own features (one decode per video); a rewritten
    video is measured again; and the numbers equal a run without the cache."""
    folder, _ = copy_method(methods, "varied", tmp_path)
    out = str(tmp_path / "o")
    real_read = dfd_video.evaluation.evaluate.read_eval_video
    calls = []

    def counting_read(path, num_frames):
        calls.append(os.path.basename(path))
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt  # a kill part-way through
        return real_read(path, num_frames)

    monkeypatch.setattr(dfd_video.evaluation.evaluate, "read_eval_video", counting_read)
    argv = ["evaluate", "--samples", folder, "--clip", encoders["clip"], "--figure-prompts", "--device", "cpu",
            "--out", out]
    stop_after = 4
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one line and exit status 130 (cli.run_driver)
        wan_dfd.main(argv)
    assert e.value.code == 130
    calls.clear()
    stop_after = None
    first = wan_dfd.main(argv)["methods"][0]["summary"]
    assert len(calls) == PROMPTS * SEEDS - 4  # the four finished before the kill come from the cache
    calls.clear()
    again = wan_dfd.main(argv)["methods"][0]["summary"]
    assert calls == [] and again == first
    both = wan_dfd.main([*argv, "--dino", encoders["dino"]])["methods"][0]["summary"]
    assert len(calls) == PROMPTS * SEEDS and both["clip_mean"] == first["clip_mean"]
    calls.clear()
    tv.write_video(os.path.join(folder, "prompt002_seed1.mp4"), tv.random_frames(999, T=T_CLIP))
    changed = wan_dfd.main(argv)["methods"][0]["summary"]
    assert calls == ["prompt002_seed1.mp4"]
    fresh = wan_dfd.main([*argv[:-1], str(tmp_path / "fresh"), "--no-cache"])
    assert changed == fresh["methods"][0]["summary"] and changed["clip_mean"] != first["clip_mean"]
    assert not os.path.exists(tmp_path / "fresh" / "cache")
