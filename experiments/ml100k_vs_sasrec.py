"""MMM4Rec vs RecBole's SASRec vs popularity on ONE identical MovieLens-100k split, several seeds.

    # each (model, seed) run appends one JSON line to --out; runs already in the file are skipped (--rerun: redo)
    python -m experiments.ml100k_vs_sasrec --models sasrec pop --seeds 0 1 2 --out results.jsonl
    python -m experiments.ml100k_vs_sasrec --models mmm4rec --seeds 0 --out results.jsonl      # another process
    python -m experiments.ml100k_vs_sasrec --summarize results.jsonl                           # markdown table
    # smoke run (numbers meaningless): one epoch, MMM4Rec capped at 5 batches per epoch
    python -m experiments.ml100k_vs_sasrec --epochs 1 --max-batches 5 --seeds 0 --out /tmp/smoke.jsonl

What is compared (--models):
  pop             our popularity baseline (training-part interaction counts), seen items NOT excluded, also written
                  as `pop-excl-seen` (items the user interacted with before the target removed) and, when RecBole is
                  installed, `recbole-pop` (RecBole's Pop, which excludes them: its general-model protocol).
                  RecBole 1.2.1's Pop counts an item at most once per training batch (`item_cnt[item] += 1` with
                  repeated indices), so it is trained with batch size 1 here (~40 s) to get the true counts; it then
                  differs from `pop-excl-seen` only in how tied counts are ordered (ours: lower item id first;
                  RecBole: torch.topk's order).  Deterministic: one line each, with seed null.
  sasrec          RecBole 1.2.1 SASRec with its default hyper-parameters (2 layers, 2 heads, hidden 64, inner 256,
                  dropout 0.5/0.5, gelu, CE over all items, Adam lr 1e-3, train batch 2048, weight decay 0).
  mmm4rec         MMM4Rec with item IDs and time (the --small config of ml100k_real.py: hidden 64, headdim 16,
                  d_state 16, ngroups 8, ffn_inner 64), torch backend, full softmax CE, NAdam (weight decay 0.005).
  mmm4rec-noid    the same with with_id=False (text features only);  mmm4rec-notime: use_time=False.

Protocol (identical for every model):
  * data: ml100k_real.load_ml100k: ML-100k read offline from the recbole 1.2.1 wheel, 5-core, users with >= 3
    interactions, each user's interactions sorted by timestamp; ML-100k has many equal timestamps per user, and
    mmm4rec.data.SequentialData keeps the input file's order for them (np.lexsort, a stable sort, over the
    filtered rows in file order).  Text features: all-MiniLM-L6-v2 (title, year, genres); no images.
  * one split: our filtered interactions are exported to RecBole atomic files (`<name>.inter`, fields
    `user_id:token item_id:token timestamp:float`) whose timestamp is the interaction's index in our flattened,
    per-user time-ordered sequence (0..M-1): unique, exact in RecBole's float32, and in our order, so RecBole
    cannot order ties differently.  (Users' blocks follow each other in that clock; only the order inside each
    user matters for leave-one-out, and SASRec ignores time.  MMM4Rec reads the real timestamps.)  RecBole runs
    with no filtering, no normalisation, eval_args LS valid_and_test / order TO / mode full / group_by user,
    MAX_ITEM_LIST_LENGTH 20, metrics Recall and NDCG @10 and @20, valid_metric NDCG@10.
  * the script VERIFIES (assert) that RecBole's train / valid / test samples equal ours: same target interaction,
    user, target item and 20-item history for every sample (RecBole's tokens mapped back to our ids); train
    sample count 96,458 (RecBole's sequential augmentation = our prefix samples).  For Pop, RecBole's general
    dataset is checked too: same valid/test targets, training part = our popularity counts' part.
  * leave-one-out: last item = test target, second last = valid target, every earlier position >= 1 a training
    target; history = the last 20 items before the target.  Full-sort ranking over all items.
  * seen items: RecBole's full-sort evaluation does NOT remove already-seen items for SEQUENTIAL models
    (FullSortEvalDataLoader passes history_index=None when MODEL_TYPE is SEQUENTIAL) but does for general models
    such as Pop.  So SASRec and MMM4Rec are both ranked over all items, seen ones included; popularity is
    reported both ways (`pop`, `pop-excl-seen`; `recbole-pop` = RecBole's excluding protocol).
  * early stopping on valid NDCG@10, test metrics of the best-valid epoch, at most --epochs epochs.  Patience:
    ours stops after --patience epochs without a strictly better score; RecBole's `stopping_step` = --patience
    stops after patience + 1 epochs without an improvement (a tie counts as one).  Epoch counts therefore differ
    by one at equal patience.
  * timing: s/epoch = mean wall seconds of the training epochs (evaluation excluded); CPU-ms/sample = process CPU
    time (all threads) spent in training epochs / training samples processed (samples per epoch x epochs).
    --threads sets torch.set_num_threads (default 1).  --max-batches caps MMM4Rec's batches per epoch only
    (RecBole always runs full epochs: smoke-test it with --epochs 1).

Each line of --out: model, seed, test {ndcg@10, ndcg@20, recall@10, recall@20}, valid_ndcg@10, epochs, best_epoch,
stopped ("early stop" | "cap"), s_per_epoch, cpu_ms_per_sample, train_samples_per_epoch, wall_s, config (the
settings that define the run: a line with the same model, seed and config is not run again), split_verified, and
environment (torch, threads, host, git commit, date).  Lines are appended with one write each, so several
processes may share the file.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = ("pop", "sasrec", "mmm4rec", "mmm4rec-noid", "mmm4rec-notime")
POP_ROWS = ("pop", "pop-excl-seen", "recbole-pop")
METRICS = ("ndcg@10", "ndcg@20", "recall@10", "recall@20")
DATASET = "ml100k-loo"          # RecBole dataset name of the export (not "ml-100k": no bundled yaml applies)
EXPECTED_TRAIN_SAMPLES = 96458  # ML-100k, 5-core, leave-one-out prefix samples

# RecBole SASRec defaults (recbole/properties/model/SASRec.yaml + overall.yaml), written out so they are recorded
SASREC = dict(n_layers=2, n_heads=2, hidden_size=64, inner_size=256, hidden_dropout_prob=0.5, attn_dropout_prob=0.5,
              hidden_act="gelu", layer_norm_eps=1e-12, initializer_range=0.02, loss_type="CE", learner="adam",
              learning_rate=1e-3, weight_decay=0.0, train_batch_size=2048)
MMM4REC_SMALL = dict(hidden_size=64, headdim=16, d_state=16, ngroups=8, ffn_inner=64)


# ---------------------------------------------------------------------------------------------- the shared split
def export_atomic(data, root: str, name: str = DATASET) -> str:
    """Write `data`'s filtered interactions as RecBole atomic file root/name/name.inter.

    Row order = our flattened sequences (user blocks, time-ordered inside); timestamp = the row's index 0..M-1 in
    data.seq_items (unique, exact in float32 up to 2**24 rows).  Returns the .inter path."""
    if data.num_interactions >= 2 ** 24:
        raise ValueError(f"{data.num_interactions} interactions: rank timestamps would not be exact in float32")
    counts = np.diff(data.seq_offsets)
    users = np.repeat(data.user_tokens, counts)
    items = data.item_tokens[data.seq_items]
    for kind, toks in (("user", data.user_tokens), ("item", data.item_tokens[1:])):
        bad = [t for t in toks.tolist() if any(c in t for c in "\t\n\r") or t == ""]
        if bad:
            raise ValueError(f"{kind} token {bad[0]!r} cannot be written to an atomic file")
    os.makedirs(os.path.join(root, name), exist_ok=True)
    path = os.path.join(root, name, f"{name}.inter")
    with open(path, "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        f.writelines(f"{u}\t{i}\t{t}\n" for u, i, t in zip(users.tolist(), items.tolist(), range(len(items))))
    return path


def recbole_config(data_root: str, seed: int, max_len: int, epochs: int, patience: int, device: str = "cpu",
                   progress: bool = False, **extra) -> dict:
    """RecBole config_dict of the shared protocol (no filtering, LS valid_and_test, TO, full sort)."""
    return dict(
        data_path=data_root, seed=seed, reproducibility=True, device=device, use_gpu=device != "cpu",
        USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", TIME_FIELD="timestamp",
        load_col={"inter": ["user_id", "item_id", "timestamp"]},
        user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)", val_interval=None, rm_dup_inter=None,
        normalize_all=False, normalize_field=None, MAX_ITEM_LIST_LENGTH=max_len,
        eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        metrics=["Recall", "NDCG"], topk=[10, 20], valid_metric="NDCG@10", metric_decimal_place=6,
        eval_batch_size=4096,
        train_neg_sample_args=None, epochs=epochs, stopping_step=patience, show_progress=False,
        state="INFO" if progress else "WARNING", **extra)


@contextlib.contextmanager
def plain_argv():
    """RecBole's Config reads `--key=value` words of sys.argv as config overrides: hide this script's own."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def _to_ours(dataset, field: str, ours_index: Dict[str, int], values: np.ndarray) -> np.ndarray:
    """RecBole internal ids of `field` -> our ids (0 stays 0 = padding)."""
    tokens = dataset.field2id_token[field]
    lut = np.zeros(len(tokens), dtype=np.int64)
    for rid, tok in enumerate(tokens.tolist()):
        if rid:
            lut[rid] = ours_index[str(tok)]
    return lut[values]


