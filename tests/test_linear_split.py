"""linear_split (a Linear whose backward never concatenates its split pieces) vs F.linear + torch.split, float64."""
import pytest
import torch
import torch.nn.functional as F

from mmm4rec_kernels.modules import linear_split


def rel(a, b):
    return float((a.detach() - b.detach()).norm() / b.detach().norm().clamp_min(1e-300))


@pytest.mark.parametrize("shape", [(5, 6), (3, 7, 6), (1, 1, 6)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2), (1,)])
def test_pieces_and_gradients_match_linear_then_split(shape, with_bias, used):
    g = torch.Generator().manual_seed(sum(shape) * 10 + len(used) + with_bias)
    sizes = [4, 9, 2]
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(sum(sizes), shape[-1], generator=g, dtype=torch.float64)
    b = torch.randn(sum(sizes), generator=g, dtype=torch.float64) if with_bias else None
    cots = [torch.randn(*shape[:-1], s, generator=g, dtype=torch.float64) for s in sizes]
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if with_bias else ())]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if with_bias else ())]
    pieces = linear_split(leaves[0], leaves[1], leaves[2] if with_bias else None, sizes)
    ref = torch.split(F.linear(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_bias else None), sizes, dim=-1)
    for p, r in zip(pieces, ref):
        assert p.shape == r.shape and rel(p, r) < 1e-12
    loss = sum((pieces[i] * cots[i]).sum() for i in used)
    ref_loss = sum((ref[i] * cots[i]).sum() for i in used)
    for name, a, r in zip(("dx", "dweight", "dbias"), torch.autograd.grad(loss, leaves),
                          torch.autograd.grad(ref_loss, ref_leaves)):
        assert rel(a, r) < 1e-12, name


def test_only_weight_needs_grad_and_no_grad_mode():
    torch.manual_seed(0)
    x, w = torch.randn(4, 3), torch.randn(5, 3, requires_grad=True)
    a, b = linear_split(x, w, None, [2, 3])
    (a.sum() + 2 * b.sum()).backward()
    ref = torch.cat([x.sum(0).expand(2, 3), 2 * x.sum(0).expand(3, 3)])
    torch.testing.assert_close(w.grad, ref)
    with torch.no_grad():
        a2, b2 = linear_split(x, w, None, [2, 3])
    torch.testing.assert_close(torch.cat([a2, b2], -1), x @ w.detach().T)


def test_sizes_must_cover_the_weight():
    with pytest.raises(ValueError, match="sizes"):
        linear_split(torch.zeros(2, 3), torch.zeros(5, 3), None, [2, 2])
