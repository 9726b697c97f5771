"""Table 4 harness: training seconds per epoch of MMM4Rec on synthetic domains with the paper's Table 1 sizes.

    python -m benchmarks.table4 [--scale 0.1] [--datasets scientific,pantry] [--epochs 3] [--json out.json]
    mmm4rec bench table4 --scale 0.01 --datasets scientific     (the same, when mmm4rec is imported from this checkout)

A benchmark helper, not part of the installed package: it lives in the source checkout (benchmarks/bench_table4.py
is its pytest-benchmark wrapper).

What is timed: `Trainer.train_epoch()` = one pass over the training samples (every prefix of each user's sequence
except the valid/test targets, interactions - 3 x users samples), batch assembly + forward + backward + NAdam step,
synchronised on GPU, validation excluded; the official fine-tune configuration (MMM4RecConfig defaults: hidden 256,
8 heads of 64, d_state 64, 1 layer, max_len 20, dropout 0.4; batch 1024, gradient accumulation 8, lr 1e-4, weight
decay 0.005, fp32 with TF32 matmuls). Epoch 1 (compilation, autotuning, allocator warm-up) is not counted: the
reported figure is the median of epochs 2..E.

Data: `make_paper_like` (mmm4rec/data/synthetic.py) with the exact Table 1 users / items / interactions (so the
average length matches) times --scale, 768-d text and image features, image coverage 100% (the paper gives no
per-domain image coverage; every item gets an image row), log-normal inter-arrival gaps (median ~1 day).
The paper's Table 4 ran on a 24 GB GPU with a per-sample Python Dataset (num_workers=0); our batches are gathered
from pre-built tensors on the device, so data loading is much cheaper here: the comparison is per training epoch,
the way each implementation ships.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

from mmm4rec.data.synthetic import PAPER_DATASETS

# Table 1 (users, items, interactions, avg length) and Table 4 (s/epoch: MMM4Rec, MISSRec, MMSRec) of the paper;
# official-log batches per epoch at batch 1024 and steady-state with-ID seconds per epoch (docs/design.md, "The paper's figures").
TABLE1 = PAPER_DATASETS  # users, items, interactions, avg length
TABLE4 = {
    "scientific": (2.07, 2.21, 2.72),
    "pantry": (5.58, 5.97, 6.43),
    "instruments": (9.08, 10.55, 12.25),
    "arts": (14.92, 25.15, 33.81),
    "office": (27.93, 41.06, 33.57),
}
OFFICIAL_LOG = {  # batches per epoch at 1024, steady-state training seconds per epoch (with-ID runs)
    "scientific": (34, 2.08), "pantry": (86, 5.16), "instruments": (131, 9.10), "arts": (253, 16.48),
    "office": (413, 27.9),
}
IMAGE_COVERAGE = 1.0  # not given per domain by the paper (docs/design.md): 100%


def parse_args(argv, prog=None):
    ap = argparse.ArgumentParser(prog=prog, description="Table 4: training seconds per epoch")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply users/items/interactions (1.0 = Table 1)")
    ap.add_argument("--datasets", default=",".join(TABLE1), help="comma list of " + ", ".join(TABLE1))
    ap.add_argument("--epochs", type=int, default=3, help="epochs per dataset (>= 2; epoch 1 is not counted)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--grad-accum", type=int, default=8)
    ap.add_argument("--no-id", action="store_true", help="time the variant without per-item bias tables "
                                                         "(default: with ID, like the official timing logs)")
    ap.add_argument("--backend", default="auto", help="mmm4rec_kernels backend (auto, triton, cuda, torch)")
    ap.add_argument("--path", default="auto", help="mmm4rec_kernels SSD path (auto, quadratic, chunked)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-tf32", action="store_true", help="plain fp32 matmuls (official: TF32 on)")
    ap.add_argument("--max-batches", type=int, default=None, help="cap batches per epoch (smoke runs)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training loss (Trainer(compile=True))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="save the results here")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.epochs < 2:
        ap.error("--epochs must be >= 2 (epoch 1 is warm-up and not counted)")
    if a.scale <= 0:
        ap.error("--scale must be > 0")
    names = [d.strip().lower() for d in a.datasets.split(",") if d.strip()]
    bad = [d for d in names if d not in TABLE1]
    if bad:
        ap.error(f"unknown dataset(s) {bad}; choose from {list(TABLE1)}")
    a.datasets = names
    return a


def make_trainer(name, scale=1.0, batch_size=1024, grad_accum=8, with_id=True, backend="auto", path="auto",
                 device="auto", tf32=True, max_batches=None, seed=0, epochs=3, compile=False, progress=False):
    """Synthetic Table 1 domain + official-config model + Trainer (no validation). Returns (trainer, info dict).
    progress=True shows a per-batch progress bar (stderr) while an epoch runs."""
    from mmm4rec.data.synthetic import make_paper_like
    from mmm4rec.model import MMM4RecConfig
    from mmm4rec.train import Trainer, build_model, resolve_device

    t0 = time.perf_counter()
    syn = make_paper_like(name, scale=scale, feat_dim=768, seed=seed, image_coverage=IMAGE_COVERAGE)
    data = syn.to_sequential(max_len=20, kcore=0)
    t_data = time.perf_counter() - t0
    cfg = MMM4RecConfig(with_id=with_id, backend=backend, path=path)
    dev = resolve_device(device)
    model = build_model(cfg, data, device=dev)
    trainer = Trainer(model, data, lr=1e-4, weight_decay=0.005, batch_size=batch_size, grad_accum=grad_accum,
                      epochs=epochs, mode="full", seed=seed, device=dev, tf32=tf32, progress=progress,
                      validate=False, max_batches=max_batches, compile=compile)
    nb = len(trainer.train_batches) if max_batches is None else min(max_batches, len(trainer.train_batches))
    info = dict(dataset=name, users=data.num_users, items=data.num_items, interactions=data.num_interactions,
                avg_len=round(data.num_interactions / max(data.num_users, 1), 2),
                train_samples=data.num_samples("train"), batches=nb, data_build_s=round(t_data, 2),
                model_params=sum(p.numel() for p in model.parameters()))
    return trainer, info


def time_dataset(name, scale=1.0, epochs=3, batch_size=1024, grad_accum=8, with_id=True, backend="auto",
                 path="auto", device="auto", tf32=True, max_batches=None, seed=0, log=print, compile=False,
                 progress=False):
    """Run `epochs` epochs of train_epoch(); returns the sizes plus epoch_seconds and their median over 2..E.
    progress=True: a per-batch progress bar while each epoch runs (the bar's own cost is a few us per batch)."""
    import torch

    log(f"  {name}: building the synthetic data (scale {scale}) and the model ...")
    trainer, out = make_trainer(name, scale, batch_size, grad_accum, with_id, backend, path, device, tf32,
                                max_batches, seed, epochs, compile, progress)
    log(f"  {name}: {out['train_samples']} training samples, {out['batches']} batches/epoch, "
        f"{out['model_params']} parameters (data built in {out['data_build_s']} s)")
    dev = trainer.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    secs = []
    for e in range(epochs):
        s = trainer.train_epoch()
        trainer.epoch += 1
        secs.append(s)
        log(f"  {name}: epoch {e + 1}/{epochs} {s:.3f} s  (loss {trainer.last_loss:.4f}, {out['batches']} batches)")
    med = statistics.median(secs[1:])
    out.update(epoch_seconds=[round(s, 4) for s in secs], median_s=round(med, 4),
               ms_per_batch=round(1e3 * med / max(out["batches"], 1), 2),
               peak_gpu_gib=round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None)
    del trainer
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def table(results, scale):
    """Markdown table: ours beside Table 4 (scaled by our batch count / the official batch count when scale < 1)."""
    lines = ["| dataset | users | items | inter. | avg len | batches | ours s/epoch (median ep. 2..) | ms/batch | "
             "paper MMM4Rec | MISSRec | MMSRec | official log (batches, s) | paper MMM4Rec x (batches ratio) | "
             "speedup vs paper MMM4Rec |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = TABLE4[r["dataset"]]
        ob, os_ = OFFICIAL_LOG[r["dataset"]]
        ref = p[0] * r["batches"] / ob  # the paper's time for as many batches as we ran (= p[0] at scale 1)
        lines.append(f"| {r['dataset']} | {r['users']} | {r['items']} | {r['interactions']} | {r['avg_len']} | "
                     f"{r['batches']} | {r['median_s']:.3f} | {r['ms_per_batch']:.1f} | {p[0]} | {p[1]} | {p[2]} | "
                     f"{ob}, {os_} | {ref:.3f} | {ref / r['median_s']:.3g}x |")
    return lines


def main(argv=None, prog="python -m benchmarks.table4") -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv, prog)
    import torch

    from mmm4rec.train import resolve_device
    log = (lambda *_: None) if a.quiet else (lambda s: print(s, flush=True))
    dev = resolve_device(a.device)
    devname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    info = dict(date=datetime.date.today().isoformat(), device=devname, torch=torch.__version__, scale=a.scale,
                epochs=a.epochs, batch_size=a.batch_size, grad_accum=a.grad_accum, with_id=not a.no_id,
                backend=a.backend, path=a.path, tf32=not a.no_tf32, max_batches=a.max_batches, compile=a.compile,
                image_coverage=IMAGE_COVERAGE, command=f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv))
    log(f"# Table 4 harness: {info}")
    results = []
    for name in a.datasets:
        results.append(time_dataset(name, a.scale, a.epochs, a.batch_size, a.grad_accum, not a.no_id, a.backend,
                                    a.path, a.device, not a.no_tf32, a.max_batches, a.seed, log, a.compile,
                                    progress=not a.quiet))
        if a.json:  # after every dataset, so a run cut short still leaves what it measured
            with open(a.json, "w") as f:
                json.dump(dict(info=info, results=results), f, indent=1)
    lines = [f"\nTable 4 (s/epoch, training loop incl. batch assembly, median of epochs 2..{a.epochs}) on {devname}, "
             f"{info['date']}, scale {a.scale}" + (f", max {a.max_batches} batches/epoch" if a.max_batches else "")]
    lines += table(results, a.scale)
    if a.scale != 1.0 or a.max_batches:
        lines.append("(scale < 1 or capped batches: 'paper MMM4Rec x (batches ratio)' is the paper's time scaled "
                     "to our batch count; the columns beside it are the paper's full-size figures)")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
