"""``LongCtxCache``: a transformers ``Cache`` holding one backend layer per decoder layer.

The attention module calls ``cache.update(k, v, layer_idx)`` and then the registered
``"longctx"`` attention function. ``update`` only hands the new K/V to the layer and marks
it active; the attention function (:mod:`longctx.patch`) then asks that layer to
``attend``, which runs the backend's ``prefill`` (first call) or ``decode`` (later calls).

Left-padded batches: backends work on unpadded sequences. When the prompt's padding
differs across the batch, the layer keeps one backend instance per sequence (each sees
only its real tokens, at their real positions) and re-pads the output; when every row
has the same padding it keeps one batched instance on the unpadded slice.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Callable, Optional

import torch

from longctx.backends.base import BackendLayer, LayerContext
from longctx.compat import CacheBase, CacheLayerBase, crop_to_rollback

logger = logging.getLogger(__name__)

# the layer whose ``update`` ran last; the attention function of that layer reads it
ACTIVE_LAYER: contextvars.ContextVar[Optional["LongCtxLayer"]] = contextvars.ContextVar("longctx_active_layer", default=None)

LayerFactory = Callable[[LayerContext], BackendLayer]


def left_padding(mask: Optional[torch.Tensor]) -> Optional[list[int]]:
    """Number of left-pad tokens per row of a 2D mask ``[B, T]``; ``None`` when nothing is padded.

    Raises
    ------
    ValueError
        If a row has padding after its first real token (right padding is not supported).
    """
    if mask is None:
        return None
    mask = mask.bool()
    if bool(mask.all()):
        return None
    pads = (mask.long().cumsum(-1) == 0).sum(-1)  # leading zeros per row
    real = mask.sum(-1)
    if bool((pads + real != mask.shape[-1]).any()):
        raise ValueError(
            "attention_mask requires left padding (tokenizer.padding_side='left'); got padding after real tokens"
        )
    return [int(p) for p in pads]


class LongCtxLayer(CacheLayerBase):
    """One decoder layer of a :class:`LongCtxCache`: routes K/V to backend layer(s).

    Parameters
    ----------
    factory : callable
        ``factory(ctx) -> BackendLayer`` builds a backend instance for this layer.
    ctx : LayerContext
        Shapes and hooks of the model layer.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, factory: LayerFactory, ctx: LayerContext):
        super().__init__()
        self.factory = factory
        self.ctx = ctx
        self.parts: list[BackendLayer] = []
        self.pads: list[int] = []
        self.length = 0  # tokens as transformers counts them (pads included)
        self.pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.record_attended = False
        # another cache's layer of the same model that is built from this layer's prompt (see mirror_prefill)
        self.mirror: Optional["LongCtxLayer"] = None

    # ------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        # k/v: [B, Hkv, S, D] post-RoPE; attention happens in ``attend`` (called by the attention function)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states)
        ACTIVE_LAYER.set(self)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.parts, self.pads, self.length, self.pending = [], [], 0, None

    def crop(self, max_length: int) -> None:
        """transformers' crop: negative drops ``-max_length`` tokens, positive keeps that many, 0 is a no-op."""
        self.rollback(crop_to_rollback(max_length, self.length))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise RuntimeError("longctx caches do not support beam search (num_beams > 1); use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise RuntimeError("longctx caches do not support num_return_sequences > 1 or beam expansion")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise RuntimeError("longctx caches do not support batch re-selection (contrastive search)")

    # ------------------------------------------------------------ longctx API
    def rollback(self, n_tokens: int) -> None:
        """Drop the last ``n_tokens`` generated tokens from every backend part."""
        if n_tokens <= 0:
            return
        for part in self.parts:
            part.rollback(n_tokens)
        self.length -= n_tokens

    def _new_part(self) -> BackendLayer:
        part = self.factory(self.ctx)
        part.record_attended = self.record_attended
        return part

    def attend(
        self, q: torch.Tensor, positions: Optional[torch.Tensor], padding_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Run the pending K/V through the backend(s) and return ``[B, H, S, D]``.

        Parameters
        ----------
        q : torch.Tensor
            ``[B, H, S, D]`` post-RoPE queries.
        positions : torch.Tensor, optional
            ``[B, S]`` or ``[1, S]`` RoPE positions (``None``: contiguous after the cache).
        padding_mask : torch.Tensor, optional
            ``[B, T_total]`` 2D attention mask (True = real token), used at prefill only.
        """
        if self.pending is None:
            raise RuntimeError("LongCtxLayer.attend() requires update() to be called first for this layer")
        k, v = self.pending
        self.pending = None
        B, _, S, _ = q.shape
        if positions is None:
            positions = torch.arange(self.length, self.length + S, device=q.device).unsqueeze(0)
        positions = positions.to(q.device).expand(B, -1)
        if not self.parts:
            out = self._prefill(q, k, v, positions, padding_mask)
            if self.mirror is not None:
                self.mirror.ingest_prompt(q, k, v, positions, padding_mask)
        elif self.mirror is not None:
            raise RuntimeError("mirror_prefill covers one prefill forward over the whole prompt; this cache already "
                               "holds a prompt (chunked prefill or decoding inside the block would leave the mirror behind)")
        else:
            out = self._decode(q, k, v, positions)
        self.length += S
        return out

    def ingest_prompt(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
        padding_mask: Optional[torch.Tensor],
    ) -> None:
        """Build this layer from a prompt prefilled by another cache of the same model (no attention output).

        Parameters as :meth:`attend` (``positions`` ``[B, S]``), with the prompt's K/V ``[B, Hkv, S, D]``.
        """
        if self.parts:
            raise RuntimeError("LongCtxLayer.ingest_prompt() requires an empty layer (it holds a prompt already)")
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        self._prefill(q, k, v, positions, padding_mask, ingest=True)
        self.length += q.shape[2]

    def _prefill(self, q, k, v, positions, padding_mask, ingest: bool = False) -> Optional[torch.Tensor]:
        B, S = q.shape[0], q.shape[2]
        mask = None if padding_mask is None else padding_mask[:, -S:]
        pads = left_padding(mask)
        if pads is None or len(set(pads)) == 1:
            p = 0 if pads is None else pads[0]
            self.pads = [p] * B
            self.parts = [self._new_part()]
            run = self.parts[0].ingest_prompt if ingest else self.parts[0].prefill
            out = run(q[:, :, p:], k[:, :, p:], v[:, :, p:], positions[:, p:])
            return out if p == 0 or ingest else torch.nn.functional.pad(out, (0, 0, p, 0))
        # ragged batch: one backend instance per sequence, each on its real tokens only
        self.pads = pads
        self.parts = [self._new_part() for _ in range(B)]
        outs = []
        for b, (part, p) in enumerate(zip(self.parts, pads)):
            run = part.ingest_prompt if ingest else part.prefill
            o = run(q[b : b + 1, :, p:], k[b : b + 1, :, p:], v[b : b + 1, :, p:], positions[b : b + 1, p:])
            if not ingest:
                outs.append(torch.nn.functional.pad(o, (0, 0, p, 0)))
        return None if ingest else torch.cat(outs, dim=0)

    def _decode(self, q, k, v, positions) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0].decode(q, k, v, positions)
        outs = [
            part.decode(q[b : b + 1], k[b : b + 1], v[b : b + 1], positions[b : b + 1])
            for b, part in enumerate(self.parts)
        ]
        return torch.cat(outs, dim=0)

    def attended(self) -> Optional[torch.Tensor]:
        """``[B, H, S, T]`` bool mask of the keys attended in the last call (unpadded batch only), or ``None``."""
        if len(self.parts) != 1:
            return None
        return self.parts[0].attended

    def memory(self) -> dict[str, int]:
        total = {"device": 0, "host": 0}
        for part in self.parts:
            for tier, nbytes in part.memory().items():
                total[tier] = total.get(tier, 0) + int(nbytes)
        return total

    def stats(self) -> list[dict[str, Any]]:
        return [part.stats() for part in self.parts]


class LongCtxCache(CacheBase):
    """A transformers ``Cache`` whose layers are longctx backend layers.

    Parameters
    ----------
    factory : callable
        ``factory(ctx) -> BackendLayer`` (see :func:`longctx.backends.make_layer`).
    contexts : list of LayerContext
        One per decoder layer (see :func:`longctx.models.layer_contexts`).

    Examples
    --------
    Usually built by a patch handle: ``cache = handle.new_cache()``, then
    ``model.generate(ids, past_key_values=cache)``; ``handle`` does this for you.
    """

    def __init__(self, factory: LayerFactory, contexts: list[LayerContext]):
        super().__init__(layers=[LongCtxLayer(factory, ctx) for ctx in contexts])

    def rollback(self, n_tokens: int) -> None:
        """Drop the last ``n_tokens`` tokens from every layer (speculative rejection)."""
        for layer in self.layers:
            layer.rollback(n_tokens)

    def crop(self, max_length: int) -> None:  # transformers' assisted generation calls this
        for layer in self.layers:
            layer.crop(max_length)

    @contextlib.contextmanager
    def mirror_prefill(self, other: "LongCtxCache"):
        """Within the block, the prefill that runs through this cache also builds ``other`` (empty, same model).

        Each layer hands its prompt's queries and post-RoPE K/V to the matching layer of
        ``other`` (:meth:`LongCtxLayer.ingest_prompt`), so the model's forward over the prompt
        runs once for both caches. Exact when this cache's prefill is exact (dense): the
        hidden states, hence every layer's K/V, are the model's own.
        """
        if len(other.layers) != len(self.layers):
            raise ValueError(f"mirror_prefill requires a cache with {len(self.layers)} layers (got {len(other.layers)})")
        if any(layer.parts for layer in other.layers):
            raise ValueError("mirror_prefill requires an empty cache to build (it holds a prompt already)")
        for mine, theirs in zip(self.layers, other.layers):
            mine.mirror = theirs
        try:
            yield other
        finally:
            for mine in self.layers:
                mine.mirror = None

    def set_record_attended(self, flag: bool) -> None:
        """Ask every backend layer to record which keys it attends (diagnostics)."""
        for layer in self.layers:
            layer.record_attended = flag
            for part in layer.parts:
                part.record_attended = flag

    def memory(self) -> dict[str, int]:
        """Bytes per tier summed over layers: ``{"device": ..., "host": ...}``."""
        total = {"device": 0, "host": 0}
        for layer in self.layers:
            for tier, nbytes in layer.memory().items():
                total[tier] = total.get(tier, 0) + nbytes
        return total

    def stats(self) -> list[list[dict[str, Any]]]:
        """Per layer, per backend part, the backend's ``stats()``."""
        return [layer.stats() for layer in self.layers]
