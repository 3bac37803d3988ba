"""Tiny random image encoders and synthetic videos in the real on-disk layouts, for the tests of `evaluate`.

build_clip(dir)           a CLIPModel + CLIPImageProcessor folder (the layout of openai/clip-vit-large-patch14:
                          config.json with text and vision configs, model.safetensors, preprocessor_config.json),
                          1 layer, hidden 16, projection_dim 8, 32x32 input in 8x8 patches.
build_dino_vit(dir)       a ViTModel folder (the layout of facebook/dino-vitb16), 1 layer, hidden 16, 224x224 in 16x16.
build_dreamsim(dir)       a DreamSim cache folder (DINO's hub backbone file, the two CLIP-as-DINO files, a peft LoRA
                          adapter on every qkv), 224x224 in 16x16 patches, 1 block each, width 64, projections 32.
build_aesthetic_head(f)   a linear head file in the format of LAION's aesthetic predictor (sa_0_4_vit_l_14_linear.pth).
build_raft(file)          a RAFT checkpoint with random weights in the layout of raft-things.pth (full size).
build_amt(file)           an AMT-S checkpoint with random weights in the layout of VBench's amt-s.pth.
build_musiq(file)         a MUSIQ checkpoint with random weights in the layout of pyiqa's (a narrow transformer).
build_dino(dir)           a Dinov2Model + BitImageProcessor folder (the layout of facebook/dinov2-large),
                          1 layer, hidden 16, 28x28 input in 7x7 patches.
build_all(dir)            every model above under one folder, named as docs/evaluation.md's tiny run uses them
                          (`python tests/tiny_vision.py DIR`).
write_video(path, frames) a uint8 [T, H, W, 3] clip through dfd_video.video.write_mp4 (H.264, yuv420p).
counter_frames(...)       frames whose brightness encodes the frame index, so a decoded frame tells which it was.
pose_trajectory(...)      camera-to-world poses [N, 4, 4] moving on a straight line at constant speed while
                          yawing at a constant rate about the world z axis, from a generic initial orientation.

Without torchvision, transformers falls back to its PIL image processors and warns; that is expected.
"""
from __future__ import annotations

import os

import numpy as np
import torch

CLIP_DIM = 8  # projection_dim: what get_image_features returns (the vision tower's pooled output is 16-d)
DINO_DIM = 16  # hidden_size: Dinov2's pooler_output (layer-normed CLS token)
# openai/clip-vit-large-patch14's preprocessor statistics; facebook/dinov2-large uses ImageNet's.
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_clip(path: str, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> str:
    """Saves a tiny random CLIPModel and its CLIPImageProcessor at `path` (shortest edge 32, centre crop 32x32).
    image_size=224, patch_size=32 gives the input layout of CLIP ViT-B/32 (VBench's background consistency),
    patch_size=14 that of ViT-L/14 (its aesthetic quality)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=CLIP_DIM)).eval()
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                       image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3).save_pretrained(path)
    return path


def build_dino(path: str, seed: int = 0) -> str:
    """Saves a tiny random Dinov2Model and its BitImageProcessor at `path` (shortest edge 32, centre crop 28x28)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(hidden_size=DINO_DIM, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, image_size=28, patch_size=7)).eval()
    model.save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
                      do_convert_rgb=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                      resample=3).save_pretrained(path)
    return path


def build_dino_vit(path: str, seed: int = 0) -> str:
    """Saves a tiny random ViTModel at `path` in the layout of facebook/dino-vitb16 (config.json with
    model_type "vit", model.safetensors; 224x224 input in 16x16 patches, no pooler), 1 layer, hidden 16. VBench
    preprocesses the frames itself, so no preprocessor config is needed."""
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(hidden_size=DINO_DIM, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               image_size=224, patch_size=16, qkv_bias=True), add_pooling_layer=False).eval()
    model.save_pretrained(path)
    return path


