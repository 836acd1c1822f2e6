"""The tiny Llama models: their architecture, building and saving them, growing a trained one
(embeddings, an identity layer, a wider residual stream) without changing its outputs, and
averaging checkpoints."""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from longctx.tiny.tokenizer import _pre_tokenizer_of

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TinyConfig:
    """Architecture of one tiny Llama (target or draft).

    Parameters
    ----------
    hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size : int
        Llama shape; ``num_heads % num_kv_heads == 0`` (GQA) and ``head_dim >= 32``.
    rope_theta : float
        RoPE base. A large base (1e8) keeps the slowest twelve rotary pairs (of 32 at head dim 64)
        nearly constant over 32K tokens, so content matching can use them at lengths never trained
        on, while the fastest pairs still separate neighbouring tokens (previous-token heads).
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 384
    rope_theta: float = 1e8
    max_position_embeddings: int = 65536

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TinyConfig requires num_heads % num_kv_heads == 0 (got {self.num_heads}, {self.num_kv_heads})")
        if self.head_dim < 32:
            raise ValueError(f"TinyConfig requires head_dim >= 32 (got {self.head_dim})")

    def to_llama(self, tokenizer):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
        )


TARGET = TinyConfig()
DRAFT = TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=192)
MODEL_CONFIGS = {"target": TARGET, "draft": DRAFT}


def build_model(cfg: TinyConfig, tokenizer, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg.to_llama(tokenizer))


def grow_embeddings(model, vocab_size: int, seed: int = 0, near: Optional[Sequence[int]] = None,
                    spread: float = 0.7) -> int:
    """Grow ``model``'s (tied) token embeddings to ``vocab_size`` rows; returns how many were added.

    New rows are drawn from a normal with the existing rows' per-dimension mean and standard
    deviation, so they are as far apart as trained tokens are (``transformers``' mean resizing
    would make them nearly equal, useless as distinct keys). With ``near`` (one existing token id
    per new row) each new row starts at that token's row plus ``spread`` times that noise instead,
    so the trained circuits read a new token like its neighbour (a digit group like its first
    digit) until training tells them apart. Existing rows are unchanged.
    """
    emb = model.get_input_embeddings().weight
    old, dim = emb.shape  # [V, D]
    if vocab_size < old:
        raise ValueError(f"grow_embeddings requires vocab_size >= the model's {old} rows (got {vocab_size})")
    if vocab_size == old:
        return 0
    if near is not None and (len(near) != vocab_size - old or not all(0 <= int(i) < old for i in near)):
        raise ValueError(f"grow_embeddings requires near to hold one existing token id (0..{old - 1}) per new row "
                         f"({vocab_size - old}; got {len(near)} ids)")
    if not spread > 0:
        raise ValueError(f"grow_embeddings requires spread > 0 (got {spread})")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mean, std = emb.float().mean(0), emb.float().std(0)  # [D]
        noise = std * torch.randn(vocab_size - old, dim, generator=gen)  # [V', D]
        rows = mean + noise if near is None else emb.float()[torch.as_tensor(list(near))] + spread * noise
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        model.get_input_embeddings().weight[old:] = rows.to(emb.dtype)
    model.config.vocab_size = vocab_size
    return vocab_size - old


def save_model(model, tokenizer, path: Union[str, Path]):
    """Save ``model`` and ``tokenizer`` as one ``from_pretrained`` folder at ``path`` (created),
    with a greedy generation config naming the tokenizer's BOS / EOS / PAD ids."""
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    model.save_pretrained(path, safe_serialization=True)
    # the chat template goes into tokenizer_config.json (readable by older transformers too)
    tokenizer.save_pretrained(path, save_jinja_files=False)


def insert_identity_layer(model, at: int):
    """Grow ``model`` by one decoder layer at index ``at`` that leaves its outputs unchanged.

    The new layer has the model's own fresh initialisation except its attention output and MLP
    down projections, which are zero, so it adds nothing to the residual stream until training
    moves them (their gradients are non-zero from the first step). Every layer from ``at`` on
    moves up one index; with ``at >= 2`` the heads of :func:`supervised_heads` (the second and
    the last layer) stay on the same weights.

    Parameters
    ----------
    model : LlamaForCausalLM
        Modified in place (its ``config.num_hidden_layers`` too).
    at : int
        Index of the new layer, ``0 <= at <= num_hidden_layers``.

    Returns
    -------
    LlamaForCausalLM
        ``model``.

    Raises
    ------
    ValueError
        ``at`` outside ``[0, num_hidden_layers]``.
    """
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layers = model.model.layers
    if not 0 <= at <= len(layers):
        raise ValueError(f"insert_identity_layer requires 0 <= at <= {len(layers)} (the model's layer count), "
                         f"got at={at}")
    ref = next(model.parameters())
    layer = LlamaDecoderLayer(model.config, at).to(device=ref.device, dtype=ref.dtype)
    layer.apply(model._init_weights)  # the model's own initialisation, then the two residual writes to zero
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    layers.insert(at, layer)
    for i, lay in enumerate(layers):
        lay.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(layers)
    return model


