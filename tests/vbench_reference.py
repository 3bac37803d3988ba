"""Stored outputs of the upstream code of the four networks dfd_video/evaluation/vbench/ rewrites (RAFT, AMT-S, MUSIQ,
DreamSim), and what both sides need to recompute them: seeded random weights, seeded inputs, output digests.

tests/make_vbench_references.py runs the UPSTREAM code (princeton-vl/RAFT, VBench's vendored AMT-S, pyiqa's MUSIQ,
the dreamsim package's ensemble) on these weights and inputs and writes tests/data/vbench_reference.{json,npz};
tests/test_vbench_reference.py (default suite) runs OUR networks on the same weights and inputs and compares. Only
the seeds, sizes and digests are stored: the weights are regenerated from the seeds on both sides.

Weights come from numpy's legacy RandomState (its streams are frozen by numpy's compatibility policy), drawn per
tensor in sorted key order from a template state dict (key -> shape). Both sides take the template from their own
model; the stored layout digest says whether the two had the same keys and shapes.

This module imports neither dfd_video nor any upstream package, so the make script can run where only the upstream
code is installed. The loaders of upstream code (load_*) take a checkout's path."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_JSON = os.path.join(HERE, "data", "vbench_reference.json")
DATA_NPZ = os.path.join(HERE, "data", "vbench_reference.npz")
GRID = 4  # digests keep every GRID-th pixel along each axis, plus full row and column sums

# What each reference case runs; the make script stores this in the JSON, and the test reads it back from there.
CASES = {
    "raft": {"seed": 1, "size": [128, 160], "shift": 3, "iters": 8},
    "amt": {"seed": 2, "size": [128, 160], "shift": 4, "prelu": 0.25},
    "musiq": {"seed": 3, "dim": 128, "mlp": 256, "heads": 2, "layers": 2, "sizes": [[96, 160], [130, 420]]},
    "dreamsim": {"seed": 4, "dim": 128, "depth": 12, "proj": 64, "r": 4, "alpha": 2, "images": 2},
}


def template(sd: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def layout_digest(shapes: dict[str, tuple[int, ...]]) -> str:
    """sha1 of the sorted "key shape" lines: equal digests mean the two models hold the same tensors."""
    return hashlib.sha1("\n".join(f"{k} {list(s)}" for k, s in sorted(shapes.items())).encode()).hexdigest()


def seeded_state_dict(shapes: dict[str, tuple[int, ...]], seed: int, slope: float = 1.0,
                      aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Random float32 weights for a key -> shape template, in sorted key order from RandomState(seed), uniform with
    the standard deviation a trained network roughly has: matrices and kernels 1 / sqrt(fan-in); 1-D `weight`s (norm
    gains, PReLU slopes) `slope` +- 0.1; biases 0.1; running means 0.1, running variances in 0.5..1.5;
    `num_batches_tracked` 0; anything else (tokens, position embeddings, projections) 0.5. aliases: key -> the key
    whose tensor it shares (one module registered under two names), copied rather than drawn."""
    rs = np.random.RandomState(seed)
    aliases = aliases or {}

    def uniform(shape, std):  # unit variance: uniform on [-sqrt 3, sqrt 3]
        return (rs.random_sample(shape) * 2 - 1) * (3 ** 0.5) * std

    out: dict[str, torch.Tensor] = {}
    for k in sorted(shapes):
        if k in aliases:
            continue
        s = shapes[k]
        if k.endswith("num_batches_tracked"):
            out[k] = torch.zeros(s, dtype=torch.long)
            continue
        if k.endswith("running_var"):
            x = 0.5 + rs.random_sample(s)
        elif k.endswith("running_mean") or k.endswith("bias"):
            x = uniform(s, 0.1)
        elif k.endswith("weight") and len(s) == 1:
            x = slope + uniform(s, 0.1)
        elif k.endswith("weight"):
            x = uniform(s, 1 / np.sqrt(np.prod(s[1:])))
        else:
            x = uniform(s, 0.5)
        out[k] = torch.from_numpy(np.asarray(x, np.float32))
    for k, src in aliases.items():
        out[k] = out[src].clone()
    return out


