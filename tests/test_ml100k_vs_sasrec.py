"""experiments/ml100k_vs_sasrec.py: the shared-split export, RecBole equivalence check, jsonl bookkeeping, summary.

Tiny synthetic data, CPU, no network; the RecBole tests skip when recbole is not installed."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

import experiments.ml100k_vs_sasrec as B
from mmm4rec.data import SequentialData

HAVE_RECBOLE = importlib.util.find_spec("recbole") is not None
needs_recbole = pytest.mark.skipif(not HAVE_RECBOLE, reason="recbole not installed (pip install recbole==1.2.1)")


def tiny_data(max_len: int = 4) -> SequentialData:
    """12 users x 5..14 interactions over 15 items, with many tied timestamps (ties keep file order)."""
    rng = np.random.default_rng(0)
    users, items, ts = [], [], []
    for u in range(12):
        n = 5 + u % 10
        its = rng.choice(15, size=n, replace=False)
        t = np.sort(rng.integers(0, 4, size=n)) * 1000 + 10 ** 9   # few distinct times: ties
        perm = rng.permutation(n)                                   # file order != time order
        users += [f"u{u}"] * n
        items += [f"i{i}" for i in its[perm]]
        ts += t[perm].tolist()
    return SequentialData.from_interactions(users, items, ts, name="tiny", max_len=max_len, kcore=0)


def test_export_ranks_follow_our_order(tmp_path):
    data = tiny_data()
    path = B.export_atomic(data, str(tmp_path), "tiny")
    lines = open(path).read().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == data.num_interactions
    assert [int(r[2]) for r in rows] == list(range(data.num_interactions))
    counts = np.diff(data.seq_offsets)
    assert [r[0] for r in rows] == np.repeat(data.user_tokens, counts).tolist()
    assert [r[1] for r in rows] == data.item_tokens[data.seq_items].tolist()


def test_ties_keep_file_order():
    """The tie order documented in the script: equal timestamps keep the input file's order."""
    d = SequentialData.from_interactions(["a"] * 4, ["x", "y", "z", "w"], [5, 5, 1, 5], max_len=3, kcore=0)
    assert d.item_tokens[d.seq_items].tolist() == ["z", "x", "y", "w"]


@needs_recbole
def test_recbole_split_equals_ours(tmp_path, monkeypatch):
    data = tiny_data()
    B.export_atomic(data, str(tmp_path), "tiny")
    monkeypatch.chdir(tmp_path)
    cfg = B.recbole_config(str(tmp_path), 0, data.max_len, 1, 2, train_batch_size=8)
    counts = B.verify_split(data, B.recbole_splits(cfg, "SASRec", name="tiny"), sequential=True)
    assert counts == {"train_samples": data.num_samples("train"), "valid": data.num_users, "test": data.num_users}
    assert counts["train_samples"] == data.num_interactions - 3 * data.num_users
    general = B.verify_split(data, B.recbole_splits(cfg, "Pop", name="tiny"), sequential=False)
    assert general["train_samples"] == data.num_interactions - 2 * data.num_users


@needs_recbole
def test_verify_split_catches_a_reordered_export(tmp_path, monkeypatch):
    """Swap two items inside one user's sequence in the exported file: the check must fail."""
    data = tiny_data()
    path = B.export_atomic(data, str(tmp_path), "tiny")
    lines = open(path).read().splitlines()
    a, b = 1 + int(data.seq_offsets[3]) + 1, 1 + int(data.seq_offsets[4]) - 1   # user 3: 2nd and last rows
    ra, rb = lines[a].split("\t"), lines[b].split("\t")
    ra[1], rb[1] = rb[1], ra[1]
    lines[a], lines[b] = "\t".join(ra), "\t".join(rb)
    open(path, "w").write("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    cfg = B.recbole_config(str(tmp_path), 0, data.max_len, 1, 2, train_batch_size=8)
    with pytest.raises(AssertionError):
        B.verify_split(data, B.recbole_splits(cfg, "SASRec", name="tiny"), sequential=True)


def _row(model, seed, ndcg, cfg=None, **kw):
    test = {"ndcg@10": ndcg, "ndcg@20": ndcg + 0.01, "recall@10": 2 * ndcg, "recall@20": 3 * ndcg}
    return dict(model=model, seed=seed, test=test, config=cfg or {"x": [1, 2]}, epochs=kw.get("epochs", 10),
                stopped=kw.get("stopped", "early stop"), s_per_epoch=kw.get("s", 2.0), cpu_ms_per_sample=0.5)


def test_jsonl_append_skip_and_summary(tmp_path):
    out = str(tmp_path / "r.jsonl")
    assert not B.already_done(out, "sasrec", 0, {"x": (1, 2)})
    for seed, v in ((0, 0.10), (1, 0.12), (2, 0.14)):
        B.append_line(out, _row("sasrec", seed, v))
    B.append_line(out, _row("mmm4rec", 0, 0.2, stopped="cap", epochs=5))
    B.append_line(out, _row("mmm4rec", 0, 0.3, cfg={"x": [9]}))
    B.append_line(out, dict(_row("pop", None, 0.02), epochs=None, stopped=None, s_per_epoch=None,
                            cpu_ms_per_sample=None))
    assert len(open(out).read().splitlines()) == 6
    assert B.already_done(out, "sasrec", 1, {"x": (1, 2)})        # tuple config == list read back
    assert not B.already_done(out, "sasrec", 3, {"x": (1, 2)})
    assert not B.already_done(out, "sasrec", 0, {"x": (1, 3)})
    table = B.summarize(out)
    lines = table.splitlines()
    assert lines[0].startswith("| model | n seeds | NDCG@10 | NDCG@20 | Recall@10 | Recall@20 |")
    sas = next(line for line in lines if line.startswith("| sasrec |"))
    assert "| 3 | 0.1200 ± 0.0200 |" in sas and "0.2400 ± 0.0400" in sas and "| 10.0 |" in sas
    assert lines[2].startswith("| pop | deterministic | 0.0200 |")
    assert any(line.startswith("| mmm4rec (config 1) | 1 | 0.2000 |") and "5.0 (1 capped)" in line for line in lines)
    assert any(line.startswith("| mmm4rec (config 2) |") for line in lines)
    assert json.loads(open(out).readline())["model"] == "sasrec"


def test_cli_errors(capsys):
    with pytest.raises(SystemExit):
        B.main(["--models", "pop"])                  # no --out
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        B.main(["--out", "x.jsonl", "--epochs", "0"])
    assert "--epochs" in capsys.readouterr().err
