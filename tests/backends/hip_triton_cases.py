"""HiP Triton kernels under TRITON_INTERPRET=1 (run by tests/backends/test_hip.py in a subprocess).

Not collected by default (the file name does not start with ``test_``): Triton must see
``TRITON_INTERPRET=1`` before ``triton.language`` is first imported. Run directly with:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/backends/hip_triton_cases.py
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("requires TRITON_INTERPRET=1 set before start (or a CUDA device)", allow_module_level=True)

from longctx.backends import LayerContext, make_layer  # noqa: E402
from longctx.config import HiPConfig  # noqa: E402
from longctx.triton_kernels.hip_attention import hip_attention_ref, hip_attention_triton  # noqa: E402
from longctx.triton_kernels.hip_mask import hip_mask_ref, hip_mask_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    # (B, H, Hkv, D, S, T, config): prefill, decode step, decode chunk; shared and per-head masks, strides
    (1, 4, 2, 16, 96, 96, HiPConfig(k=16, block_size_q=16, sink=4, window=16, dense_layers=0)),
    (1, 4, 2, 16, 1, 200, HiPConfig(k=16, block_size_q=16, sink=4, window=16, dense_layers=0)),
    (2, 4, 1, 24, 3, 160, HiPConfig(k=18, block_size_q=4, block_size_k=3, block_stride_k=2, sink=6, window=30,
                                    gqa_shared_mask=False, dense_layers=0)),
]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(4321)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_mask_and_attention_kernels_match_reference(gen, case):
    B, H, Hkv, D, S, T, cfg = CASES[case]
    q = (torch.randn(B, H, S, D, generator=gen) * D**-0.5).to(DEVICE)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(DEVICE)
    v = torch.randn(B, Hkv, T, D, generator=gen).to(DEVICE)
    want = hip_mask_ref(q, k, T - S, cfg)
    got = hip_mask_triton(q, k, T - S, cfg)
    assert torch.equal(got.blocks, want.blocks) and torch.equal(got.reads, want.reads)
    assert torch.equal(got.local_start, want.local_start)
    out, lse = hip_attention_triton(q, k, v, want.blocks, want.local_start, T - S, cfg)
    ref_out, ref_lse = hip_attention_ref(q, k, v, want.blocks, want.local_start, T - S, cfg)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


def test_backend_triton_path_matches_reference_path(gen, monkeypatch):
    """The layer end to end (sparse prefill, refresh and reuse at decode) on either path."""
    ctx = LayerContext(num_heads=4, num_kv_heads=2, head_dim=16)
    q = torch.randn(1, 4, 84, 16, generator=gen).to(DEVICE)
    k = torch.randn(1, 2, 84, 16, generator=gen).to(DEVICE)
    v = torch.randn(1, 2, 84, 16, generator=gen).to(DEVICE)
    outs = {}
    for impl in ("ref", "triton"):
        monkeypatch.setenv("LONGCTX_OPS", impl)
        layer = make_layer("hip", ctx, k=8, block_size_q=16, sink=4, window=8, dense_layers=0, refresh_interval=2)
        o = [layer.prefill(q[:, :, :80], k[:, :, :80], v[:, :, :80], None)]
        o += [layer.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], None) for t in range(80, 84)]
        outs[impl] = torch.cat(o, dim=2)
        assert layer.stats()["mask_refreshes"] == 2  # prefill, then decode step 3
    torch.testing.assert_close(outs["triton"], outs["ref"], atol=2e-5, rtol=1e-4)
