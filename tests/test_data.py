"""Data pipeline: atomic files, k-core, leave-one-out prefixes (checked by hand), time leaks, padding, batching,
features, multi-domain container, synthetic generator."""
import os

import numpy as np
import pytest
import torch

from mmm4rec.data import (SequentialData, align_features, attach_features, concat_domains, encode_texts_hashed,
                          item_texts, kcore_mask, load_matrix, make_synthetic_dataset, read_atomic)

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def tiny(**kw):
    kw.setdefault("kcore", 0)
    kw.setdefault("max_len", 3)
    return SequentialData.from_atomic(os.path.join(FIX, "tiny.inter"), **kw)


def test_read_atomic_types():
    cols = read_atomic(os.path.join(FIX, "tiny.inter"))
    assert cols["user_id"].tolist()[:3] == ["a", "b", "a"]
    assert cols["timestamp"].dtype == np.float64 and cols["timestamp"][0] == 30.0
    items = read_atomic(os.path.join(FIX, "tiny.item"))
    assert items["movie_title"][0] == ["The", "First", "Film"]
    assert item_texts(items)["x5"] == "Fifth Element. 1997. Sci-Fi Action"
    assert item_texts(items, text_fields=["movie_title", "class"])["x2"] == "Second Story. Drama"
    with open(os.path.join(FIX, "tiny.inter"), "rb") as f:
        assert read_atomic(f.read(), fields=["item_id"])["item_id"].tolist()[0] == "x3"
    with pytest.raises(ValueError, match="tiny.inter: no column .nope."):
        read_atomic(os.path.join(FIX, "tiny.inter"), fields=["nope"])
    with pytest.raises(ValueError, match="type"):
        read_atomic(b"user_id:token\titem_id:weird\nu\ti\n")


def test_leave_one_out_by_hand():
    """a: x1 x2 x3 x4 at t=10..40; b: x2 x1 (tie at t=5, file order kept) x3; c (2 items), d (1 item) dropped."""
    d = tiny()
    assert d.user_tokens.tolist() == ["a", "b"]
    assert d.item_tokens.tolist() == ["[PAD]", "x1", "x2", "x3", "x4"]  # x5 only used by the dropped user d
    assert d.stats["dropped_short_users"] == 2
    tr, va, te = d.split("train"), d.split("valid"), d.split("test")
    # a: n=4 -> n-3 = 1 training sample: [x1] -> x2 ; b: n=3 -> none
    assert tr["item_seq"].tolist() == [[1, 0, 0]] and tr["target"].tolist() == [2] and tr["lengths"].tolist() == [1]
    assert va["item_seq"].tolist() == [[1, 2, 0], [2, 0, 0]] and va["target"].tolist() == [3, 1]
    assert te["item_seq"].tolist() == [[1, 2, 3], [2, 1, 0]] and te["target"].tolist() == [4, 3]
    assert te["lengths"].tolist() == [3, 2] and te["user"].tolist() == [0, 1]
    # times: relative to the row's first history item; the target's time never appears
    assert te["time_seq"].tolist() == [[0.0, 10.0, 20.0], [0.0, 0.0, 0.0]]
    assert va["time_seq"].tolist() == [[0.0, 10.0, 0.0], [0.0, 0.0, 0.0]]
    assert d.time_origin == 5.0


def test_short_users_train_policy_and_truncation():
    d = tiny(short_users="train", max_len=2)
    assert d.user_tokens.tolist() == ["a", "b", "c"]  # d (1 interaction) has nothing to predict
    tr = d.split("train")
    # a: [x1]->x2 ; c (2 items, train only): [x1]->x4
    assert tr["target"].tolist() == [2, 4] and tr["user"].tolist() == [0, 2]
    te = d.split("test")
    assert te["user"].tolist() == [0, 1]
    # max_len 2: a's test history x1 x2 x3 keeps the last two
    assert te["item_seq"][0].tolist() == [2, 3] and te["time_seq"][0].tolist() == [0.0, 10.0]


def test_kcore_iterates_until_stable():
    # k=2: C, D go first, then u2 and u3 fall below 2, then A and B do, then u1: nothing is left
    u = np.array([0, 0, 1, 1, 2, 2])
    i = np.array([0, 1, 0, 2, 1, 3])
    assert not kcore_mask(u, i, 2).any()
    u2 = np.concatenate([u, [3, 3]])
    i2 = np.concatenate([i, [0, 1]])
    assert kcore_mask(u2, i2, 2).tolist() == [True, True, False, False, False, False, True, True]
    assert kcore_mask(u, i, 1).all()


