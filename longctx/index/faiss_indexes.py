"""Off-the-shelf faiss indexes (the paper's baselines): exact flat, IVF and HNSW.

They are built from the keys alone (query-agnostic), one faiss index per KV head; the G
query heads of a group search the same index. Each holds its own copy of the keys, as faiss
requires. ``scanned`` counts the keys scored per query: all of them for flat, the keys in the
probed lists for IVF (centroid scoring not counted), the distance computations for HNSW
(faiss' global search statistics, averaged over the queries of one call).
"""
from __future__ import annotations

import abc
import math
import time
from typing import Optional

import numpy as np

from longctx.index.base import IndexParams, KeyIndex, SearchResult, check_keys


def _faiss():
    import faiss

    return faiss


class _FaissIndex(KeyIndex):
    """One faiss index per KV head; subclasses say how to make, tune and count one."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, params: Optional[IndexParams] = None):
        super().__init__(num_heads, num_kv_heads, head_dim, params)
        self._indexes: list = []
        self._n = 0

    # -- what differs per type
    @abc.abstractmethod
    def _make(self, xb: np.ndarray):
        """A faiss index holding the rows of ``xb`` ``[N, D]``."""

    def _prepare_search(self, index, k: int) -> None:
        """Set search-time parameters on one index."""

    def _reset_stats(self) -> None:
        """Zero faiss' global counters before a search."""

    def _scanned(self, index, nq: int) -> float:
        """Keys scored per query in the last search (after :meth:`_reset_stats`)."""
        return float(index.ntotal)

    # -- the interface
    def build(self, keys: np.ndarray, queries: Optional[np.ndarray] = None) -> None:
        check_keys(keys, self.num_kv_heads, self.head_dim)
        t0 = time.perf_counter()
        self._indexes = [self._make(np.ascontiguousarray(keys[kv])) for kv in range(self.num_kv_heads)]
        self._n = keys.shape[1]
        self.build_seconds = time.perf_counter() - t0

    def add(self, keys: np.ndarray) -> None:
        check_keys(keys, self.num_kv_heads, self.head_dim)
        if keys.shape[1] < self._n:
            raise ValueError(f"{type(self).__name__}.add requires at least ntotal={self._n} keys (got {keys.shape[1]})")
        if keys.shape[1] == self._n:
            return
        if not self._indexes:
            self.build(keys)
            return
        for kv, index in enumerate(self._indexes):
            index.add(np.ascontiguousarray(keys[kv, self._n :]))
        self._n = keys.shape[1]

    def search(self, queries: np.ndarray, keys: Optional[np.ndarray], k: int) -> SearchResult:
        self._check_queries(queries, k)
        H, S, D = queries.shape
        G = self.group_size
        ids = np.full((H, S, k), -1, dtype=np.int64)
        scanned = np.zeros((H, S), dtype=np.int64)
        if self._n == 0:
            return SearchResult(ids, scanned)
        for kv, index in enumerate(self._indexes):
            xq = np.ascontiguousarray(queries[kv * G : (kv + 1) * G].reshape(G * S, D), dtype=np.float32)
            self._prepare_search(index, k)
            self._reset_stats()
            _, found = index.search(xq, k)
            ids[kv * G : (kv + 1) * G] = found.reshape(G, S, k)
            scanned[kv * G : (kv + 1) * G] = int(round(self._scanned(index, G * S)))
        return SearchResult(ids, scanned)

    def truncate(self, n: int) -> None:
        self._check_truncate(n)
        if n == self._n:
            return
        faiss = _faiss()
        for index in self._indexes:
            index.remove_ids(faiss.IDSelectorRange(n, self._n))
        self._n = n

    @property
    def ntotal(self) -> int:
        return self._n

    def nbytes(self) -> int:
        return self._n * self.head_dim * 4 * self.num_kv_heads


class FlatIndex(_FaissIndex):
    """Exact search (``faiss.IndexFlatIP``): the paper's Flat baseline and MInference's default."""

    kind = "flat"

    def _make(self, xb: np.ndarray):
        index = _faiss().IndexFlatIP(self.head_dim)
        index.add(xb)
        return index


class IVFIndex(_FaissIndex):
    """Inverted file (``faiss.IndexIVFFlat``, inner product), k-means trained on the keys.

    ``nlist`` defaults to ``4 * sqrt(N)`` (at most ``N // 39``, faiss' minimum training
    ratio); ``nprobe`` lists are scanned per query.
    """

    kind = "ivf"

    def nlist_for(self, n: int) -> int:
        if self.params.nlist is not None:
            return max(1, min(self.params.nlist, n))
        return max(1, min(int(4 * math.sqrt(n)), n // 39))

    def _make(self, xb: np.ndarray):
        faiss = _faiss()
        nlist = self.nlist_for(xb.shape[0])
        quantizer = faiss.IndexFlatIP(self.head_dim)
        index = faiss.IndexIVFFlat(quantizer, self.head_dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(xb)
        index.add(xb)
        return index

    def build(self, keys: np.ndarray, queries: Optional[np.ndarray] = None) -> None:
        if keys.shape[1] == 0:
            # nothing to train on yet: the first add() trains
            check_keys(keys, self.num_kv_heads, self.head_dim)
            self._indexes, self._n = [], 0
            return
        super().build(keys, queries)

    def _prepare_search(self, index, k: int) -> None:
        index.nprobe = min(self.params.nprobe, index.nlist)

    def _reset_stats(self) -> None:
        _faiss().cvar.indexIVF_stats.reset()

    def _scanned(self, index, nq: int) -> float:
        return _faiss().cvar.indexIVF_stats.ndis / max(nq, 1)

    def nbytes(self) -> int:
        lists = sum(index.nlist for index in self._indexes) * self.head_dim * 4
        return self._n * (self.head_dim * 4 + 8) * self.num_kv_heads + lists


class HNSWIndex(_FaissIndex):
    """HNSW graph (``faiss.IndexHNSWFlat``, inner product), built from the keys alone.

    ``hnsw_m`` links per node; ``efSearch = max(ef_search, k)``.
    """

    kind = "hnsw"

    def _make(self, xb: np.ndarray):
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(self.head_dim, self.params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.add(xb)
        return index

    def _prepare_search(self, index, k: int) -> None:
        index.hnsw.efSearch = max(self.params.ef_search, k)

    def _reset_stats(self) -> None:
        _faiss().cvar.hnsw_stats.reset()

    def _scanned(self, index, nq: int) -> float:
        return _faiss().cvar.hnsw_stats.ndis / max(nq, 1)

    def truncate(self, n: int) -> None:
        # HNSW cannot remove nodes: rebuild from the stored vectors (rollback past the window is rare)
        self._check_truncate(n)
        if n == self._n:
            return
        kept = [index.reconstruct_n(0, n) for index in self._indexes]
        self._indexes = [self._make(np.ascontiguousarray(x, dtype=np.float32)) for x in kept]
        self._n = n

    def nbytes(self) -> int:
        links = sum(index.hnsw.neighbors.size() * 4 + index.hnsw.offsets.size() * 8 for index in self._indexes)
        return super().nbytes() + links
