"""Model adapters and pre-RoPE key recovery."""
from __future__ import annotations

import pytest
import torch

from longctx.models import RotaryHelper, get_adapter, layer_contexts
from tests.conftest import tiny_model

ROPE_VARIANTS = [
    None,
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "linear", "factor": 2.0},
]


def _capture_post_rope_keys(model, ids):
    """Run the first attention layer by hand and return (pre-RoPE k, post-RoPE k, positions)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    attn = inner.layers[0].self_attn
    h = inner.layers[0].input_layernorm(inner.embed_tokens(ids))
    B, S = ids.shape
    k_pre = attn.k_proj(h).view(B, S, -1, attn.head_dim).transpose(1, 2)
    pos = torch.arange(S).unsqueeze(0).expand(B, -1)
    cos, sin = inner.rotary_emb(h, pos)
    _, k_post = apply_rotary_pos_emb(k_pre, k_pre, cos, sin)
    return k_pre, k_post, pos


@pytest.mark.parametrize("rope", ROPE_VARIANTS, ids=lambda r: "default" if r is None else r["rope_type"])
def test_inverse_rope_is_exact(rope, gen):
    overrides = {} if rope is None else {"rope_scaling": rope}
    model = tiny_model("llama", **overrides)
    ids = torch.randint(3, 128, (2, 300), generator=gen)
    k_pre, k_post, pos = _capture_post_rope_keys(model, ids)
    helper = RotaryHelper(model.model.rotary_emb)
    torch.testing.assert_close(helper.invert(k_post, pos), k_pre, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(helper.apply(k_pre, pos), k_post, atol=1e-5, rtol=1e-5)


def test_partial_rotary_inverse(gen):
    model = tiny_model("phi3", partial_rotary_factor=0.5)
    helper = RotaryHelper(model.model.rotary_emb)
    x = torch.randn(1, 2, 50, 16, generator=gen)
    pos = torch.arange(50).unsqueeze(0)
    y = helper.apply(x, pos)
    assert torch.equal(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(helper.invert(y, pos), x, atol=1e-5, rtol=1e-5)


def test_layer_contexts_and_adapters():
    model = tiny_model("qwen3")
    ctxs = layer_contexts(model)
    assert len(ctxs) == 2 and ctxs[1].layer_idx == 1
    assert ctxs[0].num_heads == 4 and ctxs[0].num_kv_heads == 2 and ctxs[0].head_dim == 16
    assert get_adapter(model).qk_norm
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        get_adapter(type("C", (), {"model_type": "gpt2"})())
