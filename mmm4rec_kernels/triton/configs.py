"""Pinned launch configs of the Triton kernels, chosen from the offline sm_90 compile table
(tools/offline_sm90.py: registers, spills, shared memory, occupancy at the benchmark shapes).

A GPU run starts timing at once: each kernel gets ONE config per shape class, no autotune sweep.  Autotuning is an
opt-in (env MMM4REC_AUTOTUNE=1, read at import): then the kernels are wrapped in triton.autotune over `candidates`
(the pinned block sizes and warps are then unused;
the chunked kernels keep their pinned chunk cap Q_MAX and backward BLOCK_P, which shape their buffers).

    pick(kernel, **shape) -> {"BLOCK_...": int, ..., "num_warps": int, "num_stages": int}
    (chunked kernels also get Q_MAX, the longest chunk they run, and the backward its BLOCK_P)

`OVERRIDE[kernel]` (a dict of the same form) overrides keys of the pinned choice: the offline table's `--sweep`
uses it to compile candidate configs through the package's own launch code.

Triton versions: a register allocation that fits with one Triton can spill with the next.  The pinned configs are
for the Triton minor series in PINNED_SERIES (spill-free at the benchmark shapes in the offline table; CI fails on a
spill under TRITON_PINNED, the version torch's CUDA wheel pins).  On any other version `pick` returns the fallback
configs instead (logged once): the pinned ones with the lower-register variants where a pinned config spilled on a
neighbouring Triton.  MMM4REC_TRITON_CONFIGS=pinned|fallback (read at import) forces one set.
"""
from __future__ import annotations

import logging
import os

import triton

__all__ = ["AUTOTUNE", "INTERPRET", "OVERRIDE", "TRITON_PINNED", "PINNED_SERIES", "config_set", "pick", "candidates",
           "sweep_space", "autotune", "launch"]

# The Triton whose sm_90 compile of the pinned configs is gated (python -m tools.offline_sm90 --check, CI: a spill
# fails): the one torch 2.13's CUDA wheel pins.  setup.py's `test` extra pins it (read from this line).
TRITON_PINNED = "3.7.1"
# Minor series the pinned configs are for (requirement form: triton>=3.6,<3.8); 3.6 is checked by the warn-only
# version table (offline_sm90.py --versions).  Another series gets the fallback configs.
PINNED_SERIES = ("3.6", "3.7")
_log = logging.getLogger(__name__)
_FORCED = os.environ.get("MMM4REC_TRITON_CONFIGS", "")
if _FORCED not in ("", "pinned", "fallback"):
    raise ValueError(f"MMM4REC_TRITON_CONFIGS must be 'pinned', 'fallback' or unset, got {_FORCED!r}")
_told = False
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# opt-in autotuning (never under the interpreter, which runs one config)
AUTOTUNE = os.environ.get("MMM4REC_AUTOTUNE") == "1" and not INTERPRET
OVERRIDE: dict[str, dict] = {}


def _cfg(num_warps, num_stages=1, **blocks):
    return dict(blocks, num_warps=num_warps, num_stages=num_stages)


def _series(version: str) -> str:
    return ".".join(version.split(".")[:2])


def config_set(version: str | None = None) -> str:
    """"pinned" when Triton `version` (default: the installed one) is of a series in PINNED_SERIES, else
    "fallback"; MMM4REC_TRITON_CONFIGS overrides."""
    if _FORCED:
        return _FORCED
    return "pinned" if _series(version or triton.__version__) in PINNED_SERIES else "fallback"


def _tell_fallback():
    global _told
    if not _told:
        _told = True
        # under the interpreter there are no registers to spill: say it, but below the default log level
        _log.log(logging.INFO if INTERPRET else logging.WARNING,
                 "mmm4rec_kernels: triton %s is not a version the launch configs are pinned for (%s.x; gated on %s): "
                 "using the spill-safer fallback configs (re-pin with python -m tools.offline_sm90 --sweep)",
                 triton.__version__, ".x, ".join(PINNED_SERIES), TRITON_PINNED)


def pick(kernel: str, *, BLOCK_L: int = 0, P: int = 0, N: int = 0, PREC: str = "bf16", Q: int = 0) -> dict:
    """The config of `kernel` for this shape class: BLOCK_L = padded sequence tile, P head dim, N state size padded,
    PREC = dot flavour ("bf16" / "fp16" for 16-bit inputs, else the fp32 input_precision "ieee", "tf32" or
    "tf32x3"), Q chunk.  Values from the offline sm_90 table (RESULTS.md): the config with the fewest waves at the
    benchmark shapes (paper L=20, wide head P=512, L=200, L=1024) among those spill-free on every Triton of
    PINNED_SERIES (and, where one was found, on 3.8 and 3.9 too; tools/offline_sm90.WAIVED_SPILLS lists the
    tolerated exceptions, none at present).  The fallback set (`config_set()`) swaps in the lower-register variants
    for another Triton."""
    fallback = config_set() == "fallback"
    if fallback and not _FORCED:
        _tell_fallback()
    return {**_pinned(kernel, BLOCK_L, P, PREC, fallback), **OVERRIDE.get(kernel, {})}


