"""Batch layouts -> one right-padded working layout and back.

Accepted layouts of a batch of sequences (hidden [b, L, ...]):
    full              every position valid
    lengths [b]       right padding: positions t < lengths[i] are valid
    attention_mask    [b, L] (bool/int, 1 = valid; the Hugging Face convention): one contiguous block per row, i.e.
                      RIGHT or LEFT padding
    key_padding_mask  [b, L] bool, True = PADDING (torch.nn.MultiheadAttention's convention); same rules
    cu_seqlens        [nseq + 1] offsets of a packed batch hidden [1, T, ...] (as mamba_ssm / flash-attn)
`SequenceLayout.build(...)` turns any of them into a right-padded working batch [nseq, Lw, ...] with lengths [nseq];
`.unpad(y)` puts results back where the inputs were and writes 0 on padding.  Causal layers run on the working
batch: padding then sits after every valid position and cannot leak into it.

Eager calls check the values (lengths in range, one block per mask row, offsets non-decreasing) and raise a
ValueError naming the argument.  While torch.compile / export trace, the checks that would read tensor values are
skipped (they are host syncs), masks always take the gather path, and a packed batch is worked on as [nseq, T].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _int_tensor(t, name):
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer torch.Tensor, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")


def _mask_tensor(t, name, b, L):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b, L):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a tensor of shape ({b}, {L}), got {got}")


@dataclass
class SequenceLayout:
    """lengths [nseq] of the working batch; when a gather is needed (left padding, packed): index [nseq, Lw] (into
    the flattened b*L positions), valid [nseq, Lw], and the way back: inverse [b*L] (the working position of each
    input position) with present [b*L] (False on input padding).  Without a gather these are None."""
    b: int
    L: int
    lengths: torch.Tensor | None      # [nseq] int64 (None: all L valid, no padding at all)
    index: torch.Tensor | None
    valid: torch.Tensor | None
    inverse: torch.Tensor | None = None
    present: torch.Tensor | None = None

    @staticmethod
    def build(b: int, L: int, device, lengths=None, attention_mask=None, cu_seqlens=None,
              key_padding_mask=None) -> "SequenceLayout":
        given = [n for n, v in (("lengths", lengths), ("attention_mask", attention_mask), ("cu_seqlens", cu_seqlens),
                                ("key_padding_mask", key_padding_mask)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"pass at most one of lengths / attention_mask / key_padding_mask / cu_seqlens, got "
                             f"{' and '.join(given)}")
        tracing = torch.compiler.is_compiling()
        if lengths is not None:
            _int_tensor(lengths, "lengths")
            if tuple(lengths.shape) != (b,):
                raise ValueError(f"lengths must have shape ({b},), got {tuple(lengths.shape)}")
            lengths = lengths.to(device=device, dtype=torch.long)
            if not tracing and lengths.numel() and not 0 <= int(lengths.min()) <= int(lengths.max()) <= L:
                raise ValueError(f"lengths must lie in [0, L={L}], got {lengths.tolist()[:8]}")
            return SequenceLayout(b, L, lengths, None, None)
        pos = torch.arange(L, device=device)
        if key_padding_mask is not None:
            _mask_tensor(key_padding_mask, "key_padding_mask", b, L)
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be a bool tensor (True = padding, the nn.MultiheadAttention "
                                f"convention), got {key_padding_mask.dtype}; for 1 = valid pass attention_mask")
            return SequenceLayout._from_mask(b, L, device, ~key_padding_mask.to(device), "key_padding_mask", pos,
                                             tracing)
        if attention_mask is not None:
            _mask_tensor(attention_mask, "attention_mask", b, L)
            return SequenceLayout._from_mask(b, L, device, attention_mask.to(device) != 0, "attention_mask", pos,
                                             tracing)
        if cu_seqlens is not None:
            _int_tensor(cu_seqlens, "cu_seqlens")
            cu = cu_seqlens.to(device=device, dtype=torch.long)
            if b != 1:
                raise ValueError(f"cu_seqlens needs a packed batch hidden [1, T, ...], got batch {b}")
            if cu.dim() != 1 or cu.numel() < 2:
                raise ValueError(f"cu_seqlens must be [nseq + 1] offsets, got shape {tuple(cu.shape)}")
            if not tracing and (int(cu[0]) != 0 or int(cu[-1]) != L or bool((cu[1:] < cu[:-1]).any())):
                raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={L}, "
                                 f"got {cu.tolist()[:8]}")
            n_valid = cu[1:] - cu[:-1]
            Lw = L if tracing else max(int(n_valid.max()), 1)   # traced: no host sync, the working batch is [nseq, T]
            pw = torch.arange(Lw, device=device)
            index = (cu[:-1, None] + pw[None, :]).clamp(max=max(L - 1, 0))
            seq = torch.searchsorted(cu[1:], pos, right=True).clamp(max=cu.numel() - 2)   # sequence of position t
            inverse = seq * Lw + (pos - cu[seq])
            return SequenceLayout(b, L, n_valid, index, pw[None, :] < n_valid[:, None], inverse,
                                  torch.ones(L, dtype=torch.bool, device=device))
        return SequenceLayout(b, L, None, None, None)

    @staticmethod
    def _from_mask(b, L, device, mask, name, pos, tracing):
        """mask [b, L] bool (True = valid), one contiguous block per row."""
        n_valid = mask.sum(1)
        start = torch.where(n_valid > 0, mask.to(torch.int8).argmax(1), torch.zeros_like(n_valid))
        if not tracing:
            block = (pos[None, :] >= start[:, None]) & (pos[None, :] < (start + n_valid)[:, None])
            if not bool((block == mask).all()):
                row = int((block != mask).any(1).to(torch.int8).argmax())
                raise ValueError(f"{name} must mark one contiguous block of valid positions per row (right or left "
                                 f"padding); row {row} is not (its valid positions: "
                                 f"{mask[row].nonzero().flatten().tolist()[:12]})")
            if not bool(start.any()):
                return SequenceLayout(b, L, n_valid, None, None)                  # right padding: no gather
        rows = torch.arange(b, device=device)[:, None]
        index = rows * L + (start[:, None] + pos[None, :]).clamp(max=L - 1)
        inverse = (rows * L + (pos[None, :] - start[:, None]).clamp(min=0)).reshape(-1)
        return SequenceLayout(b, L, n_valid, index, pos[None, :] < n_valid[:, None], inverse, mask.reshape(-1))

    def pad(self, t):
        """[b, L, ...] (or [b, L]) -> working batch [nseq, Lw, ...]; positions past each length are 0."""
        if t is None or self.index is None:
            return t
        flat = t.reshape(self.b * self.L, *t.shape[2:])
        out = flat[self.index]
        valid = self.valid.view(*self.valid.shape, *([1] * (out.dim() - 2)))
        return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def unpad(self, y):
        """Working batch [nseq, Lw, ...] -> [b, L, ...] at the input positions, 0 on padding (a gather: no
        data-dependent shapes)."""
        if self.index is None:
            if self.lengths is None:
                return y
            mask = torch.arange(self.L, device=y.device)[None, :] < self.lengths[:, None]
            mask = mask.view(*mask.shape, *([1] * (y.dim() - 2)))
            return torch.where(mask, y, torch.zeros((), dtype=y.dtype, device=y.device))
        rest = y.shape[2:]
        out = y.reshape(-1, *rest)[self.inverse]
        present = self.present.view(-1, *([1] * len(rest)))
        out = torch.where(present, out, torch.zeros((), dtype=y.dtype, device=y.device))
        return out.view(self.b, self.L, *rest)


def last_valid(hidden: torch.Tensor, lengths=None, attention_mask=None) -> torch.Tensor:
    """The output at each sequence's last valid position: hidden [b, L, d] -> [b, d].

    Right padding: pass lengths [b] (position lengths-1).  Left or right padding: pass attention_mask [b, L] (the
    last 1 in each row).  Neither: position L-1.  Rows without any valid position return the values at position 0."""
    b, L = hidden.shape[:2]
    if attention_mask is not None:
        pos = torch.arange(L, device=hidden.device)
        last = torch.where(attention_mask.to(hidden.device) != 0, pos[None, :], -1).max(1).values.clamp(min=0)
    elif lengths is not None:
        last = (lengths.to(hidden.device, torch.long) - 1).clamp(min=0)
    else:
        last = torch.full((b,), L - 1, device=hidden.device, dtype=torch.long)
    return hidden[torch.arange(b, device=hidden.device), last]
