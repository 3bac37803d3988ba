"""How long a run is, in either unit: FastGen iterations (--iterations, the authors' unit and the default) or student
updates (--student-steps). dfd.train counts student updates; this module converts, so nobody else does arithmetic.

FastGen's trainer (fastgen/trainer.py) runs `for iteration in range(iter_start + 1, max_iter)` and DMD2
(fastgen/methods/distribution_matching/dmd2.py) updates the student when `iteration % student_update_freq == 0` and
the fake score otherwise. From a fresh start, max_iter = N runs iterations 1 .. N-1: (N - 1) // cycle student
updates, each after cycle - 1 fake-score updates, then (N - 1) % cycle fake-score updates that no student update
follows (the "tail"), with cycle = --fake-updates + 1 (FastGen's student_update_freq). The paper's 100 iterations
(Wan) are 19 student updates and a tail of 4; its 300 (Cosmos) are 59 and 4. docs/recipe.md has the evidence.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

DEFAULT_ITERATIONS = 100  # paper, Table 2, Wan: "Total Iterations 100"; a spec's defaults["iterations"] overrides it
UNITS = ("iterations", "student_steps")


@dataclass(frozen=True)
class RunLength:
    """A run's length: `count` in `unit` ("iterations": FastGen's max_iter; "student_steps": student updates), with
    `cycle` = fake-score updates per student update + 1."""
    unit: str
    count: int
    cycle: int

    @property
    def student_steps(self) -> int:
        """Student updates (dfd.train's `steps`)."""
        return (self.count - 1) // self.cycle if self.unit == "iterations" else self.count

    @property
    def tail(self) -> int:
        """Fake-score updates after the last student update (dfd.train's `tail`): FastGen's loop ends inside a cycle."""
        return (self.count - 1) % self.cycle if self.unit == "iterations" else 0

    @property
    def lines(self) -> int:
        """Steps dfd.train logs (and calls on_step_end for): one per student update, one more for a tail."""
        return self.student_steps + (self.tail > 0)

    def iteration(self, step: int) -> int:
        """FastGen iterations (updates of either network) done when dfd.train's step `step` ends (-1: none)."""
        return (step + 1) * self.cycle if step < self.student_steps else self.student_steps * self.cycle + self.tail

    def updates(self, step: int) -> int:
        """Student updates done when step `step` ends."""
        return min(step + 1, self.student_steps)

    def name(self, step: int) -> str:
        """The checkpoint folder after step `step`, named in the run's unit: student-steps runs keep the step index
        (step-000099 after 100 updates, as before); iteration runs count FastGen iterations done (iteration-0000099
        after --iterations 100, the state FastGen saves as 0000100)."""
        return f"iteration-{self.iteration(step):07d}" if self.unit == "iterations" else f"step-{step:06d}"

    def flag(self) -> str:
        return f"--{self.unit.replace('_', '-')} {self.count}"

    def describe(self) -> str:
        """One line for the log: the count in both units."""
        if self.unit == "student_steps":
            return f"{self.flag()}: {self.count} student updates (FastGen --iterations {self.count * self.cycle + 1})"
        tail = f", then {self.tail} fake-score update(s) no student update follows" if self.tail else ""
        return (f"{self.flag()} (FastGen's max_iter, iterations 1..{self.count - 1}): {self.student_steps} student "
                f"updates, each after {self.cycle - 1} fake-score update(s){tail}")


def add_length_args(p: argparse.ArgumentParser, default: int) -> None:
    """--iterations / --student-steps (alias --steps), exclusive; both None when not given (resolve decides)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iterations", type=int, default=None, help="run length in FastGen iterations, the authors' unit "
                   "and the paper's (Table 2): one optimizer step of one network, FastGen's max_iter (iterations "
                   "1..N-1, the student on every (--fake-updates + 1)-th: 100 -> 19 student updates; docs/recipe.md); "
                   f"with --resume: the run's own (default: {default})")
    g.add_argument("--student-steps", "--steps", type=int, default=None, dest="student_steps",
                   help="run length in student updates instead (each after --fake-updates fake-score updates)")


def resolve(args: argparse.Namespace, default: int, saved: dict | None = None) -> RunLength:
    """The run's length from the flags; with `saved` (a resumed checkpoint's state["length"]: {"unit", "count"}) the
    run keeps its unit, and its count when none is given. ValueError when the flag given is the other unit's."""
    cycle = args.fake_updates + 1
    given = [u for u in UNITS if getattr(args, u, None) is not None]
    if saved is not None:
        if given and given[0] != saved["unit"]:
            raise ValueError(f"--resume: the run counts {saved['unit'].replace('_', ' ')} ("
                             f"--{saved['unit'].replace('_', '-')} {saved['count']}); give its length in that unit")
        return RunLength(saved["unit"], getattr(args, given[0]) if given else saved["count"], cycle)
    if given:
        return RunLength(given[0], getattr(args, given[0]), cycle)
    return RunLength("iterations", default, cycle)
