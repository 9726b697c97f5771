"""Checkpoint files: a checkpoint is a dir with model.safetensors + config.json (+ trainer.pt for resuming).

    save_checkpoint(model, dir, extra=None, trainer_state=None)   atomic: written to dir.tmp, then swapped in
    read_checkpoint_config(dir) -> {"model_config", "num_items", ...}
    load_checkpoint(dir, data, device=None, **config_overrides) -> MMM4Rec (strict weights)
    load_pretrained(model, dir) -> (missing, unexpected)          transferable weights into another catalogue
    read_weights(file) -> {name: tensor}
Every unreadable or mismatched file is a ValueError naming it.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch


def _swap_in(tmp: str, path: str) -> None:
    """Replace dir `path` by the complete dir `tmp` with renames only (path -> path.old, tmp -> path, drop .old)."""
    old = path + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def checkpoint_dir(path: str) -> str:
    """`path`, or `path.old` when a crash hit between the two renames of a checkpoint swap."""
    if not os.path.exists(path) and os.path.exists(os.path.join(path + ".old", "config.json")):
        return path + ".old"
    return path


def save_checkpoint(model, path: str, extra: Optional[dict] = None, trainer_state: Optional[dict] = None) -> None:
    """Write model.safetensors + config.json (+ trainer.pt when trainer_state is given) into dir `path`, atomically:
    everything goes to `path.tmp` first and is then swapped in, so a crash never leaves a half-written checkpoint."""
    from safetensors.torch import save_model
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, "model.safetensors"))
    meta = {"model_config": model.config.to_dict(), "num_items": int(model.num_items)}
    meta.update(extra or {})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if trainer_state is not None:
        torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    _swap_in(tmp, path)


def _write_json_atomic(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def read_checkpoint_config(path: str) -> dict:
    """The config.json of checkpoint dir `path`; a missing or unreadable file is a ValueError naming it."""
    path = checkpoint_dir(path)
    p = os.path.join(path, "config.json")
    if not os.path.exists(p):
        raise ValueError(f"{path} is not a checkpoint dir (no config.json)")
    try:
        with open(p) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is corrupted (not valid JSON: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict) or "num_items" not in meta:
        raise ValueError(f"{p} is not a checkpoint config (needs 'model_config' and 'num_items')")
    return meta


def _load_weights(model, file: str) -> None:
    """safetensors -> model (strict); a missing, truncated or mismatched file is a ValueError naming it."""
    from safetensors.torch import load_model
    if not os.path.exists(file):
        raise ValueError(f"{file}: no such file (the checkpoint dir is incomplete)")
    try:
        load_model(model, file, strict=True)
    except Exception as e:  # SafetensorError (truncated / not safetensors), RuntimeError (shape / key mismatch)
        raise ValueError(f"{file} cannot be loaded into this model ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else 'no detail'})") from None


def read_weights(file: str) -> dict:
    """A safetensors file as {name: tensor} on CPU; unreadable files are a ValueError naming the file."""
    from safetensors.torch import load_file
    if not os.path.exists(file):
        raise ValueError(f"{file}: no such file")
    try:
        return load_file(file, device="cpu")
    except Exception as e:
        raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def load_checkpoint(path: str, data, device=None, **config_overrides):
    """Rebuild the model saved in dir `path` for `data` (which supplies the features) and load its weights.
    config_overrides (e.g. backend="torch") replace stored config fields. Raises ValueError on an item-count
    mismatch (use load_pretrained for another domain) and on unreadable files (naming the file)."""
    from .model import MMM4RecConfig
    from .train import build_model, resolve_device
    path = checkpoint_dir(path)
    meta = read_checkpoint_config(path)
    if meta["num_items"] != data.num_items:
        raise ValueError(f"checkpoint {path} has {meta['num_items']} items, dataset {data.name!r} has "
                         f"{data.num_items}; for another domain use load_pretrained / --init")
    try:
        cfg = MMM4RecConfig.from_dict({**meta["model_config"], **config_overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(path, 'config.json')}: bad model_config ({e})") from None
    if data.max_len != cfg.max_len:
        data.with_max_len(cfg.max_len)
    model = build_model(cfg, data)
    _load_weights(model, os.path.join(path, "model.safetensors"))
    return model.to(resolve_device(device))


def load_pretrained(model, path: str):
    """Load a (pre-trained) checkpoint's transferable weights into `model` (another item catalogue allowed).
    Returns (missing, unexpected) key lists from model.load_transfer."""
    state = read_weights(os.path.join(checkpoint_dir(path), "model.safetensors"))
    try:
        return model.load_transfer(state)
    except RuntimeError as e:  # shape mismatch: another hidden size / heads
        raise ValueError(f"{path}: pre-trained weights do not fit this model ({str(e).splitlines()[0][:300]}); "
                         "give the same architecture flags as the pre-training run") from None
