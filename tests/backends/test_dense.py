"""Dense attention: every path of ``grouped_attention`` equals the torch reference."""
from __future__ import annotations

import pytest
import torch

from longctx.backends.base import LayerContext
from longctx.backends.dense import SPLIT_MAX_QUERIES, DenseLayer, grouped_attention
from longctx.config import DenseConfig
from longctx.ops.reference import causal_attention_ref


@pytest.mark.parametrize(
    "S, T, window",
    [
        (1, 300, None),  # decode (ops dispatch)
        (300, 300, None),  # full causal prefill (SDPA causal)
        (7, 300, None),  # verification: cached keys + causal block, merged
        (SPLIT_MAX_QUERIES, SPLIT_MAX_QUERIES + 40, None),  # the split's largest S
        (SPLIT_MAX_QUERIES + 1, SPLIT_MAX_QUERIES + 41, None),  # SDPA with an explicit mask
        (7, 300, 64),  # sliding window (reference)
    ],
)
def test_grouped_attention_paths_match_the_reference(gen, S, T, window):
    q = torch.randn(2, 4, S, 16, generator=gen)
    k = torch.randn(2, 2, T, 16, generator=gen)
    v = torch.randn(2, 2, T, 16, generator=gen)
    out = grouped_attention(q, k, v, 0.3, T - S, window)
    ref, _ = causal_attention_ref(q, k, v, scale=0.3, q_offset=T - S, window=window)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_dense_layer_verification_equals_token_by_token_decoding(gen):
    ctx = LayerContext(num_heads=4, num_kv_heads=2, head_dim=16)
    q, k, v = (torch.randn(1, h, 200, 16, generator=gen) for h in (4, 2, 2))
    new_q, new_k, new_v = (torch.randn(1, h, 6, 16, generator=gen) for h in (4, 2, 2))
    pos = torch.arange(206).unsqueeze(0)
    block, single = DenseLayer(DenseConfig(), ctx), DenseLayer(DenseConfig(), ctx)
    block.prefill(q, k, v, pos[:, :200])
    single.prefill(q, k, v, pos[:, :200])
    out = block.decode(new_q, new_k, new_v, pos[:, 200:])
    steps = [single.decode(new_q[:, :, i : i + 1], new_k[:, :, i : i + 1], new_v[:, :, i : i + 1], pos[:, 200 + i : 201 + i])
             for i in range(6)]
    torch.testing.assert_close(out, torch.cat(steps, 2), atol=2e-5, rtol=2e-5)
    block.rollback(6)
    assert block.seq_length == 200
