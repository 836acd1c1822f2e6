"""Merging two partial attention states by log-sum-exp: Triton kernel, launcher and reference.

Two attentions over disjoint key sets, each normalised over its own keys and carrying its
log-sum-exp, combine exactly into the attention over the union:
``lse = log(exp(lse_a) + exp(lse_b))``, ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``,
computed max-shifted so that large scores do not overflow; ``lse = -inf`` marks an empty set.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before import).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from longctx.ops.reference import merge_states_ref


@triton.jit
def _merge_states_kernel(
    OutA, LseA, OutB, LseB, Out, Lse,
    n_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (row blocks,); every tensor is contiguous [n_rows, D] / [n_rows]
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < n_rows
    mask = mask_r[:, None] & (offs_d[None, :] < HEAD_DIM)

    lse_a = tl.load(LseA + offs_r, mask=mask_r, other=float("-inf")).to(tl.float32)
    lse_b = tl.load(LseB + offs_r, mask=mask_r, other=float("-inf")).to(tl.float32)
    m = tl.maximum(lse_a, lse_b)
    # both sets empty (m = -inf): shift by 0 so that exp() gives 0, not NaN
    m = tl.where((m == float("-inf")) | (m == float("inf")), 0.0, m)
    w_a = tl.exp(lse_a - m)
    w_b = tl.exp(lse_b - m)
    denom = w_a + w_b
    empty = denom == 0.0
    denom = tl.where(empty, 1.0, denom)
    lse = tl.where(empty, float("-inf"), m + tl.log(denom))

    offs = offs_r.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    out_a = tl.load(OutA + offs, mask=mask, other=0.0).to(tl.float32)
    out_b = tl.load(OutB + offs, mask=mask, other=0.0).to(tl.float32)
    out = out_a * (w_a / denom)[:, None] + out_b * (w_b / denom)[:, None]
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + offs_r, lse, mask=mask_r)


def _interpreting() -> bool:
    """Whether the kernel was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return type(_merge_states_kernel).__name__ == "InterpretedFunction"


def merge_states_triton(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets (same semantics as :func:`merge_states_ref`).

    Parameters
    ----------
    out_a, out_b : torch.Tensor
        ``[..., D]`` partial outputs (e.g. ``[B, H, S, D]``), each normalised over its own keys.
    lse_a, lse_b : torch.Tensor
        ``[...]`` their log-sum-exps; ``-inf`` means "no keys" and contributes nothing.

    Returns
    -------
    out : torch.Tensor
        ``[..., D]`` in ``out_a.dtype``.
    lse : torch.Tensor
        ``[...]`` float32.

    Raises
    ------
    ValueError
        Shapes that do not match.
    RuntimeError
        CPU tensors without ``TRITON_INTERPRET=1``.
    """
    if out_a.shape != out_b.shape or lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(
            f"merge_states_triton requires out_a, out_b of one shape [..., D] and lse_a, lse_b of shape [...] "
            f"(got {tuple(out_a.shape)}, {tuple(lse_a.shape)}, {tuple(out_b.shape)}, {tuple(lse_b.shape)})"
        )
    if out_a.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"merge_states_triton requires CUDA tensors, or TRITON_INTERPRET=1 set before import "
            f"(got device {out_a.device})"
        )
    D = out_a.shape[-1]
    out_a_2d = out_a.reshape(-1, D).contiguous()  # [R, D]
    out_b_2d = out_b.reshape(-1, D).contiguous()
    lse_a_1d = lse_a.reshape(-1).contiguous()  # [R]
    lse_b_1d = lse_b.reshape(-1).contiguous()
    n_rows = out_a_2d.shape[0]
    out = torch.empty_like(out_a_2d)
    lse = torch.empty(n_rows, device=out_a.device, dtype=torch.float32)
    if n_rows:
        BLOCK_D = triton.next_power_of_2(max(D, 1))
        BLOCK_R = max(1, min(64, 4096 // BLOCK_D))
        _merge_states_kernel[(triton.cdiv(n_rows, BLOCK_R),)](
            out_a_2d, lse_a_1d, out_b_2d, lse_b_1d, out, lse, n_rows,
            HEAD_DIM=D, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
        )
    return out.reshape(out_a.shape), lse.reshape(lse_a.shape)


__all__ = ["merge_states_triton", "merge_states_ref", "_merge_states_kernel"]
