"""Attention primitives with one signature and three implementations.

``sparse_attention(q, k, v, indices=None, scale=None) -> (out, lse)`` and
``merge_states(out_a, lse_a, out_b, lse_b) -> (out, lse)``.

Implementations: the torch reference (:mod:`longctx.ops.reference`, the truth, runs
everywhere), Triton (:mod:`longctx.triton_kernels`, used on CUDA) and C++ with OpenMP
(``longctx._C`` via :mod:`longctx.ops.cpp`, used on CPU where it is faster, see
:func:`pick_impl`). ``LONGCTX_OPS=ref|triton|cpp`` forces one; by default the device of
``q`` picks.
"""
from __future__ import annotations

import functools
import logging
import math
import numbers
import os
from typing import Optional

import torch

from longctx.ops.reference import causal_attention_ref, merge_states_ref, sparse_attention_ref

logger = logging.getLogger(__name__)

IMPLS = ("ref", "triton", "cpp")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest G*S (query rows per KV head) for which the portable (non-SIMD) C++ build beats the
# torch reference on sparse selections (BENCHMARKS.md, "ops (sparse_attention)").
CPP_PORTABLE_MAX_ROWS = 16


def _forced_impl() -> Optional[str]:
    forced = os.environ.get("LONGCTX_OPS", "").strip().lower()
    if forced and forced not in IMPLS:
        raise ValueError(f"LONGCTX_OPS requires one of {IMPLS} (got {forced!r})")
    return forced or None


def cpp_available() -> bool:
    """Whether the compiled ``longctx._C`` extension imports."""
    try:
        from longctx import _C  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)  # the dispatcher asks on every call
def cpp_isa() -> Optional[str]:
    """Instruction set the C++ kernel was built for: ``"avx512"``, ``"avx2"``, ``"portable"``; None if not built."""
    try:
        from longctx import _C
    except ImportError:
        return None
    return getattr(_C, "sparse_attention_isa", "portable")


