"""The tiny models' byte-level BPE tokenizer: training it, and growing a trained one (uuid letters one
per token, whole-word key tokens, numbers in digit groups) without changing existing ids."""
from __future__ import annotations

import json
import random
from typing import Optional, Sequence

from longctx.tiny.text import NOISE_LINE, RULER_NIAH_TASKS, load_essay_words, niah_sample, vt_sample

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tokenizer_corpus(essay_words: Sequence[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    corpus = [NOISE_LINE] * 50 + [" ".join(essay_words[i:i + 200]) for i in range(0, min(len(essay_words), 40000), 200)]
    for task in RULER_NIAH_TASKS:
        for _ in range(20):
            s = niah_sample(rng, task, 3, essay_words)
            corpus.append(s.prompt + s.answer)
    for _ in range(20):
        s = vt_sample(rng, 3)
        corpus.append(s.prompt)
    return corpus


# A hex letter that belongs to a uuid: joined to a digit through a run of hex letters, or in a group
# of exactly four letters between dashes. Byte-level BPE learnt English pairs such as "de", "ea",
# "ff" and "bf", so a uuid like "d2c7bffb-..." was spelt with a few two-letter tokens among single
# characters; the tiny target miscopied exactly those (18 of 23 copy errors at 4K niah_multikey_3
# on run GB fell on a two-letter token, which make up 6% of a uuid's tokens). Isolating these
# letters spells every uuid one character per token, as digits already are.
UUID_HEX_PATTERN = (
    r"[a-f](?=[a-f]*[0-9])|(?<=[0-9][a-f]{0,11})[a-f]"
    r"|(?<=-)[a-f](?=[a-f]{3}-)|(?<=-[a-f])[a-f](?=[a-f]{2}-)|(?<=-[a-f]{2})[a-f](?=[a-f]-)|(?<=-[a-f]{3})[a-f](?=-)"
)


def digit_group_pattern(size: int) -> str:
    """The pre-tokenizer regex that cuts digit runs into groups of up to ``size`` digits.

    A run of digits next to a hex letter or a dash (inside a uuid, e.g. ``05106943-be3e``) is cut
    into single digits as before; any other run is cut left to right into groups of ``size`` (a
    7-digit value ``1234567`` -> ``123``, ``456``, ``7``, as Llama 3's tokenizer does).
    """
    return rf"(?<=[a-f-][0-9]{{0,11}})[0-9]|[0-9](?=[0-9]{{0,11}}[a-f-])|[0-9]{{1,{size}}}"


def _pre_tokenizer(split_uuid_hex: bool, digit_groups: int = 1):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if digit_groups > 1:
        # One split for uuid letters and digit groups: each pattern needs the other's characters
        # as context, which a first split would have cut off into pieces of their own.
        pattern = (UUID_HEX_PATTERN + "|" if split_uuid_hex else "") + digit_group_pattern(digit_groups)
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"), byte_level])
    steps = [pre_tokenizers.Digits(individual_digits=True), byte_level]
    if split_uuid_hex:
        steps.insert(0, pre_tokenizers.Split(Regex(UUID_HEX_PATTERN), "isolated"))
    return pre_tokenizers.Sequence(steps)


def _split_patterns(tokenizer) -> list[str]:
    """The regexes of ``tokenizer``'s ``Split`` pre-tokenizers."""
    return [p.get("pattern", {}).get("Regex", "") for p in _pre_tokenizer_of(tokenizer).get("pretokenizers", [])
            if p.get("type") == "Split"]


def _pre_tokenizer_of(tokenizer) -> dict:
    """The serialised pre-tokenizer of a fast tokenizer (``{}`` when it has none)."""
    return json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}


def splits_uuid_hex(tokenizer) -> bool:
    """Whether ``tokenizer`` (a fast tokenizer of these models) spells uuid letters one per token."""
    return any(r == UUID_HEX_PATTERN or r.startswith(UUID_HEX_PATTERN + "|") for r in _split_patterns(tokenizer))


def split_uuid_hex(tokenizer):
    """Make a tokenizer of :func:`build_tokenizer`'s kind spell uuid hex letters one per token.

    The vocabulary and merges are unchanged (a trained model keeps every token); only the
    pre-tokenizer isolates the letters of :data:`UUID_HEX_PATTERN` before the byte-level BPE, so
    no two-letter merge applies inside a uuid. Idempotent; changes ``tokenizer`` in place and
    returns it.
    """
    if splits_uuid_hex(tokenizer):
        return tokenizer
    pre = _pre_tokenizer_of(tokenizer)
    kinds = [p.get("type") for p in pre.get("pretokenizers", [])]
    if kinds != ["Digits", "ByteLevel"]:
        raise ValueError("split_uuid_hex requires a tokenizer from longctx.tiny.build_tokenizer (pre-tokenizers "
                         f"Digits + ByteLevel; got {kinds or pre.get('type')})")
    tokenizer.backend_tokenizer.pre_tokenizer = _pre_tokenizer(split_uuid_hex=True)
    return tokenizer


def digit_group_size(tokenizer) -> int:
    """How many digits a token of ``tokenizer`` (one of these models') holds at most (1: single digits)."""
    for regex in _split_patterns(tokenizer):
        for size in range(2, 5):  # the sizes group_digits makes
            if regex.endswith(digit_group_pattern(size)):
                return size
    return 1


def group_digits(tokenizer, size: int = 3):
    """A copy of ``tokenizer`` that spells numbers in groups of up to ``size`` digits.

    With single-digit tokens a 7-digit value is 7 tokens drawn from 10, so at 16K (~540 needles,
    ~3,800 value digits) every digit a model copies occurs a few hundred times in the context and
    the copy has to be told apart by its neighbours alone; the shipped target's 16K misses are
    mostly values that start right and then drift (``BENCHMARKS.md``, "why answers miss").
    Grouping digits left to right (``1234567`` -> ``123``, ``456``, ``7``; the pre-tokenizer of
    :func:`digit_group_pattern`) makes a value 3 tokens drawn from 1,000. Every digit string of
    2 to ``size`` digits is appended to the vocabulary (1,100 tokens for ``size=3``); digits inside
    uuids stay single, and other text tokenizes as before. Existing ids keep their meaning; new
    ids follow them, so a trained model only needs :func:`grow_embeddings`. Idempotent.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerFast
        A tokenizer of :func:`build_tokenizer`'s kind (single-digit pre-tokenizer); left unchanged.
    size : int
        Largest group, 2 to 4 digits.

    Returns
    -------
    PreTrainedTokenizerFast
        The grown tokenizer (same special tokens, chat template and maximum length).
    """
    from tokenizers import Tokenizer

    if not isinstance(size, int) or not 2 <= size <= 4:
        raise ValueError(f"group_digits requires size to be an int in 2..4 digits per token (got {size!r})")
    current = digit_group_size(tokenizer)
    if current == size:
        return tokenizer
    if current != 1:
        raise ValueError(f"group_digits: the tokenizer already groups digits by {current}; regrouping by {size} "
                         "would reuse ids with other meanings")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    kinds = [p.get("type") for p in (spec.get("pre_tokenizer") or {}).get("pretokenizers", [])]
    if model.get("type") != "BPE" or "Digits" not in kinds:
        raise ValueError("group_digits requires a BPE tokenizer from longctx.tiny.build_tokenizer (pre-tokenizers "
                         f"[Split,] Digits, ByteLevel; got model {model.get('type')!r}, pre-tokenizers {kinds})")
    vocab = model["vocab"]
    specials = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    next_id = max([*vocab.values(), *specials.values()]) + 1
    for n in range(2, size + 1):
        for k in range(10 ** n):
            form = f"{k:0{n}d}"
            if form not in vocab:
                vocab[form] = next_id
                next_id += 1
    model["ignore_merges"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.pre_tokenizer = _pre_tokenizer(splits_uuid_hex(tokenizer), size)
    return _wrap_tokenizer(tok, tokenizer.chat_template, tokenizer.model_max_length)


def _byte_level(word: str) -> str:
    """``word`` in the byte-level alphabet the BPE vocabulary is written in (no leading space)."""
    from tokenizers.pre_tokenizers import ByteLevel

    return "".join(p for p, _ in ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(word))


def add_word_tokens(tokenizer, words: Sequence[str]):
    """A copy of ``tokenizer`` in which each of ``words`` is one token where it follows no space.

    RULER's word keys are ``adjective-noun``; with the trained 1,024-token vocabulary a noun such as
    ``dinosaur`` is spelt in 3-8 pieces, so a model must gather ~9 tokens into one key before it
    can tell ~600 needles apart (16K ``niah_multikey_2``). Appending each listed word to the BPE
    vocabulary in its space-less form, with the BPE's ``ignore_merges`` set (a pre-tokenized piece
    that is a vocabulary entry is taken whole), makes the noun after the hyphen a single token.
    Pieces preceded by a space (``" dinosaur"``) are other vocabulary entries, so essay and noise
    text tokenize as before (a listed word is affected only at the start of a line or after
    punctuation). A word given with a leading space (``" fluffy"``) is added in its spaced form
    instead, so it becomes one token wherever it follows a space, in other text too. Existing ids keep
    their meaning; new ids follow them, so a trained model only needs :func:`grow_embeddings`.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerFast
        A byte-level BPE tokenizer (:func:`build_tokenizer`'s kind); left unchanged.
    words : sequence of str
        Words to add (a leading space is kept, see above); those already a single token, duplicates
        and empty strings are skipped.

    Returns
    -------
    PreTrainedTokenizerFast
        The grown tokenizer (same special tokens, chat template and maximum length).
    """
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"add_word_tokens requires a BPE tokenizer (got model type {model.get('type')!r})")
    vocab = model["vocab"]
    specials = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    next_id = max([*vocab.values(), *specials.values()]) + 1
    for word in dict.fromkeys(w for w in words if w):
        if len(tokenizer(word, add_special_tokens=False).input_ids) < 2:
            continue
        form = _byte_level(word)
        if form not in vocab:
            vocab[form] = next_id
            next_id += 1
    model["ignore_merges"] = True
    return _wrap_tokenizer(Tokenizer.from_str(json.dumps(spec)), tokenizer.chat_template, tokenizer.model_max_length)


def build_tokenizer(vocab_size: int = 1024, seed: int = 0, essay_words: Optional[Sequence[str]] = None,
                    split_uuid_hex: bool = False):
    """Train the byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    Digits are always single tokens (a 7-digit number is 7 tokens); any other string falls back
    to bytes, so every word and uuid is spellable. BOS is prepended by the post-processor. With
    ``split_uuid_hex`` uuid letters are single tokens too (:data:`UUID_HEX_PATTERN`); the shipped
    models got that later through :func:`split_uuid_hex`, so the default keeps the recipe they
    were first trained with.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    essay_words = essay_words if essay_words is not None else load_essay_words()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(split_uuid_hex)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(essay_words, seed), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return _wrap_tokenizer(tok, CHAT_TEMPLATE, 65536)


def _wrap_tokenizer(tok, chat_template: str, max_length: int):
    """``tok`` (a ``tokenizers.Tokenizer``) as the ``PreTrainedTokenizerFast`` the tiny models ship with."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    hf.chat_template = chat_template
    hf.model_max_length = max_length
    return hf
