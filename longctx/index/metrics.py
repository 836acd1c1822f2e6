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


def mahalanobis_ratio(queries: np.ndarray, keys: np.ndarray, max_rows: int = 4096, seed: int = 0) -> float:
    """How far queries sit from the key distribution, relative to keys themselves.

    Mean Mahalanobis distance (under the keys' mean and covariance) of the queries divided by
    that of held-out keys; the paper reports > 10 for real LLM heads.

    The keys are split into a fitting half and a held-out half at random (a permutation drawn
    from ``np.random.default_rng(seed)``), not by row order: a model's keys come in position
    order and drift with position (RoPE, topic), so a held-out second half sits far from a
    first half's fit and the ratio came out several times too low. Rows beyond ``max_rows``
    (queries and held-out keys) are subsampled with the same generator. The result depends on
    ``seed`` and on row order only through sampling noise; row order no longer biases it.

    Parameters
    ----------
    queries : np.ndarray
        ``[S, D]`` queries of one head.
    keys : np.ndarray
        ``[N, D]`` keys of its KV head, N >= 4 (two per half).
    max_rows : int
        Most queries and held-out keys whose distances are averaged. Default 4096.
    seed : int
        Seed of the split and the subsampling. Default 0.

    Returns
    -------
    float
        Mean query distance / mean held-out key distance.

    Raises
    ------
    ValueError
        If ``queries`` or ``keys`` is not 2-D with matching D, or there are fewer than 4 keys
        or no queries, or ``max_rows`` is not a positive int.
    """
    keys = np.asarray(keys, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    if keys.ndim != 2 or queries.ndim != 2 or keys.shape[1] != queries.shape[1]:
        raise ValueError(
            f"mahalanobis_ratio requires queries [S, D] and keys [N, D] (got {queries.shape} and {keys.shape})"
        )
    if keys.shape[0] < 4 or queries.shape[0] == 0:
        raise ValueError(
            f"mahalanobis_ratio requires at least 4 keys and 1 query (got {keys.shape[0]} and {queries.shape[0]})"
        )
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ValueError(f"mahalanobis_ratio: max_rows requires a positive int (got {max_rows!r})")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(keys.shape[0])
    half = keys.shape[0] // 2
    fit, held = keys[perm[:half]], keys[perm[half:][:max_rows]]
    if queries.shape[0] > max_rows:
        queries = queries[rng.choice(queries.shape[0], max_rows, replace=False)]
    mu = fit.mean(0)
    cov = np.cov(fit, rowvar=False) + 1e-6 * np.eye(keys.shape[1])
    inv = np.linalg.inv(cov)

    def dist(x):
        d = x - mu
        return np.sqrt(np.einsum("nd,de,ne->n", d, inv, d)).mean()

    return float(dist(queries) / dist(held))
