"""One-command GPU check of the TiSSD kernels: correctness of every path/backend, then timings.

    python -m tools.gpu_check [--json OUT.json] [--md OUT.md] [--budget-s 420] [--skip-check] [--skip-bench]
                              [--skip-sweep] [--no-compile] [--no-mamba] [--dtypes fp32,bf16] [--shapes paper,...]

1. Correctness: output and EVERY gradient (x, dt, A, B, C, time_scale, dt_bias, D) of each (path, backend) against the
   float64 quadratic reference, relative-norm error ||out - ref|| / ||ref||, on awkward shapes (L not a multiple of the
   chunk, right padding, G < H, headdim 512, both skip modes).
2. Kernel timings: triton.testing.do_bench medians (ms) of fwd and fwd+bwd for our paths/backends, the torch eager
   quadratic reference, torch.compile of it and mamba_chunk_scan_combined (best of chunk 32/64/128) at the
   kernel-issue shapes, fp32 and bf16. Floor = bytes of x, B, C, dt, E read once + y written once at 3.0e12 B/s
   (the device-to-device copy rate measured on this workplace's H100, docs/design.md); the fwd+bwd floor additionally
   reads x, B, C, dt, E and dy once and writes their gradients once.
3. L sweep at a fixed token count: quadratic vs chunked, prints the crossover and a QUADRATIC_MAX_L suggestion.

The module also holds the shapes and input builders that benchmarks/bench_tissd.py imports.
No GPU: prints why and exits 0 (nothing to measure here).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
import traceback

import torch

COPY_BW = 3.0e12  # B/s: measured H100 device-to-device copy (bytes read + written), 2026-11-22, docs/design.md

# Kernel-issue shapes (b, L, H, P, n, G).
SHAPES = {
    "paper": (1024, 20, 8, 64, 64, 8),       # the official MMM4Rec config (max_len 20, 8 heads of 64, d_state 64)
    "wide-head": (2048, 50, 1, 512, 64, 1),  # one head of 512: mamba's fp32 kernels run out of shared memory
    "L200": (256, 200, 8, 64, 64, 8),
    "L1024": (64, 1024, 8, 64, 64, 8),
}
L_SWEEP = (20, 50, 100, 200, 500, 1000)
SWEEP_TOKENS = 65536          # b = SWEEP_TOKENS // L: same bytes (same floor) at every L
SWEEP_HEADS = (8, 64, 64, 8)  # H, P, n, G of the sweep (the paper's head layout)
MAMBA_CHUNKS = (32, 64, 128)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------ inputs
def make_inputs(b, L, H, P, n, G, dtype=torch.float32, device="cpu", seed=0, requires_grad=False, lengths=False,
                with_E=True, with_bias=True, with_D=True):
    """Random inputs in the ranges the model produces.  x, B, C, dt, E in `dtype`; A, dt_bias, D float32.
    Returns a dict with keys x, dt, A, B, C, E, dt_bias, D, lengths."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    x = r(b, L, H, P)
    dt = r(b, L, H) * 0.5
    A = -(1.0 + 15.0 * u(H))                                   # A = -exp(A_log), A_log = log U(1, 16)
    B = r(b, L, G, n) / math.sqrt(n)
    C = r(b, L, G, n) / math.sqrt(n)
    E = 0.5 + u(b, L, H) if with_E else None                   # time modulation, positive
    step = torch.exp(math.log(1e-3) + u(H) * (math.log(1e-1) - math.log(1e-3)))
    dt_bias = step + torch.log(-torch.expm1(-step)) if with_bias else None  # inverse softplus of log-U[1e-3, 1e-1]
    D = r(H) if with_D else None
    lens = torch.randint(1, L + 1, (b,), generator=g) if lengths else None
    if lens is not None:
        lens[0] = L
    out = {}
    for k, v, dt_ in (("x", x, dtype), ("dt", dt, dtype), ("A", A, torch.float32), ("B", B, dtype), ("C", C, dtype),
                      ("E", E, dtype), ("dt_bias", dt_bias, torch.float32), ("D", D, torch.float32)):
        if v is None:
            out[k] = None
            continue
        if dtype == torch.float64:
            dt_ = torch.float64
        t = v.to(device=device, dtype=dt_)
        out[k] = t.requires_grad_(requires_grad)
    out["lengths"] = None if lens is None else lens.to(device)
    return out


