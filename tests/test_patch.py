"""Patching: dense under patch() equals unpatched generate for every supported model type."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import longctx
from tests.conftest import tiny_model

MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


def _left_padded_batch(gen, vocab=128, lengths=(16, 11, 14)):
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=gen)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_dense_generate_equals_unpatched(saved_models, model_type, gen):
    model = AutoModelForCausalLM.from_pretrained(saved_models[model_type], dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (1, 24), generator=gen)
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with longctx.patch(model, "dense") as handle:
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert handle.memory()["device"] > 0
    assert torch.equal(ref, out)

    ids3, mask3 = _left_padded_batch(gen)
    ref3 = model.generate(ids3, attention_mask=mask3, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with longctx.patch(model, "dense"):
        out3 = model.generate(ids3, attention_mask=mask3, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ref3, out3)

    # after unpatch the model is exactly the original again
    again = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ref, again)
    assert model.config._attn_implementation != "longctx"
    assert "generate" not in vars(model)


def test_forward_logits_match_and_sampling(gen):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 20), generator=gen)
    ref = model(ids).logits
    with longctx.patch(model, "dense"):
        got = model(ids, use_cache=False).logits
        torch.manual_seed(7)
        sampled = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0,
                                 return_dict_in_generate=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.manual_seed(7)
    ref_sampled = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0,
                                 return_dict_in_generate=True)
    assert torch.equal(sampled.sequences, ref_sampled.sequences)
    assert isinstance(sampled.past_key_values if hasattr(sampled, "past_key_values") else sampled.cache,
                      longctx.LongCtxCache)


def test_handle_is_idempotent_and_rejects_double_patch():
    model = tiny_model("llama")
    handle = longctx.patch(model, "dense")
    with pytest.raises(ValueError, match="already patched"):
        longctx.patch(model, "dense")
    handle.unpatch()
    handle.unpatch()
    with pytest.raises(RuntimeError, match="active patch"):
        handle.new_cache()


def test_bad_input_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="backend requires one of"):
        longctx.patch(model, "nope")
    with pytest.raises(ValueError, match="unknown option"):
        longctx.patch(model, "dense", budget=3)
    with pytest.raises(TypeError, match="backend requires"):
        longctx.patch(model, 3)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="not supported.*llama"):
        longctx.patch(gpt2, "dense")
    assert "dense" in longctx.list_backends()


def test_config_instance_and_options():
    model = tiny_model("llama")
    with longctx.patch(model, longctx.DenseConfig(offload=True)) as handle:
        model.generate(torch.randint(3, 128, (1, 10)), max_new_tokens=3, do_sample=False, pad_token_id=0)
        mem = handle.memory()
        assert mem["host"] > 0 and mem["device"] == 0
    with pytest.raises(ValueError, match="requires a bool"):
        longctx.DenseConfig.from_options({"offload": "maybe"})
    assert longctx.DenseConfig.from_options({"offload": "true"}).offload is True


def test_rollback_through_cache(gen):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 12), generator=gen)
    with longctx.patch(model, "dense") as handle:
        cache = handle.new_cache()
        full = model(torch.cat([ids, ids[:, :4]], 1), past_key_values=cache).logits
        assert cache.get_seq_length() == 16
        cache2 = handle.new_cache()
        model(ids, past_key_values=cache2)
        model(ids[:, :4], past_key_values=cache2)
        cache2.rollback(4)
        assert cache2.get_seq_length() == 12
        step = model(ids[:, :4], past_key_values=cache2).logits
    torch.testing.assert_close(step, full[:, 12:], atol=1e-5, rtol=1e-5)
