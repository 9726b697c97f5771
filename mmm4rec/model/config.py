"""MMM4Rec hyper-parameters.  Defaults are the official fine-tune configuration (see ../shared/DESIGN.md)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

BACKENDS = ("auto", "triton", "cuda", "torch")
PATHS = ("auto", "quadratic", "chunked", "reference")


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
    n_layers: int = 1             # TiSSD layers per stream
    ffn_inner: int = 256          # FFN hidden width (Hardswish)
    dropout: float = 0.4          # embedding and hidden dropout
    time_dropout: float = 0.4     # dropout on the time-difference signal
    layer_norm_eps: float = 1e-12
    max_len: int = 20             # L of the L-axis Linear(L, L) layers; shorter inputs are right-padded to it
    temperature: float = 0.8      # tau in the scores
    feat_dim: int = 768           # frozen feature width (informational; the adapters read the buffers' widths)
    with_id: bool = False         # add per-item bias tables per modality
    use_time: bool = True         # time path (TiSSD steps 3-5, 8 and the Fourier filter)
    share_tissd: bool = True      # one TiSSD module for the text and the image stream
    learnable_filter: bool = True  # CL3 in the Fourier filter
    adaptive_filter: bool = True   # CL1 / CL2 spectrum gates in the Fourier filter
    backend: str = "auto"         # mmm4rec_kernels backend for every SSD / gated RMSNorm call
    path: str = "auto"            # mmm4rec_kernels SSD path

    def __post_init__(self):
        positive = ("hidden_size", "expand", "headdim", "d_state", "ngroups", "d_conv", "n_layers", "ffn_inner",
                    "max_len", "feat_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MMM4RecConfig.{name} must be a positive int, got {value!r}")
        for name in ("dropout", "time_dropout"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"MMM4RecConfig.{name} must be in [0, 1), got {value!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"MMM4RecConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not self.temperature > 0:
            raise ValueError(f"MMM4RecConfig.temperature must be > 0, got {self.temperature!r}")
        if self.d_inner % self.headdim:
            raise ValueError(f"hidden_size * expand = {self.d_inner} must be divisible by headdim = {self.headdim}")
        if self.nheads % self.ngroups:
            raise ValueError(f"nheads = {self.nheads} (= hidden_size * expand / headdim) must be divisible by "
                             f"ngroups = {self.ngroups}")
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

    def to_dict(self) -> dict:
        """JSON-safe dict of the fields (derived sizes are not stored)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MMM4RecConfig":
        """Inverse of to_dict; unknown keys raise ValueError (catches typos in config files)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MMM4RecConfig keys: {unknown}")
        return cls(**d)
