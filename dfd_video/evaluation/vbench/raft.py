"""RAFT optical flow (Teed & Deng, ECCV 2020), the full-size model only, written for this project so that VBench's
dynamic degree runs without torchvision. Module and parameter names follow princeton-vl/RAFT (core/raft.py,
extractor.py, update.py, corr.py; VBench vendors it unchanged in vbench/third_party/RAFT), so its checkpoint
`raft-things.pth` loads as it is (the `module.` prefix of its DataParallel keys removed). Inference only: no
dropout, no mixed precision, no "alternate" CUDA correlation.

  images uint8-valued float [B, 3, H, W] (H, W multiples of 8) -> 2 x / 255 - 1
  fnet: feature encoder (instance norm) -> 256-d features at 1/8 resolution, for both images
  cnet: context encoder (batch norm) -> hidden state tanh(128) and context relu(128), for the first image
  all-pairs correlation <f1(p), f2(q)> / sqrt(256), average-pooled over q into 4 levels
  `iters` times: look up a (2*4+1)^2 window around the current match at every level, motion encoder, separable
  ConvGRU, flow head (residual flow), and a mask for the convex 8x upsampling of the final flow.

Checked against princeton-vl/RAFT's code (the commit in tests/data/vbench_reference.json) on seeded random weights:
tests/test_vbench_reference.py, and live with DFD_RAFT_REPO in tests/test_vbench.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfd_video.evaluation.vbench.common import read_state_dict

HIDDEN, CONTEXT, LEVELS, RADIUS = 128, 128, 4, 4


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with norm + ReLU, a strided 1x1 shortcut when stride > 1. The shortcut's norm is
    the module `norm3`, also registered as `downsample.1` (so the checkpoint holds it under both names)."""

    def __init__(self, in_planes: int, planes: int, norm: str, stride: int = 1):
        super().__init__()
        make = {"instance": lambda: nn.InstanceNorm2d(planes), "batch": lambda: nn.BatchNorm2d(planes)}[norm]
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1)
        self.norm1, self.norm2 = make(), make()
        self.downsample = None
        if stride != 1:
            self.norm3 = make()
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride), self.norm3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        return F.relu((x if self.downsample is None else self.downsample(x)) + y)


