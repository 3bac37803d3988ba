"""Cosmos' conditioning-frame time (--cond-frame-t): t = 0 (FastGen since its PR #26, the default), the pipeline's
1e-4, or the sample's t on every frame (FastGen at 34f30e8); what the transformer receives, and `check` naming the
choice its teacher-parity section ran with."""
import argparse

import pytest
import torch

import cosmos_dfd as C
import tiny_cosmos
from dfd_video.planning import check
from dfd_video.spec import model_options

C.ensure_padding_mask_resize()  # the tiny transformer is used without load_network, which would install it


def test_the_transformer_gets_the_chosen_time():
    net = tiny_cosmos.tiny_transformer(0)
    seen = []
    net.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 3, 4, 4, generator=g), torch.tensor([0.3, 0.8])
    cond = C.CosmosCond(torch.randn(2, 512, tiny_cosmos.PROMPT_DIM, generator=g), torch.randn(2, 16, 1, 4, 4, generator=g))
    out = {}
    for name, first in (("zero", torch.zeros(2)), ("pipeline", torch.full((2,), 1e-4)), ("uniform", t)):
        with torch.no_grad():
            out[name] = C.CosmosAdapter().denoiser(net, cond_frame_t=name)(x, t, cond)
        ts = seen[-1]  # [B, 1, T, 1, 1]
        assert torch.equal(ts[:, 0, 0, 0, 0], first) and torch.equal(ts[:, 0, 1:, 0, 0], t[:, None].expand(2, 2))
        assert torch.equal(out[name][:, :, :1], cond.image)  # the conditioning frame comes out as the image
    with torch.no_grad():
        assert torch.equal(C.CosmosAdapter().denoiser(net)(x, t, cond), out["zero"])  # the default is FastGen's
    assert not torch.equal(out["uniform"][:, :, 1:], out["zero"][:, :, 1:])  # and it matters to the generated frames
    p = argparse.ArgumentParser()
    C.CosmosAdapter().add_model_args(p, "train")
    assert model_options(C.CosmosAdapter(), p.parse_args([])) == {"cond_frame_t": "zero"}


class PipelineAtItsOwnTime(C.CosmosAdapter):
    """A stand-in for the pipeline's one step: our guided x0 at the pipeline's conditioning-frame time (1e-4)."""

    def pipeline_x0(self, net, x_t, t, cond, uncond, guidance, dtype, model_dir):
        tt = torch.tensor([t])
        return self.denoiser(net, guidance, uncond, dtype, cond_frame_t="pipeline")(x_t, tt, cond), cond, None


@pytest.mark.parametrize("choice,passes", [("pipeline", True), ("uniform", False)])
def test_check_parity_names_the_choice(choice, passes):
    spec, net = PipelineAtItsOwnTime(), tiny_cosmos.tiny_transformer(0)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(1, 16, 3, 4, 4, generator=g)
    cond = C.CosmosCond(torch.randn(1, 512, tiny_cosmos.PROMPT_DIM, generator=g), torch.randn(1, 16, 1, 4, 4, generator=g))
    args = argparse.Namespace(parity_t=0.8, guidance=3.0, model_dir=None, cond_frame_t=choice)
    rep = {"warnings": [], "problems": []}
    par = check.teacher_parity(spec, net, x_t, cond, {"text": torch.randn(512, tiny_cosmos.PROMPT_DIM, generator=g)},
                               args, None, rep)
    par["conditioning"] = "stand-ins"
    assert par["options"] == {"cond_frame_t": choice} and par["passed"] is passes
    assert (not rep["problems"]) is passes
    if not passes:
        assert "--cond-frame-t uniform; the pipeline runs its own defaults of those" in rep["problems"][0]
