"""AMT-S frame interpolation (Li et al., CVPR 2023, "AMT: All-Pairs Multi-Field Transforms"), the model VBench's
motion smoothness uses (vbench/third_party/amt: networks/AMT-S.py and networks/blocks/), written for this project
(VBench's copy is importable only inside the vbench package). Module names follow VBench's, so `amt-s.pth` (its
`state_dict`) loads as it is. Inference only, at the frames' own resolution (VBench's scale factor 1).

  img0, img1 [B, 3, H, W] in 0..1 (H, W multiples of 16), both minus their joint mean; t = 1/2
  feat_encoder: RAFT's small encoder (instance norm) -> 84-d features at 1/8; all-pairs correlation both ways,
    4 levels, radius 3
  encoder: a 4-level PReLU pyramid (20, 32, 44, 56 channels at 1/2 .. 1/16) of each image
  decoders from 1/16 to 1/2: flows from the middle frame to each image and a middle-frame feature, each level
    refined by a correlation lookup at the flows' targets (flow to 1 scaled by 1/t, flow to 0 by 1/(1-t)) and a
    small update block; the last decoder gives 3 flow pairs, blending masks and residuals at full resolution
  the frame: each of the 3 pairs warps both images (bilinear, border padding), blends them by its mask, adds the
    mean and its residual; the 3 candidates' mean plus a small convolution of all of them, clamped to 0..1.

Checked against VBench's vendored AMT-S (the commit in tests/data/vbench_reference.json; MCG-NKU/AMT's code with
VBench's import paths) on seeded random weights: tests/test_vbench_reference.py, and live with DFD_VBENCH_REPO in
tests/test_vbench.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfd_video.evaluation.vbench.common import read_state_dict
from dfd_video.evaluation.vbench.raft import BasicEncoder, correlation_pyramid

RADIUS, LEVELS, FLOWS = 3, 4, 3


def resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Bilinear resize by a scale factor (the output size floor(size * factor); source positions from the factor)."""
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """img [B, C, H, W] sampled at pixel + flow [B, 2 (x, y), H, W]: bilinear, edges repeated."""
    B, _, H, W = flow.shape
    xs = torch.linspace(-1.0, 1.0, W, dtype=img.dtype, device=img.device).view(1, 1, 1, W).expand(B, -1, H, -1)
    ys = torch.linspace(-1.0, 1.0, H, dtype=img.dtype, device=img.device).view(1, 1, H, 1).expand(B, -1, -1, W)
    grid = torch.cat([xs + flow[:, :1] / ((W - 1.0) / 2.0), ys + flow[:, 1:2] / ((H - 1.0) / 2.0)], 1)
    return F.grid_sample(img, grid.permute(0, 2, 3, 1), mode="bilinear", padding_mode="border", align_corners=True)


def conv_prelu(cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad), nn.PReLU(cout))


class Bottleneck(nn.Module):
    """RAFT's small-encoder block: 1x1 (planes / 4), 3x3 (stride), 1x1 (planes), instance norm and ReLU after each;
    a strided 1x1 shortcut (`downsample`, its norm also named norm4) when stride > 1. AMT-S uses instance norm only."""

    def __init__(self, cin: int, planes: int, norm: str = "instance", stride: int = 1):
        super().__init__()
        assert norm == "instance"
        q = planes // 4
        self.conv1, self.conv2 = nn.Conv2d(cin, q, 1), nn.Conv2d(q, q, 3, padding=1, stride=stride)
        self.conv3 = nn.Conv2d(q, planes, 1)
        self.norm1, self.norm2, self.norm3 = nn.InstanceNorm2d(q), nn.InstanceNorm2d(q), nn.InstanceNorm2d(planes)
        self.downsample = None
        if stride != 1:
            self.norm4 = nn.InstanceNorm2d(planes)
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride), self.norm4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = F.relu(self.norm3(self.conv3(y)))
        return F.relu((x if self.downsample is None else self.downsample(x)) + y)


