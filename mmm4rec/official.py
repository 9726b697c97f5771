"""Import a checkpoint of the official MMM4Rec code into our checkpoint format (model.safetensors + config.json).

    from mmm4rec.official import import_official
    info = import_official("official.ckpt", "runs/imported", ngroups=8)   # -> {"out_dir", "num_items", "config", ...}
    # then: mmm4rec.train.load_checkpoint("runs/imported", data) for the same item catalogue, or
    #       mmm4rec.train.load_pretrained(model, "runs/imported") to fine-tune on another one.

The official tensor names and shapes are listed in mmm4rec/model/official_names.txt; `official_to_ours` below maps
each onto our module tree (the official TiSSD of layer i is shared by its encoder and decoder layer: both copies must
be equal).  Sizes are read from the tensor shapes; ngroups (G) cannot be told apart from d_state (n) by shape (only
G * n is stored), so it is an argument (official: 8).  The frozen feature buffers of the official checkpoint
(text_embedding / vision_embedding, row 0 = padding) are not model weights here; they are written beside the
checkpoint as features.safetensors (keys text_feats, image_feats) when present.

Settings that do not show in the weights (dropout, temperature, eps, ...) are the official ones (MMM4RecConfig()
defaults).  `exact=True` also switches our deliberate deviations to the official behaviour (see docs/model.md,
"Official code vs ours"); by default the imported model keeps our fixes.  Our learned missing-image vector has no
official counterpart: it is set to vision_adapter(0), the official embedding of an all-zero image feature row.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict

import torch

logger = logging.getLogger(__name__)

# official name (with {i} for the layer index) -> our name.  "{i}" in both: per-layer.
_TOP = {
    "text_in_layer_norm.weight": "text_in_norm.weight",
    "text_in_layer_norm.bias": "text_in_norm.bias",
    "vision_in_layer_norm.weight": "image_in_norm.weight",
    "vision_in_layer_norm.bias": "image_in_norm.bias",
    "layer_norm_time.weight": "time_encoder.norm.weight",
    "layer_norm_time.bias": "time_encoder.norm.bias",
    "text_item_embedding_bias": "text_emb.id_bias.weight",
    "vision_item_embedding_bias": "image_emb.id_bias.weight",
    "text_adapter.0.weight": "text_emb.adapter.weight",
    "text_adapter.0.bias": "text_emb.adapter.bias",
    "vision_adapter.0.weight": "image_emb.adapter.weight",
    "vision_adapter.0.bias": "image_emb.adapter.bias",
}
# official SSD-core names (TiSSD and CoTiSSD) -> ours, relative to the block
_CORE = {
    "dt_bias": "core.dt_bias", "A_log": "core.A_log", "D": "core.D", "norm.weight": "core.norm_weight",
    "out_proj.weight": "core.out_proj.weight", "out_proj.bias": "core.out_proj.bias",
    "conv1d4time_1.weight": "core.time.conv1.weight", "conv1d4time_1.bias": "core.time.conv1.bias",
    "conv1d4time_2.weight": "core.time.conv2.weight", "conv1d4time_2.bias": "core.time.conv2.bias",
    "mlp4time_scale.1.weight": "core.time.mix1.weight", "mlp4time_scale.1.bias": "core.time.mix1.bias",
    "mlp4time_scale.3.weight": "core.time.mix2.weight", "mlp4time_scale.3.bias": "core.time.mix2.bias",
}
_TISSD = {**_CORE,
          "in_proj.weight": "in_proj.weight", "in_proj.bias": "in_proj.bias",
          "conv1d_1.weight": "conv.weight", "conv1d_1.bias": "conv.bias",
          "time_gate_residual.1.weight": "core.time.gate.weight", "time_gate_residual.1.bias": "core.time.gate.bias",
          "time_layer_norm.weight": "core.time.norm.weight", "time_layer_norm.bias": "core.time.norm.bias"}
_COSSD = {**_CORE,
          "u_in_proj.weight": "text_proj.weight", "u_in_proj.bias": "text_proj.bias",      # x | B | dt from text
          "q_in_proj.weight": "vision_proj.weight", "q_in_proj.bias": "vision_proj.bias",  # C from vision
          "z_in_proj.weight": "gate_proj.weight", "z_in_proj.bias": "gate_proj.bias",      # z from text + vision
          "u_conv1d.weight": "text_conv.weight", "u_conv1d.bias": "text_conv.bias",
          "q_conv1d.weight": "vision_conv.weight", "q_conv1d.bias": "vision_conv.bias"}
_FFN = {"fc1.weight": "fc1.weight", "fc1.bias": "fc1.bias", "fc2.weight": "fc2.weight", "fc2.bias": "fc2.bias",
        "layer_norm.weight": "norm.weight", "layer_norm.bias": "norm.bias"}
# The official "text_complex_weight" filters the DECODER (vision) time signal and "vision_complex_weight" the
# encoder (text) one: their names are swapped relative to what they act on.  Ours are named by what they act on.
_FILTER = {"text_complex_weight.0": "cl_v", "vision_complex_weight.0": "cl_t", "co_complex_weight.0": "cl_co"}


def official_to_ours(n_layers: int) -> Dict[str, str]:
    """{official tensor name: our state_dict name} for a model with n_layers layers (per-layer stacking)."""
    out = dict(_TOP)
    for i in range(n_layers):
        enc, dec = f"encoder_ssd_layers.{i}", f"decoder_ssd_layers.{i}"
        out.update({f"{enc}.ssd.{k}": f"tissd.{i}.{v}" for k, v in _TISSD.items()})
        out.update({f"{enc}.layer_norm.{p}": f"text_layers.{i}.norm.{p}" for p in ("weight", "bias")})
        out.update({f"{enc}.ffn.{k}": f"text_layers.{i}.ffn.{v}" for k, v in _FFN.items()})
        out.update({f"{dec}.co_ssd.{k}": f"ticossd.{i}.{v}" for k, v in _COSSD.items()})
        out.update({f"{dec}.layer_norm.{p}": f"image_layers.{i}.norm.{p}" for p in ("weight", "bias")})
        out.update({f"{dec}.co_layer_norm.{p}": f"co_norm.{i}.{p}" for p in ("weight", "bias")})
        out.update({f"{dec}.ffn.{k}": f"co_ffn.{i}.{v}" for k, v in _FFN.items()})
        for theirs, ours in _FILTER.items():
            for part, lin in (("real", "lin_re"), ("imag", "lin_im")):
                for p in ("weight", "bias"):
                    out[f"{dec}.{theirs}.{part}.{p}"] = f"fourier.{i}.{ours}.{lin}.{p}"
    return out


# tensors that are not model weights here (checked or exported separately)
_FEATURES = {"text_embedding": "text_feats", "vision_embedding": "image_feats"}
_SHARED_COPY = re.compile(r"^decoder_ssd_layers\.(\d+)\.ssd\.(.+)$")


def read_official_state(path: str) -> Dict[str, torch.Tensor]:
    """The official model's tensors from `path` (a torch checkpoint: a state_dict, or a dict holding one under
    'state_dict' / 'model' as Lightning writes it; or a .safetensors file).  A common 'model.' prefix is dropped."""
    if not os.path.isfile(path):
        raise ValueError(f"official checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state_dict of tensors (nor a dict holding one under 'state_dict'/'model')")
    for prefix in ("model.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def config_from_official_state(state: Dict[str, torch.Tensor], ngroups: int = 8, exact: bool = False, **overrides):
    """MMM4RecConfig whose sizes match the official tensors (plus num_items).  Returns (config, num_items)."""
    from .model import MMM4RecConfig
    need = "encoder_ssd_layers.0.ssd.in_proj.weight"
    if need not in state:
        raise ValueError(f"not an official MMM4Rec state_dict: no {need!r} (found e.g. {sorted(state)[:3]})")
    layers = {int(m.group(1)) for k in state for m in [re.match(r"^encoder_ssd_layers\.(\d+)\.", k)] if m}
    n_layers = max(layers) + 1
    in_w = state[need]
    hidden = in_w.shape[1]
    nheads = state["encoder_ssd_layers.0.ssd.dt_bias"].shape[0]
    d_inner = state["encoder_ssd_layers.0.ssd.norm.weight"].shape[0]
    gn = state["decoder_ssd_layers.0.co_ssd.q_in_proj.weight"].shape[0]
    if gn % ngroups:
        raise ValueError(f"ngroups={ngroups} does not divide ngroups*d_state={gn} of the checkpoint")
    use_time = "layer_norm_time.weight" in state
    kw = dict(hidden_size=hidden, expand=d_inner // hidden, headdim=d_inner // nheads, d_state=gn // ngroups,
              ngroups=ngroups, d_conv=state["encoder_ssd_layers.0.ssd.conv1d_1.weight"].shape[-1],
              n_layers=n_layers, ffn_inner=state["encoder_ssd_layers.0.ffn.fc1.weight"].shape[0],
              feat_dim=state["text_adapter.0.weight"].shape[1], with_id="text_item_embedding_bias" in state,
              use_time=use_time)
    if use_time:
        kw["max_len"] = state["layer_norm_time.weight"].shape[0]
    elif "max_len" not in overrides:
        raise ValueError("checkpoint without a time path: pass max_len=... (it is not stored in the weights)")
    if exact:
        kw.update(mask_time_padding=False, learned_missing_image=False, exclude_padding_item=False,
                  inbatch_mask_duplicates=False)
    if "text_item_embedding_bias" in state:
        num_items = state["text_item_embedding_bias"].shape[0] - 1
    elif "text_embedding" in state:
        num_items = state["text_embedding"].shape[0] - 1
    elif "num_items" in overrides:
        num_items = overrides.pop("num_items")
    else:
        raise ValueError("checkpoint holds neither item biases nor features: pass num_items=...")
    overrides.pop("num_items", None)
    return MMM4RecConfig(**{**kw, **overrides}), int(num_items)


def convert_official_state(state: Dict[str, torch.Tensor], n_layers: int) -> Dict[str, torch.Tensor]:
    """Rename official tensors to ours.  Raises ValueError on unknown names, on a shared-TiSSD copy that differs
    from the encoder's, and on a non-static score fusion."""
    names = official_to_ours(n_layers)
    out, unknown = {}, []
    for k, v in state.items():
        if k in names:
            out[names[k]] = v.detach().clone()
        elif k in _FEATURES:
            continue
        elif k == "fusion_factor":
            if v.numel() != 1 or float(v) != 1.0:
                raise ValueError("fusion_factor is not the static fusion (1.0): item_mm_fusion 'dynamic_*' is not "
                                 "supported by MMM4Rec here")
        elif _SHARED_COPY.match(k):
            i, rest = _SHARED_COPY.match(k).groups()
            enc = state.get(f"encoder_ssd_layers.{i}.ssd.{rest}")
            if enc is None or enc.shape != v.shape or not torch.equal(enc, v):
                raise ValueError(f"{k} differs from the encoder's copy: the official TiSSD of a layer is shared "
                                 "(decoder_ssd_layers.i.ssd is encoder_ssd_layers.i.ssd)")
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"{len(unknown)} official tensor names not understood, e.g. {unknown[:5]}")
    return out


