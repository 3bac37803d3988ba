"""The run length in FastGen's unit (dfd_video.length): the counts against FastGen's own loop and the unit a resumed
run keeps. A `train --iterations` run (names, metrics, probes' unit, plot, the trailing fake-score updates) is
tests/test_gan.py::test_train_gan_in_fastgen_iterations, one tiny run for both features."""
import argparse

import pytest

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
