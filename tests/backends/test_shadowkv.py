"""ShadowKV backend: exactness vs dense, fidelity, memory, stats, rollback, long generation, kernels."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longctx
from longctx.backends import LayerContext, make_layer
from longctx.backends.shadowkv import (
    LlamaRopeEmb, key_basis, landmark_scores, rope_inplace_halves, tile_landmarks, untile_landmarks,
)
from longctx.config import ShadowKVConfig
from longctx.models import RotaryHelper

ATOL = RTOL = 1e-4  # fp32: low-rank rebuild at full rank + RoPE invert/apply round trip


@pytest.fixture(autouse=True)
def one_thread():
    """These shapes are tiny: a second OpenMP thread only adds wake-up latency (ms per op on a busy host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ctx(H=4, Hkv=2, D=16, **kw):
    return LayerContext(num_heads=H, num_kv_heads=Hkv, head_dim=D, **kw)


def _inputs(gen, B, H, Hkv, S, D, start=0):
    q = torch.randn(B, H, S, D, generator=gen)
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    pos = (torch.arange(S) + start).unsqueeze(0).expand(B, -1)
    return q, k, v, pos


def _run_pair(layers, gen, B, H, Hkv, D, T, steps, verify_at=()):
    """Prefill every layer with the same prompt, decode ``steps`` times; yield per-call outputs."""
    q, k, v, pos = _inputs(gen, B, H, Hkv, T, D)
    yield [layer.prefill(q, k, v, pos) for layer in layers]
    n = T
    for step in range(steps):
        S = 3 if step in verify_at else 1
        q, k, v, pos = _inputs(gen, B, H, Hkv, S, D, start=n)
        yield [layer.decode(q, k, v, pos) for layer in layers]
        n += S


# ----------------------------------------------------------------------------- config and bad input
@pytest.mark.parametrize(
    "opts, match",
    [
        ({"rank": 0}, "rank requires"),
        ({"rank": -3}, "rank requires"),
        ({"sparse_budget": 4}, "at least one chunk"),
        ({"sparse_budget": 20}, "multiple of chunk_size"),
        ({"chunk_size": 0}, "chunk_size requires"),
        ({"chunk_size": 16, "sparse_budget": 40}, "multiple of chunk_size=16"),
        ({"outlier_chunks": -1}, "outlier_chunks requires"),
        ({"local_window": -1}, "local_window requires"),
        ({"svd_method": "qr"}, "svd_method requires"),
        ({"reuse_hits": "yes please"}, "reuse_hits requires"),
        ({"rope_theta": 0}, "rope_theta requires"),
    ],
)
def test_config_rejects_bad_values(opts, match):
    with pytest.raises(ValueError, match=match):
        ShadowKVConfig(**opts)


def test_config_from_cli_strings_and_defaults():
    cfg = ShadowKVConfig.from_options({"sparse_budget": "1024", "rank": "none", "reuse_hits": "false"})
    assert (cfg.sparse_budget, cfg.rank, cfg.reuse_hits) == (1024, None, False)
    assert ShadowKVConfig().num_outlier_chunks == 48  # 24 per 1024 budget tokens
    assert ShadowKVConfig(sparse_budget=256).num_outlier_chunks == 6
    assert longctx.ShadowKVConfig is ShadowKVConfig and "shadowkv" in longctx.list_backends()


def test_layer_rejects_bad_rank_and_layers():
    with pytest.raises(ValueError, match=r"rank requires a value <= num_kv_heads \* head_dim = 32"):
        make_layer("shadowkv", _ctx(), rank=33)
    assert make_layer("shadowkv", _ctx()).rank == 32  # default 160 capped at Hkv*D
    assert make_layer("shadowkv", _ctx(H=32, Hkv=8, D=128)).rank == 160
    with pytest.raises(ValueError, match="full-attention layers"):
        make_layer("shadowkv", _ctx(sliding_window=64))


def test_bad_inputs(gen):
    layer = make_layer("shadowkv", _ctx(), sparse_budget=32)
    q, k, v, pos = _inputs(gen, 1, 4, 2, 64, 16)
    with pytest.raises(RuntimeError, match="before prefill"):
        layer.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], pos[:, :1])
    with pytest.raises(ValueError, match="Hkv=2"):
        layer.prefill(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), pos)
    with pytest.raises(ValueError, match="positions requires"):
        layer.prefill(q, k, v, pos[:, :10])
    with pytest.raises(ValueError, match="q requires"):
        layer.prefill(torch.cat([q, q], dim=2), k, v, pos)
    with pytest.raises(TypeError, match="floating dtype"):
        layer.prefill(q, k.long(), v, pos)
    layer.prefill(q, k, v, pos)
    with pytest.raises(ValueError, match="batch size requires 1"):
        layer.decode(*(t.repeat(2, 1, 1, 1)[:, :, :1] for t in (q, k, v)), pos.repeat(2, 1)[:, :1])
    with pytest.raises(ValueError, match="at most the 0 tokens"):
        layer.rollback(1)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    "opts",
    [
        dict(sparse_budget=96),  # budget == context: the sparse path selects every chunk
        dict(sparse_budget=128, dense_fallback=False, svd_method="svd"),
        dict(sparse_budget=128, dense_fallback=False, svd_method="lowrank", reuse_hits=False),
    ],
)
def test_full_rank_full_budget_equals_dense(gen, opts):
    H, Hkv, D, T, B = 4, 2, 16, 96, 2
    ctx = _ctx(H, Hkv, D)
    sk = make_layer("shadowkv", ctx, rank=Hkv * D, local_window=8, factor_dtype=None, **opts)
    dense = make_layer("dense", ctx)
    for out_dense, out_sk in _run_pair([dense, sk], gen, B, H, Hkv, D, T, steps=64, verify_at=(10, 40)):
        torch.testing.assert_close(out_sk, out_dense, atol=ATOL, rtol=RTOL)
    st = sk.stats()
    assert not st["fallback_dense"] and st["decode_steps"] == 64
    assert st["chunks_selected"] + st["outlier_chunks"] == st["context_chunks"] == (T - 8) // 8
    assert st["hit_rate"] == (1.0 if sk.config.reuse_hits else 0.0)
    assert sk.seq_length == dense.seq_length == T + 64 + 4


