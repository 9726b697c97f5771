"""CLI end to end on CPU, in-process: prepare (atomic files and --demo) -> finetune 1 epoch -> evaluate ->
recommend -> export; bad input gives exit status 1 with one line."""
import json
import os
import platform

import numpy as np

from mmm4rec.cli import main
from mmm4rec.data import make_synthetic_dataset

SMALL = ["--hidden-size", "16", "--headdim", "8", "--d-state", "8", "--ngroups", "1", "--backend", "torch",
         "--path", "quadratic", "--device", "cpu", "--quiet"]


def test_cli_end_to_end(tmp_path, capsys):
    syn = make_synthetic_dataset(60, 30, 500, feat_dim=12, image_coverage=0.7, seed=0, name="toy")
    p = syn.write_atomic(str(tmp_path / "raw"))
    d, r = str(tmp_path / "data"), str(tmp_path / "run")
    assert main(["prepare", "--inter", p["inter"], "--item", p["item"], "--text-feats", p["text_feats"],
                 "--text-ids", p["text_rows"], "--image-feats", p["image_feats"], "--image-ids", p["image_rows"],
                 "--kcore", "0", "--max-len", "6", "--out", d]) == 0
    assert main(["finetune", "--data", d, "--out", r, "--epochs", "1", "--batch-size", "256", "--grad-accum", "1",
                 *SMALL]) == 0
    assert os.path.exists(os.path.join(r, "best", "model.safetensors"))
    mj = str(tmp_path / "m.json")
    assert main(["evaluate", "--checkpoint", os.path.join(r, "best"), "--data", d, "--popularity", "--json", mj,
                 "--device", "cpu", "--quiet"]) == 0
    res = json.load(open(mj))
    assert 0 <= res["model"]["ndcg@10"] <= 1 and "popularity" in res
    rj = str(tmp_path / "r.json")
    assert main(["recommend", "--checkpoint", os.path.join(r, "best"), "--data", d, "--users", "u1", "u7",
                 "--k", "5", "--json", rj, "--device", "cpu"]) == 0
    rec = json.load(open(rj))
    assert len(rec["u1"]) == 5 and all(e["item"].startswith("i") for e in rec["u1"])
    assert main(["recommend", "--checkpoint", os.path.join(r, "best"), "--data", d, "--history", "i1", "i2",
                 "--times", "1e9", "1.0001e9", "--exclude-history", "--k", "3", "--json", rj, "--device", "cpu"]) == 0
    assert not {"i1", "i2"} & {e["item"] for e in json.load(open(rj))["history"]}
    ed = str(tmp_path / "emb")
    assert main(["export", "--checkpoint", os.path.join(r, "best"), "--data", d, "--out", ed, "--quiet",
                 "--device", "cpu"]) == 0
    assert np.load(os.path.join(ed, "user_embeddings.npy")).shape == (60, 16)
    capsys.readouterr()
    assert main(["recommend", "--checkpoint", os.path.join(r, "best"), "--data", d, "--users", "nobody",
                 "--device", "cpu"]) == 1
    assert "unknown user" in capsys.readouterr().err


def test_cli_prepare_demo_and_item_texts(tmp_path, capsys):
    assert main(["prepare", "--demo", "--demo-size", "tiny", "--feat-dim", "8", "--out", str(tmp_path / "demo")]) == 0
    fix = os.path.join(os.path.dirname(__file__), "fixtures")
    capsys.readouterr()
    assert main(["prepare", "--inter", os.path.join(fix, "tiny.inter"), "--item", os.path.join(fix, "tiny.item"),
                 "--encoder", "hashed", "--feat-dim", "8", "--kcore", "0", "--out", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err   # users c (2 interactions) and d (1) are dropped, and x5 (only d had it)
    assert "dropped 2 users with fewer than 3 interactions" in err and "dropped 1 items that only those" in err
    from mmm4rec.data import SequentialData
    t = SequentialData.load(str(tmp_path / "t"))
    assert t.text_feats.shape == (5, 8) and t.image_feats is None


def test_cli_bench_missing_is_clear(capsys, monkeypatch, tmp_path):
    import mmm4rec.cli as cli
    monkeypatch.setattr(cli, "_CHECKOUT", str(tmp_path))                # an installed package: no checkout beside it
    assert main(["bench", "table4", "--scale", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "source checkout" in err and "python -m benchmarks.table4" in err and len(err.strip().splitlines()) == 1


def test_cli_bench_loads_the_checkout_harness():
    """From this checkout the CLI runs benchmarks/table4.py (the harness is not in the installed package)."""
    import importlib.util
    import mmm4rec.cli as cli
    harness = cli._table4_harness()
    assert harness is not None and callable(harness.main) and "scientific" in harness.TABLE4
    assert importlib.util.find_spec("mmm4rec.bench_table4") is None


def test_cli_demo_main_job(tmp_path, capsys, monkeypatch):
    """`mmm4rec demo` end to end on a tiny stand-in for the built-in data: data, run files, metrics, top-k, plot."""
    import mmm4rec.cli as cli
    monkeypatch.setattr(cli, "_demo_dataset", lambda size, seed, dim: make_synthetic_dataset(
        60, 30, 500, feat_dim=12, seed=0, name="demo"))
    r, d = str(tmp_path / "run"), str(tmp_path / "data")
    assert main(["demo", "--out", r, "--data", d, "--epochs", "1", "--k", "5", "--quiet", "--device", "cpu",
                 "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "[4/4] top-5 for user" in out and "popularity (exclude seen) test" in out and "preset cpu" in out
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":    # --free-memory retain (the default)
        assert "freed CPU memory kept for reuse" in out
    for f in ("best/model.safetensors", "last/trainer.pt", "log.json", "summary.json", "convergence.png",
              "demo_metrics.json"):
        assert os.path.exists(os.path.join(r, f)), f
    assert main(["demo", "--out", r, "--data", d, "--epochs", "1", "--quiet", "--device", "cpu"]) == 1
    assert "--overwrite" in capsys.readouterr().err
