"""StreamingLLM: attention sinks plus a recent window (Xiao et al., arXiv 2309.17453).

TriForce's draft level (arXiv 2404.11912 keeps 16 sinks and ``256 - 16 - gamma`` recent
tokens), usable as a backend of any patched model too.

What it stores: the first ``sinks`` prompt tokens and the most recent ``window +
rollback_reserve`` tokens (up to ``COMPACT_EVERY`` more between two evictions), keys
pre-RoPE (inverted with the model's own rotary module) and rotated to their *cache slots*
``0 .. L-1``; new queries sit at the last slots, as StreamingLLM does ("positions within
the cache"), so no RoPE distance exceeds the cache size however long the stream. Each query
attends to the sinks and to the ``window`` tokens ending at itself; the reserve exists only
so that rejected speculative tokens can be rolled back without shrinking the window.

The prefill is exact causal attention over the whole prompt (the eviction happens after
it), so the draft's prompt states see everything once.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from longctx.backends import register_backend
from longctx.backends.base import BackendLayer, LayerContext
from longctx.backends.chunk_retrieval import cached_attention, prefill_attention
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


COMPACT_EVERY = 64  # tokens held beyond capacity before one eviction, so keys are re-rotated once per 64 steps


@register_backend("streaming", StreamingConfig, "StreamingLLM: attention sinks + recent window (TriForce's draft)")
class StreamingLayer(BackendLayer):
    """Attention over sinks and a recent window, with slot-indexed positions.

    Storage: pre-RoPE keys ``kp``, the same keys rotated to their slots ``kr`` and values,
    in buffers with room for ``COMPACT_EVERY`` tokens beyond capacity; eviction is lazy (when
    that room is used up), so a new token's key is rotated once and the held keys are
    re-rotated to their new slots once per ``COMPACT_EVERY`` steps.

    Parameters
    ----------
    config : StreamingConfig
    ctx : LayerContext
        ``ctx.rotary`` is needed for slot positions; without it the original positions are kept.
    """

    def __init__(self, config: StreamingConfig, ctx: LayerContext):
        super().__init__(config, ctx)
        self.kp: Optional[torch.Tensor] = None  # [B, Hkv, alloc, D] pre-RoPE keys (post-RoPE without slots)
        self.kr: Optional[torch.Tensor] = None  # [B, Hkv, alloc, D] keys rotated to their slots (kp without slots)
        self.v: Optional[torch.Tensor] = None
        self.length = 0  # tokens held
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
        """Tokens held after an eviction: sinks + window + rollback reserve."""
        c = self.config
        return c.sinks + c.window + c.rollback_reserve

    # ------------------------------------------------------------ positions
    def _slot_cos_sin(self, start: int, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[1, 1, end - start, R]`` of slots ``start .. end-1`` (a table computed once, grown on demand)."""
        if self._slot_cs is None or self._slot_cs[0].shape[2] < end or self._slot_cs[0].device != like.device:
            size = max(end, self.capacity + COMPACT_EVERY + 64)
            self._slot_cs = self.ctx.rotary.cos_sin(torch.arange(size, device=like.device).unsqueeze(0), like)
        cos, sin = self._slot_cs
        return cos[:, :, start:end], sin[:, :, start:end]

    def _to_slots(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate pre-RoPE ``x [B, h, S, D]`` to slots ``start .. start+S-1``."""
        return _rotate(x, *self._slot_cos_sin(start, start + x.shape[2], x)) if self._slots else x

    # ------------------------------------------------------------ storage
    def _store(self, kp: torch.Tensor, v: torch.Tensor) -> None:
        """Hold exactly ``kp``/``v`` ``[B, Hkv, L, D]`` (fresh buffers with room to grow)."""
        B, Hkv, L, D = kp.shape
        alloc = max(L, self.capacity) + COMPACT_EVERY + 16
        self.kp = kp.new_empty(B, Hkv, alloc, D)
        self.kr = self.kp if not self._slots else kp.new_empty(B, Hkv, alloc, D)
        self.v = v.new_empty(B, Hkv, alloc, D)
        self.kp[:, :, :L].copy_(kp)
        self.v[:, :, :L].copy_(v)
        if self._slots:
            self.kr[:, :, :L].copy_(self._to_slots(kp, 0))
        self.length = L

    def _evict(self) -> None:
        """Keep the sinks and the last ``window + rollback_reserve`` tokens; re-rotate them to their new slots."""
        L, cap, sinks = self.length, self.capacity, self.config.sinks
        keep = torch.cat([torch.arange(sinks), torch.arange(L - (cap - sinks), L)]).to(self.kp.device)
        self._evicted += L - cap
        self._store(self.kp.index_select(2, keep), self.v.index_select(2, keep))

    def _append(self, kp: torch.Tensor, v: torch.Tensor) -> None:
        S = kp.shape[2]
        if self.length + S > self.kp.shape[2]:
            L = self.length
            self._store(torch.cat([self.kp[:, :, :L], kp], 2), torch.cat([self.v[:, :, :L], v], 2))
        else:
            L = self.length
            self.kp[:, :, L : L + S].copy_(kp)
            self.v[:, :, L : L + S].copy_(v)
            if self._slots:
                self.kr[:, :, L : L + S].copy_(self._to_slots(kp, L))
            self.length = L + S
        if self.length > self.capacity + COMPACT_EVERY:
            self._evict()

    # ------------------------------------------------------------ contract
    def prefill(self, q, k, v, positions):
        # q: [B, H, Sq, D]; k, v: [B, Hkv, S, D] post-RoPE at the original positions [B, S]
        S = k.shape[2]
        out = prefill_attention(q, k, v, self.ctx.scale)
        self.prompt_len, self.generated = S, 0
        if S > self.capacity:  # evict before un-rotating: only the held keys need it
            sinks = self.config.sinks
            keep = torch.cat([torch.arange(sinks), torch.arange(S - (self.capacity - sinks), S)]).to(k.device)
            k, v, positions = k.index_select(2, keep), v.index_select(2, keep), positions.index_select(1, keep)
            self._evicted += S - self.capacity
        self._store(self.ctx.rotary.invert(k, positions) if self._slots else k, v)
        self.attended = None
        return out

    def decode(self, q, k, v, positions):
        # q: [B, H, S, D]; k, v: [B, Hkv, S, D] post-RoPE at their original positions [B, S]
        if self.kp is None:
            raise RuntimeError("decode() called before prefill() on a streaming layer")
        S = q.shape[2]
        if self._slots:
            cos, sin = self.ctx.rotary.cos_sin(positions, q)  # shared by the q and k inversions
            k, q = _unrotate(k, cos, sin), _unrotate(q, cos, sin)
        self._append(k, v)
        self.generated += S
        L = self.length
        q = self._to_slots(q, L - S)  # the new queries sit at the last S slots
        kr, vv = self.kr[:, :, :L], self.v[:, :, :L]
        c = self.config
        if L <= c.sinks + c.window:  # the window covers every held key
            out = cached_attention(q, kr, vv, self.ctx.scale)
        elif S == 1:
            keys = torch.cat([kr[:, :, : c.sinks], kr[:, :, L - c.window :]], 2)
            vals = torch.cat([vv[:, :, : c.sinks], vv[:, :, L - c.window :]], 2)
            out = cached_attention(q, keys, vals, self.ctx.scale)
        else:
            out = _masked_attention(q, kr, vv, self.ctx.scale, window_mask(S, L, c.sinks, c.window, q.device))
        self._steps += 1
        self.attended = self._attended_mask(q, L) if self.record_attended else None
        return out

    def _attended_mask(self, q: torch.Tensor, L: int) -> torch.Tensor:
        """``[B, H, R, T]`` bool over the original token indices: the sinks and the window of each of
        the last ``R`` queries (:meth:`attended_rows`)."""
        B, H, S, _ = q.shape
        T, sinks = self.seq_length, self.config.sinks
        R = self.attended_rows(S)
        by_slot = window_mask(S, L, sinks, self.config.window, q.device)[S - R:]  # [R, L]
        slot = torch.arange(L, device=q.device)
        index = torch.where(slot < sinks, slot, slot + (T - L))  # held: the sinks, then the last L - sinks tokens
        mask = torch.zeros(R, T, dtype=torch.bool, device=q.device)
        mask[:, index] = by_slot
        return mask.expand(B, H, R, T)

    def rollback(self, n_tokens: int) -> None:
        self._check_rollback(n_tokens, self.generated)
        if n_tokens:
            drop = min(n_tokens, self.length - min(self.config.sinks, self.length))  # evicted tokens cannot come back
            self.length -= drop
            self.generated -= n_tokens

    @property
    def seq_length(self) -> int:
        return self.prompt_len + self.generated

    def memory(self) -> dict[str, int]:
        if self.kp is None:
            return {"device": 0, "host": 0}
        per_token = self.kp[:, :, :1].numel() * self.kp.element_size()
        n_key_copies = 2 if self._slots else 1
        return {"device": self.length * per_token * (n_key_copies + 1), "host": 0}

    def stats(self) -> dict[str, Any]:
        return {
            "decode_steps": self._steps,
            "keys_held": self.length,
            "keys_per_step": min(self.length, self.config.sinks + self.config.window),
            "evicted": self._evicted,
            "slot_positions": self._slots,
            "fallback_dense": False,
        }


def _unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE given its ``cos``/``sin`` ``[B, 1, S, R]`` (dividing out ``cos² + sin²``, as RotaryHelper.invert)."""
    r = cos.shape[-1]
    xr, xp = x[..., :r].float(), x[..., r:]
    out = (xr * cos - rotate_half(xr) * sin) / (cos * cos + sin * sin)
    return torch.cat([out.to(x.dtype), xp], dim=-1)


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor
) -> torch.Tensor:
    """Attention with an explicit ``[S, L]`` bool mask shared by all heads.

    q ``[B, H, S, D]``, k/v ``[B, Hkv, L, D]`` -> ``[B, H, S, D]``.
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qg = q.reshape(B, Hkv, G * S, D)
    out = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(G, 1), scale=scale)
    return out.reshape(B, H, S, D)