def _pinned(kernel, BLOCK_L, P, PREC, fallback=False):
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
        if PREC in ("bf16", "fp16"):
            # 32-row blocks: I=16 spilled 8 B at L=200 with triton 3.7.1 and 3.8 (128 registers); I=32: 134-158
            return _cfg(4, 1, BLOCK_I=min(BLOCK_L, 32), BLOCK_J=min(BLOCK_L, 16), BLOCK_P=bp)
        if PREC == "ieee" and fallback:   # P-block 64 spilled 12 B at L=200 with triton 3.8; 32: 92-107 registers
            return _cfg(4, 1, BLOCK_I=min(BLOCK_L, 16), BLOCK_J=min(BLOCK_L, 16), BLOCK_P=min(bp, 32))
        return _cfg(4, 1, BLOCK_I=min(BLOCK_L, 16), BLOCK_J=min(BLOCK_L, 32 if PREC == "tf32" else 16), BLOCK_P=bp)
    if kernel == "quadratic_bwd_dbc":
        if PREC == "ieee":
            # 2 stages at P <= 128: 1 stage spilled 4 B at L=200 with triton 3.7.1 (80 registers; 2 stages: 104)
            return _cfg(8, 1 if wide else 2, BLOCK_I=min(BLOCK_L, 16), BLOCK_J=min(BLOCK_L, 16),
                        BLOCK_P=bp if wide else min(bp, 32))
        if wide and PREC == "tf32":
            # I=32 J=16 spilled 4-8 B with triton 3.7.1 and 3.9 (168 registers); I=16 J=32: 121-132 on 3.6-3.9
            return _cfg(4, 1, BLOCK_I=min(BLOCK_L, 16), BLOCK_J=min(BLOCK_L, 32), BLOCK_P=min(bp, 32))
        return _cfg(4, 1, BLOCK_I=min(BLOCK_L, 32), BLOCK_J=min(BLOCK_L, 16),
                    BLOCK_P=min(bp, 32) if (wide or PREC == "tf32") else bp)
    if kernel == "chunked_fwd":
        # Q_MAX caps the chunk the kernel runs (the user's chunk_size above it is run in smaller chunks)
        # TF32: chunks of 32 (64: 255 registers with triton 3.7.1, 20-96 B spilled with 3.8 and 3.9; 32: 227-243
        # registers on 3.6-3.9, the same waves)
        return _cfg(4, 1, BLOCK_P=32, Q_MAX={"tf32x3": 16, "tf32": 32}.get(PREC, 64))
    if kernel == "chunked_bwd":
        # chunks of 16 keep the Q x Q tiles and the [n, BLOCK_P] states in registers; BLOCK_P = 64 (= P at the
        # benchmark shapes) needs no partial dB / dC / dDelta buffers.  tf32x3 (three products per dot) runs the
        # reverse sweep twice (SPLIT_BC: dx / dDelta, then dB / dC) at BLOCK_P = 32 with 8 warps; each chunk's C B^T
        # comes from the kernel's pass 1 (scratch).  Triton 3.7.1, L=1024: 253 registers, no spill (also on 3.6,
        # 3.8, 3.9); BLOCK_P 16 is spill-free too with 1 stage (the same waves from twice the programs), 64 spills
        # 92+ B, 4 warps at 32: 52-64 B.  (With C B^T redone in the reverse sweeps every config of the sweep space
        # spilled on 3.7.1: BLOCK_P 32 12+12 B, 16: 12+8 B.)
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


def sweep_space(kernel: str) -> list[dict]:
    """What `offline_sm90.py --sweep KERNEL` compiles: the autotune candidates, and for the kernels whose block
    sizes the host sets (split quadratic backward, chunked backward) those block sizes too (through OVERRIDE)."""
    if kernel in ("quadratic_bwd_dx", "quadratic_bwd_dbc"):
        return [_cfg(w, s, BLOCK_I=bi, BLOCK_J=bj, BLOCK_P=bp) for bp in (32, 64) for bi in (16, 32)
                for bj in (16, 32) for w in (4, 8) for s in (1, 2)]
    if kernel == "chunked_bwd":
        return [_cfg(w, s, BLOCK_P=bp, Q_MAX=16) for bp in (16, 32, 64) for w in (4, 8) for s in (1, 2)]
    if kernel == "chunked_fwd":
        return [dict(c, Q_MAX=q) for q in (16, 32, 64) for c in candidates(kernel)]
    return candidates(kernel)


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
