"""Sparse (gathered) attention with its log-sum-exp: Triton kernel, launcher and reference.

Every query row of a GQA group attends over the keys selected for its (batch, KV head):
``indices[b, hkv, :]`` (entries ``< 0`` are padding), or over all T keys when no indices
are given. The kernel gathers the selected K/V rows block by block and runs a max-shifted
online softmax (FlashAttention-2 style), so no [S, K] score matrix is materialised and no
gathered copy of K/V is made. Long key sets are split across programs (flash-decoding)
and the partial states are merged by log-sum-exp.

Dimension letters: B batch, S query length, T KV length, H query heads, Hkv KV heads,
G = H // Hkv, D head dim, K selected keys per (batch, KV head).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before this module
is imported: Triton decides between compiling and interpreting when the kernel is decorated).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from longctx.ops.reference import sparse_attention_ref


@triton.jit
def _sparse_attention_kernel(
    Q, K, V, Idx, Out, Lse,
    sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ib, stride_ih, stride_ik,
    stride_ox, stride_ob, stride_oh, stride_os, stride_od,
    stride_lx, stride_lb, stride_lh, stride_ls,
    num_kv_heads, S, n_keys, keys_per_split,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_INDICES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # grid: (query-row blocks of the G*S rows of one group, B*Hkv, key splits)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_x = tl.program_id(2)
    # int64 base offsets: B*Hkv*T*D overflows int32 at long contexts
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hkv = (pid_bh % num_kv_heads).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r of the group = (head hkv*G + r // S, query r % S)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < G * S
    mask_d = offs_d < HEAD_DIM  # D that is not a power of two is padded with zeros
    head = hkv * G + offs_m // S
    pos = offs_m % S

    # load q: it stays in registers for the whole key loop
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + pos[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln(2)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    lo = pid_x * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    for start in range(lo, hi, BLOCK_N):
        offs = start + offs_n
        in_range = offs < hi
        if HAS_INDICES:
            key = tl.load(Idx + b * stride_ib + hkv * stride_ih + offs * stride_ik, mask=in_range, other=-1)
            valid = key >= 0  # negative entries are ragged padding
            key = tl.where(valid, key, 0).to(tl.int64)
        else:
            valid = in_range
            key = offs.to(tl.int64)
        kv_mask = valid[:, None] & mask_d[None, :]
        # -- gather K rows and score them
        k = tl.load(k_base + key[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(valid[None, :], qk, float("-inf"))
        # -- update m_i and l_i (a row that has seen no key keeps m_i = -inf; shift by 0 then)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(qk - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- gather V rows and accumulate
        v = tl.load(v_base + key[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptrs = (Out + pid_x * stride_ox + b * stride_ob + head[:, None] * stride_oh + pos[:, None] * stride_os
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(Lse + pid_x * stride_lx + b * stride_lb + head * stride_lh + pos * stride_ls, lse, mask=mask_m)


def _interpreting() -> bool:
    """Whether the kernel was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return type(_sparse_attention_kernel).__name__ == "InterpretedFunction"


def _default_num_splits(device: torch.device, n_programs: int, n_keys: int, block_n: int) -> int:
    """Split the key loop so that short grids (decode: B*Hkv programs) still fill the GPU."""
    if device.type != "cuda" or n_keys <= 0:
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = triton.cdiv(target, max(n_programs, 1))
    # keep at least 4 key blocks per split, else the merge costs more than it saves
    return max(1, min(splits, triton.cdiv(n_keys, 4 * block_n)))


