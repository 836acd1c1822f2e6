"""Synthetic keys and out-of-distribution queries for index tests and the recall bench.

Modelled on what RetrievalAttention measures in real heads (arXiv 2409.10516, §2.4):
queries sit far from the keys (mean Mahalanobis distance under the keys' statistics more
than 10x that of keys), and the directions that rank keys for a query are not the ones
that separate keys from each other:

- keys: cluster centres in a ``dA``-dim "content" subspace (most of the key variance) plus a
  small isotropic spread in every direction;
- queries: a large shared offset in the other ("ranking") subspace, where keys only have
  their small spread, plus a per-query variation there, plus a weak pull towards one
  cluster.

So a query's top keys are decided mostly by the keys' small ranking-subspace components:
they are scattered over all clusters (IVF has to probe most lists) and are not key-key
neighbours (an index built from the keys alone has to wander), while queries of the same
head share them often enough that their prefill queries predict them.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class OODData:
    """Keys ``[Hkv, N, D]``, training queries ``[H, Nq, D]`` and test queries ``[H, S, D]`` (float32)."""

    keys: np.ndarray
    train_queries: np.ndarray
    test_queries: np.ndarray


def ood_dataset(
    num_heads: int = 1,
    num_kv_heads: int = 1,
    n_keys: int = 16384,
    head_dim: int = 128,
    n_train: int = 4096,
    n_test: int = 100,
    n_clusters: int = 256,
    content_dim: int = 32,
    query_offset: float = 30.0,
    query_spread: float = 20.0,
    cluster_pull: float = 0.1,
    seed: int = 0,
) -> OODData:
    """Draw an OOD key/query set (see the module docstring); each KV head has its own keys
    and each query head its own query offset.

    Parameters
    ----------
    query_offset : float
        Norm of the queries' shared offset in the ranking subspace (sets how OOD they are).
    query_spread : float
        Norm of the per-query variation in the ranking subspace (sets how much queries differ).
    cluster_pull : float
        Weight of a query's pull towards one key cluster.
    """
    if not 0 < content_dim < head_dim:
        raise ValueError(f"ood_dataset requires 0 < content_dim < head_dim={head_dim} (got {content_dim})")
    rng = np.random.default_rng(seed)
    G = num_heads // num_kv_heads
    D, dA = head_dim, content_dim
    keys = np.empty((num_kv_heads, n_keys, D), dtype=np.float32)
    train = np.empty((num_heads, n_train, D), dtype=np.float32)
    test = np.empty((num_heads, n_test, D), dtype=np.float32)
    for kv in range(num_kv_heads):
        basis, _ = np.linalg.qr(rng.standard_normal((D, D)))
        content, ranking = basis[:, :dA], basis[:, dA:]
        centres = rng.standard_normal((n_clusters, dA))
        which = rng.integers(0, n_clusters, n_keys)
        k_content = centres[which] + 0.3 * rng.standard_normal((n_keys, dA))
        k_ranking = 0.3 * rng.standard_normal((n_keys, D - dA))
        keys[kv] = (0.2 * rng.standard_normal(D) + k_content @ content.T + k_ranking @ ranking.T).astype(np.float32)
        for g in range(G):
            offset = rng.standard_normal(D - dA)
            offset *= query_offset / np.linalg.norm(offset)
            for out, n in ((train[kv * G + g], n_train), (test[kv * G + g], n_test)):
                q_ranking = offset + rng.standard_normal((n, D - dA)) * (query_spread / np.sqrt(D - dA))
                q_content = cluster_pull * centres[rng.integers(0, n_clusters, n)]
                out[:] = (q_content @ content.T + q_ranking @ ranking.T).astype(np.float32)
    return OODData(keys, train, test)
