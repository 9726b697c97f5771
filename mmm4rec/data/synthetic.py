"""Synthetic interaction data shaped like the paper's Amazon domains (for the demo, tests and Table 4 timing).

Generative story (all vectorised numpy, seeded):
  * per-user lengths: `min_len` + a multinomial share of the remaining interactions with log-normal user weights, so
    the total is exactly `num_interactions` and the average length is num_interactions / num_users;
  * items belong to `num_clusters` topics; a user walks along topics (stay, or move to the next topic), and moves
    more often after a long pause, so both the order and the time gaps carry signal;
  * within a topic items are drawn with a power-law popularity;
  * inter-arrival gaps are log-normal (median ~1 day, clipped to [1 minute, 180 days]);
  * text/image features are the item's topic centroid plus noise, projected to `feat_dim`; a fraction
    `1 - image_coverage` of items has no image row (-> image_mask False).

Example (Scientific-like, Table 1):
    syn = make_synthetic_dataset(8442, 4385, 59427, feat_dim=768, seed=0)
    data = syn.to_sequential(max_len=20, kcore=0)     # SequentialData with text/image features attached
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

DAY = 86400.0

# Table 1 of the paper: users, items, interactions, average length (downstream domains)
PAPER_DATASETS = {
    "scientific": (8442, 4385, 59427, 7.04),
    "pantry": (13101, 4898, 126962, 9.69),
    "instruments": (24962, 9964, 208926, 8.37),
    "arts": (45486, 21019, 395150, 8.69),
    "office": (87436, 25986, 684837, 7.84),
}


@dataclass
class SyntheticDataset:
    """Atomic-file-like arrays.

    users, items: str arrays [M] of raw tokens ("u<k>", "i<k>"); timestamps: float64 [M] unix seconds (rows sorted
    by user then time); item_tokens: str [num_items]; item_texts: list[str] [num_items];
    text_feats: float32 [num_items, feat_dim]; image_feats: float32 [n_img, feat_dim] for image_rows (str [n_img]).
    """
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    item_tokens: np.ndarray
    item_texts: list
    text_feats: np.ndarray
    image_feats: Optional[np.ndarray]
    image_rows: Optional[np.ndarray]
    name: str = "synthetic"
    info: dict = field(default_factory=dict)

    def to_sequential(self, max_len: int = 20, kcore: int = 0, short_users: str = "drop"):
        """-> SequentialData with aligned text/image features (kcore=0: keep the exact generated sizes)."""
        from .dataset import SequentialData
        from .features import attach_features
        data = SequentialData.from_interactions(self.users, self.items, self.timestamps, name=self.name,
                                                max_len=max_len, kcore=kcore, short_users=short_users)
        attach_features(data, text=self.text_feats, text_rows=self.item_tokens,
                        image=self.image_feats, image_rows=self.image_rows)
        return data

    def write_atomic(self, out_dir: str, name: Optional[str] = None) -> dict:
        """Write <name>.inter, <name>.item, <name>.text.npy / .image.npy and row-id files; returns the paths."""
        from .atomic import write_atomic
        name = name or self.name
        os.makedirs(out_dir, exist_ok=True)
        p = {k: os.path.join(out_dir, f"{name}.{k}") for k in ("inter", "item")}
        write_atomic(p["inter"], {"user_id": self.users, "item_id": self.items,
                                  "rating": np.ones(len(self.users)), "timestamp": self.timestamps},
                     {"user_id": "token", "item_id": "token", "rating": "float", "timestamp": "float"})
        write_atomic(p["item"], {"item_id": self.item_tokens, "title": self.item_texts},
                     {"item_id": "token", "title": "token_seq"})
        p["text_feats"] = os.path.join(out_dir, f"{name}.text.npy")
        np.save(p["text_feats"], self.text_feats)
        p["text_rows"] = os.path.join(out_dir, f"{name}.text.ids")
        with open(p["text_rows"], "w") as f:
            f.write("\n".join(self.item_tokens.tolist()) + "\n")
        if self.image_feats is not None:
            p["image_feats"] = os.path.join(out_dir, f"{name}.image.npy")
            np.save(p["image_feats"], self.image_feats)
            p["image_rows"] = os.path.join(out_dir, f"{name}.image.ids")
            with open(p["image_rows"], "w") as f:
                f.write("\n".join(self.image_rows.tolist()) + "\n")
        return p


_WORDS = ("red blue green small large classic modern pro mini ultra soft steel wood glass paper cotton "
          "kit set pack tool pen brush lamp case box cable gauge meter scope jar spice tea sauce").split()


def make_synthetic_dataset(num_users: int = 1000, num_items: int = 500, num_interactions: int = 8000,
                           feat_dim: int = 768, image_coverage: float = 0.9, seed: int = 0, *, min_len: int = 5,
                           num_clusters: Optional[int] = None, stay_prob: float = 0.7, popularity_skew: float = 2.0,
                           gap_median_s: float = DAY, gap_sigma: float = 2.0, start_time: float = 1.4e9,
                           span_s: float = 2 * 365 * DAY, feature_noise: float = 0.5, with_features: bool = True,
                           name: str = "synthetic") -> SyntheticDataset:
    """Generate a synthetic sequential-recommendation domain (see module doc).

    Args:
        num_users, num_items, num_interactions: target sizes (total interactions is exact; avg length =
            num_interactions / num_users, must be >= min_len).
        feat_dim: width of the text and image feature vectors.
        image_coverage: fraction of items with an image row (0 = no image modality at all -> image_feats None).
        seed: everything is determined by it.
        min_len: minimum per-user length (5 keeps users 5-core friendly).
        with_features: False skips the feature matrices (faster for huge timing runs; text_feats is then None).
    Returns:
        SyntheticDataset.
    """
    if num_users < 1 or num_items < 2:
        raise ValueError(f"need num_users >= 1 and num_items >= 2, got {num_users}, {num_items}")
    if num_interactions < num_users * min_len:
        raise ValueError(f"num_interactions={num_interactions} < num_users*min_len={num_users * min_len}")
    if not 0.0 <= image_coverage <= 1.0:
        raise ValueError(f"image_coverage must be in [0, 1], got {image_coverage}")
    rng = np.random.default_rng(seed)
    C = num_clusters or max(2, min(64, num_items // 20))
    # --- per-user lengths: exact total, heavy tail
    w = rng.lognormal(0.0, 1.0, num_users)
    lengths = min_len + rng.multinomial(num_interactions - num_users * min_len, w / w.sum())
    M = int(lengths.sum())
    user = np.repeat(np.arange(num_users), lengths)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    is_first = np.zeros(M, dtype=bool)
    is_first[first] = True
    # --- time gaps: log-normal, clipped to [1 min, 180 days]
    gaps = np.clip(rng.lognormal(np.log(gap_median_s), gap_sigma, M), 60.0, 180 * DAY)
    gaps[is_first] = 0.0
    cs = np.cumsum(gaps)
    rel = cs - np.repeat(cs[first], lengths)
    t0 = start_time + rng.uniform(0, span_s, num_users)
    timestamps = np.floor(np.repeat(t0, lengths) + rel)
    # --- topic walk: move to the next topic with prob 1-stay, or with prob 0.8 after a pause > 2 weeks
    move = (rng.random(M) > stay_prob) | ((gaps > 14 * DAY) & (rng.random(M) < 0.8))
    move[is_first] = False
    steps = np.cumsum(move)
    steps = steps - np.repeat(steps[first], lengths)
    topic = (np.repeat(rng.integers(0, C, num_users), lengths) + steps) % C
    # --- items: contiguous blocks per topic, power-law popularity within a topic, ids shuffled
    bounds = np.linspace(0, num_items, C + 1).astype(np.int64)
    size = bounds[1:] - bounds[:-1]
    rank = np.floor(size[topic] * rng.random(M) ** popularity_skew).astype(np.int64)
    item_dense = bounds[topic] + np.minimum(rank, size[topic] - 1)
    perm = rng.permutation(num_items)
    item_id = perm[item_dense]  # raw item number 0..num_items-1
    item_topic = np.empty(num_items, dtype=np.int64)
    item_topic[perm[np.arange(num_items)]] = np.searchsorted(bounds, np.arange(num_items), side="right") - 1
    item_tokens = np.asarray([f"i{k}" for k in range(num_items)])
    texts = [f"{_WORDS[t % len(_WORDS)]} {_WORDS[(3 * t + 1) % len(_WORDS)]} {_WORDS[k % len(_WORDS)]} item {k}"
             for k, t in enumerate(item_topic.tolist())]
    text_feats = image_feats = image_rows = None
    if with_features:
        latent = 16
        cent = rng.standard_normal((C, latent))
        z = cent[item_topic] + feature_noise * rng.standard_normal((num_items, latent))
        pt = rng.standard_normal((latent, feat_dim)) / np.sqrt(latent)
        text_feats = (z @ pt + 0.1 * rng.standard_normal((num_items, feat_dim))).astype(np.float32)
        if image_coverage > 0:
            pv = rng.standard_normal((latent, feat_dim)) / np.sqrt(latent)
            has = rng.random(num_items) < image_coverage
            image_rows = item_tokens[has]
            image_feats = (z[has] @ pv + 0.1 * rng.standard_normal((int(has.sum()), feat_dim))).astype(np.float32)
    users = np.asarray([f"u{k}" for k in range(num_users)])[user]
    info = {"num_clusters": C, "avg_len": M / num_users, "median_gap_s": float(np.median(gaps[~is_first]))}
    return SyntheticDataset(users, item_tokens[item_id], timestamps, item_tokens, texts, text_feats, image_feats,
                            image_rows, name=name, info=info)


def make_paper_like(dataset: str, scale: float = 1.0, feat_dim: int = 768, seed: int = 0,
                    **kw) -> SyntheticDataset:
    """A synthetic domain with the Table 1 sizes of `dataset` (scientific, pantry, instruments, arts, office),
    users/items/interactions multiplied by `scale`."""
    key = dataset.lower()
    if key not in PAPER_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}, expected one of {list(PAPER_DATASETS)}")
    u, i, m, _ = PAPER_DATASETS[key]
    u, i, m = max(1, int(u * scale)), max(2, int(i * scale)), int(m * scale)
    m = max(m, 5 * u)
    return make_synthetic_dataset(u, i, m, feat_dim=feat_dim, seed=seed, name=key, **kw)
