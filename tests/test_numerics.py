"""FSDP2 bf16 training runs the numerics diffusers runs on a bf16-loaded model (cast_keeping_fp32, what `sample`
uses): the same parameters in fp32 during the forward, the same input dtypes into every block (the RoPE tables
fp32), and so the same one-step DFD loss. docs/numerics.md; the before/after numbers: bench/bench_fp32_islands.py."""
import copy
import os
import sys

import pytest
import torch

import tiny_cosmos
import tiny_wan
from dfd_video.distributed import cast_keeping_fp32, fp32_islands, setup_distributed, shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_fp32_islands as bench  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")


def record_forward(net, run):
    """Runs `run()` and returns ({param name: dtype the forward saw}, [dtypes of each block call's tensor args])."""
    seen, calls, hooks = {}, [], []
    for prefix, m in net.named_modules():
        def pre(mod, args, prefix=prefix):
            for n, p in mod.named_parameters(recurse=False):
                seen[f"{prefix}.{n}" if prefix else n] = p.dtype
        hooks.append(m.register_forward_pre_hook(pre))
    blocks = net.blocks if hasattr(net, "blocks") else net.transformer_blocks
    for b in blocks:
        flat = lambda a: [x for y in a for x in (y if isinstance(y, (tuple, list)) else (y,))]
        hooks.append(b.register_forward_pre_hook(
            lambda mod, args: calls.append([x.dtype for x in flat(args) if torch.is_tensor(x)])))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen, calls


@pytest.mark.parametrize("model", ["wan", "cosmos"])
def test_fsdp2_forward_keeps_what_diffusers_keeps_in_fp32(model):
    d = setup_distributed("cpu")
    net = (tiny_wan if model == "wan" else tiny_cosmos).tiny_transformer(0)
    adapter, _ = bench.adapter_for(model)
    batch, _ = bench.data(model, net, "tiny", 0)
    x, cond = adapter.make_batch(batch, torch.device("cpu"))[:2]
    t = torch.tensor([0.7])
    ref = cast_keeping_fp32(copy.deepcopy(net), torch.bfloat16)
    sharded = copy.deepcopy(net)
    sharded = shard(sharded, adapter.blocks(sharded), d, torch.bfloat16, adapter.fp32_islands(sharded), False, False)
    want, want_calls = record_forward(ref, lambda: adapter.denoiser(ref, dtype=torch.bfloat16)(x, t, cond))
    got, got_calls = record_forward(sharded, lambda: adapter.denoiser(sharded, dtype=torch.bfloat16)(x, t, cond))
    assert set(want) == {n for n, _ in net.named_parameters()}  # every parameter took part
    assert got == want
    assert got_calls == want_calls  # e.g. Wan's RoPE tables reach every block in fp32
    kept = {n for n, p in ref.named_parameters() if p.dtype == torch.float32}
    islands = fp32_islands(net)
    names = {n for n, p in net.named_parameters() if any(p is q for m in islands.modules for q in m.parameters())}
    assert names | set(islands.params) == kept  # the islands are exactly cast_keeping_fp32's list
    if model == "wan":
        assert "blocks.0.scale_shift_table" in islands.params and "scale_shift_table" in islands.params
        assert "blocks.1.norm2.weight" in names and "condition_embedder.time_embedder.linear_2.bias" in names


@pytest.mark.parametrize("model", ["wan", "cosmos"])
def test_one_dfd_step_matches_diffusers_mixed_precision(model):
    """One student step (p = 1) and one fake-score step: FSDP2 bf16 gives diffusers' losses. Before the fp32
    islands the losses differed by 1e-4 .. 6e-4 relative (bench/bench_fp32_islands.py); the gradients now differ
    only where FSDP2 reorders bf16 sums (the text embedding's, read by every block)."""
    d = setup_distributed("cpu")
    nets = {"teacher": bench.build(model, "tiny", 0), "student": bench.build(model, "tiny", 1),
            "fake": bench.build(model, "tiny", 2)}
    batch, uncond = bench.data(model, nets["teacher"], "tiny", 0)
    ref = bench.one_step("diffusers", model, nets, batch, uncond, d)
    got = bench.one_step("fsdp_after", model, nets, batch, uncond, d)
    r = bench.compare(got, ref)
    assert r["loss_student"] < 1e-6 and r["loss_fake"] < 1e-6, r
    assert r["g_student_cos"] > 0.99999 and r["g_fake_cos"] > 0.99999, r
