"""Triton gated RMSNorm (mmm4rec_kernels/triton/gated_rmsnorm.py) against the float64 torch reference.

Forward output and every gradient (dy, dz, dweight) are compared with a relative-norm error; under the Triton
interpreter (no CUDA) only float32 runs, a bfloat16 case runs on CUDA."""
import pytest
import torch

from mmm4rec_kernels.reference import gated_rmsnorm_ref
from mmm4rec_kernels.triton.gated_rmsnorm import gated_rmsnorm_bwd, gated_rmsnorm_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _case(shape, has_z, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    y = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    z = 3.0 * torch.randn(*shape, generator=g, dtype=torch.float64) if has_z else None
    w = 1.0 + 0.5 * torch.randn(shape[-1], generator=g, dtype=torch.float64)
    dout = torch.randn(*shape, generator=g, dtype=torch.float64)
    return y, z, w, dout


def _reference(y, z, w, dout, eps, group_size):
    leaves = [t.clone().requires_grad_() for t in (y, z, w) if t is not None]
    yy, zz, ww = (leaves[0], leaves[1], leaves[2]) if z is not None else (leaves[0], None, leaves[1])
    out = gated_rmsnorm_ref(yy, zz, ww, eps, group_size)
    grads = torch.autograd.grad(out, leaves, dout)
    if z is None:
        grads = (grads[0], None, grads[1])
    return out.detach(), grads


def _run(y, z, w, dout, eps, group_size, dtype):
    cast = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    out, rstd = gated_rmsnorm_fwd(cast(y), cast(z), cast(w), eps, group_size)
    grads = gated_rmsnorm_bwd(cast(dout), cast(y), cast(z), cast(w), rstd, eps, group_size)
    return out, rstd, grads


CASES = [
    # shape, has_z, group_size, eps, scale
    ((5, 64), True, None, 1e-5, 1.0),            # one group = all channels
    ((2, 7, 96), True, 32, 1e-5, 1.0),           # 3 groups, rows not a multiple of the row block
    ((3, 4, 48), False, 24, 1e-6, 1.0),          # plain RMSNorm, group not a power of two (masked tile)
    ((2, 3, 512), True, 64, 1e-5, 1.0),          # d_inner 512 with 8 groups (H heads)
    ((130, 40), True, 40, 1e-5, 1e3),            # many rows, large values, non-power-of-two d
    ((4, 16), True, 16, 1e-2, 1e-3),             # tiny values: eps dominates
]


@pytest.mark.parametrize("shape,has_z,group_size,eps,scale", CASES)
def test_gated_rmsnorm_fp32_matches_reference(shape, has_z, group_size, eps, scale):
    y, z, w, dout = _case(shape, has_z, seed=sum(shape), scale=scale)
    out_r, (dy_r, dz_r, dw_r) = _reference(y, z, w, dout, eps, group_size)
    out, rstd, (dy, dz, dw) = _run(y, z, w, dout, eps, group_size, torch.float32)
    d = shape[-1]
    gs = d if group_size is None else group_size
    assert out.shape == y.shape and out.dtype == torch.float32
    assert rstd.shape == (y.numel() // d, d // gs) and rstd.dtype == torch.float32
    assert rel(out.cpu(), out_r) < 1e-5
    assert rel(dy.cpu(), dy_r) < 1e-5
    assert rel(dw.cpu(), dw_r) < 1e-5
    if has_z:
        assert rel(dz.cpu(), dz_r) < 1e-5
    else:
        assert dz is None


def test_groups_are_independent():
    """Scaling one group of channels must leave the other groups' outputs unchanged (norm per group)."""
    y, z, w, _ = _case((3, 64), True, seed=1)
    y2 = y.clone()
    y2[:, :16] *= 100.0
    out1, _ = gated_rmsnorm_fwd(y.float().to(DEVICE), z.float().to(DEVICE), w.float().to(DEVICE), 1e-5, 16)
    out2, _ = gated_rmsnorm_fwd(y2.float().to(DEVICE), z.float().to(DEVICE), w.float().to(DEVICE), 1e-5, 16)
    assert torch.equal(out1[:, 16:], out2[:, 16:])
    assert rel(out2[:, :16].cpu(), out1[:, :16].cpu()) < 1e-5          # scale-invariant up to eps


def test_bad_arguments_raise():
    y = torch.randn(2, 12, device=DEVICE)
    w = torch.ones(12, device=DEVICE)
    with pytest.raises(ValueError, match="group_size"):
        gated_rmsnorm_fwd(y, None, w, 1e-5, 5)
    with pytest.raises(ValueError, match="weight"):
        gated_rmsnorm_fwd(y, None, w[:6], 1e-5, None)
    with pytest.raises(ValueError, match="z must"):
        gated_rmsnorm_fwd(y, y[:1], w, 1e-5, None)
    with pytest.raises(ValueError, match="float32"):
        gated_rmsnorm_fwd(y.double(), None, w.double(), 1e-5, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 needs CUDA (the Triton interpreter is fp32-only)")
def test_gated_rmsnorm_bf16_cuda():
    y, z, w, dout = _case((64, 20, 512), True, seed=7)
    out_r, (dy_r, dz_r, dw_r) = _reference(y, z, w, dout, 1e-5, 64)
    out, _, (dy, dz, dw) = _run(y, z, w, dout, 1e-5, 64, torch.bfloat16)
    assert out.dtype == dy.dtype == dz.dtype == dw.dtype == torch.bfloat16
    for a, b in ((out, out_r), (dy, dy_r), (dz, dz_r), (dw, dw_r)):
        assert rel(a.cpu(), b) < 2e-2