def grad_leaves(inp):
    return [inp[k] for k in ("x", "dt", "A", "B", "C", "E", "dt_bias", "D") if inp.get(k) is not None]


def io_bytes(inp):
    """(fwd bytes, fwd+bwd bytes): inputs x, B, C, dt, E read once + y written once; the backward reads them and
    dy once more and writes their gradients once."""
    ins = sum(inp[k].numel() * inp[k].element_size() for k in ("x", "B", "C", "dt", "E") if inp.get(k) is not None)
    y = inp["x"].numel() * inp["x"].element_size()
    fwd = ins + y
    return fwd, fwd + (ins + y) + ins


def floor_ms(nbytes):
    return nbytes / COPY_BW * 1e3


# ---------------------------------------------------------------------------------------------------- variants
def ours(path, backend, chunk_size=64, d_skip="delta", allow_tf32=False):
    from mmm4rec_kernels import tissd

    def f(inp):
        return tissd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], time_scale=inp["E"], dt_bias=inp["dt_bias"],
                     D=inp["D"], d_skip=d_skip, lengths=inp.get("lengths"), path=path, backend=backend,
                     chunk_size=chunk_size, allow_tf32=allow_tf32)
    return f


def torch_reference(compiled=False):
    from mmm4rec_kernels.reference import tissd_quadratic_ref

    fn = tissd_quadratic_ref
    if compiled:
        fn = torch.compile(tissd_quadratic_ref, dynamic=False)

    def f(inp):
        return fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], time_scale=inp["E"], dt_bias=inp["dt_bias"],
                  D=inp["D"], lengths=inp.get("lengths"))
    return f


def mamba(chunk_size):
    """None (with the reason in .reason) when mamba_ssm is unavailable."""
    from benchmarks._rivals import load_mamba, mamba_call

    fn, why = load_mamba()
    if fn is None:
        return None, why

    def f(inp):
        return mamba_call(fn, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["E"], inp["dt_bias"],
                          inp["D"], chunk_size)
    return f, ""


def our_variants(device):
    """[(name, path, backend)] of our fused paths runnable on this device."""
    out = []
    if device.type == "cuda":
        out += [("ours quadratic/triton", "quadratic", "triton"), ("ours chunked/triton", "chunked", "triton")]
        try:
            from mmm4rec_kernels.dispatch import cuda_usable
            if cuda_usable(device):
                out.append(("ours quadratic/cuda", "quadratic", "cuda"))
        except Exception:  # noqa: BLE001
            pass
    out += [("ours quadratic/torch", "quadratic", "torch"), ("ours chunked/torch", "chunked", "torch")]
    return out


# ------------------------------------------------------------------------------------------------- correctness
def rel_err(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


CHECK_CASES = [
    # name, (b, L, H, P, n, G), kwargs
    ("pad-L37-G2", (3, 37, 4, 32, 16, 2), dict(lengths=True, d_skip="delta")),
    ("paper-L20", (4, 20, 8, 64, 64, 8), dict(lengths=False, d_skip="delta")),
    ("plain-noE", (2, 45, 4, 64, 32, 4), dict(lengths=True, d_skip="plain", with_E=False, with_bias=False)),
    ("head512", (2, 50, 1, 512, 64, 1), dict(lengths=False, d_skip="delta")),
    ("L130", (2, 130, 2, 64, 64, 1), dict(lengths=True, d_skip="delta")),
]
TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}
TOL_TF32 = 1e-2   # fp32 inputs, TF32 dots (10-bit mantissa products, fp32 accumulation)


