"""RetrievalAttention: exact attention over a static set, ANNS retrieval over the rest.

Based on RetrievalAttention (https://arxiv.org/abs/2409.10516). The device tier holds a
static set, the first ``n_sink`` tokens and the most recent ``window`` tokens, attended
exactly. Every other token's K/V goes to the host tier, where an index per query head
(built from the prompt's queries, see :mod:`longctx.index.attention_aware`) finds the
``top_k`` keys of each decode query; attention over them runs on the host tier and is
merged with the static part by a max-shifted log-sum-exp (:func:`longctx.ops.merge_states`).
The heads of a GQA group attend the union of their retrieved keys (one fused
:func:`longctx.ops.sparse_attention` call; a superset of each head's own top-k).
Tokens leaving the window are inserted into the index. Prefill is exact (dense) attention,
as in the paper.

Layout per layer and sequence batch:

- device: ``static_k/v`` ``[B, Hkv, n_static, D]`` views of a preallocated buffer (sinks
  first, then the R recent tokens, ``window <= R < window + insert_block`` before a step
  appends its S tokens);
- host: ``host_k/v`` ``[B, Hkv, capacity, D]`` float32, rows ``[0, n_offloaded)`` are the
  tokens at positions ``n_sink_held + i``; one index per sequence over them.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from longctx.backends import register_backend
from longctx.backends.base import BackendLayer, LayerContext
from longctx.backends.dense import DenseLayer, grouped_attention
from longctx.config import DenseConfig, RetrievalConfig
from longctx.ops import merge_states, sparse_attention
from longctx.ops.reference import causal_attention_ref

logger = logging.getLogger(__name__)


def _index_params(config: RetrievalConfig):
    from longctx.index import IndexParams

    return IndexParams(
        ef_search=config.ef_search,
        degree=config.degree,
        base_degree=config.base_degree,
        proj_prune=config.proj_prune,
        proj_reverse=config.proj_reverse,
        num_entry=config.num_entry,
        build_knn=config.build_knn,
        build_ef=config.build_ef,
        max_train_queries=config.max_train_queries,
        nprobe=config.nprobe,
        nlist=config.nlist,
        hnsw_m=config.hnsw_m,
        half_keys=config.half_keys,
        num_threads=config.num_threads,
    )


@register_backend("retrieval", RetrievalConfig, "RetrievalAttention: static sink+window, ANNS top-k over offloaded KV")
class RetrievalLayer(BackendLayer):
    """Static sink + window on the device, attention-aware ANNS over the offloaded KV.

    When the prompt fits in the static set (``T <= n_sink + window``), or the layer uses a
    sliding window, the layer runs dense attention for its whole life; ``stats()`` reports
    ``fallback_dense=True`` and the reason.

    Parameters
    ----------
    config : RetrievalConfig
    ctx : LayerContext
    """

    def __init__(self, config: RetrievalConfig, ctx: LayerContext):
        super().__init__(config, ctx)
        self._sk: Optional[torch.Tensor] = None  # [B, Hkv, capacity, D] device tier: sinks + recent
        self._sv: Optional[torch.Tensor] = None
        self.n_static = 0
        self.host_k: Optional[torch.Tensor] = None  # [B, Hkv, capacity, D] float32, host tier
        self.host_v: Optional[torch.Tensor] = None
        self.n_sink_held = 0
        self.n_offloaded = 0
        self.prompt_len = 0
        self.indexes: list = []  # one KeyIndex per sequence
        self._dense: Optional[DenseLayer] = None
        self.fallback_reason: Optional[str] = None
        self._steps = 0
        self._scanned_total = 0.0
        self._scanned_last = 0.0
        self._search_s_total = 0.0
        self._search_s_last = 0.0
        self._insert_s_total = 0.0
        self._attn_s_last = 0.0
        self._union_last = 0.0
        self.build_seconds = 0.0

    # ---------------------------------------------------------------- prefill
    def _check_fall_back(self, T: int) -> None:
        """Run dense attention (and log why) when the layer or a prompt of ``T`` tokens needs no index."""
        if self.ctx.sliding_window is not None:
            self._fall_back(f"layer uses a sliding window of {self.ctx.sliding_window}")
        elif T <= self.config.static_size:
            size = self.config.static_size
            self._fall_back(f"prompt of {T} tokens fits in the static set (n_sink + window = {size})")

    def prefill(self, q, k, v, positions):
        T = k.shape[2]
        self._check_fall_back(T)
        if self._dense is not None:
            return self._dense.prefill(q, k, v, positions)
        # exact prompt attention; q may hold only the last Sq <= T prompt queries (bench)
        out = grouped_attention(q, k, v, self.ctx.scale, T - q.shape[2], None)
        self.ingest(k, v, q)
        self.attended = None  # prefill is dense: every causal key
        return out

    def ingest_prompt(self, q, k, v, positions):
        # the attention-aware index learns from every prompt query, as in prefill()
        self._check_fall_back(k.shape[2])
        if self._dense is not None:
            self._dense.ingest_prompt(q, k, v, positions)
        else:
            self.ingest(k, v, q)
        self.attended = None

    def ingest(self, k: torch.Tensor, v: torch.Tensor, train_queries: Optional[torch.Tensor] = None) -> None:
        """Store a prompt's K/V and build the indexes, without computing attention outputs.

        :meth:`prefill` calls it; on its own it serves prompts prefilled elsewhere (the paper
        assumes context caching or disaggregated prefill) and benchmarks.

        Parameters
        ----------
        k, v : torch.Tensor
            ``[B, Hkv, T, D]`` prompt keys (post-RoPE) and values, ``T > n_sink + window``.
        train_queries : torch.Tensor, optional
            ``[B, H, Nq, D]`` queries the attention-aware index learns from (the prompt's
            queries; evenly subsampled to ``max_train_queries``). If not provided, the
            attention-aware index has key-key edges only.
        """
        cfg = self.config
        k, v = k.detach(), v.detach()  # the host tier and the indexes are numpy views: never part of a graph
        B, Hkv, T, D = k.shape
        if T <= cfg.static_size:
            raise ValueError(f"ingest requires more than n_sink + window = {cfg.static_size} tokens (got {T})")
        n_sink, n_off = cfg.n_sink, T - cfg.n_sink - cfg.window
        self.prompt_len = T
        self.n_sink_held = n_sink
        n_static = n_sink + cfg.window
        self._sk = k.new_empty(B, Hkv, n_static + cfg.insert_block + 16, D)
        self._sv = torch.empty_like(self._sk)
        for buf, src in ((self._sk, k), (self._sv, v)):
            buf[:, :, :n_sink] = src[:, :, :n_sink]
            buf[:, :, n_sink:n_static] = src[:, :, T - cfg.window :]
        self.n_static = n_static
        pin = k.is_cuda
        capacity = n_off + 4 * cfg.insert_block
        self.host_k = self._host_empty(B, Hkv, capacity, D, pin)
        self.host_v = self._host_empty(B, Hkv, capacity, D, pin)
        self.host_k[:, :, :n_off] = k[:, :, n_sink : n_sink + n_off]
        self.host_v[:, :, :n_off] = v[:, :, n_sink : n_sink + n_off]
        self.n_offloaded = n_off
        train = None
        if train_queries is not None and cfg.index == "attention_aware":
            nq = train_queries.shape[2]
            if nq > cfg.max_train_queries:
                rows = torch.linspace(0, nq - 1, cfg.max_train_queries, device=train_queries.device).round().long()
                train_queries = train_queries.index_select(2, rows)
            train = train_queries.detach().to(device="cpu", dtype=torch.float32).contiguous()
        from longctx.index import make_index

        t0 = time.perf_counter()
        params = _index_params(cfg)
        self.indexes = []
        for b in range(B):
            index = make_index(cfg.index, self.ctx.num_heads, Hkv, D, params)
            index.build(self._keys_view(b), None if train is None else train[b].numpy())
            self.indexes.append(index)
        self.build_seconds = time.perf_counter() - t0
        logger.debug(
            "retrieval layer %d: %d offloaded keys x %d sequences, %s index built in %.2fs",
            self.ctx.layer_idx, n_off, B, cfg.index, self.build_seconds,
        )

    # ---------------------------------------------------------------- decode
    def decode(self, q, k, v, positions):
        if self._dense is not None:
            return self._dense.decode(q, k, v, positions)
        if self._sk is None:
            raise RuntimeError("decode() called before prefill() on a retrieval layer")
        self._offload_old()
        self._append_static(k, v)
        B, S = q.shape[0], q.shape[2]
        n_static = self.n_static
        # -- exact part: the static set (the S new tokens are its last S, causal among themselves)
        if S == 1:
            # rows of the preallocated buffer by index: no copy of the static set per step
            rows = torch.arange(n_static, device=q.device).expand(B, self.ctx.num_kv_heads, n_static)
            out_s, lse_s = sparse_attention(q, self._sk, self._sv, rows, self.ctx.scale)
        else:
            out_s, lse_s = causal_attention_ref(q, self.static_k, self.static_v, self.ctx.scale, n_static - S)
        self._steps += 1
        if self.n_offloaded == 0:
            self._record(q, None)
            return out_s
        # -- retrieved part: top-k offloaded keys per query head, attended on the host tier
        ids = self._search(q)  # [B, H, S, K]
        t0 = time.perf_counter()
        sel = self._group_union(ids)  # [B, Hkv, G*S*K]
        out_r, lse_r = self._retrieved_attention(q, sel)
        out, _ = merge_states(out_s, lse_s, out_r.to(device=q.device, dtype=out_s.dtype), lse_r.to(q.device))
        self._attn_s_last = time.perf_counter() - t0
        self._union_last = float((sel >= 0).sum()) / sel.shape[0] / sel.shape[1]
        self._record(q, sel)
        return out

    def _search(self, q: torch.Tensor) -> torch.Tensor:
        """Top-k offloaded key rows ``[B, H, S, K]`` int64 (``-1`` padded) for queries ``[B, H, S, D]``."""
        qh = q.detach().to(device="cpu", dtype=torch.float32).contiguous()
        t0 = time.perf_counter()
        ids, scanned = [], 0.0
        for b, index in enumerate(self.indexes):
            res = index.search(qh[b].numpy(), self._keys_view(b), self.config.top_k)
            ids.append(torch.from_numpy(res.ids))
            scanned += float(res.scanned.mean())
        self._search_s_last = time.perf_counter() - t0
        self._search_s_total += self._search_s_last
        self._scanned_last = scanned / len(self.indexes)
        self._scanned_total += self._scanned_last
        return torch.stack(ids)

    def _retrieved_attention(self, q: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``q`` ``[B, H, S, D]`` over the retrieved rows ``sel`` ``[B, Hkv, M]``, on the host tier.

        ``sparse_attention`` selects keys per (sequence, KV head), so each query head attends
        the union of its GQA group's (and a verification step's S queries') retrieved keys: a
        superset of its own top-k (never less accurate), computed in one fused call. The call
        reads the whole capacity buffer ``[B, Hkv, capacity, D]`` (contiguous, no copy);
        only rows ``< n_offloaded`` are ever selected.
        """
        qh = q.detach().to(device="cpu", dtype=torch.float32)
        return sparse_attention(qh, self.host_k, self.host_v, sel, self.ctx.scale)

    def _group_union(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, H, S, K]`` retrieved rows -> ``[B, Hkv, G*S*K]`` union per KV head (duplicates -> -1)."""
        sel = ids.reshape(ids.shape[0], self.ctx.num_kv_heads, -1).sort(dim=-1).values
        dup = torch.zeros_like(sel, dtype=torch.bool)
        dup[..., 1:] = sel[..., 1:] == sel[..., :-1]
        return sel.masked_fill(dup, -1)

    @property
    def static_k(self) -> Optional[torch.Tensor]:
        """``[B, Hkv, n_static, D]`` keys of the static set (a view), device tier."""
        return None if self._sk is None else self._sk[:, :, : self.n_static]

    @property
    def static_v(self) -> Optional[torch.Tensor]:
        """``[B, Hkv, n_static, D]`` values of the static set (a view), device tier."""
        return None if self._sv is None else self._sv[:, :, : self.n_static]

    def _append_static(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``[B, Hkv, S, D]`` new tokens to the static set, growing its buffer by 1.5x when full."""
        S, n = k.shape[2], self.n_static
        if n + S > self._sk.shape[2]:
            cap = max(n + S, self._sk.shape[2] * 3 // 2)
            for name in ("_sk", "_sv"):
                old = getattr(self, name)
                new = old.new_empty(*old.shape[:2], cap, old.shape[3])
                new[:, :, :n] = old[:, :, :n]
                setattr(self, name, new)
        self._sk[:, :, n : n + S] = k
        self._sv[:, :, n : n + S] = v
        self.n_static = n + S

    def _offload_old(self) -> None:
        """Move the oldest recent tokens beyond ``window`` to the host tier and the index, in blocks."""
        cfg = self.config
        recent = self.n_static - self.n_sink_held
        if recent < cfg.window + cfg.insert_block:
            return
        m = recent - cfg.window
        t0 = time.perf_counter()
        lo, hi = self.n_sink_held, self.n_sink_held + m
        self._ensure_capacity(self.n_offloaded + m)
        n0 = self.n_offloaded
        self.host_k[:, :, n0 : n0 + m] = self._sk[:, :, lo:hi]
        self.host_v[:, :, n0 : n0 + m] = self._sv[:, :, lo:hi]
        self.n_offloaded += m
        rest = self.n_static - hi
        for buf in (self._sk, self._sv):
            buf[:, :, lo : lo + rest] = buf[:, :, hi : self.n_static].clone()  # overlapping ranges
        self.n_static -= m
        for b, index in enumerate(self.indexes):
            index.add(self._keys_view(b))
        self._insert_s_total += time.perf_counter() - t0

    # ---------------------------------------------------------------- helpers
    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        self._dense = DenseLayer(DenseConfig(), self.ctx)
        logger.info("retrieval layer %d runs dense attention: %s", self.ctx.layer_idx, reason)

    def _host_empty(self, B: int, Hkv: int, capacity: int, D: int, pin: bool) -> torch.Tensor:
        t = torch.empty(B, Hkv, capacity, D, dtype=torch.float32, device=self.ctx.host_device, pin_memory=pin)
        if not pin and t.device.type == "cpu":
            # retrieved rows are read at random: huge pages spare a TLB miss per row
            from longctx import _C

            _C.advise_hugepages(t.data_ptr(), t.numel() * t.element_size())
        return t

    def _ensure_capacity(self, needed: int) -> None:
        capacity = self.host_k.shape[2]
        if needed <= capacity:
            return
        # grow by 25% at least: the store is the size of the context, doubling would waste GBs
        new_cap = max(needed, capacity + capacity // 4, needed + 4 * self.config.insert_block)
        B, Hkv, _, D = self.host_k.shape
        pin = self.host_k.is_pinned()
        for name in ("host_k", "host_v"):
            old = getattr(self, name)
            new = self._host_empty(B, Hkv, new_cap, D, pin)
            new[:, :, : self.n_offloaded] = old[:, :, : self.n_offloaded]
            setattr(self, name, new)

    def _keys_view(self, b: int):
        """The host keys of sequence b as a numpy view ``[Hkv, n_offloaded, D]`` (no copy)."""
        return self.host_k[b, :, : self.n_offloaded].numpy()

    def _record(self, q: torch.Tensor, sel: Optional[torch.Tensor]) -> None:
        """Diagnostics seam: ``attended`` ``[B, H, S, T]`` = static keys (causal) + retrieved rows ``sel``."""
        if not self.record_attended:
            self.attended = None
            return
        B, H, S, _ = q.shape
        T = self.seq_length
        mask = torch.zeros(B, H, S, T, dtype=torch.bool)
        mask[..., : self.n_sink_held] = True
        start = self.n_sink_held + self.n_offloaded
        causal = torch.arange(start, T).unsqueeze(0) <= torch.arange(T - S, T).unsqueeze(1)  # [S, R + S]
        mask[..., start:] = causal
        if sel is not None:
            # every head of a GQA group attends the group's union, for all S queries
            G = self.ctx.group_size
            b_i, kv_i, k_i = (sel >= 0).nonzero(as_tuple=True)
            pos = sel[b_i, kv_i, k_i] + self.n_sink_held
            for g in range(G):
                mask[b_i, kv_i * G + g, :, pos] = True
        self.attended = mask.to(q.device)

    # ---------------------------------------------------------------- contract
    def rollback(self, n_tokens: int) -> None:
        if self._dense is not None:
            self._dense.rollback(n_tokens)
            return
        self._check_rollback(n_tokens, self.seq_length - self.prompt_len)
        if n_tokens == 0:
            return
        recent = self.n_static - self.n_sink_held
        from_recent = min(n_tokens, recent)
        self.n_static -= from_recent
        from_host = n_tokens - from_recent
        if from_host:
            # generated tokens already inserted: drop them from the host store and the indexes
            self.n_offloaded -= from_host
            for index in self.indexes:
                index.truncate(self.n_offloaded)

    @property
    def seq_length(self) -> int:
        if self._dense is not None:
            return self._dense.seq_length
        return self.n_static + self.n_offloaded

    def memory(self) -> dict[str, int]:
        if self._dense is not None:
            return self._dense.memory()
        if self._sk is None:
            return {"device": 0, "host": 0}
        # live K/V bytes (buffer reserves not counted, as for dense) + the index structures
        B, Hkv, _, D = self._sk.shape
        device = 2 * B * Hkv * self.n_static * D * self._sk.element_size()
        host = 2 * B * Hkv * self.n_offloaded * D * self.host_k.element_size()
        host += sum(index.nbytes() for index in self.indexes)
        return {"device": device, "host": host}

    def stats(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "decode_steps": self._steps,
            "fallback_dense": self._dense is not None,
            "fallback_reason": self.fallback_reason,
            "index": self.config.index,
            "top_k": self.config.top_k,
        }
        if self._dense is not None:
            base.update(decode_steps=self._dense.stats()["decode_steps"], keys_per_step=self._dense.seq_length)
            return base
        n_static = self.n_static
        steps = max(self._steps, 1)
        base.update(
            n_static=n_static,
            n_offloaded=self.n_offloaded,
            # keys each query head attends: the static set + its GQA group's retrieved union
            keys_per_step=n_static + self._union_last,
            keys_scanned_last=self._scanned_last,
            keys_scanned_per_step=self._scanned_total / steps,
            scan_fraction_last=self._scanned_last / max(self.n_offloaded, 1),
            search_s_last=self._search_s_last,
            search_s_per_step=self._search_s_total / steps,
            retrieved_attention_s_last=self._attn_s_last,
            insert_s_total=self._insert_s_total,
            index_build_s=self.build_seconds,
            index_bytes=sum(index.nbytes() for index in self.indexes),
        )
        return base