def _combine_splits(out_parts: torch.Tensor, lse_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split states by log-sum-exp. out_parts: [X, B, H, S, D], lse_parts: [X, B, H, S]."""
    m = lse_parts.amax(0)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # all splits empty: keep exp() finite
    w = torch.exp(lse_parts - m)  # [X, B, H, S]
    denom = w.sum(0)
    lse = m + torch.log(denom)
    out = (out_parts * w.unsqueeze(-1)).sum(0) / torch.where(denom == 0, torch.ones_like(denom), denom).unsqueeze(-1)
    return out, lse


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    *,
    num_splits: Optional[int] = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over the keys selected per (batch, KV head), with its LSE.

    Same semantics as :func:`sparse_attention_ref`.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, S, D]`` queries (fp32/fp16/bf16).
    k, v : torch.Tensor
        ``[B, Hkv, T, D]`` keys and values, same dtype as ``q``; H must be a multiple of Hkv.
    indices : torch.Tensor, optional
        ``[B, Hkv, K]`` int64/int32 key positions shared by the G query heads of a group;
        entries ``< 0`` are ignored. If not provided, all T keys are attended.
    scale : float, optional
        Softmax scale; if not provided, ``1/sqrt(D)``.
    num_splits : int, optional
        Programs per (row block, batch, KV head) along the keys (flash-decoding). If not
        provided: enough to fill the GPU, 1 under the interpreter.
    check : bool, default True
        Validate the inputs (costs a host sync for the index range check); the
        :func:`longctx.ops.sparse_attention` dispatcher validates once and passes False.

    Returns
    -------
    out : torch.Tensor
        ``[B, H, S, D]`` in ``q.dtype``; rows with no valid key are 0.
    lse : torch.Tensor
        ``[B, H, S]`` float32 natural-log sum of exp(scores); ``-inf`` where no key was valid.

    Raises
    ------
    TypeError, ValueError
        Bad dtypes or shapes (see :func:`longctx.ops.sparse_attention`).
    RuntimeError
        CPU tensors without ``TRITON_INTERPRET=1``.
    """
    if check:
        from longctx.ops import _check_attention_inputs

        _check_attention_inputs(q, k, v, indices, scale)
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"sparse_attention_triton requires CUDA tensors, or TRITON_INTERPRET=1 set before import "
            f"(got device {q.device})"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"sparse_attention_triton requires q, k, v of one dtype (got {q.dtype}, {k.dtype}, {v.dtype})")
    B, H, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    n_keys = T if indices is None else indices.shape[2]

    BLOCK_D = max(16, triton.next_power_of_2(D))  # tl.dot needs >= 16 along every dim
    BLOCK_M = min(64, max(16, triton.next_power_of_2(G * S)))
    BLOCK_N = 32 if BLOCK_D >= 128 and BLOCK_M >= 64 else 64  # bounds the [BLOCK_M, BLOCK_D] + [BLOCK_N, BLOCK_D] tiles
    m_blocks = triton.cdiv(G * S, BLOCK_M)
    if num_splits is None:
        num_splits = 1 if _interpreting() else _default_num_splits(q.device, m_blocks * B * Hkv, n_keys, BLOCK_N)
    if num_splits < 1:
        raise ValueError(f"sparse_attention_triton: num_splits requires >= 1 (got {num_splits})")
    keys_per_split = triton.cdiv(triton.cdiv(max(n_keys, 1), num_splits), BLOCK_N) * BLOCK_N

    if num_splits == 1:
        out = torch.empty((1, B, H, S, D), device=q.device, dtype=q.dtype)
    else:  # fp32 partials, merged below
        out = torch.empty((num_splits, B, H, S, D), device=q.device, dtype=torch.float32)
    lse = torch.empty((num_splits, B, H, S), device=q.device, dtype=torch.float32)
    if out.numel() == 0:  # no query rows: nothing to launch
        return out[0], lse[0]
    if indices is None:
        idx, idx_strides = q, (0, 0, 0)  # dummy pointer, never read (HAS_INDICES=False)
    else:
        idx = indices.to(torch.int64) if indices.dtype != torch.int64 else indices
        idx_strides = idx.stride()

    grid = (m_blocks, B * Hkv, num_splits)
    _sparse_attention_kernel[grid](
        q, k, v, idx, out, lse,
        scale,
        *q.stride(), *k.stride(), *v.stride(), *idx_strides,
        *out.stride(), *lse.stride(),
        Hkv, S, n_keys, keys_per_split,
        G=G, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        HAS_INDICES=indices is not None,
        # fp32 inputs: exact fp32 products (TF32 would cost ~1e-3 relative error); 16-bit inputs: the default
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        # the interpreter multiplies 16-bit floats as their raw bits (Triton 3.9): upcast there
        DOT_FP32=_interpreting() and q.dtype != torch.float32,
        num_warps=4, num_stages=2,
    )
    if num_splits == 1:
        return out[0], lse[0]
    out, lse = _combine_splits(out, lse)
    return out.to(q.dtype), lse


__all__ = ["sparse_attention_triton", "sparse_attention_ref", "_sparse_attention_kernel"]
