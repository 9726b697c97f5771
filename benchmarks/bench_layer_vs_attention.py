"""TimeAwareSSD vs nn.MultiheadAttention as the mixer of an SR model, on CPU: one layer call, equal d_model.

    python benchmarks/bench_layer_vs_attention.py                   # the table: (b, L) in {1, 8, 128} x {50, 200}
    python benchmarks/bench_layer_vs_attention.py --retain-freed-memory     # glibc keeping freed memory (as training)
    python benchmarks/bench_layer_vs_attention.py --threads 2 --d-model 64 --profile 1,200
    pytest benchmarks/bench_layer_vs_attention.py --benchmark-only

eval: one forward under no_grad (serving a batch of histories); train: the parameters' .grad set to None (as
optimizer.zero_grad() does), forward, backward of sum(y * w): a training step's share of the layer.
Attention: nn.MultiheadAttention(d_model, 2 heads, batch_first) with a causal mask and key_padding_mask, as SASRec
uses it. Ours: TimeAwareSSD.for_recsys(d_model) with timestamps and lengths (right padding). Medians of interleaved
repetitions (both see the same machine state); the ratio is ours / attention.
--profile B,L prints where our time goes for one call (torch.profiler, top ops by self CPU time).
--infer-crossover times our eval call on the CPU inference path (quadratic form, modules/layer_cpu.py) against the
general path's chunked form at longer L (--infer-shapes 8,1600 8,2400: others): the data behind CPU_INFER_MAX_LEN.
Under no_grad on CPU our layer takes the inference path (4 torch ops + 3 native calls) up to that length; training
calls take the general path (torch backend: native conv, native quadratic scan up to dispatch.CPU_CROSSOVER,
native gated RMSNorm).
"""
from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
import torch.nn as nn

from mmm4rec_kernels.modules import TimeAwareSSD

SHAPES = [(1, 50), (8, 50), (128, 50), (1, 200), (8, 200), (128, 200)]


def make(d_model, b, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, L, d_model, generator=g)
    t = 1.6e9 + torch.cumsum(torch.rand(b, L, generator=g, dtype=torch.float64) * 3600, 1)
    lengths = torch.randint(max(1, L // 2), L + 1, (b,), generator=g)
    lengths[0] = L
    return h, t, lengths


class Attention(nn.Module):
    """SASRec's mixer: causal self-attention with padding masked."""

    def __init__(self, d_model, heads=2):
        super().__init__()
        self.mha = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.params = list(self.parameters())

    def forward(self, h, t, lengths):
        L = h.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=h.device).triu(1)
        pad = torch.arange(L, device=h.device)[None, :] >= lengths[:, None]
        return self.mha(h, h, h, attn_mask=causal, key_padding_mask=pad, need_weights=False)[0]


class Ours(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.ssd = TimeAwareSSD.for_recsys(d_model)
        self.params = list(self.parameters())

    def forward(self, h, t, lengths):
        return self.ssd(h, t, lengths=lengths)


def call(model, inputs, mode):
    if mode == "eval":
        with torch.no_grad():
            model(*inputs)
        return
    for p in model.params:                  # as a training step's optimizer.zero_grad(): .grad set, not accumulated
        p.grad = None
    h = inputs[0].detach().requires_grad_()
    y = model(h, *inputs[1:])
    y.backward(torch.ones_like(y))


def measure(d_model, b, L, mode, reps):
    torch.manual_seed(0)
    models = {"ours": Ours(d_model), "attention": Attention(d_model)}
    for m in models.values():
        m.train(mode == "train")
    inputs = make(d_model, b, L)
    times = {k: [] for k in models}
    for m in models.values():
        for _ in range(3):
            call(m, inputs, mode)                            # warm-up (native library, caches)
    n = max(1, int(2000 / max(1, b * L) ** 0.5))             # more calls per sample for small shapes
    for _ in range(reps):
        for name, m in models.items():
            t0 = time.perf_counter()
            for _ in range(n):
                call(m, inputs, mode)
            times[name].append((time.perf_counter() - t0) / n * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def profile(d_model, b, L, mode):
    from torch.profiler import ProfilerActivity, profile as prof
    m = Ours(d_model).train(mode == "train")
    inputs = make(d_model, b, L)
    for _ in range(3):
        call(m, inputs, mode)
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(20):
            call(m, inputs, mode)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def infer_crossover(d_model, reps, shapes=((8, 200), (8, 400), (8, 800), (64, 400))):
    """Eval ms of the inference path (path='quadratic') vs the general chunked path (path='chunked')."""
    print("| b | L | inference path (quadratic) ms | general path (chunked) ms | ratio |")
    print("|---|---|---|---|---|")
    for b, L in shapes:
        torch.manual_seed(0)
        quad = TimeAwareSSD.for_recsys(d_model, path="quadratic").eval()
        chunked = TimeAwareSSD.for_recsys(d_model, path="chunked").eval()
        chunked.load_state_dict(quad.state_dict())
        h, t, lengths = make(d_model, b, L)
        times = {"q": [], "c": []}
        with torch.no_grad():
            for m in (quad, chunked):
                m(h, t, lengths=lengths)
            for _ in range(reps):
                for key, m in (("q", quad), ("c", chunked)):
                    t0 = time.perf_counter()
                    m(h, t, lengths=lengths)
                    times[key].append((time.perf_counter() - t0) * 1e3)
        q, c = statistics.median(times["q"]), statistics.median(times["c"])
        print(f"| {b} | {L} | {q:.2f} | {c:.2f} | {q / c:.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--modes", default="eval,train")
    ap.add_argument("--profile", default=None, metavar="B,L")
    ap.add_argument("--infer-crossover", action="store_true", help="inference path vs chunked at longer L")
    ap.add_argument("--infer-shapes", nargs="+", default=["8,200", "8,400", "8,800", "64,400"], metavar="B,L",
                    help="the (batch, length) pairs of --infer-crossover")
    ap.add_argument("--retain-freed-memory", action="store_true",
                    help="glibc keeps freed memory for reuse, as `mmm4rec` training does (both models gain)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import mmm4rec_kernels.cpu as native
    allocator = native.retain_freed_memory() if a.retain_freed_memory else "glibc's default malloc"
    if a.infer_crossover:
        infer_crossover(a.d_model, a.reps, [tuple(map(int, x.split(","))) for x in a.infer_shapes])
        return
    if a.profile:
        b, L = map(int, a.profile.split(","))
        for mode in a.modes.split(","):
            print(f"## {mode}, b={b}, L={L}")
            profile(a.d_model, b, L, mode)
        return
    print(f"# torch {torch.__version__}, {a.threads} thread(s), d_model {a.d_model}; {native.status()}; {allocator}")
    print("| mode | b | L | ours ms | attention ms | ours / attention |")
    print("|---|---|---|---|---|---|")
    for mode in a.modes.split(","):
        for b, L in SHAPES:
            r = measure(a.d_model, b, L, mode, a.reps)
            print(f"| {mode} | {b} | {L} | {r['ours']:.3f} | {r['attention']:.3f} | {r['ours'] / r['attention']:.2f} |",
                  flush=True)


@pytest.mark.parametrize("model", ["ours", "attention"])
@pytest.mark.parametrize("b,L", [(1, 50), (8, 200)])
def test_layer_eval(benchmark, model, b, L):
    m = (Ours(64) if model == "ours" else Attention(64)).eval()
    inputs = make(64, b, L)
    benchmark(call, m, inputs, "eval")


if __name__ == "__main__":
    main()
