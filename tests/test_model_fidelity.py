"""Model fidelity to the official code (issue 15): defaults = the official table, the per-layer order and data flow,
norm grouping, init, time-dropout placement, float64 time differences, legacy checkpoints, transfer, and the
no-image path (issue 12).  Small shapes, CPU, backend='torch'."""
import dataclasses
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_file

import mmm4rec_kernels
from mmm4rec.model import MMM4Rec, MMM4RecConfig
from mmm4rec.model.config import LEGACY_V1

from test_model import NUM_ITEMS, make_batch, make_model, small_config

TABLE = os.path.join(os.path.dirname(__file__), "..", "mmm4rec", "model", "official_config.json")
RUNTIME_FIELDS = {"backend", "path"}          # how to run, not what to compute


def official_table():
    with open(TABLE) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ defaults table
def test_defaults_equal_the_official_table():
    table = official_table()
    official, deviations = table["finetune"], table["deviations"]
    c = MMM4RecConfig()
    names = {f.name for f in dataclasses.fields(MMM4RecConfig)} - RUNTIME_FIELDS
    assert names == set(official), f"fields missing from / unknown to the table: {names ^ set(official)}"
    for name, value in official.items():
        if name in deviations:
            d = deviations[name]
            assert d["official"] == value and getattr(c, name) == d["ours"] != value, name
            assert len(d["reason"]) > 20
        else:
            assert getattr(c, name) == value, f"MMM4RecConfig().{name} = {getattr(c, name)!r}, official {value!r}"
    p = MMM4RecConfig.pretrain()
    for name, value in {**official, **table["pretrain"]}.items():
        if name not in deviations:
            assert getattr(p, name) == value, f"MMM4RecConfig.pretrain().{name}"
    assert MMM4RecConfig.pretrain(with_id=False).with_id is False and MMM4RecConfig.pretrain().n_layers == 2


