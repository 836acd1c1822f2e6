"""StreamingLLM backend: sinks + window with slot positions, against a brute-force reference."""
from __future__ import annotations

import pytest
import torch

import longctx
from longctx.backends import LayerContext, make_layer
from longctx.backends.streaming import COMPACT_EVERY
from longctx.config import StreamingConfig
from longctx.eval.bench import StandardRope
from longctx.models import RotaryHelper
from tests.conftest import tiny_model

D = 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Small shapes: OpenMP barriers on a shared 2-core machine cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ctx(H=4, Hkv=2):
    rope = StandardRope(D, 10000.0)
    return LayerContext(num_heads=H, num_kv_heads=Hkv, head_dim=D, rotary=RotaryHelper(rope.rotary_emb)), rope


def _rope(rope, x, pos):
    """Rotate pre-RoPE ``x [B, h, S, D]`` to positions ``pos [S]``."""
    cos, sin = rope.rotary_emb(x, pos.unsqueeze(0))
    x1, x2 = x.chunk(2, -1)
    return x * cos.unsqueeze(1) + torch.cat([-x2, x1], -1) * sin.unsqueeze(1)


def _reference(qp, kp, v, t, t_last, held, cfg, rope, scale):
    """Output of stream query ``t`` (pre-RoPE ``qp [B, H, 1, D]``) of a call ending at ``t_last`` that left
    ``held`` tokens: the sinks and the latest others, at slots ``0 .. held-1``; and the original
    indices of the keys it saw."""
    idx_all = torch.cat([torch.arange(min(cfg.sinks, held)), torch.arange(t_last + 1 - (held - cfg.sinks), t_last + 1)])
    slots = torch.arange(held)
    q_slot = held - 1 - (t_last - t)
    seen = (slots <= q_slot) & ((slots < cfg.sinks) | (slots > q_slot - cfg.window))
    idx, slot = idx_all[seen], slots[seen]
    k = _rope(rope, kp[:, :, idx], slot)
    q = _rope(rope, qp, torch.tensor([q_slot]))
    G = qp.shape[1] // kp.shape[1]
    k, vv = k.repeat_interleave(G, 1), v[:, :, idx].repeat_interleave(G, 1)
    return torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ vv, idx


@pytest.mark.parametrize("Hkv", [4, 2])
def test_decode_matches_sinks_window_reference(gen, Hkv):
    ctx, rope = _ctx(4, Hkv)
    cfg = StreamingConfig(sinks=3, window=8, rollback_reserve=2)
    cap = cfg.sinks + cfg.window + cfg.rollback_reserve
    layer = make_layer(cfg, ctx)
    layer.record_attended = True  # the diagnostics' mask must name exactly the keys each query saw
    P, N = 16, 16 + COMPACT_EVERY + 12
    qp = torch.randn(1, 4, N, D, generator=gen)
    kp = torch.randn(1, Hkv, N, D, generator=gen)
    v = torch.randn(1, Hkv, N, D, generator=gen)
    pos = torch.arange(N)
    q, k = _rope(rope, qp, pos), _rope(rope, kp, pos)  # what the model hands over: original positions
    layer.prefill(q[:, :, :P], k[:, :, :P], v[:, :, :P], pos[:P].unsqueeze(0))
    held = min(P, cap)  # the prefill evicts down to capacity
    t = P
    while t < N:
        S = 3 if t % 7 == 0 and t + 3 <= N else 1  # single steps and multi-token (verification) calls
        out = layer.decode(q[:, :, t : t + S], k[:, :, t : t + S], v[:, :, t : t + S], pos[t : t + S].unsqueeze(0))
        held += S
        if held > cap + COMPACT_EVERY:  # lazy eviction back to capacity
            held = cap
        assert layer.stats()["keys_held"] == held
        assert layer.attended.shape == (1, 4, S, t + S)
        for i in range(S):
            ref, seen = _reference(qp[:, :, t + i : t + i + 1], kp, v, t + i, t + S - 1, held, cfg, rope, ctx.scale)
            torch.testing.assert_close(out[:, :, i : i + 1], ref, atol=1e-5, rtol=1e-5)
            for h in range(4):
                assert torch.equal(layer.attended[0, h, i].nonzero().flatten(), seen)
        t += S
    assert layer.seq_length == N
    assert layer.stats()["evicted"] > 0


def test_attended_rows_bound_the_recorded_mask(gen):
    """With ``record_attended_rows`` the mask holds the last rows of the full one."""
    ctx, _ = _ctx(4, 2)
    cfg = StreamingConfig(sinks=3, window=8)
    q, k, v = (torch.randn(1, h, 40, D, generator=gen) for h in (4, 2, 2))
    pos = torch.arange(40).unsqueeze(0)
    masks = []
    for rows in (None, 4):
        layer = make_layer(cfg, ctx)
        layer.record_attended, layer.record_attended_rows = True, rows
        layer.prefill(q[:, :, :30], k[:, :, :30], v[:, :, :30], pos[:, :30])
        layer.decode(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], pos[:, 30:])  # 10 queries in one call
        masks.append(layer.attended)
    assert masks[0].shape == (1, 4, 10, 40) and masks[1].shape == (1, 4, 4, 40)
    assert torch.equal(masks[1], masks[0][:, :, -4:])


def test_rollback_within_reserve_restores_outputs(gen):
    ctx, rope = _ctx()
    layer = make_layer("streaming", ctx, sinks=2, window=6, rollback_reserve=4)
    N = 30
    q, k, v = (torch.randn(1, h, N, D, generator=gen) for h in (4, 2, 2))
    pos = torch.arange(N).unsqueeze(0)
    layer.prefill(q[:, :, :20], k[:, :, :20], v[:, :, :20], pos[:, :20])
    first = layer.decode(q[:, :, 20:24], k[:, :, 20:24], v[:, :, 20:24], pos[:, 20:24])
    layer.rollback(3)
    assert layer.seq_length == 21
    again = layer.decode(q[:, :, 21:24], k[:, :, 21:24], v[:, :, 21:24], pos[:, 21:24])
    torch.testing.assert_close(again, first[:, :, 1:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="at most"):
        layer.rollback(5)


def test_prefill_tail_queries_match_full_prefill(gen):
    ctx, _ = _ctx()
    S = 40
    q, k, v = (torch.randn(1, h, S, D, generator=gen) for h in (4, 2, 2))
    pos = torch.arange(S).unsqueeze(0)
    full = make_layer("streaming", ctx).prefill(q, k, v, pos)
    tail = make_layer("streaming", ctx).prefill(q[:, :, -5:], k, v, pos)
    torch.testing.assert_close(tail, full[:, :, -5:], atol=1e-5, rtol=1e-5)


def test_patched_model_without_eviction_equals_dense(gen):
    # nothing evicted: slots are the original positions, so generation equals dense
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, 20), generator=gen)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with longctx.patch(model, "streaming", sinks=4, window=64):
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_config_errors():
    with pytest.raises(ValueError, match="window requires an int >= 1"):
        StreamingConfig(window=0)
    with pytest.raises(ValueError, match="sinks requires a non-negative int"):
        StreamingConfig(sinks=-1)
    with pytest.raises(ValueError, match="slot_positions requires a bool"):
        StreamingConfig.from_options({"slot_positions": "maybe"})
