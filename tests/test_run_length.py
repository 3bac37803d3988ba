"""The run length in FastGen's unit (dfd_video.length): the counts against FastGen's own loop, the unit a resumed run
keeps, and a tiny `train --iterations` run (names, metrics, the trailing fake-score updates)."""
import argparse
import json
import os

import pytest
import torch

import dfd
import tiny_wan
import wan_dfd
from dfd_video.evaluation import plot
from dfd_video.length import RunLength, resolve


def fastgen_loop(max_iter: int, student_update_freq: int) -> list[str]:
    """What FastGen's trainer runs from a fresh start (fastgen/trainer.py, dmd2.py), one letter per iteration."""
    return ["S" if i % student_update_freq == 0 else "F" for i in range(0 + 1, max_iter)]


def ours(n: RunLength) -> list[str]:
    """What dfd.train runs for RunLength n: per student step fake_updates F then one S, then the tail."""
    return (["F"] * (n.cycle - 1) + ["S"]) * n.student_steps + ["F"] * n.tail


@pytest.mark.parametrize("fake_updates", [0, 1, 4, 5])
def test_iterations_run_exactly_fastgens_updates(fake_updates):
    for max_iter in range(2, 120):
        n = RunLength("iterations", max_iter, fake_updates + 1)
        assert ours(n) == fastgen_loop(max_iter, fake_updates + 1), (max_iter, fake_updates)
        assert n.iteration(n.lines - 1) == max_iter - 1  # FastGen names that state max_iter
    paper = RunLength("iterations", 100, 5)
    assert (paper.student_steps, paper.tail, paper.lines) == (19, 4, 20)
    assert (RunLength("iterations", 300, 5).student_steps, RunLength("iterations", 300, 5).tail) == (59, 4)
    assert RunLength("iterations", 40, 5).student_steps == 7  # DFD's released Cosmos student, 0000040 (a final save)
    steps = RunLength("student_steps", 19, 5)
    assert ours(steps) == fastgen_loop(96, 5) and steps.tail == 0 and steps.name(18) == "step-000018"
    assert paper.name(3) == "iteration-0000020" and paper.name(19) == "iteration-0000099"


def test_resume_keeps_the_unit():
    args = lambda **kw: argparse.Namespace(**{"iterations": None, "student_steps": None, "fake_updates": 4, **kw})
    assert resolve(args(), 300) == RunLength("iterations", 300, 5)
    assert resolve(args(student_steps=7), 300) == RunLength("student_steps", 7, 5)
    saved = {"unit": "student_steps", "count": 50}
    assert resolve(args(), 100, saved) == RunLength("student_steps", 50, 5)  # no flag: the run's own count
    assert resolve(args(student_steps=60), 100, saved).count == 60
    with pytest.raises(ValueError, match=r"counts student steps \(--student-steps 50\)"):
        resolve(args(iterations=500), 100, saved)


def test_train_in_fastgen_iterations(tmp_path):
    """--iterations 9 at --fake-updates 2: FastGen runs iterations 1..8, the student on 3 and 6, then 2 fake-score
    updates. Checkpoints are named by FastGen iterations done; metrics and probes say both units; plot draws them
    against FastGen iterations; the run's last state cannot be extended."""
    pipe = tiny_wan.cached_pipeline()
    tiny_wan.random_data(tmp_path / "data")
    stem = tiny_wan.write_fastgen_fsdp(str(tmp_path / "fg"), 25000, {"net": tiny_wan.tiny_transformer(5)})
    out = tmp_path / "run"
    argv = ["train", "--model-dir", pipe, "--data", str(tmp_path / "data"), "--dmd2-ckpt", stem, "--out", str(out),
            "--fake-updates", "2", "--batch-size", "2", "--save-every", "1", "--keep", "9", "--device", "cpu",
            "--monitor-every", "0"]
    wan_dfd.main([*argv, "--iterations", "9"])
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [(r["step"], r["iteration"], r["student_updates"]) for r in rows] == [(0, 3, 1), (1, 6, 2), (2, 8, 2)]
    assert "loss_student" in rows[1] and "loss_student" not in rows[2] and "loss_fake" in rows[2]
    assert rows[2]["samples"] == 8 * 2  # every update drew one micro-batch of 2
    assert sorted(os.listdir(out / "checkpoints")) == ["iteration-0000003", "iteration-0000006", "iteration-0000008",
                                                       "latest"]
    st = torch.load(out / "checkpoints" / "iteration-0000008" / "state.pt", weights_only=True)
    assert st["length"] == {"unit": "iterations", "count": 9} and st["tail_done"] and st["position"] == 8
    a, b = (torch.load(out / "checkpoints" / f"iteration-000000{i}" / "state.pt", weights_only=True) for i in (6, 8))
    adam_steps = lambda st, net: st["optim"][net]["state"]["proj_out.weight"]["step"]
    assert adam_steps(a, "fake") + 2 == adam_steps(b, "fake")  # the tail trained the fake score ...
    assert adam_steps(a, "student") == adam_steps(b, "student")  # ... and not the student
    assert plot.run_unit(str(out)) == "iterations"
    assert plot.read_series(str(out / "metrics.jsonl"), "iteration")["loss_fake"][0] == [3, 6, 8]
    with pytest.raises(SystemExit, match="trailing fake-score updates"):
        wan_dfd.main([*argv, "--iterations", "12", "--resume"])
