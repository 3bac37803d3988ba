"""LoRA post-training (--lora-rank, dfd_video/lora.py) on the tiny random Wan, and export --lora:
the networks (two bases in memory, only adapters trainable, the teacher blind to the fake score's adapter),
resume bit-identical at 1 rank (bf16, grad accumulation, EMA), 2 ranks on gloo equal to a single-process
emulation (and, slow, resuming bit-identically), the LoRA file WanPipeline.load_lora_weights reads reproducing the merged
student, Cosmos's export format, and every bad input's one line."""
import argparse
import functools
import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny_wan
import dfd_video.cli
import dfd_video.data
import dfd_video.lora as lora
import wan_dfd

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "wan_dfd.py")
LR = 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tiny_wan.random_data(root / "data")
    # the .safetensors holds the generator alone: the fake score starts from the teacher and shares its network
    dmd2 = tiny_wan.write_dmd2_checkpoints(str(root / "dmd2"), tiny_wan.tiny_transformer(5), tiny_wan.tiny_transformer(6))
    return {"root": root, "pipe": tiny_wan.cached_pipeline(), "data": str(root / "data"), "dmd2": dmd2}


def train_argv(s, out, *more):
    return ["train", "--model-dir", s["pipe"], "--data", s["data"], "--dmd2-ckpt", s["dmd2"]["safetensors"],
            "--out", out, "--batch-size", "2", "--fake-updates", "1", "--lr", str(LR), "--lr-fake", str(LR),
            "--monitor-every", "0", "--device", "cpu", "--lora-rank", "4", "--lora-alpha", "8", *more]


run = functools.partial(tiny_wan.run_script, timeout=900)


def parse(argv):
    p = argparse.ArgumentParser()
    dfd_video.cli.add_train_args(p, wan_dfd.WanAdapter())
    return p.parse_args(argv[1:])


def main_error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        wan_dfd.main(argv)
    return str(e.value.code)


