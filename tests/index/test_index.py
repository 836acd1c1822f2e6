"""Key indexes: recall against exact search, insertion, truncation, graph invariants, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from longctx.config import RETRIEVAL_INDEX_TYPES
from longctx.index import (
    INDEX_TYPES,
    AttentionAwareIndex,
    IndexParams,
    exact_topk,
    make_index,
    mahalanobis_ratio,
    recall_at_k,
    scan_fraction,
)
from longctx.index.synthetic import ood_dataset

H, HKV, D = 4, 2, 32


pytestmark = pytest.mark.usefixtures("faiss_single_thread")


@pytest.fixture(scope="module")
def data():
    # small OOD set: 2 KV heads x 2 query heads, 3000 keys
    return ood_dataset(num_heads=H, num_kv_heads=HKV, n_keys=3000, head_dim=D, n_train=1500, n_test=40, n_clusters=64,
                       content_dim=8, seed=3)


def test_config_names_every_index_type():
    assert tuple(RETRIEVAL_INDEX_TYPES) == tuple(INDEX_TYPES)


def test_synthetic_queries_are_out_of_distribution(data):
    assert mahalanobis_ratio(data.test_queries[0], data.keys[0]) > 5.0


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_exact_when_search_covers_everything(data, kind):
    # beam/efSearch/nprobe wide enough to see every key: results are the exact top-k in order
    params = IndexParams(ef_search=4000, nprobe=10_000)
    index = make_index(kind, H, HKV, D, params)
    index.build(data.keys, data.train_queries)
    res = index.search(data.test_queries, data.keys, k=20)
    truth = exact_topk(data.test_queries, data.keys, 20)
    assert res.ids.shape == (H, 40, 20) and res.scanned.shape == (H, 40)
    assert recall_at_k(res.ids, truth) >= (0.99 if kind != "hnsw" else 0.95)
    if kind in ("attention_aware", "flat"):
        np.testing.assert_array_equal(np.sort(res.ids, -1), np.sort(truth, -1))


def test_attention_aware_recall_and_scan(data):
    index = AttentionAwareIndex(H, HKV, D, IndexParams(ef_search=64))
    index.build(data.keys, data.train_queries)
    truth = exact_topk(data.test_queries, data.keys, 10)
    res = index.search(data.test_queries, data.keys, k=10)
    assert recall_at_k(res.ids, truth) >= 0.9
    frac = scan_fraction(res.scanned, data.keys.shape[1])
    assert 0.0 < frac < 0.6
    # the projection from training queries is what makes it attention-aware: without it the
    # same beam finds fewer of the true top keys
    blind = AttentionAwareIndex(H, HKV, D, IndexParams(ef_search=64))
    blind.build(data.keys, None)
    assert recall_at_k(blind.search(data.test_queries, data.keys, k=10).ids, truth) < recall_at_k(res.ids, truth)


def test_graph_invariants(data):
    p = IndexParams(degree=24, base_degree=8)
    index = AttentionAwareIndex(H, HKV, D, p)
    index.build(data.keys, data.train_queries)
    g = index.graph
    deg = g.degrees()  # [H, N, 2]: projection, base
    N = data.keys.shape[1]
    assert deg.shape == (H, N, 2)
    assert deg[..., 0].max() <= 24 and deg[..., 1].max() <= 8 and deg[..., 1].min() >= 1
    for h in range(H):
        assert g.reachable(h) == N
        nb = g.neighbors(h, 5)
        assert ((nb >= 0) & (nb < N)).all() and 5 not in nb.tolist()
        entries = g.entries(h)
        assert 1 <= len(entries) <= p.num_entry
    # GQA: heads of one group share the key-key layer, differ in projection edges
    assert np.array_equal(deg[0, :, 1], deg[1, :, 1])
    assert not np.array_equal(deg[0, :, 0], deg[1, :, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("copies", [1, 20, 50])
def test_every_key_reachable(seed, copies):
    # Base lists are nearly always full, and the repair used to attach an unreached key by
    # overwriting its parent's last slot, which could hold the only in-edge of a key attached
    # before (with exact duplicates, the same parent for a whole run of keys): 241 of 4000
    # keys stayed reachable at 20 copies per key.
    rng = np.random.default_rng(seed)
    n, d = 4000, 32
    distinct = rng.standard_normal((1, n // copies, d), dtype=np.float32)
    keys = np.repeat(distinct, copies, axis=1)
    if seed % 2:  # copies spread out; otherwise next to each other, as np.repeat leaves them
        keys = keys[:, rng.permutation(n)]
    keys = np.ascontiguousarray(keys)
    for base_degree in (4, 8):
        index = AttentionAwareIndex(1, 1, d, IndexParams(base_degree=base_degree))
        index.build(keys)
        assert index.graph.reachable(0) == n
    # with training queries (projection entries) and after keys are inserted (incremental repair)
    index = AttentionAwareIndex(2, 1, d, IndexParams(base_degree=4))
    index.build(np.ascontiguousarray(keys[:, : n // 2]), rng.standard_normal((2, 300, d), dtype=np.float32))
    index.add(keys)
    assert [index.graph.reachable(h) for h in range(2)] == [n, n]


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_incremental_add_and_truncate(data, kind):
    N = data.keys.shape[1]
    n0 = 2000
    store = np.zeros((HKV, N + 8, D), dtype=np.float32)  # a key store with spare capacity (strided view)
    store[:, :N] = data.keys
    index = make_index(kind, H, HKV, D, IndexParams(ef_search=200, nprobe=64))
    index.build(store[:, :n0], data.train_queries)
    for stop in (2500, N):  # tokens leaving the window, in blocks
        index.add(store[:, :stop])
    assert index.ntotal == N
    truth = exact_topk(data.test_queries, data.keys, 10)
    res = index.search(data.test_queries, store[:, :N], k=10)
    assert recall_at_k(res.ids, truth) >= 0.8
    if kind == "attention_aware":
        assert all(index.graph.reachable(h) == N for h in range(H))
    index.truncate(2200)
    assert index.ntotal == 2200
    res = index.search(data.test_queries, store[:, :2200], k=10)
    assert res.ids.max() < 2200
    truth = exact_topk(data.test_queries, data.keys[:, :2200], 10)
    assert recall_at_k(res.ids, truth) >= 0.7
    if kind == "attention_aware":
        assert all(index.graph.reachable(h) == 2200 for h in range(H))


def test_small_and_empty_indexes():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((HKV, 5, D), dtype=np.float32)
    q = rng.standard_normal((H, 2, D), dtype=np.float32)
    for kind in INDEX_TYPES:
        index = make_index(kind, H, HKV, D)
        index.build(keys[:, :0], None)
        assert index.ntotal == 0
        assert (index.search(q, keys[:, :0], k=3).ids == -1).all()
        index.add(keys)
        res = index.search(q, keys, k=8)  # k > N: padded with -1
        assert (res.ids[..., 5:] == -1).all()
        assert sorted(res.ids[0, 0, :5].tolist()) == list(range(5))


def test_mahalanobis_ratio_ignores_row_order():
    # keys that drift with position, as a model's do: a split by row order fitted the first
    # half and measured the second, so the held-out keys looked far and the ratio far too low
    rng = np.random.default_rng(0)
    n, d = 4000, 16
    drift = rng.standard_normal(d)
    drift *= 20.0 / np.linalg.norm(drift)
    keys = rng.standard_normal((n, d)) + np.linspace(-1, 1, n)[:, None] * drift  # in position order
    queries = rng.standard_normal((500, d)) * 3.0 + 4.0
    shuffled = keys[rng.permutation(n)]
    ratios = [mahalanobis_ratio(queries, k) for k in (keys, shuffled)]
    assert ratios[0] == pytest.approx(ratios[1], rel=0.05)
    assert mahalanobis_ratio(queries, keys, seed=1) == pytest.approx(ratios[0], rel=0.05)
    assert mahalanobis_ratio(queries[::-1], keys, max_rows=256) == pytest.approx(ratios[0], rel=0.1)
    with pytest.raises(ValueError, match=r"requires queries \[S, D\] and keys \[N, D\]"):
        mahalanobis_ratio(queries, keys[:, :4])
    with pytest.raises(ValueError, match="at least 4 keys"):
        mahalanobis_ratio(queries, keys[:3])
    with pytest.raises(ValueError, match="max_rows requires a positive int"):
        mahalanobis_ratio(queries, keys, max_rows=0)


def test_metrics():
    found = np.array([[[1, 2, 3, -1]], [[4, 5, 6, 7]]])
    truth = np.array([[[3, 2, 9, 8]], [[4, 5, 6, 7]]])
    assert recall_at_k(found, truth) == pytest.approx((2 / 4 + 1.0) / 2)
    assert scan_fraction(np.array([[10, 30]]), 100) == pytest.approx(0.2)


def test_bad_input(data):
    with pytest.raises(ValueError, match="index requires one of"):
        make_index("lsh", H, HKV, D)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        make_index("flat", 3, 2, D)
    with pytest.raises(ValueError, match="requires"):
        IndexParams(ef_search=0)
    with pytest.raises(ValueError, match="requires"):
        IndexParams(base_degree=1)
    index = AttentionAwareIndex(H, HKV, D)
    with pytest.raises(TypeError, match="float32"):
        index.build(data.keys.astype(np.float64), None)
    with pytest.raises(ValueError, match="shape"):
        index.build(data.keys[:1], None)
    index.build(data.keys, data.train_queries)
    with pytest.raises(ValueError, match="k > 0"):
        index.search(data.test_queries, data.keys, k=0)
    with pytest.raises(ValueError, match="queries"):
        index.search(data.test_queries[:1], data.keys, k=5)
    with pytest.raises(ValueError, match="n_keys"):
        index.search(data.test_queries, data.keys[:, :10], k=5)
    with pytest.raises(ValueError, match="truncate requires"):
        index.truncate(-1)


def test_recall_bench_runs_on_both_sources(tmp_path):
    from longctx.eval.bench_index import format_rows, format_summary, run_index_recall, summarize

    sweeps = {"attention_aware": ("ef_search", [100, 200]), "ivf": ("nprobe", [4]), "hnsw": ("ef_search", [100])}
    rows = run_index_recall(("synthetic",), k=10, n_keys=2000, num_heads=2, num_kv_heads=1, head_dim=16, n_train=200,
                            n_test=10, sweeps=sweeps)
    assert [(r["index"], r["value"]) for r in rows] == [
        ("attention_aware", 100), ("attention_aware", 200), ("flat", None), ("ivf", 4), ("hnsw", 100)]
    flat = next(r for r in rows if r["index"] == "flat")
    assert flat["recall@10"] == 1.0 and flat["scan_fraction"] == 1.0
    summary = summarize(rows, k=10)
    assert {s["index"] for s in summary} == set(INDEX_TYPES)
    assert "attention_aware" in format_rows(rows, k=10) and "min scan" in format_summary(summary)
    # Q/K captured from a model forward (a small random Llama when the named model does not exist)
    rows = run_index_recall(("model",), ["attention_aware"], k=10, context=300, model=str(tmp_path / "none"),
                            n_train=100, n_test=10, n_sink=8, sweeps=sweeps)
    assert rows[0]["source"] == "model:random-llama" and rows[0]["n_keys"] == 300 - 8 - 10
    assert 0.0 < rows[0]["recall@10"] <= 1.0
