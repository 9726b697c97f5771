"""A Linear whose output is split along its last axis, with a backward that never concatenates.

`torch.split(linear(x), sizes)` is how Mamba-like blocks cut their in_proj output into z / xBC / dt.  Its backward
concatenates the pieces' gradients into one [..., sum(sizes)] tensor (a full extra write and, on CPU, a fresh
buffer) before the Linear's backward reads it again.  `linear_split` takes the pieces' gradients as they are:
    dx = sum_k g_k W_k,   dW[rows_k] = g_k^T x,   db[rows_k] = sum g_k
(pieces whose gradient is unused are skipped).  Same values as F.linear + torch.split, to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _LinearSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sizes):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        ctx.sizes, ctx.has_bias = sizes, bias is not None
        return tuple(F.linear(x, weight, bias).split(sizes, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        return (*linear_split_backward(x, weight, ctx.has_bias, ctx.sizes, grads, ctx.needs_input_grad[:3]), None)


def linear_split_backward(x, weight, has_bias, sizes, grads, needs=(True, True, True)):
    """(dx, dW, db) of F.linear(x, weight, bias) split into `sizes`, from the pieces' gradients `grads` (None: piece
    unused), without concatenating them; needs: which of (x, weight, bias) need a gradient (None where not)."""
    x2 = x.reshape(-1, x.shape[-1])
    need_x, need_w, need_b = needs
    dx2 = None
    dw = weight.new_zeros(weight.shape) if need_w else None
    db = weight.new_zeros(weight.shape[0]) if need_b and has_bias else None
    start = 0
    for size, g in zip(sizes, grads):
        rows = slice(start, start + size)
        start += size
        if g is None:                                   # piece unused: its gradient is 0 (left in dW / db)
            continue
        g2 = g.reshape(-1, size)
        if need_x:
            if dx2 is None:
                dx2 = g2 @ weight[rows]
            else:
                dx2.addmm_(g2, weight[rows])
        if dw is not None:
            torch.mm(g2.t(), x2, out=dw[rows])
        if db is not None:
            torch.sum(g2, dim=0, out=db[rows])
    dx = None
    if need_x:
        dx = x.new_zeros(x.shape) if dx2 is None else dx2.reshape(x.shape)
    return dx, dw, db


def linear_split(x: torch.Tensor, weight: torch.Tensor, bias, sizes) -> tuple:
    """torch.split(F.linear(x, weight, bias), sizes, dim=-1) with a concatenation-free backward.

    x [..., in], weight [sum(sizes), in], bias [sum(sizes)] or None, sizes: list of ints -> tuple of [..., size_k]
    (views of one output; do not modify them in place).  Under autocast it is exactly F.linear + torch.split."""
    sizes = [int(s) for s in sizes]
    if sum(sizes) != weight.shape[0]:
        raise ValueError(f"sizes {sizes} sum to {sum(sizes)}, weight has {weight.shape[0]} output rows")
    if torch.is_autocast_enabled(x.device.type) or not torch.is_grad_enabled():
        return tuple(F.linear(x, weight, bias).split(sizes, dim=-1))
    return _LinearSplit.apply(x, weight, bias, tuple(sizes))
