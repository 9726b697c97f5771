"""MMM4Rec model tests: small configs on CPU (backend='torch' unless a test says otherwise)."""
import json

import pytest
import torch

import mmm4rec_kernels
from mmm4rec.model import MMM4Rec, MMM4RecConfig
from mmm4rec.model.layers import TiSSD

NUM_ITEMS = 40
FT, FV = 12, 10


def small_config(**overrides) -> MMM4RecConfig:
    base = dict(hidden_size=32, expand=2, headdim=8, d_state=8, ngroups=4, max_len=8, ffn_inner=32, feat_dim=FT,
                backend="torch", path="auto")
    base.update(overrides)
    return MMM4RecConfig(**base)


def make_model(seed=0, num_items=NUM_ITEMS, with_images=True, **overrides) -> MMM4Rec:
    torch.manual_seed(seed)
    text = torch.randn(num_items + 1, FT)
    image = torch.randn(num_items + 1, FV) if with_images else None
    image_mask = (torch.rand(num_items + 1) > 0.25) if with_images else None
    return MMM4Rec(small_config(**overrides), num_items, text, image, image_mask)


def make_batch(seed=1, b=6, L=8, num_items=NUM_ITEMS):
    """Right-padded batch: items [b, L] (0 on padding), times [b, L] float64 seconds, lengths [b], target [b]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, 1, 3, L - 1, 2, 5][:b])
    items = torch.randint(1, num_items + 1, (b, L), generator=g)
    times = 1.6e9 + torch.cumsum(torch.rand(b, L, generator=g, dtype=torch.float64) * 86400 * 30, dim=1)
    valid = torch.arange(L)[None, :] < lengths[:, None]
    items = items * valid
    times = times * valid
    target = torch.randint(1, num_items + 1, (b,), generator=g)
    return items, times, lengths, target


def tissd_param_count(config) -> int:
    return sum(p.numel() for p in TiSSD(config).parameters())


# ------------------------------------------------------------------------------------------------------- config
def test_config_roundtrip_and_validation():
    c = small_config(with_id=True)
    d = json.loads(json.dumps(c.to_dict()))
    assert MMM4RecConfig.from_dict(d) == c
    assert MMM4RecConfig().nheads == 8 and MMM4RecConfig().d_inner == 512
    with pytest.raises(ValueError, match="n_layers"):
        small_config(n_layers=0)
    with pytest.raises(ValueError, match="headdim"):
        small_config(headdim=7)
    with pytest.raises(ValueError, match="ngroups"):
        small_config(ngroups=3)
    with pytest.raises(ValueError, match="backend"):
        small_config(backend="jax")
    with pytest.raises(ValueError, match="dropout"):
        small_config(dropout=1.0)
    with pytest.raises(ValueError, match="unknown"):
        MMM4RecConfig.from_dict({"hiden_size": 3})


# ------------------------------------------------------------------------------------------------ shapes, values
def test_shapes_and_finite():
    m = make_model().eval()
    items, times, lengths, _ = make_batch()
    user = m.encode(items, times, lengths)
    assert user.shape == (6, 32) and torch.isfinite(user).all()
    text_items, image_items = m.item_embeddings()
    assert text_items.shape == image_items.shape == (NUM_ITEMS + 1, 32)
    torch.testing.assert_close(text_items.norm(dim=-1), torch.ones(NUM_ITEMS + 1))
    torch.testing.assert_close(image_items.norm(dim=-1), torch.ones(NUM_ITEMS + 1))
    scores = m.full_scores(user)
    assert scores.shape == (6, NUM_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    expected = user @ (text_items + image_items)[1:].T / m.config.temperature
    torch.testing.assert_close(scores[:, 1:], expected)


def test_features_are_frozen_buffers_and_missing_images():
    m = make_model()
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.endswith("feats") for n in names)
    assert all(not b.requires_grad for b in m.buffers())
    assert not any(k.endswith("feats") for k in m.state_dict())
    # items without an image all share the learned "missing" vector (before the id bias)
    missing = (~m.image_emb.mask).nonzero().flatten()
    rows = m.image_emb(missing)
    torch.testing.assert_close(rows, m.image_emb.missing.expand_as(rows))
    # no image modality at all: still runs, every image row is the missing vector
    m2 = make_model(with_images=False).eval()
    items, times, lengths, target = make_batch()
    assert torch.isfinite(m2.loss(items, times, lengths, target))
    _, image_items = m2.item_embeddings()
    torch.testing.assert_close(image_items, image_items[:1].expand_as(image_items))


def test_input_validation():
    m = make_model().eval()
    items, times, lengths, _ = make_batch(L=8)
    with pytest.raises(ValueError, match="max_len"):
        m.encode(torch.ones(2, 9, dtype=torch.long), torch.zeros(2, 9), torch.tensor([9, 9]))
    with pytest.raises(ValueError, match="lengths"):
        m.encode(items, times, torch.zeros_like(lengths))
    with pytest.raises(ValueError, match="mode"):
        m.loss(items, times, lengths, lengths, mode="sampled")


# ------------------------------------------------------------------------------------------- padding and causality
@pytest.mark.parametrize("overrides", [{}, {"n_layers": 2, "with_id": True}])
def test_padding_invariance(overrides):
    m = make_model(**overrides).eval()
    items, times, lengths, _ = make_batch()
    base = m.encode(items, times, lengths)
    pad = torch.arange(items.shape[1])[None, :] >= lengths[:, None]
    junk_items = torch.where(pad, torch.randint(1, NUM_ITEMS + 1, items.shape), items)
    junk_times = torch.where(pad, torch.full_like(times, -5e9), times)   # absurd padded timestamps
    torch.testing.assert_close(m.encode(junk_items, junk_times, lengths), base)
    # a shorter input (L < max_len) is padded inside encode: same result as the explicitly padded batch
    short = int(lengths.max()) - 1
    keep = lengths <= short
    out_short = m.encode(items[keep, :short], times[keep, :short], lengths[keep])
    torch.testing.assert_close(out_short, base[keep])


def test_target_timestamp_never_used():
    """encode sees the history only: placing the target item and its timestamp right after the history (the slot a
    leaky implementation would read) changes nothing, and each user equals the encoding of its own prefix."""
    m = make_model().eval()
    items, times, lengths, target = make_batch()
    hist_len = lengths.clamp(max=items.shape[1] - 1)
    base = m.encode(items, times, hist_len)
    rows = torch.arange(len(target))
    leaky_items, leaky_times = items.clone(), times.clone()
    leaky_items[rows, hist_len] = target
    leaky_times[rows, hist_len] = times[rows, hist_len - 1] + 1e7
    torch.testing.assert_close(m.encode(leaky_items, leaky_times, hist_len), base)
    for i in range(len(target)):
        n = int(hist_len[i])
        alone = m.encode(items[i:i + 1, :n], times[i:i + 1, :n], hist_len[i:i + 1])
        torch.testing.assert_close(alone, base[i:i + 1])


def test_time_matters_when_enabled():
    items, times, lengths, _ = make_batch()
    warped = times.clone()
    warped[:, 1:] = warped[:, 1:] + torch.linspace(0, 5e7, items.shape[1] - 1, dtype=torch.float64) ** 1.5 / 1e4
    # init="torch": the official N(0, 0.02) init starts the time path (nearly) off through Tanhshrink
    m = make_model(init="torch").eval()
    assert not torch.allclose(m.encode(items, times, lengths), m.encode(items, warped, lengths))
    m_nt = make_model(use_time=False).eval()
    torch.testing.assert_close(m_nt.encode(items, times, lengths), m_nt.encode(items, warped, lengths))


# --------------------------------------------------------------------------------------- sharing and ablations
def test_tissd_shared_between_streams():
    c = small_config()
    m = make_model()
    assert m.tissd_image is None
    calls = []
    hook = m.tissd[0].register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    items, times, lengths, _ = make_batch()
    m.eval()
    user = m.encode(items, times, lengths)
    hook.remove()
    assert calls == [2 * len(items)]             # one module, one call on the [text; image] batch of 2b sequences
    # ... which equals applying that one module to each stream separately
    m.tissd_image = m.tissd
    torch.testing.assert_close(m.encode(items, times, lengths), user, rtol=1e-5, atol=1e-6)
    m.tissd_image = None
    tissd_params = {id(p) for p in m.tissd.parameters()}
    assert sum(p.numel() for p in m.tissd.parameters()) == tissd_param_count(c)
    # stream-specific LNs / FFNs are distinct
    assert not tissd_params & {id(p) for p in m.text_layers.parameters()}
    assert not {id(p) for p in m.text_layers.parameters()} & {id(p) for p in m.image_layers.parameters()}
    unshared = make_model(share_tissd=False)
    n_shared = sum(p.numel() for p in m.parameters())
    n_unshared = sum(p.numel() for p in unshared.parameters())
    assert n_unshared - n_shared == tissd_param_count(c)


ABLATIONS = [dict(use_time=False), dict(learnable_filter=False), dict(adaptive_filter=False),
             dict(share_tissd=False), dict(with_id=False), dict(vision_ffn=True), dict(stacking="streams_first")]


@pytest.mark.parametrize("switch", ABLATIONS, ids=lambda s: next(iter(s)))
def test_ablation_switch_changes_params_and_output(switch):
    # init="torch": with the official init the time path starts (nearly) off, hiding the filter switches; two layers
    # so that the stacking switch changes the parameter set
    full = make_model(init="torch", n_layers=2).eval()
    ablated = make_model(init="torch", n_layers=2, **switch).eval()
    full_names = {n for n, _ in full.named_parameters()}
    ablated_names = {n for n, _ in ablated.named_parameters()}
    assert full_names != ablated_names
    # copy every shared tensor from the full model: whatever differs in the output is due to the switch
    ablated.load_state_dict({k: v for k, v in full.state_dict().items() if k in ablated.state_dict()}, strict=False)
    if "with_id" in switch:                                         # id biases start at 0: perturb them
        with torch.no_grad():
            full.text_emb.id_bias.weight.normal_()
    if "share_tissd" in switch:                                     # the extra image TiSSD starts different
        assert ablated.tissd_image is not None
    items, times, lengths, _ = make_batch()
    assert not torch.allclose(full.encode(items, times, lengths), ablated.encode(items, times, lengths), atol=1e-5)


def test_use_time_false_passes_no_time_scale(monkeypatch):
    seen = []
    real = mmm4rec_kernels.tissd

    def spy(*args, **kwargs):
        seen.append(kwargs.get("time_scale"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mmm4rec_kernels, "tissd", spy)
    monkeypatch.setattr(mmm4rec_kernels, "ticossd", spy)
    items, times, lengths, _ = make_batch()
    make_model(use_time=False).encode(items, times, lengths)
    assert len(seen) == 2 and all(t is None for t in seen)      # the batched TiSSD call + the cross-SSD
    assert make_model(use_time=False).fourier is None


# ------------------------------------------------------------------------------------------------- losses / grads
@pytest.mark.parametrize("mode", ["full", "inbatch"])
def test_loss_finite_and_grads_everywhere(mode):
    # init="torch": with the official init, Tanhshrink of the tiny time-MLP output is exactly 0 in float32 (x - tanh x
    # cancels), so the cross-SSD time path and the Fourier filters start with exactly zero gradient (as officially)
    m = make_model(with_id=True, n_layers=2, init="torch").train()
    items, times, lengths, target = make_batch()
    loss = m.loss(items, times, lengths, target, mode=mode)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"no grad for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite grad for {name}"
    nonzero = [n for n, p in m.named_parameters() if p.grad.abs().sum() > 0]
    assert len(nonzero) >= 0.9 * len(list(m.parameters()))


def test_inbatch_masks_duplicate_targets():
    m = make_model().eval()
    items, times, lengths, _ = make_batch()
    target = torch.tensor([3, 7, 3, 9, 7, 11])
    loss = m.loss(items, times, lengths, target, mode="inbatch")
    user = m.encode(items, times, lengths)
    text_items, image_items = m.item_embeddings()
    logits = user @ (text_items + image_items)[target].T / m.config.temperature
    dup = (target[:, None] == target[None, :]) & ~torch.eye(6, dtype=torch.bool)
    expected = torch.nn.functional.cross_entropy(logits.masked_fill(dup, float("-inf")), torch.arange(6))
    torch.testing.assert_close(loss, expected)
    unmasked = torch.nn.functional.cross_entropy(logits, torch.arange(6))
    assert not torch.allclose(loss, unmasked)


def test_full_loss_matches_scores():
    m = make_model().eval()
    items, times, lengths, target = make_batch()
    expected = torch.nn.functional.cross_entropy(m.full_scores(m.encode(items, times, lengths)), target)
    torch.testing.assert_close(m.loss(items, times, lengths, target), expected)


# ------------------------------------------------------------------------------------------------------ transfer
def test_transfer_drops_item_tables():
    src = make_model(with_id=True, n_layers=2)
    state = src.state_dict_for_transfer()
    assert not any("id_bias" in k or k.endswith("feats") for k in state)
    assert any("id_bias" in k for k in src.state_dict())
    dst = make_model(seed=5, num_items=17, with_id=True, n_layers=2)
    dst_bias = dst.text_emb.id_bias.weight.detach().clone()
    missing, unexpected = dst.load_transfer(src.state_dict())       # full state: item tables must be dropped
    assert missing == [] and unexpected == []
    assert dst.text_emb.id_bias.weight.shape == (18, 32)
    torch.testing.assert_close(dst.text_emb.id_bias.weight, dst_bias)
    for k, v in state.items():
        torch.testing.assert_close(dst.state_dict()[k], v)
    items, times, lengths, target = make_batch(num_items=17)
    assert torch.isfinite(dst.loss(items, times, lengths, target))


# ---------------------------------------------------------------------------------------------- kernel routing
def test_ssd_calls_go_through_mmm4rec_kernels(monkeypatch):
    counts = {"tissd": 0, "ticossd": 0}
    kwargs_seen = []

    def counting(name):
        real = getattr(mmm4rec_kernels, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            kwargs_seen.append(kwargs)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(mmm4rec_kernels, "tissd", counting("tissd"))
    monkeypatch.setattr(mmm4rec_kernels, "ticossd", counting("ticossd"))
    m = make_model(n_layers=2, path="quadratic")
    items, times, lengths, target = make_batch()
    m.loss(items, times, lengths, target).backward()
    assert counts == {"tissd": 2, "ticossd": 2}      # per layer: both streams batched in one TiSSD call + the cross-SSD
    counts.update(tissd=0, ticossd=0)
    make_model(n_layers=2, path="quadratic", stacking="streams_first").loss(items, times, lengths, target)
    assert counts == {"tissd": 2, "ticossd": 1}      # streams first: 2 TiSSD layers, then one cross-SSD
    for kw in kwargs_seen:
        assert kw["backend"] == "torch" and kw["path"] == "quadratic" and kw["d_skip"] == "delta"
        assert torch.equal(kw["lengths"][: len(lengths)], lengths)  # TiSSD calls see [text; image] = 2b rows


def test_triton_backend_matches_torch():
    pytest.importorskip("triton", reason="the triton backend needs the triton package (CPU: TRITON_INTERPRET=1)")
    torch_model = make_model(dropout=0.0, time_dropout=0.0).eval()
    triton_model = make_model(dropout=0.0, time_dropout=0.0, backend="triton").eval()
    triton_model.load_state_dict(torch_model.state_dict())
    items, times, lengths, target = make_batch()
    ref = torch_model.loss(items, times, lengths, target)
    got = triton_model.loss(items, times, lengths, target)
    assert torch.isfinite(got)
    assert abs(got.item() - ref.item()) <= 1e-4 * abs(ref.item()), (got.item(), ref.item())
    ref.backward()
    got.backward()
    ref_grads = dict(torch_model.named_parameters())
    for name, p in triton_model.named_parameters():
        want = ref_grads[name].grad
        err = (p.grad - want).norm() / want.norm().clamp(min=1e-12)
        assert err <= 1e-3, f"grad of {name}: relative error {err.item():.2e}"
