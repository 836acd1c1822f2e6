"""StreamingLLM: attention sinks plus a recent window (Xiao et al., arXiv 2309.17453).

TriForce's draft level (arXiv 2404.11912 keeps 16 sinks and ``256 - 16 - gamma`` recent
tokens), usable as a backend of any patched model too.

What it stores: the first ``sinks`` prompt tokens and the most recent ``window +
rollback_reserve`` tokens, keys pre-RoPE (inverted with the model's own rotary module).
Each step rotates the held keys to their *cache slots* ``0 .. L-1`` and the new queries to
the last slots, as StreamingLLM does ("positions within the cache"), so no RoPE distance
exceeds the cache size however long the stream. Each query attends to the sinks and to the
``window`` tokens ending at itself; the reserve exists only so that rejected speculative
tokens can be rolled back without shrinking the window.

The prefill is exact causal attention over the whole prompt (the eviction happens after
it), so the draft's prompt states see everything once.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from longctx.backends import register_backend
from longctx.backends.base import BackendLayer, LayerContext
from longctx.backends.chunk_retrieval import prefill_attention
from longctx.backends.dense import grouped_attention
from longctx.config import StreamingConfig
from longctx.models import rotate_half


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE ``x [B, heads, S, D]`` with ``cos``/``sin`` ``[B|1, 1, S, R]`` (R rotated dims, fp32)."""
    r = cos.shape[-1]
    xr, xp = x[..., :r].float(), x[..., r:]
    out = xr * cos + rotate_half(xr) * sin
    return torch.cat([out.to(x.dtype), xp], dim=-1)


def window_mask(n_queries: int, n_keys: int, sinks: int, window: int, device: torch.device) -> torch.Tensor:
    """``[S, L]`` bool: query i (slot ``L - S + i``) sees sinks and the ``window`` slots ending at itself."""
    q_slot = torch.arange(n_keys - n_queries, n_keys, device=device).unsqueeze(1)
    k_slot = torch.arange(n_keys, device=device).unsqueeze(0)
    causal = k_slot <= q_slot
    return causal & ((k_slot < sinks) | (k_slot > q_slot - window))


