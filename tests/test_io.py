"""dfd_video's file handling (weights, data, video, runs): every --dmd2-ckpt format, weight mismatches, data shards,
video I/O, atomic checkpoints."""
import errno
import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_wan
import dfd_video.data
import dfd_video.distributed
import dfd_video.files
import dfd_video.runs
import dfd_video.video
import dfd_video.weights
import wan_dfd

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def nets():
    return tiny_wan.tiny_transformer(0), tiny_wan.tiny_transformer(1), tiny_wan.tiny_transformer(2)


def _same(net, ref):
    return all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))


def test_every_dmd2_format_loads_identical_weights(tmp_path, nets):
    gen, critic, ema = nets
    assert not _same(gen, critic)
    paths = tiny_wan.write_dmd2_checkpoints(str(tmp_path), gen, critic, ema)
    adapter = wan_dfd.WanAdapter()
    for fmt, path in paths.items():
        net = tiny_wan.tiny_transformer(3)
        dfd_video.weights.load_weights(net, dfd_video.weights.read_checkpoint(path, "generator"), path, adapter.convert_state_dict)
        assert _same(net, gen), fmt
        c = dfd_video.weights.read_checkpoint(path, "critic")
        if fmt in ("pt", "dcp"):
            dfd_video.weights.load_weights(net, c, path, adapter.convert_state_dict)
            assert _same(net, critic), fmt
        else:
            assert c is None, fmt  # plain weights: the fake score will start from the teacher
    # the .pt holds an EMA under DDP's "module." prefix; the others fall back to the generator
    net = tiny_wan.tiny_transformer(3)
    dfd_video.weights.load_weights(net, dfd_video.weights.read_checkpoint(paths["pt"], "generator_ema"), "pt", adapter.convert_state_dict)
    assert _same(net, ema)
    dfd_video.weights.load_weights(net, dfd_video.weights.read_checkpoint(paths["dcp"], "generator_ema"), "dcp")
    assert _same(net, gen)


def test_original_keys_round_trip_through_diffusers_converter(nets):
    sd = nets[0].state_dict()
    orig = tiny_wan.to_original_keys(sd)
    assert "head.head.weight" in orig and any("self_attn.q" in k for k in orig)
    back = wan_dfd.WanAdapter().convert_state_dict(orig)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_weight_mismatches_are_listed(tmp_path, nets):
    net = tiny_wan.tiny_transformer(3)
    sd = dict(nets[0].state_dict())
    dropped = sd.pop("proj_out.weight")
    with pytest.raises(ValueError, match=r"ckpt: weights do not fit WanTransformer3DModel: 1 missing \[proj_out.weight\]"):
        dfd_video.weights.load_weights(net, sd, "ckpt")
    with pytest.raises(ValueError, match=r"1 unexpected \[extra.bias\]"):
        dfd_video.weights.load_weights(net, {**sd, "proj_out.weight": dropped, "extra.bias": torch.zeros(1)}, "ckpt")
    with pytest.raises(ValueError, match=r"1 shape mismatches \[proj_out.weight: file \(3, 3\) vs model"):
        dfd_video.weights.load_weights(net, {**sd, "proj_out.weight": torch.zeros(3, 3)}, "ckpt")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="broken.safetensors: cannot read weights"):
        dfd_video.weights.read_checkpoint(str(bad))
    with pytest.raises(ValueError, match="no such file"):
        dfd_video.weights.read_checkpoint(str(tmp_path / "absent.pt"))


def test_strip_prefixes():
    t = torch.zeros(1)
    sd = {"module.model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.w": t,
          "module.model._orig_mod.head.b": t}
    assert set(dfd_video.weights.strip_prefixes(sd)) == {"blocks.0.w", "head.b"}


def _write_data(folder, n=5, per_shard=2, negative=True):
    w = dfd_video.data.ShardWriter(str(folder), per_shard)
    for i in range(n):
        w.add({"latents": torch.full((16, 2, 2, 2), float(i)), "text": torch.full((512, 32), float(i))})
    return w.close({"adapter": "wan"}, {"text": torch.zeros(512, 32)} if negative else None)


