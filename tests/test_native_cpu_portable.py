"""The native CPU kernels built for x86-64 machines without AVX-512 (AVX2) or without AVX (SSE only): the library is
built with -march=native, so its vector paths differ per machine, and this box has AVX-512.  Each case builds the
library with the given flags added (a CXX wrapper, a temporary MMM4REC_CACHE_DIR) and checks, in a fresh process,
the conv + SiLU (fp32 / fp64, channels not a multiple of any vector width), the quadratic scan and the one-node
tissd() call (short and long sequences; a head with A > 0, whose positive segment sums the exp there must recompute,
and one whose decays fall below e^-60) against float64 torch references.  A build that read or wrote past its
buffers (fp64 dw over 4-double AVX2 vectors did, before the fix) fails here."""
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None,
                                 reason="x86-64 with g++ only")]

CHECK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    import mmm4rec_kernels.cpu as native
    from mmm4rec_kernels import reference, torch_backend
    assert native.available(), native.status()
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        x = torch.randn(3, 9, 12, generator=g, dtype=torch.float64)
        w, b, gy = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64), torch.randn(3, 9, 12, generator=g, dtype=torch.float64)
        y = native.conv_forward(x.to(dtype), w.to(dtype), b.to(dtype), True)
        dx, dw, db = native.conv_backward(x.to(dtype), w.to(dtype), b.to(dtype), True, [(0, 12, gy.to(dtype))])
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        ref = F.silu(F.conv1d(leaves[0].transpose(1, 2), leaves[1][:, None], leaves[2], padding=3, groups=12)[..., :9]).transpose(1, 2)
        refs = torch.autograd.grad(ref, leaves, gy)
        for name, a, r in (("y", y, ref), ("dx", dx, refs[0]), ("dw", dw, refs[1]), ("db", db, refs[2])):
            assert rel(a, r) < tol, (dtype, name, rel(a, r))
        for L in (20, 45):
            b_, H, P, G, n = 3, 4, 12, 2, 5
            mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
            A = -torch.rand(H, generator=g, dtype=torch.float64) - 0.1
            A[1], A[2] = 1.0, -40.0              # a growing head (exp of positive segment sums) and decays below e^-60
            inp = [mk(b_, L, H, P), mk(b_, L, H), A, mk(b_, L, G, n), mk(b_, L, G, n)]
            lengths = torch.tensor([L, L // 2, 1])
            ours = [t.to(dtype).requires_grad_() for t in inp]
            y = torch_backend.tissd_torch(*ours, lengths=lengths, path="quadratic")
            cot = mk(*y.shape)
            grads = torch.autograd.grad(y, ours, cot.to(dtype))
            refl = [t.clone().requires_grad_() for t in inp]
            ref = reference.tissd_recurrent_ref(*refl, lengths=lengths)
            for a, r in zip((y, *grads), (ref, *torch.autograd.grad(ref, refl, cot))):
                assert rel(a, r) < (tol if dtype == torch.float64 else 2e-5), (dtype, L, rel(a, r))
    # a decay past fp32's overflow (log-decay +200): exp gives inf, so y's row 1 (C.B, delta, x all 1) is inf; the
    # round-and-scale exp of the builds without AVX-512 wraps its exponent there unless recomputed (kExpAnySign)
    one = torch.ones(1, 2, 1, 16)
    y = native.scan_forward(one, torch.ones(1, 2, 1), torch.tensor([[[0.0], [200.0]]]), torch.ones(1, 2, 1, 16),
                            torch.ones(1, 2, 1, 16) / 16, None, torch.tensor([2]), False)
    assert torch.isinf(y[0, 1]).all() and (y[0, 1] > 0).all(), y[0, 1]
    print("ok")
""")


@pytest.mark.parametrize("flag", ["-mno-avx512f", "-mno-avx"])
def test_kernels_without_avx512_or_avx(tmp_path, flag):
    wrapper = tmp_path / "g++"
    wrapper.write_text(f'#!/bin/sh\nexec "{shutil.which("g++")}" "$@" {flag}\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, CXX=str(wrapper), MMM4REC_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               MMM4REC_CPP_NODES="0")          # the kernels' values through the Python nodes (no torch-header build)
    r = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.stdout[-2000:], r.stderr[-2000:])