class BasicEncoder(nn.Module):
    """RAFT's encoder: a 7x7 stride-2 stem (widths[0] channels, norm, ReLU), stages of two blocks at widths[0],
    widths[1] (stride 2) and widths[2] (stride 2), a 1x1 convolution to out_dim: [B, 3, H, W] -> [B, out_dim, H/8,
    W/8]. RAFT's full model uses residual blocks at (64, 96, 128); AMT's small encoder bottlenecks at (32, 64, 96)."""

    def __init__(self, out_dim: int, norm: str, widths=(64, 96, 128), block=None):
        super().__init__()
        block = block or ResidualBlock
        self.norm1 = nn.InstanceNorm2d(widths[0]) if norm == "instance" else nn.BatchNorm2d(widths[0])
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3)
        stages, width = [], widths[0]
        for planes, stride in zip(widths, (1, 2, 2)):
            stages.append(nn.Sequential(block(width, planes, norm, stride), block(planes, planes, norm)))
            width = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(widths[2], out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


class BasicMotionEncoder(nn.Module):
    """Correlation features (4 levels x 81) and the current flow -> 126 channels, with the flow appended (128)."""

    def __init__(self):
        super().__init__()
        self.convc1 = nn.Conv2d(LEVELS * (2 * RADIUS + 1) ** 2, 256, 1)
        self.convc2 = nn.Conv2d(256, 192, 3, padding=1)
        self.convf1 = nn.Conv2d(2, 128, 7, padding=3)
        self.convf2 = nn.Conv2d(128, 64, 3, padding=1)
        self.conv = nn.Conv2d(64 + 192, 128 - 2, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        c = F.relu(self.convc2(F.relu(self.convc1(corr))))
        f = F.relu(self.convf2(F.relu(self.convf1(flow))))
        return torch.cat([F.relu(self.conv(torch.cat([c, f], 1))), flow], 1)


class SepConvGRU(nn.Module):
    """A ConvGRU step along rows (1x5 kernels), then one along columns (5x1)."""

    def __init__(self, hidden: int = HIDDEN, inp: int = CONTEXT + 128):
        super().__init__()
        for axis, (k, p) in (("1", ((1, 5), (0, 2))), ("2", ((5, 1), (2, 0)))):
            for gate in "zrq":
                setattr(self, f"conv{gate}{axis}", nn.Conv2d(hidden + inp, hidden, k, padding=p))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for axis in "12":
            hx = torch.cat([h, x], 1)
            z = torch.sigmoid(getattr(self, f"convz{axis}")(hx))
            r = torch.sigmoid(getattr(self, f"convr{axis}")(hx))
            q = torch.tanh(getattr(self, f"convq{axis}")(torch.cat([r * h, x], 1)))
            h = (1 - z) * h + z * q
        return h


class FlowHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(HIDDEN, 256, 3, padding=1)
        self.conv2 = nn.Conv2d(256, 2, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(h)))


class BasicUpdateBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = BasicMotionEncoder()
        self.gru = SepConvGRU()
        self.flow_head = FlowHead()
        self.mask = nn.Sequential(nn.Conv2d(HIDDEN, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 64 * 9, 1))

    def forward(self, h, context, corr, flow):
        h = self.gru(h, torch.cat([context, self.encoder(flow, corr)], 1))
        return h, 0.25 * self.mask(h), self.flow_head(h)  # RAFT scales the mask by 1/4 (gradient balance)


def correlation_pyramid(f1: torch.Tensor, f2: torch.Tensor) -> list[torch.Tensor]:
    """All-pairs correlation of features [B, D, h, w] as [B*h*w, 1, h, w] (one map over the second image per
    pixel of the first), divided by sqrt(D), then average-pooled by 2 for each further level."""
    B, D, h, w = f1.shape
    corr = torch.einsum("bdp,bdq->bpq", f1.reshape(B, D, h * w), f2.reshape(B, D, h * w)) / D ** 0.5
    levels = [corr.reshape(B * h * w, 1, h, w)]
    for _ in range(LEVELS - 1):
        levels.append(F.avg_pool2d(levels[-1], 2, stride=2))
    return levels


def lookup(levels: list[torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
    """The correlation in a (2r+1)^2 window around coords [B, 2 (x, y), h, w] at every level (coordinates / 2^l),
    bilinear with zeros outside: [B, LEVELS * (2r+1)^2, h, w]. As in RAFT, window index (i, j) samples at
    x + d_i, y + d_j and is flattened i-major: the checkpoint's first motion convolution expects this order."""
    B, _, h, w = coords.shape
    d = torch.linspace(-RADIUS, RADIUS, 2 * RADIUS + 1, device=coords.device)
    offset = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1)          # [(2r+1), (2r+1), 2]: (d_i, d_j)
    centre = coords.permute(0, 2, 3, 1).reshape(B * h * w, 1, 1, 2)
    out = []
    for lvl, corr in enumerate(levels):
        xy = centre / 2 ** lvl + offset[None]                               # [B*h*w, 2r+1, 2r+1, 2]
        H, W = corr.shape[-2:]
        grid = torch.stack([2 * xy[..., 0] / (W - 1) - 1, 2 * xy[..., 1] / (H - 1) - 1], -1)
        out.append(F.grid_sample(corr, grid, align_corners=True).reshape(B, h, w, -1))
    return torch.cat(out, -1).permute(0, 3, 1, 2).float()


def convex_upsample(flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flow [B, 2, h, w] -> [B, 2, 8h, 8w]: each fine pixel a softmax(mask)-weighted mix of the 3x3 coarse
    neighbours of its coarse pixel, the flow scaled by 8."""
    B, _, h, w = flow.shape
    weights = torch.softmax(mask.view(B, 1, 9, 8, 8, h, w), dim=2)
    nbrs = F.unfold(8 * flow, [3, 3], padding=1).view(B, 2, 9, 1, 1, h, w)
    up = (weights * nbrs).sum(2)                                             # [B, 2, 8, 8, h, w]
    return up.permute(0, 1, 4, 2, 5, 3).reshape(B, 2, 8 * h, 8 * w)


class RAFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.fnet = BasicEncoder(256, "instance")
        self.cnet = BasicEncoder(HIDDEN + CONTEXT, "batch")
        self.update_block = BasicUpdateBlock()

    @torch.no_grad()
    def forward(self, image1: torch.Tensor, image2: torch.Tensor, iters: int = 20) -> torch.Tensor:
        """Flow from image1 to image2 (pixel values 0..255, [B, 3, H, W], H and W multiples of 8): [B, 2, H, W],
        channel 0 the x (column) displacement, 1 the y (row) displacement, after `iters` refinements."""
        x1, x2 = 2 * (image1 / 255.0) - 1, 2 * (image2 / 255.0) - 1
        f1, f2 = self.fnet(torch.cat([x1, x2])).float().chunk(2)
        levels = correlation_pyramid(f1, f2)
        h, context = torch.split(self.cnet(x1), [HIDDEN, CONTEXT], 1)
        h, context = torch.tanh(h), torch.relu(context)
        B, _, hh, ww = f1.shape
        ys, xs = torch.meshgrid(torch.arange(hh, device=x1.device), torch.arange(ww, device=x1.device),
                                indexing="ij")
        coords0 = torch.stack([xs, ys]).float()[None].repeat(B, 1, 1, 1)
        coords1, mask = coords0.clone(), None
        for _ in range(iters):
            h, mask, delta = self.update_block(h, context, lookup(levels, coords1), coords1 - coords0)
            coords1 = coords1 + delta
        return convex_upsample(coords1 - coords0, mask)


def load_raft(path: str, device, flag: str = "--raft") -> RAFT:
    """RAFT with the weights of a raft-things.pth state dict (keys with or without `module.`); ValueError naming
    the flag when the file is missing, unreadable, or not this architecture's weights."""
    sd = {k.removeprefix("module."): v for k, v in read_state_dict(path, flag).items()}
    model = RAFT()
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{flag} {path}: not RAFT (full-size) weights ({str(e).splitlines()[0][:160]}; "
                         f"{str(e).splitlines()[1].strip()[:160] if len(str(e).splitlines()) > 1 else ''})") from None
    return model.to(device).eval()