def tensor_aliases(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """Keys of `sd` whose tensor shares storage with an earlier key (sorted order) -> that key."""
    first: dict[int, str] = {}
    out = {}
    for k in sorted(sd):
        ptr = sd[k].data_ptr()
        if ptr in first and sd[k].numel():
            out[k] = first[ptr]
        else:
            first[ptr] = k
    return out


def seeded_images(seed: int, shape) -> torch.Tensor:
    """float32 uniform 0..1 of `shape` from RandomState(seed)."""
    return torch.from_numpy(np.random.RandomState(seed).random_sample(shape).astype(np.float32))


def digest(x: torch.Tensor) -> dict[str, np.ndarray]:
    """A compact stand-in for an image-shaped output [..., H, W]: every GRID-th pixel, and the sums of every row and
    every column (so a change at any pixel shows)."""
    x = x.detach().double().cpu()
    return {"grid": x[..., ::GRID, ::GRID].numpy(), "rows": x.sum(-1).numpy(), "cols": x.sum(-2).numpy()}


# ---------------------------------------------------------------------------------------------------------------
# The inputs of each case (the same on both sides).


def raft_inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Two frames in 0..255 [1, 3, H, W]: a random one and the same rolled `shift` pixels to the right."""
    a = seeded_images(case["seed"] + 1000, (1, 3, *case["size"])) * 255
    return a, torch.roll(a, case["shift"], dims=3)


def amt_inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Two frames in 0..1 [1, 3, H, W], the second rolled `shift` pixels to the right."""
    a = seeded_images(case["seed"] + 1000, (1, 3, *case["size"]))
    return a, torch.roll(a, case["shift"], dims=3)


def musiq_inputs(case: dict) -> list[torch.Tensor]:
    """One image in 0..1 [1, 3, h, w] per size (MUSIQ takes each at its own size)."""
    return [seeded_images(case["seed"] + 1000 + i, (1, 3, *hw)) for i, hw in enumerate(case["sizes"])]


def dreamsim_inputs(case: dict) -> torch.Tensor:
    """Images in 0..1 [N, 3, 224, 224] (DreamSim's input size)."""
    return seeded_images(case["seed"] + 1000, (case["images"], 3, 224, 224))


# ---------------------------------------------------------------------------------------------------------------
# DreamSim: a cache folder (the layout `dreamsim(pretrained=True, cache_dir=...)` reads) from seeds.

DINO_FILE = os.path.join("checkpoints", "dino_vitbase16_pretrain.pth")
CLIP_FILE, OPEN_CLIP_FILE = "clip_vitb16_pretrain.pth.tar", "open_clip_vitb16_pretrain.pth.tar"
LORA_DIR = "ensemble_lora"


def lora_shapes(case: dict) -> dict[str, tuple[int, ...]]:
    """peft's saved adapter keys for LoRA on every `qkv` of the three backbones of DreamSim's ensemble."""
    d, r = case["dim"], case["r"]
    out = {}
    for i in range(3):
        for j in range(case["depth"]):
            name = f"base_model.model.extractor_list.{i}.model.blocks.{j}.attn.qkv"
            out[name + ".lora_A.weight"] = (r, d)
            out[name + ".lora_B.weight"] = (3 * d, r)
    return out


def write_dreamsim_folder(path: str, case: dict, vit_shapes: dict, clip_shapes: dict) -> None:
    """The three backbones (DINO layout; the CLIPs with `pos_drop` LayerNorm and `proj`) and a LoRA adapter, all
    from case["seed"]; vit_shapes / clip_shapes: the DINO-layout templates of the side that calls this."""
    from safetensors.torch import save_file
    seed, d = case["seed"], case["dim"]
    os.makedirs(os.path.join(path, "checkpoints"), exist_ok=True)
    torch.save(seeded_state_dict(vit_shapes, seed), os.path.join(path, DINO_FILE))
    for k, name in enumerate((CLIP_FILE, OPEN_CLIP_FILE), 1):
        sd = seeded_state_dict({**clip_shapes, "proj": (d, case["proj"])}, seed + k)
        torch.save({"state_dict": sd}, os.path.join(path, name))
    lora = seeded_state_dict(lora_shapes(case), seed + 3)
    lora = {k: v * (4.0 if "lora_B" in k else 1.0) for k, v in lora.items()}  # B large enough that LoRA shows
    os.makedirs(os.path.join(path, LORA_DIR), exist_ok=True)
    save_file(lora, os.path.join(path, LORA_DIR, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": case["r"], "lora_alpha": case["alpha"], "lora_dropout": 0.0, "bias": "none",
              "target_modules": ["qkv"], "task_type": None}
    with open(os.path.join(path, LORA_DIR, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def dreamsim_layout(vit_shapes: dict, clip_shapes: dict, case: dict) -> str:
    """The layout digest of a DreamSim case: the DINO and CLIP-as-DINO templates and the adapter's keys."""
    return layout_digest({**{"dino." + k: s for k, s in vit_shapes.items()},
                          **{"clip." + k: s for k, s in clip_shapes.items()}, **lora_shapes(case)})


# ---------------------------------------------------------------------------------------------------------------
# Upstream code from checkouts, loaded by path (their packages import torchvision / decord, absent here).


def _module(name: str, path: str | None = None, **attrs) -> types.ModuleType:
    if path is None:
        m = types.ModuleType(name)
        m.__path__ = []
        m.__dict__.update(attrs)
    else:
        spec = importlib.util.spec_from_file_location(name, path)
        m = importlib.util.module_from_spec(spec)
    sys.modules[name] = m
    if path is not None:
        spec.loader.exec_module(m)
    return m


def load_raft_upstream(repo: str):
    """princeton-vl/RAFT's core/raft.py RAFT class (the full model, as VBench's dynamic degree builds it)."""
    import argparse
    sys.path.insert(0, os.path.join(repo, "core"))
    try:
        from raft import RAFT  # noqa: E402 (princeton-vl/RAFT's module, found through the path above)
    finally:
        sys.path.pop(0)
    return lambda: RAFT(argparse.Namespace(small=False, mixed_precision=False, alternate_corr=False))


def load_pyiqa_musiq(repo: str):
    """pyiqa's musiq_arch.py from an IQA-PyTorch checkout without importing pyiqa (its package imports
    torchvision): the modules it needs are loaded from their files and its other imports are stubbed."""
    for pkg in ("pyiqa", "pyiqa.archs", "pyiqa.data", "pyiqa.utils"):
        _module(pkg)
    pad = _module("pyiqa.matlab_utils.padding", os.path.join(repo, "pyiqa/matlab_utils/padding.py"))
    _module("pyiqa.matlab_utils", ExactPadding2d=pad.ExactPadding2d, exact_padding_2d=pad.exact_padding_2d)
    _module("pyiqa.data.multiscale_trans_util", os.path.join(repo, "pyiqa/data/multiscale_trans_util.py"))
    _module("pyiqa.archs.arch_util", get_url_from_name=lambda n: n, load_pretrained_network=None,
            dist_to_mos=lambda d: (d * torch.arange(1, d.shape[-1] + 1).to(d)).sum(-1, keepdim=True))
    _module("pyiqa.utils.registry", ARCH_REGISTRY=types.SimpleNamespace(register=lambda: (lambda c: c)))
    return _module("pyiqa.archs.musiq_arch", os.path.join(repo, "pyiqa/archs/musiq_arch.py"))


def load_vbench_amt(repo: str):
    """VBench's AMT-S (vbench/third_party/amt/networks/AMT-S.py and its blocks) from a VBench checkout, without
    importing the vbench package: the files are loaded by path under their package names."""
    base = "vbench.third_party.amt"
    for pkg in ("vbench", "vbench.third_party", base, base + ".utils", base + ".networks", base + ".networks.blocks"):
        _module(pkg)
    amt_dir = os.path.join(repo, "vbench/third_party/amt")
    _module(base + ".utils.flow_utils", os.path.join(amt_dir, "utils/flow_utils.py"))
    for block in ("raft", "feat_enc", "ifrnet", "multi_flow"):
        _module(f"{base}.networks.blocks.{block}", os.path.join(amt_dir, f"networks/blocks/{block}.py"))
    return _module(base + ".networks.AMT_S", os.path.join(amt_dir, "networks/AMT-S.py"))


def read_references() -> tuple[dict, dict[str, np.ndarray]]:
    """(the JSON metadata, the stored arrays) of tests/data/vbench_reference.*."""
    with open(DATA_JSON) as f:
        meta = json.load(f)
    with np.load(DATA_NPZ) as z:
        return meta, {k: z[k] for k in z.files}