def _padded(w: torch.Tensor, rows: int, cols: int, gen: torch.Generator, random_rows: bool = False,
            random_cols: bool = False) -> torch.nn.Parameter:
    """``w`` ``[R, C]`` padded to ``[rows, cols]`` (old block kept) as a new parameter.

    New rows / columns are zero, or drawn from a normal with ``w``'s standard deviation where
    ``random_rows`` / ``random_cols``.
    """
    r, c = w.shape
    std = float(w.float().std())
    new = torch.zeros(rows, cols, dtype=w.dtype, device=w.device)
    if random_rows and rows > r:
        new[r:] = std * torch.randn(rows - r, cols, generator=gen).to(new)
    if random_cols and cols > c:
        new[:, c:] = std * torch.randn(rows, cols - c, generator=gen).to(new)
    new[:r, :c] = w
    return torch.nn.Parameter(new)


def _grow_linear(lin: torch.nn.Linear, out_features: int, in_features: int, gen: torch.Generator,
                 **random: bool) -> None:
    """Pad ``lin``'s weight ``[O, I]`` to ``[out_features, in_features]`` in place (:func:`_padded`)."""
    lin.weight = _padded(lin.weight.data, out_features, in_features, gen, **random)
    lin.in_features, lin.out_features = in_features, out_features


def widen_model(model, hidden_size: Optional[int] = None, intermediate_size: Optional[int] = None,
                seed: int = 0):
    """Widen a Llama's residual stream and / or MLP in place without changing its outputs.

    The residual stream grows by zero dimensions: the (tied) embedding and every projection that
    writes the residual (attention output, MLP down) get zero rows there, while every projection
    that reads it (q, k, v, MLP gate and up) gets random columns with its trained weight's spread,
    so the new dimensions receive gradients from the first step. RMSNorm averages over the width,
    so each norm's trained gains are scaled by ``sqrt(old / new)`` and ``rms_norm_eps`` by
    ``old / new`` to keep its outputs exactly; new gains start at the mean old gain. New MLP units
    get random gate / up rows and zero down columns.
    Head count and head dim are unchanged, so :func:`supervised_heads` names the same heads.

    Parameters
    ----------
    model : LlamaForCausalLM
        Modified in place (``config.hidden_size`` / ``config.intermediate_size`` too).
    hidden_size, intermediate_size : int, optional
        New widths, each at least the current one; ``None`` keeps it.
    seed : int
        Seeds the new random weights.

    Returns
    -------
    LlamaForCausalLM
        ``model``.

    Raises
    ------
    ValueError
        A width below the current one, or untied embeddings (not supported).
    """
    cfg = model.config
    d_old, f_old = cfg.hidden_size, cfg.intermediate_size
    d = d_old if hidden_size is None else int(hidden_size)
    f = f_old if intermediate_size is None else int(intermediate_size)
    if d < d_old or f < f_old:
        raise ValueError(f"widen_model requires hidden_size >= {d_old} and intermediate_size >= {f_old} (the "
                         f"model's own; got hidden_size={hidden_size}, intermediate_size={intermediate_size})")
    if not getattr(cfg, "tie_word_embeddings", False):
        raise ValueError("widen_model requires tied input / output embeddings (config.tie_word_embeddings=True)")
    gen = torch.Generator().manual_seed(seed)
    gain = math.sqrt(d_old / d)
    eps = cfg.rms_norm_eps * d_old / d  # mean(x^2) over d dims + eps: the old value times d_old / d

    def grow_norm(norm):
        w = norm.weight.data  # [D]
        new = torch.full((d,), float(w.float().mean()) * gain, dtype=w.dtype, device=w.device)
        new[:d_old] = w * gain
        norm.weight = torch.nn.Parameter(new)
        norm.variance_epsilon = eps

    with torch.no_grad():
        emb = model.get_input_embeddings()
        emb.weight = _padded(emb.weight.data, emb.weight.shape[0], d, gen)  # [V, D], zero new columns
        emb.embedding_dim = d
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            for lin in (att.q_proj, att.k_proj, att.v_proj):
                _grow_linear(lin, lin.out_features, d, gen, random_cols=True)
            _grow_linear(att.o_proj, d, att.o_proj.in_features, gen)
            for lin in (mlp.gate_proj, mlp.up_proj):
                _grow_linear(lin, f, d, gen, random_rows=True, random_cols=True)
            _grow_linear(mlp.down_proj, d, f, gen)
            mlp.hidden_size, mlp.intermediate_size = d, f
            grow_norm(layer.input_layernorm)
            grow_norm(layer.post_attention_layernorm)
        grow_norm(model.model.norm)
    cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps = d, f, eps
    model.tie_weights()
    return model


