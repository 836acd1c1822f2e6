"""The attention-aware index of RetrievalAttention (arXiv 2409.10516), RoarGraph-style.

Queries of a head are out of distribution with its keys (the paper measures them >10x
farther, in Mahalanobis distance, than keys are from each other), so a key-key index built
for key-like queries must scan a large share of the keys. RetrievalAttention builds, per
query head, a key-key graph from the exact kNN of the head's prefill queries (RoarGraph,
VLDB 2024). Here (``longctx._C.GraphIndex``):

- projection edges, per query head: each training query's top-1 key (the pivot) links to the
  query's other top keys, in the query's rank order (``IndexParams.proj_prune=True`` applies
  RoarGraph's inner-product occlusion pruning with reverse edges instead; it scanned more
  keys per recall on our benchmarks, see BENCHMARKS.md);
- key-key edges, per KV head and shared by its GQA group (RoarGraph's connectivity
  enhancement is query independent): every key is linked by a key->key search with L2
  occlusion pruning and reverse edges, unreachable keys are attached; keys inserted after
  the build join this layer;
- a decode query runs a best-first beam search over both, from the key nearest the key
  centroid and the keys most often a training query's top-1.

The kNN lists are exact (a BLAS matmul plus a C++ row top-k). Prefill queries beyond
``IndexParams.max_train_queries`` per head are evenly subsampled, as RoarGraph builds from a
query sample; this keeps the kNN at 128K keys from costing as much as the prefill itself.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np

from longctx.index.base import IndexParams, KeyIndex, SearchResult, check_keys

logger = logging.getLogger(__name__)


def subsample_queries(queries: np.ndarray, max_queries: int) -> np.ndarray:
    """Evenly spaced rows of ``queries`` ``[H, Nq, D]`` (all of them when ``Nq <= max_queries``)."""
    nq = queries.shape[1]
    if nq <= max_queries:
        return queries
    rows = np.linspace(0, nq - 1, max_queries).round().astype(np.int64)
    return queries[:, rows]


def exact_knn(queries: np.ndarray, keys: np.ndarray, k: int, num_threads: int = 0) -> np.ndarray:
    """Exact top-``k`` keys by inner product: one BLAS matmul per block of queries (torch),
    row-wise selection in C++ (``longctx._C.topk_rows``).

    Parameters
    ----------
    queries : ``[H, Nq, D]`` float32; keys : ``[Hkv, N, D]`` float32 (H multiple of Hkv).
    num_threads : int
        Selection threads; 0 follows ``torch.get_num_threads()``.

    Returns
    -------
    ``[H, Nq, min(k, N)]`` int32 key rows, best first.
    """
    import torch

    from longctx import _C

    H, nq, D = queries.shape
    Hkv, N, _ = keys.shape
    G = H // Hkv
    k = min(k, N)
    out = np.empty((H, nq, k), dtype=np.int32)
    if k == 0 or nq == 0:
        return out
    threads = num_threads or torch.get_num_threads()
    rows = max(16, min(G * nq, (1 << 25) // max(N, 1)))  # score blocks of <= 128 MB
    for kv in range(Hkv):
        xb = torch.from_numpy(np.ascontiguousarray(keys[kv]))  # [N, D]
        xq = torch.from_numpy(np.ascontiguousarray(queries[kv * G : (kv + 1) * G].reshape(G * nq, D)))
        ids = out[kv * G : (kv + 1) * G].reshape(G * nq, k)
        for start in range(0, G * nq, rows):
            scores = torch.mm(xq[start : start + rows], xb.T)  # [rows, N]
            ids[start : start + rows] = _C.topk_rows(scores.numpy(), k, threads)
    return out


class AttentionAwareIndex(KeyIndex):
    """RoarGraph-style graph per query head, built from the heads' prefill queries.

    Parameters
    ----------
    num_heads, num_kv_heads, head_dim : int
        H, Hkv, D.
    params : IndexParams, optional
        Reads ``degree``, ``base_degree``, ``proj_prune``, ``proj_reverse``, ``half_keys``, ``build_knn``,
        ``build_ef``, ``max_train_queries``, ``num_entry``, ``ef_search``, ``num_threads``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> keys = rng.standard_normal((2, 500, 16), dtype=np.float32)
    >>> index = AttentionAwareIndex(4, 2, 16)
    >>> index.build(keys, rng.standard_normal((4, 200, 16), dtype=np.float32))
    >>> res = index.search(rng.standard_normal((4, 1, 16), dtype=np.float32), keys, k=10)
    >>> res.ids.shape, res.scanned.shape
    ((4, 1, 10), (4, 1))
    """

    kind = "attention_aware"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, params: Optional[IndexParams] = None):
        super().__init__(num_heads, num_kv_heads, head_dim, params)
        from longctx import _C

        p = self.params
        self._graph = _C.GraphIndex(
            num_heads, self.group_size, head_dim, p.degree, p.base_degree, p.build_ef, p.proj_prune, p.proj_reverse,
            p.half_keys,
        )
        self.knn_seconds = 0.0
        self.graph_seconds = 0.0
        self.train_queries = 0

    def build(self, keys: np.ndarray, queries: Optional[np.ndarray] = None) -> None:
        check_keys(keys, self.num_kv_heads, self.head_dim)
        p = self.params
        t0 = time.perf_counter()
        if queries is None or keys.shape[1] == 0:
            knn = np.zeros((self.num_heads, 0, 1), dtype=np.int32)
            self.train_queries = 0
        else:
            if queries.ndim != 3 or queries.shape[0] != self.num_heads or queries.shape[2] != self.head_dim:
                raise ValueError(
                    f"AttentionAwareIndex.build requires queries [H={self.num_heads}, Nq, D={self.head_dim}] "
                    f"(got {queries.shape})"
                )
            train = np.ascontiguousarray(subsample_queries(queries, p.max_train_queries), dtype=np.float32)
            self.train_queries = train.shape[1]
            knn = exact_knn(train, keys, p.build_knn, p.num_threads)
        t1 = time.perf_counter()
        self._graph.build(keys, knn, p.num_entry, self._threads())
        t2 = time.perf_counter()
        self.knn_seconds, self.graph_seconds = t1 - t0, t2 - t1
        self.build_seconds = t2 - t0
        logger.debug(
            "attention-aware index: %d keys x %d heads, %d training queries, knn %.2fs, graph %.2fs, %d keys attached",
            keys.shape[1], self.num_heads, self.train_queries, t1 - t0, t2 - t1, self._graph.last_attached,
        )

    def add(self, keys: np.ndarray) -> None:
        check_keys(keys, self.num_kv_heads, self.head_dim)
        self._graph.add(keys, self._threads())

    def search(self, queries: np.ndarray, keys: np.ndarray, k: int, ef: Optional[int] = None) -> SearchResult:
        """See :meth:`KeyIndex.search`; ``ef`` overrides ``params.ef_search`` (beam width)."""
        self._check_queries(queries, k)
        check_keys(keys, self.num_kv_heads, self.head_dim)
        width = self.params.ef_search if ef is None else ef
        q = np.ascontiguousarray(queries, dtype=np.float32)
        ids, scanned = self._graph.search(keys, q, k, width, self._threads())
        return SearchResult(ids, scanned)

    def _threads(self) -> int:
        # like the ops' C++ kernels: follow torch's setting so one knob governs both
        import torch

        return self.params.num_threads or torch.get_num_threads()

    def truncate(self, n: int) -> None:
        self._check_truncate(n)
        self._graph.truncate(n)

    @property
    def ntotal(self) -> int:
        return self._graph.n_keys

    def nbytes(self) -> int:
        return int(self._graph.nbytes())

    @property
    def graph(self):
        """The underlying ``longctx._C.GraphIndex`` (degrees, neighbours, reachability)."""
        return self._graph
