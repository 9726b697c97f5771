"""TimeAwareSSD's CPU inference path (modules/infer_cpu.py, native layer_infer.cpp) vs the general path.

The general path (autograd on) is tested against the float64 reference elsewhere; here every inference call under
no_grad is compared with it: float64 to ~1e-12, float32 against the float64 general path, on awkward lengths, every
padding layout, the time encodings, weak / strong decay, huge time gaps and NaN inputs (which must fall back)."""
import copy
import logging

import pytest
import torch

from mmm4rec_kernels import cpu as native
from mmm4rec_kernels.modules import TimeAwareSSD
from mmm4rec_kernels.modules import infer_cpu

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


def both(layer, *args, **kw):
    """(inference-path output, general-path output) of the same call; asserts the inference path ran."""
    calls = []
    real = infer_cpu.infer

    def spy(*a):
        out = real(*a)
        calls.append(out is not None)
        return out
    infer_cpu.infer = spy
    try:
        with torch.no_grad():
            fast = layer(*args, **kw)
    finally:
        infer_cpu.infer = real
    assert calls == [True], "the CPU inference path did not run"
    with torch.enable_grad():
        general = layer(*args, **kw).detach()
    return fast, general


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
    with torch.enable_grad():
        ref = layer64(h, t, lengths=lengths).detach()
    assert rel(fast, ref) < 2e-5


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
    with torch.no_grad():
        fast = layer(h, t, lengths=lengths)
    with torch.enable_grad():
        general = layer(h, t, lengths=lengths).detach()
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
    monkeypatch.setattr(infer_cpu, "CPU_INFER_MAX_LEN", 12)
    h, t, lengths = inputs(2, 20, seed=16)
    with caplog.at_level(logging.DEBUG, logger="mmm4rec_kernels"), torch.no_grad():
        make_layer()(h, t, lengths=lengths)
        assert any("CPU_INFER_MAX_LEN=12" in r.getMessage() for r in caplog.records)
        caplog.clear()
        make_layer()(h, t, lengths=torch.tensor([12, 5]))          # longest valid length decides, not L
        assert any("CPU inference path" in r.getMessage() for r in caplog.records)
