"""The C++ (OpenMP) implementation of the ops, a thin wrapper over ``longctx._C``.

The kernel (csrc/sparse_attention.cpp) works on fp32 CPU arrays. fp32 CPU tensors are passed
without a copy (``Tensor.numpy()`` shares memory; K/V may be strided, e.g. a slice of a
preallocated cache, as long as rows are contiguous). 16-bit K/V are gathered to the selected
rows first and only those are converted. Results come back as numpy arrays wrapped with
``torch.from_numpy`` and cast to ``q.dtype``.
"""
from __future__ import annotations

from typing import Optional

import torch


def _as_f32_numpy(t: torch.Tensor):
    # zero-copy for contiguous fp32 CPU tensors
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _kv_numpy(t: torch.Tensor):
    # [B, Hkv, T, D]: fp32 CPU tensors whose rows are contiguous are read in place, strides and all
    t = t.detach()
    if t.device.type == "cpu" and t.dtype == torch.float32 and (t.stride(-1) == 1 or t.shape[-1] <= 1):
        return t.numpy()
    return _as_f32_numpy(t)


def sparse_attention_cpp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    *,
    num_threads: Optional[int] = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention with its LSE, fused gather + softmax + weighted sum in C++ (OpenMP).

    Same semantics as :func:`longctx.ops.reference.sparse_attention_ref`.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, S, D]`` queries (fp32/fp16/bf16; computed in fp32).
    k, v : torch.Tensor
        ``[B, Hkv, T, D]``; H must be a multiple of Hkv (GQA groups share a selection).
    indices : torch.Tensor, optional
        ``[B, Hkv, K]`` int64/int32 key positions; entries ``< 0`` are ignored. If not
        provided, all T keys are attended.
    scale : float, optional
        Softmax scale; if not provided, ``1/sqrt(D)``.
    num_threads : int, optional
        OpenMP threads; if not provided, ``torch.get_num_threads()`` (so torch and the
        kernel share one setting).
    check : bool, default True
        Validate the inputs; the :func:`longctx.ops.sparse_attention` dispatcher validates
        once and passes False.

    Returns
    -------
    out : torch.Tensor
        ``[B, H, S, D]`` in ``q.dtype`` on ``q.device``; rows with no valid key are 0.
    lse : torch.Tensor
        ``[B, H, S]`` float32, ``-inf`` where no key was valid.

    Raises
    ------
    TypeError, ValueError
        Bad dtypes, shapes or index values (see :func:`longctx.ops.sparse_attention`).
    ImportError
        ``longctx._C`` was not built.
    """
    if check:
        from longctx.ops import _check_attention_inputs

        _check_attention_inputs(q, k, v, indices, scale)
    from longctx import _C

    D = q.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    if indices is not None:
        indices = indices.detach().to(device="cpu", dtype=torch.int64)
        if (k.dtype != torch.float32 or k.device.type != "cpu") and indices.shape[2] < k.shape[2]:
            # 16-bit or device K/V: gather the K selected rows in torch and convert only those
            # (converting all T rows to fp32 would cost more than the attention itself)
            valid = indices >= 0  # [B, Hkv, K]
            rows = indices.clamp(min=0).to(k.device).unsqueeze(-1).expand(-1, -1, -1, D)
            k = torch.gather(k, 2, rows)  # [B, Hkv, K, D]
            v = torch.gather(v, 2, rows)
            positions = torch.arange(indices.shape[2]).expand_as(indices)
            indices = torch.where(valid, positions, torch.full_like(indices, -1))
        idx = indices.contiguous().numpy()
    else:
        idx = None
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    out, lse = _C.sparse_attention(_as_f32_numpy(q), _kv_numpy(k), _kv_numpy(v), idx, scale, threads)
    out = torch.from_numpy(out).to(device=q.device, dtype=q.dtype)
    lse = torch.from_numpy(lse).to(device=q.device)
    return out, lse


__all__ = ["sparse_attention_cpp"]
