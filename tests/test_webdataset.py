"""`prepare --videos` from WebDataset tar shards (dfd_video/webdataset.py), written here in the layout FastGen's video
loader reads (000123.mp4 + 000123.txt per sample): brace patterns, the listing and its order, the bytes of a member,
the seeds, every bad input's one line, and prepare's latents and text equal to encoding the same clips directly;
interrupted and resumed, and on two ranks, it gives the shards of one uninterrupted rank (slow)."""
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny_tools
import tiny_wan
import wan_dfd
import dfd_video.prepare
from dfd_video import webdataset as wds
from dfd_video.video import read_video_frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = ["--num-frames", "9", "--height", "32", "--width", "48", "--fps", "8", "--store-dtype", "fp32",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 clips in 2 shards (0, 1 | 2, 3), clip 3 without its caption, plus a latent-only sample and an empty caption."""
    root = tmp_path_factory.mktemp("wds")
    captions = tiny_wan.make_videos(str(root / "videos"), n=4)
    os.remove(root / "videos" / "clip03.txt")
    extra = {"000007.latent.pth": b"not a video", "sub/000008.mp4": open(root / "videos" / "clip00.mp4", "rb").read(),
             "sub/000008.txt": b"  \n"}
    paths = tiny_tools.write_shards(str(root / "shards"), str(root / "videos"), [[0, 1], [2, 3]], extra)
    return {"root": root, "videos": str(root / "videos"), "folder": str(root / "shards"), "paths": paths,
            "captions": captions}


def test_brace_patterns_and_shard_order(tmp_path):
    assert wds.expand_braces("s/{00..02}.tar") == ["s/00.tar", "s/01.tar", "s/02.tar"]
    assert wds.expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert wds.expand_braces("x{0..10..5}") == ["x0", "x5", "x10"] and wds.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="nested braces"):
        wds.expand_braces("{a,{b,c}}")
    for n in ("10.tar", "2.tar", "1.tar"):
        (tmp_path / n).write_bytes(b"")
    assert [os.path.basename(p) for p in wds.shard_paths(str(tmp_path))] == ["1.tar", "2.tar", "10.tar"]  # as FastGen


def test_listing_bytes_and_seeds_are_the_same_whatever_names_the_shards(shards):
    folder, videos = shards["folder"], shards["videos"]
    forms = [folder, "WDS:" + folder, os.path.join(folder, "{00000..00001}.tar")]
    listed = [wds.list_sources(v) for v in forms]
    assert listed[0] == listed[1] == listed[2]
    names = [str(v) for v, _, _ in listed[0]]
    assert names == [os.path.join(folder, "00000.tar", m) for m in ("000000.mp4", "000001.mp4", "sub/000008.mp4")] + \
        [os.path.join(folder, "00001.tar", m) for m in ("000002.mp4", "000003.mp4")]
    assert [c for _, c, _ in listed[0]] == [*shards["captions"][:2], "", shards["captions"][2], ""]
    assert [w is None for _, _, w in listed[0]] == [True, True, False, True, False]  # no caption: that clip skipped
    # seeds are hashes of <shard>/<member> relative to the shards' folder, however --videos named them
    assert {wds.seed_root(v) for v in [*forms, shards["paths"][0]]} == {folder}
    assert len({dfd_video.prepare.video_seed(str(v), folder) for v, _, _ in listed[0]}) == 5
    member = listed[0][3][0]  # clip02, in the second shard
    data = wds.open_source(member)
    assert data.getvalue() == open(os.path.join(videos, "clip02.mp4"), "rb").read() and str(data) == str(member)
    torch.testing.assert_close(read_video_frames(data, 9, 8, 32, 48),
                               read_video_frames(os.path.join(videos, "clip02.mp4"), 9, 8, 32, 48), atol=0, rtol=0)
    assert wds.open_source(os.path.join(videos, "clip02.mp4")) == os.path.join(videos, "clip02.mp4")
    assert wds.list_sources(videos)[0][0] == os.path.join(videos, "clip00.mp4")  # a folder of videos as before


def test_bad_shards_get_one_line(shards, tmp_path):
    gz = tmp_path / "gz" / "00000.tar"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(open(shards["paths"][0], "rb").read()))
    latent = tmp_path / "latent.tar"
    tiny_tools.write_shards(str(tmp_path / "lat"), shards["videos"], [[]], {"000000.latent.pth": b"x"})
    shutil.copy(tmp_path / "lat" / "00000.tar", latent)
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(shards["paths"][0], both)
    shutil.copy(os.path.join(shards["videos"], "clip00.mp4"), both)
    cases = {
        str(gz.parent): rf"--videos: {gz}: not a readable uncompressed tar file \(ReadError",
        os.path.join(shards["folder"], "{00000..00003}.tar"): r"no such tar file .*00002.tar \(and 1 more of the 4\)$",
        str(latent): r"none of its 1 tar shards holds a video \(mp4, .*FastGen's latent shards",
        str(both): r"holds both video files and .tar shards",
    }
    for videos, line in cases.items():
        with pytest.raises(SystemExit, match=line) as e:
            wan_dfd.main(["prepare", "--model-dir", str(tmp_path), "--videos", videos, "--out", str(tmp_path / "o")])
        assert "\n" not in str(e.value.code)


def test_prepare_from_shards_encodes_each_clip_and_caption(shards, tmp_path, capsys):
    pipe = tiny_wan.cached_pipeline()
    pattern = os.path.join(shards["folder"], "{00000..00001}.tar")
    m = wan_dfd.main(["prepare", "--model-dir", pipe, "--videos", pattern, "--out", str(tmp_path / "data"), *SIZE,
                      "--vae-latent", "mode"])
    assert m["count"] == 3
    skipped = sorted((os.path.relpath(x["file"], shards["folder"]), x["reason"]) for x in m["skipped"])
    assert [f for f, _ in skipped] == ["00000.tar/sub/000008.mp4", "00001.tar/000003.mp4"]
    assert all("caption in" in why and f.split(".tar/")[1] in why for f, why in skipped), skipped  # names the member
    enc = wan_dfd.WanEncoders(pipe, torch.device("cpu"))
    data = {k: torch.cat([load_file(str(tmp_path / "data" / s["file"]))[k] for s in m["shards"]]) for k in ("latents", "text")}
    for row, i in enumerate((0, 1, 2)):  # the stored order: shards in order, samples in tar order
        frames = read_video_frames(os.path.join(shards["videos"], f"clip{i:02d}.mp4"), 9, 8, 32, 48)
        torch.testing.assert_close(data["latents"][row], enc.encode_video(frames, None)["latents"], atol=1e-5, rtol=0)
        torch.testing.assert_close(data["text"][row], enc.encode_text([shards["captions"][i]])["text"][0], atol=1e-6,
                                   rtol=0)


@pytest.mark.slow
def test_interrupted_prepare_from_shards_resumes_and_two_ranks_match(shards, tmp_path):
    """Stopped after its first shard (as a kill leaves it) and resumed, prepare from tar shards ends with the shards
    of an uninterrupted run; under torchrun on 2 ranks each rank prepares every other sample and the merged data set
    holds the same samples."""
    pipe = tiny_wan.cached_pipeline()
    argv = ["prepare", "--model-dir", pipe, "--videos", shards["folder"], *SIZE, "--per-shard", "1"]
    full = wan_dfd.main([*argv, "--out", str(tmp_path / "full")])
    tiny_wan.interrupted_prepare([*argv, "--out", str(tmp_path / "cut")], at=2)  # Ctrl-C on the second clip
    assert json.load(open(tmp_path / "cut" / "progress-r00.json"))["done"] == 1
    resumed = wan_dfd.main([*argv, "--out", str(tmp_path / "cut"), "--resume"])
    assert resumed["shards"] == full["shards"] and resumed["skipped"] == full["skipped"]
    for sh in full["shards"]:
        a, b = load_file(str(tmp_path / "full" / sh["file"])), load_file(str(tmp_path / "cut" / sh["file"]))
        assert all(torch.equal(a[k], b[k]) for k in a)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "wan_dfd.py"), *argv, "--out", str(tmp_path / "two")],
                       env=tiny_wan.quiet_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "manifest.json"))
    assert two["count"] == full["count"] == 3 and {s["file"].split("-")[1] for s in two["shards"]} == {"r00", "r01"}
    ones = sorted(load_file(str(tmp_path / "full" / s["file"]))["latents"].sum().item() for s in full["shards"])
    twos = sorted(load_file(str(tmp_path / "two" / s["file"]))["latents"].sum().item() for s in two["shards"])
    assert twos == pytest.approx(ones, abs=1e-4)  # the same clips with the same seeded VAE samples
