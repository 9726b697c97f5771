"""Full-sort Recall@K / NDCG@K against hand-computed values, ties and rank edge cases."""
import math

import pytest
import torch

from mmm4rec.metrics import RankingAccumulator, full_sort_metrics, metrics_from_ranks, target_ranks, topk_items

NEG = float("-inf")


def test_ranks_by_hand():
    s = torch.tensor([[NEG, 0.9, 0.1, 0.5, 0.3],    # target 3 (0.5): only 0.9 above -> rank 1
                      [NEG, 0.2, 0.2, 0.2, 0.1],    # target 2 ties with item 1 (lower id first) -> rank 1
                      [NEG, 0.2, 0.2, 0.2, 0.1],    # target 1 wins its tie -> rank 0
                      [NEG, 0.9, 0.8, 0.7, 0.1]])   # target 4 is last -> rank 3
    t = torch.tensor([3, 2, 1, 4])
    assert target_ranks(s, t).tolist() == [1, 1, 0, 3]


def test_metrics_by_hand():
    s = torch.tensor([[NEG, 0.9, 0.1, 0.5, 0.3], [NEG, 0.9, 0.8, 0.7, 0.1]])
    m = full_sort_metrics(s, torch.tensor([3, 4]), ks=(1, 2, 4))
    assert m["recall@1"] == 0.0 and m["recall@2"] == 0.5 and m["recall@4"] == 1.0
    assert m["ndcg@2"] == pytest.approx(0.5 * (1 / math.log2(3)))
    assert m["ndcg@4"] == pytest.approx(0.5 * (1 / math.log2(3) + 1 / math.log2(5)))
    assert m["hit@2"] == m["recall@2"]


def test_rank_edges_and_k_larger_than_items():
    ranks = torch.tensor([0, 9, 10, 49, 50, 1000])
    m = metrics_from_ranks(ranks, ks=(10, 50))
    assert m["recall@10"].tolist() == [1, 1, 0, 0, 0, 0] and m["recall@50"].tolist() == [1, 1, 1, 1, 0, 0]
    assert m["ndcg@10"][0] == 1.0 and m["ndcg@10"][1] == pytest.approx(1 / math.log2(11))
    assert m["ndcg@50"][3] == pytest.approx(1 / math.log2(51)) and m["ndcg@50"][4] == 0.0
    # fewer items than K: every target is a hit
    s = torch.randn(3, 6)
    s[:, 0] = NEG
    assert full_sort_metrics(s, torch.tensor([1, 2, 5]), ks=(10, 20, 50))["recall@10"] == 1.0


def test_all_ties_and_padding_column():
    s = torch.zeros(2, 5)
    s[:, 0] = NEG
    assert target_ranks(s, torch.tensor([1, 4])).tolist() == [0, 3]  # deterministic: lower id first


def test_accumulator_batches_equal_one_shot():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(100, 300, generator=g)
    s[:, 0] = NEG
    t = torch.randint(1, 300, (100,), generator=g)
    acc = RankingAccumulator()
    for lo in range(0, 100, 33):
        acc.update(s[lo:lo + 33], t[lo:lo + 33])
    one = full_sort_metrics(s, t)
    assert acc.result() == one          # exact: integer rank counts do not depend on the batching
    per_sample = metrics_from_ranks(target_ranks(s, t))
    assert one == pytest.approx({**{k: float(v.double().mean()) for k, v in per_sample.items()},
                                 **{f"hit@{k}": float(per_sample[f"recall@{k}"].mean()) for k in (10, 20, 50)}})
    # matches a sort-based reference
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    ref_rank = (order == t[:, None]).float().argmax(1)
    assert torch.equal(target_ranks(s, t), ref_rank)


def test_topk_and_bad_shapes():
    s = torch.tensor([[NEG, 0.5, 0.5, 0.9]])
    assert topk_items(s, 2).tolist() == [[3, 1]]
    assert topk_items(s, 2, exclude=torch.tensor([[True, False, False, True]])).tolist() == [[1, 2]]
    with pytest.raises(ValueError):
        target_ranks(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        RankingAccumulator().result()
