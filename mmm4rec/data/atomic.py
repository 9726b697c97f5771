"""Read and write RecBole-style atomic files (`<name>.inter`, `<name>.item`).

An atomic file is tab-separated with a typed header, e.g.::

    user_id:token	item_id:token	rating:float	timestamp:float

Types: `token` (a string id), `token_seq` (space-separated strings), `float`, `float_seq`. Columns come back as numpy
arrays: `token` -> str array [n], `float` -> float64 [n] (empty cell -> NaN), `*_seq` -> object array of lists [n].
"""
from __future__ import annotations

import io
import os
from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]
_TYPES = ("token", "token_seq", "float", "float_seq")


def parse_header(line: str) -> list:
    """Split a typed header line into [(field, type), ...]; raises ValueError on an unknown or missing type."""
    cols = []
    for cell in line.rstrip("\r\n").split("\t"):
        if ":" not in cell:
            raise ValueError(f"atomic header cell {cell!r} has no ':type' suffix (expected e.g. 'item_id:token')")
        name, typ = cell.rsplit(":", 1)
        if typ not in _TYPES:
            raise ValueError(f"atomic header cell {cell!r}: unknown type {typ!r}, expected one of {_TYPES}")
        cols.append((name, typ))
    return cols


def _convert(values: list, typ: str, name: str) -> np.ndarray:
    if typ == "token":
        return np.asarray(values, dtype=str)
    if typ == "float":
        out = np.empty(len(values), dtype=np.float64)
        for i, v in enumerate(values):
            try:
                out[i] = float(v) if v != "" else np.nan
            except ValueError:
                raise ValueError(f"column {name!r} line {i + 2}: {v!r} is not a float") from None
        return out
    seqs = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        toks = v.split(" ") if v else []
        try:
            seqs[i] = [float(t) for t in toks] if typ == "float_seq" else toks
        except ValueError:
            raise ValueError(f"column {name!r} line {i + 2}: {v!r} is not a list of floats") from None
    return seqs


def read_atomic(source: Union[PathLike, io.TextIOBase, bytes], fields: Optional[Iterable[str]] = None
                ) -> Dict[str, np.ndarray]:
    """Read one atomic file into {field: array}.

    Args:
        source: a path, an open text stream, or the file's raw bytes (e.g. read from inside a zip).
        fields: keep only these fields (all by default); a requested field absent from the header is a ValueError.
    Returns:
        dict field -> numpy array with one entry per data row (see module doc for dtypes); the header types are
        kept under the key "__types__" as {field: type}.
    """
    name = "<bytes>" if isinstance(source, bytes) else getattr(source, "name", None) or str(source)
    try:
        return _read_atomic(source, fields)
    except FileNotFoundError:
        raise ValueError(f"{name}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _read_atomic(source, fields):
    if isinstance(source, bytes):
        text = source.decode("utf-8")
    elif isinstance(source, io.TextIOBase):
        text = source.read()
    else:
        with open(source, "r", encoding="utf-8") as f:
            text = f.read()
    lines = text.split("\n")
    if not lines or not lines[0].strip():
        raise ValueError("the atomic file is empty")
    header = parse_header(lines[0])
    names = [n for n, _ in header]
    want = list(names) if fields is None else list(fields)
    for w in want:
        if w not in names:
            raise ValueError(f"no column {w!r} in the header {names} (name the column with --user-field / "
                             "--item-field / --time-field)")
    rows = [ln.rstrip("\r").split("\t") for ln in lines[1:] if ln.strip("\r") != ""]
    ncol = len(header)
    cols: Dict[str, list] = {n: [] for n in names}
    for r, cells in enumerate(rows):
        if len(cells) < ncol:  # trailing empty cells may be stripped by some writers
            cells = cells + [""] * (ncol - len(cells))
        elif len(cells) > ncol:
            raise ValueError(f"atomic row {r + 2} has {len(cells)} cells, header has {ncol}")
        for n, c in zip(names, cells):
            cols[n].append(c)
    types = dict(header)
    out: Dict[str, np.ndarray] = {w: _convert(cols[w], types[w], w) for w in want}
    out["__types__"] = {w: types[w] for w in want}  # type: ignore[assignment]
    return out


def write_atomic(path: PathLike, columns: Dict[str, Sequence], types: Dict[str, str]) -> None:
    """Write {field: values} as an atomic file; `types[field]` is one of token/token_seq/float/float_seq."""
    names = list(columns)
    n = {len(columns[k]) for k in names}
    if len(n) != 1:
        raise ValueError(f"columns have different lengths: { {k: len(columns[k]) for k in names} }")
    for k in names:
        if types.get(k) not in _TYPES:
            raise ValueError(f"field {k!r}: type {types.get(k)!r} not in {_TYPES}")

    def fmt(v, typ):
        if typ.endswith("_seq"):
            return " ".join(str(x) for x in v)
        if typ == "float":
            f = float(v)
            return str(int(f)) if f.is_integer() else repr(f)
        return str(v)

    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(f"{k}:{types[k]}" for k in names) + "\n")
        for row in zip(*(columns[k] for k in names)):
            f.write("\t".join(fmt(v, types[k]) for v, k in zip(row, names)) + "\n")


def item_texts(item_cols: Dict[str, np.ndarray], item_field: str = "item_id",
               text_fields: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Join the text fields of a `.item` table into one string per raw item id.

    Args:
        item_cols: output of read_atomic on a `.item` file.
        text_fields: fields to join, in order (default: every field except the id, in header order).
    Returns:
        {raw item token: "field1 text. field2 text ..."}.
    """
    if item_field not in item_cols:
        raise ValueError(f"item field {item_field!r} not in .item columns {list(k for k in item_cols if k[:2] != '__')}")
    if text_fields is None:
        text_fields = [k for k in item_cols if k != item_field and not k.startswith("__")]
    for t in text_fields:
        if t not in item_cols:
            raise ValueError(f"text field {t!r} not in .item columns")
    out = {}
    for i, tok in enumerate(item_cols[item_field]):
        parts = []
        for t in text_fields:
            v = item_cols[t][i]
            if isinstance(v, list):
                v = " ".join(str(x) for x in v)
            elif isinstance(v, float) and np.isnan(v):
                continue
            v = str(v).strip()
            if v:
                parts.append(v)
        out[str(tok)] = ". ".join(parts)
    return out
