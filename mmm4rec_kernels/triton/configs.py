"""Pinned launch configs of the Triton kernels, chosen from the offline sm_90 compile table
(benchmarks/offline_sm90.py: registers, spills, shared memory, occupancy at the benchmark shapes).

A GPU run starts timing at once: each kernel gets ONE config per shape class, no autotune sweep.  Autotuning is an
opt-in (env MMM4REC_AUTOTUNE=1, read at import): then the kernels are wrapped in triton.autotune over `candidates`
(the pinned block sizes and warps are then unused;
the chunked kernels keep their pinned chunk cap Q_MAX and backward BLOCK_P, which shape their buffers).

    pick(kernel, **shape) -> {"BLOCK_...": int, ..., "num_warps": int, "num_stages": int}
    (chunked kernels also get Q_MAX, the longest chunk they run, and the backward its BLOCK_P)

`OVERRIDE[kernel]` (a dict of the same form) overrides keys of the pinned choice: the offline table's `--sweep`
uses it to compile candidate configs through the package's own launch code.
"""
from __future__ import annotations

import os

import triton

__all__ = ["AUTOTUNE", "INTERPRET", "OVERRIDE", "pick", "candidates", "autotune", "launch"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# opt-in autotuning (never under the interpreter, which runs one config)
AUTOTUNE = os.environ.get("MMM4REC_AUTOTUNE") == "1" and not INTERPRET
OVERRIDE: dict[str, dict] = {}


def _cfg(num_warps, num_stages=1, **blocks):
    return dict(blocks, num_warps=num_warps, num_stages=num_stages)


def pick(kernel: str, *, BLOCK_L: int = 0, P: int = 0, N: int = 0, PREC: str = "bf16", Q: int = 0) -> dict:
    """The pinned config of `kernel` for this shape class: BLOCK_L = padded sequence tile, P head dim, N state
    size padded, PREC = dot flavour ("bf16" / "fp16" for 16-bit inputs, else the fp32 input_precision "ieee",
    "tf32" or "tf32x3"), Q chunk.  Values from the offline sm_90 table (RESULTS.md, 2026-12-02): the spill-free
    config with the fewest waves at the benchmark shapes (paper L=20, wide head P=512, L=200, L=1024)."""
    return {**_pinned(kernel, BLOCK_L, P, PREC), **OVERRIDE.get(kernel, {})}


def _pinned(kernel, BLOCK_L, P, PREC):
    wide = P > 128                               # several P-blocks per (sequence, head)
    long = BLOCK_L >= 128
    bp = min(64, max(16, triton.next_power_of_2(P)))
    if kernel == "quadratic_fwd":
        # rows x columns tile BT x BT, P-block BP; "ieee" dots (FMA) need the smaller P-block at P = 512
        return _cfg(4, 1, BLOCK_T=min(BLOCK_L, 16 if (long and PREC == "tf32") else 32),
                    BLOCK_P=min(bp, 32) if (wide and PREC == "ieee") else bp)
    if kernel == "quadratic_bwd_fused":
        # whole sequence in one program (BLOCK_L <= 64, P <= 128)
        if PREC == "ieee":
            return _cfg(8, 1, BLOCK_J=min(BLOCK_L, 16), BLOCK_P=bp)
        if PREC in ("tf32", "tf32x3"):
            return _cfg(4, 1, BLOCK_J=min(BLOCK_L, 16), BLOCK_P=min(bp, 32))
        return _cfg(4, 1, BLOCK_J=min(BLOCK_L, 32), BLOCK_P=bp)
    if kernel == "quadratic_bwd_dx":
        if wide:
            if PREC in ("bf16", "fp16"):
                return _cfg(4, 1, BLOCK_I=min(BLOCK_L, 32), BLOCK_J=min(BLOCK_L, 16), BLOCK_P=bp)
            return _cfg(4, 1, BLOCK_I=min(BLOCK_L, 16), BLOCK_J=min(BLOCK_L, 32), BLOCK_P=bp)
        return _cfg(4, 1, BLOCK_I=min(BLOCK_L, 16), BLOCK_J=min(BLOCK_L, 32 if PREC == "tf32" else 16), BLOCK_P=bp)
    if kernel == "quadratic_bwd_dbc":
        if PREC == "ieee":
            return _cfg(8, 1, BLOCK_I=min(BLOCK_L, 16), BLOCK_J=min(BLOCK_L, 16), BLOCK_P=bp if wide else min(bp, 32))
        return _cfg(4, 1, BLOCK_I=min(BLOCK_L, 32), BLOCK_J=min(BLOCK_L, 16),
                    BLOCK_P=min(bp, 32) if (wide or PREC == "tf32") else bp)
    if kernel == "chunked_fwd":
        # Q_MAX caps the chunk the kernel runs (the user's chunk_size above it is run in smaller chunks)
        return _cfg(4, 1, BLOCK_P=32, Q_MAX=16 if PREC == "tf32x3" else 64)
    if kernel == "chunked_bwd":
        # chunks of 16 keep the Q x Q tiles and the [n, BLOCK_P] states in registers; BLOCK_P = 64 (= P at the
        # benchmark shapes) needs no partial dB / dC / dDelta buffers.  tf32x3 (three products per dot) runs the
        # reverse sweep twice (SPLIT_BC: dx / dDelta, then dB / dC); spill-free only at BLOCK_P = 32 with 8 warps
        # (255 registers; BLOCK_P 16: 8-20 B spills, 64: 170+ B, 4 warps: 20-60 B; RESULTS.md 2026-12-02)
        if PREC == "tf32x3":
            return _cfg(8, 1, BLOCK_P=32, Q_MAX=16)
        return _cfg(8, 1, BLOCK_P=64, Q_MAX=16)
    raise ValueError(f"no pinned config for kernel {kernel!r}")


def candidates(kernel: str) -> list[dict]:
    """Autotune / sweep candidates of `kernel` (the offline table compiles these with --sweep)."""
    if kernel == "quadratic_fwd":
        return [_cfg(w, s, BLOCK_T=bt, BLOCK_P=bp) for bp in (32, 64) for bt in (16, 32, 64)
                for w in (4, 8) for s in (1, 2)]
    if kernel == "quadratic_bwd_fused":
        return [_cfg(w, 1, BLOCK_J=bj, BLOCK_P=bp) for bp in (32, 64) for bj in (16, 32) for w in (4, 8)]
    if kernel in ("quadratic_bwd_dx", "quadratic_bwd_dbc"):
        # block sizes shape the partial buffers and the grid (set by the host): autotune warps and stages only;
        # the offline sweep (OVERRIDE) covers the block sizes
        return [_cfg(w, s) for w in (4, 8) for s in (1, 2)]
    if kernel == "chunked_fwd":
        return [_cfg(w, s, BLOCK_P=bp) for bp in (32, 64) for w in (4, 8) for s in (1, 2)]
    if kernel == "chunked_bwd":
        return [_cfg(w, s) for w in (4, 8) for s in (1, 2)]   # Q and BLOCK_P stay pinned (buffer layout)
    raise ValueError(f"no candidates for kernel {kernel!r}")


def autotune(kernel: str, key: list[str], prune=None):
    """Decorator: triton.autotune over candidates(kernel) when MMM4REC_AUTOTUNE=1, else the plain kernel."""
    def deco(fn):
        if not AUTOTUNE:
            return fn
        configs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                 num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in candidates(kernel)]
        tuner = triton.autotune(configs=configs, key=key,
                                prune_configs_by=None if prune is None else {"early_config_prune": prune})(fn)
        tuner.mmm4rec_tuned = {k for c in candidates(kernel) for k in c}   # keys the tuner supplies
        return tuner
    return deco


def launch(kernel_fn, grid, args, meta: dict, cfg: dict):
    """kernel_fn[grid](*args, **meta, **cfg); under autotune the tuner supplies its keys (dropped from cfg)."""
    tuned = getattr(kernel_fn, "mmm4rec_tuned", None)
    if tuned is not None:
        cfg = {k: v for k, v in cfg.items() if k not in tuned}
    return kernel_fn[grid](*args, **meta, **cfg)
