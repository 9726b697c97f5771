"""The native CPU scan and conv kernels of this tree against those of a previous commit, in one process: both
libraries are loaded side by side (the previous one built from `git archive <commit>` into a temp dir), outputs
preallocated, old, new and the bytes floor alternating per round; medians of the per-round ratios.  float32, 1
thread.  floor: one copy_ of every byte fwd + bwd read and write (bench_cpu_kernels.py's definition); with outputs
preallocated it shows the kernels' own distance from it (bench_cpu_kernels.py's kernel cases also allocate them).

    python benchmarks/bench_native_ab.py --previous c037b3e
    python benchmarks/bench_native_ab.py --previous c037b3e --shapes 256,20,8,16,8,16 1,200,4,32,1,16 \
        --conv 256,20,384,4
    python benchmarks/bench_native_ab.py --previous HEAD~1 --pairs 300     # single calls alternating: small changes

A shape is b,L,H,P,G,n (lengths uniform in 1..L).  The scan's C entry points (mmm4rec_ssd_quadratic_fwd / _bwd) kept
their signature since they were written; the conv's (mmm4rec_conv_fwd / _bwd) since 92c5b5f (older commits: pass
--conv none).
"""
from __future__ import annotations

import argparse
import ctypes
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

try:                                    # pytest imports this as benchmarks.bench_native_ab; the script runs alone
    from benchmarks.bench_cpu_kernels import floor_copy
except ImportError:
    from bench_cpu_kernels import floor_copy

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = ["256,20,8,16,8,16", "256,20,8,64,8,64", "256,20,8,64,1,64", "128,200,4,32,1,16", "1,200,4,32,1,16"]