def recbole_splits(config_dict: dict, model: str = "SASRec", name: str = DATASET) -> Dict[str, Dict[str, np.ndarray]]:
    """Build RecBole's dataset + split for `model` ("SASRec": sequential, "Pop": general) and return each split in
    OUR ids: {split: {target_pos [N] (= the rank timestamp), user [N], target [N], and for sequential models
    item_seq [N, L], lengths [N]}}."""
    from mmm4rec.recbole import import_recbole_models, numpy2_shims
    numpy2_shims()
    import_recbole_models()          # Config(model=...) imports RecBole's models: without their anomaly-mode side effect
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    with plain_argv():
        config = Config(model=model, dataset=name, config_dict=dict(config_dict))
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    loaders = data_preparation(config, dataset)
    out = {}
    for split, loader in zip(("train", "valid", "test"), loaders):
        feat = loader._dataset.inter_feat
        rec = {"target_pos": feat["timestamp"].numpy().astype(np.int64),
               "user_rb": feat["user_id"].numpy(), "target_rb": feat["item_id"].numpy()}
        if "item_id_list" in feat.interaction:
            rec["item_seq_rb"] = feat["item_id_list"].numpy()
            rec["lengths"] = feat["item_length"].numpy().astype(np.int64)
        ts = feat["timestamp"].numpy()
        if not np.array_equal(ts, np.round(ts)):
            raise AssertionError("RecBole's timestamps are not the exported integer ranks (normalised?)")
        out[split] = rec
    out["_dataset"] = dataset
    return out


