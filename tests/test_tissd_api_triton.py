"""The public op end to end through the Triton backend (autograd.Function + token layout + dispatch), both paths,
padded and packed batches, states; fp32 under the interpreter on CPU, bf16 on CUDA only."""
import pytest
import torch

import mmm4rec_kernels as mk

from test_tissd_api import close, make, rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grads_of(inp, dtype, device, seed, **kw):
    """y and the gradients of every input for one call of tissd with a fixed random dy."""
    leaves = {k: v.to(device=device, dtype=dtype).clone().requires_grad_() for k, v in inp.items()}
    h0 = kw.pop("initial_states", None)
    if h0 is not None:
        h0 = h0.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype).requires_grad_()
        kw["initial_states"] = h0
    out = mk.tissd(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"],
                   time_scale=leaves["time_scale"], dt_bias=leaves["dt_bias"], D=leaves["D"], **kw)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(device=device, dtype=o.dtype) for o in outs]
    wrt = list(leaves.values()) + ([h0] if h0 is not None else [])
    grads = torch.autograd.grad(outs, wrt, cot)
    return [o.double().cpu() for o in outs], [gr.double().cpu() for gr in grads]


CASES = [  # (L, path, lengths-fraction, states, chunk)
    (1, "quadratic", 1.0, False, 64),
    (20, "quadratic", 0.5, False, 64),
    (63, "chunked", 0.3, False, 16),
    (20, "chunked", 1.0, True, 16),
    (37, "auto", 0.5, True, 16),
]


@pytest.mark.parametrize("L,path,frac,states,chunk", CASES)
def test_triton_backend_matches_float64_reference(L, path, frac, states, chunk):
    inp = make(b=3, L=L, H=4, P=16, G=2, n=16, seed=100 + L, decay=2.0)
    lengths = torch.tensor([L, max(1, int(L * frac)), 1])
    kw = dict(lengths=lengths.to(DEVICE), chunk_size=chunk)
    kw_ref = dict(lengths=lengths, path="reference")
    if states:
        h0 = torch.randn(3, 4, 16, 16, dtype=torch.float64)
        kw.update(initial_states=h0, return_final_states=True)
        kw_ref.update(initial_states=h0, return_final_states=True)
    outs, grads = grads_of(inp, torch.float32, DEVICE, L, backend="triton", path=path, **kw)
    outs_r, grads_r = grads_of(inp, torch.float64, "cpu", L, **kw_ref)
    for o, o_r in zip(outs, outs_r):
        assert rel(o, o_r) < 1e-4
    names = list(inp) + (["initial_states"] if states else [])
    for name, gr, gr_r in zip(names, grads, grads_r):
        assert close(gr, gr_r, 1e-4, atol=1e-6), (name, rel(gr, gr_r))


@pytest.mark.parametrize("path", ["quadratic", "chunked"])
def test_triton_packed_equals_padded(path):
    lens = [9, 1, 5]
    inp = make(b=3, L=9, H=2, P=16, G=1, n=16, seed=7, dtype=torch.float32)
    pack = lambda t: torch.cat([t[i, :l] for i, l in enumerate(lens)])[None]  # noqa: E731
    packed = {k: (pack(v) if v.dim() > 1 else v) for k, v in inp.items()}
    args = lambda d: (d["x"], d["dt"], d["A"], d["B"], d["C"])  # noqa: E731
    extra = lambda d: dict(time_scale=d["time_scale"], dt_bias=d["dt_bias"], D=d["D"])  # noqa: E731
    to = lambda d: {k: v.to(DEVICE) for k, v in d.items()}  # noqa: E731
    y = mk.tissd(*args(to(inp)), **extra(to(inp)), lengths=torch.tensor(lens, device=DEVICE), backend="triton",
                 path=path, chunk_size=16)
    yp = mk.tissd(*args(to(packed)), **extra(to(packed)), cu_seqlens=torch.tensor([0, 9, 10, 15], device=DEVICE),
                  backend="triton", path=path, chunk_size=16)
    assert rel(yp.cpu(), pack(y.cpu())) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton kernels need a CUDA device (interpreter is fp32 only)")
@pytest.mark.parametrize("path", ["quadratic", "chunked"])
def test_triton_bf16_on_gpu(path):
    inp = make(b=4, L=50, H=8, P=64, G=8, n=64, seed=3)
    outs, grads = grads_of(inp, torch.bfloat16, "cuda", 1, backend="triton", path=path)
    outs_r, grads_r = grads_of(inp, torch.float64, "cpu", 1, path="reference")
    assert rel(outs[0], outs_r[0]) < 3e-2
    for name, gr, gr_r in zip(inp, grads, grads_r):
        assert rel(gr, gr_r) < 5e-2, name
