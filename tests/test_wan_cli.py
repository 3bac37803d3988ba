"""wan_dfd.py end to end on a tiny random Wan, run as subprocesses (cleanrl style):
synthetic mp4s -> prepare -> train -> kill -> resume (same weights as an unbroken run) -> sample (playable mp4s)
-> export (drops into diffusers' WanPipeline and gives the frames `sample` gave); plus every bad input's message."""
import contextlib
import functools
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import dfd
import tiny_wan
import dfd_video.data
import dfd_video.prepare
import dfd_video.video
import wan_dfd
from dfd_video.spec import FASTGEN_NEGATIVE_PROMPT

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "wan_dfd.py")
SIZE = ["--num-frames", "9", "--height", "32", "--width", "48", "--fps", "8"]


run = tiny_wan.run_script


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_e2e")
    pipe = tiny_wan.cached_pipeline()
    captions = tiny_wan.make_videos(str(root / "videos"), n=4, captions="csv", broken=1)
    data = str(root / "data")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        wan_dfd.main(["prepare", "--model-dir", pipe, "--videos", str(root / "videos"), "--out", data, *SIZE,
                      "--per-shard", "3", "--store-dtype", "fp32", "--device", "cpu"])
    assert "prepared 4 samples in 2 shards" in err.getvalue() and "broken0.mp4: " in err.getvalue()
    dmd2 = tiny_wan.write_dmd2_checkpoints(str(root / "dmd2"), tiny_wan.tiny_transformer(5), tiny_wan.tiny_transformer(6))
    return {"root": root, "pipe": pipe, "data": data, "dmd2": dmd2, "captions": captions}


def train_args(s, out, *more):
    return ["--model-dir", s["pipe"], "--data", s["data"], "--dmd2-ckpt", s["dmd2"]["pt"], "--bidirectional-ckpt",
            "--out", out, "--steps", "6", "--batch-size", "2", "--fake-updates", "1", "--save-every", "2", "--ema", "0.9",
            "--lr", "1e-4", "--lr-fake", "1e-4", "--monitor-every", "2", "--device", "cpu", *more]


