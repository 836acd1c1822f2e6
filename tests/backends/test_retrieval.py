"""RetrievalAttention backend: exact vs dense when top-k covers the offloaded keys, LSE merge,
rollback, fallback, memory/stats, bad config, and greedy generation under patch()."""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longctx
from longctx.backends import LayerContext, make_layer
from longctx.config import RetrievalConfig
from longctx.index import INDEX_TYPES
from longctx.ops import merge_states, sparse_attention
from longctx.ops.reference import causal_attention_ref
from tests.conftest import tiny_model

CTX = LayerContext(num_heads=8, num_kv_heads=2, head_dim=16)
ATOL, RTOL = 2e-5, 1e-5


pytestmark = pytest.mark.usefixtures("faiss_single_thread")


def _qkv(gen, B, S, ctx=CTX):
    q = torch.randn(B, ctx.num_heads, S, ctx.head_dim, generator=gen)
    k = torch.randn(B, ctx.num_kv_heads, S, ctx.head_dim, generator=gen)
    v = torch.randn(B, ctx.num_kv_heads, S, ctx.head_dim, generator=gen)
    return q, k, v


def _run_pair(gen, opts, B=2, T=300, steps=(1, 1, 3, 1, 1, 1, 4, 1), rollbacks=None, trace=None):
    """Drive a retrieval layer and a dense layer with the same inputs; return the max output error.

    ``rollbacks`` maps a step index to tokens dropped after it; ``trace`` collects the
    retrieval layer's offloaded-token count around each rollback.
    """
    ret = make_layer("retrieval", CTX, **opts)
    dense = make_layer("dense", CTX)
    q, k, v = _qkv(gen, B, T)
    err = (ret.prefill(q, k, v, None) - dense.prefill(q, k, v, None)).abs().max().item()
    for i, S in enumerate(steps):
        q, k, v = _qkv(gen, B, S)
        err = max(err, (ret.decode(q, k, v, None) - dense.decode(q, k, v, None)).abs().max().item())
        if rollbacks and i in rollbacks:
            before = ret.n_offloaded
            ret.rollback(rollbacks[i])
            if trace is not None:
                trace.append((before, ret.n_offloaded))
            dense.rollback(rollbacks[i])
            assert ret.seq_length == dense.seq_length
    return err, ret


@pytest.mark.parametrize("index", INDEX_TYPES)
def test_equals_dense_when_top_k_covers_offloaded(gen, index):
    # window + block small so that decode steps move tokens into the index, incl. a 4-token verify step
    opts = dict(n_sink=8, window=32, insert_block=4, top_k=512, index=index)
    err, layer = _run_pair(gen, opts)
    assert err < 1e-5
    stats = layer.stats()
    assert not stats["fallback_dense"] and stats["decode_steps"] == 8
    assert stats["n_offloaded"] > 300 - 8 - 32  # decoded tokens were inserted
    assert layer.seq_length == 300 + 13


def test_prefill_with_only_the_last_queries(gen):
    # the bench passes only the last Sq prompt queries: they attend causally from T - Sq
    q, k, v = _qkv(gen, 1, 400)
    layer = make_layer("retrieval", CTX, n_sink=8, window=32, top_k=1000)
    dense = make_layer("dense", CTX)
    torch.testing.assert_close(layer.prefill(q[:, :, -5:], k, v, None), dense.prefill(q[:, :, -5:], k, v, None),
                               atol=ATOL, rtol=RTOL)
    q1, k1, v1 = _qkv(gen, 1, 1)
    torch.testing.assert_close(layer.decode(q1, k1, v1, None), dense.decode(q1, k1, v1, None), atol=ATOL, rtol=RTOL)


