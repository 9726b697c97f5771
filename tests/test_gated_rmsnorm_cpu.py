"""Native CPU gated RMSNorm (mmm4rec_kernels/cpu/gated_rmsnorm.cpp, through `gated_rmsnorm` on CPU in eager) against
the float64 torch reference: output and every gradient (dy, dz, dweight), float64 and float32, with and without z,
one or several groups, extreme gates (no overflow), and a NaN row that must stay in its row."""
import pytest
import torch

from mmm4rec_kernels import cpu as native
from mmm4rec_kernels.gated_rmsnorm import explain_gated_rmsnorm, gated_rmsnorm
from mmm4rec_kernels.reference import gated_rmsnorm_ref

pytestmark = pytest.mark.skipif(not native.available(), reason="native CPU kernels unavailable")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def grads(fn, y, z, w, dout, dtype):
    leaves = [t.to(dtype).clone().requires_grad_() for t in (y, z, w) if t is not None]
    yy, zz, ww = (leaves[0], leaves[1], leaves[2]) if z is not None else (leaves[0], None, leaves[1])
    out = fn(yy, zz, ww)
    g = list(torch.autograd.grad(out, leaves, dout.to(dtype)))
    if z is None:
        g.insert(1, None)
    return out.detach(), g


CASES = [((5, 64), True, None, 1.0), ((2, 7, 96), True, 32, 1.0), ((3, 4, 48), False, 24, 1.0),
         ((130, 40), True, 40, 1e3), ((4, 16), True, 16, 1e-3), ((1, 1, 8), True, 8, 1.0)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape,has_z,group,scale", CASES)
def test_native_norm_matches_reference(shape, has_z, group, scale, dtype, tol):
    g = torch.Generator().manual_seed(sum(shape))
    y = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    z = 3.0 * torch.randn(*shape, generator=g, dtype=torch.float64) if has_z else None
    w = 1.0 + 0.5 * torch.randn(shape[-1], generator=g, dtype=torch.float64)
    dout = torch.randn(*shape, generator=g, dtype=torch.float64)
    assert explain_gated_rmsnorm(y.to(dtype))["backend"] == "native"
    out, got = grads(lambda a, b, c: gated_rmsnorm(a, b, c, 1e-5, group), y, z, w, dout, dtype)
    ref, want = grads(lambda a, b, c: gated_rmsnorm_ref(a, b, c, 1e-5, group), y, z, w, dout, torch.float64)
    assert out.dtype == dtype and rel(out, ref) < tol
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel(a, b) < tol


def test_extreme_gates_and_nan_rows():
    y = torch.randn(4, 32, dtype=torch.float64)
    z = torch.tensor([-1e4, -200.0, 200.0, 1e4], dtype=torch.float64).repeat(4, 8)
    z[3, 0] = float("nan")
    w = torch.ones(32, dtype=torch.float64, requires_grad=True)
    yy = y.clone().requires_grad_()
    out = gated_rmsnorm(yy, z, w, 1e-5, 16)
    out.sum().backward()
    assert torch.isfinite(out[:3]).all() and torch.isfinite(yy.grad[:3]).all()
    assert torch.isnan(out[3, :16]).all() and torch.isfinite(out[3, 16:]).all()   # NaN stays in its group
    ref = gated_rmsnorm_ref(y[:3], z[:3], torch.ones(32, dtype=torch.float64), 1e-5, 16)
    assert rel(out[:3].detach(), ref) < 1e-12
