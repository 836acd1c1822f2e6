"""Tiny long-context Llama models (target + draft + tokenizer) trained on synthetic retrieval text.

No weights can be downloaded where longctx runs its tests, so it trains and ships its own small
models whose attention really retrieves across long contexts. This package holds everything
needed to rebuild them from scratch, seeded and reproducible:

- a byte-level BPE tokenizer (HF ``tokenizers``) with word tokens for the template/haystack
  words, single digits (any 7-digit number is 7 digit tokens) and a byte fallback (any word or
  uuid can be spelled), saved with a chat template; options that grow it for a trained model
  (uuid letters one per token, whole-word key tokens, numbers in groups of up to 3 digits);
- a synthetic data generator shaped exactly like RULER's NIAH tasks (noise / needle / essay
  haystacks, the official needle sentence, question template, answer prefix and singular
  rewrite, multi-key / multi-value / multi-query variants), variable-tracking chains, and plain
  copy (induction) text;
- a training loop with a length curriculum (short contexts to learn the mechanism, then long
  ones), PoSE-style position skips, a large RoPE base so that positions vary slowly,
  training-only previous-token probes that get the induction circuit to form, and a final
  "polish" on NIAH answers with the last digit of each value weighted (the circuit otherwise
  copies six digits of seven);
- a quick greedy RULER-format evaluator (string_match_all) and the draft/target agreement.

Run ``python -m longctx.tiny --help`` (mounted as ``longctx train-tiny``).

One concern per module, every name re-exported here (``longctx.tiny.<name>`` works as it did
when this package was one module):

- :mod:`longctx.tiny.paths`: the package, shipped-models and essay-haystack paths;
- :mod:`longctx.tiny.text`: RULER's templates, the synthetic essay, keys / values and samples;
- :mod:`longctx.tiny.tokenizer`: building and growing the tokenizer;
- :mod:`longctx.tiny.model`: the model configs; building, saving, growing and averaging models;
- :mod:`longctx.tiny.data`: the training mixture, sample stream and batches;
- :mod:`longctx.tiny.curriculum`: stages, the curricula and their configuration;
- :mod:`longctx.tiny.training`: probes, loss weights, the loss and the training loop;
- :mod:`longctx.tiny.evaluation`: the quick RULER-format evaluator and the draft agreement;
- :mod:`longctx.tiny.retrieval`: the retrieval supervision of the heads and the circuit report
  (its own names are not re-exported; import them from there);
- :mod:`longctx.tiny.cli`: the ``train-tiny`` command line.
"""
from __future__ import annotations

import logging

from longctx.tiny.cli import resolve_device, train_tiny_main
from longctx.tiny.curriculum import (
    CONTINUATION, CONTINUATION_MIX, CURRICULUM, KEYMATCH, KEYMATCH_MIX, LONG_STAGE_FACTOR, POLISH, POLISH_MIX,
    RETRIEVAL, RETRIEVAL_MIX, RETRIEVAL_ROLES, Stage, configure_stages, long_stage, parse_mix,
)
from longctx.tiny.data import TRAIN_MIX, TRAIN_TASKS, SampleStream, make_batch
from longctx.tiny.evaluation import (
    draft_agreement, evaluate, greedy_answer, ruler_postprocess, sized_niah_samples, string_match_all,
)
from longctx.tiny.model import (
    DRAFT, MODEL_CONFIGS, TARGET, TinyConfig, average_checkpoints, build_model, grow_embeddings,
    insert_identity_layer, save_model, set_rope, widen_model,
)
from longctx.tiny.paths import ESSAY_PATH, MODELS_DIR, PACKAGE_DIR
from longctx.tiny.text import (
    DONE_WHEN_TASKS, ESSAY_DEPTHS, NEEDLE, NIAH_ANSWER_PREFIX, NIAH_TEMPLATE, NOISE_LINE, RULER_NIAH_TASKS,
    VT_ANSWER_PREFIX, VT_TEMPLATE, WORD_TOKEN_LISTS, Sample, load_essay_words, near_key, niah_sample, random_key,
    random_value, synthetic_essay_text, vt_sample,
)
from longctx.tiny.tokenizer import (
    CHAT_TEMPLATE, SPECIAL_TOKENS, UUID_HEX_PATTERN, add_word_tokens, build_tokenizer, digit_group_pattern,
    digit_group_size, group_digits, split_uuid_hex, splits_uuid_hex,
)
from longctx.tiny.training import PrevTokenProbes, final_token_weights, supervised_heads, train

# private helpers, reachable as longctx.tiny._<name> as when this package was one module
from longctx.tiny.cli import _parse, _print_circuit_report  # noqa: F401
from longctx.tiny.data import _UNIT_TOKENS  # noqa: F401
from longctx.tiny.evaluation import _answer_budget  # noqa: F401
from longctx.tiny.model import _grow_linear  # noqa: F401
from longctx.tiny.text import (  # noqa: F401
    _ADJ_BY_PREFIX, _ADJECTIVES, _ADVERBIALS, _CLAUSES, _KEY_ADJ, _KEY_NOUN, _NOUNS, _OBJECTS, _OPENERS, _SUBJECTS,
    _SYLLABLES, _VERBS, _by_prefix, _join_query, _join_values, _pseudo_word, _sentence, _split_sentences, _wordlist,
)
from longctx.tiny.tokenizer import (  # noqa: F401
    _byte_level, _pre_tokenizer, _pre_tokenizer_of, _split_patterns, _tokenizer_corpus, _wrap_tokenizer,
)
from longctx.tiny.training import _loss, _role_targets  # noqa: F401

logger = logging.getLogger(__name__)  # "longctx.tiny", the parent of each module's logger

__all__ = [
    "PACKAGE_DIR", "MODELS_DIR", "ESSAY_PATH",
    "NOISE_LINE", "NEEDLE", "NIAH_TEMPLATE", "NIAH_ANSWER_PREFIX", "VT_TEMPLATE", "VT_ANSWER_PREFIX",
    "ESSAY_DEPTHS", "RULER_NIAH_TASKS", "DONE_WHEN_TASKS", "synthetic_essay_text", "load_essay_words", "random_key",
    "WORD_TOKEN_LISTS", "near_key", "random_value", "Sample", "niah_sample", "vt_sample",
    "SPECIAL_TOKENS", "CHAT_TEMPLATE", "UUID_HEX_PATTERN", "digit_group_pattern", "splits_uuid_hex",
    "split_uuid_hex", "digit_group_size", "group_digits", "add_word_tokens", "build_tokenizer",
    "TinyConfig", "TARGET", "DRAFT", "MODEL_CONFIGS", "build_model", "grow_embeddings", "save_model",
    "insert_identity_layer", "widen_model", "set_rope", "average_checkpoints",
    "TRAIN_MIX", "TRAIN_TASKS", "SampleStream", "make_batch",
    "RETRIEVAL_ROLES", "Stage", "CURRICULUM", "CONTINUATION_MIX", "CONTINUATION", "POLISH_MIX", "POLISH",
    "KEYMATCH_MIX", "KEYMATCH", "RETRIEVAL_MIX", "RETRIEVAL", "LONG_STAGE_FACTOR", "long_stage", "configure_stages",
    "parse_mix",
    "PrevTokenProbes", "final_token_weights", "supervised_heads", "train",
    "ruler_postprocess", "string_match_all", "sized_niah_samples", "greedy_answer", "evaluate", "draft_agreement",
    "resolve_device", "train_tiny_main",
]
