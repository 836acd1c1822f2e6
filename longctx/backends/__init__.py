"""Backend registry: ``name -> (config class, layer class)``.

A backend module registers itself with :func:`register_backend` at import; this package
imports the built-in modules listed in ``_BUILTIN_MODULES`` so that ``list_backends()``
names them all. Adding a method means adding one file and one entry here.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional, Union

from longctx.backends.base import BackendLayer, BackendSpec, LayerContext
from longctx.config import BackendConfig

_REGISTRY: dict[str, BackendSpec] = {}
_BUILTIN_MODULES = ["dense", "shadowkv", "hip", "streaming", "chunk_retrieval", "retrieval"]  # helpers: append your module name here


def register_backend(name: str, config_cls: type, description: str = ""):
    """Class decorator registering a :class:`BackendLayer` subclass under ``name``."""

    def wrap(layer_cls):
        if name in _REGISTRY and _REGISTRY[name].layer_cls is not layer_cls:
            raise ValueError(f"backend name {name!r} is already registered by {_REGISTRY[name].layer_cls.__name__}")
        layer_cls.name = name
        _REGISTRY[name] = BackendSpec(name, config_cls, layer_cls, description or (layer_cls.__doc__ or "").split("\n")[0])
        return layer_cls

    return wrap


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"longctx.backends.{mod}")


def list_backends() -> list[str]:
    """Names of every registered backend, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_backend(name: str) -> BackendSpec:
    """Look up a backend by name; unknown names raise ``ValueError`` listing the valid ones."""
    _load_builtins()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend requires one of {sorted(_REGISTRY)} (got {name!r})")
    return _REGISTRY[name]


def resolve_config(
    backend: Union[str, BackendConfig], options: Optional[Mapping[str, Any]] = None
) -> tuple[BackendSpec, BackendConfig]:
    """Turn ``backend`` (a name or a config instance) plus ``options`` into ``(spec, config)``.

    Raises
    ------
    ValueError
        Unknown backend name, unknown option, or options given together with a config.
    TypeError
        ``backend`` is neither a string nor a registered config instance.
    """
    _load_builtins()
    if isinstance(backend, BackendConfig):
        if options:
            raise ValueError(f"options {sorted(options)} cannot be combined with a config instance; set them on the config")
        for spec in _REGISTRY.values():
            if type(backend) is spec.config_cls:
                return spec, backend
        raise TypeError(f"backend config {type(backend).__name__} is not registered; registered: {sorted(_REGISTRY)}")
    if isinstance(backend, str):
        spec = get_backend(backend)
        return spec, spec.config_cls.from_options(options or {})
    raise TypeError(f"backend requires a backend name (str) or a config instance (got {type(backend).__name__})")


def make_layer(backend: Union[str, BackendConfig], ctx: LayerContext, **options: Any) -> BackendLayer:
    """Build one backend layer outside a model (bench, tests)."""
    spec, config = resolve_config(backend, options)
    return spec.layer_cls(config, ctx)


__all__ = [
    "BackendLayer",
    "BackendSpec",
    "LayerContext",
    "register_backend",
    "list_backends",
    "get_backend",
    "resolve_config",
    "make_layer",
]
