"""Conventions a user swapping attention for TimeAwareSSD relies on: the two mask keywords (attention_mask 1 = valid,
key_padding_mask True = pad), masks that are not one block per row, unmasked padding timestamps, numpy inputs, dtype
mismatches, reset_parameters after a host model's re-init, and for_recsys sizes."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from mmm4rec_kernels.modules import TimeAwareSSD


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def layer(d=32, dtype=torch.float64):
    torch.manual_seed(0)
    return TimeAwareSSD.for_recsys(d).to(dtype)


def left_padded(d=32, dtype=torch.float64):
    """Two sequences, left padded: lengths 6 and 3 in a [2, 6] batch; timestamps 0 on the padding."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 6, d, generator=g, dtype=dtype)
    t = 1.6e9 + torch.cumsum(torch.rand(2, 6, generator=g, dtype=torch.float64) * 3600, 1)
    pad = torch.tensor([[False] * 6, [True, True, True, False, False, False]])
    h = h.masked_fill(pad[..., None], 0.0)
    t = t.masked_fill(pad, 0.0)
    return h, t, pad


def test_key_padding_mask_is_the_mha_convention_and_matches_attention_mask():
    m = layer()
    h, t, pad = left_padded()
    y_kpm = m(h, t, key_padding_mask=pad)
    y_am = m(h, t, attention_mask=(~pad).long())
    assert torch.equal(y_kpm, y_am)
    alone = m(h[1:, 3:], t[1:, 3:])                       # the short sequence on its own
    assert rel(y_kpm[1, 3:], alone[0]) < 1e-12
    assert y_kpm[1, :3].abs().max() == 0                   # padded positions: exactly 0


def test_mask_keywords_are_checked():
    m = layer()
    h, t, pad = left_padded()
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        m(h, t, key_padding_mask=pad.long())
    holes = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1]])
    with pytest.raises(ValueError, match="attention_mask must mark one contiguous block.*row 1"):
        m(h, t, attention_mask=holes)
    with pytest.raises(ValueError, match="key_padding_mask must mark one contiguous block"):
        m(h, t, key_padding_mask=holes == 0)
    with pytest.raises(ValueError, match="at most one of"):
        m(h, t, attention_mask=(~pad).long(), key_padding_mask=pad)


def test_unmasked_padding_timestamps_warn_once():
    m = layer()
    h, t, pad = left_padded()
    with pytest.warns(UserWarning, match="left padding"):
        m(h, t)                                             # zeros before real times and no mask
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(h, t)                                             # once per layer
        layer()(h, t, key_padding_mask=pad)                 # masked: nothing to warn about
    with pytest.warns(UserWarning, match="backwards"):
        layer()(h, torch.cat([t[:1], torch.tensor([[5e9, 6e9, 7e9, 0.0, 0.0, 0.0]], dtype=torch.float64)]))


def test_numpy_inputs_are_converted_and_hidden_must_be_a_tensor():
    m = layer()
    h, t, pad = left_padded()
    lengths = torch.tensor([6, 4])
    ref = m(h, t, lengths=lengths)
    assert torch.equal(m(h, t.numpy(), lengths=lengths.numpy()), ref)
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor.*numpy"):
        m(h.numpy(), t)
    with pytest.raises(TypeError, match="lengths must be a torch.Tensor"):
        m(h, t, lengths=[6, 4])


def test_dtype_mismatch_is_one_line():
    m = layer(dtype=torch.float32)
    h, t, _ = left_padded()                                 # float64 hidden, float32 layer
    with pytest.raises(ValueError, match=r"hidden is torch.float64 but the layer's parameters are torch.float32"):
        m(h, t)


def test_reset_parameters_undoes_a_host_models_reinit():
    m = layer(dtype=torch.float32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for p in m.parameters():                                # what many SR code bases do to every parameter
        nn.init.xavier_normal_(p) if p.dim() > 1 else nn.init.normal_(p, std=0.02)
    assert not torch.all(m.D == 1)
    m.reset_parameters()
    assert torch.all(m.D == 1) and torch.all(m.norm.weight == 1)
    A = torch.exp(m.A_log)
    assert bool(((A >= 1) & (A <= 16)).all())
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert bool(((dt >= 1e-4 - 1e-7) & (dt <= 0.1 + 1e-6)).all())
    for name in ("in_proj.weight", "out_proj.weight", "conv1d.weight"):
        w = m.state_dict()[name]
        assert abs(float(w.std()) - float(before[name].std())) < 0.35 * float(before[name].std()), name


@pytest.mark.parametrize("d_model", [32, 50, 64, 100, 128])
def test_for_recsys_fits_sr_widths(d_model):
    torch.manual_seed(0)
    m = TimeAwareSSD.for_recsys(d_model)
    assert m.nheads >= 4 and m.d_inner % m.headdim == 0 and m.headdim <= 32
    h = torch.randn(3, 7, d_model, requires_grad=True)
    t = torch.cumsum(torch.rand(3, 7) * 100, 1)
    y = m(h, t, lengths=torch.tensor([7, 2, 5]))
    y.square().sum().backward()
    assert y.shape == h.shape and math.isfinite(float(h.grad.norm()))
    assert TimeAwareSSD.for_recsys(d_model, d_state=8).d_state == 8      # overrides win
    np.testing.assert_equal(y[1, 2:].detach().numpy(), 0)
