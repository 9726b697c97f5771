"""mmm4rec_kernels.modules.Dropout: nn.Dropout's semantics with a cheaper CPU mask."""
import pytest
import torch

from mmm4rec_kernels.modules import Dropout


@pytest.mark.parametrize("p", [0.1, 0.4, 0.7])
def test_keeps_one_minus_p_and_scales(p):
    torch.manual_seed(0)
    drop = Dropout(p).train()
    x = torch.rand(200_000, dtype=torch.float64) + 0.5
    x.requires_grad_()
    y = drop(x)
    kept = y != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.005                  # ~5 sigma at n = 2e5
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, kept.double() / (1 - p))                     # gradient through the same mask


def test_identity_in_eval_and_at_p0_and_fresh_masks():
    x = torch.randn(64, 32)
    assert Dropout(0.5).eval()(x) is x and Dropout(0.0).train()(x) is x
    drop = Dropout(0.5).train()
    assert not torch.equal(drop(x) != 0, drop(x) != 0)                          # a new mask per call
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(a, drop(x))                                              # seeded: reproducible


def test_p_one_and_inplace_fall_back_to_nn_dropout():
    x = torch.randn(8, 8)
    assert not Dropout(1.0).train()(x).any()
    y = x.clone()
    Dropout(0.5, inplace=True).train()(y)
    assert ((y == 0) | torch.isclose(y, 2 * x)).all()
