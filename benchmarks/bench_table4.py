"""pytest-benchmark wrapper of the Table 4 harness (benchmarks/table4.py): seconds per training epoch.

The timed call is Trainer.train_epoch() (batch assembly + fwd + bwd + NAdam, synchronised on GPU); one warm-up epoch
is not timed, then MMM4REC_TABLE4_EPOCHS - 1 timed epochs (default 3 -> 2 timed, pytest-benchmark's median).
extra_info holds the paper's Table 4 figures, scaled to our batch count, and the speedup.

    pytest benchmarks/ -k table4 --benchmark-only                     # GPU: full Table 1 sizes (scale 1.0)
    MMM4REC_TABLE4_SCALE=0.1 pytest benchmarks/ -k table4 --benchmark-only
    pytest benchmarks/ -k table4 --benchmark-disable                  # CI: Scientific at scale 0.01, 1 small batch

Without a GPU the sizes shrink (scale 0.01, batch 64 (quick: 32), 2 batches per epoch (quick: 1)): a smoke test of the harness on CPU,
not a Table 4 figure.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks.table4 import OFFICIAL_LOG, TABLE1, TABLE4, make_trainer

CUDA = torch.cuda.is_available()


@pytest.mark.table4
@pytest.mark.parametrize("dataset", list(TABLE1))
def test_table4(benchmark, dataset, quick):
    if quick and dataset != "scientific":
        pytest.skip("quick mode (--benchmark-disable): Scientific only")
    if CUDA:
        scale = float(os.environ.get("MMM4REC_TABLE4_SCALE", "1.0"))
        kw = dict(batch_size=1024, grad_accum=8, max_batches=None)
    else:
        scale = float(os.environ.get("MMM4REC_TABLE4_SCALE", "0.01"))
        kw = dict(batch_size=32 if quick else 64, grad_accum=8, max_batches=1 if quick else 2)
    epochs = max(2, int(os.environ.get("MMM4REC_TABLE4_EPOCHS", "3")))
    trainer, info = make_trainer(dataset, scale=scale, epochs=epochs, **kw)

    def one_epoch():
        s = trainer.train_epoch()
        trainer.epoch += 1
        return s

    benchmark.group = f"table4 scale {scale}" + ("" if CUDA else " (CPU smoke)")
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(scale=scale, device=torch.cuda.get_device_name(0) if CUDA else "cpu",
                                batch_size=kw["batch_size"], paper_table4_mmm4rec_missrec_mmsrec=TABLE4[dataset],
                                official_log_batches_seconds=OFFICIAL_LOG[dataset])
    benchmark.pedantic(one_epoch, rounds=epochs - 1, warmup_rounds=1, iterations=1)
    if benchmark.enabled and benchmark.stats is not None:
        med = benchmark.stats.stats.median
        ref = TABLE4[dataset][0] * info["batches"] / OFFICIAL_LOG[dataset][0]
        benchmark.extra_info.update(median_s=round(med, 4), paper_s_for_our_batches=round(ref, 4),
                                    speedup_vs_paper=round(ref / med, 3))
    assert trainer.last_loss == trainer.last_loss  # finite loss (not NaN)