def test_rollback_inside_and_beyond_window(gen):
    # with window 4 + block 2, rollback(7) after 9 generated tokens reaches into tokens already
    # moved to the host tier and the index, which must drop them
    opts = dict(n_sink=4, window=4, insert_block=2, top_k=1000)
    trace = []
    steps = (1,) * 10 + (3, 1, 1)
    err, layer = _run_pair(gen, opts, steps=steps, rollbacks={1: 1, 9: 7, 10: 2}, trace=trace)
    assert err < 1e-5
    assert trace[1][1] < trace[1][0]
    with pytest.raises(ValueError, match="at most"):
        layer.rollback(1000)


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(3, 200),
    n_sink=st.integers(0, 40),
    window=st.integers(0, 60),
    block=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_random_static_offload_splits_equal_dense(T, n_sink, window, block, seed):
    gen = torch.Generator().manual_seed(seed)
    opts = dict(n_sink=n_sink, window=window, insert_block=block, top_k=400, index="flat")
    err, layer = _run_pair(gen, opts, B=1, T=T, steps=(1, 2, 1, 1, 1))
    assert err < 1e-5
    assert layer.stats()["fallback_dense"] == (T <= n_sink + window)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(2, 300), S=st.integers(1, 3), seed=st.integers(0, 2**16), frac=st.floats(0.0, 1.0))
def test_lse_merge_of_random_disjoint_splits_is_exact(T, S, seed, frac):
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv, D = 1, 4, 2, 16
    q = torch.randn(B, H, S, D, generator=gen) * 3  # large scores: the max shift matters
    k = torch.randn(B, Hkv, T, D, generator=gen) * 3
    v = torch.randn(B, Hkv, T, D, generator=gen)
    perm = torch.randperm(T, generator=gen)
    cut = int(round(frac * T))
    a = perm[:cut].sort().values.expand(B, Hkv, -1)
    b = perm[cut:].sort().values.expand(B, Hkv, -1)
    out_a, lse_a = sparse_attention(q, k, v, a.contiguous())
    out_b, lse_b = sparse_attention(q, k, v, b.contiguous())
    out, lse = merge_states(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = causal_attention_ref(q, k, v, q_offset=T)  # all T keys in the past
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


def test_needle_is_retrieved_with_small_top_k(gen):
    # one offloaded key far more aligned with the query than any other: top_k=4 finds it and
    # the output is (almost) its value, as dense attention's is
    B, T = 1, 2000
    q, k, v = _qkv(gen, B, T)
    needle = 1000
    k[:, :, needle] *= 4
    layer = make_layer("retrieval", CTX, n_sink=16, window=64, top_k=4)
    dense = make_layer("dense", CTX)
    layer.prefill(q, k, v, None)
    dense.prefill(q, k, v, None)
    unit = k[:, :, needle : needle + 1] / k[:, :, needle : needle + 1].norm(dim=-1, keepdim=True)
    q1 = unit.repeat_interleave(CTX.group_size, dim=1) * 6.0  # needle score ~ 24, others ~ N(0, 1.5)
    k1, v1 = _qkv(gen, B, 1)[1:]
    got = layer.decode(q1, k1, v1, None)
    ref = dense.decode(q1, k1, v1, None)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)
    stats = layer.stats()
    assert 0 < stats["keys_scanned_last"] <= stats["n_offloaded"]
    assert 0 < stats["scan_fraction_last"] <= 1.0
    # the heads of a GQA group attend the union of their top-4
    assert stats["n_static"] + 4 <= stats["keys_per_step"] <= stats["n_static"] + 4 * CTX.group_size


def test_short_prompt_falls_back_to_dense(gen, caplog):
    with caplog.at_level(logging.INFO, logger="longctx.backends.retrieval"):
        err, layer = _run_pair(gen, dict(n_sink=16, window=64), T=80)
    assert err < 1e-6
    stats = layer.stats()
    assert stats["fallback_dense"] and "static set" in stats["fallback_reason"]
    assert "runs dense attention" in caplog.text
    assert layer.memory()["device"] > 0


