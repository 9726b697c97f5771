"""Data pipeline: atomic files -> SequentialData (k-core, leave-one-out, prefix samples, batches) + item features."""
from .atomic import item_texts, read_atomic, write_atomic
from .dataset import BatchIterator, SequentialData, concat_domains, gather_histories, kcore_mask
from .features import (align_features, attach_features, encode_texts, encode_texts_hashed, encode_texts_minilm,
                       load_matrix, minilm_available, read_mapping)
from .synthetic import PAPER_DATASETS, SyntheticDataset, make_paper_like, make_synthetic_dataset

__all__ = ["read_atomic", "write_atomic", "item_texts", "SequentialData", "BatchIterator", "concat_domains",
           "gather_histories", "kcore_mask", "align_features", "attach_features", "encode_texts",
           "encode_texts_hashed", "encode_texts_minilm", "load_matrix", "minilm_available", "read_mapping",
           "make_synthetic_dataset", "make_paper_like", "SyntheticDataset", "PAPER_DATASETS"]