def test_shards_round_trip_and_stream_position(tmp_path):
    m = _write_data(tmp_path)
    assert m["count"] == 5 and len(m["shards"]) == 3 and m["shapes"]["latents"] == [16, 2, 2, 2]
    data = dfd_video.data.LatentShards(str(tmp_path), ("latents", "text"))
    assert [int(data[i]["latents"][0, 0, 0, 0]) for i in range(5)] == [0, 1, 2, 3, 4]
    ids = lambda it, k: [next(it)["latents"][:, 0, 0, 0, 0].tolist() for _ in range(k)]
    full = ids(data.batches(0, 2, 0, 1, seed=3), 7)  # 14 samples: crosses two epoch boundaries
    assert sorted(sum(full[:2], []) + [full[2][0]]) == [0, 1, 2, 3, 4]  # epoch 0 is a permutation
    assert ids(data.batches(4, 2, 0, 1, seed=3), 3) == full[4:7]  # resuming at position 4 repeats the stream
    # two ranks with per-rank batch 1 see exactly the single-rank stream of batch 2
    r0, r1 = ids(data.batches(0, 1, 0, 2, seed=3), 7), ids(data.batches(0, 1, 1, 2, seed=3), 7)
    assert [a + b for a, b in zip(r0, r1)] == full


def test_bad_data_gets_one_clear_message(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        dfd_video.data.LatentShards(str(tmp_path), ("latents", "text"))
    _write_data(tmp_path, negative=False)
    with pytest.raises(ValueError, match="no negative-prompt embedding"):
        dfd_video.data.LatentShards(str(tmp_path), ("latents", "text"))
    _write_data(tmp_path)
    with pytest.raises(ValueError, match="manifest has no mask"):
        dfd_video.data.LatentShards(str(tmp_path), ("latents", "mask"))
    shard = tmp_path / "shard-00001.safetensors"
    save_file({"latents": torch.zeros(2, 16, 2, 2, 3), "text": torch.zeros(2, 512, 32)}, str(shard))
    with pytest.raises(ValueError, match=r"shard-00001.safetensors: 'latents' has shape \(2, 16, 2, 2, 3\), manifest says \(2, 16, 2, 2, 2\)"):
        dfd_video.data.LatentShards(str(tmp_path), ("latents", "text"))
    save_file({"latents": torch.zeros(2, 16, 2, 2, 2)}, str(shard))
    with pytest.raises(ValueError, match=r"shard-00001.safetensors has no tensor 'text' \(has latents\)"):
        dfd_video.data.LatentShards(str(tmp_path), ("latents", "text"))
    os.remove(shard)
    with pytest.raises(ValueError, match="shard-00001.safetensors is listed in the manifest but missing"):
        dfd_video.data.LatentShards(str(tmp_path), ("latents", "text"))
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        dfd_video.data.LatentShards(str(tmp_path), ("latents", "text"))


def test_video_frames_resampled_resized_and_round_trip(tmp_path):
    """A 16-frame 8 fps clip whose brightness encodes the frame index, read at 4 fps: frames 0, 2, 4, ..."""
    T, H, W = 16, 48, 64
    frames = np.stack([np.full((H, W, 3), 10 + 15 * i, np.uint8) for i in range(T)])
    path = str(tmp_path / "ramp.mp4")
    dfd_video.video.write_mp4(path, frames, fps=8)
    x = dfd_video.video.read_video_frames(path, num_frames=5, fps=4, height=32, width=32)
    assert x.shape == (5, 32, 32, 3) and x.dtype == torch.uint8
    got = x.float().mean(dim=(1, 2, 3))
    assert torch.allclose(got, torch.tensor([10.0 + 15 * 2 * k for k in range(5)]), atol=4), got
    with pytest.raises(ValueError, match="too short"):
        dfd_video.video.read_video_frames(path, num_frames=9, fps=4, height=32, width=32)  # needs 2 s, clip is 2 s - 1 frame
    (tmp_path / "junk.mp4").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.mp4: unreadable video"):
        dfd_video.video.read_video_frames(str(tmp_path / "junk.mp4"), 5, 4, 32, 32)


def test_cast_keeps_diffusers_fp32_modules():
    net = dfd_video.distributed.cast_keeping_fp32(tiny_wan.tiny_transformer(0), torch.bfloat16)
    fp32 = {n for n, p in net.named_parameters() if p.dtype == torch.float32}
    assert "condition_embedder.time_embedder.linear_1.weight" in fp32 and "blocks.1.scale_shift_table" in fp32
    assert net.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16 and net.patch_embedding.weight.dtype == torch.bfloat16
    adapter = wan_dfd.WanAdapter()
    x0 = adapter.denoiser(net, dtype=torch.bfloat16)(torch.randn(1, 16, 3, 4, 6), torch.tensor([0.5]), torch.randn(1, 512, 32))
    assert x0.dtype == torch.float32 and x0.shape == (1, 16, 3, 4, 6) and torch.isfinite(x0).all()


def _one_step_net():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    return net, opt


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way (here: writing state.pt) leaves `latest` on the previous complete checkpoint, no
    temporary folder behind, and one line naming the folder, the disk and why."""
    d = dfd_video.distributed.setup_distributed("cpu")
    try:
        net, opt = _one_step_net()
        first = dfd_video.runs.save_checkpoint(str(tmp_path), 0, {"student": net}, {"student": opt}, {"position": 1}, d)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with torch.no_grad():
            net.weight.add_(1.0)

        def disk_full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        def torch_disk_full(*a, **k):  # what torch.save raises on a full disk: no errno, no "no space"
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0\nframe #0: ...")
        free = shutil.disk_usage(str(tmp_path))
        for writer, usage in ((disk_full, free), (torch_disk_full, free._replace(free=2**20))):
            monkeypatch.setattr(torch, "save", writer)
            monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
            with pytest.raises(SystemExit) as e:
                dfd_video.runs.save_checkpoint(str(tmp_path), 1, {"student": net}, {"student": opt}, {"position": 2}, d)
            monkeypatch.undo()
            msg = str(e.value.code)
            assert re.fullmatch(r"error: could not write \S+/checkpoints/step-000001: no space left on device; "
                                r"[\d.]+ GB free on the disk mounted at /\S*", msg), msg
            assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000000"]  # no step-000001.tmpPID
        assert dfd_video.runs.latest_checkpoint(str(tmp_path)) == first
        weights, state = dfd_video.runs.load_checkpoint(str(tmp_path))
        assert state["step"] == 0 and state["position"] == 1
        assert all(torch.equal(weights["student"][k], before[k]) for k in before)
    finally:
        dfd_video.distributed.teardown_distributed()


# ---------------------------------------------------------------------------------------------------
# DMD2 checkpoints as the authors' tools write them: describe_dmd2 (what train logs and refuses)


def _loads(desc, role, ref):
    """The network describe_dmd2 names for `role` loads into a fresh tiny Wan as exactly `ref`."""
    net, src = tiny_wan.tiny_transformer(3), desc["networks"][role]
    sd = dfd_video.weights.read_checkpoint(src["source"], src["role"])
    dfd_video.weights.load_weights(net, sd, src["source"], wan_dfd.WanAdapter().convert_state_dict)
    return _same(net, ref)


def test_fastgen_fsdp_checkpoint_from_any_entry_point(tmp_path, nets):
    gen, critic, ema = nets
    stem = tiny_wan.write_fastgen_fsdp(str(tmp_path / "checkpoints"), 500, {"net": gen, "fake_score": critic, "ema": ema})
    assert os.path.basename(stem) == "0000500"
    describe = dfd_video.weights.describe_dmd2
    for entry in (stem + ".net_model", stem + ".fake_score_model/", stem + ".ema_model", stem + ".net_optim",
                  stem + ".pth", stem, str(tmp_path / "checkpoints")):
        d = describe(entry)
        assert d["format"] == "fastgen-fsdp" and not d["refusals"] and not d["warnings"], (entry, d)
        n = d["networks"]
        assert n["student"]["source"] == stem + ".net_model" and n["fake_score"]["source"] == stem + ".fake_score_model"
        assert n["ema"]["source"] == stem + ".ema_model"
        assert n["student"]["tensors"] == len(gen.state_dict()) == n["fake_score"]["tensors"]
    d = describe(stem + ".pth")
    assert _loads(d, "student", gen) and _loads(d, "fake_score", critic)
    lines = dfd_video.weights.describe_lines(d)
    assert "iteration 500" in lines[0]
    assert lines[1] == f"  student    <- {stem}.net_model ({len(gen.state_dict())} tensors)"
    assert lines[2] == f"  fake score <- {stem}.fake_score_model ({len(gen.state_dict())} tensors)"
    assert "its EMA is not used" in lines[3] and "0000500.ema_model" in lines[3]
    d = describe(stem, init_from="generator_ema", fake_init="teacher")
    assert _loads(d, "student", ema) and d["networks"]["fake_score"] is None
    assert dfd_video.weights.describe_lines(d)[2] == "  fake score <- the teacher (--model-dir)"
    # a second iteration in the folder: the latest, with a note; the prefix picks another
    tiny_wan.write_fastgen_fsdp(str(tmp_path / "checkpoints"), 1000, {"net": ema, "fake_score": critic})
    d = describe(str(tmp_path / "checkpoints"))
    assert d["networks"]["student"]["source"].endswith("0001000.net_model") and d["networks"]["ema"] is None
    assert d["warnings"] == [f"{tmp_path / 'checkpoints'} holds FastGen iterations 0000500, 0001000; using the latest, "
                             f"0001000 (pass {stem} for another)"]
    assert describe(stem)["networks"]["student"]["source"] == stem + ".net_model"


def test_fastgen_pth_without_its_folders_names_them(tmp_path, nets):
    stem = tiny_wan.write_fastgen_fsdp(str(tmp_path), 40, {"net": nets[0], "fake_score": nets[1]})
    for f in ("net_model", "fake_score_model", "net_optim"):
        shutil.rmtree(f"{stem}.{f}")
    d = dfd_video.weights.describe_dmd2(stem + ".pth")
    assert len(d["refusals"]) == 1 and d["networks"]["student"] is None
    assert d["refusals"][0].startswith(f"{stem}.pth: holds no readable weights. FastGen's FSDP checkpointer keeps "
                                       "only the scheduler state")
    assert f"{stem}.net_model/, {stem}.fake_score_model/" in d["refusals"][0]


def test_zipped_dcp_is_refused_with_the_unzip_command(tmp_path, nets):
    import zipfile
    stem = tiny_wan.write_fastgen_fsdp(str(tmp_path), 40, {"net": nets[0]})
    folder = stem + ".net_model"
    shutil.make_archive(folder, "zip", root_dir=str(tmp_path), base_dir="0000040.net_model")  # DFD's release layout
    shutil.rmtree(folder)
    d = dfd_video.weights.describe_dmd2(folder + ".zip")
    assert d["refusals"] == [f"{folder}.zip: the student is a zipped torch.distributed.checkpoint folder, which cannot "
                             "be read in place; unpack it next to the archive, then pass the same --dmd2-ckpt again:  "
                             f"unzip {folder}.zip -d {tmp_path}"]
    with zipfile.ZipFile(folder + ".zip") as z:  # what that command does
        z.extractall(str(tmp_path))
    d = dfd_video.weights.describe_dmd2(folder + ".zip")  # the folder now beside it is used
    assert not d["refusals"] and _loads(d, "student", nets[0])
    assert "holds no critic" in d["warnings"][0]
    # an archive of the files alone unpacks into the folder itself
    flat = str(tmp_path / "flat" / "0000040.net_model")
    shutil.make_archive(flat, "zip", root_dir=folder)
    assert dfd_video.weights.unzip_command(flat + ".zip") == f"unzip {flat}.zip -d {flat}"


def test_self_forcing_and_causvid_pt_are_read_as_causal(tmp_path, nets):
    gen, critic, ema = nets
    paths = tiny_wan.write_dmd2_checkpoints(str(tmp_path), gen, critic, ema)  # "pt": Self-Forcing's model.pt
    causvid = str(tmp_path / "causvid.pt")  # {"generator", "critic"}, WanDiffusionWrapper's model.<original names>
    torch.save({k: {"model." + n: v for n, v in tiny_wan.to_original_keys(m.state_dict()).items()}
                for k, m in (("generator", gen), ("critic", critic))}, causvid)
    for path in (paths["pt"], causvid):
        d = dfd_video.weights.describe_dmd2(path)  # not refused: wan_dfd.py reads it as causal (tests/test_causal.py)
        assert d["format"] == "self-forcing" and not d["refusals"] and not d["warnings"], path
        d = dfd_video.weights.describe_dmd2(path, bidirectional=True)
        assert not d["refusals"] and "block-causal" in d["warnings"][0]
        assert _loads(d, "student", gen) and _loads(d, "fake_score", critic)
    d = dfd_video.weights.describe_dmd2(paths["pt"], init_from="generator_ema", bidirectional=True)
    assert _loads(d, "student", ema)
    # the same networks under diffusers names ({"generator", "critic"} with no wrapper) are not flagged
    plain = str(tmp_path / "plain.pt")
    torch.save({"generator": gen.state_dict(), "critic": critic.state_dict()}, plain)
    assert dfd_video.weights.describe_dmd2(plain)["format"] == "pt"
    sd = dfd_video.weights.load_student_weights(paths["pt"])  # the generator; wan_dfd.py decides the causal reading
    assert set(sd) == set(tiny_wan.to_original_keys(gen.state_dict()))


def test_trigflow_distilled_cosmos_is_refused_by_its_path(tmp_path, nets):
    folder = tmp_path / "Cosmos-Predict2.5-2B" / "base" / "distilled"
    folder.mkdir(parents=True)
    path = str(folder / "575edf0f-d973-4c74-b52c-69929a08d0a5_ema_bf16.pt")
    torch.save({"net." + k: v for k, v in nets[0].state_dict().items()}, path)
    d = dfd_video.weights.describe_dmd2(path)
    assert len(d["refusals"]) == 1 and "TrigFlow" in d["refusals"][0] and "--rectified-flow-ckpt" in d["refusals"][0]
    d = dfd_video.weights.describe_dmd2(path, rectified_flow=True)
    assert not d["refusals"] and "TrigFlow" in d["warnings"][0] and _loads(d, "student", nets[0])
    renamed = str(tmp_path / "student.pt")  # nothing in the file marks it
    shutil.copy(path, renamed)
    assert not dfd_video.weights.describe_dmd2(renamed)["refusals"]


def test_fake_init_and_missing_critic(tmp_path, nets):
    paths = tiny_wan.write_dmd2_checkpoints(str(tmp_path), *nets)
    d = dfd_video.weights.describe_dmd2(paths["safetensors"])
    assert d["networks"]["fake_score"] is None and "fake score starts from the teacher" in d["warnings"][0]
    d = dfd_video.weights.describe_dmd2(paths["safetensors"], fake_init="critic")
    assert d["refusals"][0].startswith("--fake-init critic: ") and "--fake-init teacher" in d["refusals"][0]
    d = dfd_video.weights.describe_dmd2(paths["dcp"], init_from="generator_ema")
    assert d["warnings"] == ["--init-from generator_ema: the checkpoint holds no EMA; the student starts from its "
                             "generator"] and _loads(d, "fake_score", nets[1])
    absent = str(tmp_path / "absent.pt")
    assert dfd_video.weights.describe_dmd2(absent)["refusals"] == [f"{absent}: no such file or folder"]


class RunsCode:
    """What a hostile state.pt could hold: unpickling it calls os.system."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


def test_state_pt_is_plain_data_and_pickled_objects_are_refused(tmp_path):
    """state.pt (optimizer, every RNG, step, args) loads with weights_only=True and restores the RNGs exactly; a
    state.pt holding a pickled object is refused with one line, and the object's code never runs."""
    d = dfd_video.distributed.setup_distributed("cpu")
    try:
        net, opt = _one_step_net()
        random.seed(1), np.random.seed(2), torch.manual_seed(3)
        folder = dfd_video.runs.save_checkpoint(str(tmp_path), 0, {"student": net}, {"student": opt},
                                                {"position": 1, "args": {"student_ts": [0.9, 0.5], "resume": None}}, d)
        want = random.random(), np.random.rand(), torch.rand(1)
        state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
        assert state["args"]["student_ts"] == [0.9, 0.5] and "exp_avg_sq" in state["optim"]["student"]["state"]["bias"]
        dfd_video.runs.set_rng_state(dfd_video.runs.load_checkpoint(folder)[1]["rng"])
        assert (random.random(), np.random.rand(), torch.rand(1)) == want
        flag = tmp_path / "code_ran"
        torch.save({**state, "step": RunsCode(str(flag))}, os.path.join(folder, "state.pt"))
        with pytest.raises(ValueError) as e:
            dfd_video.runs.load_checkpoint(str(tmp_path))
        assert re.search(r"state.pt holds a pickled Python object \(\w+\.system\)", str(e.value)), e.value
        assert "\n" not in str(e.value)
        assert not flag.exists()
        weights, _ = dfd_video.runs.load_checkpoint(str(tmp_path), state=False)  # sample and export read weights only
        assert torch.equal(weights["student"]["weight"], net.weight)
    finally:
        dfd_video.distributed.teardown_distributed()


def test_check_writable_names_the_path(tmp_path):
    (tmp_path / "file").write_text("")
    dfd_video.files.check_writable(str(tmp_path / "new" / "run"), "--out")  # created later: fine
    with pytest.raises(ValueError, match=r"^--out \S+/file/run: \S+/file is a file, not a folder$"):
        dfd_video.files.check_writable(str(tmp_path / "file" / "run"), "--out")
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(ValueError, match=r"^--out \S+/ro/run: no permission to write in \S+/ro$"):
            dfd_video.files.check_writable(str(tmp_path / "ro" / "run"), "--out")


def test_start_run_folder_cleans_temporaries_and_moves_a_run_aside(tmp_path, capsys):
    """What a killed run leaves (*.tmpPID, *.oldPID) goes at the next start; --overwrite renames the earlier run."""
    out = tmp_path / "run"
    ck = out / "checkpoints"
    for folder in ("step-000001", "step-000003.tmp123", "step-000001.old77"):
        (ck / folder).mkdir(parents=True)
    for f in ("checkpoints/latest", "checkpoints/latest.tmp9", "metrics.jsonl", "metrics.jsonl.tmp5", "args.json"):
        (out / f).write_text("x")
    dfd_video.runs.start_run_folder(str(out), overwrite=False)
    assert sorted(os.listdir(ck)) == ["latest", "step-000001"]
    assert sorted(os.listdir(out)) == ["args.json", "checkpoints", "metrics.jsonl"]
    assert dfd_video.runs.run_files(str(out)) == ["checkpoints", "metrics.jsonl", "args.json"]
    dfd_video.runs.start_run_folder(str(out), overwrite=True)
    aside = [x for x in os.listdir(tmp_path) if x.startswith("run.old-")]
    assert len(aside) == 1 and os.listdir(out) == [] and (tmp_path / aside[0] / "checkpoints" / "step-000001").is_dir()
    assert capsys.readouterr().err == f"--overwrite: moved the earlier run in {out} to {tmp_path / aside[0]}\n"
