"""MUSIQ, the multi-scale image quality transformer (Ke et al., ICCV 2021), as pyiqa runs it for VBench's imaging
quality (pyiqa/archs/musiq_arch.py and pyiqa/data/multiscale_trans_util.py, github.com/chaofengc/IQA-PyTorch),
written for this project because pyiqa needs torchvision. Parameter names follow pyiqa's, so its checkpoint
`musiq_spaq_ckpt-358bb6af.pth` loads as it is; the sizes (hidden width, layers, heads, MLP width, head outputs) are
read from the checkpoint, so a tiny one in the same layout works too. Inference only.

  image [N, 3, H, W] in 0..1 -> 2 x - 1
  three scales: the image resized (bicubic, no antialiasing) so its longer side is 224, then 384 (each padded or cut
    to ceil(L / 32)^2 patches, padding masked out), and the image itself (all its patches); 32 x 32 patches with
    TensorFlow "same" zero padding, each with a hashed spatial position on a 10 x 10 grid and its scale index
  patch stem: weight-standardised 7x7/2 convolution, GroupNorm, ReLU, 3x3/2 max pool, one bottleneck block (256)
    -> 8 x 8 x 256 flattened (height, width, channel) -> linear to the hidden width
  transformer: [CLS] + tokens + hashed-position and scale embeddings, pre-norm blocks with masked attention (masked
    logits set to -1000, as pyiqa does), final LayerNorm; the head on [CLS] (one output: the score; several: a
    distribution over 1..C whose mean is the score).

Checked against pyiqa's own code (IQA-PyTorch at the commit in tests/data/vbench_reference.json) on seeded random
weights: tests/test_vbench_reference.py, and live with DFD_PYIQA_REPO in tests/test_vbench.py. VBench does not pin
pyiqa; an older pyiqa may resize the scales differently."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfd_video.evaluation.vbench.common import read_state_dict

PATCH, GRID, SCALES = 32, 10, (224, 384)


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's "same" zero padding for a kernel / stride: the output has ceil(size / stride) positions and the
    extra pixel, if odd, goes after."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class StdConv(nn.Conv2d):
    """A convolution with weight standardisation (each filter minus its mean, over its std + 1e-5) and "same"
    padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        w = w / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(same_pad(x, self.kernel_size[0], self.stride[0]), w, self.bias, self.stride)