def verify_split(data, rb: dict, sequential: bool = True) -> dict:
    """Assert that RecBole's split (recbole_splits) equals ours; returns {'train_samples', 'valid', 'test'} counts.

    sequential=True: every train/valid/test sample has the same target interaction, user, target item, history
    (item_seq, right padded) and length as data.split(...).  sequential=False (general models, Pop): valid/test
    targets are ours and RecBole's training interactions are the part our popularity baseline counts."""
    ds = rb["_dataset"]
    item_index = {t: i for i, t in enumerate(data.item_tokens.tolist())}
    user_index = {t: i for i, t in enumerate(data.user_tokens.tolist())}
    counts = np.diff(data.seq_offsets)
    pos_user = np.repeat(np.arange(data.num_users), counts)
    res = {}
    for split in ("train", "valid", "test"):
        r = rb[split]
        order = np.argsort(r["target_pos"], kind="stable")
        pos = r["target_pos"][order]
        if len(pos) and (pos.min() < 0 or pos.max() >= data.num_interactions):
            raise AssertionError(f"{split}: RecBole target timestamps outside 0..{data.num_interactions - 1}")
        user = _to_ours(ds, "user_id", user_index, r["user_rb"][order])
        target = _to_ours(ds, "item_id", item_index, r["target_rb"][order])
        if not np.array_equal(user, pos_user[pos]) or not np.array_equal(target, data.seq_items[pos]):
            raise AssertionError(f"{split}: RecBole's (user, item) of a target differs from our interaction at "
                                 "that rank timestamp (the export or RecBole reordered rows)")
        if sequential or split != "train":
            ours = data.split(split)
            if not np.array_equal(pos, np.sort(ours["target_pos"])):
                raise AssertionError(f"{split}: RecBole's targets ({len(pos)}) differ from ours "
                                     f"({len(ours['target_pos'])})")
            o = np.argsort(ours["target_pos"], kind="stable")
            if not np.array_equal(user, ours["user"][o]) or not np.array_equal(target, ours["target"][o]):
                raise AssertionError(f"{split}: users or target items differ from ours")
            if sequential:
                seq = _to_ours(ds, "item_id", item_index, r["item_seq_rb"][order])
                if seq.shape != ours["item_seq"].shape or not np.array_equal(seq, ours["item_seq"][o]):
                    raise AssertionError(f"{split}: histories (item_id_list) differ from ours")
                if not np.array_equal(r["lengths"][order], ours["lengths"][o]):
                    raise AssertionError(f"{split}: history lengths differ from ours")
        else:  # general model: RecBole trains on every interaction before the valid target
            n = np.repeat(counts, counts)
            rel = np.arange(data.num_interactions) - np.repeat(data.seq_offsets[:-1], counts)
            expect = np.flatnonzero(np.where(n >= 3, rel < n - 2, True))
            if not np.array_equal(pos, expect):
                raise AssertionError("train: RecBole's training interactions differ from our popularity counts' part")
        res[split if split != "train" else "train_samples"] = int(len(pos))
    return res


