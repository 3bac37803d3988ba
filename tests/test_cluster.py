"""docs/slurm.sbatch, run with a stand-in `srun` that starts every "node" on this machine (each in a folder of its
own, so node-local scratch is a real copy per node) and `scontrol` naming localhost as the head node: its
`torchrun --nnodes 2 --rdzv-backend c10d` rendezvous (gloo) trains, and the run equals a single-node 2-rank run;
each node reads its own copy of the data, and only rank 0 writes the run folder on the shared filesystem."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny_tools
import tiny_wan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "docs", "slurm.sbatch")

FAKE_SRUN = """#!/bin/bash
# stand-in for srun: the command once per node (SLURM_NNODES), node i in $FAKE_NODES/node$i, all at once
while [[ "${1:-}" == --* ]]; do shift; done
echo "$*" >> "$FAKE_NODES/srun.log"
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  mkdir -p "$FAKE_NODES/node$i"
  (cd "$FAKE_NODES/node$i" && SLURM_NODEID=$i SLURM_PROCID=$i exec "$@") & pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


def fake_slurm(tmp_path, srun: str = FAKE_SRUN) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(srun)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**tiny_wan.quiet_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_NODES": str(tmp_path),
            "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "DFD": ROOT}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_the_sbatch_stages_the_data_per_node_and_launches_torchrun(tmp_path):
    """Dry run (srun prints): the staging copy to each node's scratch, then one torchrun per node with the c10d
    rendezvous on the head node, reading the node-local copy and writing the shared run folder."""
    env = {**fake_slurm(tmp_path, '#!/bin/bash\necho "$*" >> "$FAKE_NODES/srun.log"\n'), "MODEL": "/shared/model",
           "DMD2": "/shared/dmd2.pt", "DATA": "/shared/data", "OUT": "/shared/runs/dfd", "SCRATCH": "/local/dfd"}
    r = subprocess.run(["bash", SBATCH, "--steps", "2", "--lr", "2e-5"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stage, launch = open(tmp_path / "srun.log").read().splitlines()
    assert stage == "--ntasks-per-node=1 bash -c mkdir -p \"$1\" && cp -r \"$2\"/. \"$1\"/ _ /local/dfd/data /shared/data"
    assert launch == (f"torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint localhost:29500 "
                      f"--rdzv-id 4242 {ROOT}/wan_dfd.py train --model-dir /shared/model --dmd2-ckpt /shared/dmd2.pt "
                      "--data /local/dfd/data --out /shared/runs/dfd --steps 2 --lr 2e-5")
    del env["MODEL"]
    r = subprocess.run(["bash", SBATCH], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "MODEL: set MODEL to the base model folder" in r.stderr


@pytest.mark.slow
def test_two_nodes_by_the_sbatch_equal_one_node(tmp_path):
    s = tiny_tools.inputs()
    flags = ["--steps", "2", "--batch-size", "2", "--fake-updates", "1", "--lr", "1e-4", "--save-every", "0",
             "--monitor-every", "0", "--device", "cpu"]
    env = {**fake_slurm(tmp_path), "MODEL": s["pipe"], "DMD2": s["dmd2"], "DATA": s["data"], "OUT": str(tmp_path / "run"),
           "SCRATCH": "scratch", "GPUS_PER_NODE": "1", "PORT": str(free_port())}  # scratch: relative to each node
    r = subprocess.run(["bash", SBATCH, *flags], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "wan_dfd.py"), "train", "--model-dir", s["pipe"], "--dmd2-ckpt", s["dmd2"],
                          "--data", s["data"], "--out", str(tmp_path / "ref"), *flags], env=tiny_wan.quiet_env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    for name in ("student", "fake"):
        a, b = (load_file(str(tmp_path / x / "checkpoints" / "step-000001" / f"{name}.safetensors")) for x in ("run", "ref"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000001" / "state.pt", weights_only=True)
    assert state["world"] == 2
    logs = [[json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")] for d in ("run", "ref")]
    assert [r["loss_student"] for r in logs[0]] == [r["loss_student"] for r in logs[1]]
    # each node read its own copy of the data; nothing but that copy was written on a node
    for node in ("node0", "node1"):
        files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / node) for d, _, fs in os.walk(tmp_path / node)
                       for f in fs)
        assert files == sorted(os.path.join("scratch", "data", f) for f in os.listdir(s["data"])), (node, files)
