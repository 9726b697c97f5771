"""The native scan forward at one sequence of L 200 (H 4, P 32, n 16, float32, 1 thread) as the decay gets stronger:
log-decays a ~ -U(0, scale) per step.  With strong decay most pairs' exp(seg) fall below 1e-38; the kernel gives them
0, but GCC hands those lanes to libmvec's vector exp anyway (it folds the clamp, activations.h: exp_nonpos), which
computes them one by one, so the time grows with the decay although the arithmetic does not.

    python benchmarks/bench_scan_decay.py
"""
import statistics
import time

import torch

import mmm4rec_kernels.cpu as native


def main(b=1, L=200, H=4, P=32, G=1, n=16, reps=200, rounds=7):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(b, L, H, P, generator=g), torch.rand(b, L, H, generator=g) * 0.1
    B, C = torch.randn(b, L, G, n, generator=g), torch.randn(b, L, G, n, generator=g)
    D, lengths = torch.ones(H, P), torch.full((b,), L)
    print(f"# {native.status()}\n| decay scale | fwd us (median of {rounds}) | time / weak |\n|---|---|---|")
    base = None
    for scale in (0.1, 1.0, 3.0, 20.0):
        a = -torch.rand(b, L, H, generator=g) * scale
        for _ in range(10):
            native.scan_forward(x, delta, a, B, C, D, lengths, True)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                native.scan_forward(x, delta, a, B, C, D, lengths, True)
            times.append((time.perf_counter() - t0) / reps * 1e6)
        t = statistics.median(times)
        base = base or t
        print(f"| {scale} | {t:.1f} | {t / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