# ------------------------------------------------------------------------------------- order and data flow
def spy_kernels(monkeypatch, log):
    for name in ("tissd", "ticossd"):
        real = getattr(mmm4rec_kernels, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            log.append((_name, args[0].shape[0], kwargs))
            return _real(*args, **kwargs)
        monkeypatch.setattr(mmm4rec_kernels, name, wrapper)


@pytest.mark.parametrize("stacking,order", [("per_layer", ["tissd", "ticossd", "tissd", "ticossd"]),
                                            ("streams_first", ["tissd", "tissd", "ticossd"])])
def test_layer_order(monkeypatch, stacking, order):
    log = []
    spy_kernels(monkeypatch, log)
    items, times, lengths, _ = make_batch()
    make_model(n_layers=2, stacking=stacking).eval().encode(items, times, lengths)
    assert [name for name, _, _ in log] == order


def per_stream_oracle(m, items, times, lengths, images=True):
    """The official per-layer forward assembled from the model's own blocks, one stream at a time (eval mode)."""
    mask = torch.arange(items.shape[1])[None, :] < lengths[:, None]
    ht = m.text_in_norm(m.text_emb(items))
    hv = m.image_in_norm(m.image_emb(items)) if images else None
    Dt = Dv = m.time_encoder(times, mask)
    for i in range(m.config.n_layers):
        out_t, Dt_next = m.tissd[i](ht, Dt, mask, lengths)
        out_v, Dv_next = m.tissd[i](hv, Dv, mask, lengths) if hv is not None else (out_t, Dt_next)
        pt = m.text_layers[i].residual(out_t, ht)
        pv = m.image_layers[i].residual(out_v, hv if hv is not None else ht)
        M = m.ticossd[i](pt, pv, m.fourier[i](Dv_next, Dt_next, mask), mask, lengths)
        Y = m.co_ffn[i](m.co_norm[i](M + pv + pt))
        ht, hv, Dt, Dv = pt, Y, Dt_next, Dv_next    # the fused output feeds the next layer's vision input
    return Y[torch.arange(len(lengths)), lengths - 1]


@pytest.mark.parametrize("images", [True, False])
def test_per_layer_data_flow_matches_oracle(images):
    """n_layers=2: the batched [text; image] TiSSD call per layer equals the per-stream composition; the vision
    stream has no FFN; the text stream feeds the next text input, the fused output the next vision input."""
    m = make_model(n_layers=2, init="torch", with_images=images).eval()
    assert all(layer.ffn is None for layer in m.image_layers) and all(layer.ffn is not None for layer in m.text_layers)
    items, times, lengths, _ = make_batch()
    torch.testing.assert_close(m.encode(items, times, lengths), per_stream_oracle(m, items, times, lengths, images),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- norm, init, time dropout
def test_rmsnorm_one_group_eps_1e12_by_default(monkeypatch):
    """Every gated RMSNorm the model runs (fused into the SSD call, or on the last cross block's b output rows)
    uses the configured groups and eps."""
    log, norms = [], []
    spy_kernels(monkeypatch, log)
    real_norm = mmm4rec_kernels.gated_rmsnorm

    def norm_spy(y, z, weight, eps=1e-5, group_size=None, backend="auto"):
        norms.append((group_size, eps))
        return real_norm(y, z, weight, eps=eps, group_size=group_size, backend=backend)
    monkeypatch.setattr(mmm4rec_kernels, "gated_rmsnorm", norm_spy)

    def settings():
        fused = {(kw["norm_group_size"], kw["norm_eps"]) for _, _, kw in log if kw.get("norm_weight") is not None}
        unfused = [name for name, _, kw in log if kw.get("norm_weight") is None]
        assert unfused == ["ticossd"] and len(norms) == 1      # the last cross block normalises its b rows itself
        return fused | set(norms)
    items, times, lengths, _ = make_batch()
    make_model().eval().encode(items, times, lengths)
    c = small_config()
    assert settings() == {(c.d_inner, 1e-12)}
    log.clear(), norms.clear()
    make_model(rmsnorm_groups=None, rmsnorm_eps=1e-5).eval().encode(items, times, lengths)
    assert settings() == {(c.d_inner // c.ngroups, 1e-5)}
    with pytest.raises(ValueError, match="rmsnorm_groups"):
        small_config(rmsnorm_groups=3)


def test_official_init_every_linear_normal_002_zero_bias():
    m = make_model(hidden_size=64, headdim=16, ffn_inner=64)
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert len(linears) > 20
    assert all(mod.bias is None or not mod.bias.any() for mod in linears)
    weights = torch.cat([mod.weight.flatten() for mod in linears])
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    torch_init = make_model(hidden_size=64, headdim=16, ffn_inner=64, init="torch")
    assert any(mod.bias.abs().sum() > 0 for mod in torch_init.modules() if isinstance(mod, torch.nn.Linear))
    assert not m.text_emb.id_bias.weight.any()                      # item biases start at 0 (as officially)


class RecordingDropout(torch.nn.Module):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def forward(self, x):
        self.log.append(x)
        return x


def test_time_dropout_before_time_mlp_and_gate():
    m = make_model().train()
    log = {"tissd": [], "ticossd": []}
    m.tissd[0].core.time.dropout = RecordingDropout(log["tissd"])
    m.ticossd[0].core.time.dropout = RecordingDropout(log["ticossd"])
    items, times, lengths, _ = make_batch()
    m.encode(items, times, lengths)
    assert len(log["tissd"]) == 2 and len(log["ticossd"]) == 1     # MLP + gate; the cross-SSD has no gate
    assert log["tissd"][0] is log["tissd"][1]                       # both drop the incoming time signal itself
    assert log["tissd"][0].shape == (2 * len(items), small_config().nheads, small_config().max_len)
    assert isinstance(make_model(time_mlp_dropout=0.0).tissd[0].core.time.dropout, torch.nn.Identity)


def test_float64_model_keeps_float64_time_differences():
    m = make_model(time_dropout=0.0, path="quadratic").double().eval()
    lengths = torch.tensor([8, 5])
    times = 1.7e9 + torch.cumsum(torch.tensor([[0, .25, 1, 3600.5, 7, 1e5, 2, 9]] * 2, dtype=torch.float64), 1)
    mask = torch.arange(8)[None, :] < lengths[:, None]
    D = m.time_encoder(times, mask)
    assert D.dtype == torch.float64
    d = torch.diff(times, prepend=times[:, :1]) * mask
    mean = d.sum(1, keepdim=True) / lengths[:, None]
    var = (((d - mean) * mask) ** 2).sum(1, keepdim=True) / lengths[:, None]
    want = (d - mean) * mask / torch.sqrt(var + m.config.time_ln_eps) * mask
    torch.testing.assert_close(D[:, 0], want, rtol=1e-12, atol=1e-12)
    items = torch.randint(1, NUM_ITEMS + 1, (2, 8)) * mask
    assert m.encode(items, times, lengths).dtype == torch.float64


# ------------------------------------------------------------------------------------- legacy and transfer
def test_legacy_config_and_state_keys_load(tmp_path, caplog):
    legacy = small_config(**{k: v for k, v in LEGACY_V1.items() if k != "rmsnorm_groups"}, rmsnorm_groups=None)
    old_dict = {k: v for k, v in legacy.to_dict().items() if k not in LEGACY_V1}   # as saved before the fields
    with caplog.at_level(logging.WARNING):
        restored = MMM4RecConfig.from_dict({**old_dict, "with_id": False})
    assert restored == dataclasses.replace(legacy, with_id=False) and "legacy config" in caplog.text
    src = make_model(**dataclasses.asdict(restored)).eval()
    old_state = {k.replace(".0.", ".", 1) if k.split(".")[0] in ("fourier", "ticossd", "co_norm", "co_ffn") else k: v
                 for k, v in src.state_dict().items()}
    assert "ticossd.core.A_log" in old_state
    save_file({k: v.contiguous() for k, v in old_state.items()}, str(tmp_path / "model.safetensors"))
    dst = make_model(**dataclasses.asdict(restored)).eval()           # same seed: the same feature buffers
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_model(dst, str(tmp_path / "model.safetensors"), strict=True)       # what train.load_checkpoint does
    assert "upgrading" in caplog.text
    items, times, lengths, _ = make_batch()
    torch.testing.assert_close(dst.encode(items, times, lengths), src.encode(items, times, lengths))


def test_transfer_pretrain_two_layers_to_finetune_one_layer():
    src = make_model(n_layers=2)                                   # MMM4RecConfig.pretrain() at test size
    dst = make_model(seed=3, num_items=17)
    missing, unexpected = dst.load_transfer(src.state_dict())
    assert missing == []
    prefixes = ("tissd.1.", "text_layers.1.", "image_layers.1.", "fourier.1.", "ticossd.1.", "co_norm.1.",
                "co_ffn.1.")
    assert unexpected and all(k.startswith(prefixes) for k in unexpected)
    assert set(unexpected) == {k for k in src.state_dict() if k.startswith(prefixes)}
    torch.testing.assert_close(dst.ticossd[0].core.A_log, src.ticossd[0].core.A_log)
    items, times, lengths, target = make_batch(num_items=17)
    assert torch.isfinite(dst.loss(items, times, lengths, target))


# ------------------------------------------------------------------------------------------ no images (issue 12)
@pytest.mark.parametrize("n_layers,images,absent,batches", [
    (1, True, "text_stream", [("tissd", 12), ("ticossd", 6)]),
    (1, False, "text_stream", [("tissd", 6), ("ticossd", 6)]),
    (1, "none_valid", "text_stream", [("tissd", 6), ("ticossd", 6)]),
    (2, False, "text_stream", [("tissd", 6), ("ticossd", 6), ("tissd", 12), ("ticossd", 6)]),
    (1, False, "missing_vector", [("tissd", 12), ("ticossd", 6)]),
])
def test_image_stream_skipped_without_images(monkeypatch, n_layers, images, absent, batches):
    log = []
    spy_kernels(monkeypatch, log)
    m = make_model(n_layers=n_layers, with_images=images is not False, absent_images=absent)
    if images == "none_valid":                                     # features present, but no item has an image
        m = MMM4Rec(m.config, NUM_ITEMS, m.text_emb.feats, m.image_emb.feats, torch.zeros(NUM_ITEMS + 1, dtype=bool))
    items, times, lengths, target = make_batch()
    m.train().loss(items, times, lengths, target).backward()
    assert [(name, b) for name, b, _ in log] == batches


# ------------------------------------------------------------------------------------------ deviation switches
def test_deviation_switches():
    items, times, lengths, target = make_batch()
    official = make_model(exclude_padding_item=False, inbatch_mask_duplicates=False).eval()
    user = official.encode(items, times, lengths)
    scores = official.full_scores(user)
    assert torch.isfinite(scores[:, 0]).all()                       # the padding item competes (official)
    torch.testing.assert_close(official.loss(items, times, lengths, target), F.cross_entropy(scores, target))
    dup = torch.tensor([3, 7, 3, 9, 7, 11])
    text_t, image_t = (F.normalize(t, dim=-1) for t in (official.text_emb(dup), official.image_emb(dup)))
    logits = user @ (text_t + image_t).T / official.config.temperature
    torch.testing.assert_close(official.loss(items, times, lengths, dup, mode="inbatch"),
                               F.cross_entropy(logits, torch.arange(6)))
    # unmasked time path: padded timestamps now reach valid positions (init torch: the time path is on)
    unmasked = make_model(mask_time_padding=False, init="torch").eval()
    pad = torch.arange(items.shape[1])[None, :] >= lengths[:, None]
    junk = torch.where(pad, torch.full_like(times, 5e9), times)
    assert not torch.allclose(unmasked.encode(items, times, lengths), unmasked.encode(items, junk, lengths))
    # no learned missing-image vector: every item uses adapter(its feature row)
    raw = make_model(learned_missing_image=False)
    assert raw.image_emb.missing is None
    rows = torch.arange(NUM_ITEMS + 1)
    torch.testing.assert_close(raw.image_emb(rows), raw.image_emb.adapter(raw.image_emb.feats) +
                               raw.image_emb.id_bias(rows))


def test_full_loss_gathers_inputs_from_the_scored_tables():
    """loss(mode="full") runs the adapters once over the catalogue and gathers the inputs from that table: same
    loss and gradients as encoding from the per-position adapters."""
    m = make_model(init="torch").eval()
    items, times, lengths, target = make_batch()
    m.loss(items, times, lengths, target).backward()
    fast = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    F.cross_entropy(m.full_scores(m.encode(items, times, lengths)), target).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
