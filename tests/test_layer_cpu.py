"""TimeAwareSSD's CPU paths (modules/layer_cpu.py, native tissd_layer.cpp) vs the general path.

The general path is tested against the float64 reference elsewhere; here every inference call (no_grad) and every
training call (output and the gradients of hidden and of every parameter) is compared with it: float64 to ~1e-12,
float32 against the float64 general path, on awkward lengths, every padding layout, the time encodings, weak /
strong decay, huge time gaps and NaN inputs (which must fall back to the general path)."""
import copy
import logging

import pytest
import torch

from mmm4rec_kernels import cpu as native
from mmm4rec_kernels.modules import TimeAwareSSD
from mmm4rec_kernels.modules import layer_cpu

pytestmark = pytest.mark.skipif(not native.available(), reason="native CPU kernels unavailable")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_layer(dtype=torch.float64, seed=0, decay="mixed", **kw):
    torch.manual_seed(seed)
    layer = TimeAwareSSD.for_recsys(64, **kw).to(dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():                 # move off the init so every weight matters
            p.add_(0.1 * torch.randn_like(p))
        if decay == "weak":
            layer.A_log.fill_(-6.0)
        elif decay == "strong":
            layer.A_log.fill_(3.0)
    return layer


def inputs(b, L, seed, gap_scale=3600.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, L, 64, generator=g, dtype=dtype)
    t = 1.6e9 + torch.cumsum(torch.rand(b, L, generator=g, dtype=torch.float64) * gap_scale, 1)
    lengths = torch.randint(1, L + 1, (b,), generator=g)
    lengths[0] = L
    return h, t, lengths


def run(layer, *args, fast=True, grad=False, **kw):
    """The layer's output on the CPU path (fast=True: asserts it ran) or on the general path (fast=False), under
    no_grad (grad=False) or with autograd: then (output, gradients of sum(out * w) w.r.t. hidden and every
    parameter)."""
    calls = []
    real = layer_cpu.forward

    def spy(*a):
        out = real(*a) if fast else (None, "forced by the test")
        calls.append(out[0] is not None)
        return out
    layer_cpu.forward = spy
    try:
        with torch.set_grad_enabled(grad):
            h = args[0].detach().requires_grad_(grad)
            out = layer(h, *args[1:], **kw)
            if not grad:
                result = out
            else:
                w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
                params = [p for p in layer.parameters()]
                grads = torch.autograd.grad((out * w).sum(), [h] + params, allow_unused=True)
                result = out.detach(), grads
    finally:
        layer_cpu.forward = real
    assert calls == [fast], "the expected path did not run"
    return result


def both(layer, *args, **kw):
    """(CPU inference path output, general path output) of the same call."""
    return run(layer, *args, **kw), run(layer, *args, fast=False, **kw)


def both_train(layer, *args, tol=1e-12, **kw):
    """Training: the CPU path's output and every gradient equal the general path's."""
    out, grads = run(layer, *args, grad=True, **kw)
    ref, ref_grads = run(layer, *args, fast=False, grad=True, **kw)
    assert rel(out, ref) < tol
    names = ["hidden"] + [n for n, _ in layer.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        assert (g is None) == (r is None), name
        if r is not None:
            assert rel(g, r) < tol, (name, rel(g, r))
    return out, grads


@pytest.mark.parametrize("L", [1, 7, 20, 63])
@pytest.mark.parametrize("decay", ["weak", "mixed", "strong"])
def test_float64_equals_general_path(L, decay):
    layer = make_layer(decay=decay, seed=L)
    h, t, lengths = inputs(3, L, seed=L + 1)
    fast, general = both(layer, h, t, lengths=lengths)
    assert rel(fast, general) < 1e-12
    pad = torch.arange(L)[None, :] >= lengths[:, None]
    assert (fast[pad] == 0).all()


@pytest.mark.parametrize("L", [1, 20, 63])
def test_float32_against_float64(L):
    layer64 = make_layer(seed=L)
    layer32 = copy.deepcopy(layer64).float()
    h, t, lengths = inputs(4, L, seed=2 * L)
    fast, _ = both(layer32, h.float(), t, lengths=lengths)
    ref = run(layer64, h, t, fast=False, lengths=lengths)
    assert rel(fast, ref) < 2e-6          # measured 2.5e-7 - 3.7e-7 (a softplus losing small values: 5e-6)


@pytest.mark.parametrize("layout", ["none", "attention_mask", "key_padding_mask", "time_gaps", "no_time"])
def test_layouts_and_time_inputs(layout):
    layer = make_layer(seed=3)
    h, t, lengths = inputs(4, 20, seed=4)
    valid = torch.arange(20)[None, :] < lengths[:, None]
    left = valid.flip(1)                                       # left padding: valid block at the end
    if layout == "none":
        args, kw = (h, t), {}
    elif layout == "attention_mask":
        args, kw = (h, t), dict(attention_mask=left.long())
    elif layout == "key_padding_mask":
        args, kw = (h, t), dict(key_padding_mask=~left)
    elif layout == "time_gaps":
        gaps = torch.rand(4, 20, dtype=torch.float64) * 100
        args, kw = (h,), dict(time_gaps=gaps, lengths=lengths)
    else:
        args, kw = (h,), dict(lengths=lengths)
    fast, general = both(layer, *args, **kw)
    assert rel(fast, general) < 1e-12


@pytest.mark.parametrize("encoding", ["log1p", None])
def test_other_time_encodings(encoding):
    layer = make_layer(seed=5, time_encoding=encoding)
    h, t, lengths = inputs(2, 20, seed=6)
    fast, general = both(layer, h, t, lengths=lengths)
    assert rel(fast, general) < 1e-12


def test_bias_and_plain_skip_padding_zero():
    layer = make_layer(seed=7, bias=True, d_skip="plain")
    h, t, lengths = inputs(3, 20, seed=8)
    fast, general = both(layer, h, t, lengths=lengths)
    assert rel(fast, general) < 1e-12
    assert (fast[torch.arange(20)[None, :] >= lengths[:, None]] == 0).all()


@pytest.mark.parametrize("gap", [1e4, 1e9])
def test_huge_time_gaps(gap):
    layer = make_layer(seed=9)
    h, t, lengths = inputs(2, 20, seed=10)
    t[:, 10:] += gap
    fast, general = both(layer, h, t, lengths=lengths)
    assert rel(fast, general) < 1e-12


def test_nan_input_falls_back_to_the_general_rule():
    layer = make_layer(seed=11)
    h, t, lengths = inputs(2, 20, seed=12)
    lengths[:] = 20
    h[1, 5, 3] = float("nan")
    general = run(layer, h, t, fast=False, lengths=lengths)
    for grad in (False, True):                     # the CPU path hands the call to the general path
        with torch.set_grad_enabled(grad):
            fast = layer(h, t, lengths=lengths).detach()
        assert torch.equal(torch.isnan(fast), torch.isnan(general))
        assert not torch.isnan(fast[1, :5]).any() and torch.isnan(fast[1, 5:]).any()
        assert rel(fast[0], general[0]) < 1e-12


def test_in_place_weight_update_is_seen():
    layer = make_layer(seed=13)
    h, t, lengths = inputs(2, 20, seed=14)
    before, _ = both(layer, h, t, lengths=lengths)
    with torch.no_grad():
        layer.conv1d.weight.mul_(1.5)
        layer.time_encoding.mix1.weight.add_(0.3)
        layer.A_log.add_(0.5)
    after, general = both(layer, h, t, lengths=lengths)
    assert rel(after, general) < 1e-12 and rel(after, before) > 1e-3


def test_not_covered_calls_take_the_general_path(caplog):
    h, t, lengths = inputs(2, 20, seed=15)
    cases = [(make_layer(path="chunked"), {}), (make_layer(time_dropout=0.5).train(), {}),
             (make_layer(), dict(return_state=True))]
    with caplog.at_level(logging.DEBUG, logger="mmm4rec_kernels"), torch.no_grad():
        for layer, kw in cases:
            caplog.clear()
            layer(h, t, lengths=lengths, **kw)
            assert any("general path" in r.getMessage() for r in caplog.records)
        caplog.clear()
        make_layer()(h, t, lengths=lengths)
        assert any("CPU inference path" in r.getMessage() for r in caplog.records)


def test_auto_leaves_long_sequences_to_the_chunked_path(monkeypatch, caplog):
    monkeypatch.setattr(layer_cpu, "CPU_INFER_MAX_LEN", 12)
    h, t, lengths = inputs(2, 20, seed=16)
    with caplog.at_level(logging.DEBUG, logger="mmm4rec_kernels"), torch.no_grad():
        make_layer()(h, t, lengths=lengths)
        assert any("> 12 (CPU_INFER_MAX_LEN" in r.getMessage() for r in caplog.records)
        caplog.clear()
        make_layer()(h, t, lengths=torch.tensor([12, 5]))          # longest valid length decides, not L
        assert any("CPU inference path" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("L", [1, 7, 20, 63])
@pytest.mark.parametrize("decay", ["weak", "mixed", "strong"])
def test_training_gradients_equal_general_path(L, decay):
    layer = make_layer(decay=decay, seed=L + 20).train()
    h, t, lengths = inputs(3, L, seed=L + 21)
    out, grads = both_train(layer, h, t, lengths=lengths)
    pad = torch.arange(L)[None, :] >= lengths[:, None]
    assert (out[pad] == 0).all() and (grads[0][pad] == 0).all()


@pytest.mark.parametrize("case", ["no_lengths", "left_padding", "time_gaps", "no_time", "log1p", "no_encoding",
                                  "bias_plain_skip", "gap_1e9"])
def test_training_cases(case):
    kw_layer = dict(log1p=dict(time_encoding="log1p"), no_encoding=dict(time_encoding=None),
                    bias_plain_skip=dict(bias=True, d_skip="plain")).get(case, {})
    layer = make_layer(seed=30, **kw_layer).train()
    h, t, lengths = inputs(4, 20, seed=31)
    args, kw = (h, t), dict(lengths=lengths)
    if case == "no_lengths":
        kw = {}
    elif case == "left_padding":
        kw = dict(attention_mask=(torch.arange(20)[None, :] < lengths[:, None]).flip(1).long())
    elif case == "time_gaps":
        args, kw = (h,), dict(time_gaps=torch.rand(4, 20, dtype=torch.float64) * 100, lengths=lengths)
    elif case == "no_time":
        args = (h,)
    elif case == "gap_1e9":
        t[:, 10:] += 1e9
    both_train(layer, *args, **kw)


def test_training_float32_against_float64():
    layer64 = make_layer(seed=40).train()
    layer32 = copy.deepcopy(layer64).float()
    h, t, lengths = inputs(4, 20, seed=41)
    out, grads = run(layer32, h.float(), t, grad=True, lengths=lengths)
    ref, ref_grads = run(layer64, h, t, fast=False, grad=True, lengths=lengths)
    assert rel(out, ref) < 2e-5
    for g, r in zip(grads, ref_grads):
        if r is not None:
            assert rel(g, r) < 1e-4


def test_training_with_time_dropout_matches_under_one_seed():
    layer = make_layer(seed=50, time_dropout=0.3).train()
    h, t, lengths = inputs(2, 20, seed=51)
    torch.manual_seed(5)
    out, grads = run(layer, h, t, grad=True, lengths=lengths)
    torch.manual_seed(5)
    ref, ref_grads = run(layer, h, t, fast=False, grad=True, lengths=lengths)
    assert rel(out, ref) < 1e-12 and all(r is None or rel(g, r) < 1e-12 for g, r in zip(grads, ref_grads))


def test_training_long_sequences_follow_the_cpu_table(monkeypatch, caplog):
    monkeypatch.setattr(layer_cpu, "cpu_crossover_length", lambda P, n: 12)
    h, t, lengths = inputs(2, 20, seed=52)
    with caplog.at_level(logging.DEBUG, logger="mmm4rec_kernels"):
        make_layer().train()(h, t, lengths=lengths)
        assert any("CPU_CROSSOVER" in r.getMessage() for r in caplog.records)
        caplog.clear()
        make_layer(path="quadratic").train()(h, t, lengths=lengths)     # an explicit path is followed
        assert any("CPU training path" in r.getMessage() for r in caplog.records)


def test_two_threads_and_uncovered_inputs(caplog):
    layer = make_layer(seed=60).train()
    h, t, lengths = inputs(5, 20, seed=61)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        both_train(layer, h, t, lengths=lengths)
        fast, general = both(layer.eval(), h, t, lengths=lengths)
        assert rel(fast, general) < 1e-12
    finally:
        torch.set_num_threads(before)
    gaps = torch.rand(5, 20, dtype=torch.float64, requires_grad=True)
    with caplog.at_level(logging.DEBUG, logger="mmm4rec_kernels"):
        layer.train()(h, time_gaps=gaps, lengths=lengths).sum().backward()
        assert gaps.grad is not None and any("require grad" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(h.float().to(torch.float64), t, lengths=lengths)
        assert any("autocast" in r.getMessage() for r in caplog.records)
