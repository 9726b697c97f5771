"""MMM4Rec: multi-modal sequential recommender with time-aware SSDs (arXiv 2506.02916), a thin model layer.

Data flow for a batch of right-padded histories (b, L <= max_len; inside, everything is padded to max_len):
    items [b, L] -> text / image embeddings [b, L, N] (frozen features -> adapters (+ id bias) -> Dropout -> LN)
    times [b, L] -> Dt, Dv [b, H, L]                                  (TimeEncoder, one dropout mask per stream)
    per layer i (stacking="per_layer", the official order):
        out_t, out_v, Dt', Dv' = TiSSD_i([h_text; h_image], [Dt; Dv])    ONE batched call, shared weights
        Pt = FFN(LN(Drop(out_t) + h_text));  Pv = LN(Drop(out_v) + h_image)   (+ FFN if vision_ffn)
        Dco = FourierFilter_i(Dv', Dt');  M = TiCoSSD_i(Pt, Pv, Dco);  Y = FFN(LN(Drop(M) + Pv + Pt))
        next layer: h_text = Pt, h_image = Y, Dt = Dt', Dv = Dv'
    user = Y[len - 1] of the last layer
    scores = (user . normalize(text_item) + user . normalize(image_item)) / temperature
stacking="streams_first" (our earlier layout): all TiSSD layers per stream first, then one Fourier/TiCoSSD/FFN.

Without an image modality (image_feats None, or no item has an image) and absent_images="text_stream", the vision
stream starts as a copy of the text stream: its input embedding, time signal and first TiSSD output (dropout masks
included) are the text stream's, so the first layer runs the TiSSD on b sequences, not 2b; the vision stream keeps its
own LayerNorm from there and later layers run both streams (their inputs differ).
"""
from __future__ import annotations

import logging
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MMM4RecConfig
from .layers import (Dropout, FeedForward, FourierFilter, StreamLayer, TiCoSSD, TimeEncoder, TiSSD, init_official_,
                     init_time_path_)

logger = logging.getLogger(__name__)

# Modules that became per-layer lists when stacking="per_layer" arrived: old state keys "<name>.<param>" now live at
# "<name>.0.<param>" (see MMM4Rec._upgrade_state).
_PER_LAYER_CROSS = ("fourier", "ticossd", "co_norm", "co_ffn")
_LEGACY_KEY = re.compile(r"^(%s)\.(?!\d)" % "|".join(_PER_LAYER_CROSS))

