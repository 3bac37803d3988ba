"""The memory planner (dfd_video/planning/memory.py, `plan`): its exact parts equal the bytes FSDP2 + AdamW hold after a real
step, full weights and LoRA (fake score on the teacher's base, the EMA of the adapter), at one rank and, from the
shapes, at three; the subcommand's report, tables and refusals; the activation model of Wan and Cosmos against
saved_tensors_hooks on their bench models at one clip size (bench/bench_memory_plan.py checks three)."""
import math

import pytest
import torch

import dfd_video.distributed
import dfd_video.lora as lora
import dfd_video.planning.memory as memory
import tiny_wan
import wan_dfd

torch.set_num_threads(1)


def one_step(nets_and_opts, x, cond):
    """A backward and an AdamW step through each trained network; the gradients stay (as at an optimizer step)."""
    for net, opt in nets_and_opts:
        out = net(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=cond, return_dict=False)[0]
        out.float().square().mean().backward()
        opt.step()


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
@pytest.mark.parametrize("rank", [0, 4])
def test_exact_parts_equal_what_fsdp2_and_adamw_hold(rank):
    adapter = wan_dfd.WanAdapter()
    base = tiny_wan.tiny_transformer()
    sizes = memory.network_sizes(adapter, base)
    lshapes = memory.lora_shapes(sizes, rank) if rank else ()
    est = memory.training_state(sizes["shapes"], 1, ema=True, lora_shapes=lshapes, shared_fake=True)
    x, cond = torch.randn(1, 16, 1, 2, 2), torch.randn(1, 4, 32)
    d = dfd_video.distributed.setup_distributed("cpu")
    try:
        adamw = lambda net: torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-4)
        if rank:  # as dfd_video.lora.build_networks: the fake score's adapter on the teacher's base
            info = {"rank": rank, "alpha": float(rank), "targets": adapter.lora_targets}
            teacher = lora.shard_lora(lora.attach(tiny_wan.tiny_transformer(1), info, 1), adapter, d, None, False)
            student = lora.shard_lora(lora.attach(tiny_wan.tiny_transformer(2), info, 0), adapter, d, None, False)
            opt_s, opt_f = adamw(student), adamw(teacher)
            one_step([(student, opt_s), (teacher, opt_f)], x, cond)
            ema = lora.LoraEMA(student)
            measured = dfd_video.distributed.train_state_bytes(student, teacher, opt_s, opt_f)
            ema_bytes = sum(s.to_local().numel() * 4 for s in ema.shadow.values())
            assert sum(math.prod(s) for s in lshapes) == sum(q.numel() for n, q in student.named_parameters()
                                                            if lora.is_lora_param(n))
        else:
            teacher, student, fake, ema_net = (tiny_wan.tiny_transformer(s) for s in range(4))
            for net, trainable in ((teacher, False), (student, True), (fake, True), (ema_net, False)):
                dfd_video.distributed.shard(net, list(net.blocks), d, trainable=trainable)
            opt_s, opt_f = adamw(student), adamw(fake)
            one_step([(student, opt_s), (fake, opt_f)], x, cond)
            measured = (dfd_video.distributed.train_state_bytes(student, opt_s, fake, opt_f)
                        + dfd_video.distributed.train_state_bytes(teacher))
            ema_bytes = dfd_video.distributed.train_state_bytes(ema_net)
    finally:
        dfd_video.distributed.teardown_distributed()
    assert measured == sum(sum(v.values()) for k, v in est.items() if k != "ema")
    assert ema_bytes == est["ema"]["params"]
    if rank:  # the frozen bases carry no gradient and no AdamW state; only the adapters train
        n, a = sum(math.prod(s) for s in sizes["shapes"]), sum(math.prod(s) for s in lshapes)
        assert est["student"] == {"params": 4 * (n + a), "grads": 4 * a, "optimizer": 8 * a + 4 * len(lshapes)}
        assert est["fake_score"]["params"] == 4 * a and est["teacher"]["params"] == 4 * n
        own = memory.training_state(sizes["shapes"], 1, lora_shapes=lshapes, shared_fake=False)
        assert own["fake_score"]["params"] == 4 * (n + a)  # on the critic: a base of its own


