"""VBench's quality dimensions in `evaluate` (dfd_video/evaluation/vbench/), checked against values worked out by hand or
restated here from VBench's and DINO's published code, never with the functions under test: the scores on
synthetic clips with known answers (a static clip, a clip with one flickering frame, clips translating at constant
speed, features turning at a constant angle), the preprocessing geometry of torchvision's Resize / CenterCrop,
DINO's position-embedding interpolation, CLIP's encode_image, the LAION head's file format, RAFT's, AMT-S's and
MUSIQ's checkpoint layouts and pieces, the paper mean and VBench's Quality Score, and the whole command with tiny
random models in the real layouts (tests/tiny_vision.py).

The networks against their upstream code: tests/test_vbench_reference.py (default suite, stored outputs) and, live
against a checkout, the opt-in tests here (DFD_RAFT_REPO, DFD_PYIQA_REPO, DFD_VBENCH_REPO; loaders in
tests/vbench_reference.py)."""
import json
import math
import os

import av
import numpy as np
import pytest
import torch

import tiny_vision as tv
import vbench_reference as vr
import wan_dfd
from dfd_video.evaluation import vbench
from dfd_video.evaluation.vbench import (aesthetic_quality, amt, background_consistency, common, dreamsim, dynamic_degree,
                              i2v_background, i2v_subject, imaging_quality, motion_smoothness, musiq, raft,
                              subject_consistency, temporal_flickering)

torch.set_num_threads(1)


def decode_all(path: str) -> np.ndarray:
    with av.open(path) as box:
        return np.stack([f.to_ndarray(format="rgb24") for f in box.decode(video=0)])


def turning(T: int, theta: float, dim: int = 4) -> torch.Tensor:
    """Features [T, dim] turning at a constant angle theta per frame in one plane (scaled differently per frame,
    which cosines ignore): the feature-space picture of a clip moving at constant speed."""
    t = torch.arange(T, dtype=torch.float64)
    f = torch.zeros(T, dim, dtype=torch.float64)
    f[:, 0], f[:, 1] = torch.cos(t * theta), torch.sin(t * theta)
    return f * (1 + t)[:, None]


# ---------------------------------------------------------------------------------------------------
# The formulas (VBench: subject_consistency.py / background_consistency.py, i2v_subject.py,
# temporal_flickering.py, aesthetic_quality.py), on hand examples.


def test_consistency_static_hand_and_clipping():
    v = torch.tensor([0.3, -1.0, 2.0])
    assert subject_consistency.consistency_score(v.repeat(6, 1)) == pytest.approx(1.0, abs=1e-12)
    # f0 = (1, 0), f1 = (0, 1), f2 = (1, 1): t=1: (0 + 0) / 2; t=2: (1/sqrt2 + 1/sqrt2) / 2 -> mean 1 / (2 sqrt2)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert subject_consistency.consistency_score(f) == pytest.approx(1 / (2 * math.sqrt(2)), abs=1e-12)
    # opposite features count as 0, not -1: (v, -v) -> 0; (v, -v, v): t=1: 0, t=2: (0 + 1) / 2 -> 0.25
    assert subject_consistency.consistency_score(torch.stack([v, -v])) == pytest.approx(0.0, abs=1e-12)
    assert subject_consistency.consistency_score(torch.stack([v, -v, v])) == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("theta", [0.1, 0.5])
def test_consistency_constant_speed(theta):
    T = 12
    # to the previous frame always cos(theta); to the first cos(t theta), clipped at 0 past 90 degrees
    want = np.mean([(math.cos(theta) + max(0.0, math.cos(t * theta))) / 2 for t in range(1, T)])
    assert subject_consistency.consistency_score(turning(T, theta)) == pytest.approx(want, abs=1e-12)


def test_i2v_score_hand_examples():
    g = torch.tensor([1.0, 0.0])
    assert i2v_subject.i2v_score(g, g.repeat(5, 1) * 3) == pytest.approx(1.0, abs=1e-12)  # static, = the image
    # frames turning at theta from the image: max cos to the image = 1 (frame 0), consecutive cos all cos(theta)
    theta = 0.3
    f = turning(8, theta, dim=2)
    assert i2v_subject.i2v_score(g, f) == pytest.approx(0.4 + 0.6 * math.cos(theta), abs=1e-12)
    # one jump: consecutive cosines (1, 0, 1) -> mean 2/3, min 0; the image is orthogonal to every frame -> 0
    f = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert i2v_subject.i2v_score(torch.tensor([1.0, 0.0, 0.0]), f) == pytest.approx(0.3 * 2 / 3, abs=1e-12)
    # opposite consecutive frames count as 0, not -1 (VBench's max(0, cos)): (v, -v, v) against v -> 0.4 * 1
    v = torch.tensor([0.3, -1.0, 2.0])
    assert i2v_subject.i2v_score(v, torch.stack([v, -v, v])) == pytest.approx(0.4, abs=1e-12)


def test_flicker_static_one_flash_and_constant_speed():
    T = 9
    static = np.full((T, 16, 24, 3), 100, np.uint8)
    assert temporal_flickering.flicker_score(static) == 1.0
    flash = static.copy()
    flash[4] = 150  # two of the 8 pairs differ by 50 everywhere
    assert temporal_flickering.flicker_score(flash) == pytest.approx((255 - 2 * 50 / (T - 1)) / 255, abs=1e-6)
    # a horizontal ramp 2x (x < 128) rolling v pixels per frame: every pair differs by 2v on 128 - v columns and by
    # 256 - 2v on the v columns that wrap round, so the mean absolute difference is 4v (256 - 2v) / 128 per pair
    ramp = np.broadcast_to((2 * np.arange(128)).astype(np.uint8)[None, :, None], (8, 128, 3))
    for v in (1, 2, 3):
        clip = np.stack([np.roll(ramp, v * t, axis=1) for t in range(T)])
        mae = 4 * v * (256 - 2 * v) / 256
        assert temporal_flickering.flicker_score(clip) == pytest.approx((255 - mae) / 255, abs=1e-6)


def test_aesthetic_score_is_the_head_on_normalised_embeddings_over_ten():
    head = torch.nn.Linear(3, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0, -1.0]]))
        head.bias.fill_(5.0)
    e = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.5]])  # normalised: e0 -> 2 + 5 = 7, e1 -> -1 + 5 = 4
    assert aesthetic_quality.aesthetic_score(e, head) == pytest.approx((7 + 4) / 2 / 10, abs=1e-6)


def test_paper_mean_is_the_plain_mean_of_the_papers_set():
    s = {"subject_consistency": 0.9, "temporal_flickering": 0.8, "imaging_quality": 0.1, "dynamic_degree": 0.2,
         "saturation": 0.5}
    assert vbench.paper_mean(s) == pytest.approx(0.85)  # imaging quality, dynamic degree and others left out
    assert vbench.averages({"saturation": 0.5}) == {}


# VBench's scripts/constant.py, typed out: NORMALIZE_DIC (Min, Max) and DIM_WEIGHT of its QUALITY_LIST.
CONSTANT_PY = {"subject consistency": (0.1462, 1.0, 1), "background consistency": (0.2615, 1.0, 1),
               "temporal flickering": (0.6293, 1.0, 1), "motion smoothness": (0.706, 0.9975, 1),
               "aesthetic quality": (0.0, 1.0, 1), "imaging quality": (0.0, 1.0, 1), "dynamic degree": (0.0, 1.0, 0.5)}


