"""`check` (the preflight) on tiny random Wan and Cosmos models in the real on-disk layouts, CPU only.

The report must name the right format, sources and key coverage for every --dmd2-ckpt layout, pass the teacher's
parity with the diffusers pipeline (and fail it for a wrong convention), carry the sample's statistics and, with
--data, delta^2 (checked against a hand-computed value); a checkpoint that does not fit is one line per problem and a
non-zero exit without a traceback; the memory estimate's training-state bytes are exact."""
import argparse
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import cosmos_dfd as C
import dfd
import tiny_cosmos
import tiny_wan
import wan_dfd
import dfd_video.planning.check
import dfd_video.cli
import dfd_video.data
import dfd_video.distributed
import dfd_video.planning.memory

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAN_SMALL = ["--num-frames", "9", "--height", "32", "--width", "48", "--device", "cpu"]
COSMOS_SMALL = ["--num-frames", "9", "--height", "32", "--width", "32", "--device", "cpu"]


def wan_data(path: str, n: int = 3) -> str:
    """A prepared Wan data folder (manifest, shards, negative embedding) of random latents and text embeddings."""
    g = torch.Generator().manual_seed(0)
    w = dfd_video.data.ShardWriter(path)
    for _ in range(n):
        w.add({"latents": torch.randn(16, 3, 4, 6, generator=g), "text": torch.randn(512, 32, generator=g)})
    w.close({"adapter": "wan"}, {"text": torch.randn(512, 32, generator=g)})
    return path


def cosmos_data(path: str, n: int = 3) -> str:
    """A prepared Cosmos data folder: latents, image latents (the first latent frame), prompt keys with cached
    embeddings in prompts/, and the negative embedding."""
    g = torch.Generator().manual_seed(0)
    w, store = dfd_video.data.ShardWriter(path), dfd_video.data.PromptStore(path)
    for i in range(n):
        lat = torch.randn(16, 3, 4, 4, generator=g)
        key = store.put(f"caption {i}", torch.randn(512, tiny_cosmos.PROMPT_DIM, generator=g))
        w.add({"latents": lat, "image": lat[:, :1].clone(), "text_key": key})
    w.close({"adapter": "cosmos"}, {"text": torch.randn(512, tiny_cosmos.PROMPT_DIM, generator=g)})
    return path


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("check_wan")
    pipe = tiny_wan.cached_pipeline()
    ckpts = tiny_wan.write_dmd2_checkpoints(str(root / "dmd2"), tiny_wan.tiny_transformer(5),
                                            tiny_wan.tiny_transformer(6), generator_ema=tiny_wan.tiny_transformer(7))
    keys = len(tiny_wan.tiny_transformer().state_dict())
    return {"root": root, "pipe": pipe, "dmd2": ckpts, "data": wan_data(str(root / "data")), "keys": keys}


@pytest.fixture(scope="module")
def cosmos(tmp_path_factory):
    root = tmp_path_factory.mktemp("check_cosmos")
    model = tiny_cosmos.save_tiny_pipeline(str(root / "model"))
    gen, critic = tiny_cosmos.tiny_transformer(5), tiny_cosmos.tiny_transformer(6)
    original = lambda net: {"net." + k: v for k, v in tiny_cosmos.to_original_keys(net.state_dict()).items()}
    pt = str(root / "dmd2.pt")  # FastGen style: {"generator", "critic"}, NVIDIA's original names under net.
    torch.save({"generator": original(gen), "critic": original(critic)}, pt)
    st = str(root / "student.safetensors")
    save_file({k: v.contiguous() for k, v in gen.state_dict().items()}, st)
    return {"root": root, "model": model, "pt": pt, "safetensors": st, "data": cosmos_data(str(root / "data")),
            "keys": len(gen.state_dict())}


def check(main, argv) -> dict:
    return main(["check", *argv])