def test_memory_per_tier_and_attended_mask(gen):
    B, T = 2, 500
    layer = make_layer("retrieval", CTX, n_sink=16, window=64, top_k=10, index="flat")
    q, k, v = _qkv(gen, B, T)
    layer.prefill(q, k, v, None)
    D = CTX.head_dim
    mem = layer.memory()
    assert mem["device"] == 2 * B * CTX.num_kv_heads * (16 + 64) * D * 4
    assert mem["host"] >= 2 * B * CTX.num_kv_heads * (T - 80) * D * 4  # fp32 K/V store + index
    layer.record_attended = True
    q1, k1, v1 = _qkv(gen, B, 1)
    layer.decode(q1, k1, v1, None)
    att = layer.attended
    assert att.shape == (B, CTX.num_heads, 1, T + 1)
    assert att[..., :16].all() and att[..., T - 64 :].all()
    # each head attends its GQA group's union of top-10s: its own exact top-10, at most G*10
    offloaded = att[..., 16 : T - 64]
    counts = offloaded.sum(-1)
    assert ((counts >= 10) & (counts <= 10 * CTX.group_size)).all()
    grouped = att.reshape(B, CTX.num_kv_heads, CTX.group_size, 1, T + 1)
    assert (grouped == grouped[:, :, :1]).all()
    keys = k[:, :, 16 : T - 64].repeat_interleave(CTX.group_size, dim=1)  # [B, H, n, D]
    top = torch.einsum("bhsd,bhnd->bhsn", q1, keys).topk(10, dim=-1).indices
    assert offloaded.gather(-1, top).all()


def test_bad_config():
    for bad, match in (
        (dict(top_k=0), "top_k requires a positive int"),
        (dict(top_k=-5), "top_k requires"),
        (dict(window=-1), "window requires an int >= 0"),
        (dict(n_sink=-2), "n_sink requires an int >= 0"),
        (dict(index="lsh"), "index requires one of"),
        (dict(insert_block=0), "insert_block requires"),
    ):
        with pytest.raises(ValueError, match=match):
            RetrievalConfig(**bad)
    with pytest.raises(ValueError, match="unknown option"):
        make_layer("retrieval", CTX, topk=5)
    assert RetrievalConfig.from_options({"top_k": "7", "index": "ivf"}).top_k == 7


def test_bad_graph_options():
    for bad, match in (
        (dict(proj_prune="yes"), "proj_prune requires a bool"),
        (dict(proj_reverse=1), "proj_reverse requires a bool"),
        (dict(num_entry=0), "num_entry requires a positive int"),
        (dict(num_entry=2.0), "num_entry requires a positive int"),
    ):
        with pytest.raises(ValueError, match=match):
            RetrievalConfig(**bad)
    opts = RetrievalConfig.from_options({"proj_prune": "true", "proj_reverse": "on", "num_entry": "9"})
    assert (opts.proj_prune, opts.proj_reverse, opts.num_entry) == (True, True, 9)


def test_graph_options_reach_the_index(gen):
    # the defaults are IndexParams' (behaviour unchanged); set ones reach the C++ graph
    from longctx.index import IndexParams

    defaults = IndexParams()
    cfg = RetrievalConfig()
    assert (cfg.proj_prune, cfg.proj_reverse, cfg.num_entry) == (
        defaults.proj_prune, defaults.proj_reverse, defaults.num_entry)
    q, k, v = _qkv(gen, 1, 600)
    entries = {}
    for opts in (dict(), dict(proj_prune=True, proj_reverse=False, num_entry=9)):
        layer = make_layer("retrieval", CTX, n_sink=8, window=32, top_k=16, **opts)
        layer.prefill(q, k, v, None)
        (index,) = layer.indexes
        expect = {"proj_prune": False, "proj_reverse": True, "num_entry": defaults.num_entry, **opts}
        assert (index.params.proj_prune, index.params.proj_reverse, index.params.num_entry) == (
            expect["proj_prune"], expect["proj_reverse"], expect["num_entry"])
        assert (index.graph.proj_prune, index.graph.proj_reverse) == (expect["proj_prune"], expect["proj_reverse"])
        entries[expect["num_entry"]] = max(len(index.graph.entries(h)) for h in range(CTX.num_heads))
    # 600 random prefill queries have many distinct top-1 keys: the entry count is the cap
    assert entries == {defaults.num_entry: defaults.num_entry, 9: 9}


def test_greedy_generate_equals_dense(gen):
    # a prompt longer than the static set so decode retrieves from the index, with tokens
    # leaving the window during generation; top_k covers every offloaded key
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 60), generator=gen)
    opts = dict(n_sink=4, window=8, insert_block=3, top_k=256)
    with longctx.patch(model, "dense"):
        ref = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    with longctx.patch(model, "retrieval", **opts) as handle:
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert handle.memory()["host"] > 0
    assert torch.equal(ref, out)