class Bottleneck(nn.Module):
    def __init__(self, planes: int, out: int):
        super().__init__()
        self.conv1, self.gn1 = StdConv(planes, planes, 1, bias=False), nn.GroupNorm(32, planes, eps=1e-4)
        self.conv2, self.gn2 = StdConv(planes, planes, 3, bias=False), nn.GroupNorm(32, planes, eps=1e-4)
        self.conv3, self.gn3 = StdConv(planes, out, 1, bias=False), nn.GroupNorm(32, out, eps=1e-4)
        self.conv_proj, self.gn_proj = StdConv(planes, out, 1, bias=False), nn.GroupNorm(32, out, eps=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        return F.relu(self.gn3(self.conv3(y)) + self.gn_proj(self.conv_proj(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (f(x).view(B, N, self.heads, C // self.heads).transpose(1, 2) for f in (self.query, self.key,
                                                                                          self.value))
        logits = q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5
        pair = mask[:, None, :, None] * mask[:, None, None, :]        # [B, 1, N, N]: both tokens real
        attn = logits.masked_fill(pair == 0, -1e3).softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, mlp: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attention, self.mlp = Attention(dim, heads), Mlp(dim, mlp)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class PositionEmbs(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.position_emb = nn.Parameter(torch.zeros(1, GRID * GRID, dim))


class ScaleEmbs(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale_emb = nn.Parameter(torch.zeros(len(SCALES) + 1, dim))


class Encoder(nn.Module):
    def __init__(self, dim: int, mlp: int, heads: int, layers: int):
        super().__init__()
        self.posembed_input, self.scaleembed_input = PositionEmbs(dim), ScaleEmbs(dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.transformer = nn.ModuleDict({f"encoderblock_{i}": Block(dim, mlp, heads) for i in range(layers)})

    def forward(self, x, pos, scale, mask):
        x = x + self.posembed_input.position_emb[0][pos] + self.scaleembed_input.scale_emb[scale]
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        for block in self.transformer.values():
            x = block(x, mask)
        return self.encoder_norm(x)


def hashed_positions(count_h: int, count_w: int) -> torch.Tensor:
    """The spatial index of each of count_h x count_w patches (row-major) on the GRID x GRID embedding grid: row
    and column each mapped by nearest-neighbour resizing of 0..GRID-1 to the patch count (torch's "nearest")."""
    grid = torch.arange(GRID, dtype=torch.float32)[None, None]
    rows = F.interpolate(grid, size=count_h, mode="nearest")[0, 0].long()
    cols = F.interpolate(grid, size=count_w, mode="nearest")[0, 0].long()
    return (rows[:, None] * GRID + cols[None, :]).flatten()


def patches_of(x: torch.Tensor, scale_id: int, max_len: int | None):
    """(patches [N, L, 3*32*32], positions [L], scale ids [L], mask [L]) of images x [N, 3, h, w], padded with
    masked zero patches or cut to max_len (None: all patches)."""
    h, w = x.shape[-2:]
    p = F.unfold(same_pad(x, PATCH, PATCH), PATCH, stride=PATCH).transpose(1, 2)   # [N, L, 3 * 32 * 32]
    pos = hashed_positions(math.ceil(h / PATCH), math.ceil(w / PATCH)).to(x.device)
    scale, mask = torch.full_like(pos, scale_id), torch.ones_like(pos)
    if max_len is not None:
        extra = max(max_len - p.shape[1], 0)
        p = F.pad(p, [0, 0, 0, extra])[:, :max_len]
        pos, scale, mask = (F.pad(t, [0, extra])[:max_len] for t in (pos, scale, mask))
    return p, pos, scale, mask


def multiscale_patches(x: torch.Tensor):
    """The token sequence of images x [N, 3, H, W] in -1..1: each of SCALES (longer side resized to it, sizes
    rounded with Python's round), then the original resolution."""
    h, w = x.shape[-2:]
    parts = []
    for scale_id, longer in enumerate(SCALES):
        r = longer / max(h, w)
        resized = F.interpolate(x, size=(round(h * r), round(w * r)), mode="bicubic", align_corners=False)
        parts.append(patches_of(resized, scale_id, math.ceil(longer / PATCH) ** 2))
    parts.append(patches_of(x, len(SCALES), None))
    return [torch.cat(t, 1 if i == 0 else 0) for i, t in enumerate(zip(*parts))]


class MUSIQ(nn.Module):
    def __init__(self, dim: int = 384, mlp: int = 1152, heads: int = 6, layers: int = 14, classes: int = 1):
        super().__init__()
        self.conv_root = StdConv(3, 64, 7, stride=2, bias=False)
        self.gn_root = nn.GroupNorm(32, 64, eps=1e-6)
        self.block1 = Bottleneck(64, 256)
        self.embedding = nn.Linear(256 * (PATCH // 4) ** 2, dim)
        self.transformer_encoder = Encoder(dim, mlp, heads, layers)
        self.head = nn.Linear(dim, 1) if classes == 1 else nn.Sequential(nn.Linear(dim, classes), nn.Softmax(-1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quality scores [N] of images x [N, 3, H, W] in 0..1."""
        tokens, pos, scale, mask = multiscale_patches(2 * x - 1)
        N, L = tokens.shape[:2]
        y = F.relu(self.gn_root(self.conv_root(tokens.reshape(N * L, 3, PATCH, PATCH))))
        y = F.max_pool2d(same_pad(y, 3, 2), 3, 2)                                 # zeros pad: y >= 0 here
        y = self.block1(y).permute(0, 2, 3, 1).reshape(N, L, -1)                 # (h, w, c) order, as TensorFlow
        out = self.transformer_encoder(self.embedding(y), pos, scale, mask.expand(N, -1).to(y.dtype))
        q = self.head(out[:, 0])
        return (q * torch.arange(1, q.shape[-1] + 1, dtype=q.dtype, device=q.device)).sum(-1)  # one output: q


def load_musiq(path: str, device, flag: str = "--musiq") -> MUSIQ:
    """MUSIQ with the weights of a pyiqa checkpoint (e.g. musiq_spaq_ckpt-358bb6af.pth; `module.` prefixes
    removed, as pyiqa does); its sizes are read from the weights (the head count, which is not stored, as the width
    / 64: pyiqa's 384 / 6). ValueError naming the flag otherwise."""
    sd = {k.removeprefix("module."): v for k, v in read_state_dict(path, flag).items()}
    try:
        dim = sd["embedding.weight"].shape[0]
        layers = len({k.split(".")[2] for k in sd if k.startswith("transformer_encoder.transformer.")})
        mlp = sd["transformer_encoder.transformer.encoderblock_0.mlp.fc1.weight"].shape[0]
        classes = (sd.get("head.weight", sd.get("head.0.weight"))).shape[0]
        model = MUSIQ(dim, mlp, max(1, dim // 64), layers, classes)
        model.load_state_dict(sd)
    except (KeyError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{flag} {path}: not pyiqa MUSIQ weights ({type(e).__name__}: {str(e)[:160]})") from None
    return model.to(device).eval()