def check_one(path, backend, dtype, shape, opts, device, chunk_size=64, seed=0, allow_tf32=False):
    """Max relative error over y and every gradient; returns (worst, {name: err})."""
    from mmm4rec_kernels import tissd
    from mmm4rec_kernels.reference import tissd_quadratic_ref

    b, L, H, P, n, G = shape
    mk = dict(with_E=opts.get("with_E", True), with_bias=opts.get("with_bias", True), lengths=opts["lengths"])
    inp = make_inputs(b, L, H, P, n, G, dtype=dtype, device=device, seed=seed, requires_grad=True, **mk)
    ref_in = {k: (None if v is None else (v.detach().double().requires_grad_(True) if v.is_floating_point() else v))
              for k, v in inp.items()}
    dy = torch.randn(b, L, H, P, generator=torch.Generator().manual_seed(seed + 1)).to(device)

    y = tissd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], time_scale=inp["E"], dt_bias=inp["dt_bias"],
              D=inp["D"], d_skip=opts["d_skip"], lengths=inp["lengths"], path=path, backend=backend,
              chunk_size=chunk_size, allow_tf32=allow_tf32)
    yr = tissd_quadratic_ref(ref_in["x"], ref_in["dt"], ref_in["A"], ref_in["B"], ref_in["C"],
                             time_scale=ref_in["E"], dt_bias=ref_in["dt_bias"], D=ref_in["D"], d_skip=opts["d_skip"],
                             lengths=ref_in["lengths"])
    names = [k for k in ("x", "dt", "A", "B", "C", "E", "dt_bias", "D") if inp[k] is not None]
    g = torch.autograd.grad(y, [inp[k] for k in names], dy.to(y.dtype))
    gr = torch.autograd.grad(yr, [ref_in[k] for k in names], dy.double())
    errs = {"y": rel_err(y, yr)}
    errs.update({f"d{k}": rel_err(a, r) for k, a, r in zip(names, g, gr)})
    worst = max((e if not math.isnan(e) else float("inf")) for e in errs.values())
    return worst, errs


def run_checks(device, dtypes, log, deadline=float("inf")):
    rows, ok = [], True
    combos = [(p, bk, False) for _, p, bk in our_variants(device)] + [("auto", "auto", False),
                                                                        ("reference", "torch", False)]
    combos += [(p, bk, True) for _, p, bk in our_variants(device) if bk == "triton"]  # fp32 with TF32 dots
    for path, backend, tf32 in combos:
        for dname in dtypes:
            dtype = DTYPES[dname]
            if tf32 and dtype != torch.float32:
                continue
            for cname, shape, opts in CHECK_CASES:
                if path == "reference" and shape[1] > 64:
                    continue  # the naive loop is slow and not what we ship; its math is the reference's
                chunks = (16, 64) if path == "chunked" else (64,)
                for q in chunks:
                    label = (f"{path}/{backend}" + (f" Q{q}" if path == "chunked" else "")
                             + (" tf32" if tf32 else ""))
                    if time.time() > deadline:
                        rows.append(dict(dtype=dname, variant=label, case=cname, worst=float("nan"), passed=True,
                                         skipped=True, detail="skipped: time budget"))
                        continue
                    try:
                        worst, errs = check_one(path, backend, dtype, shape, opts, device, chunk_size=q,
                                                allow_tf32=tf32)
                        passed = worst <= (TOL_TF32 if tf32 else TOL[dtype])
                        detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                    except ValueError as e:  # refused by the argument checks / dispatcher: not a wrong answer
                        rows.append(dict(dtype=dname, variant=label, case=cname, worst=float("nan"), passed=True,
                                         skipped=True, detail=f"refused: {str(e)[:160]}"))
                        log(f"  [n/a ] {dname} {label:28s} {cname:12s} refused: {str(e)[:120]}")
                        continue
                    except Exception as e:  # noqa: BLE001
                        worst, passed, detail = float("nan"), False, f"{type(e).__name__}: {str(e)[:160]}"
                    ok &= passed
                    rows.append(dict(dtype=dname, variant=label, case=cname, worst=worst, passed=passed,
                                     detail=detail))
                    log(f"  [{'PASS' if passed else 'FAIL'}] {dname} {label:28s} {cname:12s} worst {worst:.2e}  "
                        f"{detail}")
    return ok, rows