# ---------------------------------------------------------------------------------------------- the jsonl file
def canonical(obj):
    """JSON round trip (tuples -> lists, keys sorted) so configs compare equal to what was read back."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def read_lines(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{n} is not JSON (skipped)", file=sys.stderr)
    return rows


def already_done(path: str, model: str, seed, config: dict) -> bool:
    config = canonical(config)
    return any(r.get("model") == model and r.get("seed") == seed and canonical(r.get("config")) == config
               for r in read_lines(path))


def append_line(path: str, row: dict) -> None:
    """Append one JSON line with a single O_APPEND write (safe with several writer processes)."""
    line = (json.dumps(row, sort_keys=True, default=float) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fmt(values: List[float], digits: int = 4) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    mean = float(np.mean(vals))
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(vals, ddof=1)):.{digits}f}"


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def summarize(path: str) -> str:
    """Markdown table of `path`: one row per (model, config); metrics as mean ± sample std over seeds."""
    rows = read_lines(path)
    if not rows:
        raise ValueError(f"--summarize {path}: no result lines")
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault((r["model"], json.dumps(canonical(r.get("config")), sort_keys=True)), []).append(r)
    per_model: Dict[str, int] = {}
    for model, _ in groups:
        per_model[model] = per_model.get(model, 0) + 1
    order = {m: i for i, m in enumerate(POP_ROWS + MODELS[1:])}
    keys = sorted(groups, key=lambda k: (order.get(k[0], len(order)), k[0]))
    out = ["| model | n seeds | NDCG@10 | NDCG@20 | Recall@10 | Recall@20 | epochs (mean) | s/epoch | CPU-ms/sample |",
           "|---|---|---|---|---|---|---|---|---|"]
    notes, seen_model = [], {}
    flat = {key: _flat(json.loads(key[1]) or {}) for key in groups}
    for key in keys:
        model = key[0]
        g = groups[key]
        label = model
        if per_model[model] > 1:
            seen_model[model] = seen_model.get(model, 0) + 1
            label = f"{model} (config {seen_model[model]})"
            others = [flat[k] for k in groups if k[0] == model]
            differ = sorted({f for fl in others for f in fl if len({json.dumps(o.get(f)) for o in others}) > 1})
            notes.append(f"- {label}: " + ", ".join(f"{f}={flat[key].get(f)}" for f in differ))
        seeds = sorted({r.get("seed") for r in g}, key=str)
        if len(seeds) < len(g):
            notes.append(f"- {label}: {len(g) - len(seeds)} duplicate seed line(s) averaged (--rerun)")
        cells = [_fmt([r["test"][m] for r in g]) for m in METRICS]
        ep = [r["epochs"] for r in g if r.get("epochs") is not None]
        ep_s = f"{np.mean(ep):.1f}" if ep else "-"
        stopped = {r.get("stopped") for r in g} - {None}
        if "cap" in stopped:
            ep_s += f" ({sum(r.get('stopped') == 'cap' for r in g)} capped)"
        sec = _fmt([r.get("s_per_epoch") for r in g], 2)
        cpu = _fmt([r.get("cpu_ms_per_sample") for r in g], 3)
        n = "deterministic" if seeds == [None] else str(len(seeds))
        out.append(f"| {label} | {n} | " + " | ".join(cells) + f" | {ep_s} | {sec} | {cpu} |")
    return "\n".join(out + ([""] + notes if notes else []))


# ---------------------------------------------------------------------------------------------- runs
def environment(threads: int) -> dict:
    import torch
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(torch=torch.__version__, threads=threads, host=platform.node(), machine=platform.platform(),
                commit=commit, date=time.strftime("%Y-%m-%d %H:%M:%S"))


def pop_rows(data, a, data_root: Optional[str], verified: dict) -> List[tuple]:
    """[(model, config, row)] for our popularity with/without seen items and RecBole's Pop (when installed)."""
    from mmm4rec.train import popularity_metrics
    base = dict(protocol="ml100k-5core-loo-L20", max_len=data.max_len, kcore=5)
    out = []
    for name, excl in (("pop", False), ("pop-excl-seen", True)):
        cfg = dict(base, impl="mmm4rec.train.popularity_metrics", exclude_seen=excl)

        def make(excl=excl):
            t0 = time.perf_counter()
            test = popularity_metrics(data, "test", ks=(10, 20), exclude_seen=excl)
            valid = popularity_metrics(data, "valid", ks=(10, 20), exclude_seen=excl)
            return dict(test={m: test[m] for m in METRICS}, valid_ndcg10=valid["ndcg@10"], epochs=None,
                        best_epoch=None, stopped=None, s_per_epoch=None, cpu_ms_per_sample=None,
                        wall_s=time.perf_counter() - t0)
        out.append((name, cfg, make))
    if data_root is not None:
        cfg = dict(base, impl="recbole Pop (general model: full sort excludes seen items)", exclude_seen=True,
                   train_batch_size=1)

        def make_rb():
            from mmm4rec.recbole import run
            if "pop" not in verified:
                rb = recbole_config(data_root, 0, data.max_len, 1, a.patience, a.device, a.progress)
                verified["pop"] = verify_split(data, recbole_splits(rb, "Pop"), sequential=False)
                print(f"split check (RecBole Pop, general dataset): equal to ours {verified['pop']}", flush=True)
            t0 = time.perf_counter()
            rbcfg = recbole_config(data_root, 0, data.max_len, 1, a.patience, a.device, a.progress,
                                   checkpoint_dir=os.path.join(data_root, "ckpt-pop"), train_batch_size=1)
            with plain_argv():
                res = run("Pop", DATASET, config_dict=rbcfg, saved=False)
            t = res["test_result"]
            return dict(test={m: float(t[m]) for m in METRICS}, valid_ndcg10=float(res["best_valid_score"]),
                        epochs=None, best_epoch=None, stopped=None, s_per_epoch=None, cpu_ms_per_sample=None,
                        wall_s=time.perf_counter() - t0, split_verified=verified["pop"])
        out.append(("recbole-pop", cfg, make_rb))
    return out


