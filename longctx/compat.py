"""Every difference between supported transformers versions, in one place.

Supported: transformers >= 5.17 and < 5.40 (newest tested: 5.24). What moved in that range:

- 5.24 renamed the ``past_key_values`` argument of ``forward``/``generate`` to ``cache``
  (the old name warns and is removed in 5.40). :data:`CACHE_KWARG` is the name to pass.
- ``Cache.crop`` takes a negative token count to remove (newer) or a positive final length
  (older); :func:`crop_to_rollback` accepts both.
- ``cache.update`` receives extra layer kwargs as ``kwargs=`` (5.24) or ``cache_kwargs``
  (older); longctx's layers accept and ignore both.
"""
from __future__ import annotations

import inspect
import logging

import transformers
from transformers.cache_utils import Cache as CacheBase
from transformers.cache_utils import CacheLayerMixin as CacheLayerBase

logger = logging.getLogger(__name__)

MIN_VERSION = (5, 17)
MAX_VERSION_EXCLUSIVE = (5, 40)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


TRANSFORMERS_VERSION = _version_tuple(transformers.__version__)


def _generate_cache_kwarg() -> str:
    params = inspect.signature(transformers.LlamaModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


#: name of the keyword that passes a Cache to ``forward``/``generate`` in this version
CACHE_KWARG = _generate_cache_kwarg()


def check_version() -> None:
    """Log a warning when the installed transformers is outside the tested range."""
    if not (MIN_VERSION <= TRANSFORMERS_VERSION[:2] < MAX_VERSION_EXCLUSIVE):
        logger.warning(
            "transformers %s is outside longctx's tested range [%s, %s); patching may fail",
            transformers.__version__,
            ".".join(map(str, MIN_VERSION)),
            ".".join(map(str, MAX_VERSION_EXCLUSIVE)),
        )


def crop_to_rollback(arg: int, length: int) -> int:
    """Tokens to drop for ``Cache.crop(arg)``: negative removes ``-arg``, positive keeps ``arg``, 0 nothing."""
    if arg < 0:
        return -arg
    if arg == 0:
        return 0
    return max(0, length - arg)


def cache_from_output(output) -> object:
    """The cache object of a model output under either attribute name."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def register_attention(name: str, attention_fn, mask_fn) -> None:
    """Register ``attention_fn`` / ``mask_fn`` under ``name`` with transformers' ``AttentionInterface``
    and ``AttentionMaskInterface`` (idempotent), so that ``model.set_attn_implementation(name)`` works."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, mask_fn)


__all__ = [
    "CacheBase",
    "CacheLayerBase",
    "CACHE_KWARG",
    "TRANSFORMERS_VERSION",
    "check_version",
    "crop_to_rollback",
    "cache_from_output",
    "register_attention",
]
