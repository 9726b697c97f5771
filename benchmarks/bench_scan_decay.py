"""The native scan (forward, and forward + backward) as the decay gets stronger: log-decays a ~ -U(0, scale) per
step, float32, 1 thread, at a long row (b 1, L 200, H 4, P 32, G 1, n 16: the blocked path) and a batch of short
ones (b 256, L 20, H 8, P 16, G 8, n 16, lengths 1..20: fp32's short path).  With strong decay most pairs' exp(seg)
fall below e^-60; the kernels give them 0 (no denormal products) with an inlined vector exp (activations.h:
decay_exp), so the time should not grow with the decay; before, libmvec's exp computed such lanes one by one (GCC
folds exp_nonpos's clamp) and the long row ran ~6.5x slower at scale 3-20.

    python benchmarks/bench_scan_decay.py
    python benchmarks/bench_scan_decay.py --shapes 64,50,4,32,2,16 --rounds 11

Each round times every scale in turn (a block of calls each), so all see the same machine state; medians of rounds.
"""
import argparse
import statistics
import time

import torch

import mmm4rec_kernels.cpu as native

SCALES = (0.1, 1.0, 3.0, 20.0)


def case(shape, scale, g):
    b, L, H, P, G, n = shape
    x, gy = torch.randn(b, L, H, P, generator=g), torch.randn(b, L, H, P, generator=g)
    delta = torch.rand(b, L, H, generator=g) * 0.1
    B, C = torch.randn(b, L, G, n, generator=g), torch.randn(b, L, G, n, generator=g)
    lengths = torch.full((b,), L) if b == 1 else torch.randint(1, L + 1, (b,), generator=g)
    args = (x, delta, -torch.rand(b, L, H, generator=g) * scale, B, C, torch.ones(H, P), lengths, True)
    fwd = lambda: native.scan_forward(*args)                               # noqa: E731
    return fwd, lambda: (fwd(), native.scan_backward(gy, *args))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["1,200,4,32,1,16", "256,20,8,16,8,16"], help="b,L,H,P,G,n")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {native.status()}")
    print("| b, L, H, P, G, n | decay scale | fwd us | fwd / weak | fwd + bwd us | fwd + bwd / weak |")
    print("|---|---|---|---|---|---|")
    for text in a.shapes:
        shape = tuple(map(int, text.split(",")))
        g = torch.Generator().manual_seed(0)
        calls = {s: case(shape, s, g) for s in SCALES}
        reps = max(1, int(4e5 / (shape[0] * shape[1] ** 2 * shape[2])))
        times = {(s, d): [] for s in SCALES for d in range(2)}
        for _ in range(a.rounds):
            for s, fns in calls.items():
                for d, f in enumerate(fns):
                    f()
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        f()
                    times[s, d].append((time.perf_counter() - t0) / reps * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        for s in SCALES:
            print(f"| {text} | {s} | {med[s, 0]:.0f} | {med[s, 0] / med[SCALES[0], 0]:.2f} | {med[s, 1]:.0f} | "
                  f"{med[s, 1] / med[SCALES[0], 1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
