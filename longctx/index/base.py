"""The common interface of the key indexes used by RetrievalAttention.

An index serves one sequence: H query heads search the offloaded keys of their KV head
(``[Hkv, N, D]``, GQA groups of G = H // Hkv heads share one key set). The caller owns the
key store and passes a float32 view of it to every call, so keys are held once on the host
tier; indexes that need their own copy (faiss) take it in :meth:`KeyIndex.build` /
:meth:`KeyIndex.add`.

Dimension letters: H query heads, Hkv KV heads, G = H // Hkv, N keys, D head dim,
S queries per head, K top-k.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Optional

import numpy as np


def _positive(cls: str, name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = "a non-negative int" if allow_zero else "a positive int"
        raise ValueError(f"{cls}.{name} requires {bound} (got {value!r})")


@dataclasses.dataclass
class IndexParams:
    """Build and search parameters shared by every index type (each reads its own).

    Parameters
    ----------
    ef_search : int
        Search width: the beam width L of the attention-aware graph and ``efSearch`` of
        HNSW (raised to ``k`` when smaller). Default 160.
    degree : int
        Attention-aware graph: projection edges per key and query head: a training query's
        top-1 key links to the query's other top keys (RoarGraph's projection). Default 128.
    base_degree : int
        Attention-aware graph: key-key edges per key, shared by the heads of a GQA group
        (RoarGraph's connectivity enhancement). Default 8 (fewer keys scanned per recall
        than 16 or 32 on out-of-distribution queries).
    proj_prune : bool
        Attention-aware graph: prune projection edges by RoarGraph's occlusion rule (inner
        product) and add reverse edges, instead of keeping the query's rank order. Default
        False (rank order scanned fewer keys per recall in ``longctx bench --index-recall``).
    proj_reverse : bool
        Attention-aware graph, rank-order projection: also link each neighbour back to its
        pivot. Default True: a key that is the top-1 of a few training queries (a needle) gets
        out-edges from the projection but otherwise no in-edges, so searches rarely reach it
        (the bundled target's RULER ``niah_single_1`` at 4K through the backend: 100 with, 80
        without; 0.90 recall@100 on the synthetic set at 3.7% of the keys scanned, against
        2.9% without; BENCHMARKS.md, RetrievalAttention, twentieth session).
    half_keys : bool
        Attention-aware graph: score search candidates on an fp16 copy of the keys (half the
        memory traffic of a search, +50% of the fp32 key bytes in memory). Default True.
    build_knn : int
        Attention-aware graph: exact neighbours per training query projected onto the
        key-key graph (RoarGraph's Nq). Default 100.
    build_ef : int
        Attention-aware graph: beam width of the key->key searches that link every key
        (connectivity enhancement and incremental insertion). Default 64.
    max_train_queries : int
        Attention-aware graph: prefill queries per head used for the exact kNN, evenly
        subsampled when there are more (RoarGraph builds from a query sample). Default 4096.
    num_entry : int
        Attention-aware graph: entry keys per head (the key nearest the key centroid plus
        the keys most often top-1 for a training query). Default 4.
    nlist : int, optional
        IVF: inverted lists; if not provided, ``4 * sqrt(N)`` (at most ``N // 39``).
    nprobe : int
        IVF: lists probed per query. Default 32.
    hnsw_m : int
        HNSW: links per node. Default 32.
    num_threads : int
        OpenMP threads of the attention-aware index; 0 follows ``torch.get_num_threads()``
        (faiss indexes use faiss' own setting). Default 0.
    """

    ef_search: int = 160
    degree: int = 128
    base_degree: int = 8
    proj_prune: bool = False
    proj_reverse: bool = True
    half_keys: bool = True
    build_knn: int = 100
    build_ef: int = 64
    max_train_queries: int = 4096
    num_entry: int = 4
    nlist: Optional[int] = None
    nprobe: int = 32
    hnsw_m: int = 32
    num_threads: int = 0

    def __post_init__(self):
        for name in ("ef_search", "build_knn", "build_ef", "max_train_queries", "num_entry", "nprobe", "hnsw_m"):
            _positive("IndexParams", name, getattr(self, name))
        _positive("IndexParams", "num_threads", self.num_threads, allow_zero=True)
        _positive("IndexParams", "degree", self.degree)
        if not isinstance(self.base_degree, int) or self.base_degree < 2:
            raise ValueError(f"IndexParams.base_degree requires an int >= 2 (got {self.base_degree!r})")
        for name in ("proj_prune", "proj_reverse", "half_keys"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"IndexParams.{name} requires a bool (got {getattr(self, name)!r})")
        if self.nlist is not None:
            _positive("IndexParams", "nlist", self.nlist)


@dataclasses.dataclass
class SearchResult:
    """Top-k keys per (query head, query).

    Attributes
    ----------
    ids : np.ndarray
        ``[H, S, K]`` int64 key rows, best first; ``-1`` where fewer than K were found.
    scanned : np.ndarray
        ``[H, S]`` int64 keys scored to answer each query (the cost the paper reports as the
        fraction of keys scanned).
    """

    ids: np.ndarray
    scanned: np.ndarray


def check_keys(keys: np.ndarray, num_kv_heads: int, head_dim: int) -> None:
    """Validate a key store view ``[Hkv, N, D]`` float32 with contiguous rows."""
    if not isinstance(keys, np.ndarray):
        raise TypeError(f"keys requires a numpy array [Hkv, N, D] (got {type(keys).__name__})")
    if keys.dtype != np.float32:
        raise TypeError(f"keys requires dtype float32 (got {keys.dtype})")
    if keys.ndim != 3 or keys.shape[0] != num_kv_heads or keys.shape[2] != head_dim:
        raise ValueError(f"keys requires shape [Hkv={num_kv_heads}, N, D={head_dim}] (got {keys.shape})")
    if keys.strides[2] != 4:
        raise ValueError(f"keys requires contiguous rows (got strides {keys.strides})")


class KeyIndex(abc.ABC):
    """Approximate maximum-inner-product search over one sequence's offloaded keys.

    Parameters
    ----------
    num_heads : int
        Query heads H (one search per head and query).
    num_kv_heads : int
        KV heads Hkv; H must be a multiple.
    head_dim : int
        D.
    params : IndexParams, optional
        Build/search parameters; defaults if not provided.
    """

    #: the ``RetrievalConfig.index`` name of the type
    kind: str = "base"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, params: Optional[IndexParams] = None):
        for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            _positive(type(self).__name__, name, value)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{type(self).__name__} requires num_heads to be a multiple of num_kv_heads "
                f"(got num_heads={num_heads}, num_kv_heads={num_kv_heads})"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group_size = num_heads // num_kv_heads
        self.params = params or IndexParams()
        self.build_seconds = 0.0

    @abc.abstractmethod
    def build(self, keys: np.ndarray, queries: Optional[np.ndarray] = None) -> None:
        """Index ``keys`` ``[Hkv, N, D]`` float32, replacing any previous content.

        ``queries`` ``[H, Nq, D]`` float32 are the heads' training (prefill) queries; only
        the attention-aware index uses them.
        """

    @abc.abstractmethod
    def add(self, keys: np.ndarray) -> None:
        """Catch up with the key store: ``keys`` ``[Hkv, N, D]`` holds every key; rows
        ``[ntotal, N)`` are new and get inserted."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, keys: np.ndarray, k: int) -> SearchResult:
        """Top-``k`` keys by inner product for ``queries`` ``[H, S, D]`` float32.

        ``keys`` is the same key store view ``[Hkv, ntotal, D]`` (ignored by indexes that
        hold a copy).
        """

    @abc.abstractmethod
    def truncate(self, n: int) -> None:
        """Drop keys ``[n, ntotal)`` (rollback of tokens inserted after prefill)."""

    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """Keys indexed."""

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held by the index structure (without the caller's key store)."""

    # ---------------------------------------------------------------- helpers
    def _check_queries(self, queries: np.ndarray, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"{type(self).__name__}.search requires k > 0 (got {k!r})")
        if not isinstance(queries, np.ndarray) or queries.ndim != 3:
            got = getattr(queries, "shape", queries)
            raise ValueError(f"{type(self).__name__}.search requires queries [H, S, D] (got {got})")
        if queries.shape[0] != self.num_heads or queries.shape[2] != self.head_dim:
            raise ValueError(
                f"{type(self).__name__}.search requires queries [H={self.num_heads}, S, D={self.head_dim}] "
                f"(got {queries.shape})"
            )

    def _check_truncate(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.ntotal:
            raise ValueError(f"{type(self).__name__}.truncate requires 0 <= n <= ntotal={self.ntotal} (got {n!r})")