class ResBlock(nn.Module):
    """Three 3x3 convolutions over all channels, the last `side` channels passing through an extra 3x3 between
    them; PReLU throughout, a residual connection."""

    def __init__(self, ch: int, side: int):
        super().__init__()
        self.side = side
        self.conv1, self.conv3 = conv_prelu(ch, ch), conv_prelu(ch, ch)
        self.conv2, self.conv4 = conv_prelu(side, side), conv_prelu(side, side)
        self.conv5, self.prelu = nn.Conv2d(ch, ch, 3, 1, 1), nn.PReLU(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.side
        out = self.conv1(x)
        out = self.conv3(torch.cat([out[:, :-s], self.conv2(out[:, -s:])], 1))
        out = self.conv5(torch.cat([out[:, :-s], self.conv4(out[:, -s:])], 1))
        return self.prelu(x + out)


class Pyramid(nn.Module):
    def __init__(self, channels=(20, 32, 44, 56)):
        super().__init__()
        prev = 3
        for i, ch in enumerate(channels, 1):
            self.register_module(f"pyramid{i}", nn.Sequential(conv_prelu(prev, ch, 3, 2, 1), conv_prelu(ch, ch)))
            prev = ch
        self.levels = len(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i in range(1, self.levels + 1):
            x = getattr(self, f"pyramid{i}")(x)
            out.append(x)
        return out


class Decoder(nn.Module):
    """One decoder level: (the first) both images' coarsest features and t, or (later) the middle feature, both
    images' features warped by the current flows and the flows -> a 2x upsampled output split as
    [flow0 (2 n), flow1 (2 n), rest]; later levels add twice the upsampled input flows."""

    def __init__(self, cin: int, ch: int, cout: int, skip: int):
        super().__init__()
        self.convblock = nn.Sequential(conv_prelu(cin, ch), ResBlock(ch, skip), nn.ConvTranspose2d(ch, cout, 4, 2, 1))


class UpdateBlock(nn.Module):
    """AMT's small update block: correlation (both directions, 2 x 4 x 49 channels) and the two flows -> a residual
    for the middle feature and for the flows, computed at 1/8 resolution (`scale`: how far the level is above it)."""

    def __init__(self, cdim: int, scale: int | None = None, hidden: int = 76, flow_dim: int = 20, corr_dim: int = 64,
                 fc_dim: int = 68):
        super().__init__()
        self.scale = scale
        self.convc1 = nn.Conv2d(2 * LEVELS * (2 * RADIUS + 1) ** 2, corr_dim, 1)
        self.convf1 = nn.Conv2d(4, flow_dim * 2, 7, padding=3)
        self.convf2 = nn.Conv2d(flow_dim * 2, flow_dim, 3, padding=1)
        self.conv = nn.Conv2d(corr_dim + flow_dim, fc_dim, 3, padding=1)

        def pair(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(hidden, cout, 3,
                                                                                                 padding=1))
        self.gru, self.feat_head, self.flow_head = pair(fc_dim + 4 + cdim, hidden), pair(hidden, cdim), pair(hidden, 4)

    def forward(self, feat, flow, corr):
        if self.scale is not None:
            feat = resize(feat, 1 / self.scale)
        c = F.leaky_relu(self.convc1(corr), 0.1)
        f = F.leaky_relu(self.convf2(F.leaky_relu(self.convf1(flow), 0.1)), 0.1)
        x = torch.cat([F.leaky_relu(self.conv(torch.cat([c, f], 1)), 0.1), flow, feat], 1)
        out = self.gru(x)
        d_feat, d_flow = self.feat_head(out), self.flow_head(out)
        if self.scale is not None:
            d_feat, d_flow = resize(d_feat, self.scale), self.scale * resize(d_flow, self.scale)
        return d_feat, d_flow


def bidirectional_lookup(levels, levels_t, coords0, coords1) -> torch.Tensor:
    """Correlation windows (radius 3, 4 levels) around coords0 in the 0->1 volume and around coords1 in the 1->0
    volume, concatenated: [B, 2 * 4 * 49, h, w]. Window order as RAFT's (index (i, j) at x + d_i, y + d_j)."""
    B, _, h, w = coords0.shape
    d = torch.linspace(-RADIUS, RADIUS, 2 * RADIUS + 1, device=coords0.device)
    offset = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1)[None]
    out = []
    for pyramid, coords in ((levels, coords0), (levels_t, coords1)):
        centre = coords.permute(0, 2, 3, 1).reshape(B * h * w, 1, 1, 2)
        for lvl, corr in enumerate(pyramid):
            xy = centre / 2 ** lvl + offset
            H, W = corr.shape[-2:]
            grid = torch.stack([2 * xy[..., 0] / (W - 1) - 1, 2 * xy[..., 1] / (H - 1) - 1], -1)
            out.append(F.grid_sample(corr, grid, align_corners=True).reshape(B, h, w, -1))
    return torch.cat(out, -1).permute(0, 3, 1, 2).float()


class AMTS(nn.Module):
    def __init__(self, channels=(20, 32, 44, 56), skip: int = 20):
        super().__init__()
        c = channels
        self.feat_encoder = BasicEncoder(84, "instance", (32, 64, 96), Bottleneck)  # RAFT's "small" encoder
        self.encoder = Pyramid(c)
        self.decoder4 = Decoder(2 * c[3] + 1, 2 * c[3], c[2] + 4, skip)
        self.decoder3 = Decoder(3 * c[2] + 4, 3 * c[2], c[1] + 4, skip)
        self.decoder2 = Decoder(3 * c[1] + 4, 3 * c[1], c[0] + 4, skip)
        self.decoder1 = Decoder(3 * c[0] + 4, 3 * c[0], 8 * FLOWS, skip)
        self.update4, self.update3, self.update2 = UpdateBlock(c[2]), UpdateBlock(c[1], 2), UpdateBlock(c[0], 4)
        self.comb_block = nn.Sequential(nn.Conv2d(3 * FLOWS, 6 * FLOWS, 3, 1, 1), nn.PReLU(6 * FLOWS),
                                        nn.Conv2d(6 * FLOWS, 3, 3, 1, 1))

    @torch.no_grad()
    def forward(self, img0: torch.Tensor, img1: torch.Tensor, t: float = 0.5) -> torch.Tensor:
        """The frame at time t between img0 and img1 ([B, 3, H, W] in 0..1, H and W multiples of 16), in 0..1."""
        mean = torch.cat([img0, img1], 2).mean((1, 2, 3), keepdim=True)
        img0, img1 = img0 - mean, img1 - mean
        B, _, H, W = img0.shape
        ys, xs = torch.meshgrid(torch.arange(H // 8, device=img0.device), torch.arange(W // 8, device=img0.device),
                                indexing="ij")
        coord = torch.stack([xs, ys]).float()[None].repeat(B, 1, 1, 1)
        f0, f1 = self.feat_encoder(torch.cat([img0, img1])).chunk(2)
        levels = correlation_pyramid(f0, f1)                                   # around the match in image 1
        levels_t = correlation_pyramid(f1, f0)                                 # and the reverse volume
        p0, p1 = self.encoder(img0), self.encoder(img1)

        out = self.decoder4.convblock(torch.cat([p0[3], p1[3], torch.full_like(p0[3][:, :1], t)], 1))
        flow0, flow1, feat = out[:, :2], out[:, 2:4], out[:, 4:]
        for level, (update, down) in enumerate(((self.update4, 1), (self.update3, 2), (self.update2, 4))):
            if level > 0:  # decoders 3 and 2: warp the next level's features by the flows, upsample
                decoder = (self.decoder3, self.decoder2)[level - 1]
                g0, g1 = p0[3 - level], p1[3 - level]
                out = decoder.convblock(torch.cat([feat, warp(g0, flow0), warp(g1, flow1), flow0, flow1], 1))
                flow0, flow1 = out[:, :2] + 2 * resize(flow0, 2.0), out[:, 2:4] + 2 * resize(flow1, 2.0)
                feat = out[:, 4:]
            s0, s1 = (flow0, flow1) if down == 1 else (resize(flow0, 1 / down) / down, resize(flow1, 1 / down) / down)
            corr = bidirectional_lookup(levels, levels_t, coord + s1 / t, coord + s0 / (1 - t))
            d_feat, d_flow = update(feat, torch.cat([s0, s1], 1), corr)
            flow0, flow1, feat = flow0 + d_flow[:, :2], flow1 + d_flow[:, 2:], feat + d_feat

        out = self.decoder1.convblock(torch.cat([feat, warp(p0[0], flow0), warp(p1[0], flow1), flow0, flow1], 1))
        n = FLOWS
        d0, d1, mask, res = torch.split(out, [2 * n, 2 * n, n, 3 * n], 1)
        flow0 = (d0 + 2 * resize(flow0, 2.0).repeat(1, n, 1, 1)).reshape(B * n, 2, H, W)
        flow1 = (d1 + 2 * resize(flow1, 2.0).repeat(1, n, 1, 1)).reshape(B * n, 2, H, W)
        mask = torch.sigmoid(mask).reshape(B * n, 1, H, W)
        rep = lambda x: x.repeat_interleave(n, 0)  # noqa: E731 (each image once per flow pair)
        cand = mask * warp(rep(img0), flow0) + (1 - mask) * warp(rep(img1), flow1) + rep(mean) \
            + res.reshape(B * n, 3, H, W)
        cand = cand.reshape(B, n, 3, H, W)
        return (cand.mean(1) + self.comb_block(cand.reshape(B, n * 3, H, W))).clamp(0, 1)


def load_amt(path: str, device, flag: str = "--amt") -> AMTS:
    """AMT-S with the weights of amt-s.pth (its `state_dict` entry, or a bare state dict); ValueError naming the
    flag when the file is missing, unreadable or not AMT-S weights."""
    sd = read_state_dict(path, flag)
    sd = sd["state_dict"] if isinstance(sd.get("state_dict"), dict) else sd
    model = AMTS()
    try:
        model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    except RuntimeError as e:
        raise ValueError(f"{flag} {path}: not AMT-S weights ({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval()
