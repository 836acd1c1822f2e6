"""HiP primitives: hierarchical top-k mask estimation and block-sparse attention.

HiP (Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework
With Hierarchically Pruned Attention", ICLR 2025, arXiv 2406.09827). For every block of
``b_q`` queries the mask estimation keeps ``K = k / b_k`` key blocks of its *search region*
by a tree search:

1. split the search region into K ranges of (nearly) equal length;
2. split every range in two at its midpoint, score each half by its centre key block
   (the max of q·k over the stride-subsampled ``b_q x b_k`` block), keep the top K of
   the 2K halves;
3. repeat until every range is one key block: ``ceil(log2(n / K))`` iterations for a
   region of n blocks, so O(k log T) key reads per query block, and no key is ever
   unreachable (every range stays a candidate until it loses a comparison).

Attention then runs causally over the K blocks, the sink tokens and a local window.

Query blocks are consecutive runs of ``b_q`` queries from the first query given (a decode
step of S <= b_q queries is one block). Geometry of query block i (queries ``[qs_i, qe_i)``,
absolute positions):

- sink region: keys ``[0, sink_blocks * b_k)``;
- local region: keys ``[local_start_i, qe_i)`` with
  ``local_start_i = b_k * max(sink_blocks, floor((qs_i - window) / b_k))``, so every query
  sees at least ``window`` recent keys;
- search region: key blocks ``[sink_blocks, local_start_i / b_k)``.

The three are disjoint, so a mask that keeps every block of the search region (``k >=`` its
length) makes the attention exactly dense causal attention.

Conventions:

- ``q`` is **pre-scaled** by the softmax scale, as the official v1.0/v1.1 kernels expect
  (the ``scale`` of the model is applied once by the caller; scores here are plain q·k).
- Mask heads ``M``: ``Hkv`` when ``config.gqa_shared_mask`` (the ``Gm = G`` query heads of a
  group share one mask, and a branch is scored as the max over their queries too), else ``H``
  (``Gm = 1``).

Implementations: the torch reference here (vectorised over batch, heads and query blocks; the
only Python loops are over the ``log T`` iterations and over memory-bounded chunks of query
blocks), and Triton kernels (:mod:`longctx.triton_kernels.hip_mask`,
:mod:`longctx.triton_kernels.hip_attention`) used on CUDA or under ``LONGCTX_OPS=triton``.

Dimension letters: B batch, S query length, T KV length, H query heads, Hkv KV heads,
G = H // Hkv, D head dim, M mask heads, N query blocks, K kept key blocks per query block,
L keys attended per query block.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from longctx.ops import pick_impl

# working-set budget of one chunk of query blocks in the torch reference (gathered keys + scores)
CHUNK_BYTES = 32 * 2**20


class HiPMask(NamedTuple):
    """The estimated block-sparse mask of a set of query blocks.

    Attributes
    ----------
    blocks : torch.Tensor
        ``[B, M, N, K]`` int64 absolute key-block indices kept per query block, sorted,
        ``-1`` for unused slots (search regions shorter than K blocks).
    local_start : torch.Tensor
        ``[N]`` int64 first key of each block's local region (the search region ends there).
    reads : torch.Tensor
        ``[N]`` int64 key vectors read by the search for each query block, summed over B x M.
    """

    blocks: torch.Tensor
    local_start: torch.Tensor
    reads: torch.Tensor


# ---------------------------------------------------------------------------- geometry
def mask_heads(num_heads: int, num_kv_heads: int, config: Any) -> tuple[int, int]:
    """``(M, Gm)``: mask heads and query heads per mask head."""
    if config.gqa_shared_mask:
        return num_kv_heads, num_heads // num_kv_heads
    return num_heads, 1


def block_geometry(S: int, q_offset: int, config: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Query-block bounds and local-region starts.

    Parameters
    ----------
    S : int
        Number of queries; they sit at absolute positions ``[q_offset, q_offset + S)``.
    q_offset : int
        Absolute position of the first query (0 at prefill, ``T - S`` at decode).
    config : HiPConfig

    Returns
    -------
    starts, ends, local_start : torch.Tensor
        ``[N]`` int64 each: block i holds queries ``[starts[i], ends[i])`` and its local region
        starts at key ``local_start[i]``.
    """
    b_q, b_k = config.block_size_q, config.block_size_k
    starts = torch.arange(0, S, b_q, device=device, dtype=torch.int64) + q_offset
    ends = (starts + b_q).clamp(max=q_offset + S)
    local_start = b_k * torch.clamp((starts - config.window).clamp(min=0) // b_k, min=config.sink_blocks)
    return starts, ends, local_start


def rows_per_block(S: int, config: Any) -> int:
    """Query rows a block holds: ``b_q``, or S for a single short block (decode)."""
    return min(config.block_size_q, S)


def num_iterations(max_blocks: int, num_kept: int) -> int:
    """Tree-search iterations until every range is one block: ``ceil(log2(ceil(n / K)))``."""
    longest = -(-max(max_blocks, 0) // num_kept)
    return (longest - 1).bit_length() if longest > 1 else 0


def initial_ranges(n_blocks: torch.Tensor, num_kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each search region of ``n_blocks[i]`` blocks into ``num_kept`` ranges.

    Returns ``start, size``: ``[N, K]`` int64, start relative to the search region. Regions
    shorter than K give ranges of size 0 or 1 (each block exactly once).
    """
    j = torch.arange(num_kept + 1, device=n_blocks.device, dtype=torch.int64)
    bounds = (j.unsqueeze(0) * n_blocks.unsqueeze(1)) // num_kept  # [N, K + 1]
    return bounds[:, :-1], bounds[:, 1:] - bounds[:, :-1]


def split_ranges(start: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split every range at its midpoint: left halves first, then right halves.

    Parameters
    ----------
    start, size : ``[..., K]`` int64 ranges.

    Returns
    -------
    cand_start, cand_size : ``[..., 2K]``; a range of size 1 keeps itself on the left and an
    empty right half. split : ``[..., 2K]`` bool, True where the parent had more than one block
    (only those children are new reads; single blocks were scored before).
    """
    left = (size + 1) // 2
    cand_start = torch.cat([start, start + left], dim=-1)
    cand_size = torch.cat([left, size - left], dim=-1)
    split = size > 1
    return cand_start, cand_size, torch.cat([split, split], dim=-1)


def select_top(cand_start: torch.Tensor, cand_size: torch.Tensor, scores: torch.Tensor, num_kept: int):
    """Keep the ``num_kept`` best of the 2K candidates (empty candidates score ``-inf``)."""
    top = scores.topk(num_kept, dim=-1, sorted=False).indices
    return cand_start.gather(-1, top), cand_size.gather(-1, top)


def finalize_blocks(start: torch.Tensor, size: torch.Tensor, sink_blocks: int) -> torch.Tensor:
    """Absolute block index of every single-block range (``-1`` for empty ones), sorted."""
    blocks = torch.where(size == 1, start + sink_blocks, torch.full_like(start, -1))
    return blocks.sort(dim=-1).values


def _gather_rows(flat: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``flat[idx]`` in ``dtype`` on ``idx.device``; gathers where ``flat`` lives (host tier: only rows move)."""
    rows = flat.index_select(0, idx.reshape(-1).to(flat.device))
    return rows.to(device=idx.device, dtype=dtype).view(*idx.shape, flat.shape[-1])


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # score matmuls run in the model's dtype (fp32 accumulation inside), softmax in fp32; fp16 on CPU is slow
    return torch.float32 if t.dtype == torch.float16 and t.device.type == "cpu" else t.dtype


def storage_view(t: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, Tcap, D]`` view over the whole buffer behind a K/V view ``[B, Hkv, T, D]``.

    Caches grow in a buffer with spare capacity (:class:`longctx.backends.dense.GrowingKV`) and
    hand out views of the live part; indexing rows of the buffer directly avoids copying the
    cache every decode step. Keys past the live length are never read (every index is below
    the block's end). Falls back to a contiguous copy for other layouts.
    """
    B, Hkv, T, D = t.shape
    sB, sH, sT, sD = t.stride()
    if sD == 1 and sT == D and sH % D == 0 and sH >= T * D and (B == 1 or sB == Hkv * sH):
        return t.as_strided((B, Hkv, sH // D, D), (Hkv * sH, sH, D, 1))
    return t.contiguous()


def _kv_base(B: int, M: int, Gm: int, G: int, Hkv: int, T: int, device: torch.device) -> torch.Tensor:
    """``[B, M]`` row offset of each mask head's KV head in ``k.reshape(B * Hkv * T, D)``."""
    kv_head = (torch.arange(M, device=device) * Gm) // G
    return (torch.arange(B, device=device).unsqueeze(1) * Hkv + kv_head.unsqueeze(0)) * T


def _chunk(per_block_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(per_block_bytes, 1))


# ---------------------------------------------------------------------------- mask estimation
def _score_ref(qg, k_flat, kv_base, cand_start, cand_size, config):
    """Score candidate ranges by their centre key block: ``[B, M, n, 2K]`` float32 (empty: -inf).

    qg : ``[B, M, n, R, D]`` pre-scaled query rows of each block (R = Gm x subsampled queries).
    """
    b_k = config.block_size_k
    offs = torch.arange(0, b_k, config.block_stride_k, device=qg.device)
    rep = config.sink_blocks + cand_start + cand_size // 2  # centre block of each range
    first = kv_base[:, :, None, None] + rep * b_k  # [B, M, n, 2K] row of the block's first key
    rows = (first.unsqueeze(-1) + offs).clamp(max=k_flat.shape[0] - 1).flatten(-2)  # [B, M, n, 2K * nk]
    kk = _gather_rows(k_flat, rows, qg.dtype)  # [B, M, n, 2K * nk, D]
    s = torch.matmul(qg, kk.transpose(-1, -2))  # [B, M, n, R, 2K * nk]
    s = s.amax(dim=-2).unflatten(-1, (cand_start.shape[-1], offs.numel())).amax(dim=-1).float()
    return s.masked_fill_(cand_size == 0, float("-inf"))


def _query_rows(q, starts, ends, q_offset, config, M, Gm, S):
    """Stride-subsampled query rows of blocks ``[starts, ends)``: ``[B, M, n, Gm * nq, D]`` (compute dtype)."""
    B, H, _, D = q.shape
    offs = torch.arange(0, rows_per_block(S, config), config.block_stride_q, device=q.device)
    rows = torch.minimum(starts.unsqueeze(1) + offs, ends.unsqueeze(1) - 1) - q_offset  # [n, nq]
    qr = q[:, :, rows].to(_compute_dtype(q))  # [B, H, n, nq, D]
    n, nq = rows.shape
    qr = qr.view(B, M, Gm, n, nq, D).transpose(2, 3)  # [B, M, n, Gm, nq, D]
    return qr.reshape(B, M, n, Gm * nq, D)


def hip_mask_ref(q: torch.Tensor, k: torch.Tensor, q_offset: int, config: Any) -> HiPMask:
    """Hierarchical top-k mask estimation, torch reference (the truth).

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, S, D]`` queries, **pre-scaled** by the softmax scale, at absolute positions
        ``[q_offset, q_offset + S)``.
    k : torch.Tensor
        ``[B, Hkv, T, D]`` keys (post-RoPE), ``T >= q_offset + S``; may live on another
        device (host tier): only the scored rows are moved.
    q_offset : int
        Absolute position of the first query.
    config : HiPConfig
        Block sizes, strides, k, sink and window.

    Returns
    -------
    HiPMask
        ``blocks [B, M, N, K]``, ``local_start [N]``, ``reads [N]``.
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    M, Gm = mask_heads(H, Hkv, config)
    K = config.mask_blocks
    starts, ends, local_start = block_geometry(S, q_offset, config, q.device)
    n_blocks = local_start // config.block_size_k - config.sink_blocks  # [N] search-region lengths
    nq = -(-rows_per_block(S, config) // config.block_stride_q)
    nk = -(-config.block_size_k // config.block_stride_k)
    k_full = storage_view(k)  # rows of the cache buffer: no copy of a growing cache
    k_flat = k_full.reshape(-1, D)
    kv_base = _kv_base(B, M, Gm, G, Hkv, k_full.shape[2], q.device)
    # per query block: gathered keys, scores and the query rows, float32
    chunk = _chunk(B * M * 4 * (2 * K * nk * D + Gm * nq * 2 * K * nk + Gm * nq * D))

    blocks, reads = [], []
    N = starts.numel()
    for c0 in range(0, N, chunk):
        sl = slice(c0, min(c0 + chunk, N))
        n = n_blocks[sl]
        start, size = initial_ranges(n, K)
        start = start.expand(B, M, -1, -1)
        size = size.expand(B, M, -1, -1)
        read = torch.zeros_like(n)
        qg = None
        for _ in range(num_iterations(int(n.max()), K)):
            if qg is None:
                qg = _query_rows(q, starts[sl], ends[sl], q_offset, config, M, Gm, S)
            cand_start, cand_size, split = split_ranges(start, size)
            scores = _score_ref(qg, k_flat, kv_base, cand_start, cand_size, config)
            read += ((cand_size > 0) & split).sum(dim=(0, 1, 3)) * nk
            start, size = select_top(cand_start, cand_size, scores, K)
        blocks.append(finalize_blocks(start, size, config.sink_blocks))
        reads.append(read)
    return HiPMask(torch.cat(blocks, dim=2), local_start, torch.cat(reads))


# ---------------------------------------------------------------------------- attention
def _key_lists(blocks, local_start, ends, sink_keys, local_len, config):
    """Keys attended by each query block: ``[B, M, n, L]`` int64, ``-1`` = none.

    L = sink keys + K * b_k mask keys + ``local_len`` local keys, in that order.
    """
    b_k = config.block_size_k
    B, M, n, K = blocks.shape
    dev = blocks.device
    sink = torch.arange(sink_keys, device=dev).expand(B, M, n, sink_keys)
    mask = blocks.unsqueeze(-1) * b_k + torch.arange(b_k, device=dev)  # [B, M, n, K, b_k]
    mask = torch.where(blocks.unsqueeze(-1) >= 0, mask, -1).flatten(-2)
    local = local_start.unsqueeze(1) + torch.arange(local_len, device=dev)  # [n, local_len]
    local = torch.where(local < ends.unsqueeze(1), local, -1).expand(B, M, n, local_len)
    return torch.cat([sink, mask, local], dim=-1)


def _causal_bias(starts, ends, local_start, R, Gm, sink_keys, mask_keys, local_len):
    """Additive ``[n, Gm * R, L]`` float32 bias (0 / -inf) of the sink and local keys, causal.

    Mask keys are never in a query's future (they lie below the local region), so their
    columns are 0; their validity per head is applied separately.
    """
    dev = starts.device
    qpos = (starts.unsqueeze(1) + torch.arange(R, device=dev)).repeat(1, Gm)  # [n, Gm * R]
    sink = torch.arange(sink_keys, device=dev)
    local = local_start.unsqueeze(1) + torch.arange(local_len, device=dev)  # [n, local_len]
    sink_ok = sink.view(1, 1, -1) <= qpos.unsqueeze(-1)
    local_ok = (local.unsqueeze(1) <= qpos.unsqueeze(-1)) & (local < ends.unsqueeze(1)).unsqueeze(1)
    n = starts.numel()
    ok = torch.cat([sink_ok.expand(n, -1, -1), torch.ones(n, Gm * R, mask_keys, dtype=torch.bool, device=dev), local_ok], -1)
    return torch.zeros(ok.shape, device=dev).masked_fill_(~ok, float("-inf"))


def hip_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    local_start: torch.Tensor,
    q_offset: int,
    config: Any,
    return_lse: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Block-sparse causal attention over mask blocks + sinks + local window, torch reference.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, S, D]`` queries, **pre-scaled** by the softmax scale, at positions
        ``[q_offset, q_offset + S)``.
    k, v : torch.Tensor
        ``[B, Hkv, T, D]``; may live on another device (host tier): only attended rows move.
    blocks : torch.Tensor
        ``[B, M, N, K]`` int64 key blocks per query block (``-1`` = none), all below
        ``local_start`` (see :func:`hip_mask_ref`).
    local_start : torch.Tensor
        ``[N]`` int64 first key of each block's local region.
    q_offset : int
    config : HiPConfig
    return_lse : bool, default True
        Also return the log-sum-exp (one more pass over the scores).

    Returns
    -------
    out : torch.Tensor
        ``[B, H, S, D]`` in ``q.dtype``.
    lse : torch.Tensor or None
        ``[B, H, S]`` float32 log-sum-exp of the (pre-scaled) scores.
    """
    B, H, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = H // Hkv
    M, K = blocks.shape[1], blocks.shape[3]
    Gm = H // M
    b_k = config.block_size_k
    starts, ends, _ = block_geometry(S, q_offset, config, q.device)
    local_start = local_start.to(q.device)
    blocks = blocks.to(q.device)
    N = starts.numel()
    R = rows_per_block(S, config)
    sink_keys = min(config.sink_blocks * b_k, T)
    local_len = int((ends - local_start).clamp(min=0).max())
    L = sink_keys + K * b_k + local_len
    dtype = _compute_dtype(q)
    k_full, v_full = storage_view(k), storage_view(v)  # rows of the cache buffers: no copy
    if k_full.shape != v_full.shape:
        k_full, v_full = k.contiguous(), v.contiguous()
    k_flat, v_flat = k_full.reshape(-1, D), v_full.reshape(-1, D)
    kv_base = _kv_base(B, M, Gm, G, Hkv, k_full.shape[2], q.device)
    # rows (g, i) of each block: g-th query head of the mask head, i-th query of the block
    qp = torch.nn.functional.pad(q, (0, 0, 0, N * R - S)) if N * R != S else q
    qb = qp.reshape(B, M, Gm, N, R, D).transpose(2, 3).reshape(B, M, N, Gm * R, D)
    chunk = _chunk(B * M * 4 * (2 * L * D + 2 * Gm * R * L + 2 * Gm * R * D))

    outs, lses = [], []
    for c0 in range(0, N, chunk):
        sl = slice(c0, min(c0 + chunk, N))
        idx = _key_lists(blocks[:, :, sl], local_start[sl], ends[sl], sink_keys, local_len, config)  # [B, M, n, L]
        rows = kv_base[:, :, None, None] + idx.clamp(min=0)
        kk, vv = _gather_rows(k_flat, rows, dtype), _gather_rows(v_flat, rows, dtype)  # [B, M, n, L, D]
        s = torch.matmul(qb[:, :, sl].to(dtype), kk.transpose(-1, -2)).float()  # [B, M, n, Gm * R, L]
        s += _causal_bias(starts[sl], ends[sl], local_start[sl], R, Gm, sink_keys, K * b_k, local_len)
        missing = blocks[:, :, sl] < 0  # short search regions leave mask slots unused
        if bool(missing.any()):
            cols = missing.unsqueeze(-1).expand(-1, -1, -1, -1, b_k).flatten(-2)  # [B, M, n, K * b_k]
            s[..., sink_keys : sink_keys + K * b_k].masked_fill_(cols.unsqueeze(-2), float("-inf"))
        if return_lse:
            lses.append(torch.logsumexp(s, dim=-1))  # every real query sees at least itself
        p = torch.softmax(s, dim=-1)
        outs.append(torch.matmul(p.to(dtype), vv))  # [B, M, n, Gm * R, D]
    out = torch.cat(outs, dim=2).view(B, M, N, Gm, R, D).transpose(2, 3).reshape(B, H, N * R, D)[:, :, :S]
    if not return_lse:
        return out.to(q.dtype), None
    lse = torch.cat(lses, dim=2).view(B, M, N, Gm, R).transpose(2, 3).reshape(B, H, N * R)[:, :, :S]
    return out.to(q.dtype), lse.contiguous()


# ---------------------------------------------------------------------------- C++ (CPU) and dispatch
def _cpp_module():
    """``longctx._C`` when it was built with the HiP kernels (csrc/hip.cpp), else ``None``."""
    try:
        from longctx import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "hip_attention") else None


def _np(t: torch.Tensor, dtype: torch.dtype = torch.float32):
    # zero-copy for contiguous tensors of the right dtype on the CPU
    return t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()


def hip_mask_cpp(q: torch.Tensor, k: torch.Tensor, q_offset: int, config: Any) -> HiPMask:
    """:func:`hip_mask_ref` fused in C++ (one OpenMP region; fp32 CPU tensors)."""
    B, H, S, D = q.shape
    starts, ends, local_start = block_geometry(S, q_offset, config, torch.device("cpu"))
    blocks, reads = _cpp_module().hip_mask(
        _np(q), _np(storage_view(k)), _np(starts, torch.int64), _np(ends, torch.int64), _np(local_start, torch.int64),
        q_offset, config.mask_blocks, config.block_size_k, config.block_stride_q, config.block_stride_k,
        rows_per_block(S, config), config.sink_blocks, bool(config.gqa_shared_mask),
    )
    reads = torch.from_numpy(reads).sum(dim=(0, 1))
    return HiPMask(torch.from_numpy(blocks).to(q.device), local_start.to(q.device), reads)


def hip_attention_cpp(q, k, v, blocks, local_start, q_offset, config) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hip_attention_ref` fused in C++ (online softmax per query block; fp32 CPU tensors)."""
    B, H, S, D = q.shape
    starts, ends, _ = block_geometry(S, q_offset, config, torch.device("cpu"))
    sink_keys = min(config.sink_blocks * config.block_size_k, k.shape[2])
    k_full, v_full = storage_view(k), storage_view(v)  # the kernel never reads past the live length
    if k_full.shape != v_full.shape:
        k_full, v_full = k.contiguous(), v.contiguous()
    out, lse = _cpp_module().hip_attention(
        _np(q), _np(k_full), _np(v_full), _np(blocks, torch.int64), _np(starts, torch.int64), _np(ends, torch.int64),
        _np(local_start, torch.int64), q_offset, config.block_size_k, rows_per_block(S, config), sink_keys,
    )
    return torch.from_numpy(out).to(device=q.device, dtype=q.dtype), torch.from_numpy(lse).to(q.device)


def _choose(q: torch.Tensor, k: torch.Tensor, impl: Optional[str]) -> str:
    """``triton`` / ``cpp`` / ``ref`` for these tensors; K/V on another device (offload) take ``ref``."""
    choice = pick_impl(q.device, impl)
    if k.device != q.device:
        return "ref"  # gathers where K/V live and moves only the rows it reads
    if choice == "cpp" and (q.device.type != "cpu" or _cpp_module() is None):
        return "ref"
    return choice


def hip_mask(q: torch.Tensor, k: torch.Tensor, q_offset: int, config: Any, impl: Optional[str] = None) -> HiPMask:
    """Mask estimation: Triton on CUDA, C++ on CPU, torch reference otherwise (``LONGCTX_OPS`` forces one).

    Same parameters and result as :func:`hip_mask_ref`; K/V on another device than ``q``
    (host-tier offload) always take the reference path, which moves only scored rows.
    """
    choice = _choose(q, k, impl)
    if choice == "triton":
        from longctx.triton_kernels.hip_mask import hip_mask_triton

        return hip_mask_triton(q, k, q_offset, config)
    if choice == "cpp":
        return hip_mask_cpp(q, k, q_offset, config)
    return hip_mask_ref(q, k, q_offset, config)


def hip_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    local_start: torch.Tensor,
    q_offset: int,
    config: Any,
    impl: Optional[str] = None,
    return_lse: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Block-sparse attention: Triton on CUDA, C++ on CPU, torch reference otherwise.

    Same parameters and result as :func:`hip_attention_ref` (the kernels always return the LSE).
    """
    choice = _choose(q, k, impl)
    if choice == "triton":
        from longctx.triton_kernels.hip_attention import hip_attention_triton

        return hip_attention_triton(q, k, v, blocks, local_start, q_offset, config)
    if choice == "cpp":
        return hip_attention_cpp(q, k, v, blocks, local_start, q_offset, config)
    return hip_attention_ref(q, k, v, blocks, local_start, q_offset, config, return_lse=return_lse)


def attended_counts(blocks: torch.Tensor, local_start: torch.Tensor, q_offset: int, S: int, T: int, config: Any):
    """Keys each query attends, summed over queries, per mask head: ``[B, M]`` int64.

    Sinks and local keys are counted causally (a query never sees a later key).
    """
    starts, ends, _ = block_geometry(S, q_offset, config, blocks.device)
    R = rows_per_block(S, config)
    qpos = starts.unsqueeze(1) + torch.arange(R, device=blocks.device)  # [N, R]
    real = qpos < ends.unsqueeze(1)
    sink = torch.clamp(qpos + 1, max=min(config.sink_blocks * config.block_size_k, T))
    local = (qpos + 1 - local_start.to(blocks.device).unsqueeze(1)).clamp(min=0)
    per_query = ((sink + local) * real).sum()
    mask_keys = (blocks >= 0).sum(dim=-1) * config.block_size_k  # [B, M, N]
    return per_query + (mask_keys * real.sum(dim=1)).sum(dim=-1)


def attended_mask(
    blocks: torch.Tensor, local_start: torch.Tensor, q_offset: int, S: int, T: int, num_heads: int, config: Any,
    rows: Optional[int] = None,
) -> torch.Tensor:
    """``[B, H, R, T]`` bool: which keys each of the last ``R = rows`` (default all ``S``) queries
    attends (diagnostics; O(R x T) memory, only the query blocks of those rows are expanded)."""
    B, M, N, K = blocks.shape
    dev = blocks.device
    R = S if rows is None else max(1, min(rows, S))
    b_k = config.block_size_k
    row = torch.arange(S - R, S, device=dev)  # [R] query indices within the call
    block_of = torch.div(row, config.block_size_q, rounding_mode="floor")  # [R]
    first = int(block_of[0])
    sub = blocks[:, :, first:]  # the query blocks holding those rows
    per_block = torch.zeros(B, M, sub.shape[2], T + b_k, dtype=torch.bool, device=dev)
    keys = (sub.clamp(min=0).unsqueeze(-1) * b_k + torch.arange(b_k, device=dev)).flatten(-2)
    valid = (sub >= 0).unsqueeze(-1).expand(-1, -1, -1, -1, b_k).flatten(-2)
    per_block.scatter_(-1, torch.where(valid, keys, T), True)
    per_block = per_block[..., :T]
    qpos = row + q_offset  # [R]
    kpos = torch.arange(T, device=dev)
    sink_keys = min(config.sink_blocks * b_k, T)
    fixed = (kpos < sink_keys) | (kpos >= local_start.to(dev)[block_of].unsqueeze(1))  # [R, T]
    att = (per_block[:, :, block_of - first] | fixed) & (kpos <= qpos.unsqueeze(1))  # [B, M, R, T]
    return att.repeat_interleave(num_heads // M, dim=1)


__all__ = [
    "HiPMask",
    "hip_mask",
    "hip_attention",
    "hip_mask_ref",
    "hip_attention_ref",
    "hip_mask_cpp",
    "hip_attention_cpp",
    "block_geometry",
    "storage_view",
    "mask_heads",
    "num_iterations",
    "initial_ranges",
    "split_ranges",
    "select_top",
    "finalize_blocks",
    "attended_counts",
    "attended_mask",
    "CHUNK_BYTES",
]
