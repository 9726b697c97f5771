"""The time path (issue 23): the official init leaves the cross-SSD time path dead in float32; the switches revive it.

Small widths, few steps, CPU, backend='torch'.  The diagnostic is mmm4rec.diagnose."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmm4rec import diagnose
from mmm4rec.model import MMM4Rec, MMM4RecConfig
from mmm4rec.model.layers import (FourierFilter, TimeModulation, init_time_path_, param_groups, tanhshrink_series,
                                  time_path_parameters)

SMALL = dict(hidden_size=32, headdim=16, d_state=8, ngroups=2, ffn_inner=32, backend="torch")
STEPS = 6


@pytest.fixture(scope="module")
def data():
    return diagnose.synthetic_data(seed=0, feat_dim=48, users=300, items=150, interactions=2400)


def diag(data, switches, steps=STEPS, seed=0):
    torch.manual_seed(seed)
    cfg = MMM4RecConfig(max_len=data.max_len, **SMALL, **switches)
    model = MMM4Rec(cfg, data.num_items, data.text_feats, data.image_feats, data.image_mask)
    batches = data.batches("train", 128, shuffle=True, seed=seed, drop_last=True)
    res = diagnose.diagnose_time_path(model, batches, steps)
    return {r["module"]: r for r in res.rows()}, res


# ------------------------------------------------------------------------------------------ the finding, pinned
def test_float32_tanhshrink_rounds_small_inputs_to_zero():
    x = torch.tensor([1e-4, 3.5e-4, -2e-4], dtype=torch.float32)
    assert torch.equal(F.tanhshrink(x), torch.zeros(3))                   # x - tanh x: total cancellation
    assert (F.tanhshrink(x.double()) != 0).all()                          # the true value is ~x^3 / 3


@pytest.mark.parametrize("official_padding", [False, True])
def test_official_init_cross_time_path_is_dead(data, official_padding):
    switches = dict(mask_time_padding=False) if official_padding else {}
    rows, _ = diag(data, switches)
    cross = rows["ticossd.0.time_mlp"]
    assert cross["zero_first"] >= 0.999 and cross["zero_last"] >= 0.999   # Tanhshrink output exactly 0
    assert cross["pre_absmax"] < 2e-3                                     # the pre-activation is tiny
    for name in ("ticossd.0.time_mlp", "fourier.0"):
        r = rows[name]
        # the loss gradient is at most ~1e-12 of the weight-decay gradient: weight decay alone moves these weights
        assert r["ratio_median"] < 1e-9, (name, r["ratio_median"])
        assert r["shrink"] < 1.0
    assert rows["tissd.0.time_mlp"]["ratio_median"] < 1e-4                 # the TiSSD's own time MLP: ~dead too


def test_series_is_exact_but_does_not_revive(data):
    rows, _ = diag(data, dict(time_shrink="series"))
    cross = rows["ticossd.0.time_mlp"]
    # no longer rounded to 0 (the zeros left: sequences whose time signal is exactly 0, e.g. one valid position) ...
    assert cross["zero_first"] < 0.2
    assert cross["ratio_median"] < 1e-6                                   # ... but ~x^3: still no gradient


# ------------------------------------------------------------------------------------------ the chosen switch
LIVE = diagnose.VARIANTS["live"]


def test_live_switch_revives_the_time_path(data):
    rows, res = diag(data, LIVE)
    for name in ("tissd.0.time_mlp", "ticossd.0.time_mlp"):
        # (official: >= 0.999 for the cross-SSD; the zeros left are sequences whose time signal is exactly 0)
        assert rows[name]["zero_first"] < 0.2 and rows[name]["zero_last"] < 0.2, rows[name]
    for name in ("tissd.0.time_mlp", "ticossd.0.time_mlp", "fourier.0", "time_encoder"):
        r = rows[name]
        assert r["steps_nonzero"] == STEPS, name                          # nonzero on every step
        # within 10x of weight decay, or better (every step; the time encoder's LayerNorm, |W| = sqrt(L): median)
        assert (r["ratio_median"] if name == "time_encoder" else r["ratio_min"]) >= 0.1, (name, r)
        assert r["effective_wd"] == 0.0                                   # and weight decay is off for them
    assert rows["ticossd.0.time_mlp"]["drift"] > 0


def test_defaults_are_official():
    c = MMM4RecConfig()
    assert (c.time_shrink, c.time_input_norm, c.time_mlp_gain, c.fourier_init, c.time_weight_decay) == (
        "tanhshrink", False, None, "model", True)
    with pytest.raises(ValueError):
        MMM4RecConfig(time_shrink="relu")
    with pytest.raises(ValueError):
        MMM4RecConfig(time_mlp_gain=0.0)
    with pytest.raises(ValueError):
        MMM4RecConfig(fourier_init="ones")


# ------------------------------------------------------------------------------------------ the pieces
def test_tanhshrink_series_matches_float64():
    x = torch.cat([torch.logspace(-8, 1.5, 400), -torch.logspace(-8, 1.5, 400), torch.tensor([0.0, 0.25, -0.25])])
    xd = x.double()
    # float64 reference: the direct form where its cancellation is harmless, two series terms below 1e-3
    ref = torch.where(xd.abs() > 1e-3, F.tanhshrink(xd), xd ** 3 / 3 - 2 * xd ** 5 / 15)
    got = tanhshrink_series(x.float()).double()
    rel = ((got - ref).abs() / ref.abs().clamp(min=1e-300))[ref != 0]
    assert rel.max() < 5e-6, rel.max()
    assert (got[x.abs() > 1e-12] != 0).all()                               # x^3/3 underflows only below ~1e-13
    xg = x.float().clone().requires_grad_(True)
    tanhshrink_series(xg).sum().backward()
    assert torch.allclose(xg.grad.double(), torch.tanh(xd) ** 2, rtol=1e-4, atol=1e-12)
    big = torch.tensor([1e4, -1e30], requires_grad=True)
    tanhshrink_series(big).sum().backward()
    assert torch.isfinite(big.grad).all()                                  # no inf * 0 from the unused branch


def test_normalized_time_mlp_is_scale_free():
    torch.manual_seed(0)
    tm = TimeModulation(12, 3, 4, with_update=False, shrink="normalized", input_norm=True).eval()
    D = torch.randn(2, 3, 12)
    mask = torch.arange(12)[None, :] < torch.tensor([[12], [7]])
    a, _ = tm(D, mask)
    b, _ = tm(D * 1e-3, mask)                    # the scale of a tiny Fourier output does not matter
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
    official = TimeModulation(12, 3, 4, with_update=False).eval()
    official.load_state_dict(tm.state_dict())  # the switches add no parameters (official checkpoints still load)
    assert not torch.allclose(official(D, mask)[0], a)


def test_fourier_identity_init_passes_through():
    torch.manual_seed(0)
    f = FourierFilter(10)
    for cl in (f.cl_v, f.cl_t, f.cl_co):
        for lin in (cl.lin_re, cl.lin_im):
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
    f.reset_identity()
    Dv, Dt = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    assert torch.allclose(f(Dv, Dt, None), Dv + Dt, atol=1e-5)


def test_init_switches_survive_the_official_init():
    torch.manual_seed(0)
    cfg = MMM4RecConfig(max_len=20, **SMALL, time_mlp_gain=2.0, fourier_init="identity")
    model = MMM4Rec(cfg, 30, torch.randn(31, 16))
    mix = model.ticossd[0].core.time.mix1.weight
    assert abs(mix.std().item() - 2.0 / math.sqrt(20)) < 0.1               # not the official 0.02
    cl = model.fourier[0].cl_v                                             # complex bias (b_re - b_im) + i(b_re + b_im)
    assert torch.allclose(cl.lin_re.bias - cl.lin_im.bias, torch.ones(11))
    assert torch.allclose(cl.lin_re.bias + cl.lin_im.bias, torch.zeros(11))
    w = model.fourier[0].cl_co.lin_re.weight
    assert (w.diagonal() - 1).abs().max() < 0.2 and (w - torch.diag(w.diagonal())).abs().max() < 0.2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    default = MMM4Rec(MMM4RecConfig(max_len=20, **SMALL), 30, torch.randn(31, 16))
    snapshot = {k: v.clone() for k, v in default.state_dict().items()}
    init_time_path_(default)                                              # a no-op with the official switches
    assert all(torch.equal(snapshot[k], v) for k, v in default.state_dict().items())
    assert before.keys() == snapshot.keys()


def test_param_groups():
    torch.manual_seed(0)
    official = MMM4Rec(MMM4RecConfig(max_len=20, **SMALL), 30, torch.randn(31, 16))
    groups = param_groups(official, 0.005)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(official.parameters()))
    model = MMM4Rec(MMM4RecConfig(max_len=20, **SMALL, time_weight_decay=False), 30, torch.randn(31, 16))
    groups = param_groups(model, 0.005)
    assert [g["weight_decay"] for g in groups] == [0.005, 0.0]
    time_ids = {id(p) for _, p in time_path_parameters(model)}
    assert {id(p) for p in groups[1]["params"]} == time_ids
    assert not time_ids & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    names = [n for n, _ in time_path_parameters(model)]
    assert any(".mix1." in n for n in names) and any(n.startswith("fourier.") for n in names)
    assert not any("in_proj" in n or "out_proj" in n for n in names)
    torch.optim.NAdam(groups, lr=1e-4, weight_decay=0.005)


def test_cli_writes_table_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    real = diagnose.synthetic_data
    monkeypatch.setattr(diagnose, "synthetic_data",
                        lambda seed=0: real(seed, feat_dim=48, users=200, items=100, interactions=1600))
    monkeypatch.setitem(diagnose.PRESETS, "tiny", {k: v for k, v in SMALL.items() if k != "backend"})
    out, png = tmp_path / "t.md", tmp_path / "t.png"
    assert diagnose.main(["--preset", "tiny", "--steps", "2", "--variants", "official", "live", "--out", str(out),
                          "--plot", str(png), "--batch-size", "64", "--set", "dropout=0.1"]) == 0
    text = out.read_text()
    assert "| official+dropout=0.1 | ticossd.0.time_mlp |" in text and "| live+dropout=0.1 | fourier.0 |" in text
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("shrink", ["tanhshrink", "series", "normalized"])
def test_time_modulation_traces_without_graph_breaks(shrink):
    torch._dynamo.reset()
    torch.manual_seed(0)
    tm = TimeModulation(12, 3, 4, with_update=True, dropout=0.0, shrink=shrink, input_norm=True)
    compiled = torch.compile(tm, backend="eager", fullgraph=True)     # fullgraph: a graph break or host sync raises
    D = torch.randn(3, 3, 12)
    mask = torch.arange(12)[None, :] < torch.tensor([[12], [5], [1]])
    for got, want in zip(compiled(D, mask), tm(D, mask)):
        assert torch.allclose(got, want)
