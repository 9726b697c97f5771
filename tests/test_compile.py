"""Compile-native: every registered op passes torch.library.opcheck; the drop-in layer, the example model, MMM4Rec's
loss and the RecBole adapter compile with fullgraph=True and 0 graph breaks, once for batches of different (b, L)
(dynamic shapes), with results equal to eager (values and gradients)."""
import math
import os
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mmm4rec_kernels import ops, tissd
from mmm4rec_kernels.modules import TimeAwareSSD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def breaks(fn, *args, **kwargs):
    """(graph breaks, graphs) of one call of fn under torch._dynamo.explain."""
    torch._dynamo.reset()
    e = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = "; ".join(r.reason.splitlines()[0] for r in e.break_reasons)
    return e.graph_break_count, e.graph_count, reasons


# ----------------------------------------------------------------------------------------------------- opcheck
def _scan_sample(g, D=True):
    b, L, H, P, G, n = 2, 6, 4, 3, 2, 5
    mk = lambda *s: torch.randn(*s, generator=g, requires_grad=True)  # noqa: E731
    delta = (torch.rand(b, L, H, generator=g) + 0.1).requires_grad_()
    log_decay = (-torch.rand(b, L, H, generator=g)).requires_grad_()
    return (mk(b, L, H, P), delta, log_decay, mk(b, L, G, n), mk(b, L, G, n), mk(H, P) if D else None,
            torch.tensor([6, 4], dtype=torch.int64), True)


def _conv_sample(g, bias=True):
    x = torch.randn(2, 7, 6, generator=g, requires_grad=True)
    return (x, torch.randn(6, 4, generator=g, requires_grad=True),
            torch.randn(6, generator=g, requires_grad=True) if bias else None, True)


def _fused_sample(g, path, E=True):
    b, L, H, P, G, n = 2, 7, 2, 16, 1, 16
    T = b * L
    mk = lambda *s: torch.randn(*s, generator=g, requires_grad=True)  # noqa: E731
    seq_start = torch.arange(b, dtype=torch.int64) * L
    seq_len = torch.tensor([7, 4], dtype=torch.int32)
    h0 = mk(b, H, P, n) if path == "chunked" else None
    return (mk(T, H, P), mk(T, H), (-torch.rand(H, generator=g) - 0.1).requires_grad_(), mk(T, G, n), mk(T, G, n),
            (torch.rand(T, H, generator=g) + 0.5).requires_grad_() if E else None, mk(H), mk(H), h0, seq_start,
            seq_len, L, "triton", path, True, True, False, False, path == "chunked", 16)


def _norm_sample(g, z=True):
    y = torch.randn(5, 8, generator=g, requires_grad=True)
    return (y, torch.randn(5, 8, generator=g, requires_grad=True) if z else None,
            torch.randn(8, generator=g, requires_grad=True), 1e-5, 4)


def _backward_sample(forward_op, sample):
    """Inputs of a *_bwd op: the forward's inputs (detached) with the incoming gradient(s) in front."""
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in sample]
    out = forward_op(*args)
    if forward_op is torch.ops.mmm4rec.ssd_scan_cpu:
        return (torch.randn_like(out), *args)
    if forward_op is torch.ops.mmm4rec.causal_conv_cpu:
        return (torch.randn_like(out), *args[:4])
    if forward_op is torch.ops.mmm4rec.tissd_fused:
        y, final = out
        dfinal = torch.randn_like(final) if final.numel() else None
        return (torch.randn_like(y), dfinal, *args[:18], args[19])
    y, rstd = out
    return (torch.randn_like(y), args[0], args[1], args[2], rstd, args[3], args[4])


def _marks_sample(g, E=True, bad=True):
    """nonfinite_onward's inputs: 3 sequences of 6 steps (lengths 6, 4, 0), H 4, G 2; NaN / inf at valid steps."""
    b, L, H, P, G, n = 3, 6, 4, 3, 2, 5
    x, dt, B, C = torch.randn(b, L, H, P, generator=g), torch.randn(b, L, H, generator=g), \
        torch.randn(b, L, G, n, generator=g), torch.randn(b, L, G, n, generator=g)
    if bad:
        x[0, 2, 1, 0], B[1, 1, 1, 3], dt[0, 4, 3] = float("nan"), float("inf"), float("-inf")
    mask = torch.arange(L)[None, :] < torch.tensor([6, 4, 0])[:, None]
    return (x, dt, torch.rand(b, L, H, generator=g) if E else None, B, C, mask)


