"""Dense attention: the reference implementation of the backend contract.

Holds the whole K/V cache (on the device tier, or the host tier with ``offload=True``)
and attends exactly. Every sparse backend is tested against it.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from longctx.backends import register_backend
from longctx.backends.base import BackendLayer, LayerContext
from longctx.config import DenseConfig
from longctx.ops import merge_states, sparse_attention
from longctx.ops.reference import causal_attention_ref

# most new tokens per call for which grouped_attention splits cached keys from the causal block
# (the block is materialised as [G*S, S] scores)
SPLIT_MAX_QUERIES = 256


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: Optional[int], window: Optional[int] = None
) -> torch.Tensor:
    """Exact attention by grouped matmuls (the fast dense path on CPU, see environment notes).

    Parameters
    ----------
    q : ``[B, H, S, D]``; k, v : ``[B, Hkv, T, D]``.
    scale : softmax scale.
    causal_offset : key index of the first query (``T - S`` for a cache), or ``None`` for no mask.
    window : optional sliding window length.

    Returns
    -------
    ``[B, H, S, D]`` in ``q.dtype``.
    """
    B, H, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = H // Hkv
    if S == 1 and window is None:
        # decode: one query per head, no mask (the whole cache is in the past). The ops dispatch picks
        # the fastest exact path per device: the fused C++ kernel on CPU (~1.9x grouped matmuls, which
        # are ~3x SDPA; see BENCHMARKS.md), Triton on CUDA
        out, _ = sparse_attention(q, k, v, None, scale)
        return out
    if window is None and causal_offset == 0 and S == T and q.dtype == k.dtype:
        # full causal prefill: SDPA's own causal path (no [G*S, T] mask materialised, ~5x faster on CPU)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=G > 1)
    if (window is None and causal_offset is not None and causal_offset == T - S and 0 < causal_offset
            and 1 < S <= SPLIT_MAX_QUERIES and q.dtype == k.dtype):
        # a few new tokens on a cache (speculative verification, small chunks): the cached keys hold no
        # mask, so the ops dispatch's unmasked path (C++ on CPU) attends them and the S x S causal block
        # is merged in by log-sum-exp (~1.2x SDPA with a [G*S, T] mask at S = 7..128, 16K keys, CPU)
        past, lse_past = sparse_attention(q, k[:, :, :causal_offset], v[:, :, :causal_offset], None, scale)
        new, lse_new = causal_attention_ref(q, k[:, :, causal_offset:], v[:, :, causal_offset:], scale=scale, q_offset=0)
        out, _ = merge_states(past, lse_past, new, lse_new)
        return out
    if window is None and causal_offset is not None and q.dtype == k.dtype:
        # SDPA with an explicit causal mask on the GQA-grouped layout
        qi = torch.arange(S, device=q.device).unsqueeze(1) + causal_offset
        kj = torch.arange(T, device=q.device).unsqueeze(0)
        mask = kj <= qi
        qg = q.reshape(B, Hkv, G * S, D)
        mask_g = mask.repeat(G, 1)  # [G*S, T], rows ordered (g, s)
        out = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=mask_g, scale=scale)
        return out.reshape(B, H, S, D)
    out, _ = causal_attention_ref(q, k, v, scale=scale, q_offset=causal_offset, window=window)
    return out


class GrowingKV:
    """K/V storage with amortised O(1) appends (capacity grows by 1.5x), views of the live part.

    ``torch.cat`` per decode step would copy the whole cache every token, which at 128K
    costs more than the attention itself.

    Parameters
    ----------
    k, v : torch.Tensor
        ``[B, Hkv, T, D]`` initial contents (copied into the buffer).
    device : torch.device
        Where the buffer lives.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, device: torch.device, reserve: int = 256):
        B, Hkv, T, D = k.shape
        pin = device.type == "cpu" and k.device.type == "cuda"
        self.k = torch.empty(B, Hkv, T + reserve, D, dtype=k.dtype, device=device, pin_memory=pin)
        self.v = torch.empty_like(self.k)
        self.k[:, :, :T].copy_(k)
        self.v[:, :, :T].copy_(v)
        self.length = T

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``[B, Hkv, S, D]`` new keys and values."""
        S = k.shape[2]
        if self.length + S > self.k.shape[2]:
            cap = max(int(self.k.shape[2] * 1.5), self.length + S)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.empty(*old.shape[:2], cap, old.shape[3], dtype=old.dtype, device=old.device)
                new[:, :, : self.length].copy_(old[:, :, : self.length])
                setattr(self, name, new)
        self.k[:, :, self.length : self.length + S].copy_(k)
        self.v[:, :, self.length : self.length + S].copy_(v)
        self.length += S

    def truncate(self, length: int) -> None:
        self.length = length

    def keys(self) -> torch.Tensor:
        return self.k[:, :, : self.length]

    def values(self) -> torch.Tensor:
        return self.v[:, :, : self.length]

    def nbytes(self) -> int:
        """Bytes of the live K and V (the reserve is not counted)."""
        return 2 * self.k[:, :, : self.length].numel() * self.k.element_size()


@register_backend("dense", DenseConfig, "exact attention over the full cache (reference)")
class DenseLayer(BackendLayer):
    """Exact attention over the full KV cache.

    Parameters
    ----------
    config : DenseConfig
        ``offload=True`` keeps K/V on the host tier.
    ctx : LayerContext
    """

    def __init__(self, config: DenseConfig, ctx: LayerContext):
        super().__init__(config, ctx)
        self.kv: Optional[GrowingKV] = None
        self.prompt_len = 0
        self._steps = 0

    def prefill(self, q, k, v, positions):
        tier = self.ctx.host_device if self.config.offload else k.device
        self.kv = GrowingKV(k, v, tier)
        self.prompt_len = k.shape[2]
        out = grouped_attention(q, k, v, self.ctx.scale, k.shape[2] - q.shape[2], self.ctx.sliding_window)
        self.attended = None  # dense attends every causal key
        return out

    def decode(self, q, k, v, positions):
        if self.kv is None:
            raise RuntimeError("decode() called before prefill() on a dense layer")
        self.kv.append(k, v)
        kk, vv = self.kv.keys().to(q.device), self.kv.values().to(q.device)
        out = grouped_attention(q, kk, vv, self.ctx.scale, kk.shape[2] - q.shape[2], self.ctx.sliding_window)
        self._steps += 1
        self.attended = None
        return out

    def rollback(self, n_tokens: int) -> None:
        self._check_rollback(n_tokens, self.seq_length - self.prompt_len)
        if n_tokens:
            self.kv.truncate(self.kv.length - n_tokens)

    @property
    def seq_length(self) -> int:
        return 0 if self.kv is None else self.kv.length

    def memory(self) -> dict[str, int]:
        nbytes = 0 if self.kv is None else self.kv.nbytes()
        tier = "host" if self.config.offload else "device"
        return {"device": 0, "host": 0, tier: nbytes}

    def stats(self) -> dict[str, Any]:
        return {"decode_steps": self._steps, "keys_per_step": self.seq_length, "fallback_dense": False}
