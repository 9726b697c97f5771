"""Freed CPU memory kept for reuse (glibc): no page faults on every training step's fresh tensors.

glibc's malloc returns large freed blocks to the kernel: a block above its mmap threshold (128 KiB at first, raised
up to 32 MiB as such blocks are freed) is unmapped on free, and free memory at the top of the heap beyond its trim
threshold is released.  The next step's tensor of the same size then starts as fresh pages, and the first write to
each 4 KiB page is a page fault (the kernel zeroes it).  A CPU training step allocates and frees its activations and
gradients every time, so it pays this on each step: measured on the project's 2-core box (benchmarks/RESULTS.md,
"Kernels on CPU"), ~400-540 faults and ~1 ms per native TiSSD backward call at batch 256, L 20 (3.3 vs 2.3 ms), and
~20-35% of a layer's training call at batch 8, L 200 (for our layer and nn.MultiheadAttention alike).

    from mmm4rec_kernels.cpu import retain_freed_memory
    retain_freed_memory()           # once, before training: what was set, in one line (also logged)

This is process-wide and not undone by anything here: freed blocks stay with the process (its resident memory stays
at its peak) and are reused by the next allocations, as jemalloc / tcmalloc do (the other fix: LD_PRELOAD one of
them).  The same settings from the shell: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647.  `mmm4rec` training
and evaluation commands call it unless --free-memory release.
"""
from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger("mmm4rec_kernels")

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4          # <malloc.h>
_KEEP_ALL = 2 ** 31 - 1                          # mallopt takes an int: the largest trim threshold
_done: str | None = None


def retain_freed_memory() -> str:
    """Keep freed heap memory for reuse (glibc mallopt: M_MMAP_MAX 0, so blocks come from the heap, and
    M_TRIM_THRESHOLD 2 GiB - 1, so freed ones are not given back).  Returns (and logs once) one line saying what was
    set, or why nothing was (not Linux / glibc, or mallopt refused).  Idempotent."""
    global _done
    if _done is not None:
        return _done
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _done = f"allocator left as is (not glibc: {platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
    else:
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL) == 1
        except (OSError, AttributeError) as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        else:
            why = "mallopt returned 0"
        _done = ("freed CPU memory kept for reuse (glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)" if ok
                 else f"allocator left as is ({why})")
    logger.info("mmm4rec_kernels: %s", _done)
    return _done