SAMPLES = {   # op name -> list of (label, builder(generator) -> args, needs)
    "ssd_scan_cpu": [("D", lambda g: _scan_sample(g)), ("noD", lambda g: _scan_sample(g, D=False))],
    "causal_conv_cpu": [("bias", lambda g: _conv_sample(g)), ("nobias", lambda g: _conv_sample(g, bias=False))],
    "tissd_fused": [("quadratic", lambda g: _fused_sample(g, "quadratic")),
                    ("chunked", lambda g: _fused_sample(g, "chunked")),
                    ("quadratic-noE", lambda g: _fused_sample(g, "quadratic", E=False))],
    "gated_rmsnorm_fused": [("z", lambda g: _norm_sample(g)), ("noz", lambda g: _norm_sample(g, z=False))],
    "nonfinite_onward": [("bad", lambda g: _marks_sample(g)), ("noE", lambda g: _marks_sample(g, E=False)),
                         ("finite", lambda g: _marks_sample(g, bad=False))],
}
NEEDS = {"ssd_scan_cpu": "native", "causal_conv_cpu": "native", "tissd_fused": "triton",
         "gated_rmsnorm_fused": "triton", "nonfinite_onward": "torch"}
CASES = [(name, label, build) for name, cases in SAMPLES.items() for label, build in cases] + \
        [(name + "_bwd", label, build) for name, cases in SAMPLES.items() for label, build in cases
         if NEEDS[name] != "torch"]                                      # nonfinite_onward: no gradient


def test_every_registered_op_has_an_opcheck_case():
    assert sorted({c[0] for c in CASES}) == sorted(ops.OPS)
    for name in ops.OPS:
        assert hasattr(torch.ops.mmm4rec, name), name