def test_sharding_pads_each_tensor_and_lora_splits_its_rank():
    """At 3 ranks every tensor's dim 0 is split with padding: lora_A [r, in] splits r, lora_B [out, r] splits out."""
    sizes = memory.network_sizes(wan_dfd.WanAdapter(), tiny_wan.tiny_transformer())
    lshapes = memory.lora_shapes(sizes, 4)
    three = memory.training_state(sizes["shapes"], 3, lora_shapes=lshapes)
    per_rank = lambda shapes: sum(-(-s[0] // 3) * math.prod(s[1:]) for s in shapes)
    assert three["student"]["grads"] == 4 * per_rank(lshapes)
    assert three["teacher"]["params"] == 4 * per_rank(sizes["shapes"])
    (i0, o0) = sizes["lora_targets"][0]
    assert lshapes[:2] == [(4, i0), (o0, 4)]
    assert len(lshapes) == 2 * 10 * sizes["n_blocks"]  # 10 target linears per Wan block


def test_plan_report_and_real_wan_numbers(capsys):
    """Wan2.1-T2V-1.3B from the public config: 1,419 M parameters, 1,367,040 x r adapter parameters (docs/lora.md),
    the exact rows of one GPU, and the activations growing with the clip and shrinking with checkpointing."""
    full = wan_dfd.main(["plan", "--world-size", "1"])
    out = capsys.readouterr().out
    assert "1.419 B parameters per network" in out and "largest batch per GPU that fits" in out
    sizes = memory.network_sizes(wan_dfd.WanAdapter(), memory.meta_network(memory.read_config(wan_dfd.WanAdapter(), None)[0]))
    n = sum(math.prod(s) for s in sizes["shapes"])
    assert full["parts"]["gradients"] == 8 * n and full["parts"]["teacher"] == 4 * n
    r16 = wan_dfd.main(["plan", "--lora-rank", "16"])
    assert r16["adapter_params"] == 16 * 1367040 and r16["parts"]["gradients"] == 8 * 16 * 1367040
    assert r16["parts"]["teacher"] == 4 * n and r16["parts"]["parameters"] == 4 * (n + 2 * 16 * 1367040)
    nockpt = wan_dfd.main(["plan", "--no-checkpointing"])
    assert nockpt["activations"] > 10 * full["activations"]
    short = wan_dfd.main(["plan", "--num-frames", "17", "--batch-per-gpu", "2"])
    assert short["activation_detail"]["tokens"] == 5 * 30 * 52 and short["activations"] == 2 * short["activation_detail"]["per_clip"]
    eight = wan_dfd.main(["plan", "--world-size", "8"])
    assert eight["parts"]["optimizer"] < full["parts"]["optimizer"] / 7.9
    assert memory.largest_batch(full, 80 * memory.GiB, 6 * memory.GiB) == int(
        (74 * memory.GiB - full["fixed"]) // full["per_clip"])


def test_plan_table_states_the_goals(capsys):
    wan_dfd.main(["plan", "--table"])
    out = capsys.readouterr().out
    assert "| LoRA r = 64 | 8 |" in out and "Smallest configuration that fits" in out
    assert "goal, LoRA on one 48 GiB GPU at batch >= 1: met" in out
    assert "goal, full weights on one 80 GiB GPU at batch >= 1: met" in out


def test_plan_refusals_are_one_line(tmp_path):
    for argv, msg in ((["--world-size", "0"], "error: --world-size 0: must be >= 1"),
                      (["--batch-per-gpu", "0"], "error: --batch-per-gpu 0: must be >= 1"),
                      (["--lora-rank", "4096"], "error: --lora-rank 4096: larger than the smallest target layer (1536)"),
                      (["--num-frames", "80"], "error: --num-frames 80: must be 4k + 1"),
                      (["--gpu-gb", "4", "--reserve-gb", "6"], "error: --gpu-gb 4 / --reserve-gb 6: need 0 <= reserve < GPU"),
                      (["--model-dir", str(tmp_path)], f"error: --model-dir {tmp_path}: no transformer/config.json")):
        with pytest.raises(SystemExit) as e:
            wan_dfd.main(["plan", *argv])
        assert str(e.value.code).startswith(msg), (argv, e.value.code)


def test_plan_reads_a_model_dir(tmp_path, capsys):
    """--model-dir: the architecture of the folder's config (here the tiny pipeline's 2-layer transformer)."""
    pipe = tiny_wan.build_pipeline(str(tmp_path / "pipe"))
    p = wan_dfd.main(["plan", "--model-dir", pipe, "--num-frames", "5", "--height", "32", "--width", "48"])
    n = sum(q.numel() for q in tiny_wan.tiny_transformer().parameters())
    assert p["parts"]["teacher"] == 4 * n and f"--model-dir {pipe}" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
@pytest.mark.parametrize("model, dtype", [("wan", "bf16"), ("cosmos", "bf16"),
                                          pytest.param("cosmos", "fp32", marks=pytest.mark.slow)])
def test_activation_model_within_10_percent_of_what_autograd_saves(model, dtype):
    """The counted activations (the tables of dfd_video/planning/tables.py; Cosmos's fp32 tables too) against
    saved_tensors_hooks during one student step and one fake-score step on the bench model, full weights and LoRA,
    with and without checkpointing (bench/bench_memory_plan.py; a change in diffusers' block or torch's kernels shows
    up here). Cosmos's fp32 table (the bf16 one less the RMSNorms' fp32 copies) runs under -m slow."""
    import argparse
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_memory_plan
    args = argparse.Namespace(batch=1, worker=None, model=model)
    for rank in (0, 8):
        runs = {ckpt: bench_memory_plan.run_case(args, (3, 16, 16), ckpt, rank, dtype) for ckpt in (False, True)}
        for ckpt, res in runs.items():
            assert res["plan"]["state"] == res["measured"]["state"]
            recompute = runs[False]["measured"]["block_own"] if ckpt else 0
            for step in ("student_step", "fake_step"):
                ratio = res["plan"]["activations"] / (res["measured"][step] + recompute)
                assert 0.9 < ratio < 1.1, (rank, ckpt, step, ratio)
