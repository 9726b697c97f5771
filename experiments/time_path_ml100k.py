"""Does a live time path help on real data?  MMM4Rec official vs time-path switches vs no time, ML-100k, several seeds.

    python -m experiments.time_path_ml100k --variants official live notime --seeds 0 1 2 --epochs 5 --out tp.jsonl
    python -m experiments.time_path_ml100k --summarize tp.jsonl          # mean +- std and paired differences
    python -m experiments.time_path_ml100k --summarize tp.jsonl --base notime
    # ML-1M (experiments/movielens.py) at an equal CPU budget, with RecBole SASRec (batch 256, lr 1e-3) on the same split
    python -m experiments.time_path_ml100k --dataset ml1m --encoder hashed --variants official live notime sasrec \
        --seeds 0 1 2 --cpu-budget 240 --eval-every 300 --epochs 50 --out ml1m.jsonl

--cpu-budget S: every run trains until its training has used S process CPU seconds (checked before each optimizer
step; validation, test and data loading excluded): MMM4Rec through ml100k_vs_sasrec.fit_timed's budget (the Trainer
stops at a step boundary, validates, tests the best-valid state), SASRec through ml100k_vs_sasrec.recbole_cpu_budget
(RecBole's own loop, batches drawn from one continuing shuffled pass).  Both validate every --eval-every batches
(MMM4Rec: "epochs" of --eval-every batches, each the first batches of a fresh shuffle) and after the last one;
the test metrics are those of the best-valid evaluation.  SASRec's split is checked equal to ours (verify_split).

The data, split and model widths are those of experiments/ml100k_vs_sasrec.py (its `mmm4rec` rows: ML-100k from the
recbole 1.2.1 wheel, 5-core, leave-one-out, history 20, MiniLM text features, no images; hidden 64, headdim 16,
d_state 16, ngroups 8, FFN 64, 1 layer, torch backend, full-softmax CE, NAdam, weight decay 0.005, seen items ranked).
Every (variant, seed) runs exactly --epochs epochs (patience = epochs: no early stop, so every variant gets the same
number of optimizer steps) and reports the test metrics of its best-valid-NDCG@10 epoch.  The variants differ only in
the MMM4RecConfig time-path switches (VARIANTS below); the Trainer builds every run's optimizer from
mmm4rec.model.layers.param_groups (time-path weight decay 0 where the config says so; one group = model.parameters()
otherwise).  The seed fixes the initialisation, the batch order and the dropout streams; the switches add no
parameters, so official and live draw the same initial weights; notime has no time-path parameters, so its draws
after them differ.  Paired differences are taken per seed.
Each line of --out: variant, seed, switches, test/valid metrics, epochs, best_epoch, train CPU-s, wall-s, env.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "official": dict(),
    "notime": dict(use_time=False),
    # the chosen switch set (docs/time_path.md): scale-free time MLP input and pre-activation, no decay on the time path
    "live": dict(time_input_norm=True, time_shrink="normalized", time_weight_decay=False),
    "live-wd": dict(time_input_norm=True, time_shrink="normalized"),
    "identity-gain2": dict(fourier_init="identity", time_mlp_gain=2.0),
    "sasrec": None,      # RecBole SASRec on the same split (export + verify_split of ml100k_vs_sasrec)
}
METRICS = ("ndcg@10", "ndcg@20", "recall@10", "recall@20")


def run(data, variant: str, seed: int, a, data_root=None, verified=None) -> dict:
    import torch

    from experiments.ml100k_vs_sasrec import MMM4REC_SMALL, fit_timed, run_sasrec
    from mmm4rec.model import MMM4RecConfig
    from mmm4rec.train import Trainer, build_model, set_seed
    torch.set_num_threads(a.threads)
    budget = a.cpu_budget is not None
    if variant == "sasrec":
        # RecBole SASRec (ml100k_vs_sasrec's defaults) with --sasrec-batch / --sasrec-lr; under --cpu-budget a RecBole
        # "epoch" is --eval-every batches of a continuing pass, validated after each, as MMM4Rec's below
        sa = argparse.Namespace(epochs=a.epochs, patience=a.epochs,
                                device="cpu", progress=False, threads=a.threads)
        r = run_sasrec(data, seed, sa, data_root, verified, cpu_budget=a.cpu_budget,
                       chunk=a.eval_every if budget else None, train_batch_size=a.sasrec_batch,
                       learning_rate=a.sasrec_lr)
        cpu_s = r["cpu_s"] if budget else r["cpu_ms_per_sample"] * r["train_samples_per_epoch"] * r["epochs"] / 1000
        return dict(test=r["test"], valid_ndcg10=r["valid_ndcg10"], epochs=r["epochs"], best_epoch=r["best_epoch"],
                    train_cpu_s=cpu_s, batches=r["batches"], wall_s=r["wall_s"], split_verified=r["split_verified"],
                    switches=dict(train_batch_size=a.sasrec_batch, learning_rate=a.sasrec_lr))
    set_seed(seed)
    cfg = MMM4RecConfig(max_len=data.max_len, backend="torch", feat_dim=int(data.text_feats.shape[1]),
                        **MMM4REC_SMALL, **VARIANTS[variant])
    model = build_model(cfg, data)
    # under --cpu-budget: "epochs" of --eval-every batches (each the first batches of a fresh shuffle), validated after
    # each, until the training CPU seconds reach the budget; otherwise exactly --epochs full epochs
    epochs = 10 ** 6 if budget else a.epochs
    tr = Trainer(model, data, lr=a.lr, weight_decay=0.005, batch_size=a.batch_size, epochs=epochs,
                 patience=epochs, metric="ndcg@10", mode="full", seed=seed, device="cpu", progress=False,
                 ks=(10, 20), max_batches=a.eval_every if budget else a.max_batches, exclude_seen=False,
                 checkpoint_every_s=None)
    s, cpu, wall = fit_timed(tr, cpu_budget=a.cpu_budget)
    return dict(test={m: float(s["test"][m]) for m in METRICS}, valid_ndcg10=float(s["best_valid"]),
                epochs=s["epochs_run"], best_epoch=s["best_epoch"], train_cpu_s=sum(cpu),
                batches=s["total_batches"], wall_s=wall, switches=VARIANTS[variant])


def _ms(xs):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def summarize(path: str, base: str = "official") -> str:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by = {}
    for r in rows:
        by.setdefault(r["variant"], {})[r["seed"]] = r
    out = [f"| variant | seeds | NDCG@10 | NDCG@20 | Recall@10 | Recall@20 | paired diff vs {base}: "
           "NDCG@10; Recall@10 (mean ± std over seeds) | best epochs | train CPU-s / run | batches / run |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for v, runs in by.items():
        seeds = sorted(runs)
        cells = []
        for m in METRICS:
            mean, sd = _ms([runs[s]["test"][m] for s in seeds])
            cells.append(f"{mean:.4f} ± {sd:.4f}")
        common = [s for s in seeds if s in by.get(base, {})]
        if v != base and common:
            parts = []
            for m in ("ndcg@10", "recall@10"):
                dm, dsd = _ms([runs[s]["test"][m] - by[base][s]["test"][m] for s in common])
                parts.append(f"{dm:+.4f} ± {dsd:.4f} (mean/SE {dm / (dsd / math.sqrt(len(common))):+.1f})")
            diff = "; ".join(parts) + f" (n={len(common)})"
        else:
            diff = "-"
        cpu, _ = _ms([runs[s]["train_cpu_s"] for s in seeds])
        best = ",".join(f"{runs[s]['best_epoch']:.3g}" for s in seeds)
        out.append(f"| {v} | {','.join(map(str, seeds))} | " + " | ".join(cells) +
                   f" | {diff} | {best} | {cpu:.0f} | "
                   f"{','.join(str(runs[s].get('batches', '-')) for s in seeds)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["official", "live", "notime"], choices=sorted(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5,
                    help="every run trains exactly this many epochs (--cpu-budget: SASRec's cap on --eval-every chunks)")
    ap.add_argument("--lr", type=float, default=1e-3, help="NAdam lr (ml100k_vs_sasrec's MMM4Rec default 1e-3)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-batches", type=int, default=None, help="cap batches per epoch (smoke runs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--encoder", default="minilm", choices=["minilm", "hashed"])
    ap.add_argument("--dataset", default="ml100k", choices=["ml100k", "ml1m"], help="experiments/movielens.py")
    ap.add_argument("--cpu-budget", type=float, default=None,
                    help="train every run for this many process CPU seconds (validation excluded) instead of --epochs")
    ap.add_argument("--eval-every", type=int, default=500, help="--cpu-budget: validate every this many batches")
    ap.add_argument("--sasrec-batch", type=int, default=256, help="SASRec train batch (RecBole's default: 2048)")
    ap.add_argument("--sasrec-lr", type=float, default=1e-3, help="SASRec Adam lr (RecBole's default)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize", default=None, metavar="FILE.jsonl")
    ap.add_argument("--base", default="official", help="--summarize: the variant paired differences are taken against")
    a = ap.parse_args(argv)
    if a.summarize:
        print(summarize(a.summarize, a.base))
        return 0
    if not a.out:
        ap.error("--out is required")
    import platform
    import subprocess

    import torch
    torch.set_num_threads(a.threads)
    from experiments.movielens import load_dataset
    data = load_dataset(a.dataset, max_len=20, encoder=a.encoder)
    print(data.describe(), flush=True)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    env = dict(torch=torch.__version__, threads=a.threads, host=platform.node(), commit=commit,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), epochs=a.epochs, lr=a.lr,
               batch_size=a.batch_size, max_batches=a.max_batches, encoder=a.encoder, dataset=a.dataset,
               cpu_budget=a.cpu_budget, eval_every=a.eval_every if a.cpu_budget else None)
    out = os.path.abspath(a.out)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="time_path-") as tmp:
        if "sasrec" in a.variants:
            from experiments.ml100k_vs_sasrec import export_atomic
            export_atomic(data, tmp)
            os.chdir(tmp)   # RecBole writes ./log and ./log_tensorboard
        verified: dict = {}
        try:
            for seed in a.seeds:
                for v in a.variants:
                    print(f"run {v} seed {seed} ...", flush=True)
                    res = run(data, v, seed, a, tmp, verified)
                    row = dict(variant=v, seed=seed, env=env, **res)
                    with open(out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"  {v} seed {seed}: test NDCG@10 {res['test']['ndcg@10']:.4f} Recall@10 "
                          f"{res['test']['recall@10']:.4f} (best epoch {res['best_epoch']}/{res['epochs']}, train "
                          f"CPU {res['train_cpu_s']:.0f}s, {res['batches']} batches, wall {res['wall_s']:.0f}s)",
                          flush=True)
        finally:
            os.chdir(cwd)
    print(summarize(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
