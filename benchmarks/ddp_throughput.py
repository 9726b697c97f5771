"""Training throughput (samples/s) at 1 vs N processes under torchrun/DDP, on the Office-sized synthetic domain.

    python benchmarks/ddp_throughput.py --nprocs 1 2 4 8 --device cuda          # on a GPU node (one GPU per rank)
    python benchmarks/ddp_throughput.py --nprocs 1 2 --device cpu --scale 0.02 --batches 4   # CPU smoke (gloo)

Each N runs `torchrun --nproc_per_node=N` of this file in worker mode: every rank builds the same synthetic domain
(paper Table 1 sizes x --scale), the official fine-tune model, and times --batches global batches of --batch-size
(after --warmup batches) with the real Trainer step (DDP, global batch split over the ranks).  Rank 0 prints one JSON
line; the driver prints a table: samples/s and the speed-up over N=1.  Numbers go to benchmarks/RESULTS.md with the
date, device and command (none measured yet: no multi-GPU node was lent).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(a) -> None:
    import torch

    from mmm4rec.data import make_paper_like
    from mmm4rec.distributed import init_distributed
    from mmm4rec.model import MMM4RecConfig
    from mmm4rec.train import Trainer, build_model

    ctx = init_distributed(a.device)
    data = make_paper_like("office", scale=a.scale, feat_dim=768, seed=0).to_sequential(max_len=20)
    torch.manual_seed(0)
    model = build_model(MMM4RecConfig(), data)
    tr = Trainer(model, data, batch_size=a.batch_size, epochs=1, progress=False, distributed=ctx, device=a.device,
                 max_batches=a.warmup + a.batches, checkpoint_every_s=None, validate=False)
    # warm-up, then time the rest of the epoch's capped batches
    tr.max_batches = a.warmup
    tr.train_epoch()
    tr.max_batches, tr.batch_in_epoch = a.warmup + a.batches, a.warmup
    t0 = time.perf_counter()
    tr.train_epoch()
    secs = time.perf_counter() - t0
    if ctx.is_main:
        print(json.dumps({"nprocs": ctx.world_size, "device": str(tr.device), "samples": a.batches * a.batch_size,
                          "seconds": secs, "samples_per_s": a.batches * a.batch_size / secs}), flush=True)
    tr.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the Office domain's size")
    p.add_argument("--batch-size", type=int, default=1024, help="GLOBAL batch (split over the ranks)")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for n in a.nprocs:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", os.path.abspath(__file__),
               "--worker", "--device", a.device, "--scale", str(a.scale), "--batch-size", str(a.batch_size),
               "--batches", str(a.batches), "--warmup", str(a.warmup)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"ddp_throughput: nprocs={n} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]))
    base = rows[0]["samples_per_s"]
    print(f"| procs | device | samples/s | speed-up vs {rows[0]['nprocs']} |\n|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['nprocs']} | {r['device']} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
