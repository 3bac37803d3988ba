"""The larger public configs (dfd_video/configs/: Wan2.1-T2V-14B, Wan2.2-TI2V-5B, Cosmos-Predict2.5-14B): FastGen's
recipe for each architecture (its 14B / 5B DMD2 configs), the discriminator widths of fastgen/configs/
discriminator.py, `plan --config` tables from 1 to 64 GPUs with the GAN head counted exactly; and (slow) one block
of each at real width through the GAN head.

    python -m pytest -m slow tests/test_larger_models.py -s   # ~2.5 min on 2 cores, peak 12.6 GB: run it once
"""
import json
import math
import os

import pytest
import torch

import cosmos_dfd
import wan_dfd
from dfd_video import gan
from dfd_video.planning import memory
from test_gan import fastgen_keys

torch.set_num_threads(1)
WAN, COSMOS = wan_dfd.WanAdapter(), cosmos_dfd.CosmosAdapter()
# config -> (spec, FastGen config, its student times, discriminator type, feature blocks, inner_dim of
# fastgen/configs/discriminator.py: Wan D / 4, Cosmos D)
CASES = {"wan2.1-t2v-1.3b": (WAN, "WanT2V/config_dmd2.py", 4, "multiscale_down_mlp_large", (15, 22, 29), 1536 // 4),
         "wan2.1-t2v-14b": (WAN, "WanT2V/config_dmd2_14b.py", 2, "multiscale_down_mlp_large", (21, 30, 39), 5120 // 4),
         "wan2.2-ti2v-5b": (WAN, "WanT2V/config_dmd2_wan22_5b.py", 2, "multiscale_down_mlp_large", (15, 22, 29),
                            3072 // 4),
         "cosmos-predict2.5-2b": (COSMOS, "CosmosPredict2/config_dmd2_v2w.py", 4, "multiscale_down_mlp_large",
                                  (13, 20, 27), 2048),
         "cosmos-predict2.5-14b": (COSMOS, "CosmosPredict2/config_dmd2_14b.py", 4, "dit_simple_conv3d", (18,), 5120)}


@pytest.mark.parametrize("name", CASES)
def test_recipe_of_each_public_config(name):
    spec, config, steps, disc_type, blocks, dim = CASES[name]
    net = memory.meta_network(memory.read_config(spec, None, name)[0])
    r = spec.fastgen_recipe(net)
    assert (r.config, len(r.student_ts), r.disc_type, r.blocks, r.lr) == (config, steps, disc_type, blocks, 1e-5)
    assert r.guidance == (5.0 if spec is WAN else 3.0) and spec.feature_dim(net) == dim
    assert max(blocks) < len(spec.blocks(net))


def test_plan_tables_for_the_larger_models(capsys):
    """Full weights and LoRA on 1..64 GPUs of 40..141 GiB; with --gan-weight the discriminator's fp32 weights,
    gradients and AdamW state are the exact 16 bytes per parameter (+ a step count per tensor)."""
    worlds, gpus = ["1", "2", "4", "8", "16", "32", "64"], ["40", "80", "141"]
    wan_dfd.main(["plan", "--config", "wan2.1-t2v-14b", "--table", "--worlds", *worlds, "--gpus-gb", *gpus])
    out = capsys.readouterr().out
    rows = [x for x in out.splitlines() if x.startswith(("| full weights |", "| LoRA r = "))]
    assert len(rows) == 3 * len(worlds) + 3 and "batch on 141 GiB" in out
    full_one = next(x for x in rows if x.startswith("| full weights | 1 |")).split("|")
    assert full_one[-2].strip() == full_one[-3].strip() == full_one[-4].strip() == "0"  # 14B, full, 1 GPU: no fit
    cosmos_dfd.main(["plan", "--config", "cosmos-predict2.5-14b", "--world-size", "16", "--gan-weight", "0.03"])
    out = capsys.readouterr().out
    assert "GAN discriminator (fp32 shards, gradients, AdamW)" in out
    cfg = memory.read_config(COSMOS, None, "cosmos-predict2.5-14b")[0]
    sizes = {**memory.network_sizes(COSMOS, memory.meta_network(cfg)), "config": cfg}
    g = memory.gan_sizes(COSMOS, memory.meta_network(cfg))
    shapes = list(fastgen_keys("dit_simple_conv3d", 1, 5120).values())
    assert sorted(g["shapes"]) == sorted(shapes)
    plan = memory.plan_model(COSMOS, sizes, world=16, gan=g)
    per_rank = sum(math.ceil(s[0] / 16) * math.prod(s[1:]) for s in shapes)
    assert plan["parts"]["discriminator"] == 16 * per_rank + 4 * len(shapes)
    wan_dfd.main(["plan", "--config", "wan2.2-ti2v-5b", "--height", "704", "--width", "1280"])
    assert "(18480 tokens)" in capsys.readouterr().out  # its own VAE: 48 x 21 x 44 x 80 latents, 2 x 2 patches


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wan2.1-t2v-14b", "wan2.2-ti2v-5b", "cosmos-predict2.5-14b"])
def test_one_block_at_real_width_through_the_gan_head(name):
    """One block of the public config at its real width (random init): the teacher's features (FastGen's layout and
    width) into FastGen's discriminator head for the architecture, and the generator's GAN loss back to the input.
    Heavy on CPU (a 14B block is ~2.3 GB in fp32): run once."""
    spec, _, _, disc_type, _, dim = CASES[name]
    cfg = memory.read_config(spec, None, name)[0]
    torch.manual_seed(0)
    net = getattr(__import__("diffusers"), cfg["_class_name"]).from_config(
        {**{k: v for k, v in cfg.items() if not k.startswith("_")}, "num_layers": 1}).eval().requires_grad_(False)
    channels = cfg.get("_latent", {}).get("channels", 16)
    x = torch.randn(1, channels, 16, 16, 16, requires_grad=True)  # the multiscale heads pool a 16-grid by 16
    t = torch.tensor([0.7])
    if spec is COSMOS:
        cosmos_dfd.ensure_padding_mask_resize()
        cond = cosmos_dfd.CosmosCond(torch.randn(1, 512, cfg["crossattn_proj_in_channels"]) / 100,
                                     torch.randn(1, 16, 1, 16, 16))
    else:
        cond = torch.randn(1, 512, cfg["text_dim"])
    features = gan.teacher_features(spec, net, spec.denoiser(net), [0], None)(x, t, cond)
    grid = (16, 8, 8) if spec is COSMOS else (16, 16, 16)
    assert features[0].shape == (1, dim, *grid)
    disc = gan.Discriminator(disc_type, [0], dim)
    loss = gan.gen_loss(disc(features))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    print(f"\n{name}: one block, features {tuple(features[0].shape)}, discriminator "
          f"{sum(q.numel() for q in disc.parameters()) / 1e6:.0f} M parameters, GAN loss {loss.item():.4f}")