# ------------------------------------------------------------------------------------------------------ timing
def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def do_bench_ms(fn, warmup=25, rep=100):
    """Median ms: triton.testing.do_bench (CUDA events, L2 flushed between runs); on CPU (--cpu-smoke) a plain
    perf_counter median of 3 runs, only to exercise this script."""
    if not torch.cuda.is_available():
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return float(sorted(ts)[1])
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def time_variant(f, inp, dy, warmup=25, rep=100):
    """(fwd ms, fwd+bwd ms); each can be a string saying why it failed."""
    leaves = grad_leaves(inp)

    def fwd():
        with torch.no_grad():
            f(inp)

    def fwd_bwd():
        y = f(inp)
        torch.autograd.grad(y, leaves, dy)

    res = []
    for fn in (fwd, fwd_bwd):
        try:
            fn()  # compile / autotune outside the timing
            sync()
            res.append(do_bench_ms(fn, warmup, rep))
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            res.append(("n/a " if isinstance(e, ValueError) else "FAIL ") + msg)  # ValueError: refused by dispatch
            sync()
            empty_cache()
    return tuple(res)


def bench_quadratic_bwd_variants(device, log):
    """Kernel-level do_bench of the quadratic backward at the paper shape: the fused one-program-per-(sequence,
    head) kernel (what ships at L <= 32) vs the split passes, bf16 / fp32+TF32 / exact fp32.  Decides
    quadratic.uses_fused_bwd on real hardware.  Returns markdown lines."""
    from mmm4rec_kernels.triton.quadratic import tissd_quadratic_bwd
    b, L, H, P, n, G = SHAPES["paper"]
    T = b * L
    lines = ["| dtype | fused ms | split ms | split / fused |", "|---|---|---|---|"]
    for label, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp32 tf32", torch.float32, True),
                               ("fp32", torch.float32, False)):
        g = torch.Generator(device="cpu").manual_seed(0)
        mk = lambda *sh, dt=dtype: torch.randn(*sh, generator=g).to(device=device, dtype=dt)  # noqa: E731
        x, dy, B, C = mk(T, H, P), mk(T, H, P), mk(T, G, n) / 8, mk(T, G, n) / 8
        dt, E = mk(T, H, dt=torch.float32) * 0.5, mk(T, H, dt=torch.float32).abs()
        A = -torch.rand(H, generator=g).to(device) * 15 - 1
        bias, D = torch.zeros(H, device=device), torch.ones(H, device=device)
        seq_start = torch.arange(b, device=device, dtype=torch.int64) * L
        seq_len = torch.full((b,), L, device=device, dtype=torch.int32)
        ms = []
        for split in (False, True):
            fn = lambda split=split: tissd_quadratic_bwd(  # noqa: E731
                dy, x, dt, A, B, C, E, bias, D, seq_start, seq_len, L, d_skip_delta=True, dt_softplus=True,
                allow_tf32=tf32, padded=True, split=split)
            try:
                fn()
                sync()
                ms.append(do_bench_ms(fn))
            except Exception as e:  # noqa: BLE001
                ms.append(float("nan"))
                log(f"  quadratic bwd split={split} {label}: {type(e).__name__}: {str(e)[:120]}")
        lines.append(f"| {label} | {ms[0]:.4f} | {ms[1]:.4f} | {ms[1] / ms[0]:.2f} |")
        log("  " + lines[-1])
    return lines


