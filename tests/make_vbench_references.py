"""Writes tests/data/vbench_reference.{json,npz}: the outputs of the UPSTREAM code of RAFT, AMT-S, MUSIQ and DreamSim
on seeded random weights and tiny seeded inputs (tests/vbench_reference.py), which tests/test_vbench_reference.py
compares our rewrites (dfd_video/evaluation/vbench/) with in the default suite.

    python tests/make_vbench_references.py --raft RAFT/ --vbench VBench/ --pyiqa IQA-PyTorch/ --dreamsim dreamsim/

Each flag is a checkout (github.com/princeton-vl/RAFT, Vchitect/VBench for its vendored AMT-S, chaofengc/IQA-PyTorch,
ssundaram21/dreamsim); only the networks given are recomputed, the other stored entries are kept; --force is needed
to replace an entry computed from another commit. The commit is read with `git -C DIR rev-parse HEAD`, or given as
--commit NAME=SHA where the checkout has no .git. Needs torch, numpy, scipy (RAFT's utils), safetensors; --dreamsim
also the dreamsim package's imports (torchvision, open_clip_torch, timm, peft, pyyaml), which do not install beside
this project's pins: run it in a separate environment (docs/evaluation.md says how). Imports nothing of dfd_video."""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vbench_reference as vr  # noqa: E402

UPSTREAM = {
    "raft": ("github.com/princeton-vl/RAFT", "core/raft.py, extractor.py, update.py, corr.py (VBench vendors them "
             "in vbench/third_party/RAFT, changing only import paths and the CUDA correlation)"),
    "amt": ("github.com/Vchitect/VBench", "vbench/third_party/amt/networks/AMT-S.py and networks/blocks/ (the code "
            "of github.com/MCG-NKU/AMT with VBench's import paths), cfgs/AMT-S.yaml's sizes"),
    "musiq": ("github.com/chaofengc/IQA-PyTorch", "pyiqa/archs/musiq_arch.py, pyiqa/data/multiscale_trans_util.py"),
    "dreamsim": ("github.com/ssundaram21/dreamsim", "dreamsim/model.py `dreamsim(pretrained=True)` (the ensemble) "
                 "and `embed`, one image at a time as VBench-I2V calls it; feature_extraction/"),
}


def make_raft(repo: str, case: dict) -> tuple[str, dict]:
    model = vr.load_raft_upstream(repo)().eval()
    sd = model.state_dict()
    shapes = vr.template(sd)
    model.load_state_dict(vr.seeded_state_dict(shapes, case["seed"], aliases=vr.tensor_aliases(sd)))
    a, b = vr.raft_inputs(case)
    with torch.no_grad():
        _, flow = model(a, b, iters=case["iters"], test_mode=True)
    return vr.layout_digest(shapes), vr.digest(flow[0])


def make_amt(repo: str, case: dict) -> tuple[str, dict]:
    model = vr.load_vbench_amt(repo).Model(corr_radius=3, corr_lvls=4, num_flows=3).eval()
    shapes = vr.template(model.state_dict())
    model.load_state_dict(vr.seeded_state_dict(shapes, case["seed"], slope=case["prelu"]))
    a, b = vr.amt_inputs(case)
    with torch.no_grad():
        out = model(a, b, torch.tensor(0.5).view(1, 1, 1, 1), scale_factor=1.0, eval=True)["imgt_pred"]
    return vr.layout_digest(shapes), vr.digest(out[0])


def make_musiq(repo: str, case: dict) -> tuple[str, dict]:
    arch = vr.load_pyiqa_musiq(repo)
    model = arch.MUSIQ(pretrained=False, hidden_size=case["dim"], mlp_dim=case["mlp"], num_heads=case["heads"],
                       num_layers=case["layers"]).eval()
    shapes = vr.template(model.state_dict())
    model.load_state_dict(vr.seeded_state_dict(shapes, case["seed"]))
    with torch.no_grad():
        scores = [float(model(x).flatten()[0]) for x in vr.musiq_inputs(case)]
    return vr.layout_digest(shapes), {"scores": np.array(scores)}


def dreamsim_templates(vit_base) -> tuple[dict, dict]:
    """(DINO's ViT, the CLIP-as-DINO ViT) key -> shape templates of a vit_base builder."""
    vit = vit_base(patch_size=16, num_classes=0)
    clip = vit_base(patch_size=16)
    clip.pos_drop = torch.nn.LayerNorm(clip.embed_dim)  # what load_clip_as_dino does before loading
    return vr.template(vit.state_dict()), vr.template(clip.state_dict())


def build_dreamsim(dreamsim, narrow, root: str, case: dict, vit_shapes: dict, clip_shapes: dict):
    """`dreamsim.dreamsim(pretrained=True, cache_dir=root)` on a seeded cache folder, DINO's torch.hub backbone
    built offline by DreamSim's vendored copy of DINO's code; checks that peft loaded the seeded adapter."""
    from safetensors.torch import load_file
    vr.write_dreamsim_folder(root, case, vit_shapes, clip_shapes)
    head = {f"module.head.mlp.{i}.{p}": torch.zeros(s) for i, (o, n) in ((0, (2048, 768)), (2, (2048, 2048)),
                                                                          (4, (256, 2048)))
            for p, s in (("weight", (o, n)), ("bias", (o,)))}
    head["module.head.last_layer.weight"] = torch.zeros(2048, 256)
    torch.save({"student": head}, os.path.join(root, "dino_vitb16_pretrain.pth"))  # DINO's head: unused by "cls"

    def hub_load(repo_name, name, **kwargs):  # what DINO's hubconf builds, offline, from the seeded file
        assert (repo_name, name) == ("facebookresearch/dino:main", "dino_vitb16")
        model = narrow(patch_size=16, num_classes=0)
        model.load_state_dict(torch.load(os.path.join(root, vr.DINO_FILE), weights_only=True), strict=True)
        return model

    old, torch.hub.load = torch.hub.load, hub_load
    try:
        model, _ = dreamsim.dreamsim(pretrained=True, device="cpu", cache_dir=root)
    finally:
        torch.hub.load = old
    written = load_file(os.path.join(root, vr.LORA_DIR, "adapter_model.safetensors"))
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert set(loaded) == set(written) and all(torch.equal(loaded[k], written[k]) for k in written), \
        "peft did not load the seeded adapter into every qkv"
    return model


