"""Speculative verification rules, in one place, written as the algorithm.

A proposer (the draft, or TriForce's middle level) has produced K tokens ``x_1..x_K``,
``x_i ~ q_i``; the verifier's forward over them gives ``p_1..p_{K+1}`` (``p_{K+1}`` is the
distribution after the last one). Both levels of TriForce use the same two rules:

- greedy: accept while ``x_i == argmax p_i``; the next token is ``argmax p`` at the first
  mismatch, or the bonus ``argmax p_{K+1}`` when all match;
- stochastic (Leviathan et al. 2023, Chen et al. 2023): accept ``x_i`` with probability
  ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection sample from the residual
  ``norm(max(0, p_i - q_i))``; when all are accepted sample the bonus from ``p_{K+1}``.
  Every emitted token is then distributed exactly as ``p`` given its prefix.

TriForce's official middle level samples from ``p_i`` instead of the residual on rejection,
which breaks that guarantee at temperature > 0 (``tests/speculative`` shows a chi-square
test catching it); here both levels call :func:`speculative_verify`.

Dimension letters: B batch, K proposed tokens, V vocabulary.
"""
from __future__ import annotations

from typing import Optional

import torch


def warp_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: Optional[int] = None
) -> torch.Tensor:
    """Sampling scores from logits: temperature, then top-k, then top-p (as transformers' warpers).

    Parameters
    ----------
    logits : torch.Tensor
        ``[..., V]`` raw logits.
    temperature : float
        Positive divisor of the logits (default 1.0).
    top_p : float
        Keep the smallest set of most likely tokens whose mass exceeds ``top_p`` (default 1.0: all).
    top_k : int, optional
        Keep the ``top_k`` most likely tokens (default ``None``: all).

    Returns
    -------
    torch.Tensor
        ``[..., V]`` float32 scores, ``-inf`` for removed tokens; ``softmax`` gives the distribution.

    Raises
    ------
    ValueError
        ``temperature <= 0``, ``top_p`` outside ``(0, 1]`` or ``top_k < 1``.
    """
    if not temperature > 0:
        raise ValueError(f"warp_logits requires temperature > 0 (got {temperature}); use the greedy rule for 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"warp_logits requires top_p in (0, 1] (got {top_p})")
    if top_k is not None and top_k < 1:
        raise ValueError(f"warp_logits requires top_k >= 1 or None (got {top_k})")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # transformers' TopPLogitsWarper: drop the ascending-sorted tokens whose cumulative mass is <= 1 - top_p,
        # always keeping the most likely one
        sorted_logits, order = logits.sort(dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[..., -1] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: Optional[int] = None
) -> torch.Tensor:
    """``softmax(warp_logits(...))``: the ``[..., V]`` float32 sampling distribution (see :func:`warp_logits`)."""
    return warp_logits(logits, temperature, top_p, top_k).softmax(-1)


def sample(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per distribution: ``probs [..., V]`` -> ``[...]`` int64."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p - q))`` over the last dim; rows where it vanishes (p == q) fall back to ``p``.

    Parameters
    ----------
    p, q : torch.Tensor
        ``[..., V]`` verifier and proposal distributions.
    """
    r = (p - q).clamp(min=0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp(min=torch.finfo(r.dtype).tiny), p)


def greedy_verify(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy rule: accept while the proposal equals the verifier's argmax.

    Parameters
    ----------
    draft_tokens : torch.Tensor
        ``[B, K]`` proposed tokens.
    target_logits : torch.Tensor
        ``[B, K+1, V]`` verifier logits (or probabilities) at each proposed position and after the last.

    Returns
    -------
    n_accepted : torch.Tensor
        ``[B]`` int64, accepted prefix length in ``[0, K]``.
    next_token : torch.Tensor
        ``[B]`` int64: the verifier's argmax at the first mismatch, or the bonus token.
    """
    best = target_logits.argmax(-1)  # [B, K+1]
    K = draft_tokens.shape[1]
    n = (draft_tokens == best[:, :K]).long().cumprod(-1).sum(-1)  # [B]
    return n, best.gather(1, n.unsqueeze(1)).squeeze(1)


def speculative_verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic rule: accept ``x_i`` w.p. ``min(1, p_i(x_i)/q_i(x_i))``, resample the rejection from the residual.

    Parameters
    ----------
    draft_tokens : torch.Tensor
        ``[B, K]`` proposed tokens, ``x_i ~ q_i`` given the previous ones.
    draft_probs : torch.Tensor
        ``[B, K, V]`` the proposal distributions ``q_i``.
    target_probs : torch.Tensor
        ``[B, K+1, V]`` the verifier distributions ``p_i`` (``p_{K+1}`` gives the bonus token).
    generator : torch.Generator, optional
        Source of the acceptance coins and samples, on the tensors' device.

    Returns
    -------
    n_accepted : torch.Tensor
        ``[B]`` int64 accepted prefix length in ``[0, K]``.
    next_token : torch.Tensor
        ``[B]`` int64: a residual sample at the first rejection, or the bonus sample from ``p_{K+1}``.
    """
    B, K = draft_tokens.shape
    p_x = target_probs[:, :K].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # [B, K]
    q_x = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # [B, K]
    r = torch.rand(B, K, generator=generator, device=draft_tokens.device)
    # p >= q: always accept; p < q: accept with probability p/q  (r < p/q  <=>  r*q < p, no division)
    accepted = r * q_x < p_x
    n = accepted.long().cumprod(-1).sum(-1)  # [B]
    # at index n: p_n - q_n on a rejection; with q_{K+1} := 0 the same formula gives the bonus from p_{K+1}
    q_pad = torch.cat([draft_probs, draft_probs.new_zeros(B, 1, draft_probs.shape[-1])], 1)  # [B, K+1, V]
    rows = torch.arange(B, device=n.device)
    nxt = sample(residual(target_probs[rows, n], q_pad[rows, n]), generator)
    return n, nxt


def commit_uniform(
    n_accepted: torch.Tensor, next_token: torch.Tensor, draft_tokens: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """Commit the same number of tokens for every sequence of a batch (caches roll back uniformly).

    Each sequence ran its own acceptance test. With ``m = min(n_accepted)`` every sequence
    commits ``x_1..x_m`` and one more token: its own residual/bonus token when it stopped at
    ``m``, else its accepted ``x_{m+1}``. Each committed token is the one the per-sequence
    rule emits at that position, and stopping early depends on the other sequences only, so
    every sequence stays distributed as the verifier's (or equal to its greedy output).

    Parameters
    ----------
    n_accepted, next_token : torch.Tensor
        ``[B]`` from :func:`greedy_verify` / :func:`speculative_verify`.
    draft_tokens : torch.Tensor
        ``[B, K]`` the proposed tokens.

    Returns
    -------
    m : int
        Accepted prefix length committed for every sequence.
    next_token : torch.Tensor
        ``[B]`` int64 token committed at position ``m + 1``.
    """
    m = int(n_accepted.min())
    if m == draft_tokens.shape[1]:
        return m, next_token
    return m, torch.where(n_accepted == m, next_token, draft_tokens[:, m])
