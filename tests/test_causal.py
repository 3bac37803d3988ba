"""The causal (Self-Forcing / CausVid) Wan student: dfd_video/causal_wan.py against diffusers and against itself, dfd's
`generate` hook, the Self-Forcing .pt and LMDB formats, the sf-dfd preset; the end-to-end runs are marked slow."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dfd_video import causal_wan
import dfd
import dfd_video.cli
import dfd_video.data
import dfd_video.weights
import tiny_wan
import wan_dfd

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "wan_dfd.py")


def causal_pair(seed: int = 0):
    """(diffusers' WanTransformer3DModel, CausalWanTransformer) with the same tiny random weights."""
    ref = tiny_wan.tiny_transformer(seed)
    net = causal_wan.CausalWanTransformer(**tiny_wan.TRANSFORMER)
    net.load_state_dict(ref.state_dict())
    return ref.eval(), net.eval()


def inputs(frames: int = 6, B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 16, frames, 4, 6, generator=g), torch.randn(B, 512, 32, generator=g)


def test_one_block_spanning_all_frames_is_diffusers_wan():
    ref, net = causal_pair()
    x, text = inputs()
    t = torch.tensor([500.0, 937.5])
    with torch.no_grad():
        want = ref(x, t, text, return_dict=False)[0]
        assert torch.equal(net(x, t, text, return_dict=False)[0], want)  # called as diffusers calls it: its forward
        per_frame = t[:, None].expand(2, 6)
        for kw in ({"frames_per_block": 6}, {"frames_per_block": 9}, {}):  # our path: mask of one block, or none
            torch.testing.assert_close(net(x, per_frame, text, return_dict=False, **kw)[0], want, atol=1e-5, rtol=0)
        # and three blocks are not one: the mask does something
        assert (net(x, per_frame, text, frames_per_block=3, return_dict=False)[0] - want).abs().max() > 1e-3


def test_kv_cache_rollout_equals_one_block_causal_forward():
    """Block by block through the KV cache (each block committed with its own input and timestep) gives what one
    forward with the block-causal mask and per-block timesteps gives, for every block."""
    _, net = causal_pair(1)
    x, text = inputs(frames=9)
    t_block = torch.tensor([[900.0, 400.0, 0.0], [250.0, 1000.0, 625.0]])  # [B, blocks]
    with torch.no_grad():
        full = net(x, t_block.repeat_interleave(3, dim=1), text, frames_per_block=3, return_dict=False)[0]
        cache = causal_wan.KVCache()
        for b in range(3):
            out = net(x[:, :, 3 * b:3 * b + 3], t_block[:, b], text, cache=cache, commit=True, return_dict=False)[0]
            torch.testing.assert_close(out, full[:, :, 3 * b:3 * b + 3], atol=1e-5, rtol=0)
        assert cache.frames == 9 and sum(c.shape[1] for c in cache.k[0]) == 9 * 2 * 3  # 9 frames of 2 x 3 tokens
        # a later block does not reach an earlier one
        x2 = x.clone()
        x2[:, :, 6:] += 1.0
        again = net(x2, t_block.repeat_interleave(3, dim=1), text, frames_per_block=3, return_dict=False)[0]
        assert torch.equal(again[:, :, :6], full[:, :, :6]) and not torch.equal(again[:, :, 6:], full[:, :, 6:])


def test_rollout_keeps_grad_only_at_the_exit_step():
    _, net = causal_pair(2)
    student = wan_dfd.WanDenoiser(net)
    x, text = inputs(frames=6)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=g)
    G = causal_wan.rollout(student, noise, text, wan_dfd.SELF_FORCING_TS, 2, torch.Generator().manual_seed(4),
                           context_sigma=wan_dfd.grid_sigma(0.0))
    assert G.shape == x.shape and G.requires_grad
    G[:, :, 3:].square().sum().backward()  # the second block's loss
    grad_rollout = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    # the same rollout by hand: 2 skipped steps with fresh noise, the exit step, then the committed context (noised
    # to Self-Forcing's grid_sigma(0)); the second block's exit step with grad, on the cache the first block left
    gen, cache, blocks = torch.Generator().manual_seed(4), causal_wan.KVCache(), []
    ts = wan_dfd.SELF_FORCING_TS
    for s in (0, 3):
        xb = noise[:, :, s:s + 3]
        with torch.no_grad():
            for i in range(2):
                x0 = student(xb, torch.full((2,), ts[i]), text, cache=cache)
                xb = dfd.forward_diffusion(x0, torch.randn(x0.shape, generator=gen), torch.full((2,), ts[i + 1]))
        with torch.set_grad_enabled(s == 3):
            x0 = student(xb, torch.full((2,), ts[2]), text, cache=cache)
        blocks.append(x0)
        with torch.no_grad():
            ctx = dfd.forward_diffusion(x0, torch.randn(x0.shape, generator=gen), torch.full((2,), 0.0049801))
            student(ctx, torch.zeros(2), text, cache=cache, commit=True)
    torch.testing.assert_close(G.detach(), torch.cat(blocks, 2).detach(), atol=1e-5, rtol=1e-4)
    # its gradient reaches the weights only through its own exit forward: nothing flows back through the cache into
    # the first block's steps
    blocks[1].square().sum().backward()
    for a, b in zip(grad_rollout, (p.grad for p in net.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(not c.requires_grad for layer in cache.k for c in layer) and abs(wan_dfd.grid_sigma(0.0) - 0.0049801) < 1e-7
    # with activation checkpointing (train's default) the backward recomputes each block on the cache it saw
    net.zero_grad()
    net.enable_gradient_checkpointing()
    G2 = causal_wan.rollout(student, noise, text, wan_dfd.SELF_FORCING_TS, 2, torch.Generator().manual_seed(4),
                            context_sigma=wan_dfd.grid_sigma(0.0))
    G2[:, :, 3:].square().sum().backward()
    for a, p in zip(grad_rollout, net.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


def test_default_path_unchanged_and_generate_hook_used():
    """dfd.train without `generate` runs student_input + one call, exactly as a generate that does the same."""
    class Den(torch.nn.Linear):
        def forward(self, x, t, c):
            return super().forward(x) * (1 - t[:, None])

    def run(generate):
        torch.manual_seed(0)
        student, fake, teacher = Den(4, 4), Den(4, 4), Den(4, 4)
        data = iter([(torch.randn(3, 4), None) for _ in range(40)])
        opt = lambda n: torch.optim.SGD(n.parameters(), lr=0.1)
        c = dfd.DFDConfig(p=0.5, fake_updates=2, student_ts=(0.9, 0.5))
        dfd.train(student, teacher, fake, opt(student), opt(fake), data, 3, c, generate=generate)
        return torch.cat([p.flatten() for p in (*student.parameters(), *fake.parameters())])
    same = lambda st, x, cond, g, shared: st(*dfd.student_input(x, (0.9, 0.5), g), cond)
    assert torch.equal(run(None), run(same))
    assert not torch.equal(run(None), run(lambda st, x, cond, g, shared: st(x, torch.full((x.shape[0],), 0.9), cond)))


def test_recipe_settings_of_dfd():
    c = dfd.DFDConfig(p=0.5, per_micro_coin=True, t_min=0.0, t_max=0.999, t_shift=5.0, t_clamp=(0.02, 0.98))
    t = dfd.sample_t(100000, c, torch.Generator().manual_seed(0), "cpu")
    assert t.min() == 0.02 and t.max() == 0.98 and 0.08 < (t == 0.98).float().mean() < 0.105  # P(u > 0.907)
    coins = [bool(dfd.dfd_coin(7, 0.5, 0, micro=a)) for a in range(64)]
    assert 10 < sum(coins) < 54 and coins == [bool(dfd.dfd_coin(7, 0.5, 0, micro=a)) for a in range(64)]
    x, eps, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0.5, 0.25])
    fake = lambda x_t, t, c: torch.zeros_like(x_t)
    assert torch.allclose(dfd.fake_score_loss(fake, x, eps, t, None, space="flow"),
                          (x ** 2 / t[:, None] ** 2).mean())


def test_self_forcing_pt_takes_the_causal_path(tmp_path):
    paths = tiny_wan.write_dmd2_checkpoints(str(tmp_path), tiny_wan.tiny_transformer(5), tiny_wan.tiny_transformer(6))
    d = dfd_video.weights.describe_dmd2(paths["pt"])
    assert d["format"] == "self-forcing" and not d["refusals"]
    ns = lambda **kw: argparse.Namespace(**{"causal": False, "bidirectional_ckpt": False, "resume": None, **kw})
    assert wan_dfd.reads_causal(ns(dmd2_ckpt=paths["pt"]))
    assert not wan_dfd.reads_causal(ns(dmd2_ckpt=paths["pt"], bidirectional_ckpt=True))
    assert not wan_dfd.reads_causal(ns(dmd2_ckpt=paths["safetensors"]))
    assert wan_dfd.reads_causal(ns(dmd2_ckpt=paths["safetensors"], causal=True))
    spec = wan_dfd.WanAdapter().resolve(ns(cmd="train", dmd2_ckpt=paths["pt"], frames_per_block=3, context_sigma=0.0))
    assert isinstance(spec, wan_dfd.CausalWanAdapter) and spec.generate((1.0, 0.5)) is not None


def test_export_is_self_forcing_layout(tmp_path):
    """model.pt {"generator": "model." + original Wan names}: diffusers' converter (what Self-Forcing checkpoints go
    through here) gives the weights back, and describe_dmd2 reads it as a Self-Forcing .pt again."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    net = tiny_wan.tiny_transformer(3)
    path = str(tmp_path / "out" / "model.pt")
    causal_wan.save_self_forcing(net.state_dict(), path)
    gen = torch.load(path, weights_only=True)["generator"]
    assert all(k.startswith("model.") for k in gen) and "model.head.head.weight" in gen
    assert set(k[6:] for k in gen) == set(tiny_wan.to_original_keys(net.state_dict()))
    back = convert_wan_transformer_to_diffusers({k[6:]: v for k, v in gen.items()})
    assert back.keys() == net.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())
    assert dfd_video.weights.describe_dmd2(path)["format"] == "self-forcing"


def write_lmdb(path: str, latents: np.ndarray, prompts: list[str]) -> None:
    """A latent LMDB as Self-Forcing's utils/lmdb.py writes it (store_arrays_to_lmdb + the shape key)."""
    import lmdb
    env = lmdb.open(path, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, (row, p) in enumerate(zip(latents, prompts)):
            txn.put(f"latents_{i}_data".encode(), row.astype(np.float16).tobytes())
            txn.put(f"prompts_{i}_data".encode(), p.encode())
        txn.put(b"latents_shape", " ".join(map(str, latents.shape)).encode())
        txn.put(b"prompts_shape", str(len(prompts)).encode())
    env.close()


def test_prepare_reads_a_self_forcing_lmdb(tmp_path):
    lat = np.random.default_rng(0).standard_normal((3, 6, 16, 4, 6)).astype(np.float16)  # N T C H W
    prompts = ["a red ball rolls", "a blue square moves up", "cat jumps"]
    write_lmdb(str(tmp_path / "lmdb"), lat, prompts)
    pipe = tiny_wan.cached_pipeline()
    wan_dfd.main(["prepare", "--model-dir", pipe, "--videos", str(tmp_path / "lmdb"), "--out", str(tmp_path / "data"),
                  "--device", "cpu", "--store-dtype", "fp32"])
    data = dfd_video.data.LatentShards(str(tmp_path / "data"), ("latents", "text"))
    m = json.load(open(tmp_path / "data" / "manifest.json"))
    assert m["count"] == 3 and m["negative_prompt"] == wan_dfd.SELF_FORCING_NEGATIVE_PROMPT
    enc = wan_dfd.WanEncoders(pipe, torch.device("cpu"), vae=False)
    for i in range(3):
        assert torch.equal(data[i]["latents"], torch.from_numpy(lat[i].astype(np.float32)).permute(1, 0, 2, 3))
        torch.testing.assert_close(data[i]["text"], enc.encode_text([prompts[i]])["text"][0], atol=1e-5, rtol=0)


def test_preset_sets_the_sf_dfd_recipe_and_given_flags_win(tmp_path):
    spec = wan_dfd.WanAdapter()
    argv = ["train", "--model-dir", ".", "--data", ".", "--preset", "sf-dfd", "--lr", "1e-6"]
    args = dfd_video.cli.build_parser(spec, "", "train", dfd_video.cli.preset_name(argv)).parse_args(argv)
    assert (args.lr, args.lr_fake, args.guidance, args.adam_beta1, args.fake_updates, args.ema) == (1e-6, 4e-7, 4.0,
                                                                                                    0.0, 5, 0.99)
    assert args.student_ts == list(wan_dfd.SELF_FORCING_TS) and args.t_clamp == [0.02, 0.98]
    assert args.per_micro_coin and args.fake_loss == "flow" and args.batch_size == 64 and args.grad_accum == 64
    c = __import__("dfd_video.train", fromlist=["x"]).dfd_config(args)
    assert c.per_micro_coin and c.t_clamp == (0.02, 0.98) and c.fake_updates == 5


# ---------------------------------------------------------------------------------------------------
# End to end (slow): a tiny Self-Forcing .pt through wan_dfd.py


cli = tiny_wan.run_script


@pytest.fixture(scope="module")
def sf(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal_e2e")
    lat = np.random.default_rng(1).standard_normal((4, 6, 16, 4, 6)).astype(np.float16)
    write_lmdb(str(root / "lmdb"), lat, ["a red ball rolls", "blue square", "cat jumps", "dog moves up"])
    pipe = tiny_wan.cached_pipeline()
    cli(["prepare", "--model-dir", pipe, "--videos", str(root / "lmdb"), "--out", str(root / "data"), "--device",
         "cpu", "--store-dtype", "fp32", "--per-shard", "3"])
    dmd2 = tiny_wan.write_dmd2_checkpoints(str(root / "dmd2"), tiny_wan.tiny_transformer(5), tiny_wan.tiny_transformer(6),
                                           tiny_wan.tiny_transformer(7))
    return {"root": root, "pipe": pipe, "data": str(root / "data"), "pt": dmd2["pt"]}


def sf_train(s, out, *more):
    return ["--model-dir", s["pipe"], "--data", s["data"], "--dmd2-ckpt", s["pt"], "--out", out, "--preset", "sf-dfd",
            "--steps", "4", "--batch-size", "2", "--grad-accum", "2", "--fake-updates", "1", "--save-every", "2",
            "--lr", "1e-4", "--lr-fake", "1e-4", "--device", "cpu", *more]


@pytest.mark.slow
def test_sf_pt_trains_kills_resumes_samples_exports(sf, tmp_path):
    from safetensors.torch import load_file
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = cli(sf_train(sf, a))
    assert "causal     <- the student is block-causal" in r.stderr
    assert "EMA        <- the checkpoint's EMA" in r.stderr and "--preset sf-dfd" not in r.stderr  # data has SF's prompt
    args = json.load(open(os.path.join(a, "args.json")))
    assert args["causal_student"] and args["guidance"] == 4.0 and args["per_micro_coin"]
    latest = tiny_wan.kill_at_first_checkpoint([sys.executable, SCRIPT, *sf_train(sf, b)], b, 300)
    assert os.path.exists(latest)
    cli(sf_train(sf, b, "--resume"))
    for name in ("student", "fake", "ema"):
        wa = load_file(os.path.join(a, "checkpoints", "step-000003", f"{name}.safetensors"))
        wb = load_file(os.path.join(b, "checkpoints", "step-000003", f"{name}.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball rolls\n")
    size = ["--num-frames", "21", "--height", "32", "--width", "48", "--device", "cpu"]
    cli(["sample", "--model-dir", sf["pipe"], "--ckpt", a, "--prompts", str(prompts), "--out", str(tmp_path / "s"),
         "--save-latents", *size])
    cli(["export", "--model-dir", sf["pipe"], "--ckpt", a, "--out", str(tmp_path / "e")])
    cli(["sample", "--model-dir", sf["pipe"], "--ckpt", str(tmp_path / "e" / "model.pt"), "--prompts", str(prompts),
         "--out", str(tmp_path / "s2"), "--save-latents", *size])
    x1 = load_file(str(tmp_path / "s" / "prompt000_seed0.safetensors"))["latents"]
    x2 = load_file(str(tmp_path / "s2" / "prompt000_seed0.safetensors"))["latents"]
    assert x1.shape == (16, 6, 4, 6) and torch.equal(x1, x2)  # the exported .pt samples what the run's EMA does


@pytest.mark.slow
def test_p0_is_plain_self_forcing_dmd_whatever_the_data(sf, tmp_path):
    """--p 0: the data only supplies the prompts (Self-Forcing's data-free DMD), so other latents give the same run."""
    from safetensors.torch import load_file, save_file
    other = tmp_path / "other"
    import shutil
    shutil.copytree(sf["data"], other)
    for f in other.glob("shard-*.safetensors"):
        t = load_file(str(f))
        t["latents"] = torch.randn_like(t["latents"])
        save_file(t, str(f))
    s2 = {**sf, "data": str(other)}
    outs = []
    for s, name in ((sf, "x"), (s2, "y")):
        cli(sf_train(s, str(tmp_path / name), "--p", "0", "--steps", "2", "--save-every", "0"))
        outs.append(load_file(str(tmp_path / name / "checkpoints" / "step-000001" / "student.safetensors")))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    cli(sf_train(sf, str(tmp_path / "z"), "--p", "1", "--steps", "2", "--save-every", "0"))
    z = load_file(str(tmp_path / "z" / "checkpoints" / "step-000001" / "student.safetensors"))
    assert any(not torch.equal(outs[0][k], z[k]) for k in z)


@pytest.mark.slow
def test_two_ranks_match_the_emulation(sf, tmp_path):
    from safetensors.torch import load_file
    argv = ["train", "--model-dir", sf["pipe"], "--data", sf["data"], "--dmd2-ckpt", sf["pt"], "--out",
            str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--fake-updates", "1", "--lr", "1e-4",
            "--lr-fake", "1e-4", "--grad-clip", "0", "--grad-clip-fake", "0", "--save-every", "0", "--device", "cpu",
            "--monitor-every", "0", "--per-micro-coin", "--fake-loss", "flow"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
                        *argv], env=tiny_wan.quiet_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    parser = argparse.ArgumentParser()
    dfd_video.cli.add_train_args(parser, wan_dfd.WanAdapter())
    args = parser.parse_args(argv[1:])
    spec = wan_dfd.WanAdapter().resolve(argparse.Namespace(**vars(args), cmd="train"))
    assert isinstance(spec, wan_dfd.CausalWanAdapter)
    student_ref, _, _ = tiny_wan.emulate_ranks(spec, args, 2, world=2)
    got = load_file(os.path.join(tmp_path, "run", "checkpoints", "step-000001", "student.safetensors"))
    start = tiny_wan.tiny_transformer(5).state_dict()
    assert max((student_ref[k] - start[k]).abs().max().item() for k in got) > 1e-4
    for k in got:
        torch.testing.assert_close(got[k], student_ref[k], atol=2e-6, rtol=0)


def test_plan_counts_the_kv_cache(capsys):
    """plan --causal adds every layer's keys and values of all tokens in bf16: 30 x 2 x 32760 x 1536 x 2 bytes for
    the paper's clip on Wan2.1-1.3B (Self-Forcing allocates the same: 30 blocks x [B, 32760, 12, 128] x 2)."""
    wan_dfd.main(["plan", "--world-size", "8", "--causal"])
    line = next(x for x in capsys.readouterr().out.splitlines() if "KV cache" in x)
    assert float(line.split()[-2]) == round(30 * 2 * 32760 * 1536 * 2 / 2**30, 2)


@pytest.mark.slow
def test_lora_on_the_causal_student_trains_and_samples(sf, tmp_path):
    from safetensors.torch import load_file
    run = str(tmp_path / "lora")
    cli(["--model-dir", sf["pipe"], "--data", sf["data"], "--dmd2-ckpt", sf["pt"], "--out", run, "--steps", "2",
         "--batch-size", "1", "--fake-updates", "1", "--lora-rank", "2", "--lr", "1e-3", "--lr-fake", "1e-3",
         "--save-every", "0", "--device", "cpu"])
    w = load_file(os.path.join(run, "checkpoints", "step-000001", "student.safetensors"))
    assert any("lora_B" in k and w[k].abs().max() > 0 for k in w)  # the adapters moved (lora_B starts at zero)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball rolls\n")
    cli(["sample", "--model-dir", sf["pipe"], "--ckpt", run, "--prompts", str(prompts), "--out", str(tmp_path / "s"),
         "--num-frames", "21", "--height", "32", "--width", "48", "--device", "cpu"])
    assert os.path.exists(tmp_path / "s" / "prompt000_seed0.mp4")