def at(name: str, fraction: float) -> float:
    """The score that VBench's normalisation maps to `fraction`."""
    lo, hi, _ = CONSTANT_PY[name.replace("_", " ")]
    return lo + fraction * (hi - lo)


def test_quality_score_is_vbench_normalised_weighted_mean():
    top = {k: at(k, 1.0) for k in vbench.QUALITY}
    assert vbench.quality_score(top) == pytest.approx(1.0) and vbench.quality_score(top, i2v=True) == pytest.approx(1.0)
    assert vbench.quality_score({k: at(k, 0.0) for k in vbench.QUALITY}) == pytest.approx(0.0, abs=1e-12)
    parts = {"subject_consistency": 0.0, "background_consistency": 1.0, "temporal_flickering": 0.5,
             "motion_smoothness": 1.0, "dynamic_degree": 1.0, "aesthetic_quality": 0.6, "imaging_quality": 0.3}
    s = {k: at(k, f) for k, f in parts.items()}
    # weights 1 each and 1/2 for dynamic degree: (0 + 1 + 0.5 + 1 + 0.5 * 1 + 0.6 + 0.3) / 6.5
    assert vbench.quality_score(s) == pytest.approx(3.9 / 6.5, abs=1e-12)
    assert vbench.quality_score(s, i2v=True) == pytest.approx(3.4 / 5.5, abs=1e-12)  # VBench-I2V: no flickering
    # only some dimensions: the same formula over those present; none: no score
    assert vbench.quality_score({"subject_consistency": at("subject_consistency", 0.0),
                                 "temporal_flickering": at("temporal_flickering", 0.5)}) == pytest.approx(0.25)
    assert vbench.quality_score({"i2v_subject": 0.9}) is None
    assert vbench.averages(s) == pytest.approx({"paper_average": vbench.paper_mean(s), "vbench_quality_score": 0.6})


@pytest.mark.skipif(not os.environ.get("DFD_VBENCH_REPO"), reason="set DFD_VBENCH_REPO to a Vchitect/VBench checkout")
def test_quality_constants_match_vbench():
    """Opt-in: the bounds, weights and dimension lists against VBench's own scripts/constant.py."""
    c = {}
    exec(open(os.path.join(os.environ["DFD_VBENCH_REPO"], "scripts", "constant.py")).read(), c)
    assert [k.replace(" ", "_") for k in c["QUALITY_LIST"]] == sorted(vbench.QUALITY, key=lambda k: c[
        "QUALITY_LIST"].index(k.replace("_", " ")))
    assert {c["I2VKEY"][k] for k in vbench.I2V_QUALITY} == set(c["I2V_QUALITY_LIST"])
    for k in vbench.QUALITY:
        name = k.replace("_", " ")
        want = (c["NORMALIZE_DIC"][name]["Min"], c["NORMALIZE_DIC"][name]["Max"])
        assert vbench.QUALITY_BOUNDS[k] == want and vbench.QUALITY_WEIGHTS[k] == c["DIM_WEIGHT"][name], k
        assert CONSTANT_PY[name] == (*want, c["DIM_WEIGHT"][name])
        if k in vbench.I2V_QUALITY:
            i2v = c["I2VKEY"][k]
            assert (c["NORMALIZE_DIC_I2V"][i2v]["Min"], c["NORMALIZE_DIC_I2V"][i2v]["Max"]) == want, k
            assert c["DIM_WEIGHT_I2V"][i2v] == c["DIM_WEIGHT"][name], k


# ---------------------------------------------------------------------------------------------------
# Preprocessing: torchvision's geometry, restated (torchvision is not installable beside the CPU torch).


@pytest.mark.parametrize("hw,size,want", [((480, 832), 224, (224, 388)), ((832, 480), 224, (388, 224)),
                                          ((32, 48), 224, (224, 336)), ((50, 50), 256, (256, 256)),
                                          ((33, 100), 224, (224, 678))])  # 224 * 100 / 33 = 678.8 -> 678
def test_resize_short_side_sizes(hw, size, want):
    x = torch.zeros(1, 3, *hw)
    assert tuple(common.resize_short_side(x, size, "bilinear", False).shape[-2:]) == want


def test_center_crop_offsets_round_half_to_even():
    x = torch.arange(7 * 10, dtype=torch.float32).view(1, 1, 7, 10)
    # (7 - 4) / 2 = 1.5 -> round() gives 2; (10 - 4) / 2 = 3
    np.testing.assert_array_equal(common.center_crop(x, 4)[0, 0].numpy(), x[0, 0, 2:6, 3:7].numpy())
    x = torch.zeros(1, 3, 224, 388)
    assert tuple(common.center_crop(x, 224).shape[-2:]) == (224, 224)
    with pytest.raises(ValueError):
        common.center_crop(torch.zeros(1, 3, 10, 300), 224)


@pytest.mark.parametrize("module,size,mean,std", [
    (subject_consistency, (224, 336), tv.IMAGENET_MEAN, tv.IMAGENET_STD),
    (background_consistency, (224, 224), tv.CLIP_MEAN, tv.CLIP_STD),
    (aesthetic_quality, (224, 224), tv.CLIP_MEAN, tv.CLIP_STD),
    (i2v_subject, (224, 224), tv.IMAGENET_MEAN, tv.IMAGENET_STD)])
def test_preprocess_constant_frame_values_and_sizes(module, size, mean, std):
    rgb = np.array([30, 140, 250], np.uint8)  # resizing a constant image keeps it constant
    frames = np.broadcast_to(rgb, (3, 32, 48, 3)).copy()
    x = module.preprocess(frames)
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 3, *size)
    want = (rgb / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(x.mean((0, 2, 3)).numpy(), want, atol=1e-5)
    np.testing.assert_allclose(x.std((0, 2, 3)).numpy(), 0, atol=1e-4)


def unnormalize(x: torch.Tensor, mean, std) -> np.ndarray:
    """Preprocessed [N, 3, H, W] back to 0..255 values, [N, H, W, 3] float64."""
    return ((x.double() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)) * 255
            ).permute(0, 2, 3, 1).numpy()


def test_preprocess_bilinear_halving_is_2x2_means():
    """Subject consistency: bilinear without antialiasing at exactly half size samples between pixel pairs, i.e.
    the means of 2x2 blocks; 448 x 672 -> 224 x 336 (no crop)."""
    x = np.random.default_rng(0).integers(0, 256, (2, 448, 672, 3)).astype(np.uint8)
    want = x.astype(np.float64).reshape(2, 224, 2, 336, 2, 3).mean((2, 4))
    got = unnormalize(subject_consistency.preprocess(x), tv.IMAGENET_MEAN, tv.IMAGENET_STD)
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_preprocess_bicubic_halving_is_the_cubic_kernel():
    """Background consistency / aesthetic quality: bicubic (a = -0.75) without antialiasing at half size weights
    pixels 2i-1 .. 2i+2 by (-3, 19, 19, -3) / 32 along each axis (interior pixels; 448 x 448 needs no crop)."""
    x = np.random.default_rng(1).integers(0, 256, (1, 448, 448, 3)).astype(np.float64)
    k = np.array([-3, 19, 19, -3]) / 32
    rows = sum(k[j] * x[:, 2 * np.arange(1, 223) - 1 + j] for j in range(4))            # [1, 222, 448, 3]
    want = sum(k[j] * rows[:, :, 2 * np.arange(1, 223) - 1 + j] for j in range(4))     # [1, 222, 222, 3]
    for module in (background_consistency, aesthetic_quality):
        got = unnormalize(module.preprocess(x.astype(np.uint8)), tv.CLIP_MEAN, tv.CLIP_STD)
        np.testing.assert_allclose(got[:, 1:223, 1:223], want, atol=1e-3)


