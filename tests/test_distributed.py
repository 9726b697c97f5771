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
    # rank counts: rank r evaluates its own score rows; the all-reduced accumulator equals one pass over all rows
    from mmm4rec.metrics import RankingAccumulator
    g = torch.Generator().manual_seed(5)
    scores, target = torch.randn(30, 40, generator=g), torch.randint(1, 40, (30,), generator=g)
    lo_s, hi_s = D.shard_slice(30, ctx.rank, ctx.world_size)
    acc = RankingAccumulator()
    if hi_s > lo_s:
        acc.update(scores[lo_s:hi_s], target[lo_s:hi_s])
    one = RankingAccumulator()
    one.update(scores, target)
    ids, offset = D.gather_rows(torch.arange(rows_by_rank[ctx.rank]) + 10 * ctx.rank, ctx)
    return {"full": full.detach(), "grad": mine.grad, "w_block": w[lo:lo + rows_by_rank[ctx.rank]],
            "mine": mine.detach(), "merged": D.all_reduce_accumulator(acc, ctx).result(), "one": one.result(),
            "mean": float(D.all_reduce_mean(torch.tensor(float(ctx.rank)), ctx)), "ids": ids.tolist(),
            "offset": offset, "flag": D.broadcast_flag(ctx.rank == 0, ctx)}


def test_gather_with_grad_and_metric_all_reduce():
    rows = [3, 1]
    out = run_ranks(_collectives, 2, rows)
    expected_full = torch.cat([o["mine"] for o in out])
    for o in out:
        torch.testing.assert_close(o["full"], expected_full)
        # each rank's gradient is the weight block of its own rows (the backward all-reduce sums both ranks' graphs;
        # here only the values matter: every rank built the same loss, so the sum is world_size * block)
        torch.testing.assert_close(o["grad"], 2 * o["w_block"])
        assert o["merged"] == o["one"]                  # exact
        assert o["mean"] == 0.5 and o["ids"] == [0, 1, 2, 10] and o["flag"] is True
    assert [o["offset"] for o in out] == [0, 3]


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


# ------------------------------------------------------------------------------------------- Trainer under DDP
def _tiny_setup(max_len=5):
    from mmm4rec.data import make_synthetic_dataset
    from mmm4rec.model import MMM4RecConfig
    from mmm4rec.train import build_model
    data = make_synthetic_dataset(40, 25, 400, feat_dim=8, seed=0, stay_prob=0.8).to_sequential(max_len=max_len)
    cfg = MMM4RecConfig(hidden_size=16, headdim=8, d_state=4, ngroups=1, ffn_inner=16, max_len=max_len,
                        dropout=0.0, time_dropout=0.0, time_mlp_dropout=0.0, backend="torch", path="quadratic",
                        feat_dim=8)
    torch.manual_seed(0)
    model = build_model(cfg, data).double()
    return data, model


def _train_few(ctx, mode, grad_accum, negatives, out_dir=None, resume=False, max_batches=None, validate=True):
    from mmm4rec.train import Trainer
    data, model = _tiny_setup()
    tr = Trainer(model, data, lr=1e-2, batch_size=37, grad_accum=grad_accum, epochs=1, patience=5, mode=mode,
                 seed=3, device="cpu", progress=False, distributed=ctx, inbatch_negatives=negatives,
                 out_dir=out_dir, max_total_batches=max_batches, checkpoint_every_s=None, validate=validate)
    if resume:
        assert tr.resume()
    summary = tr.fit()
    state = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    out = {"state": state, "valid": tr.evaluate("valid") if validate else None, "test": summary.get("test"),
           "log": [e.get("loss") for e in tr.log], "batches": tr.total_batches}
    tr.close()          # frees the DDP wrapper on every rank before the process group goes (see Trainer.close)
    return out


def _ddp_entry(ctx, mode, grad_accum, negatives, out_dir, resume, max_batches, validate=True):
    return _train_few(ctx, mode, grad_accum, negatives, out_dir, resume, max_batches, validate)


@pytest.mark.parametrize("mode,grad_accum,negatives", [("full", 2, "local"), ("inbatch", 1, "global")])
def test_two_ranks_train_like_one_process(mode, grad_accum, negatives):
    """2 gloo ranks x (global batch 37 split 19 + 18) == one process on the same global batches: same parameters
    (float64, 1e-9), same losses, and sharded evaluation == single-process evaluation exactly."""
    single = _train_few(D.DistContext(), mode, grad_accum, "local", None, False, None)
    ranks = run_ranks(_ddp_entry, 2, mode, grad_accum, negatives, None, False, None)
    for r in ranks:
        for k, v in single["state"].items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-9, atol=1e-11, msg=k)
        assert r["valid"] == single["valid"]                       # exact: integer rank counts
        assert r["test"] == single["test"]
        assert r["log"] == pytest.approx(single["log"], rel=1e-6)  # the epoch-loss accumulator is float32


def test_resume_on_another_world_size(tmp_path):
    """Stop a 2-rank run after 3 batches (rank 0 writes last/), resume it in ONE process: the same parameters as
    an uninterrupted single-process run (validate=False: the newest weights are the result, not the best ones)."""
    full = _train_few(D.DistContext(), "full", 1, "local", None, False, None, validate=False)
    out = str(tmp_path / "run")
    run_ranks(_ddp_entry, 2, "full", 1, "local", out, False, 3, False)
    assert os.path.exists(os.path.join(out, "last", "trainer.pt"))
    resumed = _train_few(D.DistContext(), "full", 1, "local", out, True, None, validate=False)
    assert resumed["batches"] == full["batches"]
    for k, v in full["state"].items():  # a stop + resume in one process differs from one run by ~1e-10 too
        torch.testing.assert_close(resumed["state"][k], v, rtol=1e-7, atol=1e-9, msg=k)


@pytest.mark.slow          # two torchrun processes, ~25 s: CI runs it with -m slow
def test_cli_finetune_under_torchrun(tmp_path):
    """docs/distributed.md's multi-process command as written, on CPU: `torchrun --nproc_per_node=2 -m mmm4rec finetune ...`;
    rank 0 alone prints and writes; the run is resumable by a single process."""
    import shutil
    import subprocess
    import sys
    if shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable),
                                                                            "torchrun")):
        pytest.skip("torchrun is not on PATH")
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    subprocess.run([sys.executable, "-m", "mmm4rec", "prepare", "--demo", "--demo-size", "tiny", "--out", data],
                   check=True, env=env, capture_output=True, cwd=str(tmp_path))
    p = subprocess.run([torchrun, "--nproc_per_node=2", "-m", "mmm4rec", "finetune", "--data", data, "--out", out,
                        "--preset", "cpu", "--epochs", "1", "--quiet"], env=env, capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("run files in") == 1 and "x 2 ranks (DDP" in p.stdout   # rank 0 alone speaks
    assert os.path.exists(os.path.join(out, "last", "trainer.pt")) and os.path.exists(os.path.join(out, "best"))
    p2 = subprocess.run([sys.executable, "-m", "mmm4rec", "finetune", "--data", data, "--out", out, "--preset", "cpu",
                         "--epochs", "2", "--resume", "--quiet"], env=env, capture_output=True, text=True,
                        cwd=str(tmp_path), timeout=300)
    assert p2.returncode == 0, p2.stderr[-2000:]
    assert "resumed from" in p2.stdout and '"epochs_run": 2' in p2.stdout