def import_official(ckpt_path: str, out_dir: str, *, ngroups: int = 8, exact: bool = False,
                    **config_overrides) -> dict:
    """Convert the official checkpoint `ckpt_path` into our checkpoint dir `out_dir` (model.safetensors +
    config.json, as mmm4rec.train.save_checkpoint writes; plus features.safetensors when the official file holds
    the feature buffers).  ngroups: B/C groups (not recoverable from shapes; official 8).  exact: switch our
    deliberate deviations to the official behaviour.  config_overrides: other MMM4RecConfig fields (e.g.
    backend="torch"; max_len / num_items where the weights do not tell).
    Returns {"out_dir", "num_items", "config", "converted", "features"}."""
    from .model import MMM4Rec
    from .train import save_checkpoint
    state = read_official_state(ckpt_path)
    config, num_items = config_from_official_state(state, ngroups=ngroups, exact=exact, **config_overrides)
    ours = convert_official_state(state, config.n_layers)
    text = state.get("text_embedding")
    image = state.get("vision_embedding")
    if text is None:                          # the features belong to the dataset: any matrix of the right shape
        text = torch.zeros(num_items + 1, state["text_adapter.0.weight"].shape[1])
    if image is None:
        image = torch.zeros(num_items + 1, state["vision_adapter.0.weight"].shape[1])
    model = MMM4Rec(config, num_items, text.float(), image.float())
    if model.image_emb.missing is not None:   # no official counterpart: the embedding of an all-zero image row
        ours["image_emb.missing"] = state["vision_adapter.0.bias"].detach().clone()
    expected = model.state_dict()
    bad = [k for k, v in ours.items() if k in expected and expected[k].shape != v.shape]
    if bad:
        raise ValueError(f"shape mismatch after conversion, e.g. {bad[0]}: {tuple(ours[bad[0]].shape)} vs ours "
                         f"{tuple(expected[bad[0]].shape)} (is ngroups={ngroups} right?)")
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise ValueError(f"conversion incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    save_checkpoint(model, out_dir, extra={"imported_from": os.path.abspath(ckpt_path), "official_exact": exact})
    features = None
    if "text_embedding" in state or "vision_embedding" in state:
        from safetensors.torch import save_file
        features = os.path.join(out_dir, "features.safetensors")
        save_file({ours_name: state[k].contiguous() for k, ours_name in _FEATURES.items() if k in state}, features)
    logger.info("imported %s -> %s (%d tensors, %d layers, %d items)", ckpt_path, out_dir, len(ours),
                config.n_layers, num_items)
    return {"out_dir": out_dir, "num_items": num_items, "config": config.to_dict(), "converted": len(ours),
            "features": features}


def main_summary(info: dict) -> str:
    """One line for the CLI to print after import_official."""
    c = info["config"]
    return (f"imported {info['converted']} tensors -> {info['out_dir']} ({c['n_layers']} layer(s), hidden "
            f"{c['hidden_size']}, {info['num_items']} items" + (f"; features: {info['features']}" if info["features"]
                                                                  else "") + ")")


__all__ = ["import_official", "official_to_ours", "convert_official_state", "read_official_state",
           "config_from_official_state", "main_summary"]
