"""ShadowKV value gather: Triton kernel, launcher and reference.

Copies the values of the selected chunks that missed the device cache from the host tier
into their slots of the device buffer, one program per (row, entry). On CUDA the source is
pinned host memory read directly by the kernel (zero-copy over PCIe, as the official
``gather_copy_with_offsets`` does); entries past a row's miss count are skipped on the
device.

Dimension letters: rows = B·Hkv, N chunks, C chunk size, D head dim, M entries per row,
K slots per row.

Runs on CUDA tensors (source: CUDA or pinned CPU), or on CPU tensors under
``TRITON_INTERPRET=1`` (set before import).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_chunks_kernel(
    Src, Chunks, Slots, Counts, Out,
    stride_sr, stride_sn, stride_sc, stride_sd,
    stride_cr, stride_cm,
    stride_or, stride_ok, stride_oc, stride_od,
    CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (rows, M entries)
    row = tl.program_id(0)
    j = tl.program_id(1)
    count = tl.load(Counts + row)
    if j >= count:  # a hit: its slot already holds the values
        return
    row64 = row.to(tl.int64)
    chunk = tl.load(Chunks + row64 * stride_cr + j * stride_cm).to(tl.int64)
    slot = tl.load(Slots + row64 * stride_cr + j * stride_cm).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_c < CHUNK)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(
        Src + row64 * stride_sr + chunk * stride_sn + offs_c[:, None] * stride_sc + offs_d[None, :] * stride_sd,
        mask=mask,
    )
    tl.store(
        Out + row64 * stride_or + slot * stride_ok + offs_c[:, None] * stride_oc + offs_d[None, :] * stride_od,
        x.to(Out.dtype.element_ty), mask=mask,
    )


def _interpreting() -> bool:
    """Whether the kernel was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return type(_gather_chunks_kernel).__name__ == "InterpretedFunction"


def _check(src, chunks, slots, counts, out) -> tuple[int, int]:
    if src.dim() != 4 or out.dim() != 4 or src.shape[0] != out.shape[0] or src.shape[2:] != out.shape[2:]:
        raise ValueError(
            f"gather_chunks requires src [rows, N, C, D] and out [rows, K, C, D] "
            f"(got {tuple(src.shape)} and {tuple(out.shape)})"
        )
    rows = src.shape[0]
    if chunks.dim() != 2 or chunks.shape[0] != rows or slots.shape != chunks.shape or slots.stride() != chunks.stride():
        raise ValueError(
            f"gather_chunks requires chunks and slots [rows={rows}, M] with equal strides "
            f"(got {tuple(chunks.shape)}, {tuple(slots.shape)})"
        )
    if counts.shape != (rows,):
        raise ValueError(f"gather_chunks requires counts [rows={rows}] (got {tuple(counts.shape)})")
    return rows, chunks.shape[1]


def gather_chunks_triton(
    src: torch.Tensor, chunks: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``out[row, slots[row, j]] = src[row, chunks[row, j]]`` for ``j < counts[row]``.

    Parameters
    ----------
    src : torch.Tensor
        ``[rows, N, C, D]`` chunked values (host tier: pinned CPU memory on CUDA).
    chunks, slots : torch.Tensor
        ``[rows, M]`` int64 source chunk ids and destination slots, same strides.
    counts : torch.Tensor
        ``[rows]`` int: entries ``j >= counts[row]`` are skipped.
    out : torch.Tensor
        ``[rows, K, C, D]`` destination (may be a strided view), written in place.

    Returns
    -------
    torch.Tensor
        ``out``.
    """
    rows, M = _check(src, chunks, slots, counts, out)
    if out.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"gather_chunks_triton requires CUDA tensors, or TRITON_INTERPRET=1 set before import (got {out.device})"
        )
    if rows == 0 or M == 0:
        return out
    C, D = src.shape[2], src.shape[3]
    _gather_chunks_kernel[(rows, M)](
        src, chunks, slots, counts, out,
        *src.stride(), *chunks.stride(), *out.stride(),
        CHUNK=C, HEAD_DIM=D, BLOCK_C=triton.next_power_of_2(C), BLOCK_D=triton.next_power_of_2(D),
    )
    return out


def gather_chunks_ref(
    src: torch.Tensor, chunks: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Reference of :func:`gather_chunks_triton`."""
    rows, M = _check(src, chunks, slots, counts, out)
    valid = torch.arange(M, device=chunks.device) < counts.unsqueeze(1)
    row = torch.arange(rows, device=chunks.device).unsqueeze(1).expand(rows, M)[valid]
    out[row, slots[valid]] = src[row.to(src.device), chunks[valid].to(src.device)].to(out.device, out.dtype)
    return out


__all__ = ["gather_chunks_triton", "gather_chunks_ref"]
