"""mmm4rec.recbole: TimeAwareSSDRec inside RecBole's own data pipeline, trainer and full-sort evaluator.

Skips when RecBole is not installed (optional extra: pip install recbole==1.2.1).  One epoch on a slice of ML-100k
(the atomic files ship inside the recbole wheel): users with 20-25 interactions, history length 10."""
import math

import pytest
import torch

recbole = pytest.importorskip("recbole", reason="RecBole is an optional extra (pip install recbole==1.2.1)")

from mmm4rec.recbole import TimeAwareSSDRec, run  # noqa: E402

SLICE = dict(epochs=1, user_inter_num_interval="[20,25]", MAX_ITEM_LIST_LENGTH=10, hidden_size=16, d_state=8,
             headdim=8, inner_size=32, train_batch_size=256, eval_batch_size=4096, show_progress=False, seed=2020,
             ssd_backend="torch")


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # RecBole writes ./log and ./log_tensorboard
    return tmp_path


def test_adapter_runs_one_epoch_on_ml100k_slice_and_reads_the_time_list(in_tmp):
    result = run(TimeAwareSSDRec, "ml-100k", config_dict={**SLICE, "checkpoint_dir": str(in_tmp / "saved")})
    assert result["epochs"] == 1 and result["model"] == "TimeAwareSSDRec"
    for key in ("ndcg@10", "recall@10"):
        assert 0.0 <= result["test_result"][key] <= 1.0 and math.isfinite(result["test_result"][key])
    net = result["net"].eval()
    assert net.TIME_SEQ == "timestamp_list"
    items = torch.tensor([[5, 9, 3, 0], [7, 2, 0, 0]])
    lengths = torch.tensor([3, 2])
    times = torch.tensor([[1.0, 2.0, 50.0, 0.0], [3.0, 4.0, 0.0, 0.0]])
    with torch.no_grad():
        u = net(items, lengths, times)
        assert not torch.allclose(u[0], net(items, lengths, times * torch.tensor([1.0, 1.0, 0.02, 1.0]))[0])
        assert torch.equal(net(items, lengths, times + torch.tensor([0.0, 0.0, 0.0, 9.0]))[0], u[0])   # padding
    assert result["s_per_epoch"] > 0


class _Config(dict):
    def __missing__(self, key):          # RecBole's Config returns None for unset keys
        return None


class _Dataset:
    field2type = {"item_id": "token", "item_id_list": "token_seq"}

    def num(self, field):
        return 11


def test_adapter_without_time_list_raises_naming_it():
    config = _Config(USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", LIST_SUFFIX="_list", NEG_PREFIX="neg_",
                     ITEM_LIST_LENGTH_FIELD="item_length", MAX_ITEM_LIST_LENGTH=4, device="cpu",
                     TIME_FIELD="timestamp", hidden_size=16, d_state=8, headdim=8)
    with pytest.raises(ValueError, match="timestamp_list"):
        TimeAwareSSDRec(config, _Dataset())
    net = TimeAwareSSDRec(_Config(config, use_time=False), _Dataset())         # without time: plain SSD mixer
    assert net.TIME_SEQ is None and net.layers[0].mixer.d_state == 8


def test_recbole_model_import_leaves_anomaly_detection_off():
    """RecBole 1.2.1's sine.py calls torch.autograd.set_detect_anomaly(True) when its models are imported; our
    import path restores the previous setting (off)."""
    pytest.importorskip("recbole")
    from mmm4rec.recbole import import_recbole_models
    import_recbole_models()
    assert not torch.is_anomaly_enabled()
