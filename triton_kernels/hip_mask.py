"""HiP mask estimation (the hierarchical tree search): Triton kernel, launcher and reference.

Each tree-search iteration launches one program per (query block, batch x mask head). The
program splits each of the K kept ranges in two at its midpoint (left halves first, then
right halves) and scores every half by its centre key block: the max of q·k over the block's
stride-subsampled query rows (all G query heads of a group when the mask is shared) and the
stride-subsampled keys of the block. Between iterations the top K of the 2K halves are kept
with ``torch.topk``, as the official v1.1 ``masking_iteration_draft_cuda_dup_and_score`` does.
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

from longctx.ops.hip import (
    HiPMask,
    block_geometry,
    finalize_blocks,
    hip_mask_ref,
    initial_ranges,
    mask_heads,
    num_iterations,
    rows_per_block,
    select_top,
)


@triton.jit
def _hip_mask_kernel(
    Q, K, Start, Size, CandStart, CandSize, Scores, Starts, Ends,
    q_offset,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    num_mask_heads, num_blocks, G,
    GM: tl.constexpr,
    NQ: tl.constexpr,
    STRIDE_Q: tl.constexpr,
    NK: tl.constexpr,
    STRIDE_K: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    SINK_BLOCKS: tl.constexpr,
    NUM_KEPT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # grid: (query blocks N, B * M); ranges live in [B * M, N, K] (parents) and [B * M, N, 2K] (halves)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    pid_n = tl.program_id(0)
    pid_bm = tl.program_id(1)
    b = (pid_bm // num_mask_heads).to(tl.int64)
    m = (pid_bm % num_mask_heads).to(tl.int64)
    qs = tl.load(Starts + pid_n)
    qe = tl.load(Ends + pid_n)

    # load the block's query rows (g, i): head m*GM + g, query min(qs + i*STRIDE_Q, qe - 1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < GM * NQ
    mask_d = offs_d < HEAD_DIM
    head = m * GM + offs_r // NQ
    pos = tl.minimum(qs + (offs_r % NQ) * STRIDE_Q, qe - 1) - q_offset
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + pos[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + ((m * GM) // G) * stride_kh

    row = pid_bm.to(tl.int64) * num_blocks + pid_n
    for c0 in range(0, NUM_KEPT, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < NUM_KEPT
        start = tl.load(Start + row * NUM_KEPT + offs_c, mask=mask_c, other=0)
        size = tl.load(Size + row * NUM_KEPT + offs_c, mask=mask_c, other=0)
        left = (size + 1) // 2
        for side in tl.static_range(2):
            # -- dup: a range of one block keeps itself on the left and an empty right half
            if side == 0:
                cs = start
                cz = left
            else:
                cs = start + left
                cz = size - left
            has = mask_c & (cz > 0)
            rep = SINK_BLOCKS + cs + cz // 2  # the half's centre block
            # -- score: max over the query rows and the subsampled keys of the centre block
            best = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
            for j in tl.static_range(NK):
                key = rep * BLOCK_SIZE_K + j * STRIDE_K
                kt = tl.load(k_base + key[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                             mask=has[:, None] & mask_d[None, :], other=0.0)
                if DOT_FP32:
                    kt = kt.to(tl.float32)
                s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION)  # [BLOCK_R, BLOCK_C]
                s = tl.where(mask_r[:, None], s, float("-inf"))
                best = tl.maximum(best, tl.max(s, 0))
            best = tl.where(has, best, float("-inf"))
            out = row * 2 * NUM_KEPT + side * NUM_KEPT + offs_c
            tl.store(CandStart + out, cs, mask=mask_c)
            tl.store(CandSize + out, cz, mask=mask_c)
            tl.store(Scores + out, best, mask=mask_c)


def _interpreting() -> bool:
    """Whether the kernel was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return type(_hip_mask_kernel).__name__ == "InterpretedFunction"


def hip_mask_triton(q: torch.Tensor, k: torch.Tensor, q_offset: int, config: Any) -> HiPMask:
    """Hierarchical top-k mask estimation with the Triton dup-and-score kernel.

    Same semantics as :func:`longctx.ops.hip.hip_mask_ref`.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, S, D]`` queries pre-scaled by the softmax scale, at positions
        ``[q_offset, q_offset + S)``.
    k : torch.Tensor
        ``[B, Hkv, T, D]`` keys on the same device, same dtype as ``q``.
    q_offset : int
    config : HiPConfig

    Returns
    -------
    HiPMask
        ``blocks [B, M, N, K]`` int64, ``local_start [N]``, ``reads [N]``.

    Raises
    ------
    RuntimeError
        CPU tensors without ``TRITON_INTERPRET=1``.
    TypeError
        ``q`` and ``k`` of different dtypes.
    """
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"hip_mask_triton requires CUDA tensors, or TRITON_INTERPRET=1 set before import (got device {q.device})"
        )
    if q.dtype != k.dtype:
        raise TypeError(f"hip_mask_triton requires q and k of one dtype (got {q.dtype} and {k.dtype})")
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    M, Gm = mask_heads(H, Hkv, config)
    K = config.mask_blocks
    starts, ends, local_start = block_geometry(S, q_offset, config, q.device)
    N = starts.numel()
    n_blocks = local_start // config.block_size_k - config.sink_blocks
    start, size = initial_ranges(n_blocks, K)
    start = start.expand(B, M, N, K).contiguous()
    size = size.expand(B, M, N, K).contiguous()
    nq = triton.cdiv(rows_per_block(S, config), config.block_stride_q)
    nk = triton.cdiv(config.block_size_k, config.block_stride_k)

    BLOCK_R = max(16, triton.next_power_of_2(Gm * nq))  # tl.dot needs >= 16 along every dim
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_C = min(64, max(16, triton.next_power_of_2(K)))
    cand_start = torch.empty((B, M, N, 2 * K), device=q.device, dtype=torch.int64)
    cand_size = torch.empty_like(cand_start)
    scores = torch.empty((B, M, N, 2 * K), device=q.device, dtype=torch.float32)
    reads = torch.zeros(N, device=q.device, dtype=torch.int64)
    for _ in range(num_iterations(int(n_blocks.max()), K)):
        _hip_mask_kernel[(N, B * M)](
            q, k, start, size, cand_start, cand_size, scores, starts, ends,
            q_offset,
            *q.stride(), *k.stride(),
            M, N, H // Hkv,
            GM=Gm, NQ=nq, STRIDE_Q=config.block_stride_q, NK=nk, STRIDE_K=config.block_stride_k,
            BLOCK_SIZE_K=config.block_size_k, SINK_BLOCKS=config.sink_blocks, NUM_KEPT=K,
            HEAD_DIM=D, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D,
            # scores only rank ranges, but fp32 inputs stay exact so the mask matches the reference
            DOT_PRECISION="ieee",
            # the interpreter multiplies 16-bit floats as their raw bits (Triton 3.9): upcast there
            DOT_FP32=_interpreting() and q.dtype != torch.float32,
            num_warps=4,
        )
        split = size > 1  # only halves of real splits are new reads
        reads += ((cand_size > 0) & torch.cat([split, split], dim=-1)).sum(dim=(0, 1, 3)) * nk
        start, size = select_top(cand_start, cand_size, scores, K)
        start, size = start.contiguous(), size.contiguous()
    return HiPMask(finalize_blocks(start, size, config.sink_blocks), local_start, reads)


__all__ = ["hip_mask_triton", "hip_mask_ref", "_hip_mask_kernel"]
