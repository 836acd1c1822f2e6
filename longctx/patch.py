"""The Hugging Face integration, and nothing else.

``longctx.patch(model, "shadowkv", sparse_budget=2048)`` (or ``patch(model, config)``)
switches the model's attention to a longctx backend through transformers' public
extension points and returns a :class:`PatchHandle`, also a context manager:

>>> with longctx.patch(model, "dense") as handle:          # doctest: +SKIP
...     out = model.generate(input_ids, max_new_tokens=32)
...     handle.memory()                                       # bytes per tier of the last cache

What it touches, all restored by ``unpatch()`` / leaving the ``with``:

- registers the ``"longctx"`` attention function (``AttentionInterface``) and mask
  function (``AttentionMaskInterface``) — idempotent, done at first patch, not at import;
- sets this model's attention implementation to ``"longctx"`` (``set_attn_implementation``);
- gives this model instance a ``generate`` that supplies a fresh :class:`LongCtxCache`
  through the generation kwargs when the caller passes none.

Nothing global is replaced, and other models are untouched.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Optional, Union

import torch

from longctx.backends import BackendConfig, resolve_config
from longctx.cache import ACTIVE_LAYER, LongCtxCache, LongCtxLayer
from longctx.compat import CACHE_KWARG, check_version, register_attention
from longctx.models import attention_modules, get_adapter, layer_contexts

logger = logging.getLogger(__name__)

ATTN_NAME = "longctx"
# id(attention module) -> the handle that patched it (for forwards that run without a LongCtxCache)
_HANDLES: dict[int, "PatchHandle"] = {}


def longctx_mask(*args: Any, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Optional[torch.Tensor]:
    """Mask function for ``AttentionMaskInterface``: pass the 2D padding mask through.

    Backends apply causality themselves; the only mask information they need is which
    prompt tokens are left padding. Returns ``[B, T]`` bool or ``None`` when unpadded,
    so no ``[B, 1, S, T]`` mask is ever materialised (it would not fit at 128K).
    """
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def longctx_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``AttentionInterface``: route q/k/v to the layer's backend.

    Parameters
    ----------
    module : the attention module (gives ``layer_idx``).
    query : ``[B, H, S, D]`` post-RoPE.
    key, value : ``[B, Hkv, S, D]`` new tokens (with a LongCtxCache) or the full K/V.
    attention_mask : ``[B, T]`` bool padding mask from :func:`longctx_mask`, or ``None``.

    Returns
    -------
    ``([B, S, H, D], None)`` as transformers' attention functions do.
    """
    positions = kwargs.get("position_ids")
    layer = ACTIVE_LAYER.get()
    if layer is not None and layer.pending is not None and layer.pending[0] is key and layer.ctx.layer_idx == module.layer_idx:
        out = layer.attend(query, positions, attention_mask)
    else:
        out = _attend_without_cache(module, query, key, value, positions, attention_mask)
    return out.transpose(1, 2).contiguous(), None


def _attend_without_cache(module, query, key, value, positions, attention_mask) -> torch.Tensor:
    """A forward with no LongCtxCache (``use_cache=False`` or a plain DynamicCache): one-shot prefill."""
    handle = _HANDLES.get(id(module))
    if handle is None:
        raise RuntimeError(
            "the 'longctx' attention implementation requires a model patched with longctx.patch(); "
            "this module is not patched (was the handle already unpatched?)"
        )
    if query.shape[2] != key.shape[2]:
        raise RuntimeError(
            "a patched model decoding without a LongCtxCache: pass "
            f"{CACHE_KWARG}=handle.new_cache() to forward(), or use model.generate() which does it for you"
        )
    layer = LongCtxLayer(handle.factory, handle.contexts[module.layer_idx])
    layer.update(key, value)
    return layer.attend(query, positions, attention_mask)


def _register() -> None:
    register_attention(ATTN_NAME, longctx_attention, longctx_mask)


