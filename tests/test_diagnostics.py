"""Diagnostics: dense vs itself is exact; a lossy window backend shows errors and partial recall."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from longctx.backends import register_backend
from longctx.backends.dense import DenseLayer, grouped_attention
from longctx.config import BackendConfig
from longctx.diagnostics import compare_backend, compare_backends, format_report, recall_metrics
from tests.conftest import tiny_model


@dataclasses.dataclass
class _WindowConfig(BackendConfig):
    window: int = 8
    offload: bool = False


@register_backend("_test_window", _WindowConfig, "test only: attends the last `window` keys")
class _WindowLayer(DenseLayer):
    """Attends only the most recent ``window`` keys (a deliberately lossy backend)."""

    def _window_attend(self, q):
        k, v = self.kv.keys(), self.kv.values()
        T, S = k.shape[2], q.shape[2]
        out = grouped_attention(q, k, v, self.ctx.scale, T - S, window=self.config.window)
        if self.record_attended:
            qi = torch.arange(S).unsqueeze(1) + (T - S)
            kj = torch.arange(T).unsqueeze(0)
            mask = (kj <= qi) & (kj > qi - self.config.window)
            self.attended = mask.expand(q.shape[0], q.shape[1], S, T)
        return out

    def prefill(self, q, k, v, positions):
        super().prefill(q, k, v, positions)
        return self._window_attend(q)

    def decode(self, q, k, v, positions):
        self.kv.append(k, v)
        self._steps += 1
        return self._window_attend(q)


def test_dense_against_itself_is_exact(gen):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 40), generator=gen)
    rep = compare_backend(model, ids, "dense", decode_steps=4)
    assert rep["summary"]["mean_rel_err"] < 1e-6
    assert rep["summary"]["mean_key_recall"] == 1.0
    assert rep["summary"]["mean_kl"] < 1e-8
    assert rep["summary"]["argmax_agreement"] == 1.0
    assert len(rep["per_layer"]) == 2 and len(rep["per_step"]) == 5


def test_lossy_backend_is_detected(gen):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 60), generator=gen)
    rep = compare_backend(model, ids, "_test_window", {"window": 8}, decode_steps=3, top_k=16)
    s = rep["summary"]
    assert s["mean_rel_err"] > 1e-3
    assert 0.0 < s["mean_key_recall"] < 1.0
    assert 0.0 < s["mean_mass_recall"] < 1.0
    assert s["mean_kl"] > 0
    assert "| _test_window | 0 |" in format_report([rep])


def test_recall_metrics_by_hand():
    probs = torch.tensor([[[[0.5, 0.3, 0.2, 0.0]]]])
    att = torch.tensor([[[[True, False, True, False]]]])
    kr, mr = recall_metrics(probs, att, top_k=2)
    assert kr == pytest.approx(0.5) and mr == pytest.approx(0.7)
    assert recall_metrics(probs, None, 2) == (1.0, 1.0)


def test_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"input_ids requires shape \[1, T\]"):
        compare_backend(model, torch.zeros(2, 5, dtype=torch.long), "dense")


def test_compare_backends_takes_one_backend_with_two_settings(gen):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 40), generator=gen)
    reps = compare_backends(model, ids, ["_test_window:window=4", "_test_window:window=64"], decode_steps=2)
    assert [r["backend"] for r in reps] == ["_test_window:window=4", "_test_window:window=64"]
    assert reps[0]["summary"]["mean_rel_err"] > 1e-3  # 4 of 40 keys: lossy
    assert reps[1]["summary"]["mean_rel_err"] < 1e-5  # the window covers the prompt: exact
    with pytest.raises(ValueError, match=r"each entry once \(got \['_test_window'\]"):
        compare_backends(model, ids, ["_test_window", "dense", "_test_window"], decode_steps=1)
    with pytest.raises(ValueError, match="backend entry _test_window: requires key=value items"):
        compare_backends(model, ids, ["_test_window:window"], decode_steps=1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_capture_attention_matches_eager_attention(gen, arch):
    """The captured q/k give the attention probabilities transformers' eager attention computes, and the
    tokens are the greedy continuation."""
    from longctx.diagnostics import capture_attention

    model = tiny_model(arch)
    ids = torch.randint(3, 128, (1, 30), generator=gen)
    cap = capture_attention(model, ids, new_tokens=4, prompt_queries=5)
    want = model.generate(ids, max_new_tokens=4, do_sample=False)[:, 30:]
    assert torch.equal(cap.tokens, want)
    assert cap.query_positions.tolist() == list(range(25, 33))
    full = torch.cat([ids, cap.tokens[:, :3]], dim=1)  # prompt + the fed-back tokens
    model.set_attn_implementation("eager")
    try:
        eager = model(full, output_attentions=True).attentions  # per layer [B, H, T, T]
    finally:
        model.set_attn_implementation("sdpa")
    assert len(cap.keys) == len(eager) and cap.keys[0].shape[2] == 33
    for layer, att in enumerate(eager):
        torch.testing.assert_close(cap.probs(layer), att[:, :, 25:33].float(), atol=1e-5, rtol=1e-4)
    every = capture_attention(model, ids, new_tokens=1, prompt_queries=None)
    assert every.queries[0].shape[2] == 30 and every.query_positions.tolist() == list(range(30))
    for bad, what in [(dict(new_tokens=0), "new_tokens requires"), (dict(prompt_queries=0), "prompt_queries requires")]:
        with pytest.raises(ValueError, match=what):
            capture_attention(model, ids, **bad)


def test_compare_backends_rejects_options_for_a_backend_not_compared(gen):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 40), generator=gen)
    with pytest.raises(ValueError, match="targets backend 'shadowkv', which is not among"):
        compare_backends(model, ids, ["dense"], options={"shadowkv.sparse_budget": 64}, decode_steps=1)
