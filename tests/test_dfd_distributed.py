"""The DFD coin is the same on every rank of a distributed run: two CPU ranks on gloo under torchrun."""
import os
import subprocess
import sys

import torch

import dfd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_coin_identical_on_two_ranks(tmp_path):
    steps = 200
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "_coin_worker.py"), str(tmp_path), str(steps)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = torch.load(tmp_path / "coins.pt")
    assert out["world"] == 2
    per_step = out["per_step"].bool()  # [rank, step]
    assert per_step.shape == (2, steps)
    assert torch.equal(per_step[0], per_step[1])
    # and it is the coin this process draws too (no hidden dependence on the process or rank)
    here = torch.stack([dfd.dfd_coin(s, 0.5, seed=7) for s in range(steps)])
    assert torch.equal(per_step[0], here)
    assert 0 < int(here.sum()) < steps  # both outcomes occur, so equality is not trivial
    # the optional per-sample coin is meant to differ between ranks, and to match a local draw with that rank
    per_sample = out["per_sample"].bool()  # [rank, step, B]
    assert not torch.equal(per_sample[0], per_sample[1])
    for rank in (0, 1):
        assert torch.equal(per_sample[rank], torch.stack([dfd.dfd_coin(s, 0.5, seed=7, batch=4, rank=rank)
                                                          for s in range(steps)]))
