"""HiP block-sparse flash attention (prefill and decode): Triton kernel, launcher and reference.

One program per (query block, batch x mask head) holds the block's rows (the Gm query heads
sharing the mask x the block's queries; at decode that is Gm x S rows) and runs a max-shifted
online softmax (FlashAttention-2 style) over three key segments: the sink tokens, the mask's
key blocks (gathered block by block) and the local region ``[local_start, block end)``, with a
causal check on every key. No score matrix and no gathered K/V copy are materialised.
Geometry and conventions (pre-scaled q, mask heads) are those of :mod:`longctx.ops.hip`.

Dimension letters: B batch, S query length, T KV length, H query heads, Hkv KV heads,
G = H // Hkv, D head dim, M mask heads, N query blocks, K kept key blocks per query block.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before this module
is imported: Triton decides between compiling and interpreting when the kernel is decorated).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from longctx.ops.hip import block_geometry, hip_attention_ref, rows_per_block


@triton.jit
def _attend_tile(
    q, keys, valid, qpos, k_base, v_base, offs_d, mask_d,
    stride_kt, stride_kd, stride_vt, stride_vd,
    m_i, l_i, acc,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Fold one tile of keys (``keys [BLOCK_N]``, ``valid`` mask) into the online softmax."""
    kv_mask = valid[:, None] & mask_d[None, :]
    kt = tl.load(k_base + keys[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    if DOT_FP32:
        kt = kt.to(tl.float32)
    # q is pre-scaled: scores are plain q·k, moved to the log2 domain for exp2
    s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * 1.4426950408889634
    s = tl.where(valid[None, :] & (keys[None, :] <= qpos[:, None]), s, float("-inf"))  # causal
    # -- update m_i and l_i (a row that has seen no key keeps m_i = -inf; shift by 0 then)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # -- accumulate p @ V
    vt = tl.load(v_base + keys[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    if DOT_FP32:
        vt = vt.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _hip_attention_kernel(
    Q, K, V, Blocks, Starts, Ends, LocalStart, Out, Lse,
    q_offset, sink_keys, num_mask_heads, G,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_bb, stride_bm, stride_bn, stride_bk,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    GM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    NUM_KEPT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # grid: (query blocks N, B * M); row r = (query head m*GM + r // ROWS, query qs + r % ROWS)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    pid_n = tl.program_id(0)
    pid_bm = tl.program_id(1)
    b = (pid_bm // num_mask_heads).to(tl.int64)
    m = (pid_bm % num_mask_heads).to(tl.int64)
    qs = tl.load(Starts + pid_n)
    qe = tl.load(Ends + pid_n)
    ls = tl.load(LocalStart + pid_n)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    head = m * GM + offs_m // ROWS
    qpos = qs + offs_m % ROWS
    mask_m = (offs_m < GM * ROWS) & (qpos < qe)
    # load q: it stays in registers for the whole key loop
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + (qpos - q_offset)[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kvh = (m * GM) // G
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    # -- segment 1: sink tokens [0, sink_keys)
    for k0 in range(0, sink_keys, BLOCK_N):
        keys = (k0 + offs_n).to(tl.int64)
        m_i, l_i, acc = _attend_tile(q, keys, keys < sink_keys, qpos, k_base, v_base, offs_d, mask_d,
                                     stride_kt, stride_kd, stride_vt, stride_vd, m_i, l_i, acc,
                                     DOT_PRECISION, DOT_FP32)
    # -- segment 2: the mask's key blocks (-1 = unused slot)
    blk_base = Blocks + b * stride_bb + m * stride_bm + pid_n * stride_bn
    for k0 in range(0, NUM_KEPT * BLOCK_SIZE_K, BLOCK_N):
        offs = k0 + offs_n
        blk = tl.load(blk_base + (offs // BLOCK_SIZE_K) * stride_bk, mask=offs < NUM_KEPT * BLOCK_SIZE_K, other=-1)
        valid = blk >= 0
        keys = tl.where(valid, blk * BLOCK_SIZE_K + offs % BLOCK_SIZE_K, 0).to(tl.int64)
        m_i, l_i, acc = _attend_tile(q, keys, valid, qpos, k_base, v_base, offs_d, mask_d,
                                     stride_kt, stride_kd, stride_vt, stride_vd, m_i, l_i, acc,
                                     DOT_PRECISION, DOT_FP32)
    # -- segment 3: the local region [ls, qe)
    for k0 in range(ls, qe, BLOCK_N):
        keys = (k0 + offs_n).to(tl.int64)
        m_i, l_i, acc = _attend_tile(q, keys, keys < qe, qpos, k_base, v_base, offs_d, mask_d,
                                     stride_kt, stride_kd, stride_vt, stride_vd, m_i, l_i, acc,
                                     DOT_PRECISION, DOT_FP32)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    pos = qpos - q_offset
    o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + pos[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(Lse + b * stride_lb + head * stride_lh + pos * stride_ls, lse, mask=mask_m)


def _interpreting() -> bool:
    """Whether the kernel was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return type(_hip_attention_kernel).__name__ == "InterpretedFunction"


def hip_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    local_start: torch.Tensor,
    q_offset: int,
    config: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal attention over sinks + mask blocks + local region (prefill or decode).

    Same semantics as :func:`longctx.ops.hip.hip_attention_ref`. Decode is the case S <= b_q:
    one query block whose Gm x S rows form one tile.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, S, D]`` queries pre-scaled by the softmax scale, at positions ``[q_offset, q_offset + S)``.
    k, v : torch.Tensor
        ``[B, Hkv, T, D]`` on the same device, same dtype as ``q``.
    blocks : torch.Tensor
        ``[B, M, N, K]`` int64 key blocks per query block (``-1`` = unused).
    local_start : torch.Tensor
        ``[N]`` int64 first key of each block's local region.
    q_offset : int
    config : HiPConfig

    Returns
    -------
    out : torch.Tensor
        ``[B, H, S, D]`` in ``q.dtype``.
    lse : torch.Tensor
        ``[B, H, S]`` float32.

    Raises
    ------
    RuntimeError
        CPU tensors without ``TRITON_INTERPRET=1``.
    TypeError
        ``q``, ``k``, ``v`` of different dtypes.
    """
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"hip_attention_triton requires CUDA tensors, or TRITON_INTERPRET=1 set before import (got device {q.device})"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"hip_attention_triton requires q, k, v of one dtype (got {q.dtype}, {k.dtype}, {v.dtype})")
    B, H, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    M, K = blocks.shape[1], blocks.shape[3]
    Gm = H // M
    starts, ends, _ = block_geometry(S, q_offset, config, q.device)
    N = starts.numel()
    rows = rows_per_block(S, config)
    blocks = blocks.to(device=q.device, dtype=torch.int64)
    local_start = local_start.to(device=q.device, dtype=torch.int64)
    sink_keys = min(config.sink_blocks * config.block_size_k, T)

    BLOCK_M = max(16, triton.next_power_of_2(Gm * rows))  # tl.dot needs >= 16 along every dim
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = 32 if BLOCK_D >= 128 and BLOCK_M >= 64 else 64  # bounds the [BLOCK_M, BLOCK_D] + [BLOCK_N, BLOCK_D] tiles
    out = torch.empty_like(q)
    lse = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
    _hip_attention_kernel[(N, B * M)](
        q, k, v, blocks, starts, ends, local_start, out, lse,
        q_offset, sink_keys, M, H // Hkv,
        *q.stride(), *k.stride(), *v.stride(), *blocks.stride(), *out.stride(), *lse.stride(),
        GM=Gm, ROWS=rows, BLOCK_SIZE_K=config.block_size_k, NUM_KEPT=K,
        HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        # fp32 inputs: exact fp32 products (TF32 would cost ~1e-3 relative error); 16-bit inputs use tensor cores
        DOT_PRECISION="ieee",
        # the interpreter multiplies 16-bit floats as their raw bits (Triton 3.9): upcast there
        DOT_FP32=_interpreting() and q.dtype != torch.float32,
        num_warps=4 if BLOCK_M <= 64 else 8,
        num_stages=2,
    )
    return out, lse


__all__ = ["hip_attention_triton", "hip_attention_ref", "_hip_attention_kernel"]
