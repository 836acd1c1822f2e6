"""HiP: hierarchically pruned attention with sparse prefill and sparse decode.

Based on HiP Attention (Lee et al., ICLR 2025, https://arxiv.org/abs/2406.09827). The layer
holds the full K/V cache (on the device tier, or the host tier with ``offload=True``). Every
query block attends to the top ``k`` keys found by a hierarchical tree search (O(T log T) at
prefill, O(k log T) key reads per refresh at decode), plus ``sink`` first tokens and a local
``window``; see :mod:`longctx.ops.hip` for the algorithm and its geometry.

At decode the mask of the newest query block is kept and reused for ``refresh_interval``
steps: in between, the keys appended since the refresh are covered by the local region,
which keeps its start, so no key becomes unreachable. The first ``dense_layers`` layers (and
layers with a model sliding window) attend densely. With ``dense_prefill=True`` the prompt is
attended densely and the first decode step estimates the first mask (the paper's dense-prefill
setting).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from longctx.backends import register_backend
from longctx.backends.base import BackendLayer, LayerContext
from longctx.backends.dense import GrowingKV, grouped_attention
from longctx.config import HiPConfig
from longctx.ops.hip import attended_counts, attended_mask, hip_attention, hip_mask, mask_heads

logger = logging.getLogger(__name__)


@register_backend("hip", HiPConfig, "HiP: hierarchical top-k block mask + sinks + window, sparse prefill and decode")
class HiPLayer(BackendLayer):
    """One decoder layer's HiP cache and attention.

    Parameters
    ----------
    config : HiPConfig
    ctx : LayerContext
        ``ctx.layer_idx < config.dense_layers`` makes the layer dense.
    """

    def __init__(self, config: HiPConfig, ctx: LayerContext):
        super().__init__(config, ctx)
        self.kv: Optional[GrowingKV] = None  # [B, Hkv, T, D], on the host tier when offloaded
        self.prompt_len = 0
        self.dense = ctx.layer_idx < config.dense_layers or ctx.sliding_window is not None
        # cached mask of the newest query block: blocks [B, M, 1, K], local_start [1]
        self._mask: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._since_refresh = 0
        self._stats: dict[str, Any] = {
            "prefill_tokens": 0,
            "decode_steps": 0,
            "mask_refreshes": 0,
            "keys_scored": 0,  # key vectors read by the mask search, summed over batch x mask heads
            "keys_attended": 0,  # (query, key) pairs attended, summed over batch x mask heads
            "bytes_to_device": 0,  # host-tier rows moved for decode (offload)
            "keys_scored_per_block": 0.0,  # last estimation: reads per (mask head, query block)
            "keys_attended_per_query": 0.0,  # last call
            "keys_per_step": 0.0,  # last decode step: keys read per mask head (search + attention)
        }

    # ---------------------------------------------------------------- helpers
    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        ctx = self.ctx
        if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
            raise ValueError(
                f"HiP requires q [B, H, S, D] and k, v [B, Hkv, S, D] of one shape "
                f"(got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"
            )
        B, H, S, D = q.shape
        # at prefill the queries may be the last S of the prompt's T keys (bench, chunked use)
        T = k.shape[2] if self.kv is None and k.shape[2] >= S else S
        expected = (B, ctx.num_kv_heads, T, ctx.head_dim)
        if H != ctx.num_heads or D != ctx.head_dim or tuple(k.shape) != expected:
            raise ValueError(
                f"HiP requires q [B, {ctx.num_heads}, S, {ctx.head_dim}] and k, v {list(expected)} "
                f"(got q {tuple(q.shape)}, k {tuple(k.shape)})"
            )
        if S == 0:
            raise ValueError("HiP requires at least one query token (got S=0)")
        if self.kv is not None and B != self.kv.k.shape[0]:
            raise ValueError(f"HiP decode requires the prefill batch size {self.kv.k.shape[0]} (got {B})")

    def _keep_mask(self, blocks: torch.Tensor, local_start: torch.Tensor) -> None:
        # only the newest query block's mask serves later decode steps
        self._mask = (blocks[:, :, -1:].clone(), local_start[-1:].clone())
        self._since_refresh = 0

    def _sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, refresh: bool,
                decoding: bool) -> torch.Tensor:
        """HiP attention of ``q`` (``[B, H, S, D]`` at positions ``q_offset...``) over ``k, v`` ``[B, Hkv, T, D]``."""
        cfg = self.config
        B, H, S, _ = q.shape
        T = k.shape[2]
        qs = q * self.ctx.scale  # HiP kernels take pre-scaled queries (official v1.x convention)
        scored = 0
        if refresh:
            mask = hip_mask(qs, k, q_offset, cfg)
            blocks, local_start = mask.blocks, mask.local_start
            scored = int(mask.reads.sum())
            M = blocks.shape[1]
            self._stats["mask_refreshes"] += 1
            self._stats["keys_scored"] += scored
            self._stats["keys_scored_per_block"] = scored / (B * M * blocks.shape[2])
            self._keep_mask(blocks, local_start)
            logger.debug("HiP layer %d: mask of %d query block(s) at T=%d, %d key reads", self.ctx.layer_idx,
                         blocks.shape[2], T, scored)
        else:
            blocks, local_start = self._mask
        out, _ = hip_attention(qs, k, v, blocks, local_start, q_offset, cfg, return_lse=False)
        M = blocks.shape[1]
        attended = int(attended_counts(blocks, local_start, q_offset, S, T, cfg).sum())
        self._stats["keys_attended"] += attended
        self._stats["keys_attended_per_query"] = attended / (B * M * S)
        if decoding:
            self._stats["keys_per_step"] = (scored + attended) / (B * M * S)
            if k.device != q.device:  # offload: only the scored rows and the attended K/V rows move
                sink_keys = min(cfg.sink_blocks * cfg.block_size_k, T)
                listed = int((blocks >= 0).sum()) * cfg.block_size_k
                listed += B * M * int((sink_keys + T - local_start.clamp(max=T)).sum())
                self._stats["bytes_to_device"] += (scored + 2 * listed) * k.shape[-1] * k.element_size()
        if self.record_attended:
            self.attended = attended_mask(blocks, local_start, q_offset, S, T, H, cfg, rows=self.attended_rows(S))
        return out

    # ---------------------------------------------------------------- the contract
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._check(q, k, v)
        if self.kv is not None:
            raise RuntimeError("HiP prefill() called twice on one layer; use decode() to append tokens")
        self.prompt_len = k.shape[2]
        self._stats["prefill_tokens"] += q.shape[0] * q.shape[2]
        if self.dense or self.config.dense_prefill:
            out = grouped_attention(q, k, v, self.ctx.scale, k.shape[2] - q.shape[2], self.ctx.sliding_window)
            self.attended = None
        else:
            out = self._sparse(q, k, v, k.shape[2] - q.shape[2], refresh=True, decoding=False)  # device copy
        self.kv = GrowingKV(k, v, self.ctx.host_device if self.config.offload else k.device)
        return out

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.kv is None:
            raise RuntimeError("decode() called before prefill() on a HiP layer")
        self._check(q, k, v)
        self.kv.append(k, v)
        S, T = q.shape[2], self.seq_length
        self._stats["decode_steps"] += 1
        if self.dense:
            self.attended = None
            self._stats["keys_per_step"] = T
            kk, vv = self.kv.keys().to(q.device), self.kv.values().to(q.device)
            return grouped_attention(q, kk, vv, self.ctx.scale, T - S, self.ctx.sliding_window)
        refresh = (
            self._mask is None
            or self._since_refresh >= self.config.refresh_interval
            or S > self.config.block_size_q  # several query blocks: estimate each
        )
        out = self._sparse(q, self.kv.keys(), self.kv.values(), T - S, refresh, decoding=True)
        self._since_refresh += 1
        return out

    def rollback(self, n_tokens: int) -> None:
        self._check_rollback(n_tokens, self.seq_length - self.prompt_len)
        if not n_tokens:
            return
        self.kv.truncate(self.kv.length - n_tokens)
        # a cached mask stays valid while its blocks and local start lie inside the cache
        if self._mask is not None and int(self._mask[1][0]) > self.seq_length:
            self._mask = None

    @property
    def seq_length(self) -> int:
        return 0 if self.kv is None else self.kv.length

    def memory(self) -> dict[str, int]:
        kv = 0 if self.kv is None else self.kv.nbytes()
        mem = {"device": 0, "host": 0}
        mem["host" if self.config.offload else "device"] += kv
        if self._mask is not None:
            mem["device"] += sum(t.numel() * t.element_size() for t in self._mask)
        return mem

    def stats(self) -> dict[str, Any]:
        M = 0
        if self.kv is not None:
            M = mask_heads(self.ctx.num_heads, self.ctx.num_kv_heads, self.config)[0]
        return {**self._stats, "dense": self.dense, "fallback_dense": self.dense, "mask_heads": M}