@register_backend("streaming", StreamingConfig, "StreamingLLM: attention sinks + recent window (TriForce's draft cache)")
class StreamingLayer(BackendLayer):
    """Attention over sinks and a recent window, with slot-indexed positions.

    Parameters
    ----------
    config : StreamingConfig
    ctx : LayerContext
        ``ctx.rotary`` is needed for slot positions; without it the original positions are kept.
    """

    def __init__(self, config: StreamingConfig, ctx: LayerContext):
        super().__init__(config, ctx)
        self.k: Optional[torch.Tensor] = None  # [B, Hkv, L, D] pre-RoPE when slot positions are used
        self.v: Optional[torch.Tensor] = None
        self.prompt_len = 0
        self.generated = 0
        self._slot_cs: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # cos/sin of slots 0..n-1
        self._steps = 0
        self._evicted = 0

    @property
    def _slots(self) -> bool:
        return self.config.slot_positions and self.ctx.rotary is not None

    @property
    def capacity(self) -> int:
        """Most tokens held: sinks + window + rollback reserve."""
        c = self.config
        return c.sinks + c.window + c.rollback_reserve

    # ------------------------------------------------------------ positions
    def _slot_cos_sin(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[1, 1, n, R]`` of slots ``0 .. n-1`` (computed once, grown on demand)."""
        if self._slot_cs is None or self._slot_cs[0].shape[2] < n or self._slot_cs[0].device != like.device:
            size = max(n, self.capacity + 64)
            pos = torch.arange(size, device=like.device).unsqueeze(0)
            self._slot_cs = self.ctx.rotary.cos_sin(pos, like)
        cos, sin = self._slot_cs
        return cos[:, :, :n], sin[:, :, :n]

    def _unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.ctx.rotary.invert(x, positions) if self._slots else x

    def _keep(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hold ``k``/``v`` ``[B, Hkv, L, D]``, evicting the oldest non-sink tokens beyond capacity."""
        L, cap, sinks = k.shape[2], self.capacity, self.config.sinks
        if L > cap:
            keep = torch.cat([torch.arange(sinks), torch.arange(L - (cap - sinks), L)]).to(k.device)
            k, v = k.index_select(2, keep), v.index_select(2, keep)
            self._evicted += L - cap
        self.k, self.v = k.contiguous(), v.contiguous()

    # ------------------------------------------------------------ contract
    def prefill(self, q, k, v, positions):
        # q: [B, H, Sq, D]; k, v: [B, Hkv, S, D] post-RoPE at the original positions [B, S]
        S, Sq = k.shape[2], q.shape[2]
        out = prefill_attention(q, k, v, self.ctx.scale)
        self.prompt_len, self.generated = S, 0
        if S > self.capacity:  # evict before un-rotating: only the held keys need it
            keep = torch.cat([torch.arange(self.config.sinks), torch.arange(S - (self.capacity - self.config.sinks), S)])
            keep = keep.to(k.device)
            k, v, positions = k.index_select(2, keep), v.index_select(2, keep), positions.index_select(1, keep)
            self._evicted += S - self.capacity
        self._keep(self._unrotate(k, positions), v)
        self.attended = None
        return out

    def decode(self, q, k, v, positions):
        # q: [B, H, S, D]; k, v: [B, Hkv, S, D] post-RoPE at their original positions [B, S]
        if self.k is None:
            raise RuntimeError("decode() called before prefill() on a streaming layer")
        S = q.shape[2]
        self._keep(torch.cat([self.k, self._unrotate(k, positions)], 2), torch.cat([self.v, v], 2))
        self.generated += S
        L = self.k.shape[2]
        keys = self.k
        if self._slots:
            # held keys at slots 0..L-1, the new queries at the last S slots
            cos, sin = self._slot_cos_sin(L, q)
            keys = _rotate(self.k, cos, sin)
            q = _rotate(self.ctx.rotary.invert(q, positions), cos[:, :, L - S :], sin[:, :, L - S :])
        c = self.config
        if L <= c.sinks + c.window:
            out = grouped_attention(q, keys, self.v, self.ctx.scale, L - S)  # the window covers every held key
        else:
            out = _masked_attention(q, keys, self.v, self.ctx.scale, window_mask(S, L, c.sinks, c.window, q.device))
        self._steps += 1
        self.attended = None
        return out

    def rollback(self, n_tokens: int) -> None:
        self._check_rollback(n_tokens, self.generated)
        if n_tokens:
            held_recent = self.k.shape[2] - min(self.config.sinks, self.k.shape[2])
            drop = min(n_tokens, held_recent)  # tokens evicted earlier cannot come back
            self.k, self.v = self.k[:, :, : self.k.shape[2] - drop], self.v[:, :, : self.v.shape[2] - drop]
            self.generated -= n_tokens

    @property
    def seq_length(self) -> int:
        return self.prompt_len + self.generated

    def memory(self) -> dict[str, int]:
        nbytes = 0 if self.k is None else self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        return {"device": nbytes, "host": 0}

    def stats(self) -> dict[str, Any]:
        held = 0 if self.k is None else self.k.shape[2]
        return {
            "decode_steps": self._steps,
            "keys_held": held,
            "keys_per_step": min(held, self.config.sinks + self.config.window),
            "evicted": self._evicted,
            "slot_positions": self._slots,
            "fallback_dense": False,
        }


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """Attention with an explicit ``[S, L]`` bool mask shared by all heads; q ``[B, H, S, D]``, k/v ``[B, Hkv, L, D]``."""
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qg = q.reshape(B, Hkv, G * S, D)
    out = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(G, 1), scale=scale)
    return out.reshape(B, H, S, D)
