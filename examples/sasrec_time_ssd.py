"""A SASRec-style next-item recommender whose self-attention is replaced by TimeAwareSSD.

    python examples/sasrec_time_ssd.py          # trains a few epochs on synthetic data and prints the loss

User code = the model class and `train` below; everything time-aware comes from mmm4rec_kernels.modules.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmm4rec_kernels.modules import TimeAwareSSD, last_valid


class TimeSSDRec(nn.Module):
    """items [b, L] (0 = padding, right padded), times [b, L] unix seconds, lengths [b] -> user vectors [b, d]."""

    def __init__(self, num_items, d_model=64, n_layers=2, dropout=0.1, **ssd_kwargs):
        super().__init__()
        self.item_emb = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        nn.init.normal_(self.item_emb.weight[1:], std=0.02)
        self.mixers = nn.ModuleList(TimeAwareSSD(d_model, **ssd_kwargs) for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.ffns = nn.ModuleList(nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout),
                                                nn.Linear(4 * d_model, d_model)) for _ in range(n_layers))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)

    def forward(self, items, times, lengths):
        h = self.dropout(self.item_emb(items))
        for mixer, norm, ffn, ffn_norm in zip(self.mixers, self.norms, self.ffns, self.ffn_norms):
            h = norm(h + self.dropout(mixer(h, times, lengths=lengths)))      # mixer replaces self-attention
            h = ffn_norm(h + self.dropout(ffn(h)))
        return last_valid(h, lengths)

    def loss(self, items, times, lengths, target):
        scores = self(items, times, lengths) @ self.item_emb.weight.T          # full softmax over all items
        return F.cross_entropy(scores, target)


def train(model, batches, steps, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        items, times, lengths, target = batches[step % len(batches)]
        loss = model.loss(items, times, lengths, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def synthetic_batches(num_items=50, n_batches=4, b=16, L=12, seed=0):
    """Sequences that walk through the catalogue (next item = previous + 1 or + 2), random gaps, ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        start = torch.randint(1, num_items + 1, (b, 1), generator=g)
        steps = torch.randint(1, 3, (b, L + 1), generator=g).cumsum(1)
        seq = (start + steps - 1) % num_items + 1                              # [b, L+1] items in 1..num_items
        times = 1_700_000_000 + torch.randint(60, 86_400, (b, L), generator=g).cumsum(1)
        lengths = torch.randint(2, L + 1, (b,), generator=g)
        pos = torch.arange(L)[None, :]
        items = torch.where(pos < lengths[:, None], seq[:, :L], 0)
        target = seq[torch.arange(b), lengths]
        batches.append((items, times, lengths, target))
    return batches


if __name__ == "__main__":
    torch.manual_seed(0)
    model = TimeSSDRec(num_items=50, d_model=32, n_layers=2, d_state=16, headdim=16)
    losses = train(model, synthetic_batches(), steps=60)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
