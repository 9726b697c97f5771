"""Where the native CPU calls' time goes beyond moving their bytes, at benchmarks/bench_cpu_kernels.py's shape
(batch 256, max_len 20, lengths 1..20; H 8, P 16, G 8, n 16; conv [256, 20, 384], k 4; float32, 1 thread):

  1. the SiLU inside the conv kernels: the same kernels with silu off (the conv alone) vs on (its exp and
     reciprocal, recomputed by the backward from x: it stores no pre-activation);
  2. autograd: one tissd() call of the torch backend (one native autograd node) and the conv call vs the same native
     forward + backward without autograd (outputs kept alive as autograd keeps them), each call with its autograd
     node in Python (ops._ConvCPU, torch_backend._TiSSDCPU) and in C++ (mmm4rec_kernels/cpu/nodes.py: built first
     if not yet, ~20 s once; rows left out with the reason when it cannot be built);
  3. that autograd + Python cost at batch 1 (native calls of ~0.1 ms), run as a micro-benchmark does (warm caches)
     and with a copy of 16 MB after each native call (as the kernels at batch 256 sweep L1 / L2 between two Python
     steps).

    python benchmarks/bench_call_overhead.py --rounds 300

Each round runs every case once, in turn (interleaved: a busy neighbour slows all of them alike); the table gives
each case's median and best round, and its difference to the row above as the median of the per-round
differences.  "bytes floor": bench_cpu_kernels.py's (one copy_ of every byte the call reads and writes), here one
copy per round between the other cases (slower than that script's blocks of back-to-back copies).
"""
import argparse
import statistics
import time

import torch

import mmm4rec_kernels.cpu as native
from mmm4rec_kernels.cpu import nodes as native_nodes
from mmm4rec_kernels import torch_backend
from mmm4rec_kernels.modules.conv import causal_conv1d_channels_last

try:                                    # pytest imports this as benchmarks.bench_call_overhead; the script runs alone
    from benchmarks.bench_cpu_kernels import conv_floor, native_setup, ssd_floor
except ImportError:
    from bench_cpu_kernels import conv_floor, native_setup, ssd_floor

L, H, P, G, N, CONV_C = 20, 8, 16, 8, 16, 384


def ssd_inputs(b: int):
    """The tissd() call's leaves (requires_grad) and the rest, as benchmarks/bench_cpu_kernels.py draws them."""
    g = torch.Generator().manual_seed(0)
    x, dt, Bm, Cm = (torch.randn(*s, generator=g).requires_grad_() for s in ((b, L, H, P), (b, L, H), (b, L, G, N),
                                                                          (b, L, G, N)))
    A = (-torch.rand(H, generator=g)).requires_grad_()
    E = torch.rand(b, L, H, generator=g).requires_grad_()
    D = torch.ones(H, requires_grad=True)
    lengths = torch.randint(1, L + 1, (b,), generator=g)
    gy = torch.randn(b, L, H, P, generator=g)
    return (x, dt, A, Bm, Cm, E, D), lengths, gy


def python_nodes(step):
    """step run with the Python autograd nodes (the C++ ones set aside, if loaded)."""
    def run():
        with native_nodes.python_nodes():
            step()
    return run


def tissd_cases(b: int, sweep=None):
    """{'native': the two native calls, 'Python node' / 'C++ node': tissd() fwd + bwd through that node};
    sweep() (if given) after each native call."""
    leaves, lengths, gy = ssd_inputs(b)
    x, dt, A, Bm, Cm, E, D = leaves
    dt_bias = torch.zeros(H)
    plain = [t.detach() for t in (x, dt, A, Bm, Cm, E)] + [dt_bias, D.detach()]
    after = sweep or (lambda: None)
    kept = []

    def call():
        for t in leaves:
            t.grad = None
        y = torch_backend.tissd_torch(x, dt, A, Bm, Cm, time_scale=E, dt_bias=dt_bias, D=D, lengths=lengths,
                                      path="quadratic")
        after()
        y.backward(gy)
        after()

    def direct():
        kept.clear()                        # the previous gradients die here, as .grad = None does above
        y = native.tissd_forward(*plain, lengths, True, True)
        after()
        kept.append(native.tissd_backward(gy, *plain, lengths, True, True))
        after()
        del y

    return {"native": direct, "Python node": python_nodes(call),
            **({"C++ node": call} if native_nodes.get() is not None else {})}


def conv_cases():
    """{'kernels, no SiLU', 'kernels': the native pair, 'Python node' / 'C++ node': causal_conv1d_channels_last + SiLU
    fwd + bwd through that node}."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, L, CONV_C, generator=g, requires_grad=True)
    w = torch.randn(CONV_C, 1, 4, generator=g, requires_grad=True)
    bias = torch.randn(CONV_C, generator=g, requires_grad=True)
    gy = torch.randn(256, L, CONV_C, generator=g)
    xd, wd, bd = x.detach(), w.detach().reshape(CONV_C, 4), bias.detach()
    kept = []

    def call():
        x.grad = w.grad = bias.grad = None
        causal_conv1d_channels_last(x, w, bias, silu=True).backward(gy)

    def kernels(silu):
        def step():
            kept.clear()
            y = native.conv_forward(xd, wd, bd, silu)
            kept.append(native.conv_backward(xd, wd, bd, silu, [(0, CONV_C, gy)]))
            del y
        return step
    return {"kernels, no SiLU": kernels(False), "kernels": kernels(True), "Python node": python_nodes(call),
            **({"C++ node": call} if native_nodes.get() is not None else {})}


def interleaved(cases: dict, rounds: int, warmup: int = 5):
    """{name: [seconds per round]}: each round runs every case once, in turn."""
    times = {k: [] for k in cases}
    for r in range(warmup + rounds):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def rows(label: str, times: dict):
    """Table rows, in the dict's order: each case's median and best round (us), and its median per-round difference
    to the row above (the first row: none)."""
    out, above = [], None
    for k, v in times.items():
        diff = "" if above is None else f"{statistics.median([a - b for a, b in zip(v, times[above])]) * 1e6:+.0f}"
        out.append(f"| {label} | {k} | {statistics.median(v) * 1e6:.0f} | {min(v) * 1e6:.0f} | {diff} |")
        above = k
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    native_setup()
    print("allocator:", native.retain_freed_memory())
    print("| shape | case | median us | best us | minus the row above (median of per-round differences) |")
    print("|---|---|---|---|---|")
    conv = interleaved({"bytes floor": conv_floor(), **conv_cases()}, args.rounds)
    print("\n".join(rows("conv b 256", conv)), flush=True)
    ssd = interleaved({"bytes floor": ssd_floor(), **tissd_cases(256)}, args.rounds)
    print("\n".join(rows("tissd b 256", ssd)), flush=True)
    src, dst = torch.randn(4 << 20), torch.empty(4 << 20)        # 16 MB read, 16 MB written

    def sweep():
        dst.copy_(src)
    # warm and swept cases in separate loops (a warm case run right after a swept one would start cold)
    for suffix, cases in (("", tissd_cases(1)), (", caches swept", tissd_cases(1, sweep))):
        t = interleaved({k + suffix: f for k, f in cases.items()}, args.rounds)
        print("\n".join(rows("tissd b 1", t)), flush=True)


if __name__ == "__main__":
    main()
