"""TriForce's chunk-retrieval backend: selection rule, sparse attention, re-retrieval, rollback."""
from __future__ import annotations

import pytest
import torch

from longctx.backends import LayerContext, make_layer
from longctx.backends.chunk_retrieval import select_chunks
from longctx.backends.dense import grouped_attention
from longctx.config import TriForceRetrievalConfig
from longctx.ops.reference import sparse_attention_ref

D = 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Small shapes: OpenMP barriers on a shared 2-core machine cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(gen, H, Hkv, S):
    return (torch.randn(1, h, S, D, generator=gen) for h in (H, Hkv, Hkv))


def _selected_tokens(chunks, C, prompt_len, extra):
    """``[B, Hkv, K]`` token indices of the chunks, the prompt remainder and ``extra`` later tokens."""
    B, Hkv, K = chunks.shape
    tok = (chunks.unsqueeze(-1) * C + torch.arange(C)).reshape(B, Hkv, K * C)
    rest = torch.arange((prompt_len // C) * C, prompt_len + extra).expand(B, Hkv, -1)
    return torch.cat([tok, rest], -1)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)])
def test_decode_attends_exactly_the_selected_chunks(gen, H, Hkv):
    ctx = LayerContext(num_heads=H, num_kv_heads=Hkv, head_dim=D)
    C, S = 4, 66  # 16 chunks + a remainder of 2
    layer = make_layer("triforce_retrieval", ctx, chunk_size=C, budget=16)
    layer.record_attended = True
    q, k, v = _inputs(gen, H, Hkv, S + 3)
    pos = torch.arange(S + 3).unsqueeze(0)
    layer.prefill(q[:, :, :S], k[:, :, :S], v[:, :, :S], pos[:, :S])
    # the selection rule, restated: softmax over chunks per query head, max over the group, chunk 0 forced
    lm = k[:, :, : 64].reshape(1, Hkv, 16, C, D).mean(3)
    scores = (q[:, :, S - 1].reshape(1, Hkv, H // Hkv, D) @ lm.transpose(-1, -2) * ctx.scale).softmax(-1).amax(2)
    scores[..., 0] = float("inf")
    expected = scores.topk(4, -1).indices.sort(-1).values
    assert torch.equal(layer.chunks, expected)
    out = layer.decode(q[:, :, S:], k[:, :, S:], v[:, :, S:], pos[:, S:])
    idx = _selected_tokens(expected, C, S, 3)
    for i in range(3):  # each new query sees the selection plus the new tokens up to itself
        n_valid = idx.shape[-1] - (2 - i)
        ref, _ = sparse_attention_ref(q[:, :, S + i : S + i + 1], k, v, idx[..., :n_valid], ctx.scale)
        torch.testing.assert_close(out[:, :, i : i + 1], ref, atol=1e-5, rtol=1e-5)
        for h in range(H):  # the diagnostics' mask names exactly these keys
            want = idx[0, h // (H // Hkv), :n_valid].sort().values
            assert torch.equal(layer.attended[0, h, i].nonzero().flatten(), want)
    assert layer.stats()["keys_per_step"] == 16 + 2 + 3


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)])
def test_reretrieval_attends_the_chunks_each_query_selects(gen, H, Hkv):
    """With ``retrieval_interval=1`` every decode step after the first re-selects with its own
    query: its output is attention over those chunks + the prompt remainder + the tokens so far."""
    ctx = LayerContext(num_heads=H, num_kv_heads=Hkv, head_dim=D)
    C, S, steps = 4, 66, 5
    layer = make_layer("triforce_retrieval", ctx, chunk_size=C, budget=16, retrieval_interval=1)
    q, k, v = _inputs(gen, H, Hkv, S + steps)
    q = q * 3.0  # peaked chunk scores: the selection changes from step to step
    pos = torch.arange(S + steps).unsqueeze(0)
    layer.prefill(q[:, :, :S], k[:, :, :S], v[:, :, :S], pos[:, :S])
    lm = k[:, :, :64].reshape(1, Hkv, 16, C, D).mean(3)
    chosen = []
    for i in range(steps):
        t = S + i
        out = layer.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], pos[:, t : t + 1])
        scorer = q[:, :, t if i > 0 else S - 1]  # the first step still reads the prefill's selection
        want = select_chunks(scorer, lm, 4, ctx.scale)
        assert torch.equal(layer.chunks, want)
        ref, _ = sparse_attention_ref(q[:, :, t : t + 1], k, v, _selected_tokens(want, C, S, i + 1), ctx.scale)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        chosen.append(want)
    assert any(not torch.equal(a, b) for a, b in zip(chosen, chosen[1:]))  # the selection really moved
    assert layer.stats()["retrievals"] == steps  # the prefill's + one per step after the first


