"""SASRec vs TimeAwareSSDRec (mmm4rec.recbole) with and without timestamps on ML-100k, through RecBole's pipeline.

    pip install recbole==1.2.1 "pandas<3"
    python -m experiments.recbole_ml100k --epochs 200 --stopping-step 10 --json out.json

Same protocol and seed for every model: leave-one-out split (order by time, last item = test, second last = valid),
full-sort ranking over all items, CE loss over all items, Adam, early stopping on valid NDCG@10, test metrics of the
best-valid epoch (RecBole reloads the best checkpoint).  ML-100k is read offline from inside the recbole wheel.
Prints one markdown row per model: test NDCG@10, Recall@10, epochs run, best epoch, s/epoch (training loop only,
evaluation excluded) and whether early stopping fired ("converged") or the epoch cap was hit ("capped").
Not a timed test: CI never runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time


MODELS = ("SASRec", "TimeAwareSSDRec-time", "TimeAwareSSDRec-notime")


def common_config(args, checkpoint_dir):
    return dict(
        seed=args.seed, reproducibility=True, device=args.device, use_gpu=args.device != "cpu",
        epochs=args.epochs, stopping_step=args.stopping_step, train_batch_size=args.batch_size, eval_batch_size=4096,
        learning_rate=args.lr, MAX_ITEM_LIST_LENGTH=args.max_len, loss_type="CE", train_neg_sample_args=None,
        eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        metrics=["Recall", "NDCG"], topk=[10], valid_metric="NDCG@10", show_progress=False,
        checkpoint_dir=checkpoint_dir, hidden_size=args.hidden, n_layers=args.layers, inner_size=4 * args.hidden)


def model_config(name, args):
    if name == "SASRec":
        return "SASRec", dict(n_heads=2, hidden_dropout_prob=args.dropout, attn_dropout_prob=args.dropout)
    from mmm4rec.recbole import TimeAwareSSDRec
    return TimeAwareSSDRec, dict(use_time=name.endswith("-time"), dropout_prob=args.dropout, d_state=args.d_state,
                                 headdim=args.headdim, ssd_backend="auto")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--stopping-step", type=int, default=10)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-state", type=int, default=32)
    p.add_argument("--headdim", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import torch

    from mmm4rec.recbole import run
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)                                   # RecBole writes ./log and ./log_tensorboard
        for name in args.models:
            model, extra = model_config(name, args)
            start = time.perf_counter()
            res = run(model, "ml-100k", config_dict={**common_config(args, os.path.join(tmp, "saved")), **extra},
                      saved=True)
            t = res["test_result"]
            row = dict(model=name, ndcg10=float(t["ndcg@10"]), recall10=float(t["recall@10"]),
                       valid_ndcg10=float(res["best_valid_score"]), epochs=res["epochs"],
                       s_per_epoch=res["s_per_epoch"], wall_s=time.perf_counter() - start,
                       stopped="converged" if res["epochs"] < args.epochs else "capped")
            rows.append(row)
            print(f"| {name} | {row['ndcg10']:.4f} | {row['recall10']:.4f} | {row['valid_ndcg10']:.4f} | "
                  f"{row['epochs']} ({row['stopped']}) | {row['s_per_epoch']:.1f} |", flush=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=platform.platform(), torch=torch.__version__,
                threads=torch.get_num_threads(), argv=sys.argv[1:], args=vars(args))
    print("| model | test NDCG@10 | test Recall@10 | valid NDCG@10 | epochs | s/epoch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ndcg10']:.4f} | {r['recall10']:.4f} | {r['valid_ndcg10']:.4f} | "
              f"{r['epochs']} ({r['stopped']}) | {r['s_per_epoch']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
