"""`export` writes a model card (dfd_video/model_card.py): README.md in the Hugging Face layout, parsed back with
huggingface_hub; the recipe is exactly the flags the run changed; the steps and last metrics are the run's; the folder
still loads with diffusers, and the card's own Python loads it into the pipeline (run here on the tiny model)."""
import argparse
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import tiny_tools
import tiny_wan
import wan_dfd
from dfd_video.model_card import write_model_card


def card_code(path: str, base: str) -> str:
    """The card's python block, on CPU in fp32 and with the tiny pipeline as the base model; the last line (which
    samples a full-size video) left out."""
    text = open(path).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1).strip().splitlines()[:-1]
    code = [f"base = {base!r}" if x.startswith("base = ") else x for x in code]
    return "\n".join(code).replace(".to('cuda')", "").replace("torch.bfloat16", "torch.float32")


def flags_table(text: str, title: str) -> dict[str, str]:
    part = text.split(title)[1].split("###")[0]
    return {m[1]: m[2].strip() for m in re.finditer(r"^\| `(--[\w-]+)` \| ([^|]*) \|", part, re.M)}


def test_export_card_layout_recipe_metrics_and_loading(tmp_path):
    from diffusers import WanTransformer3DModel
    from huggingface_hub import ModelCard
    s = tiny_tools.tiny_run()
    out = str(tmp_path / "student")
    wan_dfd.main(["export", "--model-dir", s["pipe"], "--ckpt", s["run"], "--out", out])
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.library_name == "diffusers" and card.data.base_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert card.data.pipeline_tag == "text-to-video" and {"dfd", "dmd2", "text-to-video"} <= set(card.data.tags)
    text = card.text
    assert flags_table(text, "### Recipe") == {
        "--model-dir": s["pipe"], "--data": s["data"], "--dmd2-ckpt": s["dmd2"], "--student-steps": "3", "--batch-size": "2",
        "--fake-updates": "1", "--lr": "0.0001", "--save-every": "2", "--monitor-every": "2", "--device": "cpu",
        "--tracker": "tensorboard", "--probe-every": "2", "--probe-count": "1", "--probe-seeds": "0 1"}
    assert f"`{s['run']}`, checkpoint after student step 2 (counted from 0) of a run of --student-steps 3" in text
    assert f"`{s['dmd2']}` (its generator)" in text and "| weights | the student |" in text
    last = [__import__("json").loads(x) for x in open(os.path.join(s["run"], "metrics.jsonl"))][-1]
    metrics = text.split("### Last logged metrics (student step 2)")[1]
    assert f"| `loss_student` | {last['loss_student']:.4g} |" in metrics and "| `tflops` |" in metrics
    # diffusers reads the folder as before, and the card's lines load it into WanPipeline at the student's times
    ckpt = load_file(os.path.join(s["run"], "checkpoints", "step-000002", "student.safetensors"))
    net = WanTransformer3DModel.from_pretrained(out)
    assert all(torch.equal(v, ckpt[k]) for k, v in net.state_dict().items())
    scope: dict = {}
    exec(card_code(os.path.join(out, "README.md"), s["pipe"]), scope)
    pipe = scope["pipe"]
    assert all(torch.equal(v, ckpt[k]) for k, v in pipe.transformer.state_dict().items())
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx([0.999, 0.937, 0.833, 0.624, 0.0])


def test_lora_card_and_a_checkpoint_from_elsewhere(tmp_path):
    """export --lora's second card (lora/README.md: tagged lora, loading the adapter onto the DMD2 student); and an
    export straight from a DMD2 checkpoint, which has no run to describe."""
    from huggingface_hub import ModelCard
    s = tiny_tools.tiny_run()
    out = str(tmp_path / "lora_export")
    args = argparse.Namespace(ckpt=s["run"], out=out, weights="auto", lora=True)
    write_model_card(wan_dfd.WanAdapter(), args, (0.999, 0.937, 0.833, 0.624))
    card = ModelCard.load(os.path.join(out, "lora", "README.md"))
    assert "lora" in card.data.tags and card.data.base_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    code = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    assert "WanTransformer3DModel.from_pretrained(dmd2_student" in code
    assert code.index('pipe.load_lora_weights(f"{student}/lora")') < code.index("video = pipe(")
    assert os.path.exists(os.path.join(out, "README.md"))
    other = str(tmp_path / "from_dmd2")
    wan_dfd.main(["export", "--model-dir", s["pipe"], "--ckpt", s["dmd2"], "--out", other])
    text = ModelCard.load(os.path.join(other, "README.md")).text
    assert f"Exported from `{s['dmd2']}`, which is not a training run of this code" in text and "Recipe" not in text


@pytest.mark.slow
def test_lora_export_card_loads_the_adapter_onto_the_dmd2_student(tmp_path):
    """A --lora-rank run exported with --lora: the LoRA card's Python, run with the DMD2 student folder, gives the
    transformer the merged export holds."""
    from diffusers import WanTransformer3DModel
    s = tiny_tools.inputs()
    dmd2_folder = str(tmp_path / "dmd2_student")
    tiny_wan.tiny_transformer(5).save_pretrained(dmd2_folder)
    run, out = str(tmp_path / "run"), str(tmp_path / "student")
    torch.set_num_threads(1)
    wan_dfd.main(tiny_tools.train_argv(s, run, "--lora-rank", "4", "--lr", "1e-2", "--steps", "2"))
    wan_dfd.main(["export", "--model-dir", s["pipe"], "--ckpt", run, "--out", out, "--lora"])
    code = card_code(os.path.join(out, "lora", "README.md"), s["pipe"])
    code = code.replace("dmd2_student = 'the DMD2 student transformer folder the run started from'",
                        f"dmd2_student = {dmd2_folder!r}")
    scope: dict = {}
    exec(code, scope)
    merged = WanTransformer3DModel.from_pretrained(out)
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(1, 16, 3, 4, 6, generator=g), torch.tensor([500.0]), torch.randn(1, 512, 32, generator=g)
    with torch.no_grad():
        a = scope["pipe"].transformer(x, t, text, return_dict=False)[0]
        b = merged(x, t, text, return_dict=False)[0]
        base = WanTransformer3DModel.from_pretrained(dmd2_folder)(x, t, text, return_dict=False)[0]
    assert (a - base).abs().max() > 1e-4  # the adapter changes the output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