def sasrec_config(data, a) -> dict:
    return dict(protocol="ml100k-5core-loo-L20", impl="recbole 1.2.1 SASRec", max_len=data.max_len,
                epochs_cap=a.epochs, patience=a.patience, threads=a.threads, device=a.device, **SASREC)


@contextlib.contextmanager
def recbole_cpu_budget(cpu_budget: Optional[float], chunk: Optional[int] = None):
    """While active, every RecBole Trainer trains at most `cpu_budget` process CPU seconds in total (checked before
    each batch; validation excluded) and, with `chunk`, a RecBole "epoch" is `chunk` batches of one continuing pass
    over the training data (a new shuffled pass starts when one ends), so validation runs every `chunk` batches.
    Once the budget is spent the remaining epochs train nothing and skip validation (eval_step set out of reach):
    RecBole's best-valid checkpoint and test evaluation are untouched.  Yields a dict {'cpu_s', 'batches'}."""
    from recbole.trainer import Trainer
    state = {"cpu_s": 0.0, "batches": 0}
    original = Trainer._train_epoch
    streams: dict = {}

    def batches(train_data):
        while True:
            yield from train_data

    class Limited:
        def __init__(self, train_data):
            self.train_data = train_data

        def __getattr__(self, name):
            return getattr(self.train_data, name)

        def __len__(self):
            return chunk or len(self.train_data)

        def __iter__(self):
            it = streams.setdefault(id(self.train_data), batches(self.train_data)) if chunk else iter(self.train_data)
            for n in range(len(self)):
                c = time.process_time()
                if cpu_budget is not None and state["cpu_s"] >= cpu_budget:
                    return
                try:
                    b = next(it)
                except StopIteration:
                    return
                state["cpu_s"] += time.process_time() - c
                t = time.process_time()
                yield b
                state["cpu_s"] += time.process_time() - t
                state["batches"] += 1

    def limited_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if cpu_budget is not None and state["cpu_s"] >= cpu_budget:
            self.eval_step = 10 ** 9         # nothing trained any more: no validation, no checkpoint
            return 0.0
        return original(self, Limited(train_data), epoch_idx, loss_func=loss_func, show_progress=show_progress)

    Trainer._train_epoch = limited_epoch
    try:
        yield state
    finally:
        Trainer._train_epoch = original


