"""Model adapters: everything that differs between supported architectures lives here.

One small table keyed by ``config.model_type`` says how to find the decoder layers, the
attention modules and the rotary module, and which features the architecture has
(QK-norm, fused qkv, partial rotary, sliding window). The rest of longctx reads only this
table, so adding a model is one entry.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch

from longctx.backends.base import LayerContext

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    """How longctx reads one architecture.

    Parameters
    ----------
    model_type : str
        ``config.model_type`` this entry serves.
    qk_norm : bool
        The attention applies RMSNorm to q and k per head before RoPE (Qwen3). Keys reaching
        the cache are then normalised and rotated; pre-RoPE recovery returns normalised keys.
    fused_qkv : bool
        q, k, v come from one projection (Phi-3). Nothing changes after the projection.
    partial_rotary_attr : str, optional
        Config attribute giving the rotated fraction of the head dim (Phi-3 family).
    """

    model_type: str
    qk_norm: bool = False
    fused_qkv: bool = False
    partial_rotary_attr: Optional[str] = None


ADAPTERS: dict[str, ModelAdapter] = {
    "llama": ModelAdapter("llama"),
    "mistral": ModelAdapter("mistral"),
    "qwen2": ModelAdapter("qwen2"),
    "qwen3": ModelAdapter("qwen3", qk_norm=True),
    "phi3": ModelAdapter("phi3", fused_qkv=True, partial_rotary_attr="partial_rotary_factor"),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ADAPTERS))


def get_adapter(model_or_config: Any) -> ModelAdapter:
    """Return the adapter for a model (or its config).

    Raises
    ------
    ValueError
        When ``config.model_type`` is not supported; the message lists the supported ones.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"model_type {model_type!r} is not supported by longctx; supported: {list(SUPPORTED_MODEL_TYPES)}")
    return ADAPTERS[model_type]


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``model.model`` for ``*ForCausalLM``)."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "layers") else model


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in order."""
    return [layer.self_attn for layer in base_model(model).layers]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim: ``[x1, x2] -> [-x2, x1]`` (Llama's RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryHelper:
    """Apply or undo RoPE at arbitrary positions with the model's own rotary module.

    Uses ``rotary_emb(x, position_ids) -> (cos, sin)`` so every rope variant transformers
    implements (default, linear, dynamic, llama3, yarn, longrope) is handled, including
    ``attention_scaling`` (yarn's mscale) and partial rotary (cos/sin narrower than D).

    Parameters
    ----------
    rotary_emb : torch.nn.Module
        The model's rotary embedding module.
    """

    def __init__(self, rotary_emb: torch.nn.Module):
        self.rotary_emb = rotary_emb

    def cos_sin(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` each ``[B, 1, S, R]`` (R = rotated dims) in fp32 for ``positions`` ``[B, S]``."""
        dummy = like.new_empty((), dtype=torch.float32)
        cos, sin = self.rotary_emb(dummy, positions.to(like.device))
        return cos.float().unsqueeze(1), sin.float().unsqueeze(1)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[B, Hkv, S, D]`` (pre-RoPE) to the given positions ``[B, S]``."""
        cos, sin = self.cos_sin(positions, x)
        r = cos.shape[-1]
        xr, xp = x[..., :r].float(), x[..., r:]
        out = xr * cos + rotate_half(xr) * sin
        return torch.cat([out.to(x.dtype), xp], dim=-1)

    def invert(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Recover pre-RoPE ``x`` ``[B, Hkv, S, D]`` from keys rotated at ``positions`` ``[B, S]``.

        RoPE with scale s is ``s * R(θ)``; its inverse is ``R(θ)ᵀ / s``. With ``cos = s·c``,
        ``sin = s·n``: ``x·cos − rotate_half(x)·sin = s² · R(θ)ᵀ x``, and ``s² = cos² + sin²``.
        """
        cos, sin = self.cos_sin(positions, x)
        r = cos.shape[-1]
        xr, xp = x[..., :r].float(), x[..., r:]
        # R(θ)ᵀ applied to rotate_half layout: x·cos − rotate_half(x)·sin, then rescale
        out = (xr * cos - rotate_half(xr) * sin) / (cos * cos + sin * sin)
        return torch.cat([out.to(x.dtype), xp], dim=-1)


def layer_contexts(model: torch.nn.Module, host_device: Optional[torch.device] = None) -> list[LayerContext]:
    """One :class:`LayerContext` per decoder layer, read from the model's config and modules."""
    adapter = get_adapter(model)
    config = model.config
    inner = base_model(model)
    rotary = RotaryHelper(inner.rotary_emb) if hasattr(inner, "rotary_emb") else None
    attn = attention_modules(model)
    num_heads = config.num_attention_heads
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if adapter.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    ctxs = []
    for i, module in enumerate(attn):
        head_dim = getattr(module, "head_dim", None) or config.hidden_size // num_heads
        layer_window = window
        if layer_types is not None and i < len(layer_types) and layer_types[i] != "sliding_attention":
            layer_window = None
        ctxs.append(
            LayerContext(
                layer_idx=i,
                num_layers=len(attn),
                num_heads=num_heads,
                num_kv_heads=num_kv,
                head_dim=head_dim,
                scale=float(getattr(module, "scaling", head_dim**-0.5)),
                rotary=rotary,
                sliding_window=layer_window,
                host_device=host_device or torch.device("cpu"),
            )
        )
    return ctxs