def test_wan_report_for_every_checkpoint_format(wan, tmp_path):
    """Format, sources and coverage for the four --dmd2-ckpt layouts; parity passes; sample stats; JSON round trip."""
    n = wan["keys"]
    ck_path = wan["dmd2"]
    expect = {  # format -> (describe_dmd2's format, student (source, role), fake score (source, role) or the teacher)
        "folder": ("diffusers", (ck_path["folder"], "generator"), "teacher (--model-dir)"),
        "safetensors": ("safetensors", (ck_path["safetensors"], "generator"), "teacher (--model-dir)"),
        "pt": ("self-forcing", (ck_path["pt"], "generator"), (ck_path["pt"], "critic")),
        "dcp": ("dcp", (ck_path["dcp"], "generator"), (ck_path["dcp"], "critic")),
    }
    for fmt, (kind, student, fake) in expect.items():
        out = str(tmp_path / f"{fmt}.json")
        trust = ["--bidirectional-ckpt"] if fmt == "pt" else []  # causal without: see the next block
        rep = check(wan_dfd.main, ["--model-dir", wan["pipe"], "--dmd2-ckpt", ck_path[fmt], "--out", out, *trust,
                                   *WAN_SMALL])
        ck = rep["checkpoint"]
        assert ck["format"] == kind, fmt
        n_s, n_f = ck["networks"]["student"], ck["networks"]["fake_score"]
        assert (n_s["source"], n_s["role"]) == student, fmt
        assert (n_f["source"] if fake == "teacher (--model-dir)" else (n_f["source"], n_f["role"])) == fake, fmt
        assert n_s["provided"] == n_s["keys"] == n, fmt
        assert n_s["converted"] == (fmt == "pt"), fmt  # Self-Forcing names in the .pt
        assert rep["ok"] and rep["problems"] == [], (fmt, rep["problems"])
        assert json.load(open(out)) == json.loads(json.dumps(rep))  # the file holds the report
    # without --bidirectional-ckpt the Self-Forcing .pt is the causal student: checked and sampled as one (its
    # 3 latent frames are one block); tests/test_causal.py covers the causal path itself
    rep = check(wan_dfd.main, ["--model-dir", wan["pipe"], "--dmd2-ckpt", ck_path["pt"], *WAN_SMALL])
    assert rep["ok"] and rep["checkpoint"]["causal"] and any("block-causal" in x for x in rep["checkpoint"]["lines"])
    assert rep["student"]["frames"] == 9
    # sources the warnings name
    assert any("holds no critic" in w for w in check(wan_dfd.main, ["--model-dir", wan["pipe"], "--dmd2-ckpt",
                                                                     wan["dmd2"]["safetensors"], *WAN_SMALL])["warnings"])
    rep = check(wan_dfd.main, ["--model-dir", wan["pipe"], "--dmd2-ckpt", wan["dmd2"]["pt"], "--bidirectional-ckpt",
                               *WAN_SMALL])
    assert any("block-causal" in w for w in rep["warnings"])
    p, s = rep["parity"], rep["student"]
    assert p["passed"] and p["max_abs_diff"] < 1e-4 and p["scale"] > 1.0 and p["guidance"] == 5.0
    assert p["latent_shape"] == [1, 16, 3, 4, 6]
    assert (s["frames"], s["height"], s["width"]) == (9, 32, 48)
    assert 0 < s["saturation"] < 1 and 0 <= s["clipped"] <= 1 and "delta2" not in s
    assert s["student_ts"] == list(dfd.STUDENT_TS) and s["sampler"] == "ode"


def test_wan_delta2_with_data(wan):
    rep = check(wan_dfd.main, ["--model-dir", wan["pipe"], "--dmd2-ckpt", wan["dmd2"]["dcp"], "--data", wan["data"],
                               "--check-batch", "3", *WAN_SMALL])
    s = rep["student"]
    assert s["delta2_clips"] == 3 and s["delta2_t"] == dfd.STUDENT_TS[0]
    assert 0.5 < s["delta2"] < 10  # random student vs unit-variance data: O(1)
    assert "--data" in rep["parity"]["conditioning"] and rep["parity"]["passed"]
    assert rep["memory"]["tokens"] == 3 * 2 * 3  # the data's latents [16, 3, 4, 6], patch (1, 2, 2)


