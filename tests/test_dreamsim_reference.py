"""dfd_video/evaluation/vbench/dreamsim.py and i2v_background.py against the `dreamsim` package and torchvision themselves.

Opt-in: skipped unless `dreamsim` (0.2.1), torchvision, open_clip and timm import, which they do not beside this
project's pins. In a separate environment (docs/evaluation.md, "Checking DreamSim"):

    python -m pytest tests/test_dreamsim_reference.py

It writes random full-size weights in DreamSim's cache layout (DINO's hub backbone, the two CLIP-as-DINO files, a
LoRA adapter saved by peft from DreamSim's own PerceptualModel), builds the ensemble with the package's
`dreamsim(pretrained=True, cache_dir=...)` (torch.hub.load, which would fetch DINO's code from GitHub, is replaced
by DreamSim's vendored copy of that code) and compares embeddings; then VBench-I2V's dreamsim_transform (restated
from vbench2_beta_i2v/utils.py, which imports decord) with i2v_background.preprocess. The image's PIL transform is
checked in tests/test_vbench.py."""
import os

import numpy as np
import pytest
import torch

dreamsim_pkg = pytest.importorskip("dreamsim")
pytest.importorskip("torchvision")
pytest.importorskip("open_clip")

from dfd_video.evaluation.vbench import dreamsim as ours, i2v_background  # noqa: E402


def random_vit_state_dict(gen: torch.Generator, clip: bool) -> dict:
    """Random weights for DreamSim's vit_base (768 wide, 12 blocks, 16 x 16 patches), in DINO's key names; LayerNorm
    gains near 1 so that 12 random blocks neither explode nor vanish."""
    from dreamsim.feature_extraction.vision_transformer import vit_base
    model = vit_base(patch_size=16)
    if clip:
        model.pos_drop = torch.nn.LayerNorm(768)
    sd = {}
    for k, v in model.state_dict().items():
        if ("norm" in k or "pos_drop" in k) and k.endswith("weight"):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=gen)
        else:
            sd[k] = 0.02 * torch.randn(v.shape, generator=gen) * (5 if k in ("cls_token", "pos_embed") else 1)
    return sd


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A DreamSim cache folder with random weights and the package's ensemble built from it."""
    from dreamsim import model as ds_model
    from dreamsim.feature_extraction import extractor
    from dreamsim.feature_extraction.vision_transformer import vit_base
    from peft import LoraConfig, get_peft_model

    root = str(tmp_path_factory.mktemp("dreamsim_cache"))
    gen = torch.Generator().manual_seed(0)
    os.makedirs(os.path.join(root, "checkpoints"))
    torch.save(random_vit_state_dict(gen, False), os.path.join(root, ours.DINO_FILE))
    for name in (ours.CLIP_FILE, ours.OPEN_CLIP_FILE):
        sd = random_vit_state_dict(gen, True)
        sd["proj"] = 0.05 * torch.randn(768, 512, generator=gen)
        torch.save({"state_dict": sd}, os.path.join(root, name))
    head = {f"module.head.mlp.{i}.{p}": torch.zeros(s) for i, (o, n) in ((0, (2048, 768)), (2, (2048, 2048)),
                                                                          (4, (256, 2048)))
            for p, s in (("weight", (o, n)), ("bias", (o,)))}
    head["module.head.last_layer.weight"] = torch.zeros(2048, 256)
    torch.save({"student": head}, os.path.join(root, "dino_vitb16_pretrain.pth"))  # DINO's head: unused by "cls"

    def hub_load(repo, name, **kwargs):  # what DINO's hubconf does, offline
        assert (repo, name) == ("facebookresearch/dino:main", "dino_vitb16")
        model = vit_base(patch_size=16, num_classes=0)
        model.load_state_dict(torch.load(os.path.join(root, ours.DINO_FILE), weights_only=True), strict=True)
        return model

    old = torch.hub.load
    torch.hub.load = hub_load
    try:
        # the adapter, as DreamSim's training saves it: peft on PerceptualModel, target "qkv", r 16, alpha 8
        base = ds_model.PerceptualModel(**ds_model.dreamsim_args["model_config"]["ensemble"], device="cpu",
                                        load_dir=root, normalize_embeds=True)
        peft_model = get_peft_model(base, LoraConfig(r=16, lora_alpha=8, lora_dropout=0.3, bias="none",
                                                     target_modules=["qkv"]))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        peft_model.save_pretrained(os.path.join(root, ours.LORA_DIR))
        theirs, _ = dreamsim_pkg.dreamsim(pretrained=True, device="cpu", cache_dir=root)
    finally:
        torch.hub.load = old
    assert isinstance(theirs.base_model.model.extractor_list[0], extractor.ViTExtractor)
    return {"dir": root, "theirs": theirs}


def test_embeddings_match_the_package(cache):
    mine = ours.load_dreamsim(cache["dir"], "cpu", "--vbench-dreamsim")
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = torch.cat([cache["theirs"].embed(x[i:i + 1]) for i in range(3)])  # VBench embeds one frame at a time
    got = mine.embed(x)
    assert got.shape == want.shape == (3, 768 + 512 + 512)
    assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
    # not a degenerate comparison: the images differ in embedding (the next test: the LoRA matters)
    assert (want[0] - want[1]).abs().max() > 1e-2


def test_merged_lora_differs_from_the_bare_backbones(cache, monkeypatch):
    monkeypatch.setattr(ours, "merge_lora", lambda *a, **k: 0)
    bare = ours.load_dreamsim(cache["dir"], "cpu", "--vbench-dreamsim")
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (bare.embed(x) - cache["theirs"].embed(x)).abs().max() > 1e-3


@pytest.mark.parametrize("hw", [(224, 224), (480, 832), (96, 160)])
def test_frame_transform_is_vbench_dreamsim_transform(hw):
    from torchvision.transforms import Compose, InterpolationMode, Lambda, Resize
    transform = Compose([Resize((224, 224), interpolation=InterpolationMode.BICUBIC),
                         Lambda(lambda x: x.float().div(255.0))])
    frames = np.random.default_rng(0).integers(0, 256, size=(2, *hw, 3), dtype=np.uint8)
    want = transform(torch.Tensor(frames).permute(0, 3, 1, 2))  # load_video: torch.Tensor(frames), float32
    assert torch.allclose(i2v_background.preprocess(frames), want, atol=1e-5, rtol=0)