def test_preprocess_i2v_is_antialiased_like_pil():
    """I2V subject: antialiased bicubic to 256 then a 224 centre crop, within a grey level of PIL's bicubic
    resize (which VBench-I2V applies to the image), while the non-antialiased kernel is much further off."""
    from PIL import Image
    x = tv.random_frames(3, T=1, height=512, width=640)[0]
    x = np.clip(x.astype(int) + np.random.default_rng(2).integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
    pil = np.stack([np.asarray(Image.fromarray(x[..., c].astype(np.float32), mode="F").resize((320, 256),
                                                                                              Image.BICUBIC))
                    for c in range(3)], -1)
    want = pil[16:240, 48:272]
    got = unnormalize(i2v_subject.preprocess(x[None]), tv.IMAGENET_MEAN, tv.IMAGENET_STD)[0]
    assert np.abs(got - want).mean() < 0.5
    sharp = common.resize_short_side(common.to_float_nchw(x[None]), 256, "bicubic", False)
    assert np.abs(common.center_crop(sharp, 224)[0].permute(1, 2, 0).numpy() - want).mean() > 2.0


def test_preprocess_i2v_background_sizes_values_and_pil():
    """I2V background (dreamsim_transform): any frame size to 224 x 224 without cropping, 0..1, no mean / std; the
    antialiased bicubic within half a grey level on average of PIL's (which VBench-I2V applies to the image: the same
    kernel, but PIL clamps and rounds to uint8 after each pass, so they part at sharp edges), the plain bicubic much
    further off."""
    from PIL import Image
    for hw in ((32, 48), (480, 832), (224, 224)):
        x = i2v_background.preprocess(np.full((2, *hw, 3), 51, np.uint8))
        assert x.shape == (2, 3, 224, 224) and torch.allclose(x, torch.full_like(x, 0.2), atol=1e-6)
    x = tv.random_frames(3, T=1, height=480, width=832)[0]
    x = np.clip(x.astype(int) + np.random.default_rng(2).integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
    want = np.asarray(Image.fromarray(x).resize((224, 224), Image.BICUBIC)).astype(np.float64)
    got = i2v_background.preprocess(x[None])[0].permute(1, 2, 0).double().numpy() * 255
    assert np.abs(got - want).mean() < 0.5
    sharp = torch.nn.functional.interpolate(common.to_float_nchw(x[None]), size=(224, 224), mode="bicubic")
    assert np.abs(sharp[0].permute(1, 2, 0).numpy() - want).mean() > 2.0


# ---------------------------------------------------------------------------------------------------
# Models in their real on-disk layouts.


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vbench_models")
    return {"dino": tv.build_dino_vit(str(root / "dino")),
            "clip_b32": tv.build_clip(str(root / "clip_b32"), image_size=224, patch_size=32),
            "clip_l14": tv.build_clip(str(root / "clip_l14"), seed=1, image_size=224, patch_size=14),
            "head": tv.build_aesthetic_head(str(root / "head.pth")),
            "dreamsim": tv.build_dreamsim(str(root / "dreamsim"))}


def dino_reference_pos_embed(pos: torch.Tensor, npatch: int, w: int, h: int, patch: int) -> torch.Tensor:
    """facebookresearch/dino vision_transformer.py, interpolate_pos_encoding(x, w, h) with its own names (there
    `w, h` are the input's dims 2 and 3, i.e. height and width)."""
    N = pos.shape[1] - 1
    if npatch == N and w == h:
        return pos
    class_pos_embed, patch_pos_embed = pos[:, 0], pos[:, 1:]
    dim = pos.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def test_dino_position_embeddings_follow_dino(models):
    model = subject_consistency.load_dino(models["dino"], "cpu")
    emb = model.embeddings
    with torch.no_grad():
        emb.position_embeddings.normal_()  # a random grid, so any resampling difference shows
        for h, w in ((224, 388), (388, 224), (240, 336)):
            n = (h // 16) * (w // 16)
            got = emb.interpolate_pos_encoding(torch.zeros(1, n + 1, tv.DINO_DIM), h, w)
            want = dino_reference_pos_embed(emb.position_embeddings, n, h, w, 16)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            hf = type(emb).interpolate_pos_encoding(emb, torch.zeros(1, n + 1, tv.DINO_DIM), h, w)
            assert (hf - want).abs().max() > 1e-4  # transformers' own resize samples elsewhere: the override matters
        # the trained size: the embeddings as they are, and the same CLS feature as a plain forward
        x = torch.randn(2, 3, 224, 224)
        torch.testing.assert_close(subject_consistency.dino_cls(model, x),
                                   model(pixel_values=x).last_hidden_state[:, 0], rtol=0, atol=1e-6)


def test_dino_cls_is_the_normed_cls_token_and_takes_any_frame_shape(models):
    from transformers import ViTModel
    model = subject_consistency.load_dino(models["dino"], "cpu")
    assert model.pooler is None  # the folder has no pooler; none is made up
    ref = ViTModel.from_pretrained(models["dino"], add_pooling_layer=False).eval()  # unpatched
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(subject_consistency.dino_cls(model, x), ref(pixel_values=x).last_hidden_state[:, 0],
                                   rtol=0, atol=1e-6)
        assert ref.layernorm is not None  # last_hidden_state is after the final layer norm, as DINO's output
        assert tuple(subject_consistency.dino_cls(model, torch.randn(1, 3, 224, 388)).shape) == (1, tv.DINO_DIM)


def test_clip_image_embeds_is_encode_image(models):
    from transformers import CLIPModel
    model = common.load_clip(models["clip_b32"], "cpu", "--vbench-clip")
    ref = CLIPModel.from_pretrained(models["clip_b32"]).eval()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        out = ref.get_image_features(pixel_values=x)
        want = out if torch.is_tensor(out) else out.pooler_output
        torch.testing.assert_close(common.clip_image_embeds(model, x), want, rtol=0, atol=1e-6)
    assert tuple(want.shape) == (3, tv.CLIP_DIM)


def test_aesthetic_head_file_format_and_errors(models, tmp_path):
    head = aesthetic_quality.load_head(models["head"], tv.CLIP_DIM)
    sd = torch.load(models["head"], weights_only=True)
    torch.testing.assert_close(head.weight, sd["weight"])
    with pytest.raises(ValueError, match=r"--aesthetic-head .*\(1, 5\)"):  # a head for another CLIP width
        aesthetic_quality.load_head(models["head"], 5)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="--aesthetic-head .*junk.pth"):
        aesthetic_quality.load_head(str(junk), tv.CLIP_DIM)
    with pytest.raises(ValueError, match="no such file"):
        aesthetic_quality.load_head(str(tmp_path / "missing.pth"), tv.CLIP_DIM)


def test_dimensions_on_static_and_changing_clips(models):
    dims = {d.name: d for d in vbench.build("cpu", models["dino"], models["clip_b32"], models["clip_l14"],
                                            models["head"], flickering=True, i2v=True)}
    assert list(dims) == ["subject_consistency", "background_consistency", "aesthetic_quality",
                          "temporal_flickering", "i2v_subject"]
    a, b = tv.random_frames(1, T=1, height=32, width=48)[0], tv.random_frames(2, T=1, height=32, width=48)[0]
    static = np.stack([a] * 4)
    for name in ("subject_consistency", "background_consistency", "temporal_flickering", "i2v_subject"):
        assert dims[name](static, a) == pytest.approx(1.0, abs=1e-6), name
    # A, A, B, B: with c = max(0, cos(f_A, f_B)), t=1: 1; t=2: c; t=3: (1 + c) / 2
    for module, feat in ((subject_consistency, subject_consistency.dino_cls),
                         (background_consistency, common.clip_image_embeds)):
        name = module.NAME
        with torch.no_grad():
            fa, fb = feat(dims[name].model, module.preprocess(np.stack([a, b])))
        c = max(0.0, float(torch.nn.functional.cosine_similarity(fa, fb, dim=0)))
        got = dims[name](np.stack([a, a, b, b]))
        assert got == pytest.approx((1 + c + (1 + c) / 2) / 3, abs=1e-5), name
    # aesthetic: a head with zero weight and bias 5.5 rates every frame 5.5 (of 10)
    zero = aesthetic_quality.AestheticQuality(dims["aesthetic_quality"].model, models["clip_l14"], models["head"])
    with torch.no_grad():
        zero.head.weight.zero_()
        zero.head.bias.fill_(5.5)
    assert zero(np.stack([a, b, a])) == pytest.approx(0.55, abs=1e-6)
    with pytest.raises(ValueError, match="--i2v-images"):
        dims["i2v_subject"](static, None)


# ---------------------------------------------------------------------------------------------------
# The whole command: one folder of tiny clips (static, one flash, constant-speed translation), all the flags.

T_CLIP = 8


def clip_frames(i: int, s: int) -> np.ndarray:
    """prompt 0: static; prompt 1: one flashing frame (seed 0) or a constant-speed roll (seed 1)."""
    base = tv.random_frames(10 * i + s, T=1, height=32, width=48)[0]
    if i == 0:
        return np.stack([base] * T_CLIP)
    if s == 0:
        x = np.stack([base] * T_CLIP)
        x[3] = np.clip(base.astype(int) + 60, 0, 255)
        return x
    return np.stack([np.roll(base, 2 * t, axis=1) for t in range(T_CLIP)])


def save_png(path: str, rgb: np.ndarray) -> str:
    from PIL import Image
    Image.fromarray(rgb).save(path)
    return path


def read_png(path: str) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vbench_samples")
    for i in range(2):
        for s in range(2):
            tv.write_video(str(root / "dfd" / f"prompt{i:03d}_seed{s}.mp4"), clip_frames(i, s))
    images = [save_png(str(root / f"image{i}.png"), clip_frames(i, 0)[0]) for i in range(2)]
    return {"dir": str(root / "dfd"), "images": images}


def vbench_argv(models, folder, out, *extra):
    return ["evaluate", "--samples", folder["dir"], "--names", "DFD", "--vbench-dino", models["dino"],
            "--vbench-clip", models["clip_b32"], "--aesthetic-head", models["head"], "--aesthetic-clip",
            models["clip_l14"], "--temporal-flickering", "--i2v-images", *folder["images"], "--vbench-dreamsim",
            models["dreamsim"], "--frames", "8",
            "--figure-prompts",
            "--device", "cpu", "--out", out, *extra]


@pytest.fixture(scope="module")
def run(models, folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vbench_eval"))
    wan_dfd.main(vbench_argv(models, folder, out))
    return {"out": out, "report": json.load(open(os.path.join(out, "report.json")))}


def test_evaluate_vbench_columns(run, models, folder):
    m = run["report"]["methods"][0]
    names = ["subject_consistency", "background_consistency", "aesthetic_quality", "temporal_flickering",
             "i2v_subject", "i2v_background"]
    dims = {d.name: d for d in vbench.build("cpu", models["dino"], models["clip_b32"], models["clip_l14"],
                                            models["head"], flickering=True, i2v=True, dreamsim=models["dreamsim"])}
    want = {k: [] for k in names}
    for i in range(2):
        for s in range(2):
            frames = decode_all(os.path.join(folder["dir"], f"prompt{i:03d}_seed{s}.mp4"))
            image = read_png(folder["images"][i])  # the video's size already: cover-resizing leaves it as it is
            row = m["per_video"][f"prompt{i:03d}_seed{s}"]
            for k in names:
                assert row[k] == pytest.approx(dims[k](frames, image), abs=1e-5), (k, i, s)
                want[k].append(row[k])
            if i == 0:  # the static clip
                assert row["temporal_flickering"] > 0.999 and row["subject_consistency"] > 0.9999
    for k in names:
        assert m["summary"][k] == pytest.approx(np.mean(want[k]), abs=1e-9)
    # the flash and the roll flicker, by about what the raw frames say (H.264 changes the numbers a little)
    for s in range(2):
        raw = temporal_flickering.flicker_score(clip_frames(1, s))
        assert m["per_video"][f"prompt001_seed{s}"]["temporal_flickering"] == pytest.approx(raw, abs=0.01)
        assert raw < 0.99  # and the static clip is above 0.999
    # all six are in the paper's quality average
    assert m["summary"]["paper_average"] == pytest.approx(np.mean([m["summary"][k] for k in names]), abs=1e-9)
    # VBench-I2V's Quality Score over the three of its six quality dimensions computed here
    quality = ["subject_consistency", "background_consistency", "aesthetic_quality"]
    assert m["summary"]["vbench_quality_score"] == pytest.approx(vbench.quality_score(
        {k: m["summary"][k] for k in quality}, i2v=True), abs=1e-12)
    s = run["report"]["settings"]
    assert s["vbench"]["subject_consistency"] == {"follows": "vbench/subject_consistency.py", "model": models["dino"]}
    assert s["vbench"]["aesthetic_quality"]["head"] == models["head"]
    assert s["paper_average"] == names
    assert s["vbench_quality_score"] == {"name": "VBench-I2V's Quality Score", "dimensions": quality,
                                         "missing": ["motion_smoothness", "dynamic_degree", "imaging_quality"]}


def test_evaluate_vbench_report_markdown(run):
    md = open(os.path.join(run["out"], "report.md")).read()
    header = md.split("\n")[2]
    for label in ("subject cons.", "background cons.", "aesthetic", "temporal flicker.", "I2V subject",
                  "I2V background", "paper mean", "VBench quality (3 of 6)"):
        assert f"| {label} |" in header
    assert "`vbench2_beta_i2v/i2v_subject.py`" in md and "`vbench2_beta_i2v/i2v_background.py`" in md
    assert "Paper mean = the plain mean of subject_consistency, background_consistency, aesthetic_quality, " \
           "temporal_flickering, i2v_subject, i2v_background" in md
    assert "VBench quality = VBench-I2V's Quality Score" in md
    assert "motion_smoothness, dynamic_degree, imaging_quality not computed, so this is the same formula over " \
           "the 3 of 6 present, not VBench's number." in md


def test_evaluate_vbench_cache_reuses_scores(run, models, folder, monkeypatch):
    calls = []
    real = common.read_all_frames
    monkeypatch.setattr(common, "read_all_frames", lambda p: calls.append(p) or real(p))
    wan_dfd.main(vbench_argv(models, folder, run["out"]))
    assert calls == []  # every score came from <out>/cache
    again = json.load(open(os.path.join(run["out"], "report.json")))
    assert again["methods"][0]["summary"] == run["report"]["methods"][0]["summary"]
    # a new image for prompt 1 re-scores I2V subject and background of prompt 1's videos only
    other = os.path.join(os.path.dirname(folder["images"][0]), "other.png")
    save_png(other, clip_frames(0, 1)[0])
    argv = vbench_argv(models, folder, run["out"])
    k = argv.index("--i2v-images")
    argv[k + 2] = other
    wan_dfd.main(argv)
    assert sorted(os.path.basename(p) for p in calls) == ["prompt001_seed0.mp4", "prompt001_seed1.mp4"]


def test_evaluate_vbench_flag_errors(models, folder, tmp_path):
    def err(*argv):
        with pytest.raises(SystemExit) as e:
            wan_dfd.main(["evaluate", "--samples", folder["dir"], "--device", "cpu", "--out", str(tmp_path / "o"),
                          *argv])
        return str(e.value)
    assert "--vbench-dino" in err("--vbench-dino", str(tmp_path / "nope"))
    assert "--aesthetic-head" in err("--aesthetic-head", models["head"])  # no CLIP to score
    assert "--vbench-dino" in err("--i2v-images", folder["images"][0])
    assert "--i2v-images" in err("--vbench-dreamsim", models["dreamsim"])  # nothing to compare the frames with
    assert "--vbench-dreamsim" in err("--vbench-dreamsim", str(tmp_path / "nope"), "--i2v-images", folder["images"][0])
    assert "--vbench-dreamsim" in err("--vbench-dreamsim", models["dino"], "--i2v-images", folder["images"][0])
    assert "--vbench-clip" in err("--vbench-clip", models["dino"])  # a ViT folder is not a CLIP folder
    assert "--aesthetic-head" in err("--clip", models["clip_l14"], "--aesthetic-head", models["dino"])  # a folder


def test_evaluate_i2v_images_count(models, folder, tmp_path):
    """One image serves every prompt; otherwise there must be one per prompt index."""
    import shutil
    three = tmp_path / "three"
    shutil.copytree(folder["dir"], three)
    for s in range(2):
        tv.write_video(str(three / f"prompt002_seed{s}.mp4"), clip_frames(0, s))
    with pytest.raises(SystemExit) as e:
        wan_dfd.main(["evaluate", "--samples", str(three), "--vbench-dino", models["dino"], "--i2v-images",
                      *folder["images"], "--device", "cpu", "--out", str(tmp_path / "o")])
    assert "--i2v-images: 2 image(s)" in str(e.value) and "prompt index 2" in str(e.value)


def test_model_folder_with_missing_weights_is_refused(models, tmp_path):
    """transformers would fill missing weights with random ones; the loader stops instead, naming the flag."""
    import shutil
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "dino_broken"
    shutil.copytree(models["dino"], broken)
    sd = load_file(str(broken / "model.safetensors"))
    dropped = sorted(k for k in sd if "layernorm" in k and "encoder" not in k)[0]
    save_file({k: v for k, v in sd.items() if k != dropped}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"--vbench-dino .*weight\(s\) missing"):
        subject_consistency.load_dino(str(broken), "cpu")


# ---------------------------------------------------------------------------------------------------
# I2V background (VBench-I2V i2v_background.py) and the DreamSim written for it (dfd_video/evaluation/vbench/dreamsim.py);
# tests/test_dreamsim_reference.py checks it against the dreamsim package itself, where that installs.


def test_dreamsim_merged_lora_is_peft_lora(models, monkeypatch):
    """Merging the adapter into qkv gives what peft's unmerged LoRA layers compute; the adapter matters."""
    from peft import PeftModel
    merged = dreamsim.load_dreamsim(models["dreamsim"], "cpu", "--vbench-dreamsim")
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    e = merged.embed(x)
    assert e.shape == (3, 64 + 32 + 32)
    assert torch.allclose(e.mean(-1), torch.zeros(3), atol=1e-6)  # centred over its entries,
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-6)  # and of unit length
    monkeypatch.setattr(dreamsim, "merge_lora", lambda *a, **k: 0)
    bare = dreamsim.load_dreamsim(models["dreamsim"], "cpu", "--vbench-dreamsim")
    base_e = bare.embed(x)
    peft_model = PeftModel.from_pretrained(bare, os.path.join(models["dreamsim"], dreamsim.LORA_DIR)).eval()
    with torch.no_grad():
        unmerged = peft_model.base_model.model.embed(x)
    assert torch.allclose(e, unmerged, atol=1e-6), (e - unmerged).abs().max()
    assert (e - base_e).abs().max() > 1e-3


def test_dreamsim_load_errors(models, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file

    def broken(edit) -> str:
        d = tmp_path / f"ds{len(os.listdir(tmp_path))}"
        shutil.copytree(models["dreamsim"], d)
        edit(d)
        return str(d)

    def err(folder) -> str:
        with pytest.raises(ValueError) as e:
            dreamsim.load_dreamsim(folder, "cpu", "--vbench-dreamsim")
        return str(e.value)

    assert "no such folder" in err(str(tmp_path / "nope"))
    gone = broken(lambda d: os.remove(d / dreamsim.DINO_FILE))
    assert err(gone).startswith(f"--vbench-dreamsim {os.path.join(gone, dreamsim.DINO_FILE)}: missing")

    def drop_proj(d):
        sd = torch.load(d / dreamsim.CLIP_FILE, weights_only=True)
        del sd["state_dict"]["proj"]
        torch.save(sd, d / dreamsim.CLIP_FILE)
    assert "no 'proj' entry" in err(broken(drop_proj))

    def drop_block(d):
        sd = torch.load(d / dreamsim.OPEN_CLIP_FILE, weights_only=True)
        sd["state_dict"] = {k: v for k, v in sd["state_dict"].items() if k != "norm.weight"}
        torch.save(sd, d / dreamsim.OPEN_CLIP_FILE)
    assert f"{dreamsim.OPEN_CLIP_FILE}: not a DINO-layout ViT state dict" in err(broken(drop_block))

    def drop_lora(d):
        path = d / dreamsim.LORA_DIR / "adapter_model.safetensors"
        sd = load_file(str(path))
        save_file({k: v for k, v in sd.items() if "extractor_list.2." not in k}, str(path))
    assert "LoRA entries do not match" in err(broken(drop_lora))

    def dora(d):
        path = d / dreamsim.LORA_DIR / "adapter_config.json"
        cfg = json.load(open(path))
        json.dump({**cfg, "use_dora": True}, open(path, "w"))
    assert "use_dora" in err(broken(dora))

    def no_rank(d):
        path = d / dreamsim.LORA_DIR / "adapter_config.json"
        cfg = json.load(open(path))
        json.dump({k: v for k, v in cfg.items() if k != "r"}, open(path, "w"))
    assert "no LoRA rank r" in err(broken(no_rank))


def test_i2v_background_static_and_changing_clips(models):
    dim = vbench.build("cpu", dreamsim=models["dreamsim"], i2v=True)
    assert [d.name for d in dim] == ["i2v_background"] and vbench.build("cpu", dreamsim=models["dreamsim"]) == []
    dim = dim[0]
    a, b = tv.random_frames(1, T=1, height=32, width=48)[0], tv.random_frames(2, T=1, height=32, width=48)[0]
    assert dim(np.stack([a] * 4), a) == pytest.approx(1.0, abs=1e-6)
    # A, A, B, B against the image A: 0.4 * 1 + 0.3 * mean(1, c, 1) + 0.3 * min(1, c, 1), c = max(0, cos(e_A, e_B))
    ea, eb = dim.model.embed(i2v_background.preprocess(np.stack([a, b])))
    c = max(0.0, float(torch.nn.functional.cosine_similarity(ea, eb, dim=0)))
    assert c < 0.999  # the two frames do differ in embedding
    assert dim(np.stack([a, a, b, b]), a) == pytest.approx(0.4 + 0.3 * (2 + c) / 3 + 0.3 * c, abs=1e-5)
    with pytest.raises(ValueError, match="--i2v-images"):
        dim(np.stack([a] * 4), None)


# ---------------------------------------------------------------------------------------------------
# Dynamic degree (VBench dynamic_degree.py) and the RAFT written for it (dfd_video/evaluation/vbench/raft.py).

@pytest.mark.parametrize("fps,step", [(8, 1), (4, 1), (16, 2), (24, 3), (30, 4), (20, 2), (12, 2)])
def test_frame_step_about_8_per_second(fps, step):
    assert dynamic_degree.frame_step(fps) == step  # 20 / 8 = 2.5 and 12 / 8 = 1.5 round to the even number


def test_pad_to_8_splits_evenly_and_replicates():
    x = torch.arange(30 * 45, dtype=torch.float32).view(1, 1, 30, 45)
    y = dynamic_degree.pad_to_8(x)
    assert tuple(y.shape[-2:]) == (32, 48)
    torch.testing.assert_close(y[..., 1:31, 1:46], x)      # 2 rows: 1 + 1; 3 columns: 1 before, 2 after
    torch.testing.assert_close(y[..., 0, 1:46], x[..., 0, :])
    torch.testing.assert_close(y[..., 1:31, 47], x[..., :, -1])
    assert dynamic_degree.pad_to_8(torch.zeros(1, 3, 64, 96)).shape[-2:] == (64, 96)


def test_pair_score_top_five_percent():
    flow = torch.zeros(2, 20, 20)
    flow[0] = 3.0
    flow[1] = 4.0
    assert dynamic_degree.pair_score(flow) == pytest.approx(5.0)  # every magnitude 5
    flow = torch.zeros(2, 20, 20)
    flow[0].view(-1)[:20] = 10.0  # 20 of 400 pixels = 5%
    flow[1].view(-1)[20:40] = 7.0
    assert dynamic_degree.pair_score(flow) == pytest.approx(10.0)
    flow[0].view(-1)[:10] = 0.0   # now the top 20 are ten 10s and ten 7s
    assert dynamic_degree.pair_score(flow) == pytest.approx(8.5)


def test_is_dynamic_rule():
    # 480 x 832: threshold 6 * 480 / 256 = 11.25; 41 frames need round(10.25) = 10 pairs above it
    assert dynamic_degree.is_dynamic([12.0] * 10 + [0.0] * 30, 480, 832, 41)
    assert not dynamic_degree.is_dynamic([12.0] * 9 + [0.0] * 31, 480, 832, 41)
    assert not dynamic_degree.is_dynamic([11.25] * 40, 480, 832, 41)  # strictly above
    # 47 frames need round(11.75) = 12 pairs (int() would ask for 11)
    assert not dynamic_degree.is_dynamic([12.0] * 11 + [0.0] * 35, 480, 832, 47)
    assert dynamic_degree.is_dynamic([12.0] * 12 + [0.0] * 34, 480, 832, 47)
    # 2 frames need round(0.5) = 0 pairs: VBench calls any 2-frame clip dynamic; no pair at all is not
    assert dynamic_degree.is_dynamic([0.0], 480, 832, 2) and not dynamic_degree.is_dynamic([], 480, 832, 1)


def shift_flow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A stand-in flow model, exact on horizontal rolls: the integer shift s in [-12, 12] with b = roll(a, s)
    on the inner columns, as a constant flow (s, 0)."""
    errs = {s: float((torch.roll(a, s, dims=3) - b)[..., 16:-16].abs().mean()) for s in range(-12, 13)}
    s = min(errs, key=errs.get)
    flow = torch.zeros(1, 2, *a.shape[-2:])
    flow[:, 0] = s
    return flow


@pytest.mark.parametrize("speed,fps,dynamic", [(0, 16, 0.0), (1, 16, 1.0), (1, 8, 0.0), (2, 8, 1.0), (3, 24, 1.0)])
def test_dynamic_degree_of_constant_speed_clips(speed, fps, dynamic):
    """A 64 x 96 clip rolling `speed` px per frame: the sampled pairs (every round(fps / 8)-th frame) move
    speed * step px, against the threshold 6 * 64 / 256 = 1.5 px: 1 px/frame at 8 fps is static, at 16 fps
    (pairs 2 frames apart) dynamic."""
    base = tv.random_frames(5, T=1, height=64, width=96)[0]
    clip = np.stack([np.roll(base, speed * t, axis=1) for t in range(17)])
    assert dynamic_degree.dynamic_degree_score(clip, fps, shift_flow) == dynamic


def test_raft_checkpoint_layout(tmp_path):
    """The keys and shapes of princeton-vl/RAFT's full model (read off its raft-things.pth layout: 179 entries
    with the `module.` prefix, the strided blocks' shortcut norm under both norm3 and downsample.1)."""
    sd = torch.load(tv.build_raft(str(tmp_path / "raft.pth")), weights_only=True)
    assert len(sd) == 179
    assert sum(v.numel() for k, v in sd.items() if "downsample.1" not in k and "num_batches" not in k) == 5260416
    for key, shape in (("fnet.conv1.weight", (64, 3, 7, 7)), ("cnet.norm1.running_var", (64,)),
                       ("cnet.layer2.0.norm3.weight", (96,)), ("cnet.layer2.0.downsample.1.weight", (96,)),
                       ("fnet.conv2.weight", (256, 128, 1, 1)), ("cnet.conv2.weight", (256, 128, 1, 1)),
                       ("update_block.encoder.convc1.weight", (256, 324, 1, 1)),
                       ("update_block.gru.convq2.weight", (128, 384, 5, 1)),
                       ("update_block.mask.2.weight", (576, 256, 1, 1)),
                       ("update_block.flow_head.conv2.weight", (2, 256, 3, 3))):
        assert tuple(sd["module." + key].shape) == shape, key
    assert not any(k.startswith("module.fnet") and "running" in k for k in sd)  # instance norm: no statistics


def test_raft_pieces_and_load_errors(tmp_path):
    # the correlation lookup at zero flow: the window centre (index 40 of 81) is each pixel's correlation with the
    # same place in the other image, at level 0
    f1, f2 = torch.randn(1, 8, 16, 16), torch.randn(1, 8, 16, 16)
    levels = raft.correlation_pyramid(f1, f2)
    assert [tuple(c.shape[-2:]) for c in levels] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    out = raft.lookup(levels, torch.stack([xs, ys])[None])
    assert tuple(out.shape) == (1, 4 * 81, 16, 16)
    torch.testing.assert_close(out[0, 40], (f1[0] * f2[0]).sum(0) / 8 ** 0.5, rtol=0, atol=1e-5)
    # window index (i, j) looks at x + d_i, y + d_j (RAFT's order): index 41 = (i 4, j 5) is one row down
    torch.testing.assert_close(out[0, 41, :15], (f1[0, :, :15] * f2[0, :, 1:]).sum(0) / 8 ** 0.5, rtol=0, atol=1e-5)
    # convex upsampling of a constant flow is 8 times it away from the zero-padded border
    up = raft.convex_upsample(torch.full((1, 2, 4, 5), 1.5), torch.randn(1, 576, 4, 5))
    assert tuple(up.shape) == (1, 2, 32, 40)
    torch.testing.assert_close(up[..., 8:24, 8:32], torch.full((1, 2, 16, 24), 12.0))
    with pytest.raises(ValueError, match="--raft .*no such file"):
        raft.load_raft(str(tmp_path / "missing.pth"), "cpu")
    torch.save({"module.fnet.conv1.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="--raft .*not RAFT"):
        raft.load_raft(str(tmp_path / "other.pth"), "cpu")


@pytest.mark.skipif(not os.environ.get("DFD_RAFT_REPO"), reason="set DFD_RAFT_REPO to a princeton-vl/RAFT checkout")
def test_raft_matches_upstream(tmp_path):
    """Opt-in parity: the same random weights through princeton-vl/RAFT's own core/raft.py and through ours."""
    path = tv.build_raft(str(tmp_path / "raft.pth"))
    up = vr.load_raft_upstream(os.environ["DFD_RAFT_REPO"])().eval()
    up.load_state_dict({k.removeprefix("module."): v for k, v in torch.load(path, weights_only=True).items()})
    ours = raft.load_raft(path, "cpu")
    a = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        _, want = up(a, torch.roll(a, 3, dims=3), iters=20, test_mode=True)
    torch.testing.assert_close(ours(a, torch.roll(a, 3, dims=3), 20), want, rtol=0, atol=1e-4)


def test_evaluate_dynamic_degree_imaging_quality_motion_smoothness(tmp_path, monkeypatch):
    """--raft, --musiq and --amt end to end (random weights, so only the plumbing is checked: the per-video values are
    what the dimensions give on the decoded frames, the paper mean leaves dynamic degree and imaging quality out,
    VBench's Quality Score has them, small frames are refused by RAFT)."""
    monkeypatch.setattr(dynamic_degree, "ITERS", 1)  # 20 refinements of a full-size RAFT are slow on a CPU
    path = tv.build_raft(str(tmp_path / "raft.pth"))
    for s in range(2):
        base = tv.random_frames(s, T=1, height=128, width=128)[0]
        tv.write_video(str(tmp_path / "v" / f"prompt000_seed{s}.mp4"),
                       np.stack([np.roll(base, 8 * s * t, axis=1) for t in range(3)]))
    out = str(tmp_path / "o")
    musiq_path, amt_path = tv.build_musiq(str(tmp_path / "musiq.pth")), tv.build_amt(str(tmp_path / "amt.pth"))
    wan_dfd.main(["evaluate", "--samples", str(tmp_path / "v"), "--raft", path, "--musiq", musiq_path, "--amt",
                  amt_path, "--temporal-flickering", "--frames", "3", "--figure-prompts", "--device", "cpu",
                  "--out", out])
    m = json.load(open(os.path.join(out, "report.json")))["methods"][0]
    dim = dynamic_degree.DynamicDegree(raft.load_raft(path, "cpu"), path)
    iq = imaging_quality.ImagingQuality(musiq.load_musiq(musiq_path, "cpu"), musiq_path)
    ms = motion_smoothness.MotionSmoothness(amt.load_amt(amt_path, "cpu"), amt_path)
    for s in range(2):
        frames = decode_all(os.path.join(tmp_path, "v", f"prompt000_seed{s}.mp4"))
        row = m["per_video"][f"prompt000_seed{s}"]
        assert row["dynamic_degree"] == dim(frames, None, 8.0)
        assert row["imaging_quality"] == pytest.approx(iq(frames), abs=1e-6)
        assert row["motion_smoothness"] == pytest.approx(ms(frames), abs=1e-6)
    summary = m["summary"]
    assert summary["paper_average"] == pytest.approx((summary["temporal_flickering"] + summary["motion_smoothness"]) / 2)
    four = ["temporal_flickering", "motion_smoothness", "dynamic_degree", "imaging_quality"]
    assert summary["vbench_quality_score"] == pytest.approx(vbench.quality_score({k: summary[k] for k in four}))
    assert "not computed, so this is the same formula over the 4 of 7 present" in open(os.path.join(out, "report.md")).read()
    with pytest.raises(ValueError, match="128 x 128"):
        dim(np.zeros((3, 64, 96, 3), np.uint8), None, 8.0)
    with pytest.raises(ValueError, match="128 x 128"):
        ms(np.zeros((3, 64, 96, 3), np.uint8))


# ---------------------------------------------------------------------------------------------------
# Imaging quality (VBench imaging_quality.py) and the MUSIQ written for it (dfd_video/evaluation/vbench/musiq.py).


def test_imaging_quality_preprocess_sizes_and_values():
    x = imaging_quality.preprocess(np.full((2, 480, 832, 3), 51, np.uint8))
    assert tuple(x.shape) == (2, 3, 295, 512)  # s = 512 / 832: int(295.38), int(512.0)
    torch.testing.assert_close(x, torch.full_like(x, 0.2))
    small = imaging_quality.preprocess(np.full((1, 300, 500, 3), 255, np.uint8))
    assert tuple(small.shape) == (1, 3, 300, 500) and float(small.max()) == 1.0  # not resized below 512


def test_imaging_quality_bilinear_halving_is_2x2_means():
    """Above 512 on the longer side: bilinear without antialiasing; at exactly half size that samples between pixel
    pairs, i.e. the means of 2x2 blocks (600 x 1024 -> 300 x 512), then / 255."""
    x = np.random.default_rng(3).integers(0, 256, (1, 600, 1024, 3)).astype(np.uint8)
    want = x.astype(np.float64).reshape(1, 300, 2, 512, 2, 3).mean((2, 4)) / 255
    got = imaging_quality.preprocess(x).permute(0, 2, 3, 1).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_musiq_hashed_positions_and_padding():
    assert musiq.hashed_positions(1, 10).tolist() == list(range(10))
    assert musiq.hashed_positions(1, 5).tolist() == [0, 2, 4, 6, 8]
    assert musiq.hashed_positions(1, 20).tolist() == [j // 2 for j in range(20)]
    assert musiq.hashed_positions(2, 3).tolist() == [0, 3, 6, 50, 53, 56]
    x = torch.ones(1, 1, 33, 64)
    y = musiq.same_pad(x, 32, 32)  # ceil(33 / 32) = 2 patches: 31 rows of padding, 15 before and 16 after
    assert tuple(y.shape) == (1, 1, 64, 64) and float(y[0, 0, 15:48].min()) == 1.0 and float(y.sum()) == 33 * 64


def test_musiq_multiscale_sequence():
    """A 295 x 512 frame: 224 scale 129 x 224 (5 x 7 = 35 real patches of 49), 384 scale 221 x 384 (7 x 12 = 84
    of 144), the original 10 x 16 = 160, all real."""
    tokens, pos, scale, mask = musiq.multiscale_patches(torch.zeros(1, 3, 295, 512))
    assert tuple(tokens.shape) == (1, 49 + 144 + 160, 3 * 32 * 32)
    assert [int(mask[:49].sum()), int(mask[49:193].sum()), int(mask[193:].sum())] == [35, 84, 160]
    assert scale[:35].tolist() == [0] * 35 and scale[49:133].tolist() == [1] * 84 and scale[193:].tolist() == [2] * 160
    assert pos[193:209].tolist() == [j * 10 // 16 for j in range(16)]  # first row of the original scale


def test_musiq_scores_with_a_fixed_head(tmp_path):
    """A head with zero weight: every frame scores its bias (one output), or the mean of 1..C under a uniform
    softmax (C outputs, the AVA layout); the dimension divides by 100."""
    one = musiq.load_musiq(tv.build_musiq(str(tmp_path / "a.pth"), bias=42.0), "cpu")
    frames = tv.random_frames(0, T=2, height=64, width=96)
    assert imaging_quality.ImagingQuality(one, str(tmp_path / "a.pth"))(frames) == pytest.approx(0.42, abs=1e-6)
    ten = musiq.load_musiq(tv.build_musiq(str(tmp_path / "b.pth"), classes=10, bias=0.0), "cpu")
    torch.testing.assert_close(ten(torch.rand(1, 3, 40, 40)), torch.tensor([5.5]))


def test_musiq_load_errors(tmp_path):
    with pytest.raises(ValueError, match="--musiq .*no such file"):
        musiq.load_musiq(str(tmp_path / "missing.pth"), "cpu")
    torch.save({"embedding.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="--musiq .*not pyiqa MUSIQ weights"):
        musiq.load_musiq(str(tmp_path / "other.pth"), "cpu")


@pytest.mark.skipif(not os.environ.get("DFD_PYIQA_REPO"),
                    reason="set DFD_PYIQA_REPO to a chaofengc/IQA-PyTorch checkout")
def test_musiq_matches_pyiqa(tmp_path):
    """Opt-in parity: the same random full-size weights through pyiqa's MUSIQ and ours, on frames of three shapes."""
    upstream = vr.load_pyiqa_musiq(os.environ["DFD_PYIQA_REPO"])
    torch.manual_seed(0)
    ref = upstream.MUSIQ(pretrained=False).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "gn" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, tmp_path / "musiq.pth")
    ours = musiq.load_musiq(str(tmp_path / "musiq.pth"), "cpu")
    for h, w in ((96, 160), (295, 512), (200, 130)):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x).flatten(), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Motion smoothness (VBench motion_smoothness.py) and the AMT-S written for it (dfd_video/evaluation/vbench/amt.py).


def copy_previous(img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
    """A stand-in interpolator that repeats the first frame."""
    return img0.clone()


def half_roll(img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
    """A stand-in interpolator exact on horizontal rolls by an even number of pixels: img0 rolled half-way."""
    errs = {s: float((torch.roll(img0, s, dims=3) - img1).abs().mean()) for s in range(-16, 17, 2)}
    return torch.roll(img0, min(errs, key=errs.get) // 2, dims=3)


def test_pad_16():
    y, pads = motion_smoothness.pad_16(torch.zeros(1, 3, 30, 45))
    assert tuple(y.shape[-2:]) == (32, 48) and pads == (1, 2, 1, 1)
    assert motion_smoothness.pad_16(torch.zeros(1, 3, 32, 64))[1] == (0, 0, 0, 0)


def test_motion_smoothness_known_answers():
    """9 frames: inputs 0, 2, 4, 6, 8, targets 1, 3, 5, 7 (4 predictions)."""
    T = 9
    static = np.full((T, 30, 45, 3), 100, np.uint8)  # 30 x 45 is padded to 32 x 48 and cropped back
    assert motion_smoothness.smoothness_score(static, copy_previous) == 1.0
    flash = static.copy()
    flash[3] = 160  # the target frame 3 is 60 off its prediction (frame 2); the other three match
    assert motion_smoothness.smoothness_score(flash, copy_previous) == pytest.approx((255 - 60 / 4) / 255)
    # a 2x ramp rolling v px per frame: repeating the previous frame misses by the closed form of the flicker test
    ramp = np.broadcast_to((2 * np.arange(128)).astype(np.uint8)[None, :, None], (16, 128, 3))
    for v in (1, 2, 3):
        clip = np.stack([np.roll(ramp, v * t, axis=1) for t in range(T)])
        mae = 4 * v * (256 - 2 * v) / 256
        assert motion_smoothness.smoothness_score(clip, copy_previous) == pytest.approx((255 - mae) / 255)
        assert motion_smoothness.smoothness_score(clip, half_roll) == 1.0  # constant speed: exactly in between
    with pytest.raises(ValueError, match="needs 3"):
        motion_smoothness.smoothness_score(static[:2], copy_previous)



def test_motion_smoothness_truncates_the_prediction():
    """VBench's tensor2img turns the prediction into uint8 by truncation: 100.7 / 255 is 100, so a static clip at 100
    scores 1 (rounding would make it 101, one grey level off)."""
    static = np.full((5, 32, 48, 3), 100, np.uint8)
    assert motion_smoothness.smoothness_score(static, lambda a, b: torch.full_like(a, 100.7 / 255)) == 1.0
    assert motion_smoothness.smoothness_score(static, lambda a, b: torch.full_like(a, 101.2 / 255)) == \
        pytest.approx((255 - 1) / 255)


def test_amt_checkpoint_layout_and_errors(tmp_path):
    """The keys and shapes of VBench's AMT-S (read off the model its networks/AMT-S.py builds: 213 entries,
    2,990,543 parameters)."""
    sd = torch.load(tv.build_amt(str(tmp_path / "amt.pth")), weights_only=True)["state_dict"]
    assert len(sd) == 213 and sum(v.numel() for v in sd.values()) == 2990543
    for key, shape in (("feat_encoder.conv1.weight", (32, 3, 7, 7)),
                       ("feat_encoder.layer2.0.downsample.0.weight", (64, 32, 1, 1)),
                       ("feat_encoder.conv2.weight", (84, 96, 1, 1)), ("encoder.pyramid4.0.1.weight", (56,)),
                       ("decoder4.convblock.0.0.weight", (112, 113, 3, 3)),
                       ("decoder4.convblock.2.weight", (112, 48, 4, 4)),
                       ("decoder1.convblock.2.weight", (60, 24, 4, 4)),
                       ("update2.convc1.weight", (64, 392, 1, 1)), ("update3.gru.0.weight", (76, 104, 3, 3)),
                       ("comb_block.1.weight", (18,))):
        assert tuple(sd[key].shape) == shape, key
    model = amt.load_amt(str(tmp_path / "amt.pth"), "cpu")
    a = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    mid = model(a, a)
    assert tuple(mid.shape) == (1, 3, 128, 128) and float(mid.min()) >= 0 and float(mid.max()) <= 1
    torch.save({"state_dict": {"comb_block.0.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="--amt .*not AMT-S weights"):
        amt.load_amt(str(tmp_path / "other.pth"), "cpu")


@pytest.mark.skipif(not os.environ.get("DFD_VBENCH_REPO"),
                    reason="set DFD_VBENCH_REPO to a Vchitect/VBench checkout")
def test_amt_matches_vbench(tmp_path):
    """Opt-in parity: the same random weights through VBench's AMT-S and ours."""
    upstream = vr.load_vbench_amt(os.environ["DFD_VBENCH_REPO"])
    ours = amt.load_amt(tv.build_amt(str(tmp_path / "amt.pth")), "cpu")
    ref = upstream.Model(corr_radius=3, corr_lvls=4, num_flows=3).eval()
    ref.load_state_dict(torch.load(tmp_path / "amt.pth", weights_only=True)["state_dict"])
    a = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(3))
    b = torch.roll(a, 4, dims=3)
    with torch.no_grad():
        want = ref(a, b, torch.tensor(0.5).view(1, 1, 1, 1), scale_factor=1.0, eval=True)["imgt_pred"]
    torch.testing.assert_close(ours(a, b), want, rtol=0, atol=1e-4)
