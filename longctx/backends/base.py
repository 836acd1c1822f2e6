"""The backend contract: a cache layer that knows how to attend.

Every method (dense, ShadowKV, RetrievalAttention, HiP, ...) implements :class:`BackendLayer`
for one decoder layer and one batch of sequences that share a prompt length. The Hugging
Face integration (:mod:`longctx.cache`, :mod:`longctx.patch`), the evaluation harness and
the speculative driver only ever talk to this interface; they never branch on a method name.

Dimension letters used in every shape comment: B batch, S query length, T KV length,
H query heads, Hkv KV heads, G = H // Hkv, D head dim, r rank, C chunk size, K top-k.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Optional

import torch


@dataclasses.dataclass
class LayerContext:
    """What a backend layer knows about the model layer it serves.

    Parameters
    ----------
    layer_idx : int
        Index of the decoder layer (0-based).
    num_layers : int
        Number of decoder layers in the model.
    num_heads : int
        Query heads H.
    num_kv_heads : int
        KV heads Hkv (H must be a multiple).
    head_dim : int
        Head dimension D.
    scale : float
        Softmax scale applied to q·k (``1/sqrt(D)`` for most models).
    rotary : object, optional
        A :class:`longctx.models.RotaryHelper` (``apply`` / ``invert`` RoPE at given
        positions with the model's own rotary module). ``None`` when the backend is used
        outside a model (bench, unit tests) and does not need pre-RoPE keys.
    sliding_window : int, optional
        The model's sliding attention window for this layer, ``None`` for full attention.
    host_device : torch.device
        Where the host tier lives (CPU memory; pinned when the device is CUDA).
    """

    layer_idx: int = 0
    num_layers: int = 1
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    scale: Optional[float] = None
    rotary: Any = None
    sliding_window: Optional[int] = None
    host_device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self):
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LayerContext.{name} requires a positive int (got {value!r})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LayerContext requires num_heads to be a multiple of num_kv_heads "
                f"(got num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads})"
            )
        if not 0 <= self.layer_idx < self.num_layers:
            raise ValueError(f"LayerContext.layer_idx must be in [0, {self.num_layers}) (got {self.layer_idx})")
        if self.scale is None:
            self.scale = self.head_dim**-0.5

    @property
    def group_size(self) -> int:
        """G = H // Hkv, query heads per KV head."""
        return self.num_heads // self.num_kv_heads


class BackendLayer(abc.ABC):
    """One decoder layer's KV cache for one batch, plus the attention that reads it.

    Subclasses implement :meth:`prefill`, :meth:`decode`, :meth:`rollback`, :meth:`memory`
    and :meth:`stats`. All tensors arrive post-RoPE in the layout ``[B, heads, S, D]``.

    Diagnostics seam: when :attr:`record_attended` is set (by :mod:`longctx.diagnostics`),
    every call stores in :attr:`attended` a bool tensor ``[B, H, S, T]`` marking which
    cached keys each query attended (``T`` = tokens held after the call, causal positions
    only). Dense backends may leave it ``None``, which means "all causal keys". With
    :attr:`record_attended_rows` = n, a backend may record only the last ``min(S, n)``
    queries (``[B, H, n, T]``): an S x T mask of a 32K-token prefill is 1 GiB per head.

    Parameters
    ----------
    config : dataclass
        The method's validated config (see :mod:`longctx.config`).
    ctx : LayerContext
        Shapes and model hooks for this layer.
    """

    #: registry name, set by :func:`longctx.backends.register_backend`
    name: str = "base"

    def __init__(self, config: Any, ctx: LayerContext):
        self.config = config
        self.ctx = ctx
        self.record_attended = False
        self.record_attended_rows: Optional[int] = None  # record only the last n queries (None: all)
        self.attended: Optional[torch.Tensor] = None

    def attended_rows(self, S: int) -> int:
        """How many of a call's ``S`` queries (the last ones) :attr:`attended` must cover."""
        return S if self.record_attended_rows is None else max(1, min(S, self.record_attended_rows))

    # ---------------------------------------------------------------- the contract
    @abc.abstractmethod
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Store the prompt's K/V and return causal attention over it.

        ``q`` may hold only the *last* ``Sq <= S`` prompt queries (``Sq == S`` inside a
        model forward). The bench and the diagnostics pass a short tail so that building a
        128K cache does not cost a quadratic attention; queries are then at key positions
        ``S - Sq .. S - 1`` and attend causally from there.

        Parameters
        ----------
        q : torch.Tensor
            ``[B, H, Sq, D]`` queries of the last Sq prompt tokens, post-RoPE.
        k, v : torch.Tensor
            ``[B, Hkv, S, D]`` keys (post-RoPE) and values of the prompt.
        positions : torch.Tensor
            ``[B, S]`` int64 RoPE position of every token.

        Returns
        -------
        torch.Tensor
            ``[B, H, Sq, D]`` attention output, same dtype as ``q``.
        """

    @abc.abstractmethod
    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append S new tokens (1 for decoding, gamma+1 for verification) and attend.

        The new tokens attend to everything cached and causally to each other.

        Parameters
        ----------
        q : torch.Tensor
            ``[B, H, S, D]`` queries of the new tokens, post-RoPE.
        k, v : torch.Tensor
            ``[B, Hkv, S, D]`` keys and values of the new tokens.
        positions : torch.Tensor
            ``[B, S]`` int64 RoPE positions of the new tokens.

        Returns
        -------
        torch.Tensor
            ``[B, H, S, D]``.
        """

    def ingest_prompt(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Build the cache of a prompt whose attention was computed elsewhere (no output).

        TriForce's middle level shares the target's prefill this way: the full-cache level
        computes the prompt's attention once and every other cache of the same model is
        built from the same post-RoPE K/V. The default runs :meth:`prefill` on the last
        query only (the contract allows a short query tail) and drops its output; methods
        that learn from the prompt's queries override it to use them all.

        Parameters
        ----------
        q : torch.Tensor
            ``[B, H, S, D]`` the prompt's queries, post-RoPE.
        k, v : torch.Tensor
            ``[B, Hkv, S, D]`` the prompt's keys (post-RoPE) and values.
        positions : torch.Tensor
            ``[B, S]`` int64 RoPE positions.
        """
        self.prefill(q[:, :, -1:], k, v, positions)

    @abc.abstractmethod
    def rollback(self, n_tokens: int) -> None:
        """Drop the last ``n_tokens`` tokens (speculative rejection). Prompt tokens may not be dropped."""

    @abc.abstractmethod
    def memory(self) -> dict[str, int]:
        """Bytes held per tier: ``{"device": ..., "host": ...}``."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Method counters (keys scanned, chunks hit, mask refreshes, fallbacks, ...)."""

    @property
    @abc.abstractmethod
    def seq_length(self) -> int:
        """Tokens held (prompt + generated)."""

    # ---------------------------------------------------------------- helpers
    def _check_rollback(self, n_tokens: int, generated: int) -> None:
        """Validate a rollback request against the number of generated tokens held."""
        if not isinstance(n_tokens, int) or n_tokens < 0:
            raise ValueError(f"rollback(n_tokens) requires a non-negative int (got {n_tokens!r})")
        if n_tokens > generated:
            raise ValueError(
                f"rollback(n_tokens) can drop at most the {generated} tokens appended after prefill (got {n_tokens})"
            )


def chunk_attended_mask(chunk_ids: list[Optional[torch.Tensor]], chunk_size: int, tail_start: int, T: int,
                        q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[B, H, S, T]`` bool mask of a chunked cache for the diagnostics (``BackendLayer.attended``).

    Parameters
    ----------
    chunk_ids : list of torch.Tensor or None
        ``[B, Hkv, K]`` prompt chunk indices held per KV head (several sets are OR-ed; ``None``
        or empty sets are skipped).
    chunk_size : int
        Tokens per chunk C (chunk n covers keys ``n*C .. n*C+C-1``).
    tail_start : int
        Keys from here to ``T`` (the recent prompt tokens and the generated ones) are all held.
    T : int
        Keys; the last S keys are causal among the S queries.
    q : torch.Tensor
        ``[B, H, S, D]`` the step's queries (shape and device).
    num_kv_heads : int
        Hkv.
    """
    B, H, S, _ = q.shape
    Hkv, dev = num_kv_heads, q.device
    mask = torch.zeros(B, Hkv, T, dtype=torch.bool, device=dev)
    mask[..., tail_start:] = True
    offs = torch.arange(chunk_size, device=dev)
    for ids in chunk_ids:
        if ids is not None and ids.numel():
            mask.scatter_(2, (ids.unsqueeze(-1) * chunk_size + offs).view(B, Hkv, -1), True)
    mask = mask.repeat_interleave(H // Hkv, dim=1).unsqueeze(2).repeat(1, 1, S, 1)
    if S > 1:
        qi = torch.arange(S, device=dev).unsqueeze(1) + (T - S)
        mask &= torch.arange(T, device=dev).unsqueeze(0) <= qi
    return mask


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """A registry entry: the backend's name, its config class and its layer class."""

    name: str
    config_cls: type
    layer_cls: Callable[..., BackendLayer]
    description: str = ""
