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
from longctx.ops.reference import causal_attention_ref, sparse_attention_ref


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
        # decode: one query per head, no mask (the whole cache is in the past); grouped matmuls are
        # the fastest dense path on CPU (~3x SDPA, see environment notes)
        out, _ = sparse_attention_ref(q, k, v, None, scale)
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


@register_backend("dense", DenseConfig, "exact attention over the full cache (reference)")
class DenseLayer(BackendLayer):
    """Exact attention over the full KV cache.

    Parameters
    ----------
    config : DenseConfig
    ctx : LayerContext
    """

    def __init__(self, config: DenseConfig, ctx: LayerContext):
        super().__init__(config, ctx)
        self.k: Optional[torch.Tensor] = None  # [B, Hkv, T, D]
        self.v: Optional[torch.Tensor] = None
        self.prompt_len = 0
        self._device: Optional[torch.device] = None
        self._steps = 0

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        if self.config.offload:
            return t.to(self.ctx.host_device, non_blocking=True)
        return t

    def prefill(self, q, k, v, positions):
        self._device = q.device
        self.k, self.v = self._store(k), self._store(v)
        self.prompt_len = k.shape[2]
        out = grouped_attention(q, k, v, self.ctx.scale, 0, self.ctx.sliding_window)
        self._record(q.shape[2])
        return out

    def decode(self, q, k, v, positions):
        if self.k is None:
            raise RuntimeError("decode() called before prefill() on a dense layer")
        self.k = torch.cat([self.k, self._store(k)], dim=2)
        self.v = torch.cat([self.v, self._store(v)], dim=2)
        T = self.k.shape[2]
        kk, vv = self.k.to(q.device), self.v.to(q.device)
        out = grouped_attention(q, kk, vv, self.ctx.scale, T - q.shape[2], self.ctx.sliding_window)
        self._steps += 1
        self._record(q.shape[2])
        return out

    def _record(self, S: int) -> None:
        # dense attends every causal key: leave ``attended`` as None ("all causal keys")
        self.attended = None

    def rollback(self, n_tokens: int) -> None:
        self._check_rollback(n_tokens, self.seq_length - self.prompt_len)
        if n_tokens:
            self.k = self.k[:, :, :-n_tokens]
            self.v = self.v[:, :, :-n_tokens]

    @property
    def seq_length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def memory(self) -> dict[str, int]:
        nbytes = 0 if self.k is None else self.k.numel() * self.k.element_size() * 2
        tier = "host" if self.config.offload else "device"
        return {"device": 0, "host": 0, tier: nbytes}

    def stats(self) -> dict[str, Any]:
        return {"decode_steps": self._steps, "keys_per_step": self.seq_length, "fallback_dense": False}