def build_dreamsim(path: str, seed: int = 0, dim: int = 64, proj: int = 32) -> str:
    """Saves a tiny random DreamSim ensemble at `path` in the layout `dreamsim(pretrained=True, cache_dir=path)`
    leaves (dfd_video/evaluation/vbench/dreamsim.py): checkpoints/dino_vitbase16_pretrain.pth (a bare state dict in DINO's
    names), clip_vitb16_pretrain.pth.tar and open_clip_vitb16_pretrain.pth.tar ({"state_dict": ... + "proj"}), and
    ensemble_lora/ saved by peft (r 4, lora_alpha 2, target "qkv", random A and B so that merging matters)."""
    from peft import LoraConfig, get_peft_model
    from dfd_video.evaluation.vbench import dreamsim as ds
    g = torch.Generator().manual_seed(seed)

    def randomize(module: torch.nn.Module) -> dict:
        sd = {}
        for k, v in module.state_dict().items():
            scale = 0.1 if ("norm" in k or "pos_drop" in k) and k.endswith("weight") else 0.05
            sd[k] = (1.0 if scale == 0.1 else 0.0) + scale * torch.randn(v.shape, generator=g)
        module.load_state_dict(sd)
        return sd

    os.makedirs(os.path.join(path, "checkpoints"), exist_ok=True)
    vits = [ds.ViT(dim, 1, 16, 197, clip=c, quick_gelu=q) for c, q in ((False, False), (True, True), (True, False))]
    torch.save(randomize(vits[0]), os.path.join(path, ds.DINO_FILE))
    projs = [None]
    for vit, name in zip(vits[1:], (ds.CLIP_FILE, ds.OPEN_CLIP_FILE)):
        sd = randomize(vit)
        projs.append(torch.randn(dim, proj, generator=g) / dim ** 0.5)
        torch.save({"state_dict": {**sd, "proj": projs[-1]}}, os.path.join(path, name))
    model = ds.DreamSim([ds.Branch(v, p, ds.IMAGENET_MEAN if p is None else ds.CLIP_MEAN,
                                   ds.IMAGENET_STD if p is None else ds.CLIP_STD) for v, p in zip(vits, projs)])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=2, target_modules=["qkv"], bias="none"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(os.path.join(path, ds.LORA_DIR))
    return path