def triton_available() -> bool:
    """Whether Triton can run here (a CUDA device, or ``TRITON_INTERPRET=1`` on CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def pick_impl(
    device: torch.device, impl: Optional[str] = None, *, rows: Optional[int] = None, sparse: Optional[bool] = None
) -> str:
    """Choose the implementation for tensors on ``device``: explicit > ``LONGCTX_OPS`` > per device.

    Per device: Triton on CUDA. On CPU, C++ where it was measured faster than the torch
    reference (BENCHMARKS.md, "ops (sparse_attention)"): always when the extension was built
    with SIMD kernels (AVX-512 or AVX2: 1.5-10x faster for S = 1..256, dense and sparse); for a
    portable build only for sparse selections (``sparse=True``) with at most
    ``CPP_PORTABLE_MAX_ROWS`` query rows per KV head (``rows = G*S``; decode, verification).
    If ``rows``/``sparse`` are not given, C++ whenever it is built. Otherwise the reference.
    """
    choice = impl or _forced_impl()
    if choice is not None:
        if choice not in IMPLS:
            raise ValueError(f"impl requires one of {IMPLS} (got {choice!r})")
        return choice
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu":
        isa = cpp_isa()
        if isa is None:
            return "ref"
        if isa != "portable" or rows is None or sparse is None:
            return "cpp"
        return "cpp" if sparse and rows <= CPP_PORTABLE_MAX_ROWS else "ref"
    return "ref"


def _check_attention_inputs(q, k, v, indices, scale=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sparse_attention: {name} requires a torch.Tensor (got {type(t).__name__})")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"sparse_attention: {name} requires dtype in {_FLOAT_DTYPES} (got {t.dtype})")
        if t.dim() != 4:
            raise ValueError(
                f"sparse_attention: {name} requires 4 dims [B, heads, len, D] (got shape {tuple(t.shape)})"
            )
        if t.dtype != q.dtype:
            raise TypeError(f"sparse_attention: {name} requires the dtype of q ({q.dtype}) (got {t.dtype})")
        if t.device != q.device:
            raise ValueError(f"sparse_attention: {name} requires the device of q ({q.device}) (got {t.device})")
    B, H, S, D = q.shape
    if D < 1 or k.shape[1] < 1:
        raise ValueError(
            f"sparse_attention: q and k require D >= 1 and Hkv >= 1 (got shapes {tuple(q.shape)}, {tuple(k.shape)})"
        )
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0
    ):
        raise ValueError(f"sparse_attention: scale requires a finite float > 0 or None (got {scale!r})")
    if k.shape != v.shape:
        raise ValueError(
            f"sparse_attention: k and v require the same shape (got {tuple(k.shape)} and {tuple(v.shape)})"
        )
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"sparse_attention: k requires shape [B={B}, Hkv, T, D={D}] to match q (got {tuple(k.shape)})"
        )
    if H % k.shape[1]:
        raise ValueError(f"sparse_attention: q heads ({H}) must be a multiple of k heads (got {k.shape[1]})")
    if indices is not None:
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
            got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise TypeError(f"sparse_attention: indices requires an int64/int32 tensor (got {got})")
        if indices.device != k.device:
            raise ValueError(f"sparse_attention: indices requires the device of k ({k.device}) (got {indices.device})")
        if indices.dim() != 3 or indices.shape[:2] != k.shape[:2]:
            raise ValueError(
                f"sparse_attention: indices requires shape [B={B}, Hkv={k.shape[1]}, K] (got {tuple(indices.shape)})"
            )
        if indices.numel() and int(indices.max()) >= k.shape[2]:
            raise ValueError(
                f"sparse_attention: indices requires values < T={k.shape[2]} (negative = padding) "
                f"(got max {int(indices.max())})"
            )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    impl: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over selected keys per (batch, KV head), returning the output and its LSE.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, S, D]`` queries (fp32/fp16/bf16).
    k, v : torch.Tensor
        ``[B, Hkv, T, D]``; H must be a multiple of Hkv (GQA groups share a selection).
    indices : torch.Tensor, optional
        ``[B, Hkv, K]`` int64 key positions; entries ``< 0`` are ignored (ragged). If not
        provided, all T keys are attended (no causal mask).
    scale : float, optional
        Softmax scale; if not provided, ``1/sqrt(D)``.
    impl : {"ref", "triton", "cpp"}, optional
        Force an implementation (else ``LONGCTX_OPS``, else per device).

    Returns
    -------
    out : torch.Tensor
        ``[B, H, S, D]`` in ``q.dtype``.
    lse : torch.Tensor
        ``[B, H, S]`` float32, ``-inf`` where no key was valid.

    Examples
    --------
    >>> q = torch.randn(1, 8, 1, 64); k = torch.randn(1, 2, 100, 64); v = torch.randn(1, 2, 100, 64)
    >>> out, lse = sparse_attention(q, k, v, impl="ref")
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    >>> torch.allclose(out, ref, atol=1e-5)
    True
    """
    _check_attention_inputs(q, k, v, indices, scale)
    rows = (q.shape[1] // k.shape[1]) * q.shape[2]  # G*S query rows per KV head
    choice = pick_impl(q.device, impl, rows=rows, sparse=indices is not None)
    if choice == "triton":
        from longctx.triton_kernels.sparse_attention import sparse_attention_triton

        return sparse_attention_triton(q, k, v, indices, scale, check=False)
    if choice == "cpp":
        from longctx.ops.cpp import sparse_attention_cpp

        return sparse_attention_cpp(q, k, v, indices, scale, check=False)
    return sparse_attention_ref(q, k, v, indices, scale)


def merge_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    impl: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets by log-sum-exp (max-shifted).

    Parameters
    ----------
    out_a, out_b : torch.Tensor
        ``[B, H, S, D]`` partial outputs.
    lse_a, lse_b : torch.Tensor
        ``[B, H, S]`` their log-sum-exps (``-inf`` = empty set).
    impl : {"ref", "triton", "cpp"}, optional
        Force an implementation.

    Returns
    -------
    out : ``[B, H, S, D]`` in ``out_a.dtype``; lse : ``[B, H, S]`` float32.
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"merge_states: {name} requires a torch.Tensor (got {type(t).__name__})")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"merge_states: {name} requires dtype in {_FLOAT_DTYPES} (got {t.dtype})")
        if t.device != out_a.device:
            raise ValueError(f"merge_states: {name} requires the device of out_a ({out_a.device}) (got {t.device})")
    if out_a.dim() < 1:
        raise ValueError(f"merge_states: out_a requires shape [..., D] (got {tuple(out_a.shape)})")
    if out_a.shape != out_b.shape:
        raise ValueError(
            f"merge_states: out_a and out_b require the same shape (got {tuple(out_a.shape)} and {tuple(out_b.shape)})"
        )
    if lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(
            f"merge_states: lse tensors require shape {tuple(out_a.shape[:-1])} "
            f"(got {tuple(lse_a.shape)} and {tuple(lse_b.shape)})"
        )
    choice = pick_impl(out_a.device, impl)
    if choice == "triton":
        from longctx.triton_kernels.merge_states import merge_states_triton

        return merge_states_triton(out_a, lse_a, out_b, lse_b)
    # merging is memory-bound elementwise work; torch is as fast as a C++ loop on CPU
    return merge_states_ref(out_a, lse_a, out_b, lse_b)


__all__ = [
    "sparse_attention",
    "merge_states",
    "sparse_attention_ref",
    "merge_states_ref",
    "causal_attention_ref",
    "pick_impl",
    "cpp_available",
    "cpp_isa",
    "triton_available",
    "IMPLS",
]
