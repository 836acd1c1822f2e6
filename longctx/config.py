"""One ``@dataclass`` per method, validated at construction.

Every config derives from :class:`BackendConfig`, which gives them a common way to be
built from ``**options`` or CLI ``k=v`` strings with a clear error for unknown keys.
Sections below are one per method; keep each method's config in its own section.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Optional


def _require(cond: bool, cls: str, name: str, expected: str, value: Any) -> None:
    """Raise ``ValueError("Cls.name requires <expected> (got <value>)")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"{cls}.{name} requires {expected} (got {value!r})")


def _coerce(value: Any, annotation: Any, cls: str, name: str) -> Any:
    """Convert a CLI string to the field's declared type (int, float, bool, str, Optional[...])."""
    if not isinstance(value, str):
        return value
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(
            annotation.replace("Optional[", "").rstrip("]"), str
        )
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        annotation = args[0] if args else str
    try:
        if annotation is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float):
            return annotation(value)
    except ValueError:
        raise ValueError(f"{cls}.{name} requires a {annotation.__name__} (got {value!r})") from None
    return value


@dataclasses.dataclass
class BackendConfig:
    """Base of every method config. Subclasses validate their fields in ``__post_init__``."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> "BackendConfig":
        """Build the config from keyword options (values may be CLI strings).

        Raises
        ------
        ValueError
            For an option the config does not have (the message lists the valid ones) or
            a value that fails validation.
        """
        merged = dict(options or {})
        merged.update(kwargs)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - set(fields))
        if unknown:
            raise ValueError(
                f"{cls.__name__} got unknown option(s) {unknown}; valid options: {sorted(fields) or '(none)'}"
            )
        hints = typing.get_type_hints(cls)
        coerced = {k: _coerce(v, hints.get(k, fields[k].type), cls.__name__, k) for k, v in merged.items()}
        return cls(**coerced)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------- dense
@dataclasses.dataclass
class DenseConfig(BackendConfig):
    """Exact attention over the whole cache (the reference backend).

    Parameters
    ----------
    offload : bool
        Keep K/V on the host tier instead of the device tier (default ``False``).
    """

    offload: bool = False

    def __post_init__(self):
        _require(isinstance(self.offload, bool), "DenseConfig", "offload", "a bool", self.offload)


# ------------------------------------------------------------------------- shadowkv
# (ShadowKVConfig goes here)

# ------------------------------------------------------------------------- retrieval
# (RetrievalConfig goes here)

# ------------------------------------------------------------------------- hip
# (HiPConfig goes here)

# ------------------------------------------------------------------------- triforce
# (TriForce's middle-level chunk-retrieval config goes here)
