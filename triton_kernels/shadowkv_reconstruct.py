"""ShadowKV fused gather + key reconstruction + RoPE: Triton kernel, launcher and reference.

For each selected chunk that missed the device cache, one program gathers the C rows of
the low-rank factor ``U`` at the chunk's tokens, multiplies them by the KV head's ``SV``
(``[C, r] @ [r, D]``), applies RoPE at the tokens' original positions and writes the C
keys into the chunk's slot of the selected-key buffer. Entries past a row's miss count are
skipped on the device, so no host sync is needed to size the launch.

RoPE is fused without permuting registers: ``rotate_half`` is linear on the D axis, so
``rotate_half(U @ SV) = U @ rotate_half(SV)``; the kernel runs two small GEMMs and returns
``(U @ SV) * cos + (U @ SV_rot) * sin``. Partial rotary (R < D) works: dims ``>= R`` get
``cos = 1, sin = 0`` and ``SV_rot`` is zero there.

Dimension letters: B batch, Hkv KV heads (rows = B·Hkv), T_c context tokens, r rank, D head
dim, C chunk size, M entries per row, K slots per row, R rotated dims.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before import).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reconstruct_rope_kernel(
    U, SV, SVR, Chunks, Slots, Counts, Cos, Sin, Out,
    stride_ub, stride_ut, stride_ur,
    stride_sr, stride_sk, stride_sd,
    stride_cr, stride_cm,
    stride_xr, stride_xm, stride_xc, stride_xd,
    stride_or, stride_ok, stride_oc, stride_od,
    num_kv_heads, RANK, ROT,
    CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (B*Hkv rows, M entries)
    tl.static_assert(BLOCK_C >= CHUNK)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    row = tl.program_id(0)
    j = tl.program_id(1)
    count = tl.load(Counts + row)
    if j >= count:  # a hit: its slot already holds the keys
        return
    row64 = row.to(tl.int64)
    b = row64 // num_kv_heads
    chunk = tl.load(Chunks + row64 * stride_cr + j * stride_cm).to(tl.int64)
    slot = tl.load(Slots + row64 * stride_cr + j * stride_cm).to(tl.int64)

    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    mask_c = offs_c < CHUNK
    mask_d = offs_d < HEAD_DIM
    tok = chunk * CHUNK + offs_c

    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    acc_rot = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, RANK, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < RANK
        # -- gather the chunk's rows of U, and the head's SV / SV_rot tiles
        u = tl.load(
            U + b * stride_ub + tok[:, None] * stride_ut + offs_r[None, :] * stride_ur,
            mask=mask_c[:, None] & mask_r[None, :], other=0.0,
        ).to(tl.float32)
        sv_off = row64 * stride_sr + offs_r[:, None] * stride_sk + offs_d[None, :] * stride_sd
        sv_mask = mask_r[:, None] & mask_d[None, :]
        sv = tl.load(SV + sv_off, mask=sv_mask, other=0.0).to(tl.float32)
        svr = tl.load(SVR + sv_off, mask=sv_mask, other=0.0).to(tl.float32)
        acc += tl.dot(u, sv, input_precision="ieee")
        acc_rot += tl.dot(u, svr, input_precision="ieee")

    # -- RoPE at the original positions (dims >= ROT pass through)
    x_off = row64 * stride_xr + j * stride_xm + offs_c[:, None] * stride_xc + offs_d[None, :] * stride_xd
    x_mask = mask_c[:, None] & (offs_d < ROT)[None, :]
    cos = tl.load(Cos + x_off, mask=x_mask, other=1.0)
    sin = tl.load(Sin + x_off, mask=x_mask, other=0.0)
    keys = acc * cos + acc_rot * sin
    o_ptrs = Out + row64 * stride_or + slot * stride_ok + offs_c[:, None] * stride_oc + offs_d[None, :] * stride_od
    tl.store(o_ptrs, keys.to(Out.dtype.element_ty), mask=mask_c[:, None] & mask_d[None, :])


def _interpreting() -> bool:
    """Whether the kernel was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return type(_reconstruct_rope_kernel).__name__ == "InterpretedFunction"