def test_two_bases_in_memory_and_only_adapters_train(setup, tmp_path):
    """build_networks at a world of one: the fake score is the teacher's network; the teacher's calls bypass the
    adapter (exactly the base model, whatever the adapter holds), the fake score's do not; the student starts as
    the DMD2 generator exactly (lora_B = 0); only lora_A / lora_B are trainable. The EMA holds adapter weights
    only; calling it computes with them and leaves the student's own untouched."""
    from dfd_video.distributed import setup_distributed, teardown_distributed
    adapter = wan_dfd.WanAdapter()
    args = parse(train_argv(setup, str(tmp_path / "r"), "--ema", "0.9"))
    d = setup_distributed("cpu")
    try:
        nets = lora.build_networks(adapter, args, None, d, None, True)
        assert nets.fake is nets.teacher and nets.ema.shadow.keys() == {
            n for n, _ in nets.student.named_parameters() if lora.is_lora_param(n)}
        assert nets.info["fake_base"] == "teacher" and nets.info["rank"] == 4 and nets.info["alpha"] == 8.0
        for net in (nets.student, nets.teacher):
            trainable = [n for n, q in net.named_parameters() if q.requires_grad]
            assert trainable and all(lora.is_lora_param(n) for n in trainable)
            assert len(trainable) == 2 * 2 * 10  # lora_A, lora_B x 2 blocks x (8 attention + 2 FFN linears)
        ref_teacher, ref_student = adapter.load_network(setup["pipe"]), tiny_wan.tiny_transformer(5)
        x, t = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0.7])
        c = torch.randn(1, 512, 32, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            for n, q in nets.teacher.named_parameters():
                if ".lora_B." in n:
                    q.normal_()  # a fake score that has learnt something
            teacher = nets.teacher_denoiser(adapter.denoiser(nets.teacher, None, None))
            fake, student = adapter.denoiser(nets.fake, None, None), adapter.denoiser(nets.student, None, None)
            base = adapter.denoiser(ref_teacher, None, None)(x, t, c)
            assert torch.equal(teacher(x, t, c), base)
            assert (fake(x, t, c) - base).abs().max() > 1e-2
            assert torch.equal(teacher(x, t, c), base)  # switched back on for the fake score, off again now
            torch.testing.assert_close(student(x, t, c), adapter.denoiser(ref_student, None, None)(x, t, c),
                                       atol=1e-6, rtol=0)
        assert all(q.requires_grad for n, q in nets.teacher.named_parameters() if lora.is_lora_param(n))
        with torch.no_grad():  # the EMA: its values stand in for the student's adapter for one call
            for v in nets.ema.shadow.values():
                v.normal_()
            live = {n: q.detach().clone() for n, q in nets.ema.live.items()}
            plain = student(x, t, c)
            got = adapter.denoiser(nets.ema, None, None)(x, t, c)
            assert all(torch.equal(q, live[n]) for n, q in nets.ema.live.items())
            for n, q in nets.ema.live.items():
                q.copy_(nets.ema.shadow[n])
            assert torch.equal(got, student(x, t, c)) and (got - plain).abs().max() > 1e-2
    finally:
        teardown_distributed()


def test_resume_export_and_pipeline_lora(setup):
    """1 rank, bf16 compute, --grad-accum 2, EMA: a run stopped after its first checkpoint and resumed ends with
    the same adapter weights, EMA and Adam state, bit for bit, as an unbroken run (in one process; a SIGKILLed
    process resuming: tests/test_wan_cli.py, slow). Checkpoints hold only adapter
    weights; the EMA is the lerp of the adapter. export --lora: WanPipeline with the DMD2 student and
    load_lora_weights(<out>/lora) gives the latents of the exported merged student (alpha != rank: the scale
    travels in the file's metadata)."""
    s, root = setup, setup["root"]
    more = ["--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--save-every", "1", "--keep", "9", "--ema", "0.9",
            "--dtype", "bf16"]
    run_a, run_b = str(root / "run_a"), str(root / "run_b")
    wan_dfd.main(train_argv(s, run_a, *more))
    wan_dfd.main([*train_argv(s, run_b, *more), "--steps", "1"])  # stops after its first checkpoint
    assert not os.path.exists(os.path.join(run_b, "checkpoints", "step-000003"))
    wan_dfd.main([*train_argv(s, run_b, *more), "--resume"])
    assert [json.loads(x)["step"] for x in open(os.path.join(run_b, "metrics.jsonl"))] == [0, 1, 2, 3]
    a, b = (os.path.join(r, "checkpoints", "step-000003") for r in (run_a, run_b))
    for name in ("student", "fake", "ema"):
        wa, wb = load_file(f"{a}/{name}.safetensors"), load_file(f"{b}/{name}.safetensors")
        assert len(wa) == 40 and all(lora.is_lora_param(k) for k in wa), name  # the adapter alone
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    st_a, st_b = (torch.load(f"{x}/state.pt", weights_only=False) for x in (a, b))
    assert st_a["lora"] == st_b["lora"] and st_a["lora"]["fake_base"] == "teacher"
    for name in ("student", "fake"):
        assert st_a["optim"][name]["state"].keys() == load_file(f"{a}/{name}.safetensors").keys()
        for k, v in st_a["optim"][name]["state"].items():
            assert torch.equal(v["exp_avg_sq"], st_b["optim"][name]["state"][k]["exp_avg_sq"])
    # the EMA of the adapter: ema_3 = lerp(ema_2, student_3, 1 - 0.9); lora_B moved away from its zero init
    prev = os.path.join(run_a, "checkpoints", "step-000002")
    e2, e3, s3 = load_file(f"{prev}/ema.safetensors"), load_file(f"{a}/ema.safetensors"), load_file(f"{a}/student.safetensors")
    assert all(torch.equal(e3[k], e2[k].lerp(s3[k], 1 - 0.9)) for k in e3)
    assert min(s3[k].abs().max().item() for k in s3 if ".lora_B." in k) > 0.1 * LR
    # resuming on other DMD2 weights than the adapter was trained on is refused (the checksum in state.pt)
    other = str(root / "other.safetensors")
    from safetensors.torch import save_file
    save_file(tiny_wan.tiny_transformer(7).state_dict(), other)
    got = main_error([*train_argv(s, run_a, *more), "--resume", "--dmd2-ckpt", other])
    assert "other.safetensors: not the DMD2 weights this LoRA was trained on (checksum" in got and "\n" not in got
    got = main_error(["export", "--model-dir", s["pipe"], "--ckpt", run_a, "--out", str(root / "x"), "--lora-base", other])
    assert "other.safetensors: not the DMD2 weights this LoRA was trained on (checksum" in got and "\n" not in got
    # export --lora: the LoRA file and the merged folder
    exp = str(root / "export")
    wan_dfd.main(["export", "--model-dir", s["pipe"], "--ckpt", run_a, "--out", exp, "--lora"])
    assert sorted(os.listdir(os.path.join(exp, "lora"))) == ["README.md", lora.LORA_FILE]  # README: the model card
    from diffusers import WanPipeline, WanTransformer3DModel
    merged = WanTransformer3DModel.from_pretrained(exp)
    kw = dict(prompt="a red ball rolls left", height=32, width=48, num_frames=9, num_inference_steps=2,
              guidance_scale=1.0, output_type="latent")
    noise = torch.randn((1, 16, 3, 4, 6), generator=torch.Generator().manual_seed(3))
    out = {}
    for which, net in (("merged", merged), ("lora", tiny_wan.tiny_transformer(5)), ("base", tiny_wan.tiny_transformer(5))):
        pipe = WanPipeline.from_pretrained(s["pipe"], transformer=net)
        pipe.set_progress_bar_config(disable=True)
        if which == "lora":
            pipe.load_lora_weights(os.path.join(exp, "lora"))
        out[which] = pipe(**kw, latents=noise.clone()).frames
    gap = (out["merged"] - out["base"]).abs().max().item()
    assert gap > 1e-3  # the adapter matters ...
    torch.testing.assert_close(out["lora"], out["merged"], atol=1e-5, rtol=1e-5)  # ... and loads as it was trained
    # `sample` reads the LoRA checkpoint too (its merged EMA student)
    emb = str(root / "emb.safetensors")
    save_file({"text": torch.randn(1, 512, 32, generator=torch.Generator().manual_seed(4))}, emb)
    wan_dfd.main(["sample", "--model-dir", s["pipe"], "--ckpt", run_a, "--embeddings", emb, "--seeds", "0", "--out",
                  str(root / "samples"), "--num-frames", "9", "--height", "32", "--width", "48", "--device", "cpu"])
    assert os.path.exists(root / "samples" / "prompt000_seed0.mp4")


def two_rank_run(setup, tmp_path):
    """torchrun --nproc_per_node=2 (gloo, FSDP2 units of frozen base + adapter): the adapters equal
    tiny_wan.emulate_ranks with the same adapters (whose fake score is a network of its own, not the teacher's).
    Probes sample with the EMA (its values swapped into the student's adapter and back) without moving the weights."""
    s = setup
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    argv = train_argv(s, str(tmp_path / "one"), "--steps", "2", "--fake-updates", "2", "--grad-clip", "0",
                      "--save-every", "1", "--keep", "5", "--ema", "0.9", "--probe-every", "2", "--probe-seeds", "0",
                      "1", "--probe-count", "1")
    run(argv, torchrun)
    ck = os.path.join(tmp_path, "one", "checkpoints", "step-000001")
    state = torch.load(os.path.join(ck, "state.pt"), weights_only=False)
    assert state["world"] == 2 and state["per_rank_batch"] == 1
    assert [json.loads(x)["step"] for x in open(os.path.join(tmp_path, "one", "probes.jsonl"))] == [-1, 1]
    student_ref, fake_ref, _ = tiny_wan.emulate_ranks(wan_dfd.WanAdapter(), parse(argv), 2, world=2)
    for name, ref in (("student", student_ref), ("fake", fake_ref)):
        got = load_file(os.path.join(ck, f"{name}.safetensors"))
        assert len(got) == 40
        assert max(ref[k].abs().max().item() for k in got if ".lora_B." in k) > LR  # it moved from zero
        for k in got:  # as in test_wan_dist: 0.1% of an Adam step, plus what Adam makes of rounding
            scale = state["optim"][name]["state"][k]["exp_avg_sq"].sqrt()
            tol = 1e-3 * LR + LR * 1e-4 * scale.median() / (scale + 1e-8)
            assert ((got[k] - ref[k]).abs() / tol).max().item() < 1.0, (name, k)
    return argv, torchrun


@pytest.mark.slow
def test_two_ranks_match_single_process(setup, tmp_path):
    two_rank_run(setup, tmp_path)


@pytest.mark.slow
def test_two_ranks_resume_bitwise(setup, tmp_path):
    """The 2-rank LoRA run above, resumed at 2 ranks from its first checkpoint, ends bit-identical (student, fake
    score, EMA). The default suite covers the parts: LoRA resume at 1 rank (test_resume_export_and_pipeline_lora) and
    full-weight 2-rank sharding (tests/test_wan_dist.py)."""
    argv, torchrun = two_rank_run(setup, tmp_path)
    ck = os.path.join(tmp_path, "one", "checkpoints", "step-000001")
    resumed = [*argv[:argv.index("--out") + 1], str(tmp_path / "two"), *argv[argv.index("--out") + 2:],
               "--resume", os.path.join(tmp_path, "one", "checkpoints", "step-000000")]
    run(resumed, torchrun)
    for name in ("student", "fake", "ema"):
        a = load_file(os.path.join(ck, f"{name}.safetensors"))
        b = load_file(os.path.join(tmp_path, "two", "checkpoints", "step-000001", f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_cosmos_export_loads_with_the_pipeline_lora_loader(tmp_path):
    """Cosmos2_5_PredictBasePipeline (diffusers 0.42.1) has load_lora_weights (CosmosLoraLoaderMixin): the file
    save_lora writes, loaded by the pipeline class's own loader into a fresh base, gives the merged transformer's
    output; the adapter's targets are the attention and FFN linears of every block."""
    import cosmos_dfd
    import tiny_cosmos
    from diffusers import Cosmos2_5_PredictBasePipeline
    adapter = cosmos_dfd.CosmosAdapter()
    info = {"rank": 2, "alpha": 6.0, "targets": adapter.lora_targets}
    net = lora.attach(tiny_cosmos.tiny_transformer(3), info, seed=0)
    assert sum(".lora_A." in n for n, _ in net.named_parameters()) == 2 * 10
    with torch.no_grad():
        for n, q in net.named_parameters():
            if ".lora_B." in n:
                q.normal_(std=0.1)
    merged = lora.save_lora(adapter, net, str(tmp_path))
    fresh = tiny_cosmos.tiny_transformer(3)
    sd, meta = Cosmos2_5_PredictBasePipeline.lora_state_dict(str(tmp_path / "lora"), return_lora_metadata=True)
    Cosmos2_5_PredictBasePipeline.load_lora_into_transformer(sd, fresh, metadata=meta)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    kw = dict(timestep=torch.full((1, 1, 2, 1, 1), 0.5), encoder_hidden_states=torch.randn(1, 8, tiny_cosmos.PROMPT_DIM, generator=g),
              condition_mask=torch.zeros(1, 1, 2, 4, 4), padding_mask=torch.zeros(1, 1, 4, 4), return_dict=False)
    cosmos_dfd.ensure_padding_mask_resize()
    with torch.no_grad():
        got, want = fresh(x, **kw)[0], merged(x, **kw)[0]
        base = tiny_cosmos.tiny_transformer(3)(x, **kw)[0]
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_lora_inputs_get_one_line(setup, tmp_path):
    s = setup
    argv = lambda *more: train_argv(s, str(tmp_path / "r"), *more)
    cases = [
        (argv("--lora-rank", "25"), r"--lora-rank 25: larger than the target layer blocks\.0\.attn1\.to_q \(24 -> 24\); "
                                    r"use a rank <= 24"),
        (argv("--lora-rank", "-1"), r"--lora-rank -1: must be >= 1"),
        ([a for a in argv() if a not in ("--lora-rank", "4")], "--lora-alpha needs --lora-rank r"),
    ]
    for a, msg in cases:
        got = main_error(a)
        assert re.search(msg, got) and "\n" not in got, (a, got)
    # --resume: a full-weight checkpoint with LoRA flags, a LoRA checkpoint without them or with another rank
    full, lo = tmp_path / "full" / "step-000000", tmp_path / "lo" / "step-000000"
    for folder, extra in ((full, {}), (lo, {"lora": {"rank": 4, "alpha": 8.0, "targets": wan_dfd.WanAdapter.lora_targets}})):
        folder.mkdir(parents=True)
        torch.save({"step": 0, **extra}, folder / "state.pt")
    plain = [a for a in argv() if a not in ("--lora-rank", "4", "--lora-alpha", "8")]
    for a, msg in (
            ([*argv(), "--resume", str(full)], "a full-weight checkpoint; --lora-rank / --lora-alpha cannot resume it"),
            ([*plain, "--resume", str(lo)], "a LoRA checkpoint \\(rank 4, alpha 8\\); resume it with --lora-rank 4 "
                                            "--lora-alpha 8"),
            ([*argv("--lora-rank", "2"), "--resume", str(lo)], "the checkpoint's LoRA has rank 4 \\(now 2\\)$")):
        got = main_error(a)
        assert re.search(msg, got) and "\n" not in got, (a, got)
    # export --lora of full weights: a DMD2 checkpoint, a full-weight training checkpoint
    from safetensors.torch import save_file
    save_file(tiny_wan.tiny_transformer(5).state_dict(), str(full / "student.safetensors"))
    for ckpt in (s["dmd2"]["folder"], str(full)):
        got = main_error(["export", "--model-dir", s["pipe"], "--ckpt", ckpt, "--out", str(tmp_path / "e"), "--lora"])
        assert "not a LoRA training checkpoint (export --lora needs a run trained with --lora-rank" in got, got
        assert "\n" not in got


@pytest.mark.parametrize("checkpointing", [True, False])
def test_adapters_off_runs_a_call_with_grad_unrecomputed_and_restores_the_switches(checkpointing):
    """The teacher that shares the fake score's network: adapters off for the call; a call with grad (the GAN head's
    features) also without activation checkpointing, whose backward recomputation would run with the adapters on;
    afterwards both switches as they were (a run with --no-checkpointing stays without)."""
    net = lora.attach(tiny_wan.tiny_transformer(), lora.lora_info(argparse.Namespace(lora_rank=4, lora_alpha=None),
                                                                  wan_dfd.WanAdapter()), seed=0)
    if checkpointing:
        net.enable_gradient_checkpointing()
    seen = []
    record = lambda grad: seen.append((grad, net.is_gradient_checkpointing,
                                       all(not m.disable_adapters for m in net.modules() if hasattr(m, "lora_A"))))
    off = lora.AdaptersOff(lambda: record(torch.is_grad_enabled()), net)
    off()
    with torch.no_grad():
        off()
    assert seen == [(True, False, False), (False, checkpointing, False)]  # inside: adapters off; with grad, no ckpt
    assert net.is_gradient_checkpointing == checkpointing
    assert all(not m.disable_adapters for m in net.modules() if hasattr(m, "lora_A"))  # adapters back on