class _ApplyOnlyRotary:
    """A rotary helper with only the contract's ``apply``/``invert`` (no ``cos_sin`` tables)."""

    def __init__(self, inner):
        self.apply, self.invert = inner.apply, inner.invert


def test_rope_paths_agree(gen):
    H, Hkv, D, T, B = 4, 2, 16, 400, 2
    rope = RotaryHelper(LlamaRopeEmb(D, 10000.0))
    exact = dict(factor_dtype=None)  # fp32 factors: the two RoPE paths agree to fp32 rounding
    folded = make_layer("shadowkv", _ctx(H, Hkv, D, rotary=rope), sparse_budget=64, rank=16, **exact)
    per_token = make_layer("shadowkv", _ctx(H, Hkv, D, rotary=_ApplyOnlyRotary(rope)), sparse_budget=64, rank=16,
                           **exact)
    for a, b in _run_pair([folded, per_token], gen, B, H, Hkv, D, T, steps=6, verify_at=(3,)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert folded.sv_offsets is not None and per_token.sv_offsets is None
    # positions that are not consecutive inside chunks: per-token cos/sin, still exact at full rank
    sk = make_layer("shadowkv", _ctx(H, Hkv, D), sparse_budget=T, rank=Hkv * D, **exact)
    dense = make_layer("dense", _ctx(H, Hkv, D))
    q, k, v, _ = _inputs(gen, 1, H, Hkv, T, D)
    pos = (torch.arange(T) * 3).unsqueeze(0)
    for layer in (sk, dense):
        layer.prefill(q, k, v, pos)
    for i in range(3):
        step = _inputs(gen, 1, H, Hkv, 1, D, start=3 * (T + i))
        torch.testing.assert_close(sk.decode(*step), dense.decode(*step), atol=ATOL, rtol=RTOL)
    assert sk.sv_offsets is None and sk.stats()["chunks_selected"] > 0


def test_short_context_falls_back_to_dense_and_says_so(gen, caplog):
    ctx = _ctx()
    sk = make_layer("shadowkv", ctx, sparse_budget=256)  # prompt of 100 < budget
    dense = make_layer("dense", ctx)
    with caplog.at_level(logging.INFO, logger="longctx.backends.shadowkv"):
        for out_dense, out_sk in _run_pair([dense, sk], gen, 1, 4, 2, 16, 100, steps=5):
            torch.testing.assert_close(out_sk, out_dense, atol=1e-5, rtol=1e-5)
    assert sk.stats()["fallback_dense"] is True
    assert "attending densely" in caplog.text
    assert sk.memory()["host"] == 0


# ----------------------------------------------------------------------------- fidelity
def _structured_prompt(gen, B, Hkv, T, D, rank, rotary):
    """Low-rank pre-RoPE keys + noise, rotated; 4 sink tokens with large keys."""
    basis = torch.randn(rank, Hkv * D, generator=gen)
    coef = torch.randn(B, T, rank, generator=gen)
    pre = (coef @ basis).view(B, T, Hkv, D).transpose(1, 2) / rank**0.5
    pre = pre + 0.02 * torch.randn(B, Hkv, T, D, generator=gen)
    pos = torch.arange(T).unsqueeze(0).expand(B, -1)
    k = rotary.apply(pre, pos)
    k[:, :, :4] *= 4.0  # sinks
    v = torch.randn(B, Hkv, T, D, generator=gen)
    return k, v, pos


@pytest.mark.parametrize("outlier_chunks", [None, 0])
def test_planted_keys_are_selected(gen, outlier_chunks):
    H, Hkv, D, T, B = 8, 2, 32, 1024, 2
    G = H // Hkv
    ctx = _ctx(H, Hkv, D)
    sk = make_layer("shadowkv", ctx, sparse_budget=128, rank=16, outlier_chunks=outlier_chunks)
    dense = make_layer("dense", ctx)
    k, v, pos = _structured_prompt(gen, B, Hkv, T, D, rank=8, rotary=sk.rotary)
    # the G queries of a group share a direction; plant 3 keys per (batch, KV head) along it, away from the tail
    q = torch.randn(B, Hkv, 1, 1, D, generator=gen) + 0.3 * torch.randn(B, Hkv, G, 1, D, generator=gen)
    q = q.reshape(B, H, 1, D)
    planted = torch.stack([torch.randperm(T - 64, generator=gen)[:3] + 8 for _ in range(B * Hkv)]).view(B, Hkv, 3)
    for b in range(B):
        for h in range(Hkv):
            direction = q[b, h * G : (h + 1) * G, 0].mean(0)
            k[b, h, planted[b, h]] = 3.0 * direction / direction.norm() * D**0.5
    qp = torch.randn(B, H, 8, D, generator=gen)
    sk.prefill(qp, k, v, pos)
    dense.prefill(qp, k, v, pos)
    sk.record_attended = True
    kn, vn = torch.randn(B, Hkv, 1, D, generator=gen), torch.randn(B, Hkv, 1, D, generator=gen)
    out = sk.decode(q, kn, vn, torch.full((B, 1), T))
    ref = dense.decode(q, kn, vn, torch.full((B, 1), T))
    att = sk.attended  # [B, H, 1, T + 1]
    assert att.shape == (B, H, 1, T + 1)
    for b in range(B):
        for h in range(Hkv):
            assert bool(att[b, h * G, 0, planted[b, h]].all()), f"planted keys of (b={b}, h={h}) not attended"
    assert att[:, :, 0, -1].all() and att[:, :, 0, T - 32 : T].all()  # generated token and local window
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.01, f"attention output relative error vs dense {rel:.4f}"
    st = sk.stats()
    assert st["chunks_selected"] == 128 // 8 and 0 < st["key_rel_error"] < 0.05


def test_key_basis_methods_agree(gen):
    Hkv, T, D, r = 2, 600, 32, 10
    low = torch.randn(T, 6, generator=gen) @ torch.randn(6, Hkv * D, generator=gen)
    x = (low + 0.05 * torch.randn(T, Hkv * D, generator=gen)).view(T, Hkv, D).transpose(0, 1).contiguous()
    errs = {}
    for method in ("gram", "svd", "lowrank"):
        basis, err = key_basis(x, r, method)
        assert basis.shape == (Hkv * D, r)
        torch.testing.assert_close(basis.T @ basis, torch.eye(r), atol=1e-4, rtol=0)
        X = x.transpose(0, 1).reshape(T, Hkv * D)
        actual = float((X - X @ basis @ basis.T).norm() / X.norm())
        assert abs(actual - err) < 1e-3
        errs[method] = actual
    assert abs(errs["gram"] - errs["svd"]) < 1e-5
    assert errs["lowrank"] < errs["svd"] * 1.05 + 1e-4


def test_rope_helpers_round_trip(gen):
    rope = RotaryHelper(LlamaRopeEmb(16, 10000.0))
    x = torch.randn(3, 2, 40, 16, generator=gen)
    pos = torch.randint(0, 5000, (3, 40), generator=gen)
    y = rope.apply(x, pos)
    torch.testing.assert_close(rope.invert(y, pos), x, atol=1e-5, rtol=1e-5)
    cos, sin = rope.cos_sin(pos, x)
    torch.testing.assert_close(rope_inplace_halves(x, cos, sin),
                               y, atol=1e-6, rtol=1e-6)
    # partial rotary: only the first R dims rotate
    R = 8
    c8, s8 = cos[..., :4].repeat(1, 1, 1, 2), sin[..., :4].repeat(1, 1, 1, 2)
    xp = rope_inplace_halves(x, c8, s8)
    assert torch.equal(xp[..., R:], x[..., R:])
    x1, x2 = x[..., :4], x[..., 4:8]
    torch.testing.assert_close(xp[..., :R], x[..., :R] * c8 + torch.cat([-x2, x1], -1) * s8, atol=1e-6, rtol=1e-6)


def test_landmark_scores_semantics(gen):
    q = torch.randn(2, 4, 3, 16, generator=gen)
    lm = torch.randn(2, 2, 20, 16, generator=gen)
    bias = torch.zeros(2, 2, 20)
    bias[0, 0, :5] = float("-inf")
    bias[1, 1] = float("-inf")  # every chunk removed: scores 0
    got = landmark_scores(q, lm, bias, 0.25)
    logits = torch.einsum("bhgsd,bhnd->bhgsn", q.view(2, 2, 2, 3, 16), lm) * 0.25 + bias[:, :, None, None]
    ref = torch.softmax(logits, -1).nan_to_num(0.0).amax(dim=(2, 3))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert got[1, 1].eq(0).all() and got[0, 0, :5].eq(0).all()


# ----------------------------------------------------------------------------- memory, stats, reuse, rollback
def test_memory_per_tier(gen):
    B, H, Hkv, D, T, C = 2, 4, 2, 16, 1000, 8
    layer = make_layer("shadowkv", _ctx(H, Hkv, D), sparse_budget=64, rank=12, local_window=32,
                       landmark_dtype=None, factor_dtype=None)  # fp32 throughout: the byte counts below
    q, k, v, pos = _inputs(gen, B, H, Hkv, T, D)
    layer.prefill(q, k, v, pos)
    N = (T - 32) // C
    O, K = 64 * 24 // 1024, 64 // C
    local = T - N * C
    f = 4  # fp32 bytes
    exact = 2 * B * Hkv * (O * C + local + K * C) * D * f
    tiled = layer._landmarks_tiled is not None  # the C++ path stores whole tiles of 64 chunks
    n_lm = -(-N // 64) * 64 if tiled else N
    device = B * N * C * 12 * f + B * Hkv * 12 * D * f + B * Hkv * n_lm * D * f  # U, SV, landmarks
    device += B * Hkv * N * f + B * N * C * 8 + B * Hkv * O * 8  # landmark bias, positions, outlier ids
    device += (B * Hkv * N + 1) * 8 + B * Hkv * K * 8  # slot tables
    assert layer.memory() == {"device": device + exact, "host": B * Hkv * N * C * D * f}
    layer.decode(*_inputs(gen, B, H, Hkv, 1, D, start=T))
    device += B * Hkv * C * 12 * D * f  # SV rotated by each in-chunk offset, built at the first decode
    if layer._start_cs is not None:  # cos/sin at every chunk start (the C++ rebuild), first half of D
        device += 2 * B * N * (D // 2) * f
    assert layer.memory()["device"] == device + exact + 2 * B * Hkv * D * f  # + one generated token
    dense_kv = 2 * B * Hkv * T * D * f
    assert layer.memory()["device"] < dense_kv


def test_hit_reuse_changes_work_not_output(gen):
    H, Hkv, D, T = 4, 2, 16, 512
    ctx = _ctx(H, Hkv, D)
    a = make_layer("shadowkv", ctx, sparse_budget=64, rank=16)
    b = make_layer("shadowkv", ctx, sparse_budget=64, rank=16, reuse_hits=False)
    for i, (oa, ob) in enumerate(_run_pair([a, b], gen, 2, H, Hkv, D, T, steps=12, verify_at=(5,))):
        torch.testing.assert_close(oa, ob, atol=1e-5, rtol=1e-5)
    assert a.stats()["rebuilt_tokens"] < b.stats()["rebuilt_tokens"]
    assert b.stats()["hit_rate"] == 0.0
    # the same query twice: everything hits the second time
    q, k, v, pos = _inputs(gen, 2, H, Hkv, 1, D, start=a.seq_length)
    a.decode(q, k, v, pos)
    a.decode(q, k, v, pos + 1)
    assert a.stats()["last_hit_rate"] == 1.0


def test_rollback_matches_fresh_decode(gen):
    H, Hkv, D, T, B = 4, 2, 16, 400, 2
    ctx = _ctx(H, Hkv, D)
    prompt = _inputs(gen, B, H, Hkv, T, D)
    steps = [_inputs(gen, B, H, Hkv, 1, D, start=T + i) for i in range(6)]
    alt = [_inputs(gen, B, H, Hkv, 1, D, start=T + 3 + i) for i in range(3)]
    a = make_layer("shadowkv", ctx, sparse_budget=64, rank=16)
    b = make_layer("shadowkv", ctx, sparse_budget=64, rank=16)
    a.prefill(*prompt)
    b.prefill(*prompt)
    for s in steps:
        a.decode(*s)
    a.rollback(3)
    assert a.seq_length == T + 3
    for s in steps[:3]:
        b.decode(*s)
    for s in alt:
        torch.testing.assert_close(a.decode(*s), b.decode(*s), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at most the 6 tokens"):
        a.rollback(7)


def test_batch_rows_are_independent(gen):
    H, Hkv, D, T, B = 4, 2, 16, 600, 3
    ctx = _ctx(H, Hkv, D)
    batched = make_layer("shadowkv", ctx, sparse_budget=64, rank=16)
    singles = [make_layer("shadowkv", ctx, sparse_budget=64, rank=16) for _ in range(B)]
    q, k, v, pos = _inputs(gen, B, H, Hkv, T, D)
    batched.prefill(q, k, v, pos)
    for i, s in enumerate(singles):
        s.prefill(q[i : i + 1], k[i : i + 1], v[i : i + 1], pos[i : i + 1])
    for step in range(4):
        q, k, v, pos = _inputs(gen, B, H, Hkv, 2 if step == 2 else 1, D, start=batched.seq_length)
        out = batched.decode(q, k, v, pos)
        for i, s in enumerate(singles):
            ref = s.decode(q[i : i + 1], k[i : i + 1], v[i : i + 1], pos[i : i + 1])
            torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def test_generates_4k_tokens_without_cap(gen):
    H, Hkv, D, T, steps = 2, 1, 16, 64, 4200
    ctx = _ctx(H, Hkv, D)
    sk = make_layer("shadowkv", ctx, sparse_budget=64, rank=Hkv * D, local_window=8, factor_dtype=None)
    dense = make_layer("dense", ctx)
    q, k, v, pos = _inputs(gen, 1, H, Hkv, T, D)
    sk.prefill(q, k, v, pos)
    dense.prefill(q, k, v, pos)
    qs = torch.randn(steps, 1, H, 1, D, generator=gen)
    ks = torch.randn(steps, 1, Hkv, 1, D, generator=gen)
    vs = torch.randn(steps, 1, Hkv, 1, D, generator=gen)
    for i in range(steps):
        p = torch.full((1, 1), T + i)
        out = sk.decode(qs[i], ks[i], vs[i], p)
        ref = dense.decode(qs[i], ks[i], vs[i], p)
        if i % 700 == 0 or i == steps - 1:
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert sk.seq_length == T + steps and sk.stats()["keys_per_step"] == T + steps


# ----------------------------------------------------------------------------- C++ kernels (CPU path)
def _rebuild_ref(u, sv, chunks, slots, counts, cos, sin, out_k, v_src, out_v, Hkv):
    rows, M = chunks.shape
    C = out_k.shape[2]
    Tc = u.shape[0] // (rows // Hkv)
    Cs, Cc, R = sv.shape[0] // rows, cos.shape[2], cos.shape[3]
    for row in range(rows):
        for j in range(int(counts[row])):
            ch, sl = int(chunks[row, j]), int(slots[row, j])
            for c in range(C):
                x = u[(row // Hkv) * Tc + ch * C + c] @ sv[row * Cs + (c if Cs > 1 else 0)]
                cs, sn = cos[row, j, c if Cc > 1 else 0], sin[row, j, c if Cc > 1 else 0]
                y = x.clone()
                y[:R] = x[:R] * cs + torch.cat([-x[R // 2 : R], x[: R // 2]]) * sn
                out_k[row, sl, c] = y
                out_v[row, sl, c] = v_src[row, ch, c]


def _check_bf16_rebuild(u16, sv16, chunks, slots, counts, cos, sin, v_src, K, Hkv, atol):
    """Run ``_C.shadowkv_rebuild_bf16`` on bf16 factors (SV pair-interleaved over r) against the
    reference on the same rounded values; returns the pair-interleaved SV."""
    from longctx import _C

    rows, C, D, r = chunks.shape[0], v_src.shape[2], v_src.shape[3], u16.shape[1]
    sv2 = sv16.view(sv16.shape[0], r // 2, 2, D).transpose(-1, -2).contiguous()
    got_k, got_v = torch.zeros(rows, K, C, D), torch.zeros(rows, K, C, D)
    _C.shadowkv_rebuild_bf16(u16.view(torch.int16).numpy(), sv2.view(torch.int16).numpy(), chunks.numpy(),
                             slots.numpy(), counts.numpy(), cos.numpy(), sin.numpy(), got_k.numpy(), v_src.numpy(),
                             got_v.numpy(), Hkv, 2)
    ref_k, ref_v = torch.zeros(rows, K, C, D), torch.zeros(rows, K, C, D)
    _rebuild_ref(u16.float(), sv16.float(), chunks, slots, counts, cos, sin, ref_k, v_src, ref_v, Hkv)
    torch.testing.assert_close(got_k, ref_k, atol=atol, rtol=1e-4)
    assert torch.equal(got_v, ref_v)
    return sv2


@pytest.mark.parametrize("D, folded, R", [(64, True, 64), (64, False, 32), (24, True, 16)])
def test_cpp_kernels_match_reference(gen, D, folded, R):
    from longctx.ops import cpp_available

    if not cpp_available():
        pytest.skip("longctx._C not built")
    from longctx import _C

    # scores: GS = 5 rows (a group of 4 and 1), N = 200 (3 full tiles of 64 and a tail)
    rows, GS, N = 3, 5, 200
    q = torch.randn(rows, GS, D, generator=gen)
    bias = torch.zeros(rows, N)
    bias[0, 10:50] = float("-inf")
    bias[2] = float("-inf")  # every chunk removed: scores 0
    lm = torch.randn(1, rows, N, D, generator=gen)
    tiles = tile_landmarks(lm)[0]  # [rows, 4, D, 64]
    assert tiles.shape == (rows, 4, D, 64) and torch.equal(untile_landmarks(tiles[None], N), lm)
    for b in (bias, None):
        got = torch.from_numpy(_C.shadowkv_scores(q.numpy(), tiles.numpy(), N, None if b is None else b.numpy(), 0.3, 2))
        bb = None if b is None else b[None]
        ref = landmark_scores(q.view(1, rows * GS, 1, D), lm, bb, 0.3)
        torch.testing.assert_close(got, ref.view(rows, N), atol=1e-6, rtol=1e-5)
    lm16 = lm.bfloat16()  # bf16 landmarks travel as int16 bit patterns, scored in fp32
    tiles16 = tile_landmarks(lm16)[0].view(torch.int16)
    got = torch.from_numpy(_C.shadowkv_scores(q.numpy(), tiles16.numpy(), N, bias.numpy(), 0.3, 1))
    ref = landmark_scores(q.view(1, rows * GS, 1, D), lm16, bias[None], 0.3)
    torch.testing.assert_close(got, ref.view(rows, N), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="n_chunks requires"):
        _C.shadowkv_scores(q.numpy(), tiles.numpy(), N + 64, None, 0.3, 1)
    # rebuild: 2 sequences x 2 KV heads, strided destinations
    B, Hkv, C, Nc, r, K, M = 2, 2, 4, 30, 12, 9, 7
    rows = B * Hkv
    u = torch.randn(B * Nc * C, r, generator=gen)
    sv = torch.randn(rows * (C if folded else 1), r, D, generator=gen)
    chunks = torch.stack([torch.randperm(Nc, generator=gen)[:M] for _ in range(rows)])
    slots = torch.stack([torch.randperm(K, generator=gen)[:M] for _ in range(rows)])
    counts = torch.tensor([7, 0, 3, 6])
    cc = 1 if folded else C
    cos, sin = torch.randn(rows, M, cc, R, generator=gen), torch.randn(rows, M, cc, R, generator=gen)
    v_src = torch.randn(rows, Nc, C, D, generator=gen)
    outs = []
    for fn in ("cpp", "ref"):
        k_buf, v_buf = torch.zeros(rows, K + 3, C, D), torch.zeros(rows, K + 3, C, D)
        ok, ov = k_buf[:, 2:-1], v_buf[:, 2:-1]  # strided views, like the device buffer's selected region
        if fn == "cpp":
            _C.shadowkv_rebuild(u.numpy(), sv.numpy(), chunks.numpy(), slots.numpy(), counts.numpy(), cos.numpy(),
                                sin.numpy(), ok.numpy(), v_src.numpy(), ov.numpy(), Hkv, 2)
        else:
            _rebuild_ref(u, sv, chunks, slots, counts, cos, sin, ok, v_src, ov, Hkv)
        outs.append((k_buf, v_buf))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[0][1], outs[1][1])
    assert outs[0][0][1].eq(0).all()  # count 0 writes nothing
    # bf16 factors: U as bits, SV pair-interleaved over r; the reference multiplies the same rounded values
    u16, sv16 = u.bfloat16(), sv.bfloat16()
    sv2 = _check_bf16_rebuild(u16, sv16, chunks, slots, counts, cos, sin, v_src, K, Hkv, atol=1e-4)
    got_k, got_v = torch.zeros(rows, K, C, D), torch.zeros(rows, K, C, D)
    with pytest.raises(ValueError, match="r even"):
        _C.shadowkv_rebuild_bf16(u16[:, :-1].contiguous().view(torch.int16).numpy(), sv2.view(torch.int16).numpy(),
                                 chunks.numpy(), slots.numpy(), counts.numpy(), cos.numpy(), sin.numpy(),
                                 got_k.numpy(), v_src.numpy(), got_v.numpy(), Hkv, 1)
    with pytest.raises(ValueError, match="chunk ids must be in"):
        bad = chunks.clone()
        bad[0, 0] = Nc
        _C.shadowkv_rebuild(u.numpy(), sv.numpy(), bad.numpy(), slots.numpy(), counts.numpy(), cos.numpy(),
                            sin.numpy(), ok.numpy(), v_src.numpy(), ov.numpy(), Hkv, 1)


def test_cpp_select_top_k_and_slot_tables(gen):
    from longctx.ops import cpp_available

    if not cpp_available():
        pytest.skip("longctx._C not built")
    from longctx import _C

    rows, N, K = 3, 50, 7
    slot_of = torch.full((rows * N + 1,), -1, dtype=torch.long)
    slot_ids = torch.full((rows, K), -1, dtype=torch.long)
    scores = torch.rand(rows, N, generator=gen)
    prev = None
    for step in range(6):
        scores = torch.where(torch.rand(rows, N, generator=gen) < 0.2, torch.rand(rows, N, generator=gen), scores)
        chunks, slots, counts = (torch.from_numpy(a) for a in _C.shadowkv_select(
            scores.numpy(), K, slot_of.numpy(), slot_ids.numpy(), True, 2))
        top = scores.topk(K, dim=-1).indices
        for r in range(rows):
            want = set(top[r].tolist())
            held = {int(x) - r * N for x in slot_ids[r]}
            assert held == want  # the slots hold exactly the top K
            for s_, gid in enumerate(slot_ids[r].tolist()):
                assert int(slot_of[gid]) == s_
            n = int(counts[r])
            new = set(chunks[r, :n].tolist())
            assert chunks[r, n:].eq(-1).all() and slots[r, n:].eq(-1).all()
            if prev is None:
                assert new == want
            else:  # hits keep their slot; only the chunks that were not held are rebuilt
                assert new == want - prev[r][0]
                for c in want & prev[r][0]:
                    assert int(slot_of[r * N + c]) == prev[r][1][c]
            for c, s_ in zip(chunks[r, :n].tolist(), slots[r, :n].tolist()):
                assert int(slot_ids[r, s_]) == r * N + c
        assert int((slot_of[:-1] >= 0).sum()) == rows * K
        prev = [(set(top[r].tolist()), {c: int(slot_of[r * N + c]) for c in top[r].tolist()}) for r in range(rows)]
    with pytest.raises(ValueError, match="K requires"):
        _C.shadowkv_select(scores.numpy(), N + 1, slot_of.numpy(), slot_ids.numpy(), True, 1)
    with pytest.raises(ValueError, match="slot_ids requires"):
        _C.shadowkv_select(scores.numpy(), K - 1, slot_of.numpy(), slot_ids.numpy(), True, 1)


@pytest.mark.parametrize("folded", [True, False])
def test_cpp_rebuild_bf16_tile_shapes(gen, folded):
    """Shapes of the AMX path (rank % 32 == 0, head dim % 64 == 0; 16-token tiles, a ragged last tile and
    rows of different miss counts); on CPUs without AMX the same call runs the AVX512-BF16 loop."""
    from longctx.ops import cpp_available

    if not cpp_available():
        pytest.skip("longctx._C not built")
    from longctx import _C

    B, Hkv, C, Nc, r, D, K, M, R = 1, 2, 8, 60, 96, 128, 45, 40, 128
    rows = B * Hkv
    u = torch.randn(B * Nc * C, r, generator=gen).bfloat16()
    sv = torch.randn(rows * (C if folded else 1), r, D, generator=gen).bfloat16()
    chunks = torch.stack([torch.randperm(Nc, generator=gen)[:M] for _ in range(rows)])
    slots = torch.stack([torch.randperm(K, generator=gen)[:M] for _ in range(rows)])
    counts = torch.tensor([40, 17])
    cc = 1 if folded else C
    cos, sin = torch.randn(rows, M, cc, R, generator=gen), torch.randn(rows, M, cc, R, generator=gen)
    v_src = torch.randn(rows, Nc, C, D, generator=gen)
    _check_bf16_rebuild(u, sv, chunks, slots, counts, cos, sin, v_src, K, Hkv, atol=2e-4)
    assert isinstance(_C.shadowkv_amx(r, D), bool) and not _C.shadowkv_amx(r + 2, D)


@pytest.mark.parametrize("D, landmark_dtype, factor_dtype",
                         [(64, None, None), (32, None, None), (64, "bfloat16", None), (64, "bfloat16", "bfloat16")])
def test_backend_cpp_path_matches_torch(gen, monkeypatch, D, landmark_dtype, factor_dtype):
    from longctx.ops import cpp_available

    if not cpp_available():
        pytest.skip("longctx._C not built")
    H, Hkv, T, B = 4, 2, 700, 2
    ctx = _ctx(H, Hkv, D)
    outs, layers = {}, {}
    for impl in ("ref", "cpp"):
        monkeypatch.setenv("LONGCTX_OPS", impl)
        layer = make_layer("shadowkv", ctx, sparse_budget=64, rank=24, landmark_dtype=landmark_dtype,
                           factor_dtype=factor_dtype)
        g = torch.Generator().manual_seed(9)
        outs[impl] = [o[0] for o in _run_pair([layer], g, B, H, Hkv, D, T, steps=6, verify_at=(2,))]
        layers[impl] = layer
        assert layer._impl(torch.device("cpu")) == ("torch" if impl == "ref" else "cpp")
    for a, b in zip(outs["ref"], outs["cpp"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    sa, sb = layers["ref"].stats(), layers["cpp"].stats()
    assert sa["hit_rate"] == sb["hit_rate"] and sa["rebuilt_tokens"] == sb["rebuilt_tokens"]


# ----------------------------------------------------------------------------- Triton kernels (interpreter)
def test_triton_kernels_in_interpreter():
    """Kernels vs references, and the backend's Triton path vs its torch path, under TRITON_INTERPRET=1.

    Triton decides between compiling and interpreting when ``triton.language`` itself is
    imported, which ``import longctx`` (via torch._dynamo) has done by now; so the cases run
    in a fresh interpreter with the variable set from the start.
    """
    pytest.importorskip("triton")
    cases = Path(__file__).with_name("shadowkv_triton_cases.py")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("LONGCTX_OPS", None)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(cases)],
        cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


# ----------------------------------------------------------------------------- Hugging Face generate
def _left_padded(gen, lengths, vocab=128):
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=gen)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    ids[mask == 0] = 0
    return ids, mask


def test_patched_generate_full_budget_equals_dense(gen):
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 48), generator=gen)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    full = dict(sparse_budget=64, rank=2 * 16, dense_fallback=False, local_window=8)
    with longctx.patch(model, "shadowkv", **full) as handle:
        out = model.generate(ids, **kw)
        stats = handle.stats()
    assert torch.equal(out, ref)
    assert all(not part["fallback_dense"] and part["decode_steps"] == 19 for layer in stats for part in layer)

    ids3, mask3 = _left_padded(gen, (40, 29, 35))  # different prompt lengths
    with longctx.patch(model, "dense"):
        ref3 = model.generate(ids3, attention_mask=mask3, **kw)
    with longctx.patch(model, "shadowkv", **full):
        out3 = model.generate(ids3, attention_mask=mask3, **kw)
    assert torch.equal(out3, ref3)


def test_patched_generate_sparse_reports_stats(gen):
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 300), generator=gen)
    with longctx.patch(model, "shadowkv", sparse_budget=64, rank=16) as handle:
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        stats, mem = handle.stats(), handle.memory()
    assert out.shape == (1, 308)
    part = stats[0][0]
    assert part["chunks_selected"] == 8 and part["rank"] == 16 and part["decode_steps"] == 7
    assert 0.0 <= part["hit_rate"] <= 1.0 and mem["host"] > 0 and mem["device"] > 0


def test_bf16_factors_track_fp32_factors(gen):
    """``factor_dtype="bfloat16"`` stores U/SV in bf16 (half of U's bytes) and rebuilds keys within
    bf16 rounding of the fp32-factor cache: same chunks selected, outputs within ~1%."""
    H, Hkv, D, T, B = 4, 2, 32, 900, 1
    ctx = _ctx(H, Hkv, D)
    runs = {}
    for fdt in (None, "bfloat16"):
        layer = make_layer("shadowkv", ctx, sparse_budget=128, rank=48, factor_dtype=fdt, landmark_dtype="bfloat16")
        g = torch.Generator().manual_seed(4)
        runs[fdt] = ([o[0] for o in _run_pair([layer], g, B, H, Hkv, D, T, steps=5)], layer)
    (out32, l32), (out16, l16) = runs[None], runs["bfloat16"]
    assert l32.u.dtype == torch.float32 and l16.u.dtype == torch.bfloat16 and l16.sv.dtype == torch.bfloat16
    assert l16.memory()["device"] < l32.memory()["device"]
    assert torch.equal(l32.slot_ids, l16.slot_ids)  # selection does not read the factors
    torch.testing.assert_close(out32[0], out16[0])  # prefill is dense
    for a, b in zip(out32[1:], out16[1:]):
        rel = (a - b).norm() / a.norm()
        assert 0 < rel < 2e-2, rel


@pytest.mark.parametrize("case", ["spread", "ties", "nan_and_inf"])
def test_cpp_select_large_rows_match_full_top_k(gen, case):
    """Rows long enough for the sampled threshold: the selected set equals the exact top K
    (largest first, ties to the lower id, NaN and -inf last), including rows where the sample
    overshoots (a block of equal high scores) and the fallback takes every chunk."""
    from longctx.ops import cpp_available

    if not cpp_available():
        pytest.skip("longctx._C not built")
    from longctx import _C

    rows, N, K = 4, 20000, 256
    scores = torch.rand(rows, N, generator=gen)
    if case == "ties":  # few distinct values: many ties at the K-th score
        scores = (scores * 50).floor()
        scores[1] = 1.0  # every score equal: the lowest K ids win
    elif case == "nan_and_inf":
        scores[torch.rand(rows, N, generator=gen) < 0.3] = float("nan")
        scores[torch.rand(rows, N, generator=gen) < 0.3] = float("-inf")
        scores[2, :N - 100] = float("nan")  # fewer real scores than K: NaNs fill up, lowest ids first
    slot_of = torch.full((rows * N + 1,), -1, dtype=torch.long)
    slot_ids = torch.full((rows, K), -1, dtype=torch.long)
    chunks, _, counts = (torch.from_numpy(a) for a in _C.shadowkv_select(
        scores.numpy(), K, slot_of.numpy(), slot_ids.numpy(), True, 2))
    key = torch.where(scores.isnan(), float("-inf"), scores)
    for r in range(rows):
        # reference: sort by (score desc, id asc)
        ids = sorted(range(N), key=lambda n: (-float(key[r, n]), n))[:K]
        assert int(counts[r]) == K
        assert set(chunks[r].tolist()) == set(ids)


def test_cpp_rebuild_chunk_start_tables_match_gathered(gen):
    """cos/sin given as [B, N, R/2] tables at every chunk start (indexed by chunk id in the kernel)
    rebuild the same keys as the same angles gathered per chunk as [rows, M, 1, R] (rotate-half)."""
    from longctx.ops import cpp_available

    if not cpp_available():
        pytest.skip("longctx._C not built")
    from longctx import _C

    B, Hkv, C, Nc, r, D, K, M = 2, 2, 4, 30, 16, 32, 12, 10
    rows, h = B * Hkv, 12  # R = 24 rotated dims of 32 (partial rotary)
    u = torch.randn(B * Nc * C, r, generator=gen)
    sv = torch.randn(rows * C, r, D, generator=gen)  # one SV per in-chunk offset (folded RoPE)
    chunks = torch.stack([torch.randperm(Nc, generator=gen)[:M] for _ in range(rows)])
    slots = torch.stack([torch.randperm(K, generator=gen)[:M] for _ in range(rows)])
    counts = torch.tensor([10, 3, 7, 0])
    cos_t, sin_t = torch.randn(B, Nc, h, generator=gen), torch.randn(B, Nc, h, generator=gen)
    b_of_row = torch.arange(rows) // Hkv
    gathered = [torch.cat([t[b_of_row.unsqueeze(1), chunks]] * 2, -1).unsqueeze(2).contiguous() for t in (cos_t, sin_t)]
    v_src = torch.randn(rows, Nc, C, D, generator=gen)
    outs = []
    for cos, sin in (gathered, (cos_t, sin_t)):
        ok, ov = torch.zeros(rows, K, C, D), torch.zeros(rows, K, C, D)
        _C.shadowkv_rebuild(u.numpy(), sv.numpy(), chunks.numpy(), slots.numpy(), counts.numpy(), cos.numpy(),
                            sin.numpy(), ok.numpy(), v_src.numpy(), ov.numpy(), Hkv, 2)
        outs.append((ok, ov))
    assert outs[0][0].abs().sum() > 0
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-6, rtol=1e-6)
    assert torch.equal(outs[1][1], outs[0][1])
    with pytest.raises(ValueError, match="tables require"):
        _C.shadowkv_rebuild(u.numpy(), sv.numpy(), chunks.numpy(), slots.numpy(), counts.numpy(),
                            cos_t[:, :-1].contiguous().numpy(), sin_t[:, :-1].contiguous().numpy(), ok.numpy(),
                            v_src.numpy(), ov.numpy(), Hkv, 1)
