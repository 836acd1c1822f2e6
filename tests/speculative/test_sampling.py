"""Verification rules: greedy and stochastic acceptance, residual, warpers, uniform batch commit."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from longctx.speculative import commit_uniform, greedy_verify, residual, sample, speculative_verify, warp_logits


def test_greedy_verify_prefix_and_bonus():
    V = 5
    logits = torch.full((3, 4, V), -1.0)
    best = torch.tensor([[1, 2, 3, 4], [1, 0, 3, 4], [4, 4, 4, 0]])
    logits.scatter_(-1, best.unsqueeze(-1), 1.0)
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 4, 4]])
    n, nxt = greedy_verify(draft, logits)
    assert n.tolist() == [3, 1, 0]
    assert nxt.tolist() == [4, 0, 4]  # bonus, argmax at the first mismatch, argmax at position 0
    n0, nxt0 = greedy_verify(draft[:, :0], logits[:, :1])  # nothing proposed: the verifier's own token
    assert n0.tolist() == [0, 0, 0] and nxt0.tolist() == [1, 1, 4]


def _chain(q, p_mid, p_top, middle_rule, N, gen):
    """One position through draft -> middle -> top with ``middle_rule`` at the middle level."""
    Q, M, T = (x.expand(N, 1, -1) for x in (q, p_mid, p_top))
    x = sample(Q[:, 0], gen).unsqueeze(1)  # [N, 1] draft token
    n, z = middle_rule(x, Q, torch.cat([M, M], 1), gen)
    y = torch.where(n == 1, x[:, 0], z).unsqueeze(1)  # the middle level's first token
    n2, z2 = speculative_verify(y, M, torch.cat([T, T], 1), gen)
    return torch.where(n2 == 1, y[:, 0], z2)


def _official_middle_rule(tokens, q, p, gen):
    """TriForce's official middle level: on rejection it samples from p, not from the residual."""
    n, _ = speculative_verify(tokens, q, p, gen)
    rows = torch.arange(tokens.shape[0])
    return n, sample(p[rows, n], gen)


def test_one_position_chain_matches_target_and_official_rule_does_not():
    # the worked example of ../shared/reference/shadowkv_triforce.md (TriForce section)
    q = torch.tensor([[0.7, 0.2, 0.1]])
    p_mid = torch.tensor([[0.3, 0.4, 0.3]])
    p_top = torch.tensor([[0.25, 0.45, 0.30]])
    N = 200_000
    gen = torch.Generator().manual_seed(0)
    ours = torch.bincount(_chain(q, p_mid, p_top, speculative_verify, N, gen), minlength=3) / N
    torch.testing.assert_close(ours, p_top[0], atol=5e-3, rtol=0)
    gen = torch.Generator().manual_seed(0)
    official = torch.bincount(_chain(q, p_mid, p_top, _official_middle_rule, N, gen), minlength=3) / N
    torch.testing.assert_close(official, torch.tensor([0.349, 0.431, 0.220]), atol=5e-3, rtol=0)


def test_speculative_verify_multi_token_is_exact(gen):
    # K = 2 proposals, fixed distributions: the first emitted token is distributed as p_1 and,
    # given an accepted first token, the second as p_2
    V, N = 4, 200_000
    q = torch.softmax(torch.randn(2, V, generator=gen) * 2, -1)
    p = torch.softmax(torch.randn(3, V, generator=gen) * 2, -1)
    x = torch.stack([sample(q[i].expand(N, V), gen) for i in range(2)], 1)
    n, z = speculative_verify(x, q.expand(N, 2, V), p.expand(N, 3, V), gen)
    first = torch.where(n >= 1, x[:, 0], z)
    torch.testing.assert_close(torch.bincount(first, minlength=V) / N, p[0], atol=5e-3, rtol=0)
    second = torch.where(n >= 2, x[:, 1], z)[n >= 1]
    torch.testing.assert_close(torch.bincount(second, minlength=V) / len(second), p[1], atol=6e-3, rtol=0)
    bonus = z[n == 2]
    torch.testing.assert_close(torch.bincount(bonus, minlength=V) / len(bonus), p[2], atol=1e-2, rtol=0)


def test_residual_normalises_and_falls_back_when_equal():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.2, 0.6, 0.2], [0.2, 0.3, 0.5]])
    r = residual(p, q)
    torch.testing.assert_close(r[0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(r[1], p[1])


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, 1.0), (1.0, 5, 1.0), (1.3, None, 0.8), (0.5, 10, 0.9)])
def test_warp_logits_matches_transformers(gen, temperature, top_k, top_p):
    logits = torch.randn(3, 50, generator=gen) * 3
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    torch.testing.assert_close(warp_logits(logits, temperature, top_p, top_k).softmax(-1), ref.softmax(-1))
    with pytest.raises(ValueError, match="temperature > 0"):
        warp_logits(logits, 0.0)
    with pytest.raises(ValueError, match="top_p in"):
        warp_logits(logits, 1.0, top_p=1.5)


def test_commit_uniform_takes_the_batch_minimum():
    draft = torch.tensor([[5, 6, 7], [5, 8, 9], [1, 2, 3]])
    n = torch.tensor([3, 1, 2])
    nxt = torch.tensor([40, 41, 42])
    m, z = commit_uniform(n, nxt, draft)
    assert m == 1
    assert z.tolist() == [6, 41, 2]  # accepted x_2, own residual token, accepted x_2
    m, z = commit_uniform(torch.tensor([3, 3, 3]), nxt, draft)
    assert m == 3 and z.tolist() == [40, 41, 42]
