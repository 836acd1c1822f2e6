"""ShadowKV landmark scoring: Triton kernels, launcher (+ top-k) and reference.

For every (batch, KV head), the G·S queries of the group score the N chunk landmarks;
each query row is softmax-normalised over the chunks, and a chunk's score is the max over
the rows. The top-k chunks are then picked with ``torch.topk``.

Two kernels, no ``[G·S, N]`` round trip through a Python softmax:

1. ``_landmark_logits_kernel`` (grid: rows × chunk blocks): one GEMM tile ``q · Lᵀ`` per
   block, plus the bias, written to a small fp32 scratch; per-block row max and sum of
   exp are written as partial softmax states.
2. ``_landmark_probmax_kernel`` (same grid): merges the partial states into each row's
   log-sum-exp, normalises the block and takes the max over the rows.

Dimension letters: B batch, S queries, H query heads, Hkv KV heads, G = H // Hkv, D head
dim, N chunks, K selected chunks.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before this module
is imported).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from longctx.backends.shadowkv import landmark_scores as landmark_scores_ref


@triton.jit
def _landmark_logits_kernel(
    Q, L, Bias, Logits, PartMax, PartSum,
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_lb, stride_lh, stride_ln, stride_ld,
    stride_bb, stride_bh, stride_bn,
    stride_gr, stride_gm, stride_gn,
    stride_pr, stride_pm, stride_pk,
    num_kv_heads, S, N,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # grid: (B*Hkv rows, chunk blocks)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_r // num_kv_heads).to(tl.int64)
    hkv = (pid_r % num_kv_heads).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)  # query row m of the group = (head hkv*G + m // S, query m % S)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < G * S
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM
    head = hkv * G + offs_m // S
    pos = offs_m % S

    q = tl.load(
        Q + b * stride_qb + head[:, None] * stride_qh + pos[:, None] * stride_qs + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    ).to(tl.float32)
    lm = tl.load(
        L + b * stride_lb + hkv * stride_lh + offs_n[:, None].to(tl.int64) * stride_ln + offs_d[None, :] * stride_ld,
        mask=mask_n[:, None] & mask_d[None, :], other=0.0,
    ).to(tl.float32)
    # fp32 "ieee" dot: the scores decide the selection, so they must match the reference
    logits = tl.dot(q, tl.trans(lm), input_precision="ieee") * sm_scale  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        bias = tl.load(Bias + b * stride_bb + hkv * stride_bh + offs_n * stride_bn, mask=mask_n, other=0.0)
        logits += bias[None, :]
    logits = tl.where(mask_n[None, :], logits, float("-inf"))
    tl.store(
        Logits + pid_r * stride_gr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
        logits, mask=mask_m[:, None] & mask_n[None, :],
    )
    # -- partial softmax state of this block (a block of removed chunks keeps max = -inf, sum = 0)
    m_blk = tl.max(logits, 1)
    m_shift = tl.where(m_blk == float("-inf"), 0.0, m_blk)
    l_blk = tl.sum(tl.exp(logits - m_shift[:, None]), 1)
    tl.store(PartMax + pid_r * stride_pr + offs_m * stride_pm + pid_n * stride_pk, m_blk, mask=mask_m)
    tl.store(PartSum + pid_r * stride_pr + offs_m * stride_pm + pid_n * stride_pk, l_blk, mask=mask_m)


@triton.jit
def _landmark_probmax_kernel(
    Logits, PartMax, PartSum, Out,
    stride_gr, stride_gm, stride_gn,
    stride_pr, stride_pm, stride_pk,
    stride_or, stride_on,
    GS, N, NB,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_NB: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_NB)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < GS
    mask_k = offs_k < NB
    mask_n = offs_n < N
    # -- merge the partial states into each row's log-sum-exp
    p_ptrs = pid_r * stride_pr + offs_m[:, None] * stride_pm + offs_k[None, :] * stride_pk
    pm = tl.load(PartMax + p_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=float("-inf"))
    ps = tl.load(PartSum + p_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    m = tl.max(pm, 1)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(ps * tl.exp(pm - m_shift[:, None]), 1)
    lse = tl.where(denom > 0.0, m_shift + tl.log(tl.where(denom > 0.0, denom, 1.0)), 0.0)  # no chunk: probs 0
    # -- normalise this block and take the max over the group's rows
    logits = tl.load(
        Logits + pid_r * stride_gr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
        mask=mask_m[:, None] & mask_n[None, :], other=float("-inf"),
    )
    probs = tl.exp(logits - lse[:, None])
    score = tl.max(probs, 0)
    tl.store(Out + pid_r * stride_or + offs_n * stride_on, score, mask=mask_n)


def _interpreting() -> bool:
    """Whether the kernels were decorated under ``TRITON_INTERPRET=1`` (run on CPU tensors)."""
    return type(_landmark_logits_kernel).__name__ == "InterpretedFunction"


def landmark_scores_triton(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: float,
    *,
    block_n: int = 128,
) -> torch.Tensor:
    """Chunk scores, same semantics as :func:`landmark_scores_ref`.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, S, D]`` queries.
    landmarks : torch.Tensor
        ``[B, Hkv, N, D]`` chunk landmarks (any float dtype; scored in fp32).
    bias : torch.Tensor, optional
        ``[B, Hkv, N]`` float32 added to the logits (``-inf`` removes a chunk).
    scale : float
        Softmax scale.
    block_n : int, default 128
        Chunks per program (a power of two >= 16).

    Returns
    -------
    torch.Tensor
        ``[B, Hkv, N]`` float32.

    Raises
    ------
    ValueError
        Mismatched shapes or a bad ``block_n``.
    RuntimeError
        CPU tensors without ``TRITON_INTERPRET=1``.
    """
    B, H, S, D = q.shape
    if landmarks.dim() != 4 or landmarks.shape[0] != B or landmarks.shape[3] != D or H % landmarks.shape[1]:
        raise ValueError(
            f"landmark_scores: landmarks requires [B={B}, Hkv | H={H}, N, D={D}] (got {tuple(landmarks.shape)})"
        )
    Hkv, N = landmarks.shape[1], landmarks.shape[2]
    if bias is not None and bias.shape != (B, Hkv, N):
        raise ValueError(f"landmark_scores: bias requires shape {(B, Hkv, N)} (got {tuple(bias.shape)})")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"landmark_scores: block_n requires a power of two >= 16 (got {block_n})")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"landmark_scores_triton requires CUDA tensors, or TRITON_INTERPRET=1 set before import (got {q.device})"
        )
    G = H // Hkv
    GS = G * S
    rows = B * Hkv
    nb = triton.cdiv(N, block_n)
    logits = torch.empty(rows, GS, N, dtype=torch.float32, device=q.device)
    part_max = torch.empty(rows, GS, nb, dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    out = torch.empty(B, Hkv, N, dtype=torch.float32, device=q.device)
    block_m = max(16, triton.next_power_of_2(GS))
    block_d = max(16, triton.next_power_of_2(D))
    bias_t = bias if bias is not None else out  # a valid pointer; never read
    grid = (rows, nb)
    _landmark_logits_kernel[grid](
        q, landmarks, bias_t, logits, part_max, part_sum,
        float(scale),
        *q.stride(), *landmarks.stride(), *bias_t.stride(),
        *logits.stride(), *part_max.stride(),
        Hkv, S, N,
        G=G, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HAS_BIAS=bias is not None,
    )
    out_rows = out.view(rows, N)
    _landmark_probmax_kernel[grid](
        logits, part_max, part_sum, out_rows,
        *logits.stride(), *part_max.stride(), *out_rows.stride(),
        GS, N, nb,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_NB=max(16, triton.next_power_of_2(nb)),
    )
    return out


def landmark_topk_triton(
    q: torch.Tensor, landmarks: torch.Tensor, bias: Optional[torch.Tensor], scale: float, k: int
) -> torch.Tensor:
    """Top-``k`` chunk ids per (batch, KV head), ``[B, Hkv, k]`` int64 (unsorted)."""
    return landmark_scores_triton(q, landmarks, bias, scale).topk(k, dim=-1, sorted=False).indices


def landmark_topk_ref(
    q: torch.Tensor, landmarks: torch.Tensor, bias: Optional[torch.Tensor], scale: float, k: int
) -> torch.Tensor:
    """Reference of :func:`landmark_topk_triton`."""
    return landmark_scores_ref(q, landmarks, bias, scale).topk(k, dim=-1, sorted=False).indices


__all__ = ["landmark_scores_triton", "landmark_scores_ref", "landmark_topk_triton", "landmark_topk_ref"]