def test_prepare_writes_latents_and_pipeline_text_embeddings(setup):
    m = json.load(open(os.path.join(setup["data"], "manifest.json")))
    assert m["count"] == 4 and m["shapes"] == {"latents": [16, 3, 4, 6], "text": [512, 32]}
    assert m["vae_latent"] == "sample" and m["negative_prompt"].startswith("Bright tones, overexposed, static")
    assert [os.path.basename(s["file"]) for s in m["skipped"]] == ["broken0.mp4"]
    data = dfd_video.data.LatentShards(setup["data"], ("latents", "text"))
    enc = wan_dfd.WanEncoders(setup["pipe"], torch.device("cpu"))
    torch.testing.assert_close(data[1]["text"], enc.encode_text([setup["captions"][1]])["text"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(data.negative["text"], enc.encode_text([FASTGEN_NEGATIVE_PROMPT])["text"][0], atol=1e-5,
                               rtol=0)
    frames = dfd_video.video.read_video_frames(str(setup["root"] / "videos" / "clip02.mp4"), 9, 8, 32, 48)
    seed = dfd_video.prepare.video_seed(str(setup["root"] / "videos" / "clip02.mp4"), str(setup["root"] / "videos"))
    torch.testing.assert_close(data[2]["latents"], enc.encode_video(frames, seed)["latents"], atol=1e-4, rtol=0)


def same_checkpoints(a: str, b: str, names=("student", "fake", "ema")) -> dict:
    """Asserts two step folders hold bit-identical weights and Adam states; returns the first's state.pt."""
    for name in names:
        wa, wb = load_file(f"{a}/{name}.safetensors"), load_file(f"{b}/{name}.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    st_a, st_b = (torch.load(f"{x}/state.pt", weights_only=True) for x in (a, b))  # plain data only
    assert st_a["position"] == st_b["position"] and st_a["step"] == st_b["step"]
    for k, v in st_a["optim"]["student"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], st_b["optim"]["student"]["state"][k]["exp_avg_sq"])
    return st_a


def test_train_resume_sample_export(setup, capsys):
    """In one process: a 4-step run logs every metric; the same run stopped after its step-1 checkpoint (with what a
    kill during a save leaves beside it) and resumed ends bit-identical; `sample` writes playable mp4s named by prompt
    and seed, the same video from precomputed embeddings; `export` loads in diffusers' WanPipeline and gives sample's
    latents. (The same resume after a real SIGKILL of a separate process: test_killed_run_resumes_bitwise, slow.)"""
    s, root = setup, setup["root"]
    run_a, run_b = str(root / "run_a"), str(root / "run_b")
    wan_dfd.main(train_args(s, run_a, "--steps", "4"))  # no subcommand: train
    logs = [json.loads(line) for line in open(os.path.join(run_a, "metrics.jsonl"))]
    assert [r["step"] for r in logs] == list(range(4))
    for key in ("loss_student", "loss_fake", "grad_norm_student", "grad_norm_fake", "delta2", "dfd", "step_time_s",
                "peak_mem_gb", "dm_normaliser", "t_mean"):
        assert all(key in r and r[key] == r[key] for r in logs), key
    assert {r["dfd"] for r in logs} == {0.0, 1.0}  # both branches of the p = 0.5 coin were taken
    assert "teacher_gap" in logs[0] and "teacher_gap" not in logs[1]
    wan_dfd.main(["train", *train_args(s, run_b, "--steps", "2")])  # stops after its step-1 checkpoint
    leftovers = [os.path.join(run_b, "checkpoints", "step-000003.tmp99999"), os.path.join(run_b, "args.json.tmp99999")]
    os.makedirs(leftovers[0])  # what a kill during a save leaves
    open(leftovers[1], "w").close()
    wan_dfd.main(["train", *train_args(s, run_b, "--steps", "4"), "--resume"])
    assert not any(os.path.exists(x) for x in leftovers) and not glob.glob(f"{run_b}/**/*.tmp*", recursive=True)
    assert [json.loads(x)["step"] for x in open(os.path.join(run_b, "metrics.jsonl"))] == list(range(4))
    a, b = (os.path.join(r, "checkpoints", "step-000003") for r in (run_a, run_b))
    assert same_checkpoints(a, b)["position"] == 4 * 2  # 4 steps x (1 fake + 1 student) micro-batches
    student0 = tiny_wan.tiny_transformer(5).state_dict()
    assert any(not torch.equal(student0[k], v) for k, v in load_file(f"{a}/student.safetensors").items())  # it trained
    # sample: 2 prompts x 2 seeds -> 4 playable mp4s named by prompt index and seed
    prompts = root / "prompts.txt"
    prompts.write_text("a red ball rolls left\nblue square moves up\n")
    out = str(root / "samples")
    wan_dfd.main(["sample", "--model-dir", s["pipe"], "--ckpt", run_a, "--prompts", str(prompts), "--seeds", "0", "7",
                  "--out", out, *SIZE, "--device", "cpu", "--save-latents"])
    import av
    names = sorted(os.path.basename(p) for p in glob.glob(f"{out}/*.mp4"))
    assert names == ["prompt000_seed0.mp4", "prompt000_seed7.mp4", "prompt001_seed0.mp4", "prompt001_seed7.mp4"]
    for n in names:
        with av.open(f"{out}/{n}") as box:
            frames = [f.to_ndarray(format="rgb24") for f in box.decode(video=0)]
        assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    lat = {n: load_file(f"{out}/{n[:-4]}.safetensors")["latents"] for n in names}
    assert not torch.allclose(lat["prompt000_seed0.mp4"], lat["prompt000_seed7.mp4"])
    # precomputed embeddings instead of text: the same video
    emb = str(root / "emb.safetensors")
    enc = wan_dfd.WanEncoders(s["pipe"], torch.device("cpu"), vae=False)
    save_file({"text": enc.encode_text(["blue square moves up"])["text"]}, emb)
    capsys.readouterr()
    wan_dfd.main(["sample", "--model-dir", s["pipe"], "--ckpt", run_a, "--embeddings", emb,
                  "--seeds", "7", "--out", str(root / "emb_out"), *SIZE, "--device", "cpu",
                  "--save-latents"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"wrote 1 videos (1 prompts x 1 seeds) to {root / 'emb_out'}"
    again = load_file(str(root / "emb_out" / "prompt000_seed7.safetensors"))["latents"]
    torch.testing.assert_close(again, lat["prompt001_seed7.mp4"], atol=1e-5, rtol=1e-5)
    # export -> diffusers folder; through WanPipeline it gives sample's latents and frames
    exp = str(root / "export")
    wan_dfd.main(["export", "--model-dir", s["pipe"], "--ckpt", run_a, "--out", exp])
    assert os.path.exists(f"{exp}/config.json") and glob.glob(f"{exp}/*.safetensors")
    net = wan_dfd.WanAdapter().load_network(exp)
    ema = load_file(f"{a}/ema.safetensors")  # export and sample default to the EMA
    assert all(torch.equal(v, ema[k]) for k, v in net.state_dict().items() if k in ema)
    lat_p, frames_p = pipeline_student(s["pipe"], net, "a red ball rolls left", seed=7)
    torch.testing.assert_close(lat_p[0], lat["prompt000_seed7.mp4"], atol=1e-4, rtol=1e-4)
    mine = wan_dfd.WanEncoders(s["pipe"], torch.device("cpu"), text=False).vae.decode(lat["prompt000_seed7.mp4"][None])
    assert (frames_p[0] * 255 - mine[0].float()).abs().max() <= 1.0


@pytest.mark.slow
def test_killed_run_resumes_bitwise(setup):
    """`python wan_dfd.py` as users launch it: a run SIGKILLed right after its first checkpoint, then resumed in a new
    process, ends bit-identical to an unbroken run in its own process."""
    s, root = setup, setup["root"]
    run_a, run_b = str(root / "kill_a"), str(root / "kill_b")
    run(train_args(s, run_a))
    latest = tiny_wan.kill_at_first_checkpoint([sys.executable, SCRIPT, "train", *train_args(s, run_b)], run_b, 300)
    assert open(latest).read().strip() == "step-000001"
    assert not os.path.exists(os.path.join(run_b, "checkpoints", "step-000005"))  # it really was cut short
    run(["train", *train_args(s, run_b), "--resume"])
    assert [json.loads(x)["step"] for x in open(os.path.join(run_b, "metrics.jsonl"))] == list(range(6))
    same_checkpoints(*(os.path.join(r, "checkpoints", "step-000005") for r in (run_a, run_b)))


def pipeline_student(pipe_dir, net, prompt, seed):
    """diffusers' WanPipeline running the student's ODE sampler (`sample`'s default, FastGen's "ode"): the
    FlowMatchEulerDiscreteScheduler at the student's sigmas, no CFG."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps = functools.partial(sched.set_timesteps, sigmas=list(dfd.STUDENT_TS))
    pipe = WanPipeline.from_pretrained(pipe_dir, transformer=net, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 16, 3, 4, 6), generator=g)
    kw = dict(prompt=prompt, height=32, width=48, num_frames=9, num_inference_steps=4, guidance_scale=1.0)
    lat = pipe(**kw, latents=noise.clone(), output_type="latent").frames
    frames = pipe(**kw, latents=noise.clone(), output_type="np").frames
    return lat, torch.as_tensor(frames)


def test_export_loads_with_from_pretrained(setup, tmp_path):
    """(diffusers 0.42.1 needs accelerate, in requirements.txt, for WanTransformer3DModel.from_pretrained.)"""
    from diffusers import WanTransformer3DModel
    wan_dfd.main(["export", "--model-dir", setup["pipe"], "--ckpt", setup["dmd2"]["folder"], "--out", str(tmp_path / "e")])
    net = WanTransformer3DModel.from_pretrained(str(tmp_path / "e"))
    ref = tiny_wan.tiny_transformer(5).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())


def main_error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        wan_dfd.main(argv)
    return str(e.value.code)


def test_bad_inputs_get_one_clear_line(setup, tmp_path):
    s = setup
    base = lambda **over: sum(([f"--{k.replace('_', '-')}", *([v] if isinstance(v, str) else v)] for k, v in
                               {"model_dir": s["pipe"], "data": s["data"], "dmd2_ckpt": s["dmd2"]["pt"],
                                "out": str(tmp_path / "r"), "device": "cpu", "batch_size": "2", **over}.items()),
                      ["--bidirectional-ckpt"])
    cases = [
        (base(p="1.5"), r"--p 1.5: must be in \[0, 1\]"),
        (base(p_t_min="1.5"), r"--p-t-min 1.5: must be in \[0, 1\]"),
        (base(steps="0"), "--student-steps 0: must be >= 1"),
        (base(keep="0"), "--keep 0: must be >= 1"),
        (base(lr="0"), "--lr 0.0: must be a finite number > 0"),
        (base(student_ts=["0.5", "0.9"]), r"--student-ts \[0.5, 0.9\]: must be strictly decreasing"),
        (base(batch_size="3", grad_accum="2"), "--batch-size 3 is not a multiple of ranks x --grad-accum = 1 x 2"),
        (base(model_dir=str(tmp_path / "nope")), "--model-dir .*nope: no such folder"),
        (base(data=str(tmp_path / "nodata")), "--data .*nodata: no such folder"),
        (base(dmd2_ckpt=str(tmp_path / "x.pt")), "--dmd2-ckpt .*x.pt: no such file"),
        (base(out=str(tmp_path / "afile" / "run")), r"--out \S+/afile/run: \S+/afile is a file, not a folder$"),
    ]
    (tmp_path / "afile").write_text("")
    for argv, msg in cases:
        got = main_error(["train", *argv])
        assert re.search(msg, got) and "\n" not in got, (argv, got)
    # a corrupt model folder: garbage config, then truncated weights
    bad = tmp_path / "badmodel"
    shutil.copytree(s["pipe"], bad)
    (bad / "transformer" / "config.json").write_text("{garbage")
    assert "transformer/config.json: not a WanTransformer3DModel config" in main_error(["train", *base(model_dir=str(bad))])
    shutil.copy(os.path.join(s["pipe"], "transformer", "config.json"), bad / "transformer" / "config.json")
    w = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    assert "diffusion_pytorch_model.safetensors: cannot read weights" in main_error(["train", *base(model_dir=str(bad))])
    # data: wrong shapes, missing negative embedding, text width the transformer cannot take
    d2 = tmp_path / "d2"
    shutil.copytree(s["data"], d2)
    shard = sorted(glob.glob(f"{d2}/shard-*.safetensors"))[0]
    t = load_file(shard)
    save_file({"latents": t["latents"][:, :, :2].contiguous(), "text": t["text"]}, shard)
    assert "'latents' has shape (3, 16, 2, 4, 6), manifest says (3, 16, 3, 4, 6)" in main_error(["train", *base(data=str(d2))])
    save_file(t, shard)
    os.remove(d2 / "negative.safetensors")
    assert "no negative-prompt embedding" in main_error(["train", *base(data=str(d2))])
    d3 = tmp_path / "d3"
    w3 = dfd_video.data.ShardWriter(str(d3))
    w3.add({"latents": torch.zeros(16, 3, 4, 6), "text": torch.zeros(512, 8)})
    w3.close({}, {"text": torch.zeros(512, 8)})
    assert "text embeddings have shape (512, 8); the transformer wants [L, 32]" in main_error(["train", *base(data=str(d3))])
    # prepare: an empty folder, and a folder whose only video is unreadable
    (tmp_path / "empty").mkdir()
    prep = ["prepare", "--model-dir", s["pipe"], "--out", str(tmp_path / "p"), *SIZE, "--device", "cpu"]
    assert "empty: no video files" in main_error([*prep, "--videos", str(tmp_path / "empty")])
    tiny_wan.make_videos(str(tmp_path / "junk"), n=0, broken=1)
    assert "none of the 1 videos was usable (" in main_error([*prep, "--videos", str(tmp_path / "junk")])
    # sample into an unwritable --out: said before the (here empty, so unloadable) model folder is read
    (tmp_path / "nomodel").mkdir()
    got = main_error(["sample", "--model-dir", str(tmp_path / "nomodel"), "--ckpt", s["dmd2"]["pt"], "--prompts",
                      str(tmp_path / "afile"), "--out", str(tmp_path / "afile" / "videos")])
    assert re.fullmatch(r"error: --out \S+/afile/videos: \S+/afile is a file, not a folder", got), got
    # sample: missing prompt file; export of a checkpoint that does not fit
    assert "missing.txt: no such file or folder" in main_error(
        ["sample", "--model-dir", s["pipe"], "--ckpt", s["dmd2"]["pt"], "--bidirectional-ckpt", "--prompts", str(tmp_path / "missing.txt")])
    bad_emb = tmp_path / "emb.safetensors"
    save_file({"prompt": torch.zeros(1, 512, 32)}, str(bad_emb))
    assert "need a tensor 'text' of shape [N, 512, D]" in main_error(
        ["sample", "--model-dir", s["pipe"], "--ckpt", s["dmd2"]["pt"], "--bidirectional-ckpt", "--embeddings", str(bad_emb)])
    other = tmp_path / "other.safetensors"
    save_file({"blocks.0.x": torch.zeros(1)}, str(other))
    assert "weights do not fit WanTransformer3DModel" in main_error(
        ["export", "--model-dir", s["pipe"], "--ckpt", str(other), "--out", str(tmp_path / "ex")])


def test_non_finite_loss_stops_and_keeps_the_checkpoint(setup, tmp_path):
    s = setup
    out = str(tmp_path / "run")
    common = ["--model-dir", s["pipe"], "--dmd2-ckpt", s["dmd2"]["safetensors"], "--out", out, "--device", "cpu",
              "--batch-size", "2", "--fake-updates", "0", "--save-every", "1", "--monitor-every", "0"]
    wan_dfd.main(["train", *common, "--data", s["data"], "--steps", "1"])
    ckpt = os.path.join(out, "checkpoints", "step-000000")
    digest = lambda: {f: hashlib.sha256(open(os.path.join(ckpt, f), "rb").read()).hexdigest() for f in os.listdir(ckpt)}
    before = digest()
    nan = tmp_path / "nan"
    shutil.copytree(s["data"], nan)
    for shard in glob.glob(f"{nan}/shard-*.safetensors"):
        t = load_file(shard)
        save_file({"latents": torch.full_like(t["latents"], float("nan")), "text": t["text"]}, shard)
    msg = main_error(["train", *common, "--data", str(nan), "--steps", "3", "--resume", "--allow-changes"])  # other data: allowed, on purpose
    assert msg.startswith("error: training stopped: non-finite") and "step-000000 is untouched" in msg, msg
    assert digest() == before and open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step-000000"


def test_a_run_folder_is_never_mixed_or_left_half_written(setup, tmp_path, monkeypatch, capfd):
    """A full disk at the first checkpoint: one line, no partial folder. Training again into that --out is refused
    (before any model loads) naming --resume and --overwrite; --overwrite renames the earlier run and says so."""
    s = setup
    out = str(tmp_path / "run")
    argv = ["train", "--model-dir", s["pipe"], "--data", s["data"], "--dmd2-ckpt", s["dmd2"]["dcp"], "--out", out,
            "--device", "cpu", "--batch-size", "2", "--fake-updates", "0", "--steps", "1", "--monitor-every", "0"]

    def torch_disk_full(*a, **k):  # torch.save on a full disk: a RuntimeError that does not say so
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", torch_disk_full)
    usage = shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=0))
    msg = main_error(argv)
    monkeypatch.undo()
    assert re.fullmatch(rf"error: could not write {re.escape(out)}/checkpoints/step-000000: no space left on device; "
                        r"0.0 GB free on the disk mounted at /\S*", msg), msg
    assert os.listdir(os.path.join(out, "checkpoints")) == []  # the partial step-000000.tmpPID is gone
    before = {f: open(os.path.join(out, f)).read() for f in ("args.json", "metrics.jsonl")}
    empty = tmp_path / "empty_model"
    empty.mkdir()
    msg = main_error([*argv[:2], str(empty), *argv[3:]])  # refused before the (unloadable) model folder is read
    assert re.fullmatch(rf"error: --out {re.escape(out)} already holds a run \(checkpoints, metrics.jsonl, args.json\): "
                        r"pass --resume to continue it, or --overwrite to move it to \S+\.old-<date>-<time> and start "
                        "afresh", msg), msg
    assert {f: open(os.path.join(out, f)).read() for f in before} == before
    capfd.readouterr()
    wan_dfd.main([*argv, "--overwrite"])
    err = capfd.readouterr().err
    aside = glob.glob(f"{out}.old-*")
    assert len(aside) == 1 and err.count("--overwrite: moved") == 1
    assert f"--overwrite: moved the earlier run in {out} to {aside[0]}\n" in err
    assert {f: open(os.path.join(aside[0], f)).read() for f in before} == before  # the earlier run, untouched
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step-000000"]


def test_help_and_cli_error_format(capsys):
    for cmd, flag in (("train", "--dmd2-ckpt"), ("prepare", "--videos"), ("sample", "--prompts"), ("export", "--ckpt")):
        with pytest.raises(SystemExit) as e:
            wan_dfd.main([cmd, "--help"])
        assert e.value.code == 0 and flag in capsys.readouterr().out
    r = subprocess.run([sys.executable, SCRIPT, "--p", "2", "--model-dir", ".", "--data", "."], env=tiny_wan.quiet_env(),
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip() == "error: --p 2.0: must be in [0, 1]", r.stderr


def test_method_flags_reach_the_loop(setup, tmp_path, capsys):
    """--p 0 is plain DMD (no DFD step), --p 1 DFD on every step, and with --p-t-min 1 on no sample (every t is
    below --t-max 0.999); --grad-accum and --backward-sim run and the data position counts (fake updates + 1) x
    grad-accum micro-batches per step."""
    s = setup
    common = ["--model-dir", s["pipe"], "--data", s["data"], "--dmd2-ckpt", s["dmd2"]["folder"], "--device", "cpu",
              "--steps", "3", "--fake-updates", "0", "--save-every", "0", "--monitor-every", "0"]
    for p, extra, want in (("0", [], 0.0), ("1", [], 1.0), ("1", ["--p-t-min", "1"], 0.0)):
        name = p + "".join(extra)
        last = wan_dfd.main(["train", *common, "--p", p, *extra, "--batch-size", "1",
                             "--out", str(tmp_path / name)])
        logs = [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")]
        assert [r["dfd"] for r in logs] == [want] * 3 and last["step"] == 2
        closing = capsys.readouterr().err.strip().splitlines()[-1]  # says where the run went
        assert closing.startswith("trained --student-steps 3") and str(tmp_path / name / "checkpoints" / "step-000002") in closing
    out = tmp_path / "acc"
    wan_dfd.main(["train", *common, "--grad-accum", "2", "--batch-size", "2", "--backward-sim",
                  "--fake-updates", "1", "--out", str(out)])
    st = torch.load(out / "checkpoints" / "step-000002" / "state.pt", weights_only=True)
    assert st["position"] == 3 * (1 + 1) * 2 and st["args"]["backward_sim"]


def test_prepare_resumes_after_the_last_full_shard(setup, tmp_path, capsys):
    """An interrupted prepare (here: stopped after its first shard, as a kill would leave it) continues with
    --resume and ends with the same shards as the uninterrupted run."""
    s = setup
    videos = str(s["root"] / "videos")
    argv = ["prepare", "--model-dir", s["pipe"], "--videos", videos, *SIZE, "--per-shard", "2", "--store-dtype",
            "fp32", "--device", "cpu"]
    full = wan_dfd.main([*argv, "--out", str(tmp_path / "full")])
    out = tmp_path / "cut"
    # 5 files: clip00..03 and broken0; a Ctrl-C on the fourth read hits after shard 0 (2 clips)
    tiny_wan.interrupted_prepare([*argv, "--out", str(out)], at=4)
    real = dfd_video.prepare.read_video_frames
    prog = json.load(open(out / "progress-r00.json"))
    assert prog["done"] == 2 and len(prog["shards"]) == 1 and not (out / "manifest.json").exists()
    seen = []
    with pytest.raises(SystemExit, match=r"already holds a prepared data set \(progress-r00.json, shard-r00-00000"
                                         r".safetensors\); pass --resume"):
        wan_dfd.main([*argv, "--out", str(out)])  # without --resume: refused, nothing read or written
    capsys.readouterr()
    dfd_video.prepare.read_video_frames = lambda path, *a, **k: seen.append(os.path.basename(path)) or real(path, *a, **k)
    try:
        resumed = wan_dfd.main([*argv, "--out", str(out), "--resume"])
    finally:
        dfd_video.prepare.read_video_frames = real
    bar = [int(n) for n in re.findall(r"prepare:\s+\d+%\|[^|]*\|\s*(\d+)/5\b", capsys.readouterr().err)]
    assert bar and bar[0] == 2 and bar[-1] == 5 and max(bar) == 5, bar  # starts at the 2 done, ends at 5 of 5
    assert "clip00.mp4" not in seen and "clip01.mp4" not in seen  # the finished shard was not redone
    assert resumed["shards"] == full["shards"] and resumed["count"] == full["count"] == 4
    assert [x["file"] for x in resumed["skipped"]] == [x["file"] for x in full["skipped"]]
    for sh in full["shards"]:
        a, b = load_file(str(tmp_path / "full" / sh["file"])), load_file(str(out / sh["file"]))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "progress-r00.json").exists()


def test_train_from_a_fastgen_fsdp_checkpoint_logs_where_each_network_came_from(setup, tmp_path, capsys):
    """--dmd2-ckpt <iter>.pth of FastGen's per-network folders: the student from net_model, the fake score from the
    sibling fake_score_model (not the teacher), one logged line each; a Self-Forcing .pt takes the causal path."""
    s = setup
    gen, critic = tiny_wan.tiny_transformer(5), tiny_wan.tiny_transformer(6)
    stem = tiny_wan.write_fastgen_fsdp(str(tmp_path / "fastgen"), 25000, {"net": gen, "fake_score": critic})
    out = tmp_path / "run"
    common = ["--model-dir", s["pipe"], "--data", s["data"], "--device", "cpu", "--steps", "1", "--fake-updates", "0",
              "--save-every", "0", "--monitor-every", "0", "--batch-size", "1"]
    wan_dfd.main(["train", *common, "--dmd2-ckpt", stem + ".pth", "--out", str(out)])
    err = capsys.readouterr().err
    n = len(gen.state_dict())
    assert f"  student    <- {stem}.net_model ({n} tensors)\n" in err
    assert f"  fake score <- {stem}.fake_score_model ({n} tensors)\n" in err
    fake = load_file(str(out / "checkpoints" / "step-000000" / "fake.safetensors"))  # no fake update was made
    assert all(torch.equal(fake[k], v) for k, v in critic.state_dict().items())
    # (its data check names the causal student's block size: the causal path, without training; tests/test_causal.py)
    assert "the causal student needs a multiple of --frames-per-block 2" in main_error(
        ["train", *common, "--dmd2-ckpt", s["dmd2"]["pt"], "--frames-per-block", "2", "--out", str(tmp_path / "r")])
