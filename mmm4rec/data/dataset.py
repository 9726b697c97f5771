"""Sequential-recommendation data: k-core filtering, id mapping, leave-one-out splits, prefix samples, batching.

Protocol (see docs/design.md and docs/model.md, "Data protocol"):
  * raw ids map to 1..I for items (0 = padding) and 0..U-1 for users, in sorted raw-token order (deterministic);
  * each user's interactions are sorted by time (stable: ties keep file order);
  * leave-one-out: last item = test target, second last = valid target, every earlier position >= 1 is a training
    target (RecBole prefix augmentation), so a user with n items gives n-3 training samples;
  * users with fewer than 3 interactions: `short_users="drop"` (default) removes them, `"train"` keeps them for
    training only (n-1 samples each, no valid/test sample);
  * a sample's history is the last `max_len` items BEFORE the target, left-aligned and right-padded with 0;
  * time inputs are the history items' timestamps only (the target's time never enters), given in float32 seconds
    relative to the row's first history item (the model only uses differences, and this keeps full precision).

Everything is built with numpy index arithmetic (no per-sample Python), and batches are index slices of tensors that
live on the training device.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

PAD_TOKEN = "[PAD]"
SPLITS = ("train", "valid", "test")


def kcore_mask(user_codes: np.ndarray, item_codes: np.ndarray, k: int) -> np.ndarray:
    """Iterative k-core filter: keep interactions whose user AND item both have >= k kept interactions.

    Args:
        user_codes, item_codes: int arrays [M] of dense codes (0..U-1, 0..I-1).
        k: the core size; k <= 1 keeps everything.
    Returns:
        bool mask [M]; iterates until no interaction is removed (the result is the unique maximal k-core).
    """
    keep = np.ones(len(user_codes), dtype=bool)
    if k <= 1:
        return keep
    nu = int(user_codes.max()) + 1 if len(user_codes) else 0
    ni = int(item_codes.max()) + 1 if len(item_codes) else 0
    while True:
        uc = np.bincount(user_codes[keep], minlength=nu)
        ic = np.bincount(item_codes[keep], minlength=ni)
        new = keep & (uc[user_codes] >= k) & (ic[item_codes] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def _is_float(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _segment_positions(counts: np.ndarray) -> np.ndarray:
    """[sum(counts)] position of each element inside its segment: counts [3,2] -> [0,1,2,0,1]."""
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - starts


def gather_histories(seq_items: np.ndarray, seq_times: np.ndarray, target_pos: np.ndarray, row_start: np.ndarray,
                     max_len: int) -> Dict[str, np.ndarray]:
    """Build padded history matrices for targets at global positions `target_pos` of the flat sequence arrays.

    Args:
        seq_items: int64 [M] item ids of all users' time-ordered sequences, concatenated.
        seq_times: float64 [M] their timestamps (any origin).
        target_pos: int64 [N] global position of each sample's target (or one past the history end).
        row_start: int64 [N] global position where that sample's user sequence starts.
        max_len: L, the history window.
    Returns:
        item_seq int64 [N, L] (right-padded with 0), time_seq float32 [N, L] (seconds since the row's first history
        item, 0 at padding), lengths int64 [N] (>= 1 required).
    """
    lengths = np.minimum(target_pos - row_start, max_len).astype(np.int64)
    if len(lengths) and lengths.min() < 1:
        raise ValueError("a sample has an empty history (target at its user's first position)")
    ar = np.arange(max_len, dtype=np.int64)
    idx = target_pos[:, None] - lengths[:, None] + ar[None, :]  # [N, L], history positions, left-aligned
    valid = ar[None, :] < lengths[:, None]
    idx = np.where(valid, idx, 0)
    item_seq = np.where(valid, seq_items[idx], 0).astype(np.int64)
    t = seq_times[idx]
    time_seq = np.where(valid, t - t[:, :1], 0.0).astype(np.float32)
    return {"item_seq": item_seq, "time_seq": time_seq, "lengths": lengths}


class SequentialData:
    """One domain's interaction sequences plus (optional) item feature matrices.

    Attributes:
        name: dataset name.
        item_tokens: str array [I+1]; item_tokens[0] = "[PAD]", item id i <-> raw token item_tokens[i].
        user_tokens: str array [U]; user index u <-> raw token.
        seq_offsets: int64 [U+1]; user u's sequence is seq_items[seq_offsets[u]:seq_offsets[u+1]].
        seq_items: int64 [M] item ids (1..I), time-ordered per user.
        seq_times: float64 [M] seconds relative to `time_origin` (the dataset's earliest timestamp).
        max_len: L, history window of every sample.
        text_feats: float32 tensor [I+1, Ft] or None (row 0 = padding, zeros).
        image_feats: float32 tensor [I+1, Fv] or None; image_mask: bool tensor [I+1] (False = missing row).
        stats: dict of counts from the build (filtered users/items/interactions ...).
    """

    def __init__(self, name: str, item_tokens: np.ndarray, user_tokens: np.ndarray, seq_offsets: np.ndarray,
                 seq_items: np.ndarray, seq_times: np.ndarray, time_origin: float = 0.0, max_len: int = 20,
                 short_users: str = "drop", text_feats: Optional[torch.Tensor] = None,
                 image_feats: Optional[torch.Tensor] = None, image_mask: Optional[torch.Tensor] = None,
                 stats: Optional[dict] = None):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if short_users not in ("drop", "train"):
            raise ValueError(f"short_users must be 'drop' or 'train', got {short_users!r}")
        self.name = name
        self.item_tokens = np.asarray(item_tokens, dtype=str)
        self.user_tokens = np.asarray(user_tokens, dtype=str)
        self.seq_offsets = np.asarray(seq_offsets, dtype=np.int64)
        self.seq_items = np.asarray(seq_items, dtype=np.int64)
        self.seq_times = np.asarray(seq_times, dtype=np.float64)
        self.time_origin = float(time_origin)
        self.max_len = int(max_len)
        self.short_users = short_users
        self.text_feats = text_feats
        self.image_feats = image_feats
        self.image_mask = image_mask
        self.stats = dict(stats or {})
        self.domain_item_offsets: Optional[List[int]] = None  # set by concat_domains
        if len(self.seq_offsets) != len(self.user_tokens) + 1:
            raise ValueError("seq_offsets must have num_users + 1 entries")
        if len(self.seq_items) and (self.seq_items.min() < 1 or self.seq_items.max() > self.num_items):
            raise ValueError("seq_items must lie in 1..num_items")
        self._splits: Dict[str, Dict[str, np.ndarray]] = {}
        self._device_cache: Dict[tuple, Dict[str, torch.Tensor]] = {}
        self._item_index = None
        self._user_index = None
        self._build_splits()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_interactions(cls, users: Sequence, items: Sequence, timestamps: Sequence, *, name: str = "data",
                          max_len: int = 20, kcore: int = 5, short_users: str = "drop",
                          progress: bool = False) -> "SequentialData":
        """Build from raw interaction columns.

        Args:
            users, items: raw tokens [M] (any hashable scalars; converted to str).
            timestamps: [M] unix seconds (float); NaN/inf is a ValueError.
            kcore: k-core size (5 = the paper's protocol; 0 or 1 = no filtering).
            short_users: policy for users left with < 3 interactions ("drop" or "train").
        """
        users = np.asarray(users).astype(str)
        items = np.asarray(items).astype(str)
        ts = np.asarray(timestamps, dtype=np.float64)
        if not (len(users) == len(items) == len(ts)):
            raise ValueError(f"users/items/timestamps lengths differ: {len(users)}, {len(items)}, {len(ts)}")
        if len(users) == 0:
            raise ValueError("no interactions given (empty users/items/timestamps)")
        bad = ~np.isfinite(ts)
        if bad.any():
            raise ValueError(f"{int(bad.sum())} interactions have NaN/inf timestamps (first at row {int(np.argmax(bad))})")
        if short_users not in ("drop", "train"):
            raise ValueError(f"short_users must be 'drop' or 'train', got {short_users!r}")
        stats = {"raw_interactions": int(len(users))}
        u_tok, u_code = np.unique(users, return_inverse=True)
        i_tok, i_code = np.unique(items, return_inverse=True)
        stats.update(raw_users=int(len(u_tok)), raw_items=int(len(i_tok)))
        keep = kcore_mask(u_code, i_code, kcore)
        stats.update(kcore_dropped_interactions=int((~keep).sum()),
                     kcore_dropped_users=int(len(u_tok) - len(np.unique(u_code[keep]))),
                     kcore_dropped_items=int(len(i_tok) - len(np.unique(i_code[keep]))))
        u_code, i_code, ts = u_code[keep], i_code[keep], ts[keep]
        # users with < 3 interactions
        ucount = np.bincount(u_code, minlength=len(u_tok))
        if short_users == "drop":
            short = ucount[u_code] < 3
            stats["dropped_short_users"] = int(((ucount > 0) & (ucount < 3)).sum())
            u_code, i_code, ts = u_code[~short], i_code[~short], ts[~short]
        else:
            single = ucount[u_code] < 2  # one interaction: nothing to predict from
            stats["dropped_short_users"] = int((ucount == 1).sum())
            u_code, i_code, ts = u_code[~single], i_code[~single], ts[~single]
        if len(u_code) == 0:
            raise ValueError(f"no interactions left after {kcore}-core filtering and short-user removal")
        # re-densify ids over what is left (sorted raw-token order)
        u_used = np.unique(u_code)
        i_used = np.unique(i_code)
        u_new = np.searchsorted(u_used, u_code)
        i_new = np.searchsorted(i_used, i_code) + 1  # 0 = padding
        order = np.lexsort((ts, u_new))  # by user, then time; lexsort is stable (ties keep file order)
        u_new, i_new, ts = u_new[order], i_new[order], ts[order]
        counts = np.bincount(u_new, minlength=len(u_used))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        origin = float(ts.min())
        item_tokens = np.concatenate([[PAD_TOKEN], i_tok[i_used]])
        stats.update(short_user_dropped_items=int(stats["raw_items"] - stats["kcore_dropped_items"] - len(i_used)))
        stats.update(users=int(len(u_used)), items=int(len(i_used)), interactions=int(len(i_new)),
                     kcore=int(kcore), avg_len=float(len(i_new) / max(len(u_used), 1)))
        return cls(name, item_tokens, u_tok[u_used], offsets, i_new, ts - origin, time_origin=origin,
                   max_len=max_len, short_users=short_users, stats=stats)

    @classmethod
    def from_atomic(cls, inter_path, *, name: Optional[str] = None, user_field: str = "user_id",
                    item_field: str = "item_id", time_field: str = "timestamp", **kw) -> "SequentialData":
        """Build from a `<name>.inter` atomic file (path or bytes); kwargs go to from_interactions."""
        from .atomic import read_atomic
        src = "<bytes>" if isinstance(inter_path, bytes) else str(inter_path)
        cols = read_atomic(inter_path, fields=[user_field, item_field, time_field])
        if name is None:
            name = os.path.splitext(os.path.basename(src))[0] if not isinstance(inter_path, bytes) else "data"
        times = cols[time_field]
        if times.dtype.kind != "f":  # declared token: must still hold numbers (unix seconds)
            try:
                times = times.astype(np.float64)
            except ValueError:
                bad = next(v for v in times.tolist() if not _is_float(v))
                raise ValueError(f"{src}: column {time_field!r} ({cols['__types__'][time_field]}) must hold unix "
                                 f"seconds, found {bad!r}; convert dates to numbers first (or pick another column "
                                 "with --time-field)") from None
        return cls.from_interactions(cols[user_field], cols[item_field], times, name=name, **kw)

    def _build_splits(self) -> None:
        """Record each split's (user, target position); the padded history matrices are built on first use of a
        split (evaluation never pays for the large training split)."""
        counts = np.diff(self.seq_offsets)
        starts = self.seq_offsets[:-1]
        uidx = np.arange(len(counts), dtype=np.int64)
        full = counts >= 3
        # train targets: positions 1..n-3 of full users; positions 1..n-1 of short users kept for training
        n_train = np.where(full, counts - 3, np.maximum(counts - 1, 0))
        t_user = np.repeat(uidx, n_train)
        t_pos = np.repeat(starts, n_train) + 1 + _segment_positions(n_train)
        self._targets = {"train": (t_user, t_pos),
                         "valid": (uidx[full], starts[full] + counts[full] - 2),
                         "test": (uidx[full], starts[full] + counts[full] - 1)}
        self._splits = {}
        self._device_cache.clear()

    def _materialise(self, split: str) -> Dict[str, np.ndarray]:
        u, pos = self._targets[split]
        h = gather_histories(self.seq_items, self.seq_times, pos, self.seq_offsets[:-1][u], self.max_len)
        h["target"] = self.seq_items[pos]
        h["user"] = u
        h["target_pos"] = pos.astype(np.int64)
        return h

    # ------------------------------------------------------------------ access
    @property
    def num_items(self) -> int:
        return len(self.item_tokens) - 1

    @property
    def num_users(self) -> int:
        return len(self.user_tokens)

    @property
    def num_interactions(self) -> int:
        return len(self.seq_items)

    def split(self, split: str) -> Dict[str, np.ndarray]:
        """numpy arrays of one split: item_seq [N,L], time_seq [N,L], lengths [N], target [N], user [N]."""
        if split not in self._splits:
            if split not in self._targets:
                raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
            self._splits[split] = self._materialise(split)
        return self._splits[split]

    def num_samples(self, split: str) -> int:
        if split not in self._targets:
            raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
        return len(self._targets[split][0])

    def tensors(self, split: str, device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
        """The split as torch tensors on `device` (cached): item_seq long [N,L], time_seq float32 [N,L],
        lengths long [N], target long [N], user long [N]."""
        key = (split, str(torch.device(device)))
        if key not in self._device_cache:
            self._device_cache[key] = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
                                       for k, v in self.split(split).items()}
        return self._device_cache[key]

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                device: Union[str, torch.device] = "cpu", drop_last: bool = False) -> "BatchIterator":
        """A BatchIterator over one split (see BatchIterator)."""
        return BatchIterator(self.tensors(split, device), batch_size, shuffle=shuffle, seed=seed,
                             drop_last=drop_last)

    def _lookup(self, kind: str, tokens: Sequence, first_id: int) -> np.ndarray:
        """Raw tokens -> ids through a lazily built {token: id} map of self.<kind>_tokens; ids below first_id
        (the padding item) and unknown tokens are a ValueError."""
        attr = f"_{kind}_index"
        if getattr(self, attr) is None:
            setattr(self, attr, {t: i for i, t in enumerate(getattr(self, f"{kind}_tokens").tolist())})
        index = getattr(self, attr)
        out = []
        for t in tokens:
            i = index.get(str(t))
            if i is None or i < first_id:
                raise ValueError(f"unknown {kind} id {t!r} (not in dataset {self.name!r} after filtering)")
            out.append(i)
        return np.asarray(out, dtype=np.int64)

    def seen_items(self, split: str, lo: int = 0, hi: Optional[int] = None) -> "tuple[torch.Tensor, torch.Tensor]":
        """Items each sample's user interacted with BEFORE its target (the whole past, not only the last max_len),
        for samples lo:hi of `split`, as sparse (row, item) pairs: rows long [nnz] in 0..hi-lo-1, items long [nnz].
        Used to set those scores to -inf (exclude-seen evaluation)."""
        sp = self.split(split)
        pos = sp["target_pos"][lo:hi]
        start = self.seq_offsets[sp["user"][lo:hi]]
        return self._pairs(start, pos)

    def seen_items_of_users(self, users: np.ndarray) -> "tuple[torch.Tensor, torch.Tensor]":
        """(row, item) pairs of every item each user (indices [b]) interacted with, test item included."""
        users = np.asarray(users, dtype=np.int64)
        return self._pairs(self.seq_offsets[users], self.seq_offsets[users + 1])

    def _pairs(self, start: np.ndarray, end: np.ndarray):
        count = (end - start).astype(np.int64)
        rows = np.repeat(np.arange(len(count), dtype=np.int64), count)
        idx = np.repeat(start, count) + _segment_positions(count)
        return torch.from_numpy(rows), torch.from_numpy(self.seq_items[idx])

    def item_index(self, tokens: Sequence) -> np.ndarray:
        """Raw item tokens -> ids 1..I; an unknown token is a ValueError."""
        return self._lookup("item", tokens, first_id=1)

    def user_index(self, tokens: Sequence) -> np.ndarray:
        """Raw user tokens -> user indices 0..U-1; an unknown token is a ValueError."""
        return self._lookup("user", tokens, first_id=0)

    def user_histories(self, users: np.ndarray, include_test: bool = True) -> Dict[str, torch.Tensor]:
        """Histories to recommend the NEXT item for users (indices): their last max_len items (all of them, test
        item included, when include_test; otherwise the test-time history). Returns item_seq/time_seq/lengths."""
        users = np.asarray(users, dtype=np.int64)
        starts = self.seq_offsets[users]
        end = self.seq_offsets[users + 1] - (0 if include_test else 1)
        h = gather_histories(self.seq_items, self.seq_times, end, starts, self.max_len)
        return {k: torch.from_numpy(v) for k, v in h.items()}

    def history_from_items(self, histories: Sequence[Sequence], times: Optional[Sequence[Sequence[float]]] = None
                           ) -> Dict[str, torch.Tensor]:
        """Batch of given histories (raw item tokens, oldest first) -> item_seq/time_seq/lengths tensors.

        times: unix seconds per history item (same shapes); without it all gaps are 0. Longer histories keep their
        last max_len items. Empty histories, unknown items and NaN times are ValueErrors."""
        seqs, ts = [], []
        for r, h in enumerate(histories):
            if len(h) == 0:
                raise ValueError(f"history {r} is empty")
            ids = self.item_index(h)
            t = np.zeros(len(ids)) if times is None else np.asarray(times[r], dtype=np.float64)
            if len(t) != len(ids):
                raise ValueError(f"history {r}: {len(ids)} items but {len(t)} timestamps")
            if not np.all(np.isfinite(t)):
                raise ValueError(f"history {r} has NaN/inf timestamps")
            seqs.append(ids)
            ts.append(t)
        counts = np.asarray([len(s) for s in seqs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        h = gather_histories(np.concatenate(seqs), np.concatenate(ts), offsets[1:], offsets[:-1], self.max_len)
        return {k: torch.from_numpy(v) for k, v in h.items()}

    def with_max_len(self, max_len: int) -> "SequentialData":
        """Rebuild the splits with another history window (in place); returns self."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = int(max_len)
        self._build_splits()
        return self

    def describe(self) -> str:
        return (f"{self.name}: {self.num_users} users, {self.num_items} items, {self.num_interactions} interactions "
                f"(avg len {self.num_interactions / max(self.num_users, 1):.2f}); samples train/valid/test = "
                f"{self.num_samples('train')}/{self.num_samples('valid')}/{self.num_samples('test')}")

    # ------------------------------------------------------------------ persistence
    def save(self, out_dir: Union[str, os.PathLike]) -> None:
        """Write a prepared-dataset dir: meta.json, sequences.safetensors, features.safetensors (if any)."""
        from safetensors.numpy import save_file
        os.makedirs(out_dir, exist_ok=True)
        meta = {"format": "mmm4rec-prepared-v1", "name": self.name, "time_origin": self.time_origin,
                "max_len": self.max_len, "short_users": self.short_users, "stats": self.stats,
                "item_tokens": self.item_tokens.tolist(), "user_tokens": self.user_tokens.tolist(),
                "domain_item_offsets": self.domain_item_offsets}
        with open(os.path.join(out_dir, "meta.json"), "w") as f:
            json.dump(meta, f)
        save_file({"seq_offsets": self.seq_offsets, "seq_items": self.seq_items, "seq_times": self.seq_times},
                  os.path.join(out_dir, "sequences.safetensors"))
        feats = {}
        if self.text_feats is not None:
            feats["text_feats"] = self.text_feats.detach().cpu().float().numpy()
        if self.image_feats is not None:
            feats["image_feats"] = self.image_feats.detach().cpu().float().numpy()
            feats["image_mask"] = self.image_mask.detach().cpu().numpy().astype(np.uint8)
        if feats:
            save_file(feats, os.path.join(out_dir, "features.safetensors"))

    @classmethod
    def load(cls, data_dir: Union[str, os.PathLike], max_len: Optional[int] = None) -> "SequentialData":
        """Read a dir written by save(); max_len overrides the stored history window."""
        from safetensors.numpy import load_file
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.exists(meta_path):
            raise ValueError(f"{data_dir} is not a prepared dataset dir (no meta.json); run `mmm4rec prepare` first")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            for key in ("name", "item_tokens", "user_tokens", "time_origin", "max_len", "short_users", "stats"):
                if key not in meta:
                    raise ValueError(f"missing key {key!r}")
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as e:
            raise ValueError(f"{meta_path} is corrupted ({e}); prepare the dataset again") from None

        def read(fname, required):
            path = os.path.join(data_dir, fname)
            if not os.path.exists(path):
                if required:
                    raise ValueError(f"{path}: no such file (the prepared dataset is incomplete)")
                return None
            try:
                return load_file(path)
            except Exception as e:  # SafetensorError on a truncated / foreign file
                raise ValueError(f"{path} is corrupted ({type(e).__name__}: {e}); prepare the dataset again") \
                    from None

        seq = read("sequences.safetensors", True)
        for key in ("seq_offsets", "seq_items", "seq_times"):
            if key not in seq:
                raise ValueError(f"{os.path.join(data_dir, 'sequences.safetensors')} has no tensor {key!r}")
        kw = {}
        feats = read("features.safetensors", False)
        if feats is not None:
            if "text_feats" in feats:
                kw["text_feats"] = torch.from_numpy(feats["text_feats"])
            if "image_feats" in feats:
                kw["image_feats"] = torch.from_numpy(feats["image_feats"])
                kw["image_mask"] = torch.from_numpy(feats["image_mask"].astype(bool))
        d = cls(meta["name"], np.asarray(meta["item_tokens"]), np.asarray(meta["user_tokens"]), seq["seq_offsets"],
                seq["seq_items"], seq["seq_times"], time_origin=meta["time_origin"],
                max_len=max_len or meta["max_len"], short_users=meta["short_users"], stats=meta["stats"], **kw)
        d.domain_item_offsets = meta.get("domain_item_offsets")
        return d


class BatchIterator:
    """Shuffled index-slice batches over a dict of equally long tensors (all on one device).

    Each epoch draws one permutation (torch.Generator seeded with seed + epoch, so runs are reproducible and epochs
    differ) and yields {name: tensor[perm[i:i+batch_size]]}; no per-sample Python. Every sample appears exactly once
    per epoch (the last batch may be short unless drop_last).
    """

    def __init__(self, tensors: Dict[str, torch.Tensor], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sizes = {len(v) for v in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors have different lengths: { {k: len(v) for k, v in tensors.items()} }")
        self.tensors = tensors
        self.n = sizes.pop()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.device = next(iter(tensors.values())).device

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int = 0, stop: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
        """Batches start..stop-1 of this epoch's order (the same permutation as a full pass), so a run stopped
        inside an epoch resumes where it stopped."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g).to(self.device, non_blocking=True)
        else:
            perm = None
        self.epoch += 1
        for b in range(start, len(self) if stop is None else min(stop, len(self))):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.n)
            if perm is None:
                yield {k: v[lo:hi] for k, v in self.tensors.items()}
            else:
                idx = perm[lo:hi]
                yield {k: v.index_select(0, idx) for k, v in self.tensors.items()}


def concat_domains(datasets: Sequence[SequentialData], name: str = "pretrain") -> SequentialData:
    """Multi-domain container for pre-training: item ids of domain d are offset by the item count of domains < d
    (global ids 1..sum I_d, 0 = padding), users are disjoint, feature matrices are stacked (a domain without image
    features contributes zero rows with image_mask False). `domain_item_offsets[d]` gives the offset.

    Raises ValueError if some domains have text features and others not, or feature widths differ."""
    if not datasets:
        raise ValueError("concat_domains needs at least one dataset")
    max_len = datasets[0].max_len
    item_tokens, user_tokens, items, times, counts, offs = [PAD_TOKEN], [], [], [], [], []
    off = 0
    for d in datasets:
        if d.max_len != max_len:
            raise ValueError(f"domains have different max_len ({d.max_len} vs {max_len})")
        offs.append(off)
        item_tokens += [f"{d.name}:{t}" for t in d.item_tokens[1:].tolist()]
        user_tokens += [f"{d.name}:{t}" for t in d.user_tokens.tolist()]
        items.append(d.seq_items + off)
        # keep each domain's absolute time (origins differ); re-based below
        times.append(d.seq_times + d.time_origin)
        counts.append(np.diff(d.seq_offsets))
        off += d.num_items
    t_all = np.concatenate(times)
    origin = float(t_all.min())
    counts = np.concatenate(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def stack(attr):
        mats = [getattr(d, attr) for d in datasets]
        if all(m is None for m in mats):
            return None
        widths = {m.shape[1] for m in mats if m is not None}
        if len(widths) != 1:
            raise ValueError(f"{attr} widths differ across domains: {widths}")
        w = widths.pop()
        rows = [torch.zeros(1, w)]
        for d, m in zip(datasets, mats):
            if m is None:
                if attr == "text_feats":
                    raise ValueError(f"domain {d.name!r} has no text features while others do")
                rows.append(torch.zeros(d.num_items, w))
            else:
                rows.append(m[1:].float())
        return torch.cat(rows)

    text = stack("text_feats")
    image = stack("image_feats")
    mask = None
    if image is not None:
        parts = [torch.zeros(1, dtype=torch.bool)]
        for d in datasets:
            parts.append(d.image_mask[1:] if d.image_mask is not None else torch.zeros(d.num_items, dtype=torch.bool))
        mask = torch.cat(parts)
    stats = {"domains": [d.name for d in datasets], "interactions": int(len(t_all))}
    out = SequentialData(name, np.asarray(item_tokens), np.asarray(user_tokens), offsets, np.concatenate(items),
                         t_all - origin, time_origin=origin, max_len=max_len,
                         short_users=datasets[0].short_users, text_feats=text, image_feats=image, image_mask=mask,
                         stats=stats)
    out.domain_item_offsets = offs
    return out
