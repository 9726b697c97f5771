"""The native CPU kernels against the torch code they replace, forward + backward, at the hidden-64 training shape
(batch 256, max_len 20, lengths uniform 1..20): the xBC causal conv + SiLU ([256, 20, 384]) and one TiSSD call of the
torch backend (H 8, P 16, G 8, n 16, D skip, time scale).  1 CPU thread, float32.

    pytest benchmarks/bench_cpu_kernels.py --benchmark-only --benchmark-columns=median,iqr,rounds
    python benchmarks/bench_cpu_kernels.py --rounds 40     # native / floor as interleaved ratios (noisy machines)
    python benchmarks/bench_cpu_kernels.py --rounds 40 --retain-freed-memory   # the same, glibc keeping freed memory

"native" needs a C++ compiler (skipped without one); "torch" is the same call with the native library bypassed;
"floor" copies the bytes the call must move once (every input it reads, forward and backward, and every output and
gradient it writes, float32) with one tensor copy_ of (read + written) / 2 bytes: what the kernels would take if they
were bound by this thread's memory bandwidth alone (the ratio native / floor is how far they are from it).
Where the L3 holds the call's ~30-40 MB (a 32 MB L3: the Zen 5 box), that copy runs from and to the cache (~70 GB/s
there, vs ~40 from DRAM): script mode also reports the "DRAM floor", the same bytes at the rate this thread copies a
256 MiB buffer in the same round (the issue's first floor was bytes / a single thread's copy rate, then ~20 GB/s).
Gradients are set to None before each step, as optimizer.zero_grad() does (else every round would also time the
accumulation into .grad: one more read-read-write pass over each input, not part of the call).
The calls and kernels allocate their outputs (as they must: autograd keeps them); with glibc's default malloc a
freed output is given back to the kernel, and the next call's first write to each of its pages is a page fault
(--retain-freed-memory: mmm4rec_kernels.cpu.retain_freed_memory(), as `mmm4rec` training does; the floor allocates
nothing).
On a shared machine the speed of memory drifts between pytest-benchmark's cases (run one after the other); the
script mode times native and floor in alternation, a block of calls each per round, and reports the median of the
rounds' ratios with its quartiles, and the ratio of each side's best round (busy neighbours slow the compute-bound
kernels and the memory-bound floor by different amounts, so the per-round ratio swings with what they run).
test_causal_conv_kernel_fwd_bwd and test_tissd_scan_kernel_fwd_bwd time the native kernels alone
(mmm4rec_kernels.cpu.conv_forward + conv_backward; scan_forward + scan_backward on the same shape, D [H, P] skip,
step sizes given): the calls above also run what surrounds them (autograd, fresh gradient tensors; for the TiSSD call
the step sizes, the time scale and the finiteness check, in one native node on CPU: in C++, built first if needed,
mmm4rec_kernels/cpu/nodes.py), which the floor does not count.
"""
import argparse
import statistics
import time

try:
    import resource                    # minor page faults (Unix)
except ImportError:                    # pragma: no cover
    resource = None

import pytest
import torch

import mmm4rec_kernels.cpu as native
from mmm4rec_kernels.cpu import nodes as native_nodes
from mmm4rec_kernels import torch_backend
from mmm4rec_kernels.modules.conv import causal_conv1d_channels_last

B, L, H, P, G, N = 256, 20, 8, 16, 8, 16
CONV_ELEMS = B * L * 384
SSD_INPUTS = B * L * H * P + 2 * B * L * H + 2 * B * L * G * N          # x, dt, E, B, C


def floor_copy(read_elems: int, written_elems: int):
    """A step that moves (read + written) float32 elements once: copy_ of half of them (a copy reads and writes);
    its .bytes: the bytes it moves."""
    half = (read_elems + written_elems + 1) // 2
    src, dst = torch.randn(half), torch.empty(half)

    def step():
        dst.copy_(src)
    step.bytes = 8 * half
    return step