def test_five_core_on_synthetic():
    syn = make_synthetic_dataset(300, 400, 2400, feat_dim=8, seed=1)
    d = SequentialData.from_interactions(syn.users, syn.items, syn.timestamps, kcore=5)
    users = np.repeat(np.arange(d.num_users), np.diff(d.seq_offsets))
    assert np.bincount(users).min() >= 5
    assert np.bincount(d.seq_items, minlength=d.num_items + 1)[1:].min() >= 5
    assert d.num_samples("train") == d.num_interactions - 3 * d.num_users


def test_no_target_timestamp_leak():
    syn = make_synthetic_dataset(50, 40, 400, feat_dim=8, seed=2)
    d1 = SequentialData.from_interactions(syn.users, syn.items, syn.timestamps, kcore=0, max_len=5)
    # push every user's last interaction far into the future: test targets' times change, inputs must not
    ts = syn.timestamps.copy()
    last = np.r_[syn.users[1:] != syn.users[:-1], True]
    ts[last] += 1e7
    d2 = SequentialData.from_interactions(syn.users, syn.items, ts, kcore=0, max_len=5)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(d1.split(split)["time_seq"], d2.split(split)["time_seq"])
        np.testing.assert_array_equal(d1.split(split)["item_seq"], d2.split(split)["item_seq"])


def test_padding_and_histories_match_sequences():
    syn = make_synthetic_dataset(60, 50, 600, feat_dim=8, seed=3)
    d = syn.to_sequential(max_len=4)
    for split in ("train", "valid", "test"):
        s = d.split(split)
        L = s["item_seq"].shape[1]
        pad = np.arange(L)[None, :] >= s["lengths"][:, None]
        assert (s["item_seq"][pad] == 0).all() and (s["time_seq"][pad] == 0).all()
        assert (s["item_seq"][~pad] > 0).all() and (s["lengths"] >= 1).all() and (s["lengths"] <= 4).all()
        assert s["time_seq"].dtype == np.float32 and (s["time_seq"][:, 0] == 0).all()
        assert (np.diff(s["time_seq"], axis=1)[~pad[:, 1:]] >= 0).all()  # non-decreasing inside the history
    # every training sample is a contiguous window ending right before its target in the user's sequence
    tr = d.split("train")
    for r in range(0, len(tr["target"]), 37):
        u = tr["user"][r]
        seq = d.seq_items[d.seq_offsets[u]:d.seq_offsets[u + 1]].tolist()
        h = tr["item_seq"][r, :tr["lengths"][r]].tolist()
        pos = [p for p in range(1, len(seq)) if seq[max(0, p - len(h)):p] == h and seq[p] == tr["target"][r]]
        assert pos and pos[0] <= len(seq) - 3


