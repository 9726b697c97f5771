"""torch.distributed helpers on CPU with gloo (2 processes via torch.multiprocessing): sharding, metric all-reduce,
gather with gradients, the data-agreement check."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmm4rec import distributed as D


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world, *args):
    """Run fn(rank, world, tmpfile, *args) in `world` gloo processes; return each rank's result (torch.save'd)."""
    import tempfile
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, port, tmp, fn, args), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world)]


def _entry(rank, world, port, tmp, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = D.init_distributed("cpu", timeout_s=60)
    try:
        torch.save(fn(ctx, *args), os.path.join(tmp, f"{rank}.pt"))
    finally:
        D.shutdown(ctx)


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (8, 3), (5, 8)])
def test_shard_slice_covers_everything_once(n, world):
    parts = [D.shard_slice(n, r, world) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    sizes = [hi - lo for lo, hi in parts]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_context_is_a_no_op(monkeypatch):
    for v in D.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    ctx = D.init_distributed("cpu")
    assert not ctx.distributed and ctx.is_main and ctx.world_size == 1
    batch = {"x": torch.arange(5)}
    assert D.shard_batch(batch, ctx) == (batch, 1.0)
    t = torch.randn(3, 2)
    assert D.gather_with_grad(t, ctx) is t


def test_torchrun_env_without_master_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        D.init_distributed("cpu")


def _collectives(ctx, rows_by_rank):
    # gather_with_grad: uneven rows; grad of sum(w * gathered) w.r.t. this rank's rows must be w's block
    torch.manual_seed(100 + ctx.rank)
    mine = torch.randn(rows_by_rank[ctx.rank], 3, dtype=torch.float64, requires_grad=True)
    full = D.gather_with_grad(mine, ctx)
    torch.manual_seed(7)
    w = torch.randn(sum(rows_by_rank), 3, dtype=torch.float64)
    (full * w).sum().backward()
    lo = sum(rows_by_rank[:ctx.rank])
    # metric sums: every rank contributes its rank+1 samples
    sums = {"ndcg@10": torch.tensor(float(ctx.rank + 1)), "recall@10": torch.tensor(2.0 * ctx.rank)}
    red, count = D.all_reduce_metrics(sums, ctx.rank + 1, ctx)
    return {"full": full.detach(), "grad": mine.grad, "w_block": w[lo:lo + rows_by_rank[ctx.rank]],
            "mine": mine.detach(), "sums": {k: float(v) for k, v in red.items()}, "count": count,
            "flag": D.broadcast_flag(ctx.rank == 0, ctx)}


def test_gather_with_grad_and_metric_all_reduce():
    rows = [3, 1]
    out = run_ranks(_collectives, 2, rows)
    expected_full = torch.cat([o["mine"] for o in out])
    for o in out:
        torch.testing.assert_close(o["full"], expected_full)
        # each rank's gradient is the weight block of its own rows (the backward all-reduce sums both ranks' graphs;
        # here only the values matter: every rank built the same loss, so the sum is world_size * block)
        torch.testing.assert_close(o["grad"], 2 * o["w_block"])
        assert o["sums"] == {"ndcg@10": 3.0, "recall@10": 2.0} and o["count"] == 3
        assert o["flag"] is True


def _fingerprint(ctx, n_items_by_rank):
    from mmm4rec.data import make_synthetic_dataset
    data = make_synthetic_dataset(20, n_items_by_rank[ctx.rank], 150, feat_dim=4, seed=0).to_sequential(max_len=5)
    try:
        D.check_same_data(data, ctx)
        return "ok"
    except RuntimeError as e:
        return str(e)


def test_ranks_that_disagree_on_data_fail_clearly():
    assert run_ranks(_fingerprint, 2, [15, 15]) == ["ok", "ok"]
    out = run_ranks(_fingerprint, 2, [15, 16])
    assert all("ranks disagree on the data" in o for o in out)