def run_sasrec(data, seed: int, a, data_root: str, verified: dict, cpu_budget: Optional[float] = None,
               chunk: Optional[int] = None, **overrides) -> dict:
    """One RecBole SASRec run on the exported split; returns the result fields of the jsonl line.

    overrides: RecBole settings replacing SASREC's (e.g. train_batch_size=256, learning_rate=1e-3); cpu_budget /
    chunk: recbole_cpu_budget (then `cpu_s` / `batches` in the result are the budgeted training's)."""
    import torch

    from mmm4rec.recbole import run
    if "sasrec" not in verified:
        rb = recbole_config(data_root, seed, data.max_len, a.epochs, a.patience, a.device, a.progress)
        verified["sasrec"] = verify_split(data, recbole_splits(rb, "SASRec"), sequential=True)
        print(f"split check (RecBole SASRec, sequential dataset): equal to ours {verified['sasrec']}", flush=True)
        if data.max_len == 20 and data.name == "ml-100k":
            assert verified["sasrec"]["train_samples"] == EXPECTED_TRAIN_SAMPLES, verified["sasrec"]
    ckpt = tempfile.mkdtemp(prefix=f"sasrec-s{seed}-", dir=data_root)
    cfg = recbole_config(data_root, seed, data.max_len, a.epochs, a.patience, a.device, a.progress,
                         checkpoint_dir=ckpt, **dict(SASREC, **overrides))
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    with plain_argv(), recbole_cpu_budget(cpu_budget, chunk) as budget:
        res = run("SASRec", DATASET, config_dict=cfg, saved=True)
    wall = time.perf_counter() - t0
    files = glob.glob(os.path.join(ckpt, "*.pth"))
    best_epoch = None
    if len(files) == 1:  # RecBole's best checkpoint stores its 0-based epoch
        best_epoch = int(torch.load(files[0], map_location="cpu", weights_only=False)["epoch"]) + 1
    t = res["test_result"]
    epochs = res["epochs"]
    early = epochs < a.epochs or (best_epoch is not None and epochs - best_epoch > a.patience)
    samples = res["train_samples"] * epochs
    return dict(test={m: float(t[m]) for m in METRICS}, valid_ndcg10=float(res["best_valid_score"]), epochs=epochs,
                best_epoch=best_epoch, stopped="early stop" if early else "cap", s_per_epoch=res["s_per_epoch"],
                cpu_ms_per_sample=1000.0 * res["cpu_s_train"] / max(samples, 1),
                train_samples_per_epoch=res["train_samples"], wall_s=wall, split_verified=verified["sasrec"],
                cpu_s=budget["cpu_s"], batches=budget["batches"])