@pytest.mark.parametrize("name,label,build", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_opcheck(name, label, build, request):
    base = name[:-4] if name.endswith("_bwd") else name
    if NEEDS[base] == "native":
        request.getfixturevalue("native_cpu")
    elif NEEDS[base] == "torch":
        pass
    elif os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton ops need a GPU or TRITON_INTERPRET=1")
    sample = build(torch.Generator().manual_seed(0))
    if name.endswith("_bwd"):
        sample = _backward_sample(getattr(torch.ops.mmm4rec, base), sample)
    result = torch.library.opcheck(getattr(torch.ops.mmm4rec, name), sample)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_nonfinite_marks_op_equals_the_per_step_rule():
    """The op (its sum shortcut on CPU included) marks exactly the valid steps from the first bad one of each
    (sequence, head) on: NaN at x[0, 2, head 1] -> steps 2..5 of head 1; -inf at dt[0, 4, head 3] -> 4..5 of head 3;
    inf at B[1, 1, group 1] -> steps 1..3 of heads 2, 3 (group 1) of sequence 1 (length 4); none in sequence 2."""
    x, dt, E, B, C, mask = _marks_sample(torch.Generator().manual_seed(0))
    got = torch.ops.mmm4rec.nonfinite_onward(x, dt, E, B, C, mask)
    want = torch.zeros(3, 6, 4, dtype=torch.bool)
    want[0, 2:, 1] = want[0, 4:, 3] = True
    want[1, 1:4, 2:] = True
    assert torch.equal(got, want)
    assert torch.equal(ops.nonfinite_onward_steps(x, dt, E, B, C, mask), want)
    clean = _marks_sample(torch.Generator().manual_seed(0), bad=False)
    assert not torch.ops.mmm4rec.nonfinite_onward(*clean).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA extension's op cases need a GPU")
def test_opcheck_cuda_backend():  # pragma: no cover - GPU only
    from mmm4rec_kernels import cuda as cuda_backend
    if not cuda_backend.available():
        pytest.skip("mmm4rec_kernels._cuda is not built")
    args = list(_fused_sample(torch.Generator().manual_seed(0), "quadratic"))
    args = [a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    args[12] = "cuda"
    result = torch.library.opcheck(torch.ops.mmm4rec.tissd_fused, tuple(args))
    assert all(v == "SUCCESS" for v in result.values()), result


# ---------------------------------------------------------------------------------------------- the drop-in layer
def _layer_inputs(b=3, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, 32, generator=g)
    t = torch.cumsum(torch.rand(b, L, generator=g, dtype=torch.float64) * 3600, 1)
    return x, t


def _layouts(b, L):
    lengths = torch.randint(2, L + 1, (b,))
    lengths[0] = L
    left = torch.arange(L)[None, :] >= (L - lengths)[:, None]
    return {"full": {}, "lengths": {"lengths": lengths}, "attention_mask_left": {"attention_mask": left.long()},
            "key_padding_mask": {"key_padding_mask": ~left}, "return_state": {"lengths": lengths,
                                                                              "return_state": True}}


LAYOUTS = ["full", "lengths", "attention_mask_left", "key_padding_mask", "return_state", "cu_seqlens",
           "no_timestamps"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_time_aware_ssd_has_no_graph_break(layout):
    torch.manual_seed(0)
    m = TimeAwareSSD(32, d_state=8, headdim=8)
    x, t = _layer_inputs()
    if layout == "cu_seqlens":
        args, kw = (x.reshape(1, -1, 32), t.reshape(1, -1)), {"cu_seqlens": torch.tensor([0, 12, 19, 36])}
    elif layout == "no_timestamps":
        args, kw = (x,), {"lengths": torch.tensor([12, 5, 9])}
    else:
        args, kw = (x, t), _layouts(3, 12)[layout]
    n_breaks, n_graphs, why = breaks(m, *args, **kw)
    assert (n_breaks, n_graphs) == (0, 1), why


def compiled_graphs(counter):
    """Graphs with at least one op (torch.compile of an nn.Module also compiles an empty wrapper frame)."""
    return sum(1 for g in counter.graphs if any(n.op == "call_function" for n in g.graph.nodes))


def _grads(m, *tensors):
    return [p.grad.clone() for p in m.parameters() if p.grad is not None] + [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("layout", ["lengths", pytest.param("attention_mask_left", marks=pytest.mark.slow),
                                    pytest.param("return_state", marks=pytest.mark.slow)])
def test_compiled_layer_equals_eager_and_compiles_once_for_five_shapes(layout, monkeypatch):
    """dynamic=True: five batches of different (b, L) reuse one graph; outputs and every gradient equal eager's
    (aot_eager: the registered ops' fake impls and autograd formulas, without inductor's rounding).  Eager runs the
    general path here, the one the compiler traces (the eager-only CPU paths round differently: fp32 gradients of
    the time encoding's ~1e-4-sized parameters differ by up to 1e-5 relative, both as close to float64; they are
    compared with the general path in tests/test_layer_cpu.py)."""
    from mmm4rec_kernels.modules import layer_cpu
    monkeypatch.setattr(layer_cpu, "forward", lambda *args: (None, "general path for this test"))
    torch.manual_seed(0)
    m = TimeAwareSSD(32, d_state=8, headdim=8)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=counter, fullgraph=True, dynamic=True)
    for i, (b, L) in enumerate([(3, 12), (5, 9), (2, 17), (4, 6), (6, 14)]):
        x, t = _layer_inputs(b, L, seed=i)
        kw = _layouts(b, L)[layout]
        outs = []
        for fn in (m, compiled):
            m.zero_grad()
            xi = x.clone().requires_grad_()
            out = fn(xi, t, **kw)
            y = out[0] if isinstance(out, tuple) else out
            loss = (y * torch.linspace(-1, 1, y.shape[-1])).sum()
            if isinstance(out, tuple):
                loss = loss + out[1].ssm.square().sum()
            loss.backward()
            outs.append((y.detach(), _grads(m, xi)))
        (y0, g0), (y1, g1) = outs
        assert rel(y1, y0) < 1e-5
        assert len(g0) == len(g1) and all(rel(a, b) < 1e-5 for a, b in zip(g1, g0))
    assert compiled_graphs(counter) == 1, f"recompiled: {compiled_graphs(counter)} graphs"


@pytest.mark.slow
def test_inductor_compiled_layer_equals_eager(monkeypatch):
    """The real compiler (inductor, C++ codegen on CPU): forward and gradients within 1e-5 of eager's general path
    in fp32 (the path it traces; see the test above)."""
    from mmm4rec_kernels.modules import layer_cpu
    monkeypatch.setattr(layer_cpu, "forward", lambda *args: (None, "general path for this test"))
    torch.manual_seed(0)
    m = TimeAwareSSD(32, d_state=8, headdim=8)
    x, t = _layer_inputs()
    lengths = torch.tensor([12, 5, 9])
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    res = []
    for fn in (m, compiled):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi, t, lengths=lengths)
        (y * torch.linspace(-1, 1, 32)).sum().backward()
        res.append((y.detach(), _grads(m, xi)))
    assert rel(res[1][0], res[0][0]) < 1e-5
    assert all(rel(a, b) < 1e-5 for a, b in zip(res[1][1], res[0][1]))


def test_tissd_op_under_compile_triton_interpreter():
    """The fused op (Triton under the interpreter on CPU) inside a compiled function: no break, eager's values."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on CPU)")
    g = torch.Generator().manual_seed(0)
    b, L, H, P, n = 2, 9, 2, 16, 16
    x, dt = torch.randn(b, L, H, P, generator=g), torch.randn(b, L, H, generator=g)
    A, B, C = -torch.rand(H, generator=g) - 0.1, torch.randn(b, L, 1, n, generator=g), torch.randn(b, L, 1, n,
                                                                                                  generator=g)
    lengths = torch.tensor([9, 5])
    fn = lambda x: tissd(x, dt, A, B, C, lengths=lengths, backend="triton", path="quadratic")  # noqa: E731
    assert breaks(fn, x)[:2] == (0, 1)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y0, y1 = fn(xs[0]), compiled(xs[1])
    y0.square().sum().backward()
    y1.square().sum().backward()
    assert rel(y1, y0) < 1e-6 and rel(xs[1].grad, xs[0].grad) < 1e-6


# ------------------------------------------------------------------------------------- models built on the layer
@pytest.mark.slow
def test_example_sasrec_has_no_graph_break_and_compiles_once():
    from examples.sasrec_time_ssd import TimeSSDRec, synthetic_batches
    torch.manual_seed(0)
    model = TimeSSDRec(num_items=50, d_model=32, n_layers=2, d_state=16, headdim=16)
    assert breaks(model.loss, *synthetic_batches()[0])[:2] == (0, 1)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    loss = torch.compile(model.loss, backend=counter, fullgraph=True, dynamic=True)
    for i, (b, L) in enumerate([(16, 12), (9, 7), (12, 15), (5, 10), (20, 8)]):
        batch = synthetic_batches(b=b, L=L, n_batches=1, seed=i)[0]
        model.zero_grad()
        loss(*batch).backward()
        assert math.isfinite(float(loss(*batch)))
    assert compiled_graphs(counter) == 1


def _mmm4rec(**overrides):
    from test_model import make_batch, make_model
    return make_model(**overrides), make_batch


VARIANTS = {"images": {}, "no_images": {"with_images": False}, "two_layers": {"n_layers": 2}}


@pytest.mark.parametrize("mode", ["full", "inbatch"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mmm4rec_loss_has_no_graph_break(mode, variant):
    model, make_batch = _mmm4rec(backend="auto", **VARIANTS[variant])
    model.train()
    n_breaks, n_graphs, why = breaks(model.loss, *make_batch(), mode=mode)
    assert (n_breaks, n_graphs) == (0, 1), why


@pytest.mark.slow
@pytest.mark.parametrize("mode,variant", [("full", "images"), ("inbatch", "two_layers")])
def test_mmm4rec_loss_compiled_equals_eager_and_compiles_once(mode, variant):
    """fullgraph=True, dynamic=True: one graph for five batch sizes; loss and every gradient equal eager's (relative
    1e-5; eager runs the native CPU gated RMSNorm, the graph its torch ops, so rounding differs: gradients of the
    time gate, ~1e-13 at the official init (docs/time_path.md), are compared absolutely, within 1e-10)."""
    model, make_batch = _mmm4rec(backend="auto", **VARIANTS[variant])
    model.eval()                                  # dropout off: compiled and eager see the same function
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model.loss, backend=counter, fullgraph=True, dynamic=True)
    for seed, b in enumerate([6, 4, 5, 3, 6]):
        batch = make_batch(seed=seed + 1, b=b)
        res = []
        for fn in (model.loss, compiled):
            model.zero_grad()
            value = fn(*batch, mode=mode)
            value.backward()
            res.append((value.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        assert rel(res[1][0], res[0][0]) < 1e-5
        assert all(rel(a, b) < 1e-5 or (a - b).abs().max() < 1e-10 for a, b in zip(res[1][1], res[0][1]))
    assert compiled_graphs(counter) == 1


def test_recbole_adapter_forward_has_no_graph_break():
    pytest.importorskip("recbole")
    from test_recbole_adapter import _Config, _Dataset
    from mmm4rec.recbole import TimeAwareSSDRec
    config = _Config(USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", LIST_SUFFIX="_list", NEG_PREFIX="neg_",
                     ITEM_LIST_LENGTH_FIELD="item_length", MAX_ITEM_LIST_LENGTH=6, device="cpu", TIME_FIELD="timestamp",
                     hidden_size=16, d_state=8, headdim=8)
    dataset = _Dataset()
    dataset.field2type = {**dataset.field2type, "timestamp_list": "float_seq"}
    torch.manual_seed(0)
    net = TimeAwareSSDRec(config, dataset)
    items = torch.randint(1, 11, (4, 6))
    lengths = torch.tensor([6, 3, 2, 5])
    times = torch.cumsum(torch.rand(4, 6) * 100, 1)
    assert breaks(net.forward, items, lengths, times)[:2] == (0, 1)


# ------------------------------------------------------------------------------------------------------- export
def test_time_aware_ssd_exports_and_runs_any_batch():
    torch.manual_seed(0)
    m = TimeAwareSSD(32, d_state=8, headdim=8).eval()
    x, t = _layer_inputs(b=3, L=12)
    lengths = torch.tensor([12, 5, 9])
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(m, (x, t), {"lengths": lengths}, strict=False,
                                  dynamic_shapes={"hidden": {0: batch}, "timestamps": {0: batch},
                                                  "lengths": {0: batch}})
    names = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("mmm4rec" in n for n in names), "the native ops should be in the exported graph"
    for b in (1, 5):
        x, t = _layer_inputs(b=b, L=12, seed=b)
        lengths = torch.randint(1, 13, (b,))
        with torch.no_grad():
            assert rel(program.module()(x, t, lengths=lengths), m(x, t, lengths=lengths)) < 1e-6


def test_cli_export_pt2_round_trip_in_a_fresh_process(tmp_path):
    """`mmm4rec export --format pt2` writes the top-k program; a fresh process that imports only mmm4rec_kernels and
    torch loads it and returns eager's top-k items for new histories."""
    import json
    import subprocess

    from mmm4rec.cli import main
    from mmm4rec.data import make_synthetic_dataset
    from mmm4rec.export import TopKRecommender, example_inputs
    from mmm4rec.train import load_checkpoint
    from mmm4rec.data import SequentialData

    syn = make_synthetic_dataset(60, 30, 500, feat_dim=12, image_coverage=0.7, seed=0, name="toy")
    p = syn.write_atomic(str(tmp_path / "raw"))
    d, r, out = str(tmp_path / "data"), str(tmp_path / "run"), str(tmp_path / "rec.pt2")
    small = ["--hidden-size", "16", "--headdim", "8", "--d-state", "8", "--ngroups", "1", "--device", "cpu",
             "--quiet"]
    assert main(["prepare", "--inter", p["inter"], "--item", p["item"], "--text-feats", p["text_feats"],
                 "--text-ids", p["text_rows"], "--image-feats", p["image_feats"], "--image-ids", p["image_rows"],
                 "--kcore", "0", "--max-len", "6", "--out", d]) == 0
    assert main(["finetune", "--data", d, "--out", r, "--epochs", "1", "--batch-size", "256", "--grad-accum", "1",
                 *small]) == 0
    ckpt = os.path.join(r, "best")
    assert main(["export", "--checkpoint", ckpt, "--data", d, "--out", out, "--format", "pt2", "--k", "5",
                 "--device", "cpu", "--quiet"]) == 0
    assert main(["export", "--checkpoint", ckpt, "--data", d, "--out", out, "--format", "pt2", "--device", "cpu",
                 "--quiet"]) == 1                                   # never overwritten silently
    model = load_checkpoint(ckpt, SequentialData.load(d), device="cpu").eval()
    inputs = example_inputs(model, batch=7)
    with torch.no_grad():
        values, items = TopKRecommender(model, 5)(*inputs)
    torch.save(inputs, tmp_path / "inputs.pt")
    code = ("import json, sys, torch, mmm4rec_kernels; p = torch.export.load(sys.argv[1]); "
            "v, i = p.module()(*torch.load(sys.argv[2])); print(json.dumps([i.tolist(), v.tolist()]))")
    proc = subprocess.run([sys.executable, "-c", code, out, str(tmp_path / "inputs.pt")], capture_output=True,
                          text=True, cwd=str(tmp_path), timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got_items, got_values = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got_items == items.tolist()
    assert rel(torch.tensor(got_values), values) < 1e-5
    assert 0 not in sum(got_items, [])                              # the padding row is never recommended
