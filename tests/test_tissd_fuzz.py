"""Deterministic fuzz of the public op: random valid shapes and options on the torch and the Triton backend (fp32,
interpreter on CPU), output and EVERY gradient against the float64 recurrence of reference.py.

Each backend gets 10 cases; P runs through {1, 3, 16, 64, 130} twice and n through {1, 5, 16, 64}; the rest (H, G | H,
L, layout padded/packed/full, states, gated norm / z gate / none, d_skip, D [H] or [H, P], path, chunk) is drawn from
a seeded generator, so a failure names a reproducible case."""
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import mmm4rec_kernels as mk
from mmm4rec_kernels import reference as ref

from test_tissd_api import rel

PS, NS = (1, 3, 16, 64, 130), (1, 5, 16, 64)


@dataclass(frozen=True)
class Case:
    backend: str
    P: int
    n: int
    H: int
    G: int
    lens: tuple
    layout: str       # "full" | "padded" | "packed"
    states: bool
    epilogue: str     # "none" | "norm" | "gate"
    d_skip: str
    D_per_channel: bool
    path: str
    chunk: int
    seed: int

    def __str__(self):
        return (f"{self.backend}-P{self.P}-n{self.n}-H{self.H}G{self.G}-{self.layout}{list(self.lens)}-"
                f"{'h0' if self.states else 'noh0'}-{self.epilogue}-{self.d_skip}-"
                f"D{'HP' if self.D_per_channel else 'H'}-{self.path}-Q{self.chunk}")


def _cases():
    rng = random.Random(20261202)
    out = []
    for k, backend in enumerate(("torch", "triton")):
        for i in range(10):
            H = rng.choice((1, 2, 4))
            layout = rng.choice(("full", "padded", "packed"))
            nseq = rng.randint(1, 3) if layout != "full" else rng.randint(1, 2)
            L = rng.randint(1, 40)
            lens = tuple([L] + [rng.randint(0 if layout == "packed" else 1, L) for _ in range(nseq - 1)])
            if layout == "full":
                lens = (L,) * nseq
            states = rng.random() < 0.4
            G = rng.choice([g for g in (1, 2, 4) if H % g == 0])
            out.append(Case(backend, PS[i % 5], NS[(i + 2 * k) % 4], H, G,
                            lens, layout, states, rng.choice(("none", "norm", "gate")), rng.choice(("delta", "plain")),
                            rng.random() < 0.3, "chunked" if states else rng.choice(("auto", "quadratic", "chunked")),
                            rng.choice((16, 32)), 1000 + 10 * i + k))
    return out


CASES = _cases()


def test_fuzz_covers_the_shapes():
    for backend in ("torch", "triton"):
        cs = [c for c in CASES if c.backend == backend]
        assert {c.P for c in cs} == set(PS) and {c.n for c in cs} == set(NS), backend
    assert {c.layout for c in CASES} == {"full", "padded", "packed"} and {c.epilogue for c in CASES} == \
        {"none", "norm", "gate"} and any(c.states for c in CASES) and any(c.G < c.H for c in CASES)


def _inputs(c: Case):
    g = torch.Generator().manual_seed(c.seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    b, L = len(c.lens), max(c.lens)
    d = dict(x=r(b, L, c.H, c.P), dt=r(b, L, c.H), A=-(0.2 + 2 * torch.rand(c.H, generator=g)),
             B=r(b, L, c.G, c.n) / c.n ** 0.5, C=r(b, L, c.G, c.n), time_scale=3 * torch.rand(b, L, c.H, generator=g),
             dt_bias=r(c.H), D=r(c.H, c.P) if c.D_per_channel else r(c.H))
    extra = {}
    if c.states:
        extra["initial_states"] = r(b, c.H, c.P, c.n)
    if c.epilogue != "none":
        extra["z"] = r(b, L, c.H, c.P)
    if c.epilogue == "norm":
        extra["norm_weight"] = 1 + 0.1 * r(c.H * c.P)
    return d, extra


def _oracle(c: Case, d, extra):
    """float64 truth on the padded layout (lengths = c.lens): y (and h_T)."""
    lengths = torch.tensor(c.lens)
    out = ref.tissd_recurrent_ref(d["x"], d["dt"], d["A"], d["B"], d["C"], time_scale=d["time_scale"],
                                  dt_bias=d["dt_bias"], D=d["D"], d_skip=c.d_skip, lengths=lengths,
                                  initial_states=extra.get("initial_states"), return_final_states=c.states)
    y, final = out if c.states else (out, None)
    b, L, H, P = y.shape
    if c.epilogue == "norm":
        y = ref.gated_rmsnorm_ref(y.reshape(b, L, H * P), extra["z"].reshape(b, L, H * P), extra["norm_weight"],
                                  1e-5, P if H > 1 else None).view(b, L, H, P)
    elif c.epilogue == "gate":
        y = y * F.silu(extra["z"])
    return (y, final) if c.states else (y,)


def _pack(t, lens):
    return torch.cat([t[i, :l] for i, l in enumerate(lens)])[None]


def _ours(c: Case, d, extra):
    kw = dict(time_scale=d["time_scale"], dt_bias=d["dt_bias"], D=d["D"], d_skip=c.d_skip, backend=c.backend,
              path=c.path, chunk_size=c.chunk, return_final_states=c.states, norm_group_size=c.P if c.H > 1 else None,
              **extra)
    args = [d[k] for k in ("x", "dt", "A", "B", "C")]
    if c.layout == "packed":
        args = [_pack(t, c.lens) if t.dim() > 1 else t for t in args]
        for k in ("time_scale", "z"):
            if kw.get(k) is not None:
                kw[k] = _pack(kw[k], c.lens)
        kw["cu_seqlens"] = torch.tensor([0] + list(c.lens)).cumsum(0)
    elif c.layout == "padded":
        kw["lengths"] = torch.tensor(c.lens)
    out = mk.tissd(*args, **kw)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fuzz_matches_float64_reference(case):
    d, extra = _inputs(case)
    names = list(d) + list(extra)
    leaves = {k: v.clone().requires_grad_() for k, v in {**d, **extra}.items()}
    leaves64 = {k: v.double().clone().requires_grad_() for k, v in {**d, **extra}.items()}
    outs = _ours(case, {k: leaves[k] for k in d}, {k: leaves[k] for k in extra})
    outs_r = _oracle(case, {k: leaves64[k] for k in d}, {k: leaves64[k] for k in extra})
    g = torch.Generator().manual_seed(case.seed + 1)
    cot_r = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs_r]
    cot = [(_pack(ct, case.lens) if (case.layout == "packed" and i == 0) else ct).float() for i, ct in enumerate(cot_r)]
    grads = torch.autograd.grad(outs, [leaves[k] for k in names], cot, allow_unused=True)
    grads_r = torch.autograd.grad(outs_r, [leaves64[k] for k in names], cot_r, allow_unused=True)
    for i, (o, o_r) in enumerate(zip(outs, outs_r)):
        if case.layout == "packed" and i == 0:
            o_r = _pack(o_r, case.lens)
        assert o.dtype == torch.float32, o.dtype
        r = rel(o.double(), o_r)
        assert r < 1e-4, ("output", i, r)
    for name, gr, gr_r in zip(names, grads, grads_r):
        gr_r = torch.zeros_like(leaves64[name]) if gr_r is None else gr_r  # packed: leaves are the padded tensors
        assert gr is not None and torch.isfinite(gr).all(), name
        err, scale = (gr.double() - gr_r).norm().item(), gr_r.norm().item()
        assert err <= 1e-4 * scale + 1e-8, ("grad", name, err / max(scale, 1e-30))