def mmm4rec_config(data, variant: str, a) -> dict:
    from mmm4rec.model import MMM4RecConfig
    cfg = MMM4RecConfig(max_len=data.max_len, use_time=variant != "mmm4rec-notime", with_id=variant != "mmm4rec-noid",
                        backend=a.backend, path=a.path, feat_dim=int(data.text_feats.shape[1]), **MMM4REC_SMALL)
    trainer = dict(optimizer="NAdam", lr=a.lr, weight_decay=0.005, batch_size=a.batch_size, epochs_cap=a.epochs,
                   patience=a.patience, metric="ndcg@10", mode="full", exclude_seen=False,
                   max_batches=a.max_batches)
    return dict(protocol="ml100k-5core-loo-L20", impl="mmm4rec", text_encoder=a.encoder, model=dataclasses.asdict(cfg),
                trainer=trainer, threads=a.threads, device=a.device)


def fit_timed(tr, cpu_budget: Optional[float] = None):
    """tr.fit() with the process CPU seconds of each training epoch recorded: (summary, [cpu_s], wall_s).

    cpu_budget: stop training (at an optimizer-step boundary, then validate and test as the Trainer's own budgets
    do) once the training epochs have used this many process CPU seconds (validation excluded)."""
    cpu = []
    train_epoch = tr.train_epoch
    started = []

    def timed_epoch():
        c = time.process_time()
        started.append(c)
        out = train_epoch()
        cpu.append(time.process_time() - c)
        return out

    tr.train_epoch = timed_epoch
    if cpu_budget is not None:
        budget_hit = tr._budget_hit

        def cpu_budget_hit():
            used = sum(cpu) + (time.process_time() - started[-1] if len(started) > len(cpu) else 0.0)
            return "cpu budget" if used >= cpu_budget else budget_hit()

        tr._budget_hit = cpu_budget_hit
    t0 = time.perf_counter()
    s = tr.fit()
    return s, cpu, time.perf_counter() - t0