# rope_parameters fields that are ints in transformers (the others are floats)
_INT_ROPE_FIELDS = ("original_max_position_embeddings",)


def set_rope(model, rope_parameters: dict) -> dict:
    """Give ``model`` another RoPE (``config.rope_parameters``) and rebuild its rotary embedding.

    The weights stay as they are: a trained model read with a slower rotation (a larger
    ``rope_theta``, or YaRN's by-parts interpolation of the low frequencies) is the inference-time
    length extension of the long-context literature, and training on from there adapts it.
    The new parameters are ``rope_parameters`` over ``{"rope_type": "default", "rope_theta": <the
    model's>}``: the base is kept unless given, and a scaling the model had is dropped unless given
    again (so ``{"rope_theta": 1e9}`` makes it a plain RoPE at base 1e9).

    Parameters
    ----------
    model : transformers.LlamaForCausalLM
    rope_parameters : dict
        transformers' ``rope_parameters`` keys, e.g. ``{"rope_theta": 1e9}`` or
        ``{"rope_type": "yarn", "factor": 10.0, "original_max_position_embeddings": 4096,
        "attention_factor": 1.0}``.

    Returns
    -------
    dict
        The model's new ``rope_parameters``.

    Raises
    ------
    ValueError
        ``rope_parameters`` not a dict, or parameters transformers rejects for that rope type.
    """
    if not isinstance(rope_parameters, dict):
        raise ValueError(f"set_rope requires rope_parameters as a dict, e.g. {{'rope_theta': 1e9}} "
                         f"(got {rope_parameters!r})")
    cfg = model.config
    old = dict(cfg.rope_parameters)
    # JSON writes 10.0 as 10: transformers wants floats for every numeric rope field but these
    given = {k: float(v) if type(v) is int and k not in _INT_ROPE_FIELDS else v for k, v in rope_parameters.items()}
    new = {"rope_type": "default", "rope_theta": old["rope_theta"], **given}
    cfg.rope_parameters = new
    try:
        cfg.validate_rope()
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=cfg).to(rotary.inv_freq.device)
    except (KeyError, TypeError, ValueError) as e:
        cfg.rope_parameters = old
        raise ValueError(f"set_rope requires rope parameters transformers accepts for a Llama model "
                         f"(got {rope_parameters!r}: {e})") from None
    return new


def average_checkpoints(sources: Sequence[Path], out: Path, name: str = "target") -> None:
    """Average the weights of ``<source>/tiny-<name>`` over ``sources`` (uniform) into ``out/tiny-<name>``.

    Runs continued from one parent on different data streams stay in one basin, so their
    average (a "model soup") is a working model too, often better than each. The tokenizer
    and config come from the first source.

    Raises
    ------
    ValueError
        Fewer than two sources, a missing folder, or sources whose configs or tokenizers differ.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = [Path(src) / f"tiny-{name}" for src in sources]
    if len(folders) < 2:
        raise ValueError(f"average_checkpoints requires at least two sources (got {[str(s) for s in sources]})")
    missing = [str(f) for f in folders if not (f / "config.json").exists()]
    if missing:
        raise ValueError(f"average_checkpoints requires a saved tiny-{name} model in every source (missing: {missing})")
    models = [AutoModelForCausalLM.from_pretrained(f) for f in folders]
    toks = [AutoTokenizer.from_pretrained(f) for f in folders]

    def comparable_config(m):
        d = m.config.to_dict()
        for key in ("transformers_version", "_name_or_path"):  # not part of the model
            d.pop(key, None)
        return d

    for f, m, t in zip(folders[1:], models[1:], toks[1:]):
        if (comparable_config(m) != comparable_config(models[0]) or t.get_vocab() != toks[0].get_vocab()
                or _pre_tokenizer_of(t) != _pre_tokenizer_of(toks[0])):
            raise ValueError(f"average_checkpoints requires one config and tokenizer in all sources "
                             f"({f} differs from {folders[0]})")
    states = [m.state_dict() for m in models]
    avg = {k: sum(sd[k].double() for sd in states).div(len(states)).to(v.dtype) for k, v in states[0].items()}
    models[0].load_state_dict(avg)
    save_model(models[0], toks[0], Path(out) / f"tiny-{name}")
    logger.info("averaged tiny-%s of %s into %s", name, [str(s) for s in sources], out)