def make_dreamsim(repo: str, case: dict) -> tuple[str, dict]:
    """The package's ensemble at a narrower width (case["dim"], 64-wide heads as in ViT-B) and DreamSim's 12 blocks
    (its "cls" feature hooks block 11), built by `dreamsim(pretrained=True, cache_dir=...)` from a seeded folder."""
    sys.path.insert(0, repo)  # the checkout's package, not an installed one
    import dreamsim
    from dreamsim.feature_extraction import load_clip_as_dino, load_open_clip_as_dino, vision_transformer as vt
    assert os.path.dirname(dreamsim.__file__) == os.path.join(os.path.abspath(repo), "dreamsim"), dreamsim.__file__

    def narrow(patch_size=16, **kwargs):  # vit_base with another width; everything else as DreamSim builds it
        return vt.VisionTransformer(patch_size=patch_size, embed_dim=case["dim"], depth=case["depth"],
                                    num_heads=case["dim"] // 64, mlp_ratio=4, qkv_bias=True,
                                    norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), **kwargs)

    for module in (vt, load_clip_as_dino, load_open_clip_as_dino):
        module.vit_base = narrow
    vit_shapes, clip_shapes = dreamsim_templates(narrow)
    with tempfile.TemporaryDirectory() as root:
        model = build_dreamsim(dreamsim, narrow, root, case, vit_shapes, clip_shapes)
    x = vr.dreamsim_inputs(case)
    with torch.no_grad():
        emb = torch.cat([model.embed(x[i:i + 1]) for i in range(len(x))])
    return vr.dreamsim_layout(vit_shapes, clip_shapes, case), {"embeddings": emb.double().numpy()}


MAKERS = {"raft": make_raft, "amt": make_amt, "musiq": make_musiq, "dreamsim": make_dreamsim}
FLAGS = {"raft": "raft", "amt": "vbench", "musiq": "pyiqa", "dreamsim": "dreamsim"}


def commit_of(repo: str, name: str, given: dict[str, str]) -> str:
    if name in given:
        return given[name]
    try:
        return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"error: --{FLAGS[name]} {repo}: not a git checkout; give --commit {name}=SHA") from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raft", help="a princeton-vl/RAFT checkout (RAFT)")
    p.add_argument("--vbench", help="a Vchitect/VBench checkout (its vendored AMT-S)")
    p.add_argument("--pyiqa", help="a chaofengc/IQA-PyTorch checkout (MUSIQ)")
    p.add_argument("--dreamsim", help="a ssundaram21/dreamsim checkout (DreamSim's ensemble)")
    p.add_argument("--commit", action="append", default=[], metavar="NAME=SHA",
                   help="the commit of a checkout without .git (NAME: raft, amt, musiq or dreamsim)")
    p.add_argument("--force", action="store_true", help="replace entries computed from another commit")
    args = p.parse_args(argv)
    given = dict(c.partition("=")[::2] for c in args.commit)
    torch.set_num_threads(1)
    meta: dict = {"networks": {}}
    arrays: dict[str, np.ndarray] = {}
    if os.path.exists(vr.DATA_JSON):
        meta, arrays = vr.read_references()
    todo = {n: getattr(args, FLAGS[n]) for n in MAKERS if getattr(args, FLAGS[n])}
    if not todo:
        p.error("give at least one checkout (--raft, --vbench, --pyiqa, --dreamsim)")
    for name, repo in todo.items():
        commit = commit_of(repo, name, given)
        old = meta["networks"].get(name, {}).get("upstream", {}).get("commit")
        if old not in (None, commit) and not args.force:
            raise SystemExit(f"error: {vr.DATA_JSON}: {name} was computed from {old}, the checkout is at {commit}; "
                             "--force replaces it")
        case = vr.CASES[name]
        layout, out = MAKERS[name](repo, case)
        arrays = {k: v for k, v in arrays.items() if not k.startswith(name + "/")}
        arrays.update({f"{name}/{k}": np.asarray(v, np.float32) for k, v in out.items()})
        meta["networks"][name] = {"case": case, "layout": layout,
                                  "upstream": {"repo": UPSTREAM[name][0], "commit": commit,
                                               "code": UPSTREAM[name][1]}}
        print(f"{name}: {commit[:12]}, " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items()),
              file=sys.stderr)
    meta["about"] = ("Outputs of the upstream code on seeded random weights (tests/vbench_reference.py), written by "
                     "tests/make_vbench_references.py; checked by tests/test_vbench_reference.py.")
    meta["torch"] = torch.__version__
    os.makedirs(os.path.dirname(vr.DATA_JSON), exist_ok=True)
    tmp = vr.DATA_NPZ + ".tmp.npz"
    np.savez_compressed(tmp, **dict(sorted(arrays.items())))
    os.replace(tmp, vr.DATA_NPZ)
    with open(vr.DATA_JSON + ".tmp", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(vr.DATA_JSON + ".tmp", vr.DATA_JSON)


if __name__ == "__main__":
    main()
