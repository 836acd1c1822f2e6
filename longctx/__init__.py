"""longctx: long-context inference methods as drop-in attention backends for Hugging Face models.

>>> import longctx
>>> longctx.list_backends()                     # doctest: +SKIP
['dense', 'hip', 'retrieval', 'shadowkv']
>>> with longctx.patch(model, "shadowkv"):      # doctest: +SKIP
...     model.generate(input_ids, max_new_tokens=64)
"""
from longctx.backends import BackendLayer, LayerContext, get_backend, list_backends, make_layer, register_backend
from longctx.cache import LongCtxCache
from longctx.config import BackendConfig, DenseConfig
from longctx.config import HiPConfig
from longctx.config import RetrievalConfig
from longctx.config import ShadowKVConfig
from longctx.config import StreamingConfig, TriForceRetrievalConfig
from longctx.models import SUPPORTED_MODEL_TYPES, RotaryHelper
from longctx.patch import PatchHandle, patch
from longctx.speculative import TriForceStats, triforce_decoding, triforce_generate

__version__ = "0.1.0"
__all__ = [
    "patch",
    "PatchHandle",
    "LongCtxCache",
    "list_backends",
    "get_backend",
    "make_layer",
    "register_backend",
    "BackendLayer",
    "LayerContext",
    "BackendConfig",
    "DenseConfig",
    "HiPConfig",
    "RetrievalConfig",
    "ShadowKVConfig",
    "StreamingConfig",
    "TriForceRetrievalConfig",
    "triforce_generate",
    "triforce_decoding",
    "TriForceStats",
    "RotaryHelper",
    "SUPPORTED_MODEL_TYPES",
]
