"""Synthetic keys and out-of-distribution queries for index tests and the recall bench.

Modelled on what RetrievalAttention measures in real heads (arXiv 2409.10516, §2.4): keys
form clusters ("topics") around a shared offset with an anisotropic spread; queries come
from a different distribution, offset along directions where keys hardly vary (so their
Mahalanobis distance to the keys is an order of magnitude larger than the keys'), and each
query is aimed at one topic, so its top keys are concentrated but not trivial to find.
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
    n_train: int = 2048,
    n_test: int = 100,
    n_topics: int = 256,
    seed: int = 0,
) -> OODData:
    """Draw an OOD key/query set (see module docstring); every head gets its own distribution."""
    rng = np.random.default_rng(seed)
    G = num_heads // num_kv_heads
    D = head_dim
    keys = np.empty((num_kv_heads, n_keys, D), dtype=np.float32)
    train = np.empty((num_heads, n_train, D), dtype=np.float32)
    test = np.empty((num_heads, n_test, D), dtype=np.float32)
    for kv in range(num_kv_heads):
        basis, _ = np.linalg.qr(rng.standard_normal((D, D)))
        spread = 1.0 / np.sqrt(1.0 + np.arange(D) / 4.0)  # decaying spectrum: most variance in few directions
        topics = rng.standard_normal((n_topics, D)) * (0.8 * spread)
        offset = rng.standard_normal(D) * 0.5
        which = rng.integers(0, n_topics, n_keys)
        z = rng.standard_normal((n_keys, D)) * spread
        keys[kv] = (offset + (topics[which] + z) @ basis.T).astype(np.float32)
        low_var = basis[:, D // 2 :]  # directions where keys hardly vary
        for g in range(G):
            h = kv * G + g
            q_offset = low_var @ rng.standard_normal(D - D // 2) * 1.5
            q_basis, _ = np.linalg.qr(rng.standard_normal((D, D)))
            for out, n in ((train, n_train), (test, n_test)):
                aim = topics[rng.integers(0, n_topics, n)] @ basis.T * 3.0
                noise = (rng.standard_normal((n, D)) * spread) @ q_basis.T
                out[h] = (q_offset + aim + noise).astype(np.float32)
    return OODData(keys, train, test)
