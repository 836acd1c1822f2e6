"""TriForce: lossless greedy for every middle backend, lossless sampling (and the official bug caught), errors."""
from __future__ import annotations

import collections

import pytest
import torch

import longctx
from longctx.speculative import (
    TriForceStats,
    sample,
    speculative_verify,
    triforce_decoding,
    triforce_generate,
    warp_logits,
)
from longctx.speculative.triforce import Rules
from tests.conftest import tiny_model

# small sparse settings so that every middle backend really is sparse on a 160-token prompt
MIDDLE_OPTIONS = {
    "triforce_retrieval": dict(chunk_size=8, budget=32),
    "streaming": dict(sinks=4, window=24),
    "shadowkv": dict(sparse_budget=32, chunk_size=8, local_window=8),
    "hip": dict(k=32, block_size_q=8, sink=4, window=16, dense_layers=0),
}
MODELS = {  # name -> (model_type, overrides): MHA and GQA layouts, and Qwen3's QK-norm
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "qwen3-gqa": ("qwen3", dict(num_key_value_heads=2)),
}
DRAFT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16)


def _pair(name):
    model_type, kw = MODELS[name]
    return tiny_model(model_type, **kw), tiny_model(model_type, seed=1, **DRAFT)


@pytest.mark.parametrize("middle", longctx.list_backends())
@pytest.mark.parametrize("model", sorted(MODELS))
def test_greedy_equals_target_greedy_for_every_middle(gen, model, middle):
    target, draft = _pair(model)
    ids = torch.randint(3, 128, (1, 160), generator=gen)
    ref = target.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    out, stats = triforce_generate(target, draft, ids, 20, gamma=4, draft_gamma=2, middle=middle,
                                   middle_options=MIDDLE_OPTIONS.get(middle), draft_cache=dict(sinks=4, window=16))
    assert torch.equal(out, ref)
    assert stats.new_tokens == 20 and stats.committed == 19
    assert 0 <= stats.acceptance_middle <= 1 and 0 <= stats.acceptance_top <= 1
    assert target.config._attn_implementation != "longctx"  # the call patched and restored the model


