"""RecBole adapter: `TimeAwareSSDRec`, a RecBole SequentialRecommender built on mmm4rec_kernels.modules.TimeAwareSSD.

    pip install recbole==1.2.1 "pandas<3"     # pandas 3 silently skips RecBole 1.2.1's in-place NaN filling
    python -m mmm4rec.recbole --dataset ml-100k --epochs 5            # ML-100k ships inside the recbole wheel
    # in a script:
    from mmm4rec.recbole import TimeAwareSSDRec, run
    result = run(TimeAwareSSDRec, "ml-100k", config_dict={"epochs": 5, "use_time": True})

The model reads RecBole's item sequence (`item_id_list`, right padded, `item_length`) and the history list of the
TIME_FIELD (`timestamp_list`, built by RecBole's sequential augmentation when the time field is loaded): the
timestamps of the HISTORY items only, never the target's.  Architecture (Mamba4Rec-like): item embedding ->
LayerNorm -> Dropout -> n_layers x [TimeAwareSSD -> Dropout -> residual LayerNorm -> FFN (GELU) -> residual
LayerNorm] -> output at the last valid position; CE loss over all items (or BPR with negative sampling).

RecBole's `run_recbole` looks models up by name inside RecBole (and its quick_start imports ray, which needs
setuptools' pkg_resources); `run` below is the same pipeline (Config -> create_dataset -> data_preparation ->
trainer.fit -> trainer.evaluate) for a model class or a RecBole model name, and records seconds per epoch.
RecBole stores float fields as float32: raw unix seconds (~1e9) are then rounded to 64-128 s steps; with its
default `normalize_all: True` (ML-100k) the times are min-max scaled first, which the default (unit-free) time
encoding handles.  `run` also sets what RecBole 1.2.1 needs on new stacks: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
(torch >= 2.6 refuses its checkpoints otherwise) and NumPy 2 aliases (`numpy2_shims`), and imports RecBole's models
through `import_recbole_models`, which undoes RecBole 1.2.1's global `set_detect_anomaly(True)` (sine.py, at import).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
import torch.nn as nn

try:
    from recbole.model.abstract_recommender import SequentialRecommender
    from recbole.model.loss import BPRLoss
    from recbole.utils import InputType
    RECBOLE_IMPORT_ERROR = None
except ImportError as exc:  # recbole is an optional extra
    SequentialRecommender, BPRLoss, InputType = nn.Module, None, None
    RECBOLE_IMPORT_ERROR = exc

from mmm4rec_kernels.modules import TimeAwareSSD

logger = logging.getLogger(__name__)

# Model settings read from the RecBole config (config_dict / yaml); these are the defaults.
DEFAULTS = dict(hidden_size=64, n_layers=1, d_state=32, headdim=32, expand=2, d_conv=4, ngroups=1, d_skip="delta",
                dropout_prob=0.2, inner_size=256, layer_norm_eps=1e-12, initializer_range=0.02, loss_type="CE",
                use_time=True, time_encoding="paper", ssd_backend="auto", ssd_path="auto")


def _require_recbole():
    if RECBOLE_IMPORT_ERROR is not None:
        raise ImportError(f"mmm4rec.recbole needs RecBole: pip install recbole==1.2.1 ({RECBOLE_IMPORT_ERROR})")


class _Layer(nn.Module):
    """h -> LN(h + Dropout(TimeAwareSSD(h, t))) -> LN(. + Dropout(FFN(.)))."""

    def __init__(self, d_model, inner, dropout, eps, **ssd_kwargs):
        super().__init__()
        self.mixer = TimeAwareSSD(d_model, **ssd_kwargs)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(d_model, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, d_model))
        self.ffn_norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h, times, lengths):
        h = self.norm(h + self.dropout(self.mixer(h, times, lengths=lengths)))
        return self.ffn_norm(h + self.dropout(self.ffn(h)))


class TimeAwareSSDRec(SequentialRecommender):
    """RecBole sequential recommender on TimeAwareSSD; config keys in DEFAULTS (use_time=False: no timestamps)."""

    input_type = InputType.POINTWISE if InputType is not None else None

    def __init__(self, config, dataset):
        _require_recbole()
        super().__init__(config, dataset)
        get = lambda k: config[k] if config[k] is not None else DEFAULTS[k]  # noqa: E731
        self.hidden_size, self.loss_type, self.use_time = get("hidden_size"), get("loss_type"), bool(get("use_time"))
        self.initializer_range = get("initializer_range")
        self.TIME_SEQ = None
        if self.use_time:
            time_field = config["TIME_FIELD"]
            self.TIME_SEQ = f"{time_field}{config['LIST_SUFFIX']}" if time_field else None
            if self.TIME_SEQ is None or self.TIME_SEQ not in dataset.field2type:
                raise ValueError(f"use_time=True needs RecBole's TIME_FIELD history list (TIME_FIELD={time_field!r} "
                                 f"-> {self.TIME_SEQ!r}), which this dataset lacks: set TIME_FIELD and load it "
                                 f"(load_col: inter: [..., timestamp]) or set use_time=False")
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.emb_norm = nn.LayerNorm(self.hidden_size, eps=get("layer_norm_eps"))
        self.emb_dropout = nn.Dropout(get("dropout_prob"))
        ssd = dict(d_state=get("d_state"), headdim=get("headdim"), expand=get("expand"), d_conv=get("d_conv"),
                   ngroups=get("ngroups"), d_skip=get("d_skip"), time_encoding=get("time_encoding"),
                   backend=get("ssd_backend"), path=get("ssd_path"))
        self.layers = nn.ModuleList(_Layer(self.hidden_size, get("inner_size"), get("dropout_prob"),
                                           get("layer_norm_eps"), **ssd) for _ in range(get("n_layers")))
        if self.loss_type == "BPR":
            self.loss_fct = BPRLoss()
        elif self.loss_type == "CE":
            self.loss_fct = nn.CrossEntropyLoss()
        else:
            raise ValueError(f"loss_type must be 'CE' or 'BPR', got {self.loss_type!r}")
        nn.init.normal_(self.item_embedding.weight, std=self.initializer_range)

    def forward(self, item_seq, item_seq_len, time_seq=None):
        """item_seq [b, L] (right padded, 0 = pad), item_seq_len [b], time_seq [b, L] or None -> [b, hidden]."""
        h = self.emb_dropout(self.emb_norm(self.item_embedding(item_seq)))
        for layer in self.layers:
            h = layer(h, time_seq, item_seq_len)
        return self.gather_indexes(h, item_seq_len - 1)

    def _user(self, interaction):
        times = interaction[self.TIME_SEQ] if self.use_time else None
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], times)

    def calculate_loss(self, interaction):
        seq_output = self._user(interaction)
        pos_items = interaction[self.POS_ITEM_ID]
        if self.loss_type == "BPR":
            neg_items = interaction[self.NEG_ITEM_ID]
            pos = (seq_output * self.item_embedding(pos_items)).sum(-1)
            neg = (seq_output * self.item_embedding(neg_items)).sum(-1)
            return self.loss_fct(pos, neg)
        return self.loss_fct(seq_output @ self.item_embedding.weight.T, pos_items)

    def predict(self, interaction):
        seq_output = self._user(interaction)
        return (seq_output * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        return self._user(interaction) @ self.item_embedding.weight.T


def import_recbole_models():
    """Import recbole.model.sequential_recommender (every RecBole sequential model, what get_model("SASRec") loads)
    without its side effect: RecBole 1.2.1's sine.py calls torch.autograd.set_detect_anomaly(True) at import, which
    makes every later backward in the process slower (a stack trace per op, a NaN check per gradient) and turns NaNs
    that are masked away afterwards into errors.  The previous anomaly setting is restored (and the reset logged)."""
    before = torch.is_anomaly_enabled()
    import recbole.model.sequential_recommender  # noqa: F401
    if torch.is_anomaly_enabled() != before:
        torch.autograd.set_detect_anomaly(before)
        logger.info("RecBole's import turned autograd anomaly detection on; restored it to %s", before)


def numpy2_shims():
    """RecBole 1.2.1's Config aliases np.float_ / np.complex_ / np.unicode_, which NumPy 2 removed: restore them
    (as np.float64 / np.complex128 / np.str_) when missing.  Nothing changes on NumPy 1."""
    import numpy as np
    for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if not hasattr(np, old):
            setattr(np, old, new)


def bundled_data_path():
    """RecBole's wheel ships ML-100k under recbole/dataset_example/ (no download needed)."""
    import recbole
    return os.path.join(os.path.dirname(recbole.__file__), "dataset_example")


