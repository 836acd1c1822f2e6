"""Shared fixtures: tiny random models of every supported architecture, saved and reloaded."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def tiny_config(model_type: str, **overrides):
    """A tiny random config of ``model_type`` (GQA 4/2, D=16)."""
    from transformers import AutoConfig

    kwargs = dict(TINY)
    if model_type in ("mistral", "qwen2"):
        kwargs["sliding_window"] = None
    if model_type == "qwen3":
        kwargs["head_dim"] = 16
    if model_type == "phi3":
        kwargs["pad_token_id"] = 0
        kwargs["bos_token_id"] = 1
        kwargs["eos_token_id"] = 2
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """``{model_type: path}``: tiny random models written with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny_models")
    paths = {}
    for i, mt in enumerate(["llama", "mistral", "qwen2", "qwen3", "phi3"]):
        path = root / mt
        tiny_model(mt, seed=i).save_pretrained(path)
        paths[mt] = str(path)
    return paths


@pytest.fixture
def gen():
    """A seeded torch.Generator for fresh random inputs."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def faiss_single_thread():
    """One torch and one faiss thread for a test module: on tiny problems OpenMP barriers cost more
    than they save, badly so on a loaded machine."""
    import faiss

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)
