"""Mamba-like initialisation of the per-head SSD parameters (A_log, dt_bias, D)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def init_ssd_params(nheads: int, *, A_init_range=(1.0, 16.0), dt_min: float = 1e-3, dt_max: float = 1e-1,
                    dt_init_floor: float = 1e-4, D_shape=None, device=None, dtype=None):
    """Create the per-head SSD parameters as mamba_ssm's Mamba2 does: returns (A_log, dt_bias, D) nn.Parameters.

        A = -exp(A_log),  A_log = log U(A_init_range)                                   [H]
        dt_bias = softplus^-1(dt),  dt = max(exp(U(log dt_min, log dt_max)), dt_init_floor)   [H]
        D = 1 (skip weight), shape D_shape (default (nheads,); Mamba2's D_has_hdim uses (nheads * headdim,))

    The random draws happen in this order: A_log first, then dt (the order of mmm4rec's model layer, so a seeded
    model initialises identically).  Each parameter carries `_no_weight_decay = True` (mamba_ssm's flag; optimizer
    code can read it to exempt the parameter from weight decay).  The values are drawn in float32 and then cast."""
    lo, hi = A_init_range
    if not 0 < lo <= hi:
        raise ValueError(f"A_init_range must satisfy 0 < low <= high (A = -exp(A_log) < 0), got {A_init_range}")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt_min/dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    A_log = torch.log(torch.empty(nheads, device=device).uniform_(lo, hi))
    dt = torch.exp(torch.empty(nheads, device=device).uniform_(math.log(dt_min), math.log(dt_max)))
    dt = dt.clamp(min=dt_init_floor)
    dt_bias = dt + torch.log(-torch.expm1(-dt))                                   # inverse softplus
    D = torch.ones(nheads if D_shape is None else D_shape, device=device)
    params = []
    for value in (A_log, dt_bias, D):
        p = nn.Parameter(value.to(dtype) if dtype is not None else value)
        p._no_weight_decay = True
        params.append(p)
    return tuple(params)


def no_weight_decay_param_groups(module: nn.Module, weight_decay: float):
    """Two optimizer groups: parameters flagged `_no_weight_decay` (A_log, dt_bias, D) get weight_decay 0."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