def run(model=TimeAwareSSDRec, dataset="ml-100k", config_dict=None, config_file_list=None, saved=False):
    """RecBole's run_recbole pipeline for a model class (or a built-in model name such as "SASRec").

    Returns {'best_valid_score', 'best_valid_result', 'test_result', 'epochs', 's_per_epoch', 'cpu_s_train',
    'train_samples', 'model', 'net'}: s_per_epoch = mean wall time of the training epochs (evaluation excluded);
    cpu_s_train = process CPU seconds (all threads) spent in those training epochs, summed; train_samples = training
    samples per epoch (after RecBole's sequential augmentation); net = the trained nn.Module."""
    _require_recbole()
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")   # RecBole's torch.load of its own checkpoints
    numpy2_shims()
    from logging import getLogger

    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed
    import_recbole_models()                         # before get_model: without the anomaly-detection side effect

    cfg = dict(config_dict or {})
    if dataset == "ml-100k" and "data_path" not in cfg:
        cfg["data_path"] = bundled_data_path()
    if not isinstance(model, str):
        cfg = {**{k: v for k, v in DEFAULTS.items() if model is TimeAwareSSDRec}, **cfg}
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=cfg)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    data = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model_class = get_model(model) if isinstance(model, str) else model
    net = model_class(config, train_data._dataset).to(config["device"])
    logger.info(net)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
    epoch_times, epoch_cpu = [], []
    train_epoch = trainer._train_epoch

    def timed_train_epoch(*args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        out = train_epoch(*args, **kwargs)
        epoch_times.append(time.perf_counter() - start)
        epoch_cpu.append(time.process_time() - cpu)
        return out

    trainer._train_epoch = timed_train_epoch
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, saved=saved,
                                                      show_progress=config["show_progress"])
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    logger.info(f"best valid: {best_valid_result}  test: {test_result}")
    return dict(best_valid_score=best_valid_score, best_valid_result=dict(best_valid_result or {}),
                test_result=dict(test_result or {}), epochs=len(epoch_times),
                s_per_epoch=sum(epoch_times) / max(len(epoch_times), 1), cpu_s_train=sum(epoch_cpu),
                train_samples=len(train_data._dataset), model=config["model"], net=net)


def main(argv=None):
    p = argparse.ArgumentParser(description="Train/evaluate TimeAwareSSDRec (or a RecBole model) with RecBole.")
    p.add_argument("--model", default="TimeAwareSSDRec", help="TimeAwareSSDRec or a RecBole model name (SASRec, ...)")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--config", nargs="*", default=None, help="RecBole yaml config files")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="config overrides, e.g. use_time=false")
    a = p.parse_args(argv)
    cfg = {}
    for item in a.set:
        key, _, value = item.partition("=")
        try:
            cfg[key] = json.loads(value)
        except json.JSONDecodeError:
            cfg[key] = value
    if a.epochs is not None:
        cfg["epochs"] = a.epochs
    model = TimeAwareSSDRec if a.model == "TimeAwareSSDRec" else a.model
    result = run(model, a.dataset, config_dict=cfg, config_file_list=a.config)
    print(json.dumps({k: v for k, v in result.items() if k != "net"}, default=float))


if __name__ == "__main__":
    main()
