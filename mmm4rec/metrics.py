"""Full-sort ranking metrics: Recall@K (= Hit@K with one target) and NDCG@K.

The target's rank is computed exactly from the score matrix (no top-K truncation, so any K works):
    rank = #{j : s_j > s_t} + #{j < t : s_j == s_t}          (0-based)
i.e. ties are broken deterministically in favour of the LOWER item id, the same order a stable descending sort gives.
Recall@K = 1[rank < K], NDCG@K = 1[rank < K] / log2(rank + 2). Column 0 (padding) should hold -inf.
Everything stays on the scores' device; only the final sums are moved to the host (once per evaluation).
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence

import torch

DEFAULT_KS = (10, 20, 50)


def target_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all columns.

    Args:
        scores: float [b, n] (full item scores, NaN not allowed); target: long [b] column indices.
    Returns:
        long [b] ranks (ties -> lower column id first).
    """
    if scores.dim() != 2 or target.dim() != 1 or scores.shape[0] != target.shape[0]:
        raise ValueError(f"scores must be [b, n] and target [b], got {tuple(scores.shape)} and {tuple(target.shape)}")
    target = target.to(scores.device).long()
    st = scores.gather(1, target[:, None])  # [b, 1]
    cols = torch.arange(scores.shape[1], device=scores.device)[None, :]
    better = (scores > st) | ((scores == st) & (cols < target[:, None]))
    return better.sum(1)


def metrics_from_ranks(ranks: torch.Tensor, ks: Iterable[int] = DEFAULT_KS) -> Dict[str, torch.Tensor]:
    """Per-sample metric tensors {recall@k, ndcg@k} (float [b], on ranks' device) from 0-based ranks [b]."""
    out = {}
    r = ranks.float()
    for k in ks:
        hit = (ranks < k).float()
        out[f"recall@{k}"] = hit
        out[f"ndcg@{k}"] = hit / torch.log2(r + 2.0)
    return out


class RankingAccumulator:
    """Counts target ranks over batches on device; `result()` syncs once and returns means as Python floats.

    It keeps an integer histogram of the ranks below max(ks) (`rank_counts` [max(ks)] int64) and the sample count, so
    Recall@K = sum(rank_counts[:K]) / count and NDCG@K = sum_r rank_counts[r] / log2(r + 2) / count (float64) do not
    depend on how the samples were batched or sharded over processes: merging two accumulators (or an all-reduce of
    `rank_counts` and `count` over ranks, see mmm4rec.distributed) gives exactly the single-pass numbers."""

    def __init__(self, ks: Sequence[int] = DEFAULT_KS):
        self.ks = tuple(ks)
        self.rank_counts: torch.Tensor = None       # int64 [max(ks)], allocated on the scores' device
        self.count = 0

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add one batch (scores [b, n], target [b]); returns the ranks [b]."""
        ranks = target_ranks(scores, target)
        top = max(self.ks)
        if self.rank_counts is None:
            self.rank_counts = torch.zeros(top, dtype=torch.int64, device=ranks.device)
        self.rank_counts += torch.bincount(ranks.clamp(max=top), minlength=top + 1)[:top]
        self.count += int(target.shape[0])
        return ranks

    def result(self) -> Dict[str, float]:
        if self.count == 0:
            raise ValueError("no samples were evaluated")
        counts = self.rank_counts.double().cpu()
        gain = 1.0 / torch.log2(torch.arange(len(counts), dtype=torch.float64) + 2.0)
        out = {}
        for k in self.ks:
            out[f"recall@{k}"] = float(counts[:k].sum()) / self.count
            out[f"ndcg@{k}"] = float((counts[:k] * gain[:k]).sum()) / self.count
        for k in self.ks:
            out[f"hit@{k}"] = out[f"recall@{k}"]
        return out


def full_sort_metrics(scores: torch.Tensor, target: torch.Tensor, ks: Iterable[int] = DEFAULT_KS
                      ) -> Dict[str, float]:
    """Mean Recall@K / NDCG@K (and hit@K = recall@K) for one score matrix [b, n] and targets [b]."""
    acc = RankingAccumulator(tuple(ks))
    acc.update(scores, target)
    return acc.result()


def topk_items(scores: torch.Tensor, k: int, exclude: torch.Tensor = None) -> torch.Tensor:
    """Top-k column ids [b, k] by descending score, ties to the lower id (stable), optional exclude mask [b, n]."""
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    k = min(k, scores.shape[1])
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
