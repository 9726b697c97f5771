"""Drop-in layers built on the time-aware SSD op, for any sequential model.

    TimeAwareSSD          Mamba2-like mixer block: hidden [b, L, d] (+ timestamps [b, L]) -> [b, L, d]; step API
    CausalTimeEncoding    timestamps -> per-head time_scale [b, L, H] (MMM4Rec's time path, causal; default)
    Log1pTimeEncoding     timestamps -> weight_h * log1p(gap) + bias_h
    CausalDepthwiseConv1d nn.Conv1d subclass, causal, with step() and a channels-last path
    Dropout               nn.Dropout with a ~3x cheaper mask on CPU
    linear_split          torch.split(F.linear(x, W, b), sizes) with a backward that never concatenates the pieces
    GatedRMSNorm          RMSNorm(y * SiLU(z)) * w (or norm before gate)
    init_ssd_params       (A_log, dt_bias, D) with Mamba-like ranges and `_no_weight_decay` flags
    SequenceLayout        right / left padding and packed batches -> one right-padded working batch and back
    last_valid            output at each sequence's last valid position
"""
from .conv import CausalDepthwiseConv1d, causal_conv1d_channels_last
from .dropout import Dropout
from .layout import SequenceLayout, last_valid
from .linear_split import linear_split
from .norm import GatedRMSNorm
from .params import init_ssd_params, no_weight_decay_param_groups
from .time_aware_ssd import SSDState, TimeAwareSSD
from .time_encoding import CausalTimeEncoding, Log1pTimeEncoding, TimeState, make_time_encoding, time_gaps_from

__all__ = ["TimeAwareSSD", "SSDState", "CausalTimeEncoding", "Log1pTimeEncoding", "TimeState", "make_time_encoding",
           "time_gaps_from", "CausalDepthwiseConv1d", "causal_conv1d_channels_last", "Dropout", "linear_split",
           "GatedRMSNorm",
           "init_ssd_params", "no_weight_decay_param_groups", "SequenceLayout", "last_valid"]