def run_mmm4rec(data, variant: str, seed: int, a) -> dict:
    """One MMM4Rec run (variant in mmm4rec, mmm4rec-noid, mmm4rec-notime); returns the result fields."""
    import torch

    from mmm4rec.model import MMM4RecConfig
    from mmm4rec.train import Trainer, build_model, set_seed
    conf = mmm4rec_config(data, variant, a)
    torch.set_num_threads(a.threads)
    set_seed(seed)
    model = build_model(MMM4RecConfig(**conf["model"]), data)
    tr = Trainer(model, data, lr=a.lr, weight_decay=0.005, batch_size=a.batch_size, epochs=a.epochs,
                 patience=a.patience, metric="ndcg@10", mode="full", seed=seed, device=a.device, progress=a.progress,
                 ks=(10, 20), max_batches=a.max_batches, exclude_seen=False, checkpoint_every_s=None)
    s, cpu, wall = fit_timed(tr)
    n_train = data.num_samples("train")
    per_epoch = min(tr.batches_per_epoch() * a.batch_size, n_train)
    samples = per_epoch * len(cpu)
    secs = s["epoch_seconds"]
    return dict(test={m: float(s["test"][m]) for m in METRICS}, valid_ndcg10=float(s["best_valid"]),
                epochs=s["epochs_run"], best_epoch=s["best_epoch"],
                stopped="early stop" if s["stopped_by"] == "early stop" else "cap",
                s_per_epoch=sum(secs) / max(len(secs), 1), cpu_ms_per_sample=1000.0 * sum(cpu) / max(samples, 1),
                train_samples_per_epoch=per_epoch, wall_s=wall)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=200, help="epoch cap (default 200)")
    ap.add_argument("--patience", type=int, default=10, help="early stopping on valid NDCG@10 (RecBole stopping_step)")
    ap.add_argument("--lr", type=float, default=1e-3, help="MMM4Rec NAdam learning rate (SASRec: RecBole's 1e-3)")
    ap.add_argument("--batch-size", type=int, default=512, help="MMM4Rec batch (SASRec: RecBole's 2048)")
    ap.add_argument("--max-batches", type=int, default=None,
                    help="cap MMM4Rec's batches per epoch (smoke runs; RecBole runs full epochs)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for both libraries")
    ap.add_argument("--backend", default="torch", help="mmm4rec_kernels backend for MMM4Rec")
    ap.add_argument("--path", default="auto", help="mmm4rec_kernels SSD path for MMM4Rec")
    ap.add_argument("--encoder", default="minilm", choices=["minilm", "hashed"], help="item text encoder")
    ap.add_argument("--out", default=None, help="results .jsonl (appended to)")
    ap.add_argument("--rerun", action="store_true", help="run even if a line with the same model/seed/config exists")
    ap.add_argument("--progress", action="store_true", help="MMM4Rec progress bars/epoch lines, RecBole INFO logs")
    ap.add_argument("--summarize", metavar="FILE.jsonl", default=None, help="print the markdown table and exit")
    a = ap.parse_args(argv)
    if a.summarize:
        print(summarize(a.summarize))
        return 0
    if not a.out:
        ap.error("--out FILE.jsonl is required (or --summarize FILE.jsonl)")
    for name in ("epochs", "patience", "batch_size", "threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.max_batches is not None and a.max_batches < 1:
        ap.error("--max-batches must be >= 1")
    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)

    import torch
    torch.set_num_threads(a.threads)
    from experiments.ml100k_real import load_ml100k
    try:
        from mmm4rec.recbole import RECBOLE_IMPORT_ERROR
    except ImportError as e:  # pragma: no cover
        RECBOLE_IMPORT_ERROR = e
    if "sasrec" in a.models and RECBOLE_IMPORT_ERROR is not None:
        ap.error(f"--models sasrec needs RecBole: pip install recbole==1.2.1 ({RECBOLE_IMPORT_ERROR})")

    data = load_ml100k(max_len=20, encoder=a.encoder)
    print(data.describe(), flush=True)
    env = environment(a.threads)
    verified: dict = {}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="ml100k_vs_sasrec-") as tmp:
        data_root = None
        if RECBOLE_IMPORT_ERROR is None:
            export_atomic(data, tmp)
            data_root = tmp
            os.chdir(tmp)   # RecBole writes ./log and ./log_tensorboard
        else:
            print(f"RecBole not importable ({RECBOLE_IMPORT_ERROR}): no recbole-pop row, no split check")
        try:
            jobs = []   # (model, seed, config, thunk)
            if "pop" in a.models:
                jobs += [(name, None, cfg, fn) for name, cfg, fn in pop_rows(data, a, data_root, verified)]
            for seed in a.seeds:
                for model in a.models:
                    if model == "sasrec":
                        jobs.append((model, seed, sasrec_config(data, a),
                                     lambda seed=seed: run_sasrec(data, seed, a, data_root, verified)))
                    elif model.startswith("mmm4rec"):
                        jobs.append((model, seed, mmm4rec_config(data, model, a),
                                     lambda seed=seed, model=model: run_mmm4rec(data, model, seed, a)))
            for model, seed, cfg, fn in jobs:
                if not a.rerun and already_done(out, model, seed, cfg):
                    print(f"skip {model} seed {seed}: already in {out} (--rerun to redo)", flush=True)
                    continue
                print(f"run {model} seed {seed} ...", flush=True)
                res = fn()
                row = dict(model=model, seed=seed, config=canonical(cfg), env=env, **res)
                append_line(out, row)
                t = row["test"]
                print(f"  {model} seed {seed}: test NDCG@10 {t['ndcg@10']:.4f} Recall@10 {t['recall@10']:.4f} "
                      f"NDCG@20 {t['ndcg@20']:.4f} Recall@20 {t['recall@20']:.4f}; epochs {row.get('epochs')} "
                      f"(best {row.get('best_epoch')}, {row.get('stopped')}); wall {row['wall_s']:.1f}s",
                      flush=True)
        finally:
            os.chdir(cwd)
    print()
    print(summarize(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