def test_first_step_delta2_by_hand():
    """delta^2 = mean over the mask of (x - G)^2, averaged over clips: a student returning zeros gives mean x^2, one
    returning its input gives mean (x - x_t0)^2 with the same eps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 2, 2, generator=g)
    zero = lambda x_t, t, c: torch.zeros_like(x_t)
    assert dfd_video.planning.check.first_step_delta2(zero, (x, None), 0.9, g) == pytest.approx(float((x ** 2).mean()), rel=1e-6)
    mask = torch.zeros(1, 1, 4, 1, 1)
    mask[:, :, 1:] = 1  # only frames 1..3 count (Cosmos' generated frames)
    want = float((x[:, :, 1:] ** 2).mean())
    assert dfd_video.planning.check.first_step_delta2(zero, (x, None, mask), 0.9, g) == pytest.approx(want, rel=1e-6)
    same = lambda x_t, t, c: x_t
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    want = float(((x - (0.1 * x + 0.9 * eps)) ** 2).mean())
    got = dfd_video.planning.check.first_step_delta2(same, (x, None), 0.9, torch.Generator().manual_seed(5))
    assert got == pytest.approx(want, rel=1e-5)


def test_cosmos_report_with_data(cosmos):
    rep = check(C.main, ["--model-dir", cosmos["model"], "--dmd2-ckpt", cosmos["pt"], "--data", cosmos["data"],
                         *COSMOS_SMALL])
    ck = rep["checkpoint"]
    assert ck["format"] == "pt"
    n_s, n_f = ck["networks"]["student"], ck["networks"]["fake_score"]
    assert (n_s["source"], n_s["role"], n_f["source"], n_f["role"]) == (cosmos["pt"], "generator", cosmos["pt"], "critic")
    assert ck["networks"]["student"]["provided"] == ck["networks"]["fake_score"]["provided"] == cosmos["keys"]
    assert not any("block-causal" in w for w in rep["warnings"])  # original names are FastGen's Cosmos layout
    assert rep["parity"]["passed"] and rep["parity"]["guidance"] == 3.0  # Cosmos' default g, pipeline scale 2
    assert rep["parity"]["max_abs_diff"] < 1e-4 and rep["parity"]["scale"] > 1.0
    s = rep["student"]
    assert (s["frames"], s["height"], s["width"]) == (9, 32, 32) and 0 < s["saturation"] < 1
    assert 0.5 < s["delta2"] < 10 and s["delta2_clips"] == 2
    assert rep["ok"]


def test_cosmos_report_without_data(cosmos):
    rep = check(C.main, ["--model-dir", cosmos["model"], "--dmd2-ckpt", cosmos["safetensors"], *COSMOS_SMALL])
    assert rep["checkpoint"]["format"] == "safetensors"
    assert rep["checkpoint"]["networks"]["fake_score"]["source"] == "teacher (--model-dir)"
    assert rep["parity"]["passed"] and "stand-in" in rep["parity"]["conditioning"]
    assert "delta2" not in rep["student"] and rep["ok"]


def test_parity_fails_for_a_wrong_convention(wan, capsys):
    """A teacher that guides with g + 1 (the pipeline-vs-paper off-by-one) fails parity: one problem line, exit 1."""

    class WrongGuidance(wan_dfd.WanAdapter):
        def denoiser(self, net, guidance=None, uncond=None, dtype=None):
            return super().denoiser(net, None if guidance is None else guidance + 1, uncond, dtype)

    with pytest.raises(SystemExit) as e:
        dfd_video.cli.main(WrongGuidance(), ["check", "--model-dir", wan["pipe"], "--dmd2-ckpt",
                                             wan["dmd2"]["safetensors"], *WAN_SMALL])
    assert str(e.value.code) == "error: check found 1 problem(s), listed above"
    out = capsys.readouterr().out
    diff = float(out.split("max |x0 ours - x0 pipeline| = ")[1].split()[0])
    assert 0.5 < diff / float(out.split("would move x0 by ")[1].rstrip(")\n").split(")")[0]) < 2  # it is that error
    assert "FAIL" in out and [line for line in out.splitlines() if line.startswith("problem: ")][0].startswith(
        "problem: teacher parity failed: max |x0 ours - x0 pipeline| = ")


def test_bf16_parity_says_when_it_cannot_resolve_guidance(wan):
    """bf16 on CPU: parity passes at its looser threshold, and where that threshold exceeds the effect of a guidance
    off by one (the tiny random model's cond and uncond differ little), the report says to rerun at fp32."""
    rep = check(wan_dfd.main, ["--model-dir", wan["pipe"], "--dmd2-ckpt", wan["dmd2"]["safetensors"], "--dtype", "bf16",
                               *WAN_SMALL])
    p = rep["parity"]
    assert p["dtype"] == "bf16" and p["passed"] and p["threshold"] == pytest.approx(2e-2 * p["scale"])
    assert (p["guidance_off_by_one"] <= p["threshold"]) == any("rerun check with --dtype fp32" in w for w in rep["warnings"])
    assert "saturation" in rep["student"]


def test_a_stage_that_cannot_run_is_one_problem_line(wan, capsys):
    """A failure inside the sample (here the decoder; on a GPU e.g. out of memory at the data's clip size) is one
    problem line; the report still comes, with the memory estimate."""

    class BrokenDecoder(wan_dfd.WanAdapter):
        def open_encoders(self, *args, **kwargs):
            enc = super().open_encoders(*args, **kwargs)

            def decode(latents):
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")
            enc.vae.decode = decode
            return enc

    with pytest.raises(SystemExit) as e:
        dfd_video.cli.main(BrokenDecoder(), ["check", "--model-dir", wan["pipe"], "--dmd2-ckpt",
                                             wan["dmd2"]["safetensors"], *WAN_SMALL])
    assert str(e.value.code) == "error: check found 1 problem(s), listed above"
    out = capsys.readouterr().out
    assert "problem: student sample could not run: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB\n" in out
    assert "[4] ESTIMATED peak GPU memory" in out and "PASS" in out


def test_mismatched_checkpoint_is_one_line_per_problem(wan, tmp_path, capsys):
    """Missing keys, unexpected keys and wrong shapes: each a `problem:` line, the sample skipped, and a one-line
    SystemExit (exit status 1, no traceback) after the report is printed and written."""
    from safetensors.torch import load_file
    sd = load_file(wan["dmd2"]["safetensors"])
    del sd["proj_out.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(2)
    sd["patch_embedding.weight"] = torch.zeros(8, 16, 1, 2, 2)
    bad = str(tmp_path / "bad.safetensors")
    save_file(sd, bad)
    out = str(tmp_path / "bad.json")
    with pytest.raises(SystemExit) as e:
        wan_dfd.main(["check", "--model-dir", wan["pipe"], "--dmd2-ckpt", bad, "--out", out, *WAN_SMALL])
    assert str(e.value.code) == "error: check found 3 problem(s), listed above"
    stdout = capsys.readouterr().out
    problems = [line for line in stdout.splitlines() if line.startswith("problem: ")]
    n = wan["keys"]
    assert problems == [f"problem: student ({bad}): 1 missing of {n} keys [proj_out.bias]",
                        f"problem: student ({bad}): 1 unexpected of {n} keys [blocks.0.extra.weight]",
                        f"problem: student ({bad}): 1 shape mismatches of {n} keys [patch_embedding.weight: file "
                        "(8, 16, 1, 2, 2) vs model (24, 16, 1, 2, 2)]"], stdout
    assert "skipped: the student weights do not fit" in stdout and "PASS" in stdout  # the teacher still checked
    assert stdout.rstrip().endswith("result: 3 problem(s)")
    rep = json.load(open(out))
    assert rep["ok"] is False and len(rep["problems"]) == 3
    assert rep["checkpoint"]["networks"]["student"]["provided"] == n - 2
    # a file that is no checkpoint at all: one problem line too
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        wan_dfd.main(["check", "--model-dir", wan["pipe"], "--dmd2-ckpt", str(junk), *WAN_SMALL])
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1 and "junk.pt: cannot read weights" in problems[0], problems


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_memory_estimate_is_exact_for_the_training_state():
    """Params / grads / AdamW bytes per rank equal what FSDP2 + AdamW really hold (world of one, after a step), and
    at 3 ranks the per-tensor dim-0 split, from the tiny model's parameter shapes."""
    net = tiny_wan.tiny_transformer()
    shapes = [tuple(p.shape) for p in net.parameters()]
    n = sum(p.numel() for p in net.parameters())
    est = dfd_video.planning.memory.estimate_memory(shapes, 1, ema=True)
    assert est["params_per_network"] == n
    adam_steps = 4 * len(shapes)  # AdamW's fp32 `step` per parameter tensor
    assert est["exact"]["student"] == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n + adam_steps}
    assert est["exact"]["teacher"] == est["exact"]["ema"] == {"params": 4 * n, "grads": 0, "optimizer": 0}
    d = dfd_video.distributed.setup_distributed("cpu")
    try:
        sharded = dfd_video.distributed.shard(net, list(net.blocks), d)  # stored fp32 whatever the compute dtype
        opt = torch.optim.AdamW(sharded.parameters(), lr=1e-4)
        sharded(hidden_states=torch.randn(1, 16, 1, 2, 2), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 4, 32), return_dict=False)[0].float().square().mean().backward()
        opt.step()
        assert dfd_video.distributed.train_state_bytes(sharded, opt) == sum(est["exact"]["student"].values())
    finally:
        dfd_video.distributed.teardown_distributed()
    three = dfd_video.planning.memory.estimate_memory(shapes, 3)
    per_rank = sum(-(-s[0] // 3) * (torch.Size(s[1:]).numel()) for s in shapes)
    assert three["exact"]["fake_score"]["params"] == 4 * per_rank and three["exact"]["student"]["optimizer"] == 8 * per_rank + adam_steps
    assert per_rank * 3 >= n and per_rank < n / 2


def test_report_memory_section_follows_the_flags(wan):
    rep = check(wan_dfd.main, ["--model-dir", wan["pipe"], "--dmd2-ckpt", wan["dmd2"]["safetensors"],
                               "--world-size", "4", "--batch-size", "8", "--ema", "0.99", *WAN_SMALL])
    m = rep["memory"]
    net = tiny_wan.tiny_transformer()
    per_rank = sum(-(-p.shape[0] // 4) * p[0].numel() if p.ndim else 1 for p in net.parameters())
    assert m["world_size"] == 4 and m["per_rank_batch"] == 2 and set(m["exact"]) == {"student", "fake_score",
                                                                                     "teacher", "ema"}
    assert m["exact"]["student"]["grads"] == 4 * per_rank
    assert m["tokens"] == 21 * 30 * 52  # no --data: the paper's 81 frames at 480x832
    with pytest.raises(SystemExit) as e:  # a batch that does not split over the ranks is a problem
        check(wan_dfd.main, ["--model-dir", wan["pipe"], "--dmd2-ckpt", wan["dmd2"]["safetensors"],
                             "--world-size", "3", "--batch-size", "8", *WAN_SMALL])
    assert "1 problem(s)" in str(e.value.code)


def test_memory_section_is_what_plan_prints(wan, capsys):
    """check's section [4] is plan_memory for the train flags: the same parts, byte for byte, as `plan` with the
    same ranks, clips per rank, EMA, clip size and LoRA rank; with LoRA the fake score sits on the teacher's base
    when it starts from the teacher (--fake-init teacher), on a base of its own when it starts from the critic."""
    paper_clip = ["--num-frames", "81", "--height", "480", "--width", "832"]  # check's clip without --data
    for fake in ("teacher", "critic"):
        for lora in ([], ["--lora-rank", "4"]):
            rep = check(wan_dfd.main, ["--model-dir", wan["pipe"], "--dmd2-ckpt", wan["dmd2"]["pt"],  # has a critic
                                       "--world-size", "4", "--batch-size", "8", "--ema", "0.99", "--fake-init", fake,
                                       "--bidirectional-ckpt", *lora, *WAN_SMALL])
            plan = wan_dfd.main(["plan", "--model-dir", wan["pipe"], "--world-size", "4", "--batch-per-gpu", "2",
                                 "--ema", "0.99", "--fake-init", fake, *lora, *paper_clip])
            m = rep["memory"]
            assert m["parts"] == plan["parts"] and m["total"] == plan["total"], (fake, lora)
            assert m["activations_counted"] and m["lora_rank"] == (4 if lora else 0)
    out = capsys.readouterr().out
    assert "[4] ESTIMATED peak GPU memory per rank (as `plan` computes it)" in out
    assert "LoRA r = 4, the fake score on its own (the critic) base" in out and "counted" in out
    assert "largest_batch" not in m  # on a CPU there is no GPU to fit


def test_flags_out_path_and_refusals(tmp_path, capsys, monkeypatch):
    p = argparse.ArgumentParser()
    dfd_video.planning.check.add_args(p, wan_dfd.WanAdapter())
    assert all(a.help for a in p._actions), [a.dest for a in p._actions if not a.help]
    with pytest.raises(SystemExit):
        wan_dfd.main(["--help"])
    assert "check" in capsys.readouterr().out
    assert dfd_video.planning.check.report_path(str(tmp_path / "r.json")) == str(tmp_path / "r.json")
    assert dfd_video.planning.check.report_path(str(tmp_path)) == str(tmp_path / "check.json")  # a run folder
    assert dfd_video.planning.check.report_path("runs/dfd") == os.path.join("runs/dfd", "check.json")
    with pytest.raises(SystemExit) as e:
        wan_dfd.main(["check", "--model-dir", str(tmp_path), "--world-size", "0"])
    assert str(e.value.code) == "error: --world-size 0: must be >= 1"
    with pytest.raises(SystemExit) as e:
        wan_dfd.main(["check", "--model-dir", str(tmp_path)])
    assert "check needs --dmd2-ckpt" in str(e.value.code)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: refused before anything loads
    with pytest.raises(SystemExit) as e:
        wan_dfd.main(["check", "--model-dir", str(tmp_path), "--dmd2-ckpt", str(tmp_path)])
    assert str(e.value.code).startswith("error: check runs as one process (python, not torchrun)")


def test_memory_estimate_of_the_real_wan_matches_the_training_md_table():
    """The real Wan2.1-T2V-1.3B config (built on the meta device), 8 ranks, 81 x 480 x 832: the older estimate's
    table in docs/training.md (bench/bench_wan_memory.py, GB = 1e9): fixed 7.33 GB with the EMA, activations 5.60 GB per sample. The table
    divides 16 bytes x P by 8; FSDP2 pads each tensor's dim 0 to a multiple of the ranks, and the (1, 6, 1536)
    modulation tables are whole on every rank: +10 MB here."""
    from diffusers import WanTransformer3DModel
    real = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    with torch.device("meta"):
        net = WanTransformer3DModel(**real)
    sizes = dfd_video.planning.check.network_sizes(wan_dfd.WanAdapter(), net)
    est = dfd_video.planning.memory.estimate_memory(sizes["shapes"], 8, ema=True, block_params=sizes["block_params"],
                                           root_params=sizes["root_params"], tokens=21 * 30 * 52, hidden=sizes["hidden"],
                                           mlp=sizes["mlp"], n_blocks=sizes["n_blocks"])
    fixed = sum(sum(v.values()) for v in est["exact"].values()) + est["rough"]["fsdp_buffers"]
    P = sum(p.numel() for p in net.parameters())
    padding = 40 * (est["sharded_elements_per_rank"] - P / 8) + 2 * 4 * len(sizes["shapes"])  # 4 nets; Adam steps
    assert 9e6 < padding < 11e6
    assert round((fixed - padding) / 1e9, 2) == 7.33
    assert round(est["activations_per_sample"] / 1e9, 2) == 5.60
