"""torchrun --nproc_per_node=2 (gloo, CPU mesh, FSDP2) training equals a single-process run of the same global
batch (tiny_wan.emulate_ranks: dfd's own update steps once per emulated rank, with each rank's data and seeds,
gradients averaged before the optimizer step, which is what FSDP2's reduce-scatter does)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny_wan
import dfd_video.cli
import dfd_video.data
import dfd_video.distributed
import wan_dfd

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, LR = 2, 1e-4


def test_two_ranks_match_single_process(tmp_path, capfd):
    pipe = tiny_wan.cached_pipeline()
    tiny_wan.random_data(tmp_path / "data")
    paths = tiny_wan.write_dmd2_checkpoints(str(tmp_path / "dmd2"), tiny_wan.tiny_transformer(5),
                                            tiny_wan.tiny_transformer(6))
    argv = ["train", "--model-dir", pipe, "--data", str(tmp_path / "data"), "--dmd2-ckpt", paths["pt"], "--bidirectional-ckpt",
            "--out", str(tmp_path / "run"), "--steps", str(STEPS), "--batch-size", "2", "--fake-updates", "2",
            "--lr", str(LR), "--lr-fake", str(LR), "--grad-clip", "0", "--save-every", "0", "--device", "cpu",
            "--monitor-every", "0", "--p", "0.5"]
    # probes on 2 ranks: 3 videos split 2 + 1 (the short rank repeats a forward), gathered on rank 0; they must not
    # move the weights away from the probe-free emulation below
    probes = ["--probe-every", "1", "--probe-seeds", "0", "1", "2", "--probe-count", "1"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "wan_dfd.py"), *argv, *probes], env=tiny_wan.quiet_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = os.path.join(tmp_path, "run", "checkpoints", f"step-{STEPS - 1:06d}")
    state = torch.load(os.path.join(ck, "state.pt"), weights_only=True)
    assert state["world"] == 2 and state["per_rank_batch"] == 1
    parser = __import__("argparse").ArgumentParser()
    dfd_video.cli.add_train_args(parser, wan_dfd.WanAdapter())
    args = parser.parse_args(argv[1:])
    student_ref, fake_ref, logs_ref = tiny_wan.emulate_ranks(wan_dfd.WanAdapter(), args, STEPS, world=2)
    student0 = tiny_wan.tiny_transformer(5).state_dict()
    for name, ref in (("student", student_ref), ("fake", fake_ref)):
        got = load_file(os.path.join(ck, f"{name}.safetensors"))
        moved = max((ref[k] - student0[k]).abs().max().item() for k in ref) if name == "student" else 1.0
        assert moved > LR  # the weights moved, so the comparison is not trivial
        for k in ref:
            # Adam steps are ~LR whatever the gradient's size: agreement to 0.1% of one step, plus what Adam makes of
            # rounding. It divides each element by its own gradient scale sqrt(v), so a 1e-4 rounding error
            # (relative to the tensor's typical gradient) grows where sqrt(v) is far below the typical scale: on
            # AVX-512 kernels one cross-attention element with sqrt(v) 100x below the median moves 1.5e-3 LR apart.
            scale = state["optim"][name]["state"][k]["exp_avg_sq"].sqrt()
            tol = 1e-3 * LR + LR * 1e-4 * scale.median() / (scale + 1e-8)
            worst = ((got[k] - ref[k]).abs() / tol).max().item()
            assert worst < 1.0, (name, k, worst)
    assert [json.loads(x)["step"] for x in open(os.path.join(tmp_path, "run", "probes.jsonl"))] == [-1, 0, 1]
    logs = [json.loads(line) for line in open(os.path.join(tmp_path, "run", "metrics.jsonl"))]
    for a, b in zip(logs, logs_ref):
        assert a["dfd"] == b["dfd"]
        assert abs(a["loss_student"] - b["loss_student"]) <= 1e-5 * max(1.0, abs(b["loss_student"]))
        assert abs(a["delta2"] - b["delta2"]) <= 1e-5 * b["delta2"]
    # resuming the 2-rank checkpoint in one process: accepted (same global batch), and it says it is not exact
    capfd.readouterr()
    wan_dfd.main([*argv, "--steps", str(STEPS + 1), "--resume"])
    err = capfd.readouterr().err
    assert err.count("--resume: the checkpoint was written by 2 ranks, this run has 1: same global batch") == 1, err
    assert "not bit-identical" in err


def test_bad_arguments_under_torchrun_are_said_once(tmp_path, monkeypatch, capsys):
    """Every rank finds a bad argument before the process group starts; rank 0 alone prints it, first, and is the
    root cause torchrun names: torchrun's own ChildFailedError summary follows and cannot be avoided, but it ends with
    the same line (docs/errors.md) and lists no other failure."""
    line = "error: --batch-size 3 is not a multiple of ranks x --grad-accum = 2 x 1"
    argv = ["--model-dir", str(tmp_path), "--data", str(tmp_path), "--device", "cpu"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "wan_dfd.py"), *argv, "--batch-size", "3"], env=tiny_wan.quiet_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count(line) == 2, r.stderr  # the rank's line, and the report's root cause
    assert 'wan_dfd.py", line' not in r.stderr  # no traceback through our code
    assert r.stderr.index(line) < r.stderr.index("ChildFailedError"), r.stderr
    root_cause = r.stderr[r.stderr.index("Root Cause"):]
    assert re.search(r"rank\s*: 0 ", root_cause) and re.search(r"exitcode\s*: 1 ", root_cause), r.stderr
    assert f"traceback : {line}\n" in root_cause and "<NO_OTHER_FAILURES>" in r.stderr, r.stderr
    # argparse's errors too: a rank > 0 waits for torchrun to end it before printing (here nothing ends it)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dfd_video.distributed.time, "sleep", lambda s: print(f"waited {s} s", file=sys.stderr))
    with pytest.raises(SystemExit) as e:
        wan_dfd.main([*argv, "--p", "abc"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("waited 10 s\nusage:")


@pytest.mark.slow
def test_two_rank_prepare_matches_single_process(tmp_path):
    """torchrun prepare splits the videos across ranks; the merged manifest holds the same samples."""
    pipe = tiny_wan.cached_pipeline()
    tiny_wan.make_videos(str(tmp_path / "v"), n=3, broken=1)
    size = ["--num-frames", "9", "--height", "32", "--width", "48", "--fps", "8", "--store-dtype", "fp32",
            "--device", "cpu", "--model-dir", pipe, "--videos", str(tmp_path / "v")]
    script = os.path.join(ROOT, "wan_dfd.py")
    for out, launch in (("one", [sys.executable, script]),
                        ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script])):
        r = subprocess.run([*launch, "prepare", *size, "--out", str(tmp_path / out)], env=tiny_wan.quiet_env(),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (dfd_video.data.LatentShards(str(tmp_path / x), ("latents", "text")) for x in ("one", "two"))
    assert len(one) == len(two) == 3 and len(two.manifest["skipped"]) == 1
    assert {s["file"].split("-")[1] for s in two.manifest["shards"]} == {"r00", "r01"}
    key = lambda d, i: d[i]["text"].sum().item()
    for i in range(3):
        j = min(range(3), key=lambda j: abs(key(two, j) - key(one, i)))
        torch.testing.assert_close(two[j]["latents"], one[i]["latents"], atol=1e-5, rtol=0)
        torch.testing.assert_close(two[j]["text"], one[i]["text"], atol=1e-6, rtol=0)
