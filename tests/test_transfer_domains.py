"""Domain splitting of experiments/transfer_ml100k.py on tiny synthetic input: one domain per item (first matching
rule), disjoint item sets, every domain a k-core, deterministic."""

import numpy as np
import pytest

from experiments.transfer_ml100k import DOMAIN_RULES, assign_domains, split_domains

RULES = (("a", ("G1", "G2")), ("b", ("G3",)), ("c", ("G4", "G5")))


def test_assign_domains_first_matching_rule_wins():
    genres = [["G1"], ["G3", "G1"], ["G5", "G3"], ["G4"], ["G9"], "G2", []]
    assert assign_domains(genres, RULES) == ["a", "a", "b", "c", None, "a", None]


def test_assign_domains_rejects_duplicate_names():
    with pytest.raises(ValueError, match="rules"):
        assign_domains([["G1"]], (("a", ("G1",)), ("a", ("G2",))))


def test_default_rules_cover_every_movielens_genre_once_per_domain():
    genres = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
              "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
              "unknown"]
    listed = [g for _, gs in DOMAIN_RULES for g in gs]
    assert sorted(listed) == sorted(genres)  # each genre in exactly one rule
    assert None not in assign_domains([[g] for g in genres])


def _synthetic(seed=0, users=40, items=30, per_user=40):
    """Random interactions: users u0.., items i0.. with genres G{k%5+1} plus 0-2 random others, random timestamps."""
    rng = np.random.default_rng(seed)
    u = np.repeat([f"u{k}" for k in range(users)], per_user)
    it = rng.integers(0, items, size=len(u))
    i = np.asarray([f"i{k}" for k in it], dtype=object)
    i[::97] = [f"rare{k}" for k in range(len(i[::97]))]  # one interaction each: the 5-core must drop them
    i = i.astype(str)
    t = rng.integers(0, 10 ** 6, size=len(u)).astype(float)
    all_items = sorted(set(i.tolist()))
    gpool = ["G1", "G2", "G3", "G4", "G5"]
    genres = [[gpool[k % 5]] + list(rng.choice(gpool, size=rng.integers(0, 3))) for k in range(len(all_items))]
    return u, i, t, dict(zip(all_items, assign_domains(genres, RULES)))


def test_split_domains_disjoint_kcore_and_consistent():
    u, i, t, item_domain = _synthetic()
    doms = split_domains(u, i, t, item_domain, domains=["a", "b", "c"], max_len=5, kcore=5)
    assert list(doms) == ["a", "b", "c"]
    assert sum(d.stats["kcore_dropped_items"] for d in doms.values()) > 0  # the filter had work to do
    seen = set()
    for name, d in doms.items():
        assert d.name == name
        toks = set(d.item_tokens[1:].tolist())
        assert toks and not (toks & seen)                      # disjoint item sets
        seen |= toks
        assert all(item_domain[x] == name for x in toks)       # every item is in its own domain
        counts_user = np.diff(d.seq_offsets)
        counts_item = np.bincount(d.seq_items, minlength=d.num_items + 1)[1:]
        assert counts_user.min() >= 5 and counts_item.min() >= 5   # a 5-core
        assert not any(x.startswith("rare") for x in toks)
        assert d.num_samples("valid") == d.num_users == d.num_samples("test")
        assert d.max_len == 5
        # every kept interaction is one of the raw ones, restricted to this domain
        sel = np.asarray([item_domain[x] == name for x in i])
        raw = set(zip(u[sel].tolist(), i[sel].tolist()))
        kept = {(d.user_tokens[k], d.item_tokens[x]) for k in range(d.num_users)
                for x in d.seq_items[d.seq_offsets[k]:d.seq_offsets[k + 1]]}
        assert kept <= raw


def test_split_domains_deterministic():
    u, i, t, item_domain = _synthetic(seed=3)
    d1 = split_domains(u, i, t, item_domain, domains=["a", "c"], max_len=4, kcore=5)
    d2 = split_domains(u, i, t, item_domain, domains=["a", "c"], max_len=4, kcore=5)
    for n in ("a", "c"):
        assert np.array_equal(d1[n].item_tokens, d2[n].item_tokens)
        assert np.array_equal(d1[n].seq_items, d2[n].seq_items)
        assert np.array_equal(d1[n].seq_times, d2[n].seq_times)
        for s in ("train", "valid", "test"):
            assert np.array_equal(d1[n].split(s)["item_seq"], d2[n].split(s)["item_seq"])


def test_split_domains_errors():
    u, i, t, item_domain = _synthetic()
    with pytest.raises(ValueError, match="domain 'zzz'"):
        split_domains(u, i, t, item_domain, domains=["zzz"])
    with pytest.raises(ValueError, match="lengths differ"):
        split_domains(u[:-1], i, t, item_domain, domains=["a"])
    # items without a domain (None or absent) are dropped
    partial = {k: v for k, v in item_domain.items() if v == "a"}
    doms = split_domains(u, i, t, partial, domains=["a"], kcore=0)
    assert set(doms["a"].item_tokens[1:].tolist()) <= set(partial)
