"""MMM4Rec hyper-parameters.

`MMM4RecConfig()` is the official fine-tune configuration and `MMM4RecConfig.pretrain()` the official pre-train one
(architecture, norms, eps, init, dropout placement, item bias); the official values are tabulated in
official_config.json beside this file and a test compares the two.  Where we deliberately differ from the official
code (fixes of flaws, see docs/model.md, "Official code vs ours") the difference is a named field below, with the
official value one assignment away.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Optional

from mmm4rec_kernels.limits import BACKENDS, PATHS  # declared once, with the kernels

logger = logging.getLogger(__name__)

STACKINGS = ("per_layer", "streams_first")
INITS = ("official", "torch")
ABSENT_IMAGES = ("text_stream", "missing_vector")
TIME_SHRINKS = ("tanhshrink", "series", "normalized")
FOURIER_INITS = ("model", "identity")

# Values that reproduce a checkpoint written before these fields existed (config.json without "stacking"): the
# model as it was then.  `from_dict` fills them in (and says so) so that old checkpoints keep their exact math.
LEGACY_V1 = dict(stacking="streams_first", vision_ffn=True, rmsnorm_groups=None, rmsnorm_eps=1e-5, time_ln_eps=1e-5,
                 init="torch", time_mlp_dropout=0.0, mask_time_padding=True, learned_missing_image=True,
                 exclude_padding_item=True, inbatch_mask_duplicates=True, absent_images="missing_vector")


@dataclass
class MMM4RecConfig:
    """Model configuration.

    Derived sizes: d_inner = hidden_size * expand, nheads H = d_inner // headdim; every head owns P = headdim channels
    and heads are split into `ngroups` groups sharing B and C (official: H = G = 8, each head its own B and C).
    """

    hidden_size: int = 256        # N, width of the item/user representations
    expand: int = 2               # d_inner = expand * N
    headdim: int = 64             # P, channels per SSD head
    d_state: int = 64             # n, SSD state size
    ngroups: int = 8              # G, B/C groups (G divides H)
    d_conv: int = 4               # causal depthwise conv kernel (xBC and the time path)
    n_layers: int = 1             # layers (each TiSSD -> Fourier -> TiCoSSD -> FFN with stacking="per_layer")
    ffn_inner: int = 256          # FFN hidden width (Hardswish)
    dropout: float = 0.4          # embedding and hidden dropout
    time_dropout: float = 0.4     # dropout on the time-difference signal
    layer_norm_eps: float = 1e-12
    max_len: int = 20             # L of the L-axis Linear(L, L) layers; shorter inputs are right-padded to it
    temperature: float = 0.8      # tau in the scores
    feat_dim: int = 768           # frozen feature width (informational; the adapters read the buffers' widths)
    with_id: bool = True          # per-item bias tables per modality (official: every config uses them)
    use_time: bool = True         # time path (TiSSD steps 3-5, 8 and the Fourier filter)
    share_tissd: bool = True      # one TiSSD module for the text and the image stream
    learnable_filter: bool = True  # CL3 in the Fourier filter
    adaptive_filter: bool = True   # CL1 / CL2 spectrum gates in the Fourier filter
    # --- official-code details (defaults = official; the alternatives are our earlier choices) ---------------------
    stacking: str = "per_layer"   # per_layer: official; streams_first: TiSSD stack per stream, then ONE cross block
    vision_ffn: bool = False      # official vision stream has no FFN after the shared TiSSD (paper eq. 11 has one)
    rmsnorm_groups: int = 1       # gated RMSNorm groups over d_inner: official 1; None = ngroups (Mamba-2 convention)
    rmsnorm_eps: float = 1e-12    # gated RMSNorm eps (official norm_eps; mamba_ssm default 1e-5)
    time_ln_eps: float = 1e-12    # eps of the L-axis time LayerNorms (official norm_eps; 1e-5 tames constant signals)
    init: str = "official"        # official: every Linear N(0, 0.02), zero bias; torch: PyTorch defaults
    time_mlp_dropout: float = 0.4  # dropout before the time MLP and before the time gate in every TiSSD / TiCoSSD
    # --- deliberate deviations from the official code (defaults = ours, with the reason) -----------------------------
    mask_time_padding: bool = True        # padded slots inject no time difference; official: L-axis ops see padding
    learned_missing_image: bool = True    # items without an image get a learned vector, not adapter(missing row)
    exclude_padding_item: bool = True     # item 0 (padding) is never scored; official: it competes in the softmax
    inbatch_mask_duplicates: bool = True  # in-batch CE masks other rows' copies of the target (no false negatives)
    absent_images: str = "text_stream"    # no image modality: vision stream starts as the text stream (one TiSSD
    #                                       call less); missing_vector: it reads the learned missing vector
    # --- time-path switches (defaults = official; docs/time_path.md measures each with `python -m mmm4rec.diagnose`) --
    # With the official init the cross-SSD time MLP's pre-Tanhshrink output is ~1e-4 and x - tanh(x) rounds to exactly
    # 0 in float32: the cross-SSD time path is dead and the Fourier filters only shrink under weight decay.
    time_shrink: str = "tanhshrink"   # tanhshrink: official x - tanh(x); series: the same function, its small-|x|
    #                                   branch from the Taylor series (no fp32 cancellation, still ~x^3/3);
    #                                   normalized: Tanhshrink(x / rms_L(x)), the pre-activation at unit RMS over L
    time_input_norm: bool = False     # the time MLP (and E = D * alpha) read D / rms_L(D): a scale-free input, so the
    #                                   cross-SSD sees the Fourier output Dco at unit RMS however small it starts
    time_mlp_gain: Optional[float] = None  # None: the model init; g: the time MLP Linear(L, L) weights ~ N(0, g^2 / L)
    fourier_init: str = "model"       # identity: the adaptive gates start at 1 and CL3 as the identity (Dco = Dv + Dt
    #                                   at init); applied by layers.init_official_ / layers.init_time_path_
    time_weight_decay: bool = True    # False: layers.param_groups puts every time-path parameter at weight decay 0
    backend: str = "auto"         # mmm4rec_kernels backend for every SSD / gated RMSNorm call
    path: str = "auto"            # mmm4rec_kernels SSD path

    def __post_init__(self):
        positive = ("hidden_size", "expand", "headdim", "d_state", "ngroups", "d_conv", "n_layers", "ffn_inner",
                    "max_len", "feat_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MMM4RecConfig.{name} must be a positive int, got {value!r}")
        for name in ("dropout", "time_dropout", "time_mlp_dropout"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"MMM4RecConfig.{name} must be in [0, 1), got {value!r}")
        for name in ("layer_norm_eps", "rmsnorm_eps", "time_ln_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MMM4RecConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"MMM4RecConfig.temperature must be > 0, got {self.temperature!r}")
        if self.d_inner % self.headdim:
            raise ValueError(f"hidden_size * expand = {self.d_inner} must be divisible by headdim = {self.headdim}")
        if self.nheads % self.ngroups:
            raise ValueError(f"nheads = {self.nheads} (= hidden_size * expand / headdim) must be divisible by "
                             f"ngroups = {self.ngroups}")
        groups = self.norm_groups
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or self.d_inner % groups:
            raise ValueError(f"MMM4RecConfig.rmsnorm_groups must be a positive divisor of d_inner = {self.d_inner} "
                             f"(or None = ngroups), got {self.rmsnorm_groups!r}")
        if self.time_mlp_gain is not None and not (isinstance(self.time_mlp_gain, (int, float))
                                                   and not isinstance(self.time_mlp_gain, bool)
                                                   and self.time_mlp_gain > 0):
            raise ValueError(f"MMM4RecConfig.time_mlp_gain must be None or > 0, got {self.time_mlp_gain!r}")
        for name, allowed in (("stacking", STACKINGS), ("init", INITS), ("absent_images", ABSENT_IMAGES),
                              ("time_shrink", TIME_SHRINKS), ("fourier_init", FOURIER_INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MMM4RecConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"MMM4RecConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.path not in PATHS:
            raise ValueError(f"MMM4RecConfig.path must be one of {PATHS}, got {self.path!r}")

    @property
    def d_inner(self) -> int:
        return self.hidden_size * self.expand

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def norm_groups(self) -> int:
        """Groups of the gated RMSNorm over d_inner (rmsnorm_groups, None meaning ngroups)."""
        return self.ngroups if self.rmsnorm_groups is None else self.rmsnorm_groups

    @classmethod
    def pretrain(cls, **overrides) -> "MMM4RecConfig":
        """The official pre-training configuration: the fine-tune one with 2 layers (lr 2.5e-4, in-batch CE are
        Trainer settings)."""
        return cls(**{"n_layers": 2, **overrides})

    def to_dict(self) -> dict:
        """JSON-safe dict of the fields (derived sizes are not stored)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MMM4RecConfig":
        """Inverse of to_dict; unknown keys raise ValueError (catches typos in config files).

        A dict written before the official-fidelity fields existed (no "stacking" key) is completed with LEGACY_V1,
        the values that reproduce the model it was saved from (logged at WARNING)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MMM4RecConfig keys: {unknown}")
        if "stacking" not in d:
            logger.warning("MMM4RecConfig: legacy config (no 'stacking' key): filling %s to keep the saved model's "
                           "math; re-save the checkpoint to store them", sorted(set(LEGACY_V1) - set(d)))
            d = {**LEGACY_V1, "with_id": False, **d}
        return cls(**d)
