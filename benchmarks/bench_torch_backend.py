"""CPU timing of the torch backend (mmm4rec_kernels/torch_backend.py) against the previous torch path (the float64
oracle's quadratic / chunked forms run in the input dtype, which is what `backend="torch"` ran before issue 10).

    python benchmarks/bench_torch_backend.py                 # default shapes, fp32, fwd and fwd+bwd
    python benchmarks/bench_torch_backend.py --reps 3 --threads 2

Prints one line per (shape, path, pass): median ms of the old and the new path and the median over repetitions of the
ratio new / old (< 1: faster), old and new timed alternately so that load from other processes hits both alike.
Both sides get identical fp32 inputs with right padding (lengths = L and L // 2); the backward uses a dense random
cotangent (y.sum().backward() would pass an expanded one, which made matmul-based backwards ~17x slower on CPU:
torch_backend uses einsums, which do not have that trap).  Timings on a shared machine are
noisy: compare the ratio within one run."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmm4rec_kernels import reference, torch_backend

SHAPES = {  # name: (b, L, H, P, G, n)
    "paper (L=20)": (256, 20, 8, 64, 8, 64),
    "L=64": (32, 64, 8, 64, 8, 64),
    "L=256": (4, 256, 4, 64, 1, 64),
}


def inputs(b, L, H, P, G, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    d = dict(x=r(b, L, H, P), dt=r(b, L, H), A=-torch.rand(H, generator=g) - 0.1, B=r(b, L, G, n), C=r(b, L, G, n),
             time_scale=torch.rand(b, L, H, generator=g), dt_bias=r(H), D=r(H))
    lengths = torch.tensor([L if i % 2 == 0 else max(1, L // 2) for i in range(b)])
    return d, lengths


def old_path(path, d, lengths, chunk):
    fn = reference.tissd_quadratic_ref if path == "quadratic" else reference.tissd_chunked_ref
    kw = {} if path == "quadratic" else dict(chunk_size=chunk)
    return fn(d["x"], d["dt"], d["A"], d["B"], d["C"], time_scale=d["time_scale"], dt_bias=d["dt_bias"], D=d["D"],
              lengths=lengths, **kw)


def new_path(path, d, lengths, chunk):
    return torch_backend.tissd_torch(d["x"], d["dt"], d["A"], d["B"], d["C"], time_scale=d["time_scale"],
                                     dt_bias=d["dt_bias"], D=d["D"], lengths=lengths, path=path, chunk_size=chunk)


def timed_pair(fn_old, fn_new, reps):
    """Alternate old / new; returns (median ms old, median ms new, median of the per-repetition ratios new / old)."""
    fn_old(), fn_new()  # warm-up
    t_old, t_new = [], []
    for _ in range(reps):
        for fn, ts in ((fn_old, t_old), (fn_new, t_new)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    ratio = statistics.median(n / o for n, o in zip(t_new, t_old))
    return 1e3 * statistics.median(t_old), 1e3 * statistics.median(t_new), ratio


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, median of {args.reps}")
    print(f"{'shape':<14} {'path':<10} {'pass':<8} {'old ms':>9} {'new ms':>9} {'new/old':>8}")
    for name, shape in SHAPES.items():
        d, lengths = inputs(*shape)
        for path in ("quadratic", "chunked"):
            for mode in ("fwd", "fwd+bwd"):
                steps = []
                for impl in (old_path, new_path):
                    if mode == "fwd":
                        def step(impl=impl):
                            with torch.no_grad():
                                impl(path, d, lengths, args.chunk)
                    else:
                        leaves = {k: v.clone().requires_grad_() for k, v in d.items()}
                        dy = torch.randn(d["x"].shape, generator=torch.Generator().manual_seed(1))

                        def step(impl=impl, leaves=leaves, dy=dy):  # a dense cotangent, as a real loss gives
                            impl(path, leaves, lengths, args.chunk).backward(dy)
                    steps.append(step)
                ms_old, ms_new, ratio = timed_pair(*steps, args.reps)
                print(f"{name:<14} {path:<10} {mode:<8} {ms_old:9.2f} {ms_new:9.2f} {ratio:8.2f}", flush=True)


if __name__ == "__main__":
    main()