def build_aesthetic_head(path: str, dim: int = CLIP_DIM, seed: int = 0, weight=None, bias: float | None = None) -> str:
    """Saves a linear head in the format of LAION's sa_0_4_vit_l_14_linear.pth (torch.save of nn.Linear(dim, 1)'s
    state dict: weight [1, dim], bias [1]); random unless weight / bias are given."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(dim, 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, dim, generator=g) if weight is None else torch.as_tensor(weight).view(1, dim))
        head.bias.fill_(float(torch.randn(1, generator=g)) if bias is None else bias)
    torch.save(head.state_dict(), path)
    return path


def build_raft(path: str, seed: int = 0) -> str:
    """Saves a RAFT checkpoint with random weights in the layout of raft-things.pth (a DataParallel state dict:
    `module.` keys). Full size (5.3M parameters, 21 MB): VBench's RAFT has no tiny configuration. BatchNorm
    statistics are randomised too, so that a wrongly loaded or ignored buffer shows."""
    from dfd_video.evaluation.vbench.raft import RAFT
    torch.manual_seed(seed)
    model = RAFT()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    return path


def build_amt(path: str, seed: int = 0) -> str:
    """Saves an AMT-S checkpoint with random weights in the layout of VBench's amt-s.pth ({"state_dict": ...}).
    Full size (3.0M parameters, 12 MB): AMT-S is already small. The PReLU slopes are randomised too."""
    from dfd_video.evaluation.vbench.amt import AMTS
    torch.manual_seed(seed)
    model = AMTS()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.0, 0.5)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def build_musiq(path: str, seed: int = 0, dim: int = 32, layers: int = 2, classes: int = 1,
                bias: float | None = None) -> str:
    """Saves a tiny random MUSIQ checkpoint in the layout of pyiqa's musiq_spaq_ckpt (its parameter names; the
    patch stem at full size, the transformer at width `dim` with `layers` blocks and MLP 2 * dim). `bias` fixes the
    head's bias and zeroes its weight, so every image gets the same score."""
    from dfd_video.evaluation.vbench.musiq import MUSIQ
    torch.manual_seed(seed)
    model = MUSIQ(dim=dim, mlp=2 * dim, heads=max(1, dim // 64), layers=layers, classes=classes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "emb" in name or name.endswith("cls"):
                p.normal_(0, 0.02)
        if bias is not None:
            head = model.head if classes == 1 else model.head[0]
            head.weight.zero_()
            head.bias.fill_(bias)
    torch.save(model.state_dict(), path)
    return path


ALL = ("clip", "dino", "vb_dino", "vb_clip_b32", "vb_clip_l14", "aesthetic_head.pth", "musiq.pth", "raft.pth",
       "amt.pth", "dreamsim")


def build_all(folder: str) -> None:
    """Every tiny model of this file under `folder` (names in ALL): clip/ and dino/ (the diversity encoders), vb_dino/,
    vb_clip_b32/, vb_clip_l14/, aesthetic_head.pth, musiq.pth, raft.pth, amt.pth and dreamsim/ (the VBench models)."""
    j = lambda name: os.path.join(folder, name)  # noqa: E731
    build_clip(j("clip"))
    build_dino(j("dino"))
    build_dino_vit(j("vb_dino"))
    build_clip(j("vb_clip_b32"), image_size=224, patch_size=32)
    build_clip(j("vb_clip_l14"), seed=1, image_size=224, patch_size=14)
    build_aesthetic_head(j("aesthetic_head.pth"))
    build_musiq(j("musiq.pth"))
    build_raft(j("raft.pth"))
    build_amt(j("amt.pth"))
    build_dreamsim(j("dreamsim"))


def write_video(path: str, frames: np.ndarray, fps: float = 8) -> str:
    """uint8 [T, H, W, 3] -> `path` (.mp4, H.264) with the project's own writer; H and W must be even."""
    import dfd_video.video
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    dfd_video.video.write_mp4(path, frames, fps)
    return path


def counter_value(k: int) -> int:
    """The grey level that marks frame k: 10 apart, so after H.264 a neighbour's index cannot pass for it."""
    return 10 + 10 * k


def counter_frames(T: int = 20, height: int = 32, width: int = 48, colored: tuple[int, ...] = ()) -> np.ndarray:
    """uint8 [T, H, W, 3]: the left half of frame k is grey at counter_value(k) (T <= 24); the right half is
    mid grey, except in the frames listed in `colored`, where it is (200, 100, 50) (HSV saturation 0.75).
    Edges sit on multiples of 8 pixels so the codec's blocks do not mix the two halves."""
    assert T <= 24 and width % 16 == 0
    x = np.full((T, height, width, 3), 128, np.uint8)
    for k in range(T):
        x[k, :, : width // 2] = counter_value(k)
        if k in colored:
            x[k, :, width // 2:] = (200, 100, 50)
    return x


def random_frames(seed: int, T: int = 20, height: int = 32, width: int = 48) -> np.ndarray:
    """uint8 [T, H, W, 3]: smooth random colour blobs drifting over time (compresses well, differs per seed)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.empty((T, height, width, 3), np.float64)
    centres = g.uniform(0, 1, (3, 2)) * (height, width)
    velocity = g.uniform(-1, 1, (3, 2))
    colours = g.uniform(0, 255, (3, 3))
    background = g.uniform(0, 255, 3)
    for k in range(T):
        img = np.broadcast_to(background, (height, width, 3)).copy()
        for c, v, rgb in zip(centres, velocity, colours):
            cy, cx = c + k * v
            w = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0 ** 2))[..., None]
            img = (1 - w) * img + w * rgb
        out[k] = img
    return out.round().clip(0, 255).astype(np.uint8)


def rot_z(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def rodrigues(axis, deg: float) -> np.ndarray:
    """Rotation by `deg` degrees about `axis` (normalised here): R = I + sin(a) K + (1 - cos(a)) K^2."""
    k = np.asarray(axis, np.float64)
    k = k / np.linalg.norm(k)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.deg2rad(deg)
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * (K @ K)


R0_GENERIC = rodrigues([0.3, -0.5, 0.8], 40.0)  # a tilted start, so a missing transpose changes the angles


def pose_trajectory(N: int, velocity, yaw_rate_deg: float, p0=(0.0, 0.0, 0.0), R0: np.ndarray | None = None) -> np.ndarray:
    """float64 [N, 4, 4] camera-to-world: p_t = p0 + t * velocity (column T[:3, 3]), R_t = Rz(t * yaw_rate) R0."""
    R0 = R0_GENERIC if R0 is None else R0
    T = np.tile(np.eye(4), (N, 1, 1))
    for t in range(N):
        T[t, :3, :3] = rot_z(t * yaw_rate_deg) @ R0
        T[t, :3, 3] = np.asarray(p0, np.float64) + t * np.asarray(velocity, np.float64)
    return T


def wrapped_angle(deg: float) -> float:
    """The rotation angle in [0, 180] of a rotation by `deg` degrees about one axis."""
    d = deg % 360.0
    return min(d, 360.0 - d)


if __name__ == "__main__":
    import argparse
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dfd_video, for the networks
    parser = argparse.ArgumentParser(description="Writes every tiny random model of this file under FOLDER.")
    parser.add_argument("folder", help="where to write them (" + ", ".join(ALL) + ")")
    folder = parser.parse_args().folder
    taken = [name for name in ALL if os.path.exists(os.path.join(folder, name))]
    if taken:
        parser.error(f"{os.path.join(folder, taken[0])}: exists; remove it or give another folder")
    build_all(folder)
