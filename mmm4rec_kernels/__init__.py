"""mmm4rec_kernels: fused time-aware SSD (TiSSD) and cross-SSD (TiCoSSD) kernels for sequential recommendation.

Public API:
    tissd(x, dt, A, B, C, *, time_scale, dt_bias, D, d_skip, lengths, cu_seqlens, initial_states,
          return_final_states, z, norm_weight, path, backend, chunk_size, allow_tf32)   -> y [b, L, H, P]
    ticossd(...)        the cross-SSD entry point (C from the other modality), same signature
    gated_rmsnorm(y, z, weight, eps, group_size, backend)
    explain(...)        exactly tissd's signature and checks -> {'path', 'backend', 'reason', 'table'}
    explain_gated_rmsnorm(y, z, weight, ..., backend), explain_causal_conv(x, weight): the same for the other ops
    crossover_length(P, n), cpu_crossover_length(P, n) -> longest L that path='auto' runs on the quadratic form
        (GPU cost model; measured CPU table)
    QUADRATIC_MAX_LEN   longest sequence the quadratic GPU kernels hold (declared once, in limits.py)
    ops                 every kernel as a registered torch op: torch.ops.mmm4rec.* (torch.compile / export ready)
    torch_backend       the CPU / float64 fallback that backend='torch' runs (direct decay sums, where-masking)
    cpu                 native C++ CPU kernels compiled on first use (quadratic scan, causal conv); status()
    reference           float64 torch references (recurrence, quadratic, chunked): the test oracle, not for speed
    modules             drop-in layers (TimeAwareSSD, time encodings, step API): `from mmm4rec_kernels.modules import`
"""
from . import ops, reference, torch_backend
from .dispatch import cpu_crossover_length, crossover_length
from .gated_rmsnorm import explain_gated_rmsnorm, gated_rmsnorm
from .limits import QUADRATIC_MAX_LEN
from .modules.conv import explain_causal_conv
from .tissd import explain, ticossd, tissd

__all__ = ["tissd", "ticossd", "gated_rmsnorm", "explain", "explain_gated_rmsnorm", "explain_causal_conv", "ops",
           "reference", "torch_backend", "crossover_length", "cpu_crossover_length", "QUADRATIC_MAX_LEN"]
__version__ = "0.1.0"
