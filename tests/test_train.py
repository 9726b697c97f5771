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
                time_dropout=0.0, backend="torch", path="quadratic", feat_dim=16)
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
    assert torch.equal(tr2.model.state_dict()["co_norm.weight"], tr.model.state_dict()["co_norm.weight"])
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


def test_compiled_step_matches_eager(data):
    """Trainer(compile=True): torch.compile around the model's loss (kernels stay opaque) trains like eager."""
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
