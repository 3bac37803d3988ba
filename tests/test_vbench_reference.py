"""Our RAFT, AMT-S, MUSIQ and DreamSim (dfd_video/evaluation/vbench/) against the outputs their upstream code gave on
the same seeded random weights and inputs, stored in tests/data/vbench_reference.{json,npz} by
tests/make_vbench_references.py (the upstream commits are in the JSON). The weights and inputs are regenerated
here from the stored seeds (tests/vbench_reference.py); a layout digest first checks that our model holds the same
tensors as upstream's. The live checks against checkouts stay opt-in in tests/test_vbench.py and
tests/test_dreamsim_reference.py.

Tolerances, as a fraction of each stored array's largest magnitude (TOL): about ten times the largest difference
between ours and the stored upstream output under ATEN_CPU_CAPABILITY=default or avx2 and 1 or 2 threads (RAFT and
MUSIQ 1e-6, DreamSim 3e-6, AMT-S 2.4e-5: the same on every kernel, so from the order of operations, not the
kernels). A wrong input scaling (RAFT fed x / 255, MUSIQ fed x) or a skipped LoRA moves them by over 1e-2."""
import os

import numpy as np
import pytest
import torch

import vbench_reference as vr
from dfd_video.evaluation.vbench import amt, dreamsim, musiq, raft

torch.set_num_threads(1)
META, REF = vr.read_references()
TOL = {"raft": 1e-5, "amt": 2e-4, "musiq": 1e-5, "dreamsim": 5e-5}


def network(name: str) -> dict:
    entry = META["networks"][name]
    assert entry["upstream"]["commit"] and entry["case"], name
    return entry


def seeded(model: torch.nn.Module, entry: dict, **kw) -> torch.nn.Module:
    """model with the seeded weights of `entry`, after checking its layout is upstream's."""
    sd = model.state_dict()
    shapes = vr.template(sd)
    assert vr.layout_digest(shapes) == entry["layout"], "our parameter names or shapes differ from upstream's"
    model.load_state_dict(vr.seeded_state_dict(shapes, entry["case"]["seed"], aliases=vr.tensor_aliases(sd), **kw))
    return model.eval()


def assert_matches(name: str, got: dict[str, np.ndarray]) -> None:
    stored = {k.split("/", 1)[1]: v for k, v in REF.items() if k.startswith(name + "/")}
    assert set(got) == set(stored), (name, sorted(got), sorted(stored))
    for k, want in stored.items():
        scale = float(np.abs(want).max())
        assert scale > 0, (name, k)
        np.testing.assert_allclose(np.asarray(got[k], np.float64), want, rtol=0, atol=TOL[name] * scale,
                                   err_msg=f"{name}/{k} differs from upstream's stored output")


def test_raft_matches_upstream_stored():
    entry = network("raft")
    model = seeded(raft.RAFT(), entry)
    a, b = vr.raft_inputs(entry["case"])
    assert_matches("raft", vr.digest(model(a, b, entry["case"]["iters"])[0]))


def test_amt_matches_upstream_stored():
    entry = network("amt")
    model = seeded(amt.AMTS(), entry, slope=entry["case"]["prelu"])
    a, b = vr.amt_inputs(entry["case"])
    assert_matches("amt", vr.digest(model(a, b)[0]))


def test_musiq_matches_upstream_stored(tmp_path):
    """Through load_musiq, which reads the sizes from the weights (the head count as width / 64)."""
    entry = network("musiq")
    c = entry["case"]
    shapes = vr.template(musiq.MUSIQ(c["dim"], c["mlp"], c["heads"], c["layers"]).state_dict())
    assert vr.layout_digest(shapes) == entry["layout"], "our parameter names or shapes differ from pyiqa's"
    torch.save({"module." + k: v for k, v in vr.seeded_state_dict(shapes, c["seed"]).items()}, tmp_path / "m.pth")
    model = musiq.load_musiq(str(tmp_path / "m.pth"), "cpu")
    assert_matches("musiq", {"scores": np.array([float(model(x)[0]) for x in vr.musiq_inputs(c)])})


def test_dreamsim_matches_upstream_stored(tmp_path):
    """Through load_dreamsim on a DreamSim cache folder written from the seeds (the LoRA merged at load)."""
    entry = network("dreamsim")
    c = entry["case"]
    vit_shapes = vr.template(dreamsim.ViT(c["dim"], c["depth"], 16, 197, clip=False).state_dict())
    clip_shapes = vr.template(dreamsim.ViT(c["dim"], c["depth"], 16, 197, clip=True).state_dict())
    assert vr.dreamsim_layout(vit_shapes, clip_shapes, c) == entry["layout"], "our layout differs from DreamSim's"
    vr.write_dreamsim_folder(str(tmp_path), c, vit_shapes, clip_shapes)
    model = dreamsim.load_dreamsim(str(tmp_path), "cpu", "--vbench-dreamsim")
    assert_matches("dreamsim", {"embeddings": model.embed(vr.dreamsim_inputs(c)).numpy()})


def test_stored_references_are_small_and_name_their_source():
    assert os.path.getsize(vr.DATA_NPZ) < 64 * 1024
    for name in ("raft", "amt", "musiq", "dreamsim"):
        up = network(name)["upstream"]
        assert up["repo"].startswith("github.com/") and len(up["commit"]) == 40, (name, up)


@pytest.mark.parametrize("name", ["raft", "amt"])
def test_stored_outputs_are_not_degenerate(name):
    """The compared outputs vary across pixels (a constant flow or frame would hide a wrong network)."""
    grid = REF[f"{name}/grid"]
    assert grid.std() > 0.05 * np.abs(grid).max()
