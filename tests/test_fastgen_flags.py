"""FastGen's settings that are flags here: --fake-loss flow (the fake score's error on the flow velocity, as FastGen's
fake_score_pred_type "flow": mse(eps - x0, v_hat), fastgen/methods/common_loss.py) and --zero-nonfinite-grads
(fastgen/callbacks/grad_clip.py: the student's NaN gradients -> 0, then clip and step)."""
import math

import pytest
import torch

import dfd


def test_flow_loss_is_the_velocity_error():
    g = torch.Generator().manual_seed(0)
    x_gen, eps = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    w = torch.randn(2, 2, generator=g)
    fake = lambda x_t, tt, cond: torch.einsum("ij,bjk->bik", w, x_t) * (1 - dfd.expand(tt, x_t))  # any x0 predictor
    x_t = dfd.forward_diffusion(x_gen, eps, t)
    v_hat = dfd.v_from_x0(x_t, fake(x_t, t, None), t)
    want = ((v_hat - (eps - x_gen)) ** 2).mean()
    torch.testing.assert_close(dfd.fake_score_loss(fake, x_gen, eps, t, None, space="flow"), want, rtol=1e-5, atol=0)
    x0_err = ((fake(x_t, t, None) - x_gen) ** 2).mean()
    torch.testing.assert_close(dfd.fake_score_loss(fake, x_gen, eps, t, None), x0_err, rtol=1e-6, atol=0)


class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t, cond):
        return self.lin(x)


def test_nonfinite_student_gradients_stop_or_are_zeroed():
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randn(2, 3, 4, generator=g), None)]
    teacher = lambda x, t, c: 0.5 * x
    for zero in (False, True):
        torch.manual_seed(0)
        student, fake = Lin(), Lin()
        before = student.lin.weight.detach().clone()
        student.lin.weight.register_hook(lambda grad: torch.where(torch.eye(4, dtype=torch.bool), math.nan, grad))
        c = dfd.DFDConfig(zero_nonfinite=zero, grad_clip=10.0)
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        step = lambda: dfd.student_step(student, teacher, fake, opt, batch, c, 0)
        if not zero:
            with pytest.raises(FloatingPointError, match="non-finite student gradient norm"):
                step()
            assert torch.equal(student.lin.weight, before)  # checked before the weights change
            continue
        step()
        moved = student.lin.weight.detach() - before
        assert torch.isfinite(student.lin.weight).all() and (moved.diagonal() == 0).all() and moved.abs().sum() > 0
