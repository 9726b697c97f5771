"""The inference path as one exportable module: a history -> the user vector -> the top-k items.

    rec = TopKRecommender(model, k=10)              # model: a trained MMM4Rec (eval mode is set here)
    scores, items = rec(item_seq, time_seq, lengths)  # [b, max_len] long, [b, max_len] float64, [b] long -> [b, k] x2
    program = export_topk(model, "model.pt2", k=10)  # torch.export.save of rec, batch size dynamic

Loading it elsewhere (no model code needed, only the package that registers our ops):
    import mmm4rec_kernels, torch                     # registers torch.ops.mmm4rec.* used by the program
    program = torch.export.load("model.pt2")
    scores, items = program.module()(item_seq, time_seq, lengths)
Item ids are the model's item rows (0 = padding, never recommended).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .model import MMM4Rec


class TopKRecommender(nn.Module):
    """item_seq [b, max_len] long (right padded, 0 = padding), time_seq [b, max_len] float64 seconds, lengths [b]
    long in [1, max_len] -> (scores [b, k], item rows [b, k] long), best first.  The item table (the L2-normalised
    text + image embeddings over the temperature) is computed once here and kept as a buffer."""

    def __init__(self, model: MMM4Rec, k: int = 10):
        super().__init__()
        if not 1 <= k <= model.num_items:
            raise ValueError(f"k must lie in [1, {model.num_items}] (the number of items), got {k}")
        self.model = model.eval()
        self.k = int(k)
        with torch.no_grad():
            text, image = model.item_embeddings()
            items = (text + image) / model.config.temperature
        self.register_buffer("items", items.detach().clone(), persistent=False)

    def forward(self, item_seq: torch.Tensor, time_seq: torch.Tensor, lengths: torch.Tensor):
        user = self.model.encode(item_seq, time_seq, lengths)
        scores = user @ self.items.T
        pad = torch.zeros_like(scores[:1])
        pad[:, 0] = float("-inf")                     # row 0 is the padding item: never recommended
        top = torch.topk(scores + pad, self.k, dim=-1)
        return top.values, top.indices


def example_inputs(model: MMM4Rec, batch: int = 4, device=None):
    """A valid right-padded batch of the model's max_len for tracing: (item_seq, time_seq, lengths)."""
    L = model.config.max_len
    dev = device or next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, L + 1, (batch,), generator=g)
    lengths[0] = L
    pos = torch.arange(L)[None, :]
    items = torch.randint(1, model.num_items + 1, (batch, L), generator=g) * (pos < lengths[:, None])
    times = (1.6e9 + torch.cumsum(torch.rand(batch, L, generator=g, dtype=torch.float64) * 86400, 1)) \
        * (pos < lengths[:, None])
    return items.to(dev), times.to(dev), lengths.to(dev)


def export_topk(model: MMM4Rec, path: str | None = None, k: int = 10, batch: int = 4):
    """torch.export the top-k inference path (batch size dynamic, history length = max_len) and save it to `path`
    (a .pt2 file) when given.  Returns the ExportedProgram."""
    rec = TopKRecommender(model, k)
    b = torch.export.Dim("batch", min=1, max=1 << 20)
    dyn = {"item_seq": {0: b}, "time_seq": {0: b}, "lengths": {0: b}}
    with torch.no_grad():
        program = torch.export.export(rec, example_inputs(model, batch), dynamic_shapes=dyn, strict=False)
    if path is not None:
        torch.export.save(program, path)
    return program
