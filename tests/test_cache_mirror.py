"""``LongCtxCache.mirror_prefill``: one prompt forward builds a second cache of the same model."""
from __future__ import annotations

import pytest
import torch

import longctx
from longctx.compat import CACHE_KWARG
from longctx.speculative.triforce import build_cache
from tests.conftest import tiny_model

# sparse on a 160-token prompt; HiP's k covers the prompt so that its own prefill is exact too
OPTIONS = {
    "triforce_retrieval": dict(chunk_size=8, budget=32),
    "streaming": dict(sinks=4, window=24),
    "shadowkv": dict(sparse_budget=32, chunk_size=8, local_window=8),
    "hip": dict(k=256, block_size_q=8, sink=4, window=16, dense_layers=0),
    "retrieval": dict(n_sink=4, window=16, top_k=16),
}


def _step(model, cache, ids, start):
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    return model(input_ids=ids, position_ids=pos, **{CACHE_KWARG: cache}, use_cache=True).logits


@pytest.mark.parametrize("backend", [b for b in longctx.list_backends() if not b.startswith("_")])  # no test-only ones
def test_mirrored_cache_decodes_as_its_own_prefill(gen, backend):
    model = tiny_model("llama")
    prompt = torch.randint(3, 128, (1, 160), generator=gen)
    nxt = torch.randint(3, 128, (1, 3), generator=gen)
    with longctx.patch(model, "dense") as handle:
        own = build_cache(handle, backend, OPTIONS.get(backend))
        _step(model, own, prompt, 0)
        ref = _step(model, own, nxt, 160)

        top, mirrored = build_cache(handle, "dense"), build_cache(handle, backend, OPTIONS.get(backend))
        with top.mirror_prefill(mirrored):
            _step(model, top, prompt, 0)
        assert mirrored.get_seq_length() == 160
        assert all(layer.mirror is None for layer in top.layers)  # the link ends with the block
        out = _step(model, mirrored, nxt, 160)
        mirrored.rollback(3)  # the mirrored prompt is the cache's prompt: generated tokens roll back
        again = _step(model, mirrored, nxt, 160)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, out, rtol=1e-4, atol=1e-5)


def test_mirror_prefill_rejects_a_filled_or_mismatched_cache(gen):
    model = tiny_model("llama")
    prompt = torch.randint(3, 128, (1, 40), generator=gen)
    with longctx.patch(model, "dense") as handle:
        top, other = build_cache(handle, "dense"), build_cache(handle, "dense")
        _step(model, other, prompt, 0)
        with pytest.raises(ValueError, match="requires an empty cache"):
            with top.mirror_prefill(other):
                pass
        with pytest.raises(RuntimeError, match="covers one prefill forward"):
            with other.mirror_prefill(build_cache(handle, "dense")):
                _step(model, other, prompt[:, :5], 40)  # a second chunk would not reach the mirror
        short = longctx.cache.LongCtxCache(lambda ctx: None, handle.contexts[:1])
        with pytest.raises(ValueError, match="requires a cache with 2 layers"):
            with top.mirror_prefill(short):
                pass
