"""mmm4rec_kernels: fused time-aware SSD (TiSSD) and cross-SSD (TiCoSSD) kernels for sequential recommendation.

Public API:
    tissd(x, dt, A, B, C, *, time_scale, dt_bias, D, d_skip, lengths, cu_seqlens, initial_states,
          return_final_states, z, norm_weight, path, backend, ...)   -> y [b, L, H, P]
    ticossd(...)        the cross-SSD entry point (C from the other modality), same signature
    gated_rmsnorm(y, z, weight, eps, group_size, backend)
    explain(x, dt, A, B, C, ...) -> {'path', 'backend', 'reason'}
    crossover_length(P, n) -> longest L that path='auto' runs on the quadratic kernels
    reference           float64-capable torch references (recurrence, quadratic, chunked)
"""
from . import reference
from .dispatch import crossover_length
from .gated_rmsnorm import gated_rmsnorm
from .tissd import explain, ticossd, tissd

__all__ = ["tissd", "ticossd", "gated_rmsnorm", "explain", "reference", "crossover_length"]
__version__ = "0.1.0"