def test_batch_left_padded_greedy_and_generate_integration(gen):
    target, draft = _pair("llama-gqa")
    lengths = (150, 131, 144)
    ids = torch.randint(3, 128, (3, 150), generator=gen)
    mask = torch.zeros(3, 150, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, 150 - n :] = 1
    ids[mask == 0] = 0
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    out, _ = triforce_generate(target, draft, ids, 16, attention_mask=mask, gamma=3, middle_options=dict(budget=32))
    assert torch.equal(out, ref)

    # model.generate(custom_generate=...) with an EOS the target emits mid-way: stops there, like generate
    one = ids[1:2, 150 - lengths[1] :]
    free = target.generate(one, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    eos = int(free[0, one.shape[1] + 6])
    ref = target.generate(one, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0)
    stats = TriForceStats()
    got = target.generate(one, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0,
                          custom_generate=triforce_decoding, draft_model=draft, triforce_stats=stats,
                          triforce_options=dict(gamma=4, middle_options=dict(budget=32)))
    assert torch.equal(got, ref) and got.shape[1] <= one.shape[1] + 7
    assert stats.new_tokens == got.shape[1] - one.shape[1]


def test_self_speculation_with_full_caches_accepts_everything(gen):
    target, _ = _pair("llama-gqa")
    ids = torch.randint(3, 128, (1, 64), generator=gen)
    out, st = triforce_generate(target, target, ids, 21, gamma=4, draft_gamma=2, middle="dense", draft_cache="dense")
    assert torch.equal(out, target.generate(ids, max_new_tokens=21, do_sample=False, eos_token_id=None, pad_token_id=0))
    assert st.acceptance_middle == 1.0 and st.acceptance_top == 1.0
    assert st.mean_accepted_length == 5.0 and st.target_forwards_per_token == pytest.approx(4 / 20)


# ------------------------------------------------------------------------------------ sampling
V = 6
SAMPLING = dict(temperature=0.9, top_p=0.95)


def _official_middle_rule(tokens, q, p, generator):
    """TriForce's official middle level: on rejection it samples from the middle's p, not the residual."""
    n, _ = speculative_verify(tokens, q, p, generator)
    return n, sample(p[torch.arange(tokens.shape[0]), n], generator)


def _target_distribution(target, prompt, n_tokens):
    """Exact probability of every first ``n_tokens`` continuation under the target's sampling."""
    dist = {(): 1.0}
    for step in range(n_tokens):
        prefixes = list(dist)
        done = torch.tensor(prefixes, dtype=torch.long).reshape(len(prefixes), step)
        ids = torch.cat([prompt.expand(len(prefixes), -1), done], 1)
        with torch.no_grad():
            probs = warp_logits(target(ids).logits[:, -1], SAMPLING["temperature"], SAMPLING["top_p"]).softmax(-1)
        dist = {pre + (t,): dist[pre] * float(probs[i, t]) for i, pre in enumerate(prefixes) for t in range(V)}
    return dist


def _chi_square_pvalue(samples, expected_probs):
    """Pearson chi-square of observed continuations vs exact probabilities (cells with < 5 expected pooled)."""
    N = len(samples)
    counts = collections.Counter(samples)
    obs, exp, pooled_o, pooled_e = [], [], 0, 0.0
    for cell, prob in expected_probs.items():
        if prob * N >= 5:
            obs.append(counts.get(cell, 0))
            exp.append(prob * N)
        else:
            pooled_o, pooled_e = pooled_o + counts.get(cell, 0), pooled_e + prob * N
    obs.append(pooled_o)
    exp.append(pooled_e)
    obs, exp = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    stat = float(((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum())
    dof = len(obs) - 1
    half = torch.tensor([dof / 2, stat / 2], dtype=torch.float64)
    return float(torch.special.gammaincc(half[0], half[1]))  # chi-square survival function


def test_sampling_distribution_equals_target_and_catches_official_middle_rule():
    """First 3 tokens of 4 generated (the 2nd and 3rd pass both levels: the 1st comes from the prefill, and
    the last token of a generation is drawn by the full target alone) of 3000 rows vs exact enumeration."""
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, initializer_range=0.3)
    target = tiny_model("llama", seed=0, **kw)
    draft = tiny_model("llama", seed=1, num_hidden_layers=1, **kw)
    prompt = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(0))
    expected = _target_distribution(target, prompt, 3)
    N = 3000

    def run(middle_rule, seed):
        g = torch.Generator().manual_seed(seed)
        rule = Rules.from_options(SAMPLING["temperature"], SAMPLING["top_p"], generator=g, middle_verify=middle_rule)
        out, stats = triforce_generate(target, draft, prompt.expand(N, -1), 4, gamma=2, draft_gamma=1,
                                       middle_options=dict(chunk_size=2, budget=4), draft_cache=dict(sinks=2, window=4),
                                       _rule=rule, **SAMPLING)
        assert 0.2 < stats.acceptance_middle < 0.9 and 0.2 < stats.acceptance_top < 0.95  # both levels reject often
        return [tuple(row) for row in out[:, 12:15].tolist()]

    assert _chi_square_pvalue(run(speculative_verify, 1), expected) > 1e-3
    assert _chi_square_pvalue(run(_official_middle_rule, 1), expected) < 1e-8


# ------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors(gen):
    target, draft = _pair("llama-gqa")
    ids = torch.randint(3, 128, (1, 40), generator=gen)
    other = tiny_model("llama", seed=2, vocab_size=100, **DRAFT)
    with pytest.raises(ValueError, match="share the target's vocabulary"):
        triforce_generate(target, other, ids, 4)
    with pytest.raises(ValueError, match="gamma >= 1"):
        triforce_generate(target, draft, ids, 4, gamma=0)
    with pytest.raises(ValueError, match="draft_gamma >= 1"):
        triforce_generate(target, draft, ids, 4, draft_gamma=0)
    with pytest.raises(ValueError, match="budget requires an int of at least one chunk"):
        triforce_generate(target, draft, ids, 4, middle_options=dict(chunk_size=8, budget=4))
    with pytest.raises(ValueError, match="backend requires one of"):
        triforce_generate(target, draft, ids, 4, middle="nope")
    with pytest.raises(ValueError, match="top_p in"):
        triforce_generate(target, draft, ids, 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="draft_model="):
        target.generate(ids, max_new_tokens=4, custom_generate=triforce_decoding)
    assert target.config._attn_implementation != "longctx"


# ------------------------------------------------------------------------------------ bundled models
@pytest.mark.slow
@pytest.mark.parametrize("middle,options", [("triforce_retrieval", dict(budget=1024)),
                                            ("triforce_retrieval", dict(budget=1024, retrieval_interval=1)),
                                            ("shadowkv", dict(sparse_budget=1024)), ("hip", None)])
def test_bundled_models_greedy_lossless_at_4k(middle, options):
    hub = pytest.importorskip("longctx.hub")
    try:
        target, tok = hub.load_tiny("tiny")
        draft, _ = hub.load_tiny("tiny-draft")
    except FileNotFoundError:
        pytest.skip("bundled models not installed")
    if middle not in longctx.list_backends():
        pytest.skip(f"{middle} not registered")
    from longctx.eval.bench_speculative import _prompt

    ids = _prompt(tok, "niah_multivalue", 4096, 0, 32)
    ref = target.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
    out, _ = triforce_generate(target, draft, ids, 32, middle=middle, middle_options=options,
                               eos_token_id=tok.eos_token_id)
    assert torch.equal(out, ref)
