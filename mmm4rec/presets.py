"""Presets and config merging for the command line (and anyone scripting runs the same way).

    preset_for("auto", "cuda") -> "paper"          "auto": paper on a GPU, cpu elsewhere
    model_config(preset, max_len, flags, backend=..., path=..., pretrain=False, inherit=None) -> MMM4RecConfig
        official base (MMM4RecConfig() or its pre-train config) <- the preset's model entries <- `inherit` (an
        --init / --resume checkpoint's config, architecture only unless inherit_all) <- explicit flags (None = unset)
    train_settings(preset, "finetune" | "pretrain", overrides) -> Trainer settings
"""
from __future__ import annotations

from typing import Optional

# Settings per preset. "model" entries override MMM4RecConfig() (fine-tune) / the pre-train config; "train" entries
# are Trainer settings; "finetune"/"pretrain" entries override "train" for that command.
PRESETS = {
    "cpu": {"model": dict(hidden_size=64, expand=2, headdim=32, d_state=16, ngroups=1, ffn_inner=64,
                          dropout=0.2, time_dropout=0.2),
            "train": dict(batch_size=256, grad_accum=1, lr=1e-3, weight_decay=0.005, patience=5, epochs=100),
            "finetune": {}, "pretrain": {}},
    "paper": {"model": {},
              "train": dict(batch_size=1024, weight_decay=0.005, patience=10, epochs=200),
              "finetune": dict(lr=1e-4, grad_accum=8), "pretrain": dict(lr=2.5e-4, grad_accum=1)},
}
# Config fields a fine-tune run takes over from an --init checkpoint unless given as flags (the architecture).
NOT_INHERITED = ("max_len", "backend", "path", "with_id", "dropout", "time_dropout", "temperature", "feat_dim")
# Trainer settings a flag can override.
TRAIN_FLAGS = ("epochs", "patience", "lr", "weight_decay", "batch_size", "grad_accum")


def preset_for(name: str, device_type: str) -> str:
    """The preset `name` stands for on this device: "auto" -> "paper" on CUDA, "cpu" elsewhere."""
    if name == "auto":
        return "paper" if device_type == "cuda" else "cpu"
    if name not in PRESETS:
        raise ValueError(f"preset must be 'auto' or one of {sorted(PRESETS)}, got {name!r}")
    return name


def base_config(pretrain: bool) -> dict:
    """The model config a preset starts from: MMM4RecConfig() (official fine-tune) or its pre-train config."""
    from .model import MMM4RecConfig
    if pretrain:
        make = getattr(MMM4RecConfig, "pretrain", None)
        return make().to_dict() if make is not None else MMM4RecConfig(n_layers=2).to_dict()
    return MMM4RecConfig().to_dict()


def model_config(preset: str, max_len: int, flags: dict, *, backend: str = "auto", path: str = "auto",
                 pretrain: bool = False, inherit: Optional[dict] = None, inherit_all: bool = False):
    """MMM4RecConfig = base <- preset <- inherit <- flags (see the module doc).  Two sizes follow the others when
    not given: ffn_inner = hidden_size when only hidden_size is set, and ngroups = the head count when the preset's
    ngroups does not divide it.  Raises ValueError for an impossible combination."""
    from .model import MMM4RecConfig
    cfg = base_config(pretrain)
    cfg.update(PRESETS[preset]["model"])
    if inherit:
        cfg.update({k: v for k, v in inherit.items() if k in cfg and (inherit_all or k not in NOT_INHERITED)
                    and k not in ("max_len", "backend", "path")})
    explicit = {k: v for k, v in flags.items() if v is not None}
    cfg.update(explicit)
    if "ffn_inner" not in explicit and "hidden_size" in explicit:
        cfg["ffn_inner"] = cfg["hidden_size"]
    nheads = cfg["hidden_size"] * cfg["expand"] // max(cfg["headdim"], 1)
    if "ngroups" not in explicit and nheads > 0 and nheads % cfg["ngroups"]:
        cfg["ngroups"] = nheads
    cfg.update(max_len=max_len, backend=backend, path=path)
    return MMM4RecConfig.from_dict(cfg)


def train_settings(preset: str, cmd: str, overrides: dict) -> dict:
    """The preset's Trainer settings for `cmd` ("finetune" / "pretrain"), with the non-None overrides applied."""
    p = PRESETS[preset]
    s = {**p["train"], **p[cmd]}
    s.update({k: v for k, v in overrides.items() if v is not None})
    return s
