"""Torch reference implementations of the attention primitives (the truth for every kernel).

Dimension letters: B batch, S query length, T KV length, H query heads, Hkv KV heads,
G = H // Hkv, D head dim, K selected keys per (batch, KV head).
"""
from __future__ import annotations

from typing import Optional

import torch


def sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over a selected subset of keys, with its log-sum-exp.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, S, D]`` queries.
    k, v : torch.Tensor
        ``[B, Hkv, T, D]`` keys and values; H must be a multiple of Hkv (GQA).
    indices : torch.Tensor, optional
        ``[B, Hkv, K]`` int64 key positions selected per (batch, KV head), shared by the G
        query heads of the group and by all S queries. Entries ``< 0`` are padding and are
        ignored (ragged selections). ``None`` attends over all T keys (no causal mask).
    scale : float, optional
        Softmax scale; ``1/sqrt(D)`` when omitted.

    Returns
    -------
    out : torch.Tensor
        ``[B, H, S, D]`` in ``q.dtype``; rows with no valid key are 0.
    lse : torch.Tensor
        ``[B, H, S]`` float32 natural-log sum of exp(scores); ``-inf`` for rows with no key.
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    valid = None
    if indices is not None:
        valid = indices >= 0  # [B, Hkv, K]
        idx = indices.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, D)
        k = torch.gather(k, 2, idx)  # [B, Hkv, K, D]
        v = torch.gather(v, 2, idx)
    qg = q.float().reshape(B, Hkv, G * S, D)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [B, Hkv, G*S, T|K]
    if valid is not None:
        scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G*S]
    probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    probs = probs.nan_to_num(0.0)
    out = torch.matmul(probs, v.float())  # [B, Hkv, G*S, D]
    return out.reshape(B, H, S, D).to(q.dtype), lse.reshape(B, H, S)


def merge_states_ref(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets (max-shifted, overflow-safe).

    Parameters
    ----------
    out_a, out_b : torch.Tensor
        ``[..., D]`` partial outputs (each normalised over its own keys).
    lse_a, lse_b : torch.Tensor
        ``[...]`` their log-sum-exps; ``-inf`` means "no keys" and contributes nothing.

    Returns
    -------
    out : torch.Tensor
        ``[..., D]`` in ``out_a.dtype``, the attention over the union of both key sets.
    lse : torch.Tensor
        ``[...]`` float32.
    """
    lse_a = lse_a.float()
    lse_b = lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both empty: keep exp() finite
    wa = torch.exp(lse_a - m_safe)
    wb = torch.exp(lse_b - m_safe)
    denom = wa + wb
    lse = m_safe + torch.log(denom)
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    out = (out_a.float() * (wa / denom).unsqueeze(-1) + out_b.float() * (wb / denom).unsqueeze(-1)).to(out_a.dtype)
    return out, lse


def causal_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    q_offset: Optional[int] = None,
    window: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention where the S queries are the last S of the T keys.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, S, D]``.
    k, v : torch.Tensor
        ``[B, Hkv, T, D]``.
    scale : float, optional
        Softmax scale, ``1/sqrt(D)`` by default.
    q_offset : int, optional
        Key index of the first query (default ``T - S``).
    window : int, optional
        Sliding window: query i sees keys ``(i - window, i]`` only.

    Returns
    -------
    out : ``[B, H, S, D]``; lse : ``[B, H, S]`` float32.
    """
    B, H, S, D = q.shape
    T = k.shape[2]
    Hkv = k.shape[1]
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    off = T - S if q_offset is None else q_offset
    qi = torch.arange(S, device=q.device).unsqueeze(1) + off
    kj = torch.arange(T, device=q.device).unsqueeze(0)
    allowed = kj <= qi  # [S, T]
    if window is not None:
        allowed = allowed & (kj > qi - window)
    qg = q.float().reshape(B, Hkv, G, S, D)
    scores = torch.einsum("bhgsd,bhtd->bhgst", qg, k.float()) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgst,bhtd->bhgsd", probs, v.float())
    return out.reshape(B, H, S, D).to(q.dtype), lse.reshape(B, H, S)