def test_mha_selection_is_the_official_raw_score_rule(gen):
    q = torch.randn(2, 4, D, generator=gen)
    lm = torch.randn(2, 4, 32, D, generator=gen)
    raw = torch.einsum("bhd,bhnd->bhn", q, lm)
    raw[..., 0] = float("inf")
    assert torch.equal(select_chunks(q, lm, 8, D**-0.5), raw.topk(8, -1).indices.sort(-1).values)


def test_short_prompt_keeps_everything_and_equals_dense(gen):
    ctx = LayerContext(num_heads=4, num_kv_heads=2, head_dim=D)
    layer = make_layer("triforce_retrieval", ctx, chunk_size=8, budget=64)
    q, k, v = _inputs(gen, 4, 2, 52)
    pos = torch.arange(52).unsqueeze(0)
    layer.prefill(q[:, :, :50], k[:, :, :50], v[:, :, :50], pos[:, :50])
    assert layer.stats()["fallback_dense"]
    out = layer.decode(q[:, :, 50:], k[:, :, 50:], v[:, :, 50:], pos[:, 50:])
    torch.testing.assert_close(out, grouped_attention(q[:, :, 50:], k, v, ctx.scale, 50), atol=1e-5, rtol=1e-5)


def test_prefill_tail_rollback_and_reretrieval(gen):
    ctx = LayerContext(num_heads=4, num_kv_heads=2, head_dim=D)
    S = 80
    q, k, v = _inputs(gen, 4, 2, S + 4)
    pos = torch.arange(S + 4).unsqueeze(0)
    full = make_layer("triforce_retrieval", ctx, chunk_size=4, budget=8)
    out_full = full.prefill(q[:, :, :S], k[:, :, :S], v[:, :, :S], pos[:, :S])
    tail = make_layer("triforce_retrieval", ctx, chunk_size=4, budget=8)
    out_tail = tail.prefill(q[:, :, S - 3 : S], k[:, :, :S], v[:, :, :S], pos[:, :S])
    torch.testing.assert_close(out_tail, out_full[:, :, -3:], atol=1e-5, rtol=1e-5)
    assert torch.equal(full.chunks, tail.chunks)  # both scored by the last prompt query

    first = full.decode(q[:, :, S : S + 2], k[:, :, S : S + 2], v[:, :, S : S + 2], pos[:, S : S + 2])
    full.rollback(1)
    assert full.seq_length == S + 1
    again = full.decode(q[:, :, S + 1 : S + 2], k[:, :, S + 1 : S + 2], v[:, :, S + 1 : S + 2], pos[:, S + 1 : S + 2])
    torch.testing.assert_close(again, first[:, :, 1:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="at most"):
        full.rollback(3)

    # re-retrieval: every 2nd decode call re-selects with that call's last query; a query along a
    # direction only one chunk's keys point to makes that chunk win
    target = 5
    k2, q2 = k.clone(), q.clone()
    k2[:, :, target * 4 : target * 4 + 4, 0] += 20.0  # plant chunk 5 along dim 0 ...
    q2[:, :, S - 1, 0] = -20.0  # ... which the last prompt query avoids
    layer = make_layer("triforce_retrieval", ctx, chunk_size=4, budget=8, retrieval_interval=2)
    layer.prefill(q2[:, :, :S], k2[:, :, :S], v[:, :, :S], pos[:, :S])
    assert layer.memory()["host"] > 0 and layer.stats()["retrievals"] == 1
    assert target not in layer.chunks[0, 0].tolist()
    probe = torch.zeros(1, 4, 1, D)
    probe[..., 0] = 20.0
    for step in range(3):
        sl = slice(S + step, S + step + 1)
        layer.decode(probe, k[:, :, sl], v[:, :, sl], pos[:, sl])
    assert layer.stats()["retrievals"] == 2
    assert target in layer.chunks[0, 0].tolist() and 0 in layer.chunks[0, 0].tolist()
    assert layer.seq_length == S + 3


def test_config_errors():
    with pytest.raises(ValueError, match="budget requires an int of at least one chunk"):
        TriForceRetrievalConfig(chunk_size=8, budget=4)
    with pytest.raises(ValueError, match="budget requires a multiple of chunk_size"):
        TriForceRetrievalConfig(chunk_size=8, budget=20)
    with pytest.raises(ValueError, match="retrieval_interval requires"):
        TriForceRetrievalConfig(retrieval_interval=-1)
    assert TriForceRetrievalConfig().num_chunks == 512
