"""`mmm4rec` command line: prepare data, pre-train, fine-tune, evaluate, recommend, export, benchmark.

Quick start (CPU is fine):
    mmm4rec prepare --demo --out data/demo
    mmm4rec finetune --data data/demo --out runs/demo --epochs 5
    mmm4rec evaluate --checkpoint runs/demo/best --data data/demo
    mmm4rec recommend --checkpoint runs/demo/best --data data/demo --users u1 u2 --k 10

Real data: `mmm4rec prepare --inter Scientific.inter --item Scientific.item --text-feats text.npy --text-ids ids.txt
--image-feats img.npy --image-ids img_ids.txt --out data/sci` (without --text-feats the .item text fields are
encoded with --encoder auto|minilm|hashed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import numpy as np


def _model_args(p: argparse.ArgumentParser, n_layers: int = 1) -> None:
    g = p.add_argument_group("model (defaults: official fine-tune config)")
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--expand", type=int, default=2)
    g.add_argument("--headdim", type=int, default=64)
    g.add_argument("--d-state", type=int, default=64)
    g.add_argument("--ngroups", type=int, default=None, help="default: one group per head")
    g.add_argument("--n-layers", type=int, default=n_layers)
    g.add_argument("--ffn-inner", type=int, default=None, help="default: hidden size")
    g.add_argument("--dropout", type=float, default=0.4)
    g.add_argument("--time-dropout", type=float, default=0.4)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--with-id", action="store_true", help="per-item bias tables (the 'with ID' variant)")
    g.add_argument("--no-time", action="store_true", help="ablation: use_time=False")
    g.add_argument("--path", default="auto", choices=["auto", "quadratic", "chunked", "reference"])


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cuda", "torch"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, auto")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_args(p: argparse.ArgumentParser, lr: float, accum: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", required=True, help="run dir (checkpoints best/ last/, log.json, convergence.png)")
    g.add_argument("--epochs", type=int, default=200)
    g.add_argument("--patience", type=int, default=10)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--weight-decay", type=float, default=0.005)
    g.add_argument("--batch-size", type=int, default=1024)
    g.add_argument("--compile", action="store_true", help="torch.compile the loss (kernels stay opaque calls)")
    g.add_argument("--grad-accum", type=int, default=accum)
    g.add_argument("--metric", default="ndcg@10")
    g.add_argument("--no-tf32", action="store_true")
    g.add_argument("--resume", action="store_true", help="continue from <out>/last if present")
    g.add_argument("--max-len", type=int, default=None, help="override the prepared history window")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmm4rec", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="atomic files (+ feature files) -> prepared dataset dir")
    p.add_argument("--out", required=True)
    p.add_argument("--demo", action="store_true", help="build the built-in synthetic demo dataset")
    p.add_argument("--demo-size", default="small", choices=["tiny", "small", "scientific"],
                   help="tiny: 200 users; small: 2000 users; scientific: Table 1 sizes")
    p.add_argument("--inter", help="<name>.inter atomic file")
    p.add_argument("--item", help="<name>.item atomic file (text fields for the text encoder)")
    p.add_argument("--name", default=None)
    p.add_argument("--user-field", default="user_id")
    p.add_argument("--item-field", default="item_id")
    p.add_argument("--time-field", default="timestamp")
    p.add_argument("--text-fields", nargs="*", default=None, help=".item fields joined into the item text")
    p.add_argument("--text-feats", help=".npy/.pt/.safetensors text feature matrix")
    p.add_argument("--text-ids", help="row-id file for --text-feats (one raw item id per line); "
                                      "default: the .item file order")
    p.add_argument("--image-feats", help="image feature matrix (rows may be missing -> image_mask)")
    p.add_argument("--image-ids", help="row-id file for --image-feats (default: the .item file order)")
    p.add_argument("--encoder", default="auto", choices=["auto", "minilm", "hashed"],
                   help="text encoder when --text-feats is not given")
    p.add_argument("--feat-dim", type=int, default=768, help="width of the hashed encoder / demo features")
    p.add_argument("--kcore", type=int, default=5)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--short-users", default="drop", choices=["drop", "train"])
    p.add_argument("--seed", type=int, default=0)

    for name, lr, accum, nl, hlp in (("finetune", 1e-4, 8, 1, "train on one domain (full-softmax CE)"),
                                     ("pretrain", 2.5e-4, 1, 2, "pre-train on several domains (in-batch CE)")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--data", required=True, nargs="+" if name == "pretrain" else None,
                       help="prepared dataset dir" + ("s (one per domain)" if name == "pretrain" else ""))
        _model_args(p, n_layers=nl)
        _train_args(p, lr, accum)
        _run_args(p)
        p.add_argument("--mode", default="full" if name == "finetune" else "inbatch", choices=["full", "inbatch"])
        if name == "finetune":
            p.add_argument("--init", help="pre-trained checkpoint dir (transferable weights are loaded)")
        else:
            p.add_argument("--validate", action="store_true", help="validate each epoch (default: off)")

    p = sub.add_parser("evaluate", help="full-sort Recall/NDCG@{10,20,50} of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--popularity", action="store_true", help="also print the popularity baseline")
    p.add_argument("--json", help="write the metrics here")
    _run_args(p)

    p = sub.add_parser("recommend", help="top-K items for user ids or for a given history")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--users", nargs="*", help="raw user ids (their full history is used)")
    p.add_argument("--history", nargs="*", help="raw item ids, oldest first")
    p.add_argument("--times", nargs="*", type=float, help="unix seconds of the --history items")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--exclude-history", action="store_true", help="do not recommend items already in the history")
    p.add_argument("--json", help="write the recommendations here")
    _run_args(p)

    p = sub.add_parser("export", help="user and item embeddings to .npy (dir) or .safetensors (file)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="a .safetensors file, or a dir for .npy files")
    p.add_argument("--batch-size", type=int, default=1024)
    _run_args(p)

    p = sub.add_parser("bench", help="benchmarks")
    p.add_argument("which", choices=["table4"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (e.g. --scale 0.1)")
    return ap


# ---------------------------------------------------------------------------------------------------------- commands
def _demo_dataset(size: str, seed: int, feat_dim: int):
    from .data import make_paper_like, make_synthetic_dataset
    if size == "tiny":
        return make_synthetic_dataset(200, 100, 1600, feat_dim=feat_dim, seed=seed, name="demo")
    if size == "small":
        return make_synthetic_dataset(2000, 800, 16000, feat_dim=feat_dim, seed=seed, name="demo")
    return make_paper_like("scientific", feat_dim=feat_dim, seed=seed)


def cmd_prepare(a) -> int:
    from .data import SequentialData, attach_features, encode_texts, item_texts, load_matrix, read_atomic, read_mapping
    if a.demo:
        syn = _demo_dataset(a.demo_size, a.seed, a.feat_dim)
        data = syn.to_sequential(max_len=a.max_len, kcore=a.kcore, short_users=a.short_users)
        src = "synthetic demo"
    else:
        if not a.inter:
            raise SystemExit("prepare: give --inter <name>.inter (or --demo)")
        name = a.name or os.path.splitext(os.path.basename(a.inter))[0]
        data = SequentialData.from_atomic(a.inter, name=name, user_field=a.user_field, item_field=a.item_field,
                                          time_field=a.time_field, max_len=a.max_len, kcore=a.kcore,
                                          short_users=a.short_users)
        item_order = None
        texts = None
        if a.item:
            cols = read_atomic(a.item)
            if a.item_field not in cols:
                raise SystemExit(f"prepare: {a.item} has no field {a.item_field!r}")
            item_order = cols[a.item_field]
            texts = item_texts(cols, a.item_field, a.text_fields)
        if a.text_feats:
            rows = read_mapping(a.text_ids) if a.text_ids else item_order
            if rows is None:
                raise SystemExit("prepare: --text-feats needs --text-ids or --item (row order)")
            attach_features(data, text=load_matrix(a.text_feats), text_rows=rows)
            src = f"text features from {a.text_feats}"
        else:
            if texts is None:
                raise SystemExit("prepare: give --text-feats or --item (item texts to encode)")
            toks = data.item_tokens[1:].tolist()
            missing = [t for t in toks if t not in texts]
            if missing:
                print(f"prepare: {len(missing)} items have no .item row; they get an empty text", file=sys.stderr)
            feats, used = encode_texts([texts.get(t, "") for t in toks], encoder=a.encoder, dim=a.feat_dim,
                                       progress=True)
            attach_features(data, text=feats.numpy(), text_rows=toks)
            src = f"text encoded with {used}" + (" (MiniLM not installed: hashed fallback)"
                                                  if a.encoder == "auto" and used == "hashed" else "")
        if a.image_feats:
            rows = read_mapping(a.image_ids) if a.image_ids else item_order
            if rows is None:
                raise SystemExit("prepare: --image-feats needs --image-ids or --item (row order)")
            info = attach_features(data, image=load_matrix(a.image_feats), image_rows=rows)
            src += f"; images for {info['image_coverage']}/{data.num_items} items"
    data.save(a.out)
    print(f"prepared {data.describe()}\n  features: {src}\n  -> {a.out}")
    return 0


def _config_from_args(a, max_len: int):
    from .model import MMM4RecConfig
    hidden = a.hidden_size
    nheads = hidden * a.expand // a.headdim
    return MMM4RecConfig(hidden_size=hidden, expand=a.expand, headdim=a.headdim, d_state=a.d_state,
                         ngroups=a.ngroups or nheads, n_layers=a.n_layers, ffn_inner=a.ffn_inner or hidden,
                         dropout=a.dropout, time_dropout=a.time_dropout, max_len=max_len,
                         temperature=a.temperature, with_id=a.with_id, use_time=not a.no_time,
                         backend=a.backend, path=a.path)


def _train(a, data, mode: str, init: Optional[str] = None, validate: bool = True) -> int:
    from .train import Trainer, build_model, load_pretrained, set_seed
    set_seed(a.seed)
    cfg = _config_from_args(a, data.max_len)
    model = build_model(cfg, data)
    if init:
        missing, unexpected = load_pretrained(model, init)
        print(f"loaded pre-trained weights from {init} ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    tr = Trainer(model, data, lr=a.lr, weight_decay=a.weight_decay, batch_size=a.batch_size,
                 grad_accum=a.grad_accum, epochs=a.epochs, patience=a.patience, metric=a.metric, mode=mode,
                 seed=a.seed, device=a.device, out_dir=a.out, tf32=not a.no_tf32, progress=not a.quiet,
                 validate=validate, compile=a.compile)
    if a.resume and tr.resume():
        print(f"resumed from {a.out}/last at epoch {tr.epoch}")
    print(f"{data.describe()}\ntraining on {tr.device}, {sum(p.numel() for p in model.parameters())} parameters")
    summary = tr.fit()
    print(json.dumps(summary, indent=1))
    return 0


def cmd_finetune(a) -> int:
    from .data import SequentialData
    data = SequentialData.load(a.data, max_len=a.max_len)
    return _train(a, data, a.mode, init=a.init)


def cmd_pretrain(a) -> int:
    from .data import SequentialData, concat_domains
    data = concat_domains([SequentialData.load(d, max_len=a.max_len) for d in a.data])
    return _train(a, data, a.mode, validate=a.validate)


def _load(a):
    from .data import SequentialData
    from .train import load_checkpoint, read_checkpoint_config, set_seed
    set_seed(a.seed)
    cfg = read_checkpoint_config(a.checkpoint)["model_config"]
    data = SequentialData.load(a.data, max_len=cfg["max_len"])
    overrides = {} if a.backend == "auto" else {"backend": a.backend}
    model = load_checkpoint(a.checkpoint, data, device=a.device, **overrides)
    model.eval()
    return data, model


def cmd_evaluate(a) -> int:
    from .train import evaluate_model, popularity_metrics
    data, model = _load(a)
    res = {"model": evaluate_model(model, data, a.split, a.batch_size, progress=not a.quiet)}
    if a.popularity:
        res["popularity"] = popularity_metrics(data, a.split)
    for name, m in res.items():
        print(f"{name:>10} {a.split}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if not k.startswith("hit")))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def cmd_recommend(a) -> int:
    import torch
    from .metrics import topk_items
    if bool(a.users) == bool(a.history):
        raise SystemExit("recommend: give either --users or --history")
    data, model = _load(a)
    if a.users:
        h = data.user_histories(data.user_index(a.users))
        names = list(a.users)
    else:
        if a.times is not None and len(a.times) != len(a.history):
            raise SystemExit(f"recommend: {len(a.history)} --history items but {len(a.times)} --times")
        h = data.history_from_items([a.history], None if a.times is None else [a.times])
        names = ["history"]
    dev = next(model.parameters()).device
    with torch.no_grad():
        item_seq = h["item_seq"].to(dev)
        scores = model.full_scores(model.encode(item_seq, h["time_seq"].to(dev), h["lengths"].to(dev)))
        exclude = None
        if a.exclude_history:
            exclude = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, item_seq, True)
            exclude[:, 0] = True
        top = topk_items(scores, a.k, exclude)
        top_scores = scores.gather(1, top).cpu().numpy()
    out = {}
    for r, name in enumerate(names):
        out[name] = [{"item": data.item_tokens[i], "score": float(s)}
                     for i, s in zip(top[r].cpu().tolist(), top_scores[r])]
        print(f"{name}: " + " ".join(e["item"] for e in out[name]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def cmd_export(a) -> int:
    import torch
    from tqdm.auto import tqdm
    data, model = _load(a)
    dev = next(model.parameters()).device
    users = np.arange(data.num_users)
    parts = []
    with torch.no_grad():
        text_items, image_items = model.item_embeddings()
        for lo in tqdm(range(0, len(users), a.batch_size), desc="users", disable=a.quiet):
            h = data.user_histories(users[lo:lo + a.batch_size])
            parts.append(model.encode(h["item_seq"].to(dev), h["time_seq"].to(dev), h["lengths"].to(dev)).cpu())
    arrays = {"user_embeddings": torch.cat(parts).numpy(), "item_text_embeddings": text_items.cpu().numpy(),
              "item_image_embeddings": image_items.cpu().numpy()}
    if a.out.endswith(".safetensors"):
        from safetensors.numpy import save_file
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, a.out)
    else:
        os.makedirs(a.out, exist_ok=True)
        for k, v in arrays.items():
            np.save(os.path.join(a.out, k + ".npy"), v)
        with open(os.path.join(a.out, "ids.json"), "w") as f:
            json.dump({"users": data.user_tokens.tolist(), "items": data.item_tokens.tolist()}, f)
    print(f"exported {', '.join(f'{k} {v.shape}' for k, v in arrays.items())} -> {a.out} "
          f"(item row 0 = padding; user rows follow the prepared user order)")
    return 0


def cmd_bench(a) -> int:
    try:
        from . import bench_table4
    except ImportError as e:
        print(f"mmm4rec bench table4: mmm4rec.bench_table4 is not available ({e})", file=sys.stderr)
        return 2
    rest = [x for x in a.rest if x != "--"]
    ret = bench_table4.main(rest)
    return int(ret or 0)


COMMANDS = {"prepare": cmd_prepare, "finetune": cmd_finetune, "pretrain": cmd_pretrain, "evaluate": cmd_evaluate,
            "recommend": cmd_recommend, "export": cmd_export, "bench": cmd_bench}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `mmm4rec` console script (and `python -m mmm4rec`). Returns the exit status."""
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.cmd](a)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"mmm4rec {a.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