def dram_copy(mib: int = 256):
    """A step that copies `mib` MiB (src and dst each 8x a 32 MB L3: from and to DRAM), returning its GB/s: the rate at
    which this thread moves bytes that are in no cache (the floors above copy the call's own ~30-40 MB, which a large
    L3 holds between calls: there they time the cache, not DRAM)."""
    n = mib * 2 ** 20 // 4
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)

    def rate():
        t0 = time.perf_counter()
        dst.copy_(src)
        return 8 * n / (time.perf_counter() - t0) / 1e9
    return rate


def conv_floor():              # fwd reads x, writes y; bwd reads gy, x, writes dx (w, bias: negligible)
    return floor_copy(3 * CONV_ELEMS, 2 * CONV_ELEMS)


def ssd_floor():               # fwd reads x, dt, E, B, C, writes y; bwd reads gy and the inputs again, writes grads
    return floor_copy(2 * SSD_INPUTS + B * L * H * P, B * L * H * P + SSD_INPUTS)


def conv_call():
    """causal_conv1d_channels_last + SiLU forward and backward through autograd."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, 384, generator=g, requires_grad=True)
    w = torch.randn(384, 1, 4, generator=g, requires_grad=True)
    bias = torch.randn(384, generator=g, requires_grad=True)
    gy = torch.randn(B, L, 384, generator=g)

    def step():
        x.grad = w.grad = bias.grad = None       # as optimizer.zero_grad() leaves them: no accumulation pass timed
        causal_conv1d_channels_last(x, w, bias, silu=True).backward(gy)
    return step


def conv_kernel():
    """The native conv kernels alone (mmm4rec_kernels.cpu.conv_forward + conv_backward)."""
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(B, L, 384, generator=g), torch.randn(B, L, 384, generator=g)
    w, bias = torch.randn(384, 4, generator=g), torch.randn(384, generator=g)

    def step():
        native.conv_forward(x, w, bias, True)
        native.conv_backward(x, w, bias, True, [(0, 384, gy)])
    return step


def tissd_call():
    """One tissd() call of the torch backend (quadratic), forward and backward through autograd."""
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*s, generator=g).requires_grad_() for s in ((B, L, H, P), (B, L, H), (B, L, G, N),
                                                                     (B, L, G, N))]
    A = (-torch.rand(H, generator=g)).requires_grad_()
    E = torch.rand(B, L, H, generator=g).requires_grad_()
    D = torch.ones(H, requires_grad=True)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    gy = torch.randn(B, L, H, P, generator=g)
    x, dt, Bm, Cm = leaves

    def step():
        for t in (*leaves, A, E, D):
            t.grad = None
        torch_backend.tissd_torch(x, dt, A, Bm, Cm, time_scale=E, dt_bias=torch.zeros(H), D=D, lengths=lengths,
                                  path="quadratic").backward(gy)
    return step


def scan_kernel():
    """The native scan kernels alone (scan_forward + scan_backward, step sizes given, D [H, P])."""
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(B, L, H, P, generator=g), torch.randn(B, L, H, P, generator=g)
    delta, a = torch.rand(B, L, H, generator=g), -torch.rand(B, L, H, generator=g)
    Bm, Cm = torch.randn(B, L, G, N, generator=g), torch.randn(B, L, G, N, generator=g)
    D = torch.ones(H, P)
    lengths = torch.randint(1, L + 1, (B,), generator=g)

    def step():
        native.scan_forward(x, delta, a, Bm, Cm, D, lengths, True)
        native.scan_backward(gy, x, delta, a, Bm, Cm, D, lengths, True)
    return step


CASES = {"causal_conv_silu": (conv_call, conv_floor), "causal_conv_kernel": (conv_kernel, conv_floor),
         "tissd_quadratic_call": (tissd_call, ssd_floor), "tissd_scan_kernel": (scan_kernel, ssd_floor)}


@pytest.fixture(params=["native", "torch", "floor"])
def impl(request, monkeypatch):
    if request.param == "native":
        if native.library() is None:
            pytest.skip(native.status())
        native_nodes.get(wait=True)          # the calls' C++ autograd nodes (the Python ones where they do not build)
    else:
        monkeypatch.setattr(native, "supports", lambda x, dtype=None: False)   # the TiSSD's torch backend
        monkeypatch.setattr(native, "available", lambda: False)               # the conv's dispatch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield request.param
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", list(CASES))
def test_fwd_bwd(benchmark, impl, case):
    make, floor = CASES[case]
    if impl == "floor":
        benchmark(floor())
    elif impl == "torch" and case.endswith("kernel"):
        pytest.skip(f"the torch path of the same call: the case {case.replace('kernel', 'call')}[torch]")
    else:
        benchmark(make())


def ratios(rounds: int, reps: int = 20):
    """{case: (native ms, floor ms, ratio median, ratio q1, ratio q3, ratio of the best blocks, native's minor page
    faults per call)}: per round, a block of `reps` calls of the native step then of its floor (both warm); the ratio
    of the two block times.  The ratio of the best blocks (each side's fastest round) is what the two reach when the
    neighbours leave them alone: they slow compute (the kernels) and memory (the floor) by different amounts."""
    out = {}
    dram = dram_copy()
    for case, (make, floor) in CASES.items():
        steps = {"native": make(), "floor": floor()}
        nbytes = steps["floor"].bytes
        times = {k: [] for k in steps}
        dram_ms = []                         # the call's bytes at this round's DRAM copy rate
        faults = 0
        for f in steps.values():             # warm: the heap settles (the conv call grew it for ~15 calls, each
            for _ in range(30):              # growth a fresh 7.9 MB of page faults)
                f()
        for _ in range(rounds):
            for k, f in steps.items():
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0
                t0 = time.perf_counter()
                for _ in range(reps):
                    f()
                times[k].append((time.perf_counter() - t0) / reps * 1e3)
                if k == "native" and resource:
                    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            dram_ms.append(nbytes / dram() / 1e6)
            for f in steps.values():         # the 256 MiB copy swept the caches: warm again, untimed
                f()
        r = sorted(a / b for a, b in zip(times["native"], times["floor"]))
        rd = [a / b for a, b in zip(times["native"], dram_ms)]
        q = statistics.quantiles(r, n=4)
        out[case] = (statistics.median(times["native"]), statistics.median(times["floor"]), statistics.median(r),
                     q[0], q[2], min(times["native"]) / min(times["floor"]), faults / (rounds * reps),
                     statistics.median(dram_ms), statistics.median(rd), min(times["native"]) / min(dram_ms))
    return out


def native_setup():
    """Script mode: 1 thread, the native library loaded (exits saying why not) and the calls' C++ autograd nodes built
    if they can be (their status printed)."""
    torch.set_num_threads(1)
    if native.library() is None:
        raise SystemExit(native.status())
    native_nodes.get(wait=True)
    print(native_nodes.status())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--reps", type=int, default=20, help="calls per block")
    ap.add_argument("--retain-freed-memory", action="store_true",
                    help="glibc keeps freed memory for reuse (mmm4rec_kernels.cpu.retain_freed_memory)")
    args = ap.parse_args()
    native_setup()
    print("allocator:", native.retain_freed_memory() if args.retain_freed_memory else "glibc defaults")
    print("| case | native ms | floor ms | native / floor: median of rounds (q1-q3) | best / best | page faults per "
          "call | DRAM floor ms | native / DRAM floor: median, best / best |")
    print("|---|---|---|---|---|---|---|---|")
    for case, (nat, flo, med, q1, q3, best, flt, dr, dmed, dbest) in ratios(args.rounds, args.reps).items():
        print(f"| {case} | {nat:.2f} | {flo:.2f} | {med:.2f} ({q1:.2f}-{q3:.2f}) | {best:.2f} | {flt:.0f} | "
              f"{dr:.2f} | {dmed:.2f}, {dbest:.2f} |", flush=True)


if __name__ == "__main__":
    main()