def test_batches_cover_every_sample_once():
    d = make_synthetic_dataset(80, 50, 800, feat_dim=8, seed=4).to_sequential(max_len=5)
    n = d.num_samples("train")
    it = d.batches("train", 64, shuffle=True, seed=7)
    orders = []
    for _ in range(2):
        rows = []
        for b in it:
            assert b["item_seq"].shape[1] == 5 and b["item_seq"].dtype == torch.long
            rows.append(b["user"] * 100000 + b["target"] * 100 + b["lengths"])
        keys = torch.cat(rows)
        assert len(keys) == n and len(it) == -(-n // 64)
        orders.append(keys)
    full = torch.from_numpy(d.split("train")["user"] * 100000 + d.split("train")["target"] * 100 +
                            d.split("train")["lengths"])
    for o in orders:
        assert torch.equal(o.sort().values, full.sort().values)
    assert not torch.equal(orders[0], orders[1])  # epochs differ
    again = [b["target"] for b in d.batches("train", 64, shuffle=True, seed=7)]
    assert torch.equal(torch.cat(again), orders[0] // 100 % 1000)  # same seed -> same order


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        SequentialData.from_interactions(["a", "a", "a"], ["x", "y", "z"], [1.0, np.nan, 3.0], kcore=0)
    with pytest.raises(ValueError, match="no interactions"):
        SequentialData.from_interactions([], [], [], kcore=0)
    with pytest.raises(ValueError, match="no interactions left"):
        SequentialData.from_interactions(["a", "a"], ["x", "y"], [1.0, 2.0], kcore=0)
    d = tiny()
    with pytest.raises(ValueError, match="unknown item"):
        d.item_index(["x5"])
    with pytest.raises(ValueError, match="unknown user"):
        d.user_index(["zz"])
    with pytest.raises(ValueError, match="empty"):
        d.history_from_items([[]])
    with pytest.raises(ValueError, match="NaN"):
        d.history_from_items([["x1"]], [[float("nan")]])
    with pytest.raises(ValueError, match="unknown split"):
        d.split("dev")


def test_given_history_and_user_history():
    d = tiny()
    h = d.history_from_items([["x1", "x2", "x3", "x4"], ["x2"]], [[100, 160, 200, 260], [5]])
    assert h["item_seq"].tolist() == [[2, 3, 4], [2, 0, 0]] and h["lengths"].tolist() == [3, 1]
    assert h["time_seq"][0].tolist() == [0.0, 40.0, 100.0]
    u = d.user_histories(d.user_index(["a"]))
    assert u["item_seq"].tolist() == [[2, 3, 4]]  # everything up to and including the test item, last 3


def test_save_load_roundtrip(tmp_path):
    d = make_synthetic_dataset(40, 30, 300, feat_dim=8, image_coverage=0.5, seed=5).to_sequential(max_len=6)
    d.save(tmp_path / "p")
    e = SequentialData.load(tmp_path / "p")
    assert e.item_tokens.tolist() == d.item_tokens.tolist() and e.max_len == 6
    for k in ("item_seq", "time_seq", "lengths", "target", "user"):
        np.testing.assert_array_equal(e.split("test")[k], d.split("test")[k])
    assert torch.equal(e.text_feats, d.text_feats) and torch.equal(e.image_mask, d.image_mask)
    assert SequentialData.load(tmp_path / "p", max_len=3).split("test")["item_seq"].shape[1] == 3
    with pytest.raises(ValueError, match="prepared"):
        SequentialData.load(tmp_path)


def test_features_alignment_and_formats(tmp_path):
    d = tiny()
    m = np.arange(10, dtype=np.float32).reshape(5, 2)
    rows = ["x5", "x4", "x3", "x2", "x1"]
    f, mask = align_features(m, rows, d.item_tokens, allow_missing=False)
    assert f.tolist() == [[0, 0], [8, 9], [6, 7], [4, 5], [2, 3]] and mask.tolist() == [False] + [True] * 4
    with pytest.raises(ValueError, match="no row"):
        align_features(m[:2], rows[:2], d.item_tokens, allow_missing=False)
    attach_features(d, text=m, text_rows=rows, image=m[:2], image_rows=["x2", "x4"])
    assert d.image_mask.tolist() == [False, False, True, False, True]
    assert d.image_feats[1].tolist() == [0, 0] and d.image_feats[4].tolist() == [2, 3]
    with pytest.raises(ValueError, match="NaN"):
        align_features(np.full((5, 2), np.nan, np.float32), rows, d.item_tokens, allow_missing=True)
    np.save(tmp_path / "f.npy", m)
    torch.save({"feats": torch.from_numpy(m)}, tmp_path / "f.pt")
    from safetensors.numpy import save_file
    save_file({"text": m}, str(tmp_path / "f.safetensors"))
    for name in ("f.npy", "f.pt", "f.safetensors"):
        np.testing.assert_array_equal(load_matrix(tmp_path / name), m)
    with pytest.raises(ValueError, match="unsupported"):
        load_matrix(tmp_path / "f.csv")


def test_hashed_text_encoder():
    a = encode_texts_hashed(["red steel lamp", "red steel lamp", "red steel lamp pro", "tea sauce jar", ""], dim=64)
    assert a.shape == (5, 64) and torch.equal(a[0], a[1])
    assert float(a[0] @ a[2]) > float(a[0] @ a[3]) and float(a[4].abs().sum()) == 0.0
    assert torch.allclose(a, encode_texts_hashed(["red steel lamp", "red steel lamp", "red steel lamp pro",
                                                   "tea sauce jar", ""], dim=64))


def test_concat_domains_offsets():
    d1 = make_synthetic_dataset(30, 20, 200, feat_dim=8, seed=6, name="A").to_sequential(max_len=5)
    d2 = make_synthetic_dataset(20, 25, 150, feat_dim=8, image_coverage=0.0, seed=7, name="B").to_sequential(
        max_len=5)
    m = concat_domains([d1, d2])
    assert m.num_items == d1.num_items + d2.num_items and m.domain_item_offsets == [0, d1.num_items]
    assert m.num_samples("train") == d1.num_samples("train") + d2.num_samples("train")
    np.testing.assert_array_equal(m.split("test")["target"][d1.num_users:], d2.split("test")["target"] + d1.num_items)
    assert torch.equal(m.text_feats[d1.num_items + 1:], d2.text_feats[1:])
    assert not m.image_mask[d1.num_items + 1:].any() and torch.equal(m.image_mask[:d1.num_items + 1], d1.image_mask)
    assert m.item_tokens[d1.num_items + 1] == "B:" + d2.item_tokens[1]


def test_synthetic_generator_shapes_and_gaps():
    syn = make_synthetic_dataset(500, 300, 4000, feat_dim=16, image_coverage=0.8, seed=8)
    assert len(syn.users) == 4000 and len(np.unique(syn.users)) == 500
    assert syn.text_feats.shape == (300, 16) and 0.7 < len(syn.image_rows) / 300 < 0.9
    same = syn.users[1:] == syn.users[:-1]
    gaps = np.diff(syn.timestamps)[same]
    assert gaps.min() >= 59 and gaps.max() <= 180 * 86400 and 3600 < np.median(gaps) < 10 * 86400
    again = make_synthetic_dataset(500, 300, 4000, feat_dim=16, image_coverage=0.8, seed=8)
    np.testing.assert_array_equal(again.timestamps, syn.timestamps)
    with pytest.raises(ValueError):
        make_synthetic_dataset(100, 10, 300)


def test_synthetic_write_atomic_roundtrip(tmp_path):
    syn = make_synthetic_dataset(30, 20, 200, feat_dim=8, seed=9)
    p = syn.write_atomic(str(tmp_path), "syn")
    d = SequentialData.from_atomic(p["inter"], kcore=0)
    e = syn.to_sequential(kcore=0)
    np.testing.assert_array_equal(d.seq_items, e.seq_items)
    assert read_atomic(p["item"])["item_id"].tolist() == syn.item_tokens.tolist()


def test_seen_items_and_resumable_batch_order():
    from mmm4rec.data import make_synthetic_dataset
    d = make_synthetic_dataset(30, 20, 200, feat_dim=4, seed=5).to_sequential(max_len=4)
    sp = d.split("valid")
    rows, items = d.seen_items("valid", 3, 9)
    for r in range(6):
        u = sp["user"][3 + r]
        want = d.seq_items[d.seq_offsets[u]:d.seq_offsets[u + 1] - 2]      # everything before the valid target
        assert sorted(items[rows == r].tolist()) == sorted(want.tolist())
    rows, items = d.seen_items_of_users(np.array([2, 0]))
    assert sorted(items[rows == 1].tolist()) == sorted(d.seq_items[d.seq_offsets[0]:d.seq_offsets[1]].tolist())
    it = d.batches("train", 16, shuffle=True, seed=1)
    it.epoch = 4
    full = [b["target"] for b in it]
    it.epoch = 4
    tail = [b["target"] for b in it.iter_from(2)]
    assert len(tail) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(full[2:], tail))


def test_prepare_drop_stats():
    from mmm4rec.data import SequentialData
    users = ["a"] * 5 + ["b"] * 2 + ["c"]
    items = ["x", "y", "z", "x", "y", "q", "x", "w"]
    d = SequentialData.from_interactions(users, items, list(range(8)), kcore=0)
    assert d.stats["dropped_short_users"] == 2 and d.stats["short_user_dropped_items"] == 2   # q, w
    assert d.stats["kcore_dropped_interactions"] == 0
    d = SequentialData.from_interactions(users, items, list(range(8)), kcore=2)
    assert d.stats["kcore_dropped_users"] == 2 and d.stats["kcore_dropped_items"] == 3   # b, c; z, q, w