def previous_library(commit: str, cache: str) -> str:
    """Path of the native library built from `commit`'s sources (its own build code, in a fresh process)."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True, text=True,
                          check=True).stdout.strip()
    tar = subprocess.run(["git", "archive", commit, "mmm4rec_kernels"], cwd=root, capture_output=True, check=True)
    src = tempfile.mkdtemp(prefix="mmm4rec_ab_")
    tarfile.open(fileobj=io.BytesIO(tar.stdout)).extractall(src)
    code = "import mmm4rec_kernels.cpu as n; n.library(); print(n.status())"
    out = subprocess.run([sys.executable, "-c", code], cwd=src, env=dict(os.environ, PYTHONPATH=src,
                         MMM4REC_CACHE_DIR=cache), capture_output=True, text=True, check=True).stdout
    return out.strip().split(": ", 1)[1].split(" ")[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--previous", required=True, help="git commit whose native scan is compared")
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--conv", nargs="+", default=["256,20,384,4"], help="B,L,C,k shapes of the conv ('none': skip)")
    ap.add_argument("--pairs", type=int, default=0, metavar="N",
                    help="N single calls per entry, old and new alternating (medians of pair ratios; ignores --rounds)")
    args = ap.parse_args()
    global PAIRS
    PAIRS = args.pairs
    import mmm4rec_kernels.cpu as native
    torch.set_num_threads(1)
    new = native.library()
    if new is None:
        raise SystemExit(native.status())
    old = ctypes.CDLL(previous_library(args.previous, tempfile.mkdtemp(prefix="mmm4rec_ab_cache_")))
    for name in ("mmm4rec_ssd_quadratic_fwd_f32", "mmm4rec_ssd_quadratic_bwd_f32"):
        getattr(old, name).argtypes, getattr(old, name).restype = getattr(new, name).argtypes, None
    p = native._ptr
    print(f"previous = {args.previous}")
    print("| b, L, H, P, G, n | fwd new / old (ms) | bwd new / old (ms) | fwd ratio | bwd ratio "
          "| fwd + bwd new / floor |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        b, L, H, P, G, n = map(int, shape.split(","))
        g = torch.Generator().manual_seed(0)
        x, gy = torch.randn(b, L, H, P, generator=g), torch.randn(b, L, H, P, generator=g)
        delta = torch.rand(b, L, H, generator=g) * 0.1
        a = -torch.rand(b, L, H, generator=g) * 0.1
        B, C = torch.randn(b, L, G, n, generator=g), torch.randn(b, L, G, n, generator=g)
        D, lens = torch.ones(H, P), torch.randint(1, L + 1, (b,), generator=g)
        y = torch.empty_like(x)
        grads = [torch.empty_like(t) for t in (x, delta, a, B, C)] + [torch.zeros(H, P)]
        ins = [p(t) for t in (x, delta, a, B, C, lens, D)]
        dims = (b, L, H, P, G, n, 1)
        calls = {lib_name: (lambda lib=lib: lib.mmm4rec_ssd_quadratic_fwd_f32(*ins, 1, p(y), *dims),
                            lambda lib=lib: lib.mmm4rec_ssd_quadratic_bwd_f32(*ins, 1, p(gy), *map(p, grads), *dims))
                 for lib_name, lib in (("old", old), ("new", new))}
        inputs = x.numel() + 2 * delta.numel() + 2 * B.numel()
        calls["floor"] = (floor_copy(2 * inputs + x.numel(), x.numel() + inputs), lambda: None)
        t = alternate(calls, max(1, int(2e6 / (b * L * L * H))), args.rounds)
        med = {key: statistics.median(v) for key, v in t.items()}
        ratio = [statistics.median([nw / od for nw, od in zip(t["new", d], t["old", d])]) for d in (0, 1)]
        floor = "–"                          # pair mode times no floor
        if not PAIRS:
            per_round = [(n0 + n1) / f for n0, n1, f in zip(t["new", 0], t["new", 1], t["floor", 0])]
            floor = f"{statistics.median(per_round):.2f}"
        print(f"| {shape} | {med['new', 0]:.3f} / {med['old', 0]:.3f} | {med['new', 1]:.3f} / {med['old', 1]:.3f} | "
              f"{ratio[0]:.2f} | {ratio[1]:.2f} | {floor} |", flush=True)
    if args.conv != ["none"]:
        conv_table(args, native, old)


PAIRS = 0                               # --pairs N: N single calls per entry, alternating old / new (set in main)


def alternate(calls, reps, rounds):
    """{(name, i): [ms per call, one per round]}: every function of every entry timed in turn, each round.  With
    --pairs N instead: N rounds of ONE call per entry (no floor), the order of old and new swapped every round,
    so each new / old pair saw the same moment of the machine (steadier ratios on a box whose speed swings)."""
    if PAIRS:                           # the floor copy flushes the caches: whichever call ran after it would run
        reps, rounds = 1, PAIRS         # cold (new, in every other round: 1.08x on identical fwd code); not timed
        calls = {k: fns for k, fns in calls.items() if k != "floor"}
    t = {(k, d): [] for k, fns in calls.items() for d in range(len(fns))}
    for r in range(rounds):
        order = list(calls.items())
        if PAIRS and r % 2:
            order.reverse()
        for k, fns in order:
            for d, fn in enumerate(fns):
                t0 = time.perf_counter() if PAIRS else time.thread_time()
                for _ in range(reps):
                    fn()
                t[k, d].append(((time.perf_counter() if PAIRS else time.thread_time()) - t0) / reps * 1e3)
    return t


def conv_table(args, native, old):
    """The causal conv + SiLU kernels, fwd + bwd, new / old and each / the bytes floor (fwd reads x, writes y; bwd
    reads gy and x, writes dx)."""
    new = native.library()
    for name in ("mmm4rec_conv_fwd_f32", "mmm4rec_conv_bwd_f32"):
        getattr(old, name).argtypes, getattr(old, name).restype = getattr(new, name).argtypes, None
    print("\n| B, L, C, k | conv fwd + bwd new / old (ms) | new / old | new / floor | old / floor |")
    print("|---|---|---|---|---|")
    for shape in args.conv:
        B, L, C, k = map(int, shape.split(","))
        g = torch.Generator().manual_seed(0)
        x, gy = torch.randn(B, L, C, generator=g), torch.randn(B, L, C, generator=g)
        w, bias = torch.randn(C, k, generator=g), torch.randn(C, generator=g)
        y, dx, dw, db = torch.empty_like(x), torch.empty_like(x), torch.empty(C, k), torch.empty(C)
        pieces = (ctypes.c_int64 * 5)(gy.data_ptr(), 0, C, gy.stride(0), gy.stride(1))

        def run(lib):
            lib.mmm4rec_conv_fwd_f32(x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(), k, 1, bias.data_ptr(),
                                     y.data_ptr(), B, L, C, k, 1, 1)
            lib.mmm4rec_conv_bwd_f32(x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(), k, 1, bias.data_ptr(), B,
                                     L, C, k, 1, 1, pieces, dx.data_ptr(), C, dw.data_ptr(), db.data_ptr(), 1)
        calls = {"new": (lambda: run(new),), "old": (lambda: run(old),), "floor": (floor_copy(3 * x.numel(),
                                                                                             2 * x.numel()),)}
        t = alternate(calls, max(1, int(2e7 / x.numel())), args.rounds)
        r = {(a, b_): statistics.median([p / q for p, q in zip(t[a, 0], t[b_, 0])])
             for a, b_ in (("new", "old"), ("new", "floor"), ("old", "floor")) if (b_, 0) in t}
        print(f"| {shape} | {statistics.median(t['new', 0]):.3f} / {statistics.median(t['old', 0]):.3f} | "
              f"{r['new', 'old']:.2f} | "
              + ("– | – |" if PAIRS else f"{r['new', 'floor']:.2f} | {r['old', 'floor']:.2f} |"), flush=True)


if __name__ == "__main__":
    main()
