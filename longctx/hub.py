"""Short names for the models that ship with longctx.

``resolve_model_path("tiny")`` gives the folder of the bundled tiny target, so every CLI and
notebook can say ``--model tiny`` while real checkpoints still load by path or hub id through
the same ``from_pretrained`` call.

>>> from longctx.hub import load_tiny
>>> model, tokenizer = load_tiny("tiny")          # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import torch

MODELS_DATA = Path(__file__).resolve().parent / "models_data"

# short name -> folder under longctx/models_data (trained by longctx.tiny, see its README.md)
SHORT_NAMES = {
    "tiny": "tiny-target",
    "tiny-target": "tiny-target",
    "tiny-draft": "tiny-draft",
}


def resolve_model_path(name_or_path: str) -> str:
    """Map a bundled model's short name to its folder; return any other argument unchanged.

    Parameters
    ----------
    name_or_path : str
        ``"tiny"`` / ``"tiny-target"`` (the bundled target), ``"tiny-draft"`` (its draft), or
        anything ``from_pretrained`` accepts (a path or a hub id), which is returned as is.

    Raises
    ------
    FileNotFoundError
        When a short name's folder is missing (e.g. an install without package data).
    """
    folder = SHORT_NAMES.get(str(name_or_path))
    if folder is None:
        return str(name_or_path)
    path = MODELS_DATA / folder
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"bundled model {name_or_path!r} requires {path} (got no config.json there); "
            "reinstall longctx with its package data or rebuild it with `longctx train-tiny`"
        )
    return str(path)


def load_tiny(name: str = "tiny", dtype: torch.dtype = torch.float32):
    """Load a bundled tiny model and its tokenizer.

    Parameters
    ----------
    name : str
        ``"tiny"`` (target) or ``"tiny-draft"``; any path or hub id also works.
    dtype : torch.dtype
        Weights dtype (the files are fp32).

    Returns
    -------
    (model, tokenizer)
        A ``LlamaForCausalLM`` in eval mode and its ``PreTrainedTokenizerFast``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
