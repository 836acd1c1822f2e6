"""Fixtures for the evaluation harness: a small byte-level BPE tokenizer and a tiny random Llama."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIALS = ["<pad>", "<s>", "</s>"]


def _corpus() -> list[str]:
    from longctx.eval import longbench as lb
    from longctx.eval import ruler as rl
    from longctx.eval.ruler_synthetic import NOISE_LINE

    texts = [NOISE_LINE] * 20
    for base in rl.BASE_TASKS.values():
        texts += [base["template"], base["answer_prefix"]]
    texts += list(lb.DATASET2PROMPT.values())
    texts += [
        "One of the special magic numbers for blue-eyed-dog is: 1234567.",
        "VAR ABCDE = 12345",
        "0123456789 abcdef-",
    ]
    return texts


def build_tokenizer(vocab_size: int = 600):
    """A byte-level BPE trained on the benchmark templates (any text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def eval_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_eval_model(tmp_path_factory, eval_tokenizer):
    """A tiny random Llama with the test tokenizer, saved with save_pretrained; returns its folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_eval_llama")
    cfg = LlamaConfig(
        vocab_size=len(eval_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=eval_tokenizer.bos_token_id,
        eos_token_id=eval_tokenizer.eos_token_id,
        pad_token_id=eval_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    eval_tokenizer.save_pretrained(path)
    return str(path)
