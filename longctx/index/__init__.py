"""ANNS indexes over offloaded keys: the attention-aware graph (C++), faiss baselines, metrics.

``make_index(kind, num_heads, num_kv_heads, head_dim, params)`` builds one of
:data:`INDEX_TYPES`; all share the :class:`KeyIndex` interface.
"""
from __future__ import annotations

from typing import Optional

from longctx.index.attention_aware import AttentionAwareIndex
from longctx.index.base import IndexParams, KeyIndex, SearchResult
from longctx.index.faiss_indexes import FlatIndex, HNSWIndex, IVFIndex
from longctx.index.metrics import exact_topk, mahalanobis_ratio, recall_at_k, scan_fraction

INDEX_CLASSES = {cls.kind: cls for cls in (AttentionAwareIndex, FlatIndex, IVFIndex, HNSWIndex)}
INDEX_TYPES = tuple(INDEX_CLASSES)


def make_index(
    kind: str, num_heads: int, num_kv_heads: int, head_dim: int, params: Optional[IndexParams] = None
) -> KeyIndex:
    """Build an empty index of type ``kind`` (one of :data:`INDEX_TYPES`)."""
    if kind not in INDEX_CLASSES:
        raise ValueError(f"index requires one of {list(INDEX_TYPES)} (got {kind!r})")
    return INDEX_CLASSES[kind](num_heads, num_kv_heads, head_dim, params)


__all__ = [
    "KeyIndex",
    "IndexParams",
    "SearchResult",
    "AttentionAwareIndex",
    "FlatIndex",
    "IVFIndex",
    "HNSWIndex",
    "INDEX_TYPES",
    "make_index",
    "exact_topk",
    "recall_at_k",
    "scan_fraction",
    "mahalanobis_ratio",
]
