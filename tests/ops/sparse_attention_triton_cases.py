"""ops Triton kernels under TRITON_INTERPRET=1 (run by tests/ops/test_sparse_attention.py in a subprocess).

Not collected by default (the file name does not start with ``test_``): Triton must see
``TRITON_INTERPRET=1`` before the kernels are decorated. Run directly with:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/ops/sparse_attention_triton_cases.py
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("requires TRITON_INTERPRET=1 set before start (or a CUDA device)", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from longctx import ops  # noqa: E402
from longctx.triton_kernels.merge_states import merge_states_ref, merge_states_triton  # noqa: E402
from longctx.triton_kernels.sparse_attention import sparse_attention_ref, sparse_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_qkv(seed, B, H, Hkv, S, T, D, dtype=torch.float32, q_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=gen) * q_scale  # [B, H, S, D]
    k = torch.randn(B, Hkv, T, D, generator=gen)  # [B, Hkv, T, D]
    v = torch.randn(B, Hkv, T, D, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), gen


def ragged_indices(gen, B, Hkv, T, K, pad_frac=0.3):
    idx = torch.randint(0, T, (B, Hkv, K), generator=gen)
    return idx.masked_fill(torch.rand(B, Hkv, K, generator=gen) < pad_frac, -1).to(DEVICE)


shapes = st.fixed_dictionaries(
    {
        "B": st.integers(1, 2),
        "Hkv": st.integers(1, 2),
        "G": st.sampled_from([1, 4, 8]),
        "S": st.integers(1, 4),
        "T": st.integers(1, 150),
        "D": st.sampled_from([32, 64, 128]),
        "seed": st.integers(0, 2**31 - 1),
    }
)


@SETTINGS
@given(shape=shapes, sparse=st.booleans(), num_splits=st.sampled_from([None, 2, 5]))
def test_sparse_attention_triton_matches_reference(shape, sparse, num_splits):
    B, Hkv, G, S, T, D = (shape[x] for x in ("B", "Hkv", "G", "S", "T", "D"))
    q, k, v, gen = make_qkv(shape["seed"], B, G * Hkv, Hkv, S, T, D)
    indices = ragged_indices(gen, B, Hkv, T, 1 + shape["seed"] % 90) if sparse else None
    out, lse = sparse_attention_triton(q, k, v, indices, num_splits=num_splits)
    ref_out, ref_lse = sparse_attention_ref(q, k, v, indices)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    if indices is None:
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True), **TOL[torch.float32])


@pytest.mark.parametrize("D", [16, 48, 100])
def test_sparse_attention_triton_odd_head_dims_bf16_and_int32(D):
    q, k, v, gen = make_qkv(D, 1, 8, 2, 3, 90, D)
    indices = ragged_indices(gen, 1, 2, 90, 40).to(torch.int32)
    out, lse = sparse_attention_triton(q, k, v, indices)
    ref_out, ref_lse = sparse_attention_ref(q, k, v, indices)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out, lse = sparse_attention_triton(qb, kb, vb, indices)
    ref_out, ref_lse = sparse_attention_ref(qb, kb, vb, indices)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_out, **TOL[torch.bfloat16])
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2)


def test_sparse_attention_triton_empty_rows_and_large_scores():
    q, k, v, gen = make_qkv(3, 2, 8, 2, 3, 70, 64, q_scale=300.0)
    indices = ragged_indices(gen, 2, 2, 70, 30)
    indices[1, 0] = -1  # no key for batch 1, KV head 0
    for num_splits in (1, 3):
        out, lse = sparse_attention_triton(q, k, v, indices, num_splits=num_splits)
        ref_out, ref_lse = sparse_attention_ref(q, k, v, indices)
        assert torch.isfinite(out).all()
        assert torch.isinf(lse[1, :4]).all() and (out[1, :4] == 0).all()
        torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(out, ref_out, atol=1e-3, rtol=1e-3)


def test_dispatcher_uses_triton_when_forced(monkeypatch):
    monkeypatch.setenv("LONGCTX_OPS", "triton")
    q, k, v, gen = make_qkv(9, 1, 4, 1, 2, 40, 32)
    indices = ragged_indices(gen, 1, 1, 40, 12)
    out, lse = ops.sparse_attention(q, k, v, indices)
    torch.testing.assert_close(out, sparse_attention_ref(q, k, v, indices)[0], **TOL[torch.float32])
    out_m, lse_m = ops.merge_states(out, lse, out, lse)
    torch.testing.assert_close(out_m, out, **TOL[torch.float32])
    torch.testing.assert_close(lse_m, lse + torch.log(torch.tensor(2.0)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"indices requires values < T=40 .*got max 40"):
        ops.sparse_attention(q, k, v, torch.full_like(indices, 40))


@SETTINGS
@given(shape=shapes, q_scale=st.sampled_from([1.0, 1000.0]), split=st.sampled_from(["random", "all_a"]))
def test_merge_states_triton_of_a_key_split_equals_dense(shape, q_scale, split):
    B, Hkv, G, S, T, D = (shape[x] for x in ("B", "Hkv", "G", "S", "T", "D"))
    q, k, v, gen = make_qkv(shape["seed"], B, G * Hkv, Hkv, S, T, D, q_scale=q_scale)
    in_a = torch.rand(B, Hkv, T, generator=gen) < 0.5 if split == "random" else torch.ones(B, Hkv, T, dtype=torch.bool)
    in_a = in_a.to(DEVICE)
    pos = torch.arange(T, device=DEVICE).expand(B, Hkv, T)
    out_a, lse_a = sparse_attention_ref(q, k, v, torch.where(in_a, pos, -1))
    out_b, lse_b = sparse_attention_ref(q, k, v, torch.where(~in_a, pos, -1))
    out, lse = merge_states_triton(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = merge_states_ref(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=1e-6)
    full_out, full_lse = sparse_attention_ref(q, k, v)
    tol = dict(atol=2e-5, rtol=1e-4) if q_scale == 1.0 else dict(atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out, full_out, **tol)
    torch.testing.assert_close(lse, full_lse, atol=1e-4 * q_scale, rtol=1e-5)


def test_merge_states_triton_empty_rows_and_bf16():
    gen = torch.Generator().manual_seed(11)
    out_a = torch.randn(2, 4, 3, 24, generator=gen).to(DEVICE)
    out_b = torch.randn(2, 4, 3, 24, generator=gen).to(DEVICE)
    lse_a = (torch.randn(2, 4, 3, generator=gen) * 1e4).to(DEVICE)
    lse_b = lse_a + torch.randn(2, 4, 3, generator=gen).to(DEVICE)
    lse_a[0, 0, 0] = float("-inf")
    lse_b[0, 0, 1] = float("-inf")
    lse_a[0, 0, 2] = lse_b[0, 0, 2] = float("-inf")
    for dtype in (torch.float32, torch.bfloat16):
        out, lse = merge_states_triton(out_a.to(dtype), lse_a, out_b.to(dtype), lse_b)
        ref_out, ref_lse = merge_states_ref(out_a.to(dtype), lse_a, out_b.to(dtype), lse_b)
        assert out.dtype == dtype and lse.dtype == torch.float32
        torch.testing.assert_close(out, ref_out, **TOL[dtype])
        torch.testing.assert_close(lse, ref_lse, atol=0, rtol=1e-6)
        assert (out[0, 0, 2] == 0).all() and lse[0, 0, 2] == float("-inf")
