"""CPU crossover of the TiSSD's two forms on the torch backend: the native quadratic scan vs the chunked einsums.

    python benchmarks/bench_cpu_crossover.py                 # table + the CPU_QUADRATIC_MAX_LEN it supports
    python benchmarks/bench_cpu_crossover.py --threads 2 --P 64 --n 64
    pytest benchmarks/bench_cpu_crossover.py --benchmark-only

Times one fwd+bwd of `tissd(..., backend="torch", path=...)` (median of interleaved repetitions, fp32) at growing L
for a fixed number of tokens, and prints the longest L at which the quadratic form is still not slower.
mmm4rec_kernels/dispatch.py's CPU_QUADRATIC_MAX_LEN holds the value this measured (see docs/kernels.md).
"""
from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

from mmm4rec_kernels import tissd

LENGTHS = (64, 128, 256, 512, 1024, 2048)


def make_inputs(L, tokens=8192, H=4, P=16, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = max(1, tokens // L)
    t = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    return dict(x=t(b, L, H, P), dt=t(b, L, H), A=(-torch.rand(H, generator=g) - 0.5).requires_grad_(),
                B=t(b, L, 1, n), C=t(b, L, 1, n))


def step(inp, path):
    y = tissd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], backend="torch", path=path, chunk_size=64)
    y.sum().backward()


def measure(L, reps, **shape):
    inp = make_inputs(L, **shape)
    times = {"quadratic": [], "chunked": []}
    for path in times:
        step(inp, path)                                   # warm-up
    for _ in range(reps):
        for path in times:                                # interleaved: both see the same machine state
            t0 = time.perf_counter()
            step(inp, path)
            times[path].append(time.perf_counter() - t0)
    return {p: statistics.median(v) * 1e3 for p, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--P", type=int, default=16)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import mmm4rec_kernels.cpu as native
    print(f"# {native.status()}; {a.threads} thread(s); tokens {a.tokens}, H {a.H}, P {a.P}, n {a.n}, fp32 fwd+bwd")
    print("| L | quadratic ms | chunked ms | quadratic / chunked |")
    print("|---|---|---|---|")
    best = 0
    for L in map(int, a.lengths.split(",")):
        r = measure(L, a.reps, tokens=a.tokens, H=a.H, P=a.P, n=a.n)
        ratio = r["quadratic"] / r["chunked"]
        print(f"| {L} | {r['quadratic']:.2f} | {r['chunked']:.2f} | {ratio:.2f} |", flush=True)
        if ratio <= 1.0 and best == L // 2 or (ratio <= 1.0 and best == 0):
            best = L
    print(f"longest measured L where quadratic <= chunked (contiguously from the shortest): {best}")


@pytest.mark.parametrize("path", ["quadratic", "chunked"])
@pytest.mark.parametrize("L", [64, 512])
def test_cpu_forms(benchmark, path, L):
    inp = make_inputs(L, tokens=2048)
    benchmark(step, inp, path)


if __name__ == "__main__":
    main()
