"""Trainer on the real MMM4Rec (tiny config, CPU, backend="torch"): loss goes down, accumulation, checkpoints,
resume, pre-training over two domains and transfer into a third."""
import json
import os

import pytest
import torch

from mmm4rec.data import concat_domains, make_synthetic_dataset
from mmm4rec.model import MMM4RecConfig
from mmm4rec.train import Trainer, build_model, evaluate_model, load_checkpoint, load_pretrained, popularity_metrics


def tiny_config(**kw):
    base = dict(hidden_size=16, headdim=8, d_state=8, ngroups=1, ffn_inner=16, max_len=5, dropout=0.0,
                time_dropout=0.0, time_mlp_dropout=0.0, backend="torch", path="quadratic", feat_dim=16)
    base.update(kw)
    return MMM4RecConfig(**base)


@pytest.fixture(scope="module")
def data():
    # topics change rarely (stay_prob 0.9): the next item is easy to guess from the history
    return make_synthetic_dataset(60, 30, 600, feat_dim=16, seed=0, stay_prob=0.9).to_sequential(max_len=5)


def test_loss_decreases_and_accumulation(data):
    torch.manual_seed(0)
    model = build_model(tiny_config(), data)
    tr = Trainer(model, data, lr=5e-3, batch_size=128, grad_accum=2, epochs=3, progress=False, seed=0)
    losses = []
    for _ in range(3):
        secs = tr.train_epoch()
        assert secs > 0
        losses.append(tr.last_loss)
    assert losses[-1] < losses[0] - 0.1, losses
    nb = -(-data.num_samples("train") // 128)
    step = next(iter(tr.optimizer.state.values()))["step"]
    assert int(step) == 3 * (-(-nb // 2))  # one optimizer step per 2 batches (+ the epoch's last partial group)
    m = tr.evaluate("valid")
    assert set(m) >= {"ndcg@10", "recall@10", "ndcg@50"} and 0 <= m["ndcg@10"] <= m["recall@10"] <= 1
    assert popularity_metrics(data)["recall@50"] == 1.0  # only 30 items


def test_fit_checkpoint_and_resume(data, tmp_path):
    torch.manual_seed(1)
    out = str(tmp_path / "run")
    tr = Trainer(build_model(tiny_config(), data), data, lr=5e-3, batch_size=256, epochs=1, progress=False,
                 out_dir=out)
    summary = tr.fit()
    assert summary["best_epoch"] == 1 and "test" in summary
    for f in ("best/model.safetensors", "best/config.json", "last/trainer.pt", "log.json", "summary.json"):
        assert os.path.exists(os.path.join(out, f)), f
    log = json.load(open(os.path.join(out, "log.json")))
    assert log[0]["epoch"] == 1 and "ndcg@10" in log[0]["valid"] and log[0]["epoch_seconds"] > 0
    # the best checkpoint rebuilds to the same model
    again = load_checkpoint(os.path.join(out, "best"), data, device="cpu")
    assert evaluate_model(again, data, "test") == pytest.approx(summary["test"])
    # resume: a fresh trainer continues at epoch 1 and runs epoch 2 only
    tr2 = Trainer(build_model(tiny_config(), data), data, lr=5e-3, batch_size=256, epochs=2, progress=False,
                  out_dir=out)
    assert tr2.resume() and tr2.epoch == 1
    assert torch.equal(tr2.model.state_dict()["co_norm.0.weight"], tr.model.state_dict()["co_norm.0.weight"])
    tr2.fit()
    assert [e["epoch"] for e in json.load(open(os.path.join(out, "log.json")))] == [1, 2]
    with pytest.raises(ValueError, match="items"):
        load_checkpoint(os.path.join(out, "best"), make_synthetic_dataset(20, 12, 200, feat_dim=16, seed=3)
                        .to_sequential(max_len=5))


def test_pretrain_then_transfer(tmp_path):
    a = make_synthetic_dataset(40, 20, 300, feat_dim=16, seed=1, name="A").to_sequential(max_len=5)
    b = make_synthetic_dataset(40, 25, 300, feat_dim=16, seed=2, name="B", image_coverage=0.0).to_sequential(
        max_len=5)
    both = concat_domains([a, b])
    torch.manual_seed(2)
    pre = build_model(tiny_config(n_layers=2), both)
    tr = Trainer(pre, both, lr=2.5e-4, batch_size=256, epochs=1, mode="inbatch", validate=False, progress=False,
                 out_dir=str(tmp_path / "pre"))
    assert tr.fit()["best_epoch"] == 1
    c = make_synthetic_dataset(30, 15, 240, feat_dim=16, seed=3, name="C").to_sequential(max_len=5)
    ft = build_model(tiny_config(n_layers=2), c)
    missing, unexpected = load_pretrained(ft, str(tmp_path / "pre" / "best"))
    assert missing == [] and unexpected == []
    for k, v in ft.state_dict_for_transfer().items():
        assert torch.equal(v, pre.state_dict()[k].cpu()), k
    with pytest.raises(ValueError, match="metric"):
        Trainer(ft, c, metric="mrr@10")


@pytest.mark.slow          # inductor compiles the loss: ~1 min on 2 cores
def test_compiled_step_matches_eager(data):
    """Trainer(compile=True): torch.compile(fullgraph=True) of the model's loss (one graph, our kernels as
    registered ops) trains like eager."""
    runs = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_config(), data)
        tr = Trainer(model, data, lr=5e-3, batch_size=128, epochs=1, progress=False, seed=0, max_batches=2,
                     compile=compile_)
        tr.train_epoch()
        runs.append((tr.last_loss, torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert abs(runs[0][0] - runs[1][0]) < 1e-4 * abs(runs[0][0])
    assert ((runs[0][1] - runs[1][1]).norm() / runs[0][1].norm()).item() < 1e-4


def _grads_at_step(data, reduction, accum):
    """Gradients the optimizer sees at its first step (max_batches = accum micro-batches, dropout 0)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(), data)
    tr = Trainer(model, data, lr=1e-3, batch_size=64, grad_accum=accum, epochs=1, progress=False, seed=0,
                 max_batches=accum, loss_reduction=reduction)
    seen = []
    real = tr.optimizer.step
    tr.optimizer.step = lambda *a, **k: (seen.append([p.grad.clone() for p in model.parameters()
                                                      if p.grad is not None]), real(*a, **k))[1]
    tr.train_epoch()
    assert len(seen) == 1
    return torch.cat([g.flatten() for g in seen[0]])


def test_loss_reduction_official_sum(data):
    """Default (official): accumulated micro-batch gradients add up; mean_over_accum divides them by grad_accum."""
    g_sum = _grads_at_step(data, "sum_over_accum", 3)
    g_mean = _grads_at_step(data, "mean_over_accum", 3)
    assert g_sum.norm() > 0
    assert ((g_sum - 3 * g_mean).norm() / g_sum.norm()).item() < 1e-5
    assert Trainer.__init__.__kwdefaults__["loss_reduction"] == "sum_over_accum"
    with pytest.raises(ValueError, match="loss_reduction"):
        Trainer(build_model(tiny_config(), data), data, loss_reduction="mean")


def test_batch_budget_then_resume_equals_one_run(data, tmp_path):
    """A run stopped by max_total_batches inside an epoch and resumed ends with the same weights as one
    uninterrupted epoch (same batch order, optimizer state, position)."""
    def fresh(out, **kw):
        torch.manual_seed(3)
        return Trainer(build_model(tiny_config(), data), data, lr=5e-3, batch_size=128, epochs=1, progress=False,
                       seed=0, out_dir=out, **kw)
    one = fresh(str(tmp_path / "one"))
    one.fit()
    out = str(tmp_path / "two")
    a = fresh(out, max_total_batches=2)
    s = a.fit()
    assert s["stopped_by"] == "batch budget" and s["total_batches"] == 2 and s["epochs_run"] == 0
    log = json.load(open(os.path.join(out, "log.json")))
    assert log[-1]["partial"] and 0 < log[-1]["epoch"] < 1 and "valid" in log[-1]
    assert os.path.exists(os.path.join(out, "convergence.png")) and os.path.exists(os.path.join(out, "best"))
    b = fresh(out)
    assert b.resume() and b.batch_in_epoch == 2
    s = b.fit()
    assert s["epochs_run"] == 1 and s["total_batches"] == one.total_batches
    # fit() reloads best/ into the model: compare the last/ weights of both runs
    from safetensors.torch import load_file
    wa = load_file(os.path.join(str(tmp_path / "one"), "last", "model.safetensors"))
    wb = load_file(os.path.join(out, "last", "model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6), k


def test_time_budget_and_periodic_checkpoint(data, tmp_path):
    out = str(tmp_path / "t")
    torch.manual_seed(0)
    tr = Trainer(build_model(tiny_config(), data), data, lr=5e-3, batch_size=16, epochs=50, progress=False,
                 out_dir=out, time_budget_s=1e-3, checkpoint_every_s=0.0)
    s = tr.fit()
    assert s["stopped_by"] == "time budget" and s["total_batches"] >= 1 and "test" in s
    assert os.path.exists(os.path.join(out, "last", "trainer.pt"))


def test_checkpoint_write_is_atomic(data, tmp_path, monkeypatch):
    """A crash while writing last/ leaves the previous last/ complete and loadable."""
    out = str(tmp_path / "a")
    torch.manual_seed(0)
    tr = Trainer(build_model(tiny_config(), data), data, lr=5e-3, batch_size=256, epochs=1, progress=False,
                 out_dir=out)
    tr.fit()
    before = open(os.path.join(out, "last", "model.safetensors"), "rb").read()
    real = torch.save

    def crash(obj, f, *a, **k):
        real(obj, f, *a, **k)
        raise OSError("disk full")      # the trainer.pt of the new checkpoint is written, then the crash
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        tr.save_last()
    monkeypatch.setattr(torch, "save", real)
    assert open(os.path.join(out, "last", "model.safetensors"), "rb").read() == before
    tr2 = Trainer(build_model(tiny_config(), data), data, lr=5e-3, batch_size=256, epochs=1, progress=False,
                  out_dir=out)
    assert tr2.resume() and tr2.epoch == 1


def test_exclude_seen_evaluation_and_popularity(data):
    torch.manual_seed(0)
    model = build_model(tiny_config(), data)
    full = evaluate_model(model, data, "test", 32)
    excl = evaluate_model(model, data, "test", 32, exclude_seen=True)
    assert full != excl
    # brute force: per-user python loop over the same scores
    from mmm4rec.metrics import target_ranks
    sp = data.tensors("test")
    with torch.no_grad():
        scores = model.eval().full_scores(model.encode(sp["item_seq"], sp["time_seq"], sp["lengths"]))
    for r in range(len(scores)):
        u = int(sp["user"][r])
        seen = data.seq_items[data.seq_offsets[u]:data.seq_offsets[u + 1] - 1]   # all but the test target
        scores[r, torch.from_numpy(seen)] = float("-inf")
    ranks = target_ranks(scores, sp["target"])
    assert excl["recall@10"] == pytest.approx(float((ranks < 10).float().mean()), abs=1e-6)
    p_all, p_ex = popularity_metrics(data), popularity_metrics(data, exclude_seen=True)
    assert p_all["recall@50"] == 1.0 and p_ex["recall@10"] != p_all["recall@10"]
