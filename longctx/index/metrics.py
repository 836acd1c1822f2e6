"""Index quality: recall@k against exact search, fraction of keys scanned, OOD-ness of queries.

Dimension letters: H query heads, Hkv KV heads, N keys, D head dim, S queries per head, K top-k.
"""
from __future__ import annotations

import numpy as np


def exact_topk(queries: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` keys by inner product: ``queries`` ``[H, S, D]``, ``keys`` ``[Hkv, N, D]`` ->
    ``[H, S, min(k, N)]`` int64, best first."""
    from longctx.index.attention_aware import exact_knn

    return exact_knn(np.ascontiguousarray(queries, dtype=np.float32), keys, k).astype(np.int64)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found: ``found`` ``[..., K']`` (``-1`` padded) vs ``truth`` ``[..., K]``."""
    if found.shape[:-1] != truth.shape[:-1]:
        raise ValueError(f"recall_at_k requires matching leading shapes (got {found.shape} and {truth.shape})")
    f = found.reshape(-1, found.shape[-1])
    t = truth.reshape(-1, truth.shape[-1])
    if t.shape[1] == 0:
        return 1.0
    hits = [np.intersect1d(fi[fi >= 0], ti).size for fi, ti in zip(f, t)]
    return float(np.mean(hits) / t.shape[1])


def scan_fraction(scanned: np.ndarray, n_keys: int) -> float:
    """Mean fraction of the ``n_keys`` keys scored per query."""
    if n_keys <= 0:
        return 0.0
    return float(np.mean(scanned) / n_keys)


def mahalanobis_ratio(queries: np.ndarray, keys: np.ndarray, max_rows: int = 4096) -> float:
    """How far queries sit from the key distribution, relative to keys themselves.

    Mean Mahalanobis distance (under the keys' mean and covariance) of the queries divided by
    that of held-out keys; the paper reports > 10 for real LLM heads. ``queries`` ``[S, D]``,
    ``keys`` ``[N, D]``.
    """
    keys = np.asarray(keys, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)[:max_rows]
    half = keys.shape[0] // 2
    fit, held = keys[:half], keys[half:][:max_rows]
    mu = fit.mean(0)
    cov = np.cov(fit, rowvar=False) + 1e-6 * np.eye(keys.shape[1])
    inv = np.linalg.inv(cov)

    def dist(x):
        d = x - mu
        return np.sqrt(np.einsum("nd,de,ne->n", d, inv, d)).mean()

    return float(dist(queries) / dist(held))