class PatchHandle:
    """A patched model: builds caches, reports memory/stats, and restores the model on exit.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM of a supported ``model_type`` (see :data:`longctx.models.SUPPORTED_MODEL_TYPES`).
    backend : str or BackendConfig
        A registered backend name (``longctx.list_backends()``) or a config instance.
    **options
        Config fields when ``backend`` is a name (``sparse_budget=2048``, ...).

    Raises
    ------
    ValueError
        Unsupported model type, unknown backend or option, or a model that is already patched.
    """

    def __init__(self, model: torch.nn.Module, backend: Union[str, BackendConfig], **options: Any):
        check_version()
        get_adapter(model)  # raises for unsupported model types
        if getattr(model, "_longctx_handle", None) is not None:
            raise ValueError("model is already patched by longctx; unpatch() it first")
        self.spec, self.config = resolve_config(backend, options)
        self.model = model
        self.contexts = layer_contexts(model)
        self.last_cache: Optional[LongCtxCache] = None
        self._orig_impl = model.config._attn_implementation
        self._had_generate = "generate" in vars(model)
        self._orig_generate = vars(model).get("generate")
        self._modules = attention_modules(model)
        self.active = False
        self._apply()

    # ------------------------------------------------------------ lifecycle
    def _apply(self) -> None:
        _register()
        self.model.set_attn_implementation(ATTN_NAME)
        for m in self._modules:
            _HANDLES[id(m)] = self
        bound = type(self.model).generate.__get__(self.model)

        @functools.wraps(bound)
        def generate(*args: Any, **kwargs: Any):
            if kwargs.get(CACHE_KWARG) is None and kwargs.get("past_key_values") is None:
                kwargs[CACHE_KWARG] = self.new_cache()
            return bound(*args, **kwargs)

        self.model.generate = generate
        self.model._longctx_handle = self
        self.active = True
        logger.info("patched %s with backend %r (%s)", type(self.model).__name__, self.spec.name, self.config)

    def unpatch(self) -> None:
        """Restore the model exactly as it was before :func:`patch` (idempotent)."""
        if not self.active:
            return
        self.model.set_attn_implementation(self._orig_impl)
        for m in self._modules:
            _HANDLES.pop(id(m), None)
        if self._had_generate:
            self.model.generate = self._orig_generate
        else:
            del self.model.generate
        self.model._longctx_handle = None
        del self.model._longctx_handle
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unpatch()

    # ------------------------------------------------------------ caches and reports
    def factory(self, ctx):
        """Build one backend layer for ``ctx`` with this handle's config."""
        return self.spec.layer_cls(self.config, ctx)

    def new_cache(self) -> LongCtxCache:
        """A fresh :class:`LongCtxCache` for this model and backend (also kept as ``last_cache``)."""
        if not self.active:
            raise RuntimeError("new_cache() requires an active patch (this handle was unpatched)")
        self.last_cache = LongCtxCache(self.factory, self.contexts)
        return self.last_cache

    def memory(self) -> dict[str, int]:
        """Bytes per tier held by the last cache (``{"device": 0, "host": 0}`` before any generate)."""
        return self.last_cache.memory() if self.last_cache is not None else {"device": 0, "host": 0}

    def stats(self) -> list[list[dict[str, Any]]]:
        """Per layer, per backend part, the backend's ``stats()`` for the last cache."""
        return self.last_cache.stats() if self.last_cache is not None else []

    def __repr__(self) -> str:
        state = "active" if self.active else "unpatched"
        return f"PatchHandle(backend={self.spec.name!r}, config={self.config}, {state})"


def patch(model: torch.nn.Module, backend: Union[str, BackendConfig] = "dense", **options: Any) -> PatchHandle:
    """Switch ``model``'s attention to a longctx backend; returns a handle / context manager.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM with ``model_type`` in :data:`longctx.models.SUPPORTED_MODEL_TYPES`.
    backend : str or BackendConfig, default "dense"
        Backend name (see :func:`longctx.list_backends`) or a config instance.
    **options
        Config fields for a backend given by name.

    Returns
    -------
    PatchHandle
        Call ``unpatch()`` or use it in a ``with`` block to restore the model.
    """
    return PatchHandle(model, backend, **options)