def bench_shape(name, shape, dtype_name, device, args, deadline, log):
    b, L, H, P, n, G = shape
    dtype = DTYPES[dtype_name]
    inp = make_inputs(b, L, H, P, n, G, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(b, L, H, P, device=device, dtype=dtype)
    fb, fbb = io_bytes(inp)
    rec = dict(shape=name, dims=shape, dtype=dtype_name, fwd_bytes=fb, fwdbwd_bytes=fbb,
               floor_fwd_ms=floor_ms(fb), floor_fwdbwd_ms=floor_ms(fbb), results={})
    variants = [(nm, ours(p, bk)) for nm, p, bk in our_variants(device) if not (bk == "torch" and p == "quadratic")]
    if dtype == torch.float32:  # the official MMM4Rec trains fp32 with TF32 matmuls: time our TF32 dots too
        variants += [(nm + " tf32", ours(p, bk, allow_tf32=True)) for nm, p, bk in our_variants(device)
                     if bk == "triton"]
    variants.append(("torch eager (reference)", torch_reference(False)))
    for nm, f in variants:
        if time.time() > deadline:
            rec["results"][nm] = ("skipped: budget", "skipped: budget")
            continue
        rec["results"][nm] = time_variant(f, inp, dy, args.warmup, args.rep)
        log(f"    {name} {dtype_name} {nm:26s} fwd {fmt(rec['results'][nm][0])} fwd+bwd {fmt(rec['results'][nm][1])}")
    if not args.no_mamba:
        best = {}
        for q in MAMBA_CHUNKS:
            if time.time() > deadline:
                break
            f, why = mamba(q)
            if f is None:
                rec["results"]["mamba (best chunk)"] = (f"n/a: {why}", f"n/a: {why}")
                break
            r = time_variant(f, inp, dy, args.warmup, args.rep)
            rec["results"][f"mamba Q{q}"] = r
            log(f"    {name} {dtype_name} mamba Q{q:<20d} fwd {fmt(r[0])} fwd+bwd {fmt(r[1])}")
            for i in (0, 1):
                if isinstance(r[i], float) and (i not in best or r[i] < best[i][0]):
                    best[i] = (r[i], q)
        if best:
            rec["results"]["mamba (best chunk)"] = tuple(best[i][0] if i in best else "FAIL" for i in (0, 1))
            rec["mamba_best_chunk"] = {("fwd", "fwd+bwd")[i]: best[i][1] for i in best}
    if not args.no_compile:  # last: compiling per shape/dtype/mode is the slowest thing here
        nm = "torch.compile(reference)"
        if time.time() > deadline:
            rec["results"][nm] = ("skipped: budget", "skipped: budget")
        else:
            rec["results"][nm] = time_variant(torch_reference(True), inp, dy, args.warmup, args.rep)
            log(f"    {name} {dtype_name} {nm:26s} fwd {fmt(rec['results'][nm][0])} fwd+bwd {fmt(rec['results'][nm][1])}")
    del inp, dy
    empty_cache()
    return rec


def fmt(v, width=8):
    if isinstance(v, float):
        return f"{v:{width}.3f}"
    return str(v)[:40]


def best_of(results, prefix, i):
    vals = [r[i] for k, r in results.items() if k.startswith(prefix) and isinstance(r[i], float)]
    return min(vals) if vals else None


def kernel_tables(recs):
    lines = ["| shape (b,L,H,P,n,G) | dtype | variant | fwd ms | fwd+bwd ms | fwd GB/s | fwd x floor | "
             "fwd+bwd x floor |", "|---|---|---|---|---|---|---|---|"]
    for rec in recs:
        for nm, (f, fb) in rec["results"].items():
            gbs = f"{rec['fwd_bytes'] / (f * 1e-3) / 1e9:.0f}" if isinstance(f, float) else "-"
            xf = f"{f / rec['floor_fwd_ms']:.1f}" if isinstance(f, float) else "-"
            xfb = f"{fb / rec['floor_fwdbwd_ms']:.1f}" if isinstance(fb, float) else "-"
            lines.append(f"| {rec['shape']} {tuple(rec['dims'])} | {rec['dtype']} | {nm} | {fmt(f).strip()} | "
                         f"{fmt(fb).strip()} | {gbs} | {xf} | {xfb} |")
    summary = ["| shape | dtype | floor fwd / fwd+bwd ms | ours best | torch eager | torch.compile | mamba best | "
               "ours x floor (fwd) | speedup vs eager / compile / mamba (fwd+bwd) |", "|---|---|---|---|---|---|---|---|---|"]
    for rec in recs:
        R = rec["results"]
        o = [best_of(R, "ours", i) for i in (0, 1)]
        e = [R.get("torch eager (reference)", ("-", "-"))[i] for i in (0, 1)]
        c = [R.get("torch.compile(reference)", ("-", "-"))[i] for i in (0, 1)]
        m = [R.get("mamba (best chunk)", ("-", "-"))[i] for i in (0, 1)]
        pair = lambda v: f"{fmt(v[0]).strip()} / {fmt(v[1]).strip()}"  # noqa: E731
        sp = lambda other: (f"{other[1] / o[1]:.2f}" if isinstance(other[1], float) and o[1] else "-")  # noqa: E731
        xf = f"{o[0] / rec['floor_fwd_ms']:.1f}" if o[0] else "-"
        summary.append(f"| {rec['shape']} | {rec['dtype']} | {rec['floor_fwd_ms']:.4f} / {rec['floor_fwdbwd_ms']:.4f}"
                       f" | {pair([v if v is not None else '-' for v in o])} | {pair(e)} | {pair(c)} | {pair(m)} | "
                       f"{xf} | {sp(e)} / {sp(c)} / {sp(m)} |")
    return lines, summary


# ------------------------------------------------------------------------------------------------------- sweep
def run_sweep(device, dtypes, args, deadline, log):
    H, P, n, G = SWEEP_HEADS
    recs = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for L in L_SWEEP:
            b = max(1, SWEEP_TOKENS // L)
            inp = make_inputs(b, L, H, P, n, G, dtype=dtype, device=device, requires_grad=True)
            dy = torch.randn(b, L, H, P, device=device, dtype=dtype)
            rec = dict(L=L, b=b, dtype=dname, floor_fwd_ms=floor_ms(io_bytes(inp)[0]), results={})
            for nm, p, bk in our_variants(device):
                if bk == "torch" and device.type == "cuda":
                    continue
                if time.time() > deadline:
                    rec["results"][nm] = ("skipped: budget", "skipped: budget")
                    continue
                rec["results"][nm] = time_variant(ours(p, bk), inp, dy, args.warmup, args.rep)
                log(f"    sweep {dname} L={L:5d} b={b:5d} {nm:24s} fwd {fmt(rec['results'][nm][0])} "
                    f"fwd+bwd {fmt(rec['results'][nm][1])}")
            recs.append(rec)
            del inp, dy
            empty_cache()
    return recs


def crossover(recs, dname, i):
    """Largest sweep L where the best quadratic beats the best chunked (None if never), and the first L where
    chunked wins."""
    last_q, first_c = None, None
    for rec in recs:
        if rec["dtype"] != dname:
            continue
        q = best_of(rec["results"], "ours quadratic", i)
        c = best_of(rec["results"], "ours chunked", i)
        if q is not None and (c is None or q <= c):
            last_q = rec["L"]
        elif c is not None and first_c is None:
            first_c = rec["L"]
    return last_q, first_c


def sweep_table(recs):
    lines = ["| dtype | L | b | floor fwd ms | quadratic best fwd / fwd+bwd | chunked best fwd / fwd+bwd | faster "
             "(fwd+bwd) |", "|---|---|---|---|---|---|---|"]
    for rec in recs:
        q = [best_of(rec["results"], "ours quadratic", i) for i in (0, 1)]
        c = [best_of(rec["results"], "ours chunked", i) for i in (0, 1)]
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        win = "-" if q[1] is None and c[1] is None else (
            "quadratic" if c[1] is None or (q[1] is not None and q[1] <= c[1]) else "chunked")
        lines.append(f"| {rec['dtype']} | {rec['L']} | {rec['b']} | {rec['floor_fwd_ms']:.3f} | {f(q[0])} / {f(q[1])}"
                     f" | {f(c[0])} / {f(c[1])} | {win} |")
    return lines


# -------------------------------------------------------------------------------------------------------- main
def _shrink_for_cpu_smoke():
    global SHAPES, L_SWEEP, SWEEP_TOKENS, CHECK_CASES, MAMBA_CHUNKS
    SHAPES = {"paper-b8": (8, 20, 8, 64, 64, 8), "wide-head-b4": (4, 50, 1, 512, 64, 1)}
    L_SWEEP, SWEEP_TOKENS, MAMBA_CHUNKS = (20, 100), 400, ()
    CHECK_CASES = CHECK_CASES[:2]


def device_info():
    info = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, python=platform.python_version())
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                    mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["device"] = "cpu"
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="save all results as JSON here")
    ap.add_argument("--md", help="save the markdown tables here")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="time budget: checks stop starting new cases at 25%%, kernel timings at 60%%, the sweep "
                         "at 97%% of it (what is left out is marked 'skipped')")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference")
    ap.add_argument("--no-mamba", action="store_true")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {list(SHAPES)}")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: run every stage on tiny shapes with the torch backend (exercises the script only; "
                         "its times mean nothing)")
    args = ap.parse_args(argv)
    t0 = time.time()
    deadline_check, deadline, deadline_sweep = (t0 + f * args.budget_s for f in (0.25, 0.60, 0.97))
    log = lambda s: print(s, flush=True)  # noqa: E731
    info = device_info()
    log(f"# gpu_check {info}")
    if not torch.cuda.is_available() and not args.cpu_smoke:
        log("no CUDA device: nothing to check or time here (run `bash tools/run_gpu.sh` on a lent GPU; "
            "--cpu-smoke exercises the script on CPU)")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        default_shapes = args.shapes == ",".join(SHAPES)
        _shrink_for_cpu_smoke()
        args.no_compile = True
        if default_shapes:
            args.shapes = ",".join(SHAPES)
    dtypes = [d for d in args.dtypes.split(",") if d]
    torch._dynamo.config.cache_size_limit = max(128, torch._dynamo.config.cache_size_limit)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(1024, torch._dynamo.config.accumulated_cache_size_limit)
    out = dict(info=info, copy_bw=COPY_BW, checks=None, kernels=[], sweep=[])
    ok = True

    def save():  # after every phase/shape, so a run cut short still leaves its numbers
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1, default=str)
    try:
        from mmm4rec_kernels import explain  # noqa: F401
    except Exception as e:  # noqa: BLE001
        log(f"cannot import mmm4rec_kernels: {e}")
        return 2
    from benchmarks._rivals import load_mamba
    mfn, why = load_mamba()
    log(f"mamba_chunk_scan_combined: {'available' if mfn else 'unavailable: ' + why}")
    log(f"our variants on this device: {[v[0] for v in our_variants(device)]}")

    if not args.skip_check:
        log("\n## 1. correctness vs float64 reference (relative norm error, y and all grads)")
        ok, rows = run_checks(device, dtypes, log, deadline_check)
        out["checks"] = rows
        save()
        log(f"correctness: {'ALL PASS' if ok else 'FAILURES: ' + str(sum(not r['passed'] for r in rows))} "
            f"({len(rows)} cases, {time.time() - t0:.0f} s)")

    md = []
    if not args.skip_bench:
        log("\n## 2. kernel timings (do_bench median ms)")
        for name in [s for s in args.shapes.split(",") if s]:
            for dname in dtypes:
                if time.time() > deadline:
                    log(f"  budget reached, skipping {name} {dname}")
                    continue
                try:
                    out["kernels"].append(bench_shape(name, SHAPES[name], dname, device, args, deadline, log))
                    save()
                except Exception as e:  # noqa: BLE001
                    log(f"  {name} {dname} failed: {type(e).__name__}: {e}")
                    traceback.print_exc()
                    empty_cache()
    bwd_variants = []
    if not args.skip_bench and device.type == "cuda" and time.time() < deadline:
        log("\n## 2b. quadratic backward at the paper shape: fused vs split (kernel only)")
        try:
            bwd_variants = bench_quadratic_bwd_variants(device, log)
        except Exception as e:  # noqa: BLE001
            log(f"  failed: {type(e).__name__}: {e}")
    if not args.skip_sweep:
        log("\n## 3. L sweep (quadratic vs chunked)")
        out["sweep"] = run_sweep(device, dtypes, args, deadline_sweep, log)

    # ------- tables last (the device tool returns the tail of the output)
    hdr = (f"\n# TiSSD kernels on {info.get('device')} ({info['date']}, torch {info['torch']}, triton "
           f"{info['triton']}); do_bench median ms; floor = bytes(x,B,C,dt,E read + y write) / {COPY_BW:.1e} B/s "
           f"(H100 d2d copy); fwd+bwd floor adds dy + inputs read and grads written once; mamba gets dt*E "
           f"(time scale folded into dt), D*x skip")
    md.append(hdr)
    if out["kernels"]:
        full, summary = kernel_tables(out["kernels"])
        md += ["\n## all variants"] + full + ["\n## summary"] + summary
    if bwd_variants:
        md += ["\n## quadratic backward, paper shape, kernel only (fused ships at L <= 32)"] + bwd_variants
    if out["sweep"]:
        md += [f"\n## L sweep (b = {SWEEP_TOKENS} // L, H,P,n,G = {SWEEP_HEADS})"] + sweep_table(out["sweep"])
        for dname in dtypes:
            for i, what in ((1, "fwd+bwd"), (0, "fwd")):
                last_q, first_c = crossover(out["sweep"], dname, i)
                out.setdefault("crossover", {})[f"{dname} {what}"] = dict(last_quadratic_L=last_q,
                                                                          first_chunked_L=first_c)
                md.append(f"- crossover {dname} {what}: quadratic wins up to L={last_q}, chunked first wins at "
                          f"L={first_c}")
        lq, fc = crossover(out["sweep"], "fp32" if "fp32" in dtypes else dtypes[0], 1)
        if lq is not None:
            sugg = lq if fc is None else int(round(math.sqrt(lq * fc)))
            where = (f"the fwd+bwd crossover between L={lq} and L={fc} (geometric mean)" if fc is not None else
                     f"quadratic winning fwd+bwd at every swept L it ran, up to L={lq}")
            md.append(f"- suggestion: QUADRATIC_MAX_L = {sugg} (export MMM4REC_QUADRATIC_MAX_L={sugg}; "
                      f"mmm4rec_kernels/dispatch.py), from {where}")
            out["suggested_quadratic_max_l"] = sugg
            _, P_s, n_s, _ = SWEEP_HEADS
            disc = (64 * (P_s + n_s) + 4 * P_s * n_s) / ((P_s + n_s) * sugg)
            md.append(f"- equivalently QUADRATIC_DISCOUNT = {disc:.3f} in the cost model (export "
                      f"MMM4REC_QUADRATIC_DISCOUNT={disc:.3f}): the crossover then scales with P and n")
            out["suggested_quadratic_discount"] = round(disc, 4)
        elif fc is not None:
            md.append(f"- the chunked kernels win fwd+bwd from the shortest swept L={fc}")
    if out["checks"] is not None:
        nskip = sum(bool(r.get("skipped")) for r in out["checks"])
        md.append(f"\ncorrectness: {'ALL PASS' if ok else 'FAILURES'} "
                  f"({sum(r['passed'] and not r.get('skipped') for r in out['checks'])}/{len(out['checks']) - nskip} "
                  f"cases passed" + (f", {nskip} skipped (time budget or refused by dispatch)" if nskip else "") + ")")
        md += [f"- FAIL {r['dtype']} {r['variant']} {r['case']}: {r['detail']}" for r in out["checks"]
               if not r["passed"]][:20]
    md.append(f"total {time.time() - t0:.0f} s")
    text = "\n".join(md)
    print(text, flush=True)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(text + "\n")
    save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