def _check(u, sv, sv_rot, chunks, slots, counts, cos, sin, out, num_kv_heads) -> tuple[int, int, int, int]:
    if u.dim() != 3 or sv.dim() != 3 or out.dim() != 4:
        raise ValueError(
            f"reconstruct_rope requires u [B, Tc, r], sv [rows, r, D], out [rows, K, C, D] "
            f"(got {tuple(u.shape)}, {tuple(sv.shape)}, {tuple(out.shape)})"
        )
    rows, K, C, D = out.shape
    B, _, r = u.shape
    same = sv_rot.shape == sv.shape and sv_rot.stride() == sv.stride()
    if rows != B * num_kv_heads or sv.shape != (rows, r, D) or not same:
        raise ValueError(
            f"reconstruct_rope requires sv and sv_rot of shape {(rows, r, D)} with equal strides "
            f"(rows = B*Hkv = {B}*{num_kv_heads}; got {tuple(sv.shape)}, {tuple(sv_rot.shape)})"
        )
    if chunks.dim() != 2 or chunks.shape[0] != rows or slots.shape != chunks.shape or slots.stride() != chunks.stride():
        raise ValueError(
            f"reconstruct_rope requires chunks and slots [rows={rows}, M] with equal strides "
            f"(got {tuple(chunks.shape)}, {tuple(slots.shape)})"
        )
    M = chunks.shape[1]
    if counts.shape != (rows,):
        raise ValueError(f"reconstruct_rope requires counts [rows={rows}] (got {tuple(counts.shape)})")
    same = sin.shape == cos.shape and sin.stride() == cos.stride()
    if cos.dim() != 4 or cos.shape[:3] != (rows, M, C) or cos.shape[3] > D or not same:
        raise ValueError(
            f"reconstruct_rope requires cos and sin [rows={rows}, M={M}, C={C}, R<=D] with equal strides "
            f"(got {tuple(cos.shape)}, {tuple(sin.shape)})"
        )
    return rows, M, C, D


def reconstruct_rope_triton(
    u: torch.Tensor,
    sv: torch.Tensor,
    sv_rot: torch.Tensor,
    chunks: torch.Tensor,
    slots: torch.Tensor,
    counts: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: torch.Tensor,
    *,
    num_kv_heads: int,
) -> torch.Tensor:
    """Rebuild chunk keys from the low-rank factors, rotate them, write them into their slots.

    For every row (= ``b * Hkv + h``) and entry ``j < counts[row]``:
    ``out[row, slots[row, j]] = RoPE(U[b, chunks[row, j]*C : +C] @ SV[row])``.

    Parameters
    ----------
    u : torch.Tensor
        ``[B, T_c, r]`` left factor (any float dtype; accumulated in fp32).
    sv, sv_rot : torch.Tensor
        ``[B*Hkv, r, D]`` right factor per KV head and ``rotate_half`` of it on the first R
        dims (zero beyond), same strides.
    chunks, slots : torch.Tensor
        ``[B*Hkv, M]`` int64 chunk ids (into T_c / C) and destination slots (into K).
    counts : torch.Tensor
        ``[B*Hkv]`` int: entries ``j >= counts[row]`` are skipped.
    cos, sin : torch.Tensor
        ``[B*Hkv, M, C, R]`` fp32 RoPE tables at each entry's token positions (R <= D).
    out : torch.Tensor
        ``[B*Hkv, K, C, D]`` destination (may be a strided view), written in place.
    num_kv_heads : int
        Hkv (row ``b*Hkv + h`` reads ``u[b]``).

    Returns
    -------
    torch.Tensor
        ``out``.
    """
    rows, M, C, D = _check(u, sv, sv_rot, chunks, slots, counts, cos, sin, out, num_kv_heads)
    if u.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"reconstruct_rope_triton requires CUDA tensors, or TRITON_INTERPRET=1 set before import (got {u.device})"
        )
    if rows == 0 or M == 0:
        return out
    r = u.shape[2]
    _reconstruct_rope_kernel[(rows, M)](
        u, sv, sv_rot, chunks, slots, counts, cos, sin, out,
        *u.stride(), *sv.stride(), *chunks.stride(), *cos.stride(), *out.stride(),
        num_kv_heads, r, cos.shape[3],
        CHUNK=C, HEAD_DIM=D,
        BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_R=min(32, max(16, triton.next_power_of_2(r))),
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out


def reconstruct_rope_ref(
    u: torch.Tensor,
    sv: torch.Tensor,
    sv_rot: torch.Tensor,
    chunks: torch.Tensor,
    slots: torch.Tensor,
    counts: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: torch.Tensor,
    *,
    num_kv_heads: int,
) -> torch.Tensor:
    """Reference of :func:`reconstruct_rope_triton` (rotation as ``x·cos + rotate_half(x)·sin``)."""
    from longctx.models import rotate_half

    rows, M, C, D = _check(u, sv, sv_rot, chunks, slots, counts, cos, sin, out, num_kv_heads)
    R = cos.shape[3]
    valid = torch.arange(M, device=chunks.device) < counts.unsqueeze(1)  # [rows, M]
    row = torch.arange(rows, device=chunks.device).unsqueeze(1).expand(rows, M)[valid]
    tok = chunks[valid].unsqueeze(1) * C + torch.arange(C, device=chunks.device)  # [n, C]
    u_rows = u[(row // num_kv_heads).unsqueeze(1), tok].float()  # [n, C, r]
    keys = torch.bmm(u_rows, sv.float()[row])  # [n, C, D]
    rot = keys[..., :R]
    keys[..., :R] = rot * cos[valid] + rotate_half(rot) * sin[valid]
    out[row, slots[valid]] = keys.to(out.dtype)
    return out


__all__ = ["reconstruct_rope_triton", "reconstruct_rope_ref"]