class ModalityEmbedding(nn.Module):
    """Frozen item features -> adapter output space [.., N], plus an optional per-item bias table.

    feats [I+1, F] frozen buffer (row 0 = padding) or None (modality absent).  With with_missing (the image modality),
    items whose mask [I+1] is False, or every item when feats is None, get the learned `missing` vector [N] instead of
    adapter(feats)."""

    def __init__(self, feats, mask, num_rows: int, hidden: int, with_id: bool, with_missing: bool,
                 learned_missing: bool = True):
        super().__init__()
        self.num_rows, self.hidden = num_rows, hidden
        if feats is not None:
            feats = torch.as_tensor(feats, dtype=torch.float32)
            if feats.dim() != 2 or feats.shape[0] != num_rows:
                raise ValueError(f"features must be [num_items+1={num_rows}, F], got {tuple(feats.shape)}")
            self.adapter = nn.Linear(feats.shape[1], hidden)
        else:
            self.adapter = None
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool)
            if mask.shape != (num_rows,):
                raise ValueError(f"feature mask must be [num_items+1={num_rows}], got {tuple(mask.shape)}")
        # Features belong to the dataset, not to the checkpoint: non-persistent buffers.
        self.register_buffer("feats", feats, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        # learned_missing=False (official): items without an image use adapter(their feature row) like any other item,
        # and a dataset without images uses a zero vector.
        self.use_mask = learned_missing
        self.missing = nn.Parameter(torch.randn(hidden) * 0.02) if with_missing and learned_missing else None
        self.id_bias = nn.Embedding(num_rows, hidden) if with_id else None
        if self.id_bias is not None:
            nn.init.zeros_(self.id_bias.weight)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items [...] long -> [..., N]."""
        if self.feats is None:
            e = (self.missing.expand(*items.shape, -1) if self.missing is not None else
                 torch.zeros(*items.shape, self.hidden, device=items.device))
        else:
            e = self.adapter(self.feats[items])
            if self.mask is not None and self.use_mask:
                e = torch.where(self.mask[items][..., None], e, self.missing)
        if self.id_bias is not None:
            e = e + self.id_bias(items)
        return e

    def table(self) -> torch.Tensor:
        """All items [I+1, N] (unnormalised)."""
        device = (self.feats.device if self.feats is not None else self.missing.device if self.missing is not None
                  else self.id_bias.weight.device if self.id_bias is not None else None)
        return self(torch.arange(self.num_rows, device=device))


def _halves(t: torch.Tensor):
    """The two halves of a [2b, ...] batch (slices: unlike chunk(2), they add no shape guard under torch.export)."""
    b = t.shape[0] // 2
    return t[:b], t[b:]


class MMM4Rec(nn.Module):
    """MMM4Rec sequential recommender over frozen text / image item features.

    Args:
        config: MMM4RecConfig.
        num_items: I; item ids are 1..I, id 0 is padding.
        text_feats: [I+1, Ft] float tensor, row 0 = padding item.
        image_feats: [I+1, Fv] float tensor or None (no image modality at all).
        image_mask: [I+1] bool, True = item has an image; None = every row of image_feats is valid.

    Missing images: items whose image_mask is False, and every item when image_feats is None, use a learned
    "missing image" vector (a parameter in the adapter output space, shape [hidden]) in place of adapter(image_feat),
    both in the input sequence and in the item table used for scoring (plus the item's id bias when with_id).

    Features are frozen non-persistent buffers (not parameters, not in state_dict).  The TiSSD of each layer is ONE
    module applied to both streams (share_tissd=False: one per stream, an ablation); LayerNorms / FFNs are per stream.
    Every SSD / gated-RMSNorm call goes through mmm4rec_kernels with backend=config.backend, path=config.path.
    config.init="official" draws every Linear from N(0, 0.02) with zero bias.  State dicts saved before the per-layer
    cross blocks existed ("ticossd.x" instead of "ticossd.0.x") are renamed on load, with a warning.
    """

    def __init__(self, config: MMM4RecConfig, num_items: int, text_feats, image_feats=None, image_mask=None):
        super().__init__()
        c = self.config = config
        self.num_items = int(num_items)
        rows = self.num_items + 1
        if text_feats is None:
            raise ValueError("text_feats is required")
        if image_feats is None and image_mask is not None:
            raise ValueError("image_mask given without image_feats")
        self.text_emb = ModalityEmbedding(text_feats, None, rows, c.hidden_size, c.with_id, with_missing=False)
        self.image_emb = ModalityEmbedding(image_feats, image_mask, rows, c.hidden_size, c.with_id, with_missing=True,
                                           learned_missing=c.learned_missing_image)
        # Does any item have an image?  If not (and absent_images="text_stream"), the vision stream starts as the text
        # stream and the first TiSSD runs on b sequences instead of 2b (see the module docstring).
        has_images = image_feats is not None and (self.image_emb.mask is None or bool(self.image_emb.mask[1:].any()))
        self.image_stream_from_text = not has_images and c.absent_images == "text_stream"
        self.emb_dropout = Dropout(c.dropout)
        self.text_in_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.image_in_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

        self.time_encoder = TimeEncoder(c.max_len, c.nheads, c.time_dropout, c.time_ln_eps) if c.use_time else None
        self.tissd = nn.ModuleList(TiSSD(c) for _ in range(c.n_layers))
        self.tissd_image = None if c.share_tissd else nn.ModuleList(TiSSD(c) for _ in range(c.n_layers))
        self.text_layers = nn.ModuleList(StreamLayer(c) for _ in range(c.n_layers))
        self.image_layers = nn.ModuleList(StreamLayer(c, with_ffn=c.vision_ffn) for _ in range(c.n_layers))

        # cross blocks: one per layer (official) or one after the stream stacks
        n_cross = c.n_layers if c.stacking == "per_layer" else 1
        self.fourier = (nn.ModuleList(FourierFilter(c.max_len, c.adaptive_filter, c.learnable_filter)
                                      for _ in range(n_cross)) if c.use_time else None)
        self.ticossd = nn.ModuleList(TiCoSSD(c) for _ in range(n_cross))
        self.co_dropout = Dropout(c.dropout)
        self.co_norm = nn.ModuleList(nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) for _ in range(n_cross))
        self.co_ffn = nn.ModuleList(FeedForward(c.hidden_size, c.ffn_inner, c.dropout, c.layer_norm_eps)
                                    for _ in range(n_cross))
        if c.init == "official":
            init_official_(self)
        else:
            init_time_path_(self)        # the time-path switches (a no-op with the official ones)
        self.register_load_state_dict_pre_hook(self._upgrade_state)

    # ----------------------------------------------------------------------------------------------- encoding
    def _pad(self, item_seq, time_seq, lengths):
        """Validate and right-pad to max_len.  Returns item_seq [b, Lm] (0 on padding), time_seq [b, Lm], lengths
        [b] long, mask [b, Lm]."""
        Lm = self.config.max_len
        if item_seq.dim() != 2 or time_seq.shape != item_seq.shape:
            raise ValueError(f"item_seq and time_seq must both be [b, L], got {tuple(item_seq.shape)} and "
                             f"{tuple(time_seq.shape)}")
        b, L = item_seq.shape
        if L > Lm:
            raise ValueError(f"sequence length {L} exceeds config.max_len={Lm}; truncate to the last {Lm} items")
        if lengths.shape != (b,):
            raise ValueError(f"lengths must be [b={b}], got {tuple(lengths.shape)}")
        # value check on CPU in eager only: on GPU, or while torch.compile traces, it would be a host sync
        if lengths.device.type == "cpu" and not torch.compiler.is_compiling() \
                and bool(((lengths < 1) | (lengths > L)).any()):
            raise ValueError(f"lengths must lie in [1, {L}], got min {int(lengths.min())} max {int(lengths.max())}")
        lengths = lengths.to(device=item_seq.device, dtype=torch.long)
        if L < Lm:
            item_seq = F.pad(item_seq, (0, Lm - L))
            time_seq = F.pad(time_seq, (0, Lm - L))
        mask = torch.arange(Lm, device=item_seq.device)[None, :] < lengths[:, None]
        return item_seq * mask, time_seq, lengths, mask

    def encode(self, item_seq: torch.Tensor, time_seq: torch.Tensor, lengths: torch.Tensor,
               item_tables=None) -> torch.Tensor:
        """User representations.

        item_seq [b, L] long (right padded, 0 = padding), time_seq [b, L] unix seconds of the HISTORY items
        (pass float64 or int64: float32 rounds 2020s timestamps to 128 s), lengths [b] long in [1, L]
        -> user [b, N], the output at position lengths-1.  Padded positions (items and, with mask_time_padding,
        timestamps) have no influence; L < max_len is padded to max_len, L > max_len raises ValueError.
        item_tables: optional (text [I+1, N], image [I+1, N]) from ModalityEmbedding.table(); the inputs are then
        gathered from them (same values: adapter(feats)[items] = adapter(feats[items])) instead of running the
        adapters on b*L feature rows — loss(mode="full") passes the tables it scores with."""
        c = self.config
        items, times, lengths, mask = self._pad(item_seq, time_seq, lengths)
        tmask = mask if c.mask_time_padding else None                  # None: the time path sees padding (official)
        from_text = self.image_stream_from_text
        text_in = self.text_emb(items) if item_tables is None else item_tables[0][items]
        ht = self.text_in_norm(self.emb_dropout(text_in))
        hv = None
        if not from_text:
            image_in = self.image_emb(items) if item_tables is None else item_tables[1][items]
            hv = self.image_in_norm(self.emb_dropout(image_in))
        Dt = Dv = None
        if self.time_encoder is not None:
            D = self.time_encoder(times, tmask, copies=1 if from_text else 2)
            Dt, Dv = (D, None) if from_text else _halves(D)
        for i in range(c.n_layers):
            # hv None: the vision stream equals the text stream so far (no images): one TiSSD output serves both
            out_t, out_v, Dt, Dv = self._tissd(i, ht, hv, Dt, Dv, tmask, lengths)
            hv = self.image_layers[i].residual(out_v, ht if hv is None else hv)
            ht = self.text_layers[i].residual(out_t, ht)
            if c.stacking == "per_layer" and i < c.n_layers - 1:
                hv = self._cross(i, ht, hv, Dt, Dv, tmask, lengths)      # the fused output feeds the vision input
        # the last cross block: only the output at position lengths-1 is used, so its position-wise part (gate,
        # gated RMSNorm, out_proj, residual LayerNorm, FFN) runs on those b rows only
        return self._cross(c.n_layers - 1 if c.stacking == "per_layer" else 0, ht, hv, Dt, Dv, tmask, lengths,
                           last_only=True)

    def _tissd(self, i, ht, hv, Dt, Dv, tmask, lengths):
        """Layer i's TiSSD on both streams -> (out_t, out_v, Dt_next, Dv_next).  hv None: text stream only (out_v and
        Dv_next are the text stream's).  Shared weights: ONE call on the [text; image] batch of 2b sequences (every
        op is per-sequence, so this equals two calls)."""
        tissd = self.tissd[i]
        if hv is None:
            out_t, Dt = tissd(ht, Dt, tmask, lengths)
            return out_t, out_t, Dt, Dt
        if self.tissd_image is not None:
            out_t, Dt = tissd(ht, Dt, tmask, lengths)
            out_v, Dv = self.tissd_image[i](hv, Dv, tmask, lengths)
            return out_t, out_v, Dt, Dv
        both = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        out, D2 = tissd(both(ht, hv), both(Dt, Dv), both(tmask, tmask), both(lengths, lengths))
        out_t, out_v = _halves(out)
        Dt, Dv = (None, None) if D2 is None else _halves(D2)
        return out_t, out_v, Dt, Dv

    def _cross(self, i, pt, pv, Dt, Dv, tmask, lengths, last_only: bool = False):
        """Cross block i: Dco = Fourier(Dv, Dt); M = TiCoSSD(pt, pv, Dco); Y = FFN(LN(Drop(M) + pv + pt)).
        Returns Y [b, L, N], or Y [b, N] at the positions lengths-1 when last_only."""
        Dco = self.fourier[i](Dv, Dt, tmask) if self.fourier is not None else None
        M = self.ticossd[i](pt, pv, Dco, tmask, lengths, last_only=last_only)
        if last_only:
            rows = torch.arange(pt.shape[0], device=pt.device), lengths - 1
            pt, pv = pt[rows], pv[rows]
        return self.co_ffn[i](self.co_norm[i](self.co_dropout(M) + pv + pt))

    # ------------------------------------------------------------------------------------------------ scoring
    def item_embeddings(self, item_tables=None):
        """(text_items [I+1, N], image_items [I+1, N]), each row L2-normalised (of item_tables when given)."""
        text, image = item_tables if item_tables is not None else (self.text_emb.table(), self.image_emb.table())
        return F.normalize(text, dim=-1), F.normalize(image, dim=-1)

    def full_scores(self, user: torch.Tensor, item_tables=None) -> torch.Tensor:
        """user [b, N] -> scores [b, I+1] = (u . text_i + u . image_i) / temperature; column 0 (padding) = -inf
        (exclude_padding_item=False: scored like any item, official).  item_tables: as in encode."""
        text_items, image_items = self.item_embeddings(item_tables)
        scores = user @ (text_items + image_items).T / self.config.temperature
        if self.config.exclude_padding_item:
            scores[:, 0] = float("-inf")
        return scores

    def loss(self, item_seq, time_seq, lengths, target, mode: str = "full", pool=None) -> torch.Tensor:
        """Cross-entropy of the next item.  target [b] long in [1, I].

        mode "full": softmax over all items.  mode "inbatch": logits against the batch's target items only (labels
        arange(b)); with inbatch_mask_duplicates a column holding the same item as the row's own target is masked
        (not a false negative; official: not masked).  pool (inbatch only): a function (target vectors [b, N],
        target ids [b]) -> (pool vectors [B, N], pool ids [B], offset of this batch's rows in the pool), e.g.
        mmm4rec.distributed.global_inbatch_pool to use every rank's targets as negatives."""
        if mode == "full":                     # one adapter pass over the catalogue serves the inputs and the scores
            tables = (self.text_emb.table(), self.image_emb.table())
            user = self.encode(item_seq, time_seq, lengths, item_tables=tables)
            return F.cross_entropy(self.full_scores(user, tables), target.to(device=user.device, dtype=torch.long))
        user = self.encode(item_seq, time_seq, lengths)
        target = target.to(device=user.device, dtype=torch.long)
        if mode == "inbatch":
            text_t = F.normalize(self.text_emb(target), dim=-1)
            image_t = F.normalize(self.image_emb(target), dim=-1)
            vectors, ids, offset = text_t + image_t, target, 0
            if pool is not None:
                vectors, ids, offset = pool(vectors, target)
            logits = user @ vectors.T / self.config.temperature                  # [b, B]
            labels = offset + torch.arange(len(target), device=user.device)
            if self.config.inbatch_mask_duplicates:
                same = target[:, None] == ids[None, :]
                own = torch.zeros_like(same).scatter_(1, labels[:, None], True)
                logits = logits.masked_fill(same & ~own, float("-inf"))
            return F.cross_entropy(logits, labels)
        raise ValueError(f"mode must be 'full' or 'inbatch', got {mode!r}")

    # ----------------------------------------------------------------------------------------------- transfer
    @staticmethod
    def _upgrade_state(_module, state_dict, prefix, *_args):
        """load_state_dict pre-hook: rename keys of the pre-per-layer layout ("ticossd.x" -> "ticossd.0.x", same for
        fourier / co_norm / co_ffn), in place.  Such a state holds ONE cross block; a per_layer model with
        n_layers > 1 then reports the other layers' cross blocks as missing keys."""
        old = [k for k in state_dict if k.startswith(prefix) and _LEGACY_KEY.match(k[len(prefix):])]
        if old:
            logger.warning("MMM4Rec: upgrading %d state keys of the single-cross-block layout (e.g. %s -> %s)",
                           len(old), old[0], prefix + _LEGACY_KEY.sub(r"\1.0.", old[0][len(prefix):], count=1))
            for k in old:
                state_dict[prefix + _LEGACY_KEY.sub(r"\1.0.", k[len(prefix):], count=1)] = state_dict.pop(k)

    @staticmethod
    def _item_specific(key: str) -> bool:
        return key.split(".")[-2:-1] == ["id_bias"] or key.split(".")[-1] in ("feats", "mask")

    def state_dict_for_transfer(self) -> dict:
        """state_dict without item-specific tensors (id bias tables; feature buffers are never in state_dict)."""
        return {k: v for k, v in self.state_dict().items() if not self._item_specific(k)}

    def load_transfer(self, state: dict):
        """Load a (pre-trained) state into this model for a new item catalogue.  Item-specific entries in `state`
        are dropped; this model keeps its own features and id tables.  Returns (missing, unexpected) key lists
        (missing excludes this model's own item-specific keys)."""
        kept = {k: v for k, v in state.items() if not self._item_specific(k)}
        result = self.load_state_dict(kept, strict=False)
        missing = [k for k in result.missing_keys if not self._item_specific(k)]
        return missing, list(result.unexpected_keys)
