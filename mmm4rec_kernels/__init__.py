"""mmm4rec_kernels: fused time-aware SSD (TiSSD) and cross-SSD (TiCoSSD) kernels for sequential recommendation.

Public API:
    tissd(x, dt, A, B, C, *, time_scale, dt_bias, D, d_skip, lengths, cu_seqlens, initial_states,
          return_final_states, z, norm_weight, path, backend, chunk_size, allow_tf32)   -> y [b, L, H, P]
    ticossd(...)        the cross-SSD entry point (C from the other modality), same signature
    gated_rmsnorm(y, z, weight, eps, group_size, backend)
    explain(...)        exactly tissd's signature and checks -> {'path', 'backend', 'reason'}
    crossover_length(P, n) -> longest L that path='auto' runs on the quadratic kernels
    QUADRATIC_HARD_MAX_L   longest sequence the quadratic kernels hold (one declaration, in dispatch.py)
    torch_backend       the CPU / float64 fallback that backend='torch' runs (direct decay sums, where-masking)
    cpu                 native C++ CPU kernels compiled on first use (quadratic scan, causal conv); status()
    reference           float64 torch references (recurrence, quadratic, chunked): the test oracle, not for speed
    modules             drop-in layers (TimeAwareSSD, time encodings, step API): `from mmm4rec_kernels.modules import`
"""
from . import reference, torch_backend
from .dispatch import QUADRATIC_HARD_MAX_L, crossover_length
from .gated_rmsnorm import gated_rmsnorm
from .tissd import explain, ticossd, tissd

__all__ = ["tissd", "ticossd", "gated_rmsnorm", "explain", "reference", "torch_backend", "crossover_length",
           "QUADRATIC_HARD_MAX_L"]
__version__ = "0.1.0"
