"""ShadowKV Triton kernels under TRITON_INTERPRET=1 (run by tests/backends/test_shadowkv.py in a subprocess).

Not collected by default (the file name does not start with ``test_``): Triton must see
``TRITON_INTERPRET=1`` before ``triton.language`` is first imported, which a normal test
session does long before this module. Run directly with:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/backends/shadowkv_triton_cases.py
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("requires TRITON_INTERPRET=1 set before start (or a CUDA device)", allow_module_level=True)

from longctx.backends import LayerContext, make_layer  # noqa: E402
from longctx.triton_kernels import shadowkv_gather, shadowkv_reconstruct, shadowkv_select  # noqa: E402


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(4321)


@pytest.fixture
def kernels():
    return {
        "shadowkv_select": shadowkv_select,
        "shadowkv_reconstruct": shadowkv_reconstruct,
        "shadowkv_gather": shadowkv_gather,
    }


def _inputs(gen, B, H, Hkv, S, D, start=0):
    q = torch.randn(B, H, S, D, generator=gen)
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    pos = (torch.arange(S) + start).unsqueeze(0).expand(B, -1)
    return q, k, v, pos


def _decode_outputs(layer, gen, B, H, Hkv, D, T, steps, verify_at=()):
    q, k, v, pos = _inputs(gen, B, H, Hkv, T, D)
    outs = [layer.prefill(q, k, v, pos)]
    for step in range(steps):
        S = 3 if step in verify_at else 1
        outs.append(layer.decode(*_inputs(gen, B, H, Hkv, S, D, start=layer.seq_length)))
    return outs


@pytest.mark.parametrize("G, S", [(2, 1), (4, 3)])
def test_triton_landmark_scores(kernels, gen, G, S):
    mod = kernels["shadowkv_select"]
    B, Hkv, D, N = 2, 2, 32, 70
    q = torch.randn(B, Hkv * G, S, D, generator=gen)
    lm = torch.randn(B, Hkv, N, D, generator=gen)
    bias = torch.zeros(B, Hkv, N)
    bias[0, 1, 3:9] = float("-inf")
    bias[1, 0] = float("-inf")
    for b in (bias, None):
        got = mod.landmark_scores_triton(q, lm, b, 0.2, block_n=16)
        torch.testing.assert_close(got, mod.landmark_scores_ref(q, lm, b, 0.2), atol=1e-6, rtol=1e-5)
    ids = mod.landmark_topk_triton(q, lm, None, 0.2, 5).sort(-1).values
    assert torch.equal(ids, mod.landmark_topk_ref(q, lm, None, 0.2, 5).sort(-1).values)


@pytest.mark.parametrize("R", [32, 16])
def test_triton_reconstruct_rope(kernels, gen, R):
    from longctx.models import rotate_half

    mod = kernels["shadowkv_reconstruct"]
    B, Hkv, N, C, D, r, K, M = 2, 2, 40, 8, 32, 20, 10, 6
    rows = B * Hkv
    u = torch.randn(B, N * C, r, generator=gen)
    sv = torch.randn(rows, r, D, generator=gen)
    sv_cat = torch.zeros(rows, r, 2 * D)
    sv_cat[..., :D] = sv
    sv_cat[..., D : D + R] = rotate_half(sv[..., :R])
    chunks = torch.stack([torch.randperm(N, generator=gen)[:M] for _ in range(rows)])
    slots = torch.stack([torch.randperm(K, generator=gen)[:M] for _ in range(rows)])
    counts = torch.tensor([6, 2, 0, 5])
    cos, sin = torch.randn(rows, M, C, R, generator=gen), torch.randn(rows, M, C, R, generator=gen)
    outs = []
    for fn in (mod.reconstruct_rope_triton, mod.reconstruct_rope_ref):
        out = torch.zeros(rows, K + 2, C, D)[:, 1:-1]  # a strided destination view
        fn(u, sv_cat[..., :D], sv_cat[..., D:], chunks, slots, counts, cos, sin, out, num_kv_heads=Hkv)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert outs[0][2].eq(0).all() and outs[0][0].ne(0).any()  # count 0 writes nothing


def test_triton_gather_chunks(kernels, gen):
    mod = kernels["shadowkv_gather"]
    rows, N, C, D, K, M = 4, 30, 8, 16, 9, 5
    src = torch.randn(rows, N, C, D, generator=gen)
    chunks = torch.stack([torch.randperm(N, generator=gen)[:M] for _ in range(rows)])
    slots = torch.stack([torch.randperm(K, generator=gen)[:M] for _ in range(rows)])
    counts = torch.tensor([5, 0, 3, 1])
    a, b = torch.zeros(rows, K, C, D), torch.zeros(rows, K, C, D)
    mod.gather_chunks_triton(src, chunks, slots, counts, a)
    mod.gather_chunks_ref(src, chunks, slots, counts, b)
    assert torch.equal(a, b) and a[1].eq(0).all()


@pytest.mark.parametrize("factor_dtype, tol", [(None, 1e-5), ("bfloat16", 2e-2)])
def test_backend_triton_path_matches_torch(gen, monkeypatch, factor_dtype, tol):
    """fp32 factors: the two paths agree to fp32 rounding. bf16 factors: the torch path multiplies
    the offset-rotated SV (rounded to bf16 once more), Triton rotates per token in fp32."""
    H, Hkv, D, T, B = 4, 2, 32, 300, 2
    ctx = LayerContext(num_heads=H, num_kv_heads=Hkv, head_dim=D)
    layers = {}
    outs = {}
    for impl in ("ref", "triton"):
        monkeypatch.setenv("LONGCTX_OPS", impl)
        layer = make_layer("shadowkv", ctx, sparse_budget=64, rank=24, factor_dtype=factor_dtype)
        g = torch.Generator().manual_seed(5)
        outs[impl] = _decode_outputs(layer, g, B, H, Hkv, D, T, steps=5, verify_at=(2,))
        layers[impl] = layer
    for a, b in zip(outs["ref"], outs["triton"]):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert layers["triton"].sv_rot is not None and layers["ref"].sv_rot is None  # the Triton path ran
    sa, sb = layers["ref"].stats(), layers["triton"].stats()
    assert sa["hit_rate"] == sb["hit_rate"] and sa["rebuilt_tokens"] == sb["rebuilt_tokens"]
