"""Throughput in the log (dfd_video/throughput.py): the FLOP count of one forward against a hand count of the tiny
Wan (every linear, the patch convolution and both attentions, from its config) and against torch's own count of the
real forward (Wan and Cosmos); the passes per student step by hand for each flag that changes them; the GPU peak
table; and samples_per_s, tokens_per_s, tflops in a run's metrics.jsonl from those counts and its step times."""
import argparse

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tiny_cosmos
import tiny_tools
import tiny_wan
import cosmos_dfd
import dfd_video.cli
import wan_dfd
from dfd_video import throughput

SHAPE = (16, 3, 4, 6)  # tiny_wan.random_data's latents [C, T, H, W]


def hand_count_tiny_wan(shape=SHAPE) -> int:
    """One forward of WanTransformer3DModel(**tiny_wan.TRANSFORMER) on one clip: 2 n i o per linear of n tokens."""
    c = tiny_wan.TRANSFORMER
    pt, ph, pw = c["patch_size"]
    n = (shape[1] // pt) * (shape[2] // ph) * (shape[3] // pw)  # video tokens: 3 x 2 x 3 = 18
    d, text, L = c["num_attention_heads"] * c["attention_head_dim"], c["text_dim"], 512  # 24 wide, 512 text tokens
    lin = lambda tokens, i, o: 2 * tokens * i * o
    patch = lin(n, c["in_channels"] * pt * ph * pw, d)  # the Conv3d patch embedding, one dot product per output
    time = lin(1, c["freq_dim"], d) + lin(1, d, d) + lin(1, d, 6 * d)  # timestep MLP and its 6 modulations
    caption = lin(L, text, d) + lin(L, d, d)  # text embedder, on every text token
    block = (4 * lin(n, d, d)  # self-attention q, k, v, out
             + 2 * lin(n, d, d) + 2 * lin(L, d, d)  # cross-attention q, out (video) and k, v (text)
             + 2 * (2 * n * n * d)  # self-attention: Q K^T and A V
             + 2 * (2 * n * L * d)  # cross-attention: the same against the text
             + lin(n, d, c["ffn_dim"]) + lin(n, c["ffn_dim"], d))
    head = lin(n, d, c["out_channels"] * pt * ph * pw)
    return patch + time + caption + c["num_layers"] * block + head


def real_count(spec, net, shape=SHAPE) -> int:
    """torch's count of the real forward on CPU, attention through the math kernel (bmm, which it counts)."""
    items, _ = spec.check_items(net, shape, torch.Generator().manual_seed(0))
    cond = spec.make_cond({k: v[None] for k, v in items.items()}, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        spec.denoiser(net)(torch.randn(1, *shape), torch.full((1,), 0.5), cond)
    return counter.get_total_flops()


def test_forward_count_equals_the_hand_count_and_the_real_forward(tmp_path):
    wan = wan_dfd.WanAdapter()
    arch = wan.load_network(tiny_wan.cached_pipeline(), meta=True)
    assert hand_count_tiny_wan() == 6_046_848
    assert throughput.forward_flops(wan, arch, SHAPE) == hand_count_tiny_wan()
    assert real_count(wan, tiny_wan.tiny_transformer()) == hand_count_tiny_wan()
    assert wan.tokens(arch, SHAPE) == 18
    cosmos = cosmos_dfd.CosmosAdapter()
    cosmos_dfd.ensure_padding_mask_resize()  # what load_network does where torchvision is missing
    net = tiny_cosmos.tiny_transformer()
    with torch.device("meta"):
        meta = tiny_cosmos.tiny_transformer()
    shape = (16, 3, 4, 6)
    assert throughput.forward_flops(cosmos, meta, shape) == real_count(cosmos, net, shape) > 0


def args_of(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    dfd_video.cli.add_train_args(p, wan_dfd.WanAdapter())
    return p.parse_args(["--data", "d", "--model-dir", "m", *argv])


@pytest.mark.parametrize("argv,step,per_rank,forwards", [
    ((), 0, 1, 4 * (1 + 3) + (3 + 1 + 2) + 2),  # 4 fake updates, student update with CFG, teacher_gap (step % 10 == 0)
    ((), 1, 1, 4 * (1 + 3) + (3 + 1 + 2)),
    (("--guidance", "1.0", "--monitor-every", "0"), 0, 1, 4 * 4 + (3 + 1 + 1)),  # no CFG: one teacher forward
    (("--lora-rank", "4"), 1, 1, 4 * (1 + 2) + (2 + 1 + 2)),  # frozen weights: the backward is one forward's work
    (("--fake-updates", "1", "--grad-accum", "2"), 3, 1, 2 * (4 + 6)),
    (("--backward-sim",), 1, 2, 4 * (2.125 + 4) + (2.125 + 6)),  # + E[student forwards from noise] before each update
])
def test_forwards_per_step_by_hand(argv, step, per_rank, forwards):
    # backward-sim, 4 student times, 2 samples: E[k] = sum_{j=1..3} 1 - (j/4)^2 = (15 + 12 + 7) / 16, which is
    # E[max of two draws in 0..3] = sum_m m (2m + 1) / 16 = (3 + 10 + 21) / 16
    assert throughput.expected_simulation_forwards(4, 2) == pytest.approx(34 / 16)
    assert throughput.forwards_per_sample(args_of(*argv), step, per_rank) == pytest.approx(forwards)


def test_peak_table_and_flag(monkeypatch):
    gpu, bf16 = torch.device("cuda", 0), torch.bfloat16
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                       ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA B200", 2250.0),
                       ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert throughput.peak_tflops(None, gpu, bf16) == peak, name
    assert throughput.peak_tflops(None, gpu, None) is None  # fp32 compute: the table is bf16's
    assert throughput.peak_tflops(None, torch.device("cpu"), bf16) is None
    assert throughput.peak_tflops(123.0, torch.device("cpu"), None) == 123.0
    t = throughput.Throughput(args_of("--fake-updates", "1"), per_rank=2, world=4, forward=10**12, tokens=100, peak=50.0)
    got = t(1, 2.0)  # student step 1, 2 s: per sample 1 fake update (4 forwards) + the student update (6)
    assert got["samples_per_s"] == 2 * 2 * 4 / 2.0 and got["tokens_per_s"] == 100 * got["samples_per_s"]
    assert got["tflops"] == pytest.approx((4 + 6) * 2 * 1.0 / 2.0) and got["mfu_pct"] == pytest.approx(100 * 10 / 50)


def test_the_run_logs_throughput_from_the_counts():
    s = tiny_tools.tiny_run()
    import json
    import os
    args = args_of(*tiny_tools.train_argv(s, s["run"])[1:])
    rows = [json.loads(x) for x in open(os.path.join(s["run"], "metrics.jsonl"))]
    for r in rows:
        clips = 2 * 2  # (1 fake update + 1 student update) x batch 2 on one rank
        assert r["samples_per_s"] == pytest.approx(clips / r["step_time_s"], rel=1e-9)
        assert r["tokens_per_s"] == pytest.approx(18 * r["samples_per_s"], rel=1e-9)
        flops = throughput.forwards_per_sample(args, r["step"], 2) * 2 * hand_count_tiny_wan()
        assert r["tflops"] == pytest.approx(flops / r["step_time_s"] / 1e12, rel=1e-9)
        assert "mfu_pct" not in r  # CPU: no peak
    assert rows[0]["tflops"] / rows[0]["samples_per_s"] > rows[1]["tflops"] / rows[1]["samples_per_s"]  # teacher_gap
