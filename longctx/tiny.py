"""Tiny long-context Llama models (target + draft + tokenizer) trained on synthetic retrieval text.

No weights can be downloaded where longctx runs its tests, so it trains and ships its own small
models whose attention really retrieves across long contexts. This module holds everything
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
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import re
import sys
import string
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
MODELS_DIR = PACKAGE_DIR / "models_data"
ESSAY_PATH = PACKAGE_DIR.parent / "eval" / "data" / "synthetic_essays.json"

# ---------------------------------------------------------------------------------------------
# RULER NIAH text, verbatim (NVIDIA/RULER scripts/data/synthetic/niah.py and synthetic.yaml)
# ---------------------------------------------------------------------------------------------
NOISE_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)
ESSAY_DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40))

# name: (haystack, type_needle_k, type_needle_v, num_needle_k, num_needle_v, num_needle_q)
RULER_NIAH_TASKS = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 1, 1, 4),
}
DONE_WHEN_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# ---------------------------------------------------------------------------------------------
# Synthetic prose (the stand-in essay haystack; NOT Paul Graham's essays)
# ---------------------------------------------------------------------------------------------
_SUBJECTS = (
    "the founder|the team|the company|the investor|the programmer|the writer|the student|the city|the market|"
    "the product|the user|the startup|the teacher|the scientist|the engineer|the reader|the customer|the manager|"
    "most people|a good idea|a small group|the best work|the old system|a new language|every project|the problem|"
    "the research|the design|the school|the book|the question|the answer|the crowd|the committee|the editor"
).split("|")
_VERBS = (
    "builds|changes|explains|discovers|ignores|follows|solves|makes|needs|wants|finds|learns|measures|writes|reads|"
    "questions|improves|notices|protects|tests|chooses|describes|creates|avoids|remembers|considers|shapes|funds"
).split("|")
_OBJECTS = (
    "the problem|a simple tool|the whole market|an unusual plan|the hard parts|the next version|a better way|"
    "the original question|a long essay|the early users|the real cost|a clear goal|the main risk|the old habits|"
    "a surprising result|the right people|the first draft|a useful habit|the daily routine|the small details|"
    "the obvious answer|a careful study|the last chapter|the open secret|a quiet room|the future|the past"
).split("|")
_ADVERBIALS = (
    "in the end|over time|at first|for a while|in practice|without much effort|with great care|after a long time|"
    "in most cases|by accident|for years|every morning|in a few weeks|on purpose|at the same time|in theory|"
    "more often than not|as a rule|from the start|against all odds|in the long run|surprisingly quickly"
).split("|")
_OPENERS = (
    "However,|In fact,|Of course,|Usually|Sometimes|Often|Still,|Then|Later|Now|Meanwhile,|For example,|"
    "In other words,|Even so,|Perhaps|Naturally,|Strangely,|Clearly|Fortunately,|Above all,"
).split("|")
_CLAUSES = (
    "because it was easier|although nobody expected it|which surprised everyone|since the rules were unclear|"
    "when the money ran out|while the others waited|so that it would last|unless someone objected|"
    "as if it were obvious|even though it was hard|before anyone noticed|once the work was done"
).split("|")
_ADJECTIVES = (
    "quiet bright simple careful strange large small ancient modern gentle rapid silent clever honest narrow broad "
    "heavy light curious patient brave calm eager fancy fresh golden hollow humble lively lucky mellow noble plain "
    "proud rare rough sharp smooth solid steady sweet tender tidy vast warm wild wise young dusty empty frozen"
).split()
_NOUNS = (
    "river mountain garden window kettle lantern harbor pencil castle meadow bridge candle forest island ladder "
    "mirror orchard pepper rocket saddle shadow teacup thunder tunnel violin wagon basket blanket button canyon "
    "cloud copper desert engine feather fiddle glacier hammer helmet jacket jungle kitten lemon magnet marble "
    "needle ocean oyster parrot pillow planet puzzle quilt rabbit ribbon sandal signal spider statue tiger tower "
    "trumpet valley wallet whistle wizard yacht zebra anchor beacon biscuit cabinet cactus compass dragon"
).split()
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ch", "sh", "st", "qu", "ng", "er", "an"]


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))


def _sentence(rng: random.Random) -> str:
    parts = []
    if rng.random() < 0.35:
        parts.append(rng.choice(_OPENERS))
    parts += [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.5:
        parts.append(rng.choice(_ADVERBIALS))
    if rng.random() < 0.3:
        parts.append(rng.choice(_CLAUSES))
    if rng.random() < 0.3:
        parts += ["and", rng.choice(_VERBS), rng.choice(_OBJECTS)]
    text = " ".join(parts)
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "?", "!"])


def synthetic_essay_text(n_words: int = 60000, seed: int = 0) -> str:
    """Generate the stand-in essay haystack: grammatical filler prose from a small grammar.

    It replaces RULER's ``PaulGrahamEssays.json`` (which cannot be shipped or fetched here) for
    training and for offline runs. It is NOT Paul Graham's essays.
    """
    rng = random.Random(seed)
    paragraphs, n = [], 0
    while n < n_words:
        para = " ".join(_sentence(rng) for _ in range(rng.randint(3, 8)))
        paragraphs.append(para)
        n += len(para.split())
    return "\n\n".join(paragraphs)


def load_essay_words(path: Path = ESSAY_PATH) -> list[str]:
    """Words of the stand-in essay, split as RULER does (``re.sub(r'\\s+', ' ', essay).split(' ')``)."""
    if path.exists():
        text = json.loads(path.read_text())["text"]
    else:
        text = synthetic_essay_text()
    return re.sub(r"\s+", " ", text).split(" ")


def _split_sentences(words: Sequence[str]) -> list[str]:
    # a stand-in for nltk.sent_tokenize that is exact on the synthetic prose (no abbreviations)
    sents, cur = [], []
    for w in words:
        cur.append(w)
        if w.endswith((".", "?", "!")):
            sents.append(" ".join(cur))
            cur = []
    if cur:
        sents.append(" ".join(cur))
    return sents


# ---------------------------------------------------------------------------------------------
# RULER-shaped samples
# ---------------------------------------------------------------------------------------------
def _wordlist(name: str, fallback: Sequence[str]) -> list[str]:
    path = PACKAGE_DIR.parent / "eval" / "data" / f"wonderwords_{name}list.txt"
    if path.exists():
        return [w.strip() for w in path.read_text().splitlines() if w.strip()]
    return list(fallback)


_KEY_ADJ = _wordlist("adjective", _ADJECTIVES)
_KEY_NOUN = _wordlist("noun", _NOUNS)


def random_key(rng: random.Random) -> str:
    """A RULER-like word key ``adjective-noun``: wonderwords words (RULER's lists, vendored in
    eval/data) 85% of the time, pseudo-words otherwise so that any spelling is seen."""
    a = rng.choice(_KEY_ADJ) if rng.random() < 0.85 else _pseudo_word(rng)
    b = rng.choice(_KEY_NOUN) if rng.random() < 0.85 else _pseudo_word(rng)
    return f"{a}-{b}"


def _by_prefix(words: Sequence[str], n: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for w in words:
        out.setdefault(w[:n], []).append(w)
    return out


# word lists that --word-tokens can make whole tokens: "nouns", the second word of a RULER key (after the
# hyphen); "keys", both words (the adjective with its leading space, so a key is 3 tokens)
WORD_TOKEN_LISTS = {"nouns": list(_KEY_NOUN), "keys": [*_KEY_NOUN, *(" " + a for a in _KEY_ADJ)]}

# adjectives by their first 1, 2 and 3 letters (near-miss keys)
_ADJ_BY_PREFIX = {n: _by_prefix(_KEY_ADJ, n) for n in (1, 2, 3)}


def near_key(rng: random.Random, key: str) -> str:
    """A word key that differs from ``key`` but shares its start: the same adjective with another noun
    (40%, and whenever no listed adjective shares its first letter), or an adjective with the same
    first 1-3 letters and any noun (60%).

    A model that matches keys by their first tokens confuses these with ``key``: when a
    continuation of the seventh session's target answered multikey_2 with another needle's value,
    that needle's key began with the asked key's letter 20 times in 21 (5.5% of needles do by
    chance). Training with them as distractors asks for the whole key.
    """
    adj = key.partition("-")[0]
    while True:
        pool = None
        if rng.random() >= 0.4:  # the longest shared prefix of at most n letters that list adjectives have
            n = rng.randint(1, 3)
            pool = next((_ADJ_BY_PREFIX[m][adj[:m]] for m in range(n, 0, -1) if adj[:m] in _ADJ_BY_PREFIX[m]), None)
        cand = f"{adj if pool is None else rng.choice(pool)}-{rng.choice(_KEY_NOUN)}"
        if cand != key:
            return cand


def random_value(rng: random.Random, kind: str) -> str:
    """A value as RULER draws it: 7-digit number, word, or uuid4 string."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return random_key(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"random_value requires kind in numbers/words/uuids (got {kind!r})")


def _join_query(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _join_values(values: Sequence[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + ", and " + values[-1]


@dataclasses.dataclass
class Sample:
    """One prompt: ``prompt`` (template + answer prefix), ``answer`` (the completion) and ``outputs``."""

    prompt: str
    answer: str
    outputs: list[str]
    answer_values: list[str] = dataclasses.field(default_factory=list)  # every value in ``answer``, in order
    answer_keys: list[str] = dataclasses.field(default_factory=list)  # ... and the key each one answers


def niah_sample(
    rng: random.Random,
    task: str,
    n_units: int,
    essay_words: Sequence[str],
    extra_questions: int = 0,
    chat: bool = False,
    hard_keys: float = 0.0,
) -> Sample:
    """Build a RULER NIAH prompt with ``n_units`` haystack units (lines for noise/needle, words for essay).

    The prompt is exactly RULER's ``template.format(...) + answer_prefix`` (``base`` model template,
    or this tokenizer's chat template when ``chat``). ``answer`` is the training completion: the
    values in query order (multi-value: in order of appearance), e.g. ``" 1234567."``.
    ``extra_questions`` appends further question/answer turns about other needles in the text
    (training only: more supervised answers per context). ``hard_keys`` (training only, word keys):
    the chance that each further key or distractor needle's key is a near miss of the first key
    (:func:`near_key`) rather than a random one.
    """
    haystack, type_k, type_v, k, v, q = RULER_NIAH_TASKS[task]
    k = max(k, q)
    hard = hard_keys > 0 and type_k == "words"

    def other_key():
        return near_key(rng, keys[0]) if hard and rng.random() < hard_keys else random_value(rng, type_k)

    keys = []
    while len(keys) < k:
        key = other_key() if keys else random_value(rng, type_k)
        if key not in keys:
            keys.append(key)
    values = [[random_value(rng, type_v) for _ in range(v)] for _ in range(k)]
    needles = [NEEDLE.format(type_needle_v=type_v, key=keys[i], value=values[i][j]) for i in range(k) for j in range(v)]
    rng.shuffle(needles)

    distractors = []
    if haystack == "essay":
        start = rng.randrange(max(1, len(essay_words) - n_units))
        words = list(essay_words[start:start + n_units])
        while len(words) < n_units:
            words += essay_words[: n_units - len(words)]
        sents = _split_sentences(words)
        positions = sorted(int(len(sents) * d / 100) for d in rng.sample(ESSAY_DEPTHS, len(needles)))
        for pos, needle in sorted(zip(positions, needles), key=lambda t: t[0], reverse=True):
            sents.insert(pos, needle)
        context = " ".join(sents)
    else:
        if haystack == "noise":
            lines = [NOISE_LINE] * n_units
        else:
            taken = set(keys)
            for _ in range(n_units):
                dk, dv = other_key(), random_value(rng, type_v)
                while hard and dk in taken:  # near misses collide more often than random keys; an
                    dk = other_key()  # asked key among the distractors would have two values
                taken.add(dk)
                distractors.append((dk, dv))
            lines = [NEEDLE.format(type_needle_v=type_v, key=dk, value=dv) for dk, dv in distractors]
        for pos, needle in zip(sorted(rng.sample(range(len(lines) + 1), len(needles)), reverse=True), needles):
            lines.insert(pos, needle)
        context = "\n".join(lines)

    order = rng.sample(range(k), q)
    query_keys = [keys[i] for i in order]
    if v > 1:  # multi-value: answer in order of appearance
        vals = values[order[0]]
        vals = sorted(vals, key=context.find)
        outputs = list(vals)
    else:
        outputs = [values[i][0] for i in order]

    template = NIAH_TEMPLATE + "{answer_prefix}"
    tv = type_v
    if q * v == 1:  # RULER's singular rewrite, applied to the whole template incl. answer prefix
        template = template.replace("{answer_prefix}", NIAH_ANSWER_PREFIX)
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        template = template.replace("answers", "answer")
        tv = type_v[:-1]
    else:
        template = template.replace("{answer_prefix}", NIAH_ANSWER_PREFIX)
    task_text = template.format(type_needle_v=tv, context=context, query=_join_query(query_keys))
    answer = " " + _join_values(outputs) + "."

    # extra turns: singular questions about other needles present in the text
    # other needles only (never the question just asked: its answer could be copied from the turn above)
    pool = [(keys[i], values[i]) for i in range(k) if v == 1 and i not in order] + distractors
    asked = rng.sample(pool, min(extra_questions, len(pool))) if extra_questions > 0 else []
    answer_values = list(outputs)
    answer_keys = [query_keys[0]] * len(outputs) if v > 1 else list(query_keys)
    for qk, qv in asked:
        qv = qv if isinstance(qv, str) else qv[0]
        single = (
            "\nWhat is the special magic {t} for {k} mentioned in the provided text?"
            " The special magic {t} for {k} mentioned in the provided text is"
        ).format(t=type_v[:-1], k=qk)
        answer += single + " " + qv + "."
        answer_values.append(qv)
        answer_keys.append(qk)
    if chat:
        split = task_text.rfind(NIAH_ANSWER_PREFIX.format(type_needle_v=tv, query=_join_query(query_keys))[:10])
        prompt = "<|user|>\n" + task_text[:split] + "</s>\n<|assistant|>\n" + task_text[split:]
    else:
        prompt = task_text
    return Sample(prompt=prompt, answer=answer, outputs=outputs, answer_values=answer_values,
                  answer_keys=answer_keys)


def vt_sample(rng: random.Random, n_lines: int, num_hops: int = 4) -> Sample:
    """A RULER variable-tracking prompt (one chain, noise haystack, no few-shot example)."""
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    sents = [NOISE_LINE] * max(n_lines, num_hops + 1)
    positions = sorted(rng.sample(range(len(sents)), len(chain)))
    for j, pos in enumerate(positions):
        sents.insert(pos + j, chain[j])
    context = "\n".join(sents).replace(". \n", ".\n")
    prompt = VT_TEMPLATE.format(context=context, query=value) + VT_ANSWER_PREFIX.format(num_v=num_hops + 1, query=value)
    return Sample(prompt=prompt, answer=" ".join(names) + ".", outputs=names)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------
# (task, weight). Word-valued and essay variants broaden the mechanism beyond the judged tasks.
# "copy" (dense induction text, loss on every repeated token) carries most of the early signal:
# answer-only supervision alone never formed an induction head in the first attempt.
TRAIN_MIX = [
    ("niah_single_1", 1.5), ("niah_single_2", 0.5), ("niah_multikey_1", 0.5),
    ("niah_multikey_2", 1.5), ("niah_multikey_3", 1.0), ("niah_multivalue", 1.0), ("niah_multiquery", 1.0),
    ("copy", 3.0),
]
# every task a SampleStream can draw (the NIAH variants, variable tracking, copy text)
TRAIN_TASKS = (*RULER_NIAH_TASKS, "vt", "copy")
_UNIT_TOKENS = {"noise": 25.0, "needle_numbers": 30.0, "needle_uuids": 88.0, "essay": 1.35, "vt": 25.0}


class SampleStream:
    """Seeded stream of tokenised training sequences of about a requested token length."""

    def __init__(self, tokenizer, seed: int, essay_words: Sequence[str],
                 mix: Optional[Sequence[tuple[str, float]]] = None):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.essay = essay_words
        self.set_mix(TRAIN_MIX if mix is None else mix)
        specials = set(tokenizer.all_special_ids)
        self.plain_ids = [i for i in range(len(tokenizer)) if i not in specials]
        self.digit_ids = sorted(i for t, i in tokenizer.get_vocab().items() if t.isascii() and t.isdigit())
        self.last_tasks: list[str] = []
        self.copy_only = False  # a stage of pure copy text (the induction warm-up)
        self.want_spans = False  # record retrieval targets (tiny_retrieval.answer_targets) per sample
        self.last_spans: list[dict] = []
        self.hard_keys = 0.0  # near-miss distractor keys (niah_sample), set per stage

    def set_mix(self, mix: Sequence[tuple[str, float]]) -> None:
        """Draw tasks from ``mix`` ((task, weight) pairs) from now on."""
        self.tasks = [t for t, _ in mix]
        self.weights = [w for _, w in mix]

    def _units(self, task: str, n_tokens: int) -> int:
        if task == "vt":
            return max(1, int(n_tokens / _UNIT_TOKENS["vt"]))
        hay, tk, tv = RULER_NIAH_TASKS[task][:3]
        key = "needle_uuids" if "uuids" in (tk, tv) and hay == "needle" else ("needle_numbers" if hay == "needle" else hay)
        return max(1, int(n_tokens / _UNIT_TOKENS[key]))

    def _copy(self, n_tokens: int) -> tuple[list[int], list[int]]:
        # Dense induction text: random spans (plain tokens or digit strings) of which about half
        # repeat an earlier span at a random distance; every token of a repeat after its first is
        # predictable and carries loss. Digit spans repeat digits, so a single previous token is
        # ambiguous and the copy must match longer prefixes (as when copying a 7-digit value).
        rng = self.rng
        ids, labels, spans = [self.tok.bos_token_id], [-100], []
        while len(ids) < n_tokens:
            if spans and rng.random() < 0.5:
                span = rng.choice(spans)
                lab = [-100] + span[1:]
            else:
                pool = self.digit_ids if rng.random() < 0.3 else self.plain_ids
                span = [rng.choice(pool) for _ in range(rng.randint(4, 24))]
                spans.append(span)
                lab = [-100] * len(span)
            ids += span
            labels += lab
        return ids[:n_tokens], labels[:n_tokens]

    def _spans(self, s: Sample, prompt_enc, answer_enc) -> dict[str, list[tuple[int, int, int]]]:
        from longctx.tiny_retrieval import answer_targets

        n = len(s.prompt)
        offsets = list(prompt_enc["offset_mapping"]) + [(x + n, y + n) for x, y in answer_enc["offset_mapping"]]
        return answer_targets(s.prompt + s.answer, offsets, n, s.answer_values, s.answer_keys)

    def sample(self, n_tokens: int, extra_questions: int = 0) -> tuple[list[int], list[int]]:
        """Return ``(input_ids, labels)`` of at most ``n_tokens`` tokens; labels are -100 off the answers."""
        rng = self.rng
        task = rng.choices(self.tasks, self.weights)[0]
        if self.copy_only:  # drawn anyway: the random stream does not depend on the stage kind
            task = "copy"
        self.last_tasks.append(task)
        self.last_spans.append({})
        if task == "copy":
            return self._copy(n_tokens)
        # extra question turns take ~45 tokens each: leave room so the first draw usually fits
        extra_questions = min(extra_questions, max(0, (n_tokens - 120) // 50))
        units = self._units(task, n_tokens - 60 - 45 * extra_questions)
        chat = rng.random() < 0.25
        while True:
            state = rng.getstate()
            if task == "vt":
                s = vt_sample(rng, units)
            else:
                s = niah_sample(rng, task, units, self.essay, extra_questions=extra_questions, chat=chat,
                                hard_keys=self.hard_keys)
            spans = self.want_spans and task != "vt"  # offsets only when the retrieval targets are wanted
            p_enc = self.tok(s.prompt, return_offsets_mapping=spans)
            a_enc = self.tok(s.answer, add_special_tokens=False, return_offsets_mapping=spans)
            p = p_enc["input_ids"]
            a = a_enc["input_ids"] + [self.tok.eos_token_id]
            n = len(p) + len(a)
            if n > 1.5 * n_tokens and units <= 1 and extra_questions == 0 and "uuids" in RULER_NIAH_TASKS[task][1:3]:
                # even the smallest prompt of this task is far too long (uuids at short lengths):
                # use copy text instead so that the batch is not padded to its length
                self.last_tasks[-1] = "copy"
                return self._copy(n_tokens)
            if n <= n_tokens or (units <= 1 and extra_questions == 0):
                if spans:
                    self.last_spans[-1] = self._spans(s, p_enc, a_enc)
                return p + a, [-100] * len(p) + a
            rng.setstate(state)
            if units > 1:
                units = max(1, min(units - 1, int(units * n_tokens / n * 0.97)))
            else:  # even one haystack unit is too long: ask fewer extra questions
                extra_questions -= 1


def make_batch(stream: SampleStream, batch_size: int, min_len: int, max_len: int, pose_prob: float,
               max_position: int, pad_id: int, extra_questions: int = 0):
    """Pad a batch on the right; with probability ``pose_prob`` a sample's position ids skip ahead
    once (PoSE) so that relative distances up to ``max_position`` are seen at short lengths."""
    rng = stream.rng
    stream.last_tasks = []
    stream.last_spans = []
    seqs = [stream.sample(rng.randint(min_len, max_len), extra_questions) for _ in range(batch_size)]
    L = max(len(s[0]) for s in seqs)
    ids = torch.full((batch_size, L), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, L), -100, dtype=torch.long)
    pos = torch.arange(L).repeat(batch_size, 1)
    for b, (x, y) in enumerate(seqs):
        ids[b, : len(x)] = torch.tensor(x)
        labels[b, : len(y)] = torch.tensor(y)
        if rng.random() < pose_prob and max_position > L:
            cut = rng.randint(1, len(x) - 1)
            pos[b, cut:] += rng.randint(0, max_position - L)
    return ids, labels, pos


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
# "basic": the copying head (every value token) and the gathering head only; "full": separate
# matching head for a value's first token, the key probe and the contrastive gathering loss
RETRIEVAL_ROLES = ("basic", "full")


@dataclasses.dataclass
class Stage:
    """One curriculum stage: ``steps`` optimizer steps on sequences of ``min_len..max_len`` tokens.

    ``pose_prob``: share of sequences whose position ids skip ahead once (PoSE);
    ``extra_questions``: further question/answer turns per NIAH sample; ``copy_only``: copy text
    only (the induction warm-up); ``aux_weight``: weight of the :class:`PrevTokenProbes` loss;
    ``mix``: this stage's (task, weight) pairs instead of the run's mixture; ``final_weight``: loss
    weight of the last token of every copied span, ``first_weight``: of the first digit of every
    value (see :func:`final_token_weights`); ``retrieval_weight``: weight of the retrieval
    supervision (:mod:`longctx.tiny_retrieval`), ``retrieval_roles``: which of its parts
    (``RETRIEVAL_ROLES``); ``hard_keys``: chance of a near-miss key per distractor (:func:`niah_sample`);
    ``gather_spread``: the gathering head is trained to attend to every key token evenly
    (:func:`longctx.tiny_retrieval.retrieval_loss` with ``spread``) rather than to any of them.
    """

    steps: int
    min_len: int
    max_len: int
    batch_size: int
    pose_prob: float = 0.0
    extra_questions: int = 0
    copy_only: bool = False
    aux_weight: float = 0.0
    mix: Optional[tuple] = None
    final_weight: float = 1.0
    first_weight: float = 1.0
    retrieval_weight: float = 0.0
    retrieval_roles: str = "full"
    hard_keys: float = 0.0
    gather_spread: bool = False

    def __post_init__(self):
        if not 0.0 <= self.hard_keys <= 1.0:
            raise ValueError(f"Stage requires hard_keys in [0, 1] (got {self.hard_keys!r})")
        if self.retrieval_roles not in RETRIEVAL_ROLES:
            raise ValueError(f"Stage requires retrieval_roles in {RETRIEVAL_ROLES} (got {self.retrieval_roles!r})")


# The recipe (third attempt, issue 7, on an idle 2-core CPU, ~30 min): (0) copy text only, with
# the previous-token probes, until the induction circuit forms (~320 steps in the trial); (1)
# RULER NIAH answers + copy text at short contexts (PoSE skips on a fifth of the sequences, so
# relative distances up to 32K are seen), probes at a lower weight; (2-4) a length curriculum to
# 16K tokens. One cosine learning-rate schedule spans all stages.
CURRICULUM = [
    Stage(steps=500, min_len=96, max_len=224, batch_size=24, copy_only=True, aux_weight=1.0),
    Stage(steps=1200, min_len=128, max_len=320, batch_size=12, pose_prob=0.2, extra_questions=4, aux_weight=0.3,
          final_weight=5.0),
    Stage(steps=400, min_len=512, max_len=1024, batch_size=4, pose_prob=0.2, extra_questions=3, final_weight=5.0),
    Stage(steps=250, min_len=1024, max_len=4096, batch_size=1, extra_questions=2, final_weight=5.0),
    Stage(steps=40, min_len=4096, max_len=16384, batch_size=1, extra_questions=1, final_weight=5.0),
]

# Continuation (a second optimizer and schedule, started from the end of CURRICULUM): after it
# the model retrieved in noise haystacks but mixed up keys among distractor needles, so more
# steps at 256-768 tokens weighted to the multi-key/value/query tasks, then 1-4K tokens.
CONTINUATION_MIX = (
    ("niah_single_1", 1.0), ("niah_single_2", 0.5), ("niah_multikey_1", 0.5), ("niah_multikey_2", 2.0),
    ("niah_multikey_3", 1.5), ("niah_multivalue", 1.5), ("niah_multiquery", 1.5), ("copy", 1.0),
)
CONTINUATION = [
    Stage(steps=900, min_len=256, max_len=768, batch_size=6, pose_prob=0.2, extra_questions=3, mix=CONTINUATION_MIX),
    Stage(steps=200, min_len=1024, max_len=4096, batch_size=1, extra_questions=1, mix=CONTINUATION_MIX),
]

# Polish (a second optimizer and schedule, started from the end of CURRICULUM): NIAH answers only,
# with the last digit of every value weighted 10x. The main curriculum leaves an induction
# circuit that copies a value's first six digits and guesses the seventh (see
# final_token_weights); these steps teach the model to finish the value.
POLISH_MIX = (
    ("niah_single_1", 1.5), ("niah_single_2", 0.5), ("niah_multikey_1", 0.5), ("niah_multikey_2", 1.5),
    ("niah_multikey_3", 1.0), ("niah_multivalue", 1.0), ("niah_multiquery", 1.0),
)
POLISH = [
    Stage(steps=400, min_len=128, max_len=384, batch_size=12, pose_prob=0.2, extra_questions=2, mix=POLISH_MIX,
          final_weight=10.0),
    Stage(steps=100, min_len=1024, max_len=4096, batch_size=1, extra_questions=2, mix=POLISH_MIX, final_weight=10.0),
]

# Key matching (a follow-up after the polish, issue 7; tried, not shipped): the polished model copies
# a whole value but picks the needle at random among distractors (multikey_2: the value of another
# key, 9 of 10 prompts at 1K). Short prompts (few needles), the tasks with distractor keys, and the
# first digit of every value (the one token that depends on the key) weighted 10x. Multikey_2 at 1K
# went 0 -> 10 (5 with 3x the steps): still chance among ~26 needles (model card).
KEYMATCH_MIX = (
    ("niah_single_1", 0.5), ("niah_multikey_1", 1.0), ("niah_multikey_2", 2.0), ("niah_multikey_3", 1.0),
    ("niah_multivalue", 1.0), ("niah_multiquery", 1.5),
)
KEYMATCH = [
    Stage(steps=600, min_len=128, max_len=512, batch_size=8, pose_prob=0.2, extra_questions=2, mix=KEYMATCH_MIX,
          final_weight=10.0, first_weight=10.0),
    Stage(steps=100, min_len=1024, max_len=4096, batch_size=1, extra_questions=2, mix=KEYMATCH_MIX,
          final_weight=10.0, first_weight=10.0),
]


# Retrieval supervision (issue 7, fifth session; the shipped target's last two runs): the polished
# model's retrieval head spread its attention evenly over a haystack of needles (multikey_2), so it
# answered with a random needle's value. These steps add the losses of longctx.tiny_retrieval
# (gathering, matching and copying heads, key probe, contrastive gathering loss) on NIAH weighted to
# the tasks with several keys, with each value's first digit (the key-dependent token) weighted 5x.
RETRIEVAL_MIX = (
    ("niah_single_1", 1.0), ("niah_single_2", 0.5), ("niah_multikey_1", 0.5), ("niah_multikey_2", 2.0),
    ("niah_multikey_3", 1.0), ("niah_multivalue", 1.0), ("niah_multiquery", 1.5),
)
RETRIEVAL = [
    Stage(steps=500, min_len=128, max_len=512, batch_size=8, pose_prob=0.2, extra_questions=2, mix=RETRIEVAL_MIX,
          final_weight=10.0, first_weight=5.0, retrieval_weight=1.0),
    Stage(steps=100, min_len=1024, max_len=4096, batch_size=1, extra_questions=2, mix=RETRIEVAL_MIX,
          final_weight=10.0, first_weight=5.0, retrieval_weight=1.0),
]


class PrevTokenProbes(torch.nn.Module):
    """Training-only probes: linear maps from the first decoder layer's output to the tokens 1..k back.

    Their loss (through the model's final norm and tied unembedding) gives the first layer a direct
    reason to form previous-token heads. Without it, the induction circuit (previous-token head +
    content match one layer up) sat on its loss plateau for 1,000-2,000 steps in every trial on
    copy text; with it, it formed in ~320 steps. The probes are not part of the saved model.
    """

    def __init__(self, hidden_size: int, k: int = 2):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden_size, hidden_size) for _ in range(k))

    def loss(self, model, hidden: torch.Tensor, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
        """Mean cross-entropy of predicting ``ids[:, t - j]`` at position t, j = 1..k (pads ignored)."""
        emb = model.get_input_embeddings().weight
        total = hidden.new_zeros(())
        for j, head in enumerate(self.heads, start=1):
            logits = model.model.norm(head(hidden[:, j:])) @ emb.T
            target = ids[:, :-j].masked_fill(ids[:, j:] == pad_id, -100)
            total = total + F.cross_entropy(logits.transpose(1, 2).float(), target, ignore_index=-100)
        return total / len(self.heads)


def final_token_weights(target: torch.Tensor, digit_ids: torch.Tensor, weight: float,
                        first_weight: float = 1.0) -> torch.Tensor:
    """``[B, S]`` loss weights: ``weight`` on the last token of each copied span, ``first_weight``
    on the first digit of each value, 1 elsewhere.

    A span ends where the next label is ignored (copy text: the end of a repeat) or where a digit
    is followed by a non-digit (the last digit of a needle's value). The induction circuit these
    models form reads a copied token from the position after it in the source (which sees it as
    its previous token), so a span's last token, whose source successor is arbitrary, was the one
    it failed to copy: the shipped first-attempt models guessed the 7th digit of every value.
    A value's first digit (a digit whose previous label is not one) is the only token that needs
    the right needle; the rest follow from it by induction, so among distractor needles it
    carries the whole key-matching signal.
    """
    nxt = F.pad(target[:, 1:], (0, 1), value=-100)
    prev = F.pad(target[:, :-1], (1, 0), value=-100)
    digit, nxt_digit, prev_digit = (torch.isin(t, digit_ids) for t in (target, nxt, prev))
    final = (target != -100) & ((nxt == -100) | (digit & ~nxt_digit))
    first = digit & ~prev_digit
    return 1.0 + (weight - 1.0) * final.float() + (first_weight - 1.0) * (first & ~final).float()


def supervised_heads(config, roles: str = "full") -> dict[str, tuple[int, int]]:
    """The ``(layer, head)`` trained for each role of :func:`longctx.tiny_retrieval.answer_targets`.

    ``gather`` (collect the key's tokens) is a head of the second layer (the first in a two-layer
    model); ``match`` (read a value's first token from the needle whose gathered key matches) and
    ``copy`` (read the value's next tokens) are heads of the last layer with different KV heads
    where the model has several, so the two kinds of matching do not share keys. With ``roles ==
    "basic"`` there is no ``match`` head: ``copy`` reads every value token.
    """
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    last = n_layers - 1
    heads = {"gather": (1 if n_layers > 2 else 0, n_heads // 2), "match": (last, n_heads // 2), "copy": (last, 0)}
    if roles == "basic":
        del heads["match"]
    return heads


def _role_targets(spans: Sequence[dict], roles: str) -> list[dict]:
    """``answer_targets`` rows for ``roles``: "basic" folds the ``match`` targets into ``copy``."""
    if roles == "full":
        return list(spans)
    return [{"copy": row.get("match", []) + row.get("copy", []), "gather": row.get("gather", [])} for row in spans]


def _loss(model, ids, labels, pos, autocast: bool, probes: Optional[PrevTokenProbes] = None, pad_id: int = 0,
          weights_fn=None, spans=None, key_probe=None, roles: str = "full", gather_spread: bool = False):
    """Weighted mean over sequences of each sequence's mean token loss, the probes' loss (0 without
    probes), the retrieval loss (0 without ``spans``; plus ``key_probe``'s loss when given) and the
    per-sequence losses [B]; ``weights_fn(target)`` gives per-token weights; ``spans`` are the
    per-row retrieval targets, ``roles`` which parts of the supervision apply (``RETRIEVAL_ROLES``),
    ``gather_spread`` the uniform-attention loss for the gathering head."""
    from longctx.tiny_retrieval import capturing, contrast_loss, retrieval_loss

    heads = supervised_heads(model.config, roles)
    if spans is not None:
        spans = _role_targets(spans, roles)
    if roles == "basic":
        key_probe = None
    hidden_wanted = probes is not None or (spans is not None and key_probe is not None)
    ctx = capturing(model) if spans is not None else contextlib.nullcontext()
    with ctx as store, torch.autocast(ids.device.type, dtype=torch.bfloat16,
                                      enabled=autocast and ids.device.type in ("cpu", "cuda")):
        # the LM head only where the next token is supervised (answers: a few of 4-16K positions)
        keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)  # [K]
        out = model(input_ids=ids, position_ids=pos, output_hidden_states=hidden_wanted, logits_to_keep=keep)
        aux = probes.loss(model, out.hidden_states[1], ids, pad_id) if probes is not None else out.logits.new_zeros(())
        ret = out.logits.new_zeros(())
        if spans is not None and key_probe is not None:
            gather = [row.get("gather", []) for row in spans]
            ret = ret + key_probe.loss(model, out.hidden_states[heads["gather"][0] + 1], ids, gather)
    if spans is not None:
        ret = ret + sum(retrieval_loss(store, [row.get(role, []) for row in spans], layer, head,
                                       spread=gather_spread and role == "gather")
                        for role, (layer, head) in heads.items())
        if roles == "full":
            ret = ret + contrast_loss(store, spans, *heads["gather"])
    logits = out.logits.float()  # [B, K, V]
    target = labels[:, 1:][:, keep]  # [B, K]
    tok_loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")  # [B, K]
    mask = (target != -100).to(tok_loss.dtype)
    if weights_fn is not None:
        mask = mask * weights_fn(target)
    n = mask.sum(1)
    per_seq = (tok_loss * mask).sum(1) / n.clamp(min=1)
    return per_seq[n > 0].mean(), aux.float(), ret.float(), per_seq.detach()


def train(
    models: dict,
    tokenizer,
    curriculum: Sequence[Stage],
    seed: int = 0,
    lr: float = 3e-3,
    warmup: int = 50,
    max_position: int = 32768,
    autocast: bool = True,
    log_every: int = 25,
    essay_words: Optional[Sequence[str]] = None,
    on_stage_end=None,
    mix: Optional[Sequence[tuple[str, float]]] = None,
    stop_after_stage: Optional[int] = None,
    save_every: int = 0,
    probes: Optional[dict] = None,
) -> list[dict]:
    """Train every model in ``models`` (name -> LlamaForCausalLM) on the same seeded batches.

    ``on_stage_end(stage_index)`` is called after each curriculum stage (e.g. to checkpoint);
    ``mix`` overrides the (task, weight) mixture ``TRAIN_MIX``; ``stop_after_stage`` ends training
    after that stage (the learning-rate schedule still spans the whole curriculum); with
    ``save_every > 0``, ``on_stage_end(stage_index)`` is also called every ``save_every`` steps;
    ``probes`` (name -> :class:`PrevTokenProbes`)
    adds each model's probe loss times the stage's ``aux_weight``.
    Returns the logged history (one dict per logged step with the losses).
    """
    essay_words = essay_words if essay_words is not None else load_essay_words()
    stream = SampleStream(tokenizer, seed, essay_words, mix)
    base_mix = list(zip(stream.tasks, stream.weights))
    dev = next(next(iter(models.values())).parameters()).device  # batches go where the models are
    digit_ids = torch.tensor(stream.digit_ids, device=dev)
    total = sum(s.steps for s in curriculum)
    probes = probes or {}
    # the key probes (longctx.tiny_retrieval.KeyProbe) come with the retrieval supervision
    key_probes = {}
    if any(s.retrieval_weight > 0 and s.retrieval_roles == "full" for s in curriculum):
        from longctx.tiny_retrieval import KeyProbe

        key_probes = {n: KeyProbe(m.config.hidden_size).to(dev) for n, m in models.items()}
    probes = {n: p.to(dev) for n, p in probes.items()}
    extra = {n: [p for mod in (probes.get(n), key_probes.get(n)) if mod is not None for p in mod.parameters()]
             for n in models}
    opts = {
        n: torch.optim.AdamW(list(m.parameters()) + extra[n], lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        for n, m in models.items()
    }

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))

    history, step, t0 = [], 0, time.time()
    for m in models.values():
        m.train()
    for si, stage in enumerate(curriculum):
        running = {n: 0.0 for n in models}
        aux_run = {n: 0.0 for n in models}
        ret_run = {n: 0.0 for n in models}
        by_kind = {"copy": [0.0, 0], "niah": [0.0, 0]}  # first model's loss on copy / NIAH sequences
        stream.copy_only = stage.copy_only
        stream.want_spans = stage.retrieval_weight > 0
        stream.set_mix(stage.mix or base_mix)
        stream.hard_keys = stage.hard_keys
        weights_fn = None
        if stage.final_weight != 1.0 or stage.first_weight != 1.0:
            weights_fn = functools.partial(final_token_weights, digit_ids=digit_ids, weight=stage.final_weight,
                                           first_weight=stage.first_weight)
        for _ in range(stage.steps):
            ids, labels, pos = make_batch(stream, stage.batch_size, stage.min_len, stage.max_len, stage.pose_prob,
                                          max_position, tokenizer.pad_token_id, stage.extra_questions)
            ids, labels, pos = ids.to(dev), labels.to(dev), pos.to(dev)
            for n, m in models.items():
                for g in opts[n].param_groups:
                    g["lr"] = lr_at(step)
                pr = probes.get(n) if stage.aux_weight > 0 else None
                spans = stream.last_spans if stage.retrieval_weight > 0 else None
                loss, aux, ret, per_seq = _loss(m, ids, labels, pos, autocast, pr, tokenizer.pad_token_id, weights_fn,
                                                spans, key_probes.get(n), stage.retrieval_roles, stage.gather_spread)
                if n == next(iter(models)):
                    for task, v in zip(stream.last_tasks, per_seq.tolist()):
                        kind = by_kind["copy" if task == "copy" else "niah"]
                        kind[0], kind[1] = kind[0] + v, kind[1] + 1
                (loss + stage.aux_weight * aux + stage.retrieval_weight * ret).backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opts[n].step()
                opts[n].zero_grad(set_to_none=True)
                running[n] += loss.item()
                aux_run[n] += aux.item()
                ret_run[n] += ret.item()
            step += 1
            if step % log_every == 0 or step == total:
                k = (step - 1) % log_every + 1
                rec = {"step": step, "stage": si, "len": ids.shape[1], "elapsed_s": round(time.time() - t0, 1)}
                rec.update({f"loss_{n}": round(v / k, 4) for n, v in running.items()})
                rec.update({f"probe_{n}": round(v / k, 4) for n, v in aux_run.items() if v})
                rec.update({f"retrieval_{n}": round(v / k, 4) for n, v in ret_run.items() if v})
                rec.update({f"{kd}_loss": round(v / c, 4) for kd, (v, c) in by_kind.items() if c})
                history.append(rec)
                logger.info("%s", json.dumps(rec))
                running = {n: 0.0 for n in models}
                aux_run = {n: 0.0 for n in models}
                ret_run = {n: 0.0 for n in models}
                by_kind = {"copy": [0.0, 0], "niah": [0.0, 0]}
            if save_every and step % save_every == 0 and on_stage_end is not None:
                on_stage_end(si)
        if on_stage_end is not None:
            on_stage_end(si)
        if stop_after_stage is not None and si >= stop_after_stage:
            break
    for m in models.values():
        m.eval()
    return history


# ---------------------------------------------------------------------------------------------
# Quick RULER-format evaluation
# ---------------------------------------------------------------------------------------------
def ruler_postprocess(pred: str) -> str:
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's niah metric (scripts/eval/synthetic/constants.py), in percent."""
    s = sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs))
    return round(100 * s / len(preds), 2)


def sized_niah_samples(tokenizer, task: str, max_seq_length: int, n: int, seed: int,
                       essay_words: Optional[Sequence[str]] = None, tokens_to_generate: int = 128) -> list[Sample]:
    """``n`` prompts sized by RULER's rule: ``len(tokenize(prompt)) + tokens_to_generate <= max_seq_length``."""
    essay_words = essay_words if essay_words is not None else load_essay_words()
    rng = random.Random(seed)
    budget = max_seq_length - tokens_to_generate
    probe = niah_sample(random.Random(seed + 1), task, 100 if RULER_NIAH_TASKS[task][0] == "essay" else 10, essay_words)
    n0 = 100 if RULER_NIAH_TASKS[task][0] == "essay" else 10
    per_unit = (len(tokenizer.tokenize(probe.prompt)) - 60) / n0
    units = max(1, int((budget - 60) / per_unit))
    out = []
    for _ in range(n):
        state = rng.getstate()
        while True:
            rng.setstate(state)
            s = niah_sample(rng, task, units, essay_words)
            if len(tokenizer.tokenize(s.prompt)) <= budget or units <= 1:
                break
            units -= max(1, units // 100)
        out.append(s)
    return out


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, list[int]]:
    """Greedy completion of ``prompt``; returns the decoded text and the generated ids."""
    dev = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(dev)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    gen = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(gen, skip_special_tokens=True), gen


def _answer_budget(task: str) -> int:
    _, _, tv, k, v, q = RULER_NIAH_TASKS[task]
    per = 40 if tv == "uuids" else 10
    return per * max(v, q) + 4


def evaluate(model, tokenizer, tasks: Sequence[str], lengths: Sequence[int], n: int, seed: int = 42,
             draft=None, agreement_lengths: Optional[Sequence[int]] = None) -> dict:
    """Greedy RULER-format NIAH scores (string_match_all) per task and length.

    With ``draft``, also the greedy agreement at ``agreement_lengths`` (default: all): fraction of
    positions over the target's answer span (teacher-forced on the target's greedy output) where
    draft argmax == target argmax.
    """
    results = {}
    for L in lengths:
        drf = draft if agreement_lengths is None or L in agreement_lengths else None
        for task in tasks:
            samples = sized_niah_samples(tokenizer, task, L, n, seed)
            preds, agree, total = [], 0, 0
            for s in samples:
                text, gen = greedy_answer(model, tokenizer, s.prompt, _answer_budget(task))
                preds.append(ruler_postprocess(text))
                if drf is not None and gen:
                    a, t = draft_agreement(model, drf, tokenizer, s.prompt, gen)
                    agree, total = agree + a, total + t
            rec = {"score": string_match_all(preds, [s.outputs for s in samples]), "n": n, "example": preds[0][:80]}
            if drf is not None:
                rec["draft_agreement"] = round(agree / max(1, total), 4)
            results[f"{task}@{L}"] = rec
            logger.info("eval %s@%d %s", task, L, json.dumps(rec))
    return results


@torch.no_grad()
def draft_agreement(target, draft, tokenizer, prompt: str, gen: list[int]) -> tuple[int, int]:
    """Positions over the answer span where draft and target greedy predictions coincide."""
    dev = next(target.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(dev)
    full = torch.cat([ids, torch.tensor([gen], device=dev)], dim=1)
    P = ids.shape[1]
    lt = target(full).logits[0, P - 1: full.shape[1] - 1].argmax(-1)
    ld = draft(full).logits[0, P - 1: full.shape[1] - 1].argmax(-1)
    return int((lt == ld).sum()), int(lt.numel())


# ---------------------------------------------------------------------------------------------
# Saving / CLI
# ---------------------------------------------------------------------------------------------
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


def _grow_linear(lin: torch.nn.Linear, out_features: int, in_features: int, gen: torch.Generator,
                 random_rows: bool, random_cols: bool) -> None:
    """Pad ``lin``'s weight ``[O, I]`` to ``[out_features, in_features]`` in place (old block kept).

    New rows / columns are zero, or drawn from a normal with the trained weight's standard
    deviation where ``random_rows`` / ``random_cols``.
    """
    w = lin.weight.data  # [O, I]
    o, i = w.shape
    std = float(w.float().std())
    new = torch.zeros(out_features, in_features, dtype=w.dtype, device=w.device)
    if random_rows and out_features > o:
        new[o:] = std * torch.randn(out_features - o, in_features, generator=gen).to(new)
    if random_cols and in_features > i:
        new[:, i:] = std * torch.randn(out_features, in_features - i, generator=gen).to(new)
    new[:o, :i] = w
    lin.weight = torch.nn.Parameter(new)
    lin.in_features, lin.out_features = in_features, out_features


def widen_model(model, hidden_size: Optional[int] = None, intermediate_size: Optional[int] = None,
                seed: int = 0):
    """Widen a Llama's residual stream and / or MLP in place without changing its outputs.

    The residual stream grows by zero dimensions: the (tied) embedding and every projection that
    writes the residual (attention output, MLP down) get zero rows there, while every projection
    that reads it (q, k, v, MLP gate and up) gets random columns with its trained weight's spread,
    so the new dimensions receive gradients from the first step. RMSNorm averages over the width,
    so each norm's trained gains are scaled by ``sqrt(old / new)`` and ``rms_norm_eps`` by
    ``old / new`` to keep its outputs exactly; new gains start at the mean old gain. New MLP units get random gate / up rows and zero down columns.
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

    def grow_norm(norm):
        w = norm.weight.data  # [D]
        new = torch.full((d,), float(w.float().mean()) * gain, dtype=w.dtype, device=w.device)
        new[:d_old] = w * gain
        norm.weight = torch.nn.Parameter(new)

    with torch.no_grad():
        emb = model.get_input_embeddings()
        grown = torch.zeros(emb.weight.shape[0], d, dtype=emb.weight.dtype, device=emb.weight.device)
        grown[:, :d_old] = emb.weight.data
        emb.weight = torch.nn.Parameter(grown)  # [V, D]
        emb.embedding_dim = d
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            for lin in (att.q_proj, att.k_proj, att.v_proj):
                _grow_linear(lin, lin.out_features, d, gen, random_rows=False, random_cols=True)
            _grow_linear(att.o_proj, d, att.o_proj.in_features, gen, random_rows=False, random_cols=False)
            for lin in (mlp.gate_proj, mlp.up_proj):
                _grow_linear(lin, f, d, gen, random_rows=True, random_cols=True)
            _grow_linear(mlp.down_proj, d, f, gen, random_rows=False, random_cols=False)
            mlp.hidden_size, mlp.intermediate_size = d, f
            grow_norm(layer.input_layernorm)
            grow_norm(layer.post_attention_layernorm)
        grow_norm(model.model.norm)
    cfg.hidden_size, cfg.intermediate_size = d, f
    cfg.rms_norm_eps = cfg.rms_norm_eps * d_old / d  # mean(x^2) over d dims + eps: the old value times d_old / d
    for norm in (*(n for lay in model.model.layers for n in (lay.input_layernorm, lay.post_attention_layernorm)),
                 model.model.norm):
        norm.variance_epsilon = cfg.rms_norm_eps
    model.tie_weights()
    return model


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


LONG_STAGE_FACTOR = 4  # the appended long stage of --stage-steps: 1-4K -> 4-16K tokens


def long_stage(last: Stage) -> Stage:
    """``last`` at ``LONG_STAGE_FACTOR`` times its lengths (from its ``max_len`` up), one extra question."""
    return dataclasses.replace(last, min_len=last.max_len, max_len=last.max_len * LONG_STAGE_FACTOR,
                               extra_questions=min(last.extra_questions, 1))


def configure_stages(stages: Sequence[Stage], steps_scale: float = 1.0, retrieval_weight: float = 0.0,
                     retrieval_roles: str = "full", first_weight: Optional[float] = None,
                     stage_steps: Optional[Sequence[int]] = None,
                     mix: Optional[Sequence[tuple[str, float]]] = None,
                     hard_keys: Optional[float] = None, gather_spread: Optional[bool] = None) -> list[Stage]:
    """The stages as ``train-tiny`` runs them: step counts times ``steps_scale`` (at least 1), or
    ``stage_steps`` (one count per stage) when given; ``retrieval_weight`` (when non-zero) on every
    stage but the copy warm-up; ``retrieval_roles`` on all; ``first_weight`` (when given)
    replacing each stage's; ``mix`` (when given, (task, weight) pairs from :func:`parse_mix`)
    replacing the task mixture of every stage but the copy warm-up; ``hard_keys`` and
    ``gather_spread`` (when given) replacing each stage's.

    One more count than there are stages appends a long stage (:func:`long_stage`: the last
    stage at ``LONG_STAGE_FACTOR`` times its lengths) with that many steps."""
    if stage_steps is not None:
        n = len(stages)
        if len(stage_steps) not in (n, n + 1) or any(k < 1 for k in stage_steps):
            raise ValueError(f"stage_steps requires {n} step counts >= 1, one per stage, or {n + 1} "
                             f"(the last for an appended long stage) (got {list(stage_steps)})")
        if len(stage_steps) == n + 1:
            stages = [*stages, long_stage(stages[-1])]
        counts = list(stage_steps)
    else:
        counts = [max(1, round(s.steps * steps_scale)) for s in stages]
    out = [dataclasses.replace(s, steps=n, retrieval_roles=retrieval_roles) for s, n in zip(stages, counts)]
    if retrieval_weight:
        out = [s if s.copy_only else dataclasses.replace(s, retrieval_weight=retrieval_weight) for s in out]
    if first_weight is not None:
        out = [dataclasses.replace(s, first_weight=first_weight) for s in out]
    if mix is not None:
        out = [s if s.copy_only else dataclasses.replace(s, mix=tuple(mix)) for s in out]
    if hard_keys is not None:
        out = [dataclasses.replace(s, hard_keys=hard_keys) for s in out]
    if gather_spread is not None:
        out = [dataclasses.replace(s, gather_spread=gather_spread) for s in out]
    return out


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """``"task:weight,task:weight"`` -> (task, weight) pairs, tasks from ``TRAIN_TASKS``, weights > 0."""
    pairs = []
    for item in (x.strip() for x in text.split(",")):
        task, sep, weight = item.partition(":")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or task not in TRAIN_TASKS or not (math.isfinite(w) and w > 0):
            raise ValueError(f"--mix requires comma-separated task:weight pairs with a task from {list(TRAIN_TASKS)} "
                             f"and a finite weight > 0 (got {item!r} in {text!r})")
        pairs.append((task, w))
    if len({t for t, _ in pairs}) != len(pairs):
        raise ValueError(f"--mix requires each task once (got {text!r})")
    return tuple(pairs)


def resolve_device(spec: str) -> torch.device:
    """``--device`` as a ``torch.device``, or a ValueError naming what is available.

    Parameters
    ----------
    spec : a torch device string: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    """
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device requires a torch device such as 'cpu' or 'cuda:0' (got {spec!r})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec!r} requires a CUDA GPU; torch sees none here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec!r} requires a GPU index below {torch.cuda.device_count()}")
    elif device.type != "cpu":
        raise ValueError(f"--device requires 'cpu' or a CUDA device (got {spec!r})")
    return device


def _parse(argv):
    p = argparse.ArgumentParser(prog="longctx train-tiny", description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=str(MODELS_DIR), help="writes <out-dir>/tiny-target and tiny-draft")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the tokenizer, the initial weights and the data streams (with --init-from: the data only)")
    p.add_argument("--device", default="cpu",
                   help="where to train and evaluate (a torch device: 'cpu', 'cuda', 'cuda:1'); checkpoints are "
                        "saved the same either way")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a shared 2-core machine 1 thread was ~7x faster than 2")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--models", default="target,draft",
                   help="which models to train ('target', 'draft' or both): they see the same seeded batches, "
                        "so training them in two processes gives the same weights as one")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count")
    p.add_argument("--stage-steps", default=None,
                   help="comma-separated step counts, one per stage of the one follow-up curriculum run "
                        "with --polish-only / --continuation-only / --keymatch-only / --retrieval-only "
                        "(replaces --steps-scale there), e.g. 1000,1000; one more count appends a stage at 4x "
                        "the last stage's lengths (e.g. 400,800,300: 4-16K tokens after 1-4K)")
    p.add_argument("--average", default=None, metavar="DIR,DIR[,...]",
                   help="no training: average the --models of these train-tiny output folders (uniform weights) "
                        "into --out-dir, then evaluate as --eval-only")
    p.add_argument("--autocast", action="store_true", help="train under bf16 autocast (default fp32)")
    p.add_argument("--log-file", default=None, help="also append the log to this file")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0 = per stage)")
    p.add_argument("--init-from", default=None,
                   help="continue from the checkpoint folders (tiny-target/, tiny-draft/) in this folder")
    p.add_argument("--continuation", action="store_true",
                   help="after the main curriculum, run the continuation curriculum (tried; scored lower)")
    p.add_argument("--polish", action=argparse.BooleanOptionalAction, default=True,
                   help="after the main curriculum, run the polish curriculum (default; the shipped weights)")
    p.add_argument("--polish-only", action="store_true",
                   help="run only the polish curriculum (with --init-from the end of the main one)")
    p.add_argument("--continuation-only", action="store_true",
                   help="run only the continuation curriculum (with --init-from the end of the main one)")
    p.add_argument("--keymatch", action="store_true",
                   help="after the polish, run the key-matching curriculum (first value digit weighted; "
                        "tried, not shipped: multikey stayed near chance, see the model card)")
    p.add_argument("--keymatch-only", action="store_true",
                   help="run only the key-matching curriculum (with --init-from the polished models)")
    p.add_argument("--retrieval", action="store_true",
                   help="after the polish, run the retrieval-supervision curriculum (longctx.tiny_retrieval)")
    p.add_argument("--retrieval-only", action="store_true",
                   help="run only the retrieval-supervision curriculum (with --init-from the polished models)")
    p.add_argument("--retrieval-weight", type=float, default=0.0,
                   help="weight of the retrieval supervision (longctx.tiny_retrieval) in every stage after the "
                        "copy warm-up, main curriculum and polish")
    p.add_argument("--retrieval-roles", choices=RETRIEVAL_ROLES, default="full",
                   help="parts of the retrieval supervision: 'basic' (copying + gathering heads) or 'full' (also "
                        "a matching head for a value's first token, the key probe and the contrastive loss)")
    p.add_argument("--mix", default=None, metavar="TASK:W,...",
                   help="task mixture of the follow-up curriculum (--*-only runs), e.g. "
                        "niah_multikey_2:3,niah_multivalue:1 (replaces the curriculum's own)")
    p.add_argument("--hard-keys", type=float, default=None, metavar="P",
                   help="in every stage, the chance that a distractor needle's word key is a near miss of the "
                        "asked key (same adjective, or same first letters); e.g. 0.5")
    p.add_argument("--insert-layer", type=int, default=None, metavar="AT",
                   help="with --init-from: grow each model by one decoder layer at index AT that starts as the "
                        "identity (longctx.tiny.insert_identity_layer), then train")
    p.add_argument("--widen", default=None, metavar="HIDDEN,INTERMEDIATE",
                   help="with --init-from: widen each model's residual stream and MLP to these sizes without "
                        "changing its outputs (longctx.tiny.widen_model), then train; e.g. 256,768")
    p.add_argument("--split-uuid-hex", action="store_true",
                   help="tokenizer spells uuid hex letters one per token (from scratch: built so; with "
                        "--init-from: added to the checkpoint's tokenizer, vocabulary unchanged)")
    p.add_argument("--word-tokens", choices=sorted(WORD_TOKEN_LISTS), default=None,
                   help="make RULER key words single tokens: nouns = the word after the hyphen, keys = both words "
                        "(longctx.tiny.add_word_tokens; with --init-from the embeddings grow, "
                        "longctx.tiny.grow_embeddings)")
    p.add_argument("--digit-groups", type=int, choices=(1, 2, 3, 4), default=1,
                   help="spell numbers outside uuids in groups of up to this many digits (1234567 -> 123 456 7 for "
                        "3; longctx.tiny.group_digits; with --init-from the embeddings grow). Default 1: single "
                        "digits, the shipped tokenizer")
    p.add_argument("--digit-init", choices=("random", "first"), default="random",
                   help="with --init-from --digit-groups: new digit-group embeddings start random (the trained "
                        "rows' statistics) or at their first digit's row plus noise (longctx.tiny.grow_embeddings)")
    p.add_argument("--gather-spread", action="store_true",
                   help="train the key-gathering head to attend to every key token evenly (uniform-target "
                        "loss) instead of to any of them (attention-mass loss)")
    p.add_argument("--first-weight", type=float, default=None,
                   help="override the loss weight of each value's first digit in the follow-up curricula")
    p.add_argument("--stop-after-stage", type=int, default=3,
                   help="end the main curriculum after this stage; its learning-rate schedule still spans all "
                        "stages (default 3, then the polish: the shipped checkpoint; 4 adds the 4-16K stage, "
                        "which scored lower)")
    p.add_argument("--from-stage", type=int, default=0, help="start at this curriculum stage (with --init-from)")
    p.add_argument("--eval-lengths", default="4096", help="comma-separated lengths for the final quick eval ('' = none)")
    p.add_argument("--eval-samples", type=int, default=20)
    p.add_argument("--eval-tasks", default=",".join(DONE_WHEN_TASKS), help="comma-separated RULER NIAH tasks")
    p.add_argument("--agreement-lengths", default="4096", help="lengths at which draft agreement is measured")
    p.add_argument("--eval-only", action="store_true", help="evaluate the models already in --out-dir")
    p.add_argument("--circuit-report", default=None, metavar="TASK:LENGTH:N",
                   help="with --eval-only: how the target's supervised heads behave on N training-format "
                        "prompts of TASK at LENGTH tokens (longctx.tiny_retrieval.circuit_report), as JSON")
    return p.parse_args(argv)


def _print_circuit_report(target, tok, spec: str) -> int:
    from longctx.tiny_retrieval import circuit_report

    task, _, rest = spec.partition(":")
    length, _, n = rest.partition(":")
    if not (length.isdigit() and n.isdigit()):
        raise ValueError(f"--circuit-report requires TASK:LENGTH:N, e.g. niah_multikey_2:4096:8 (got {spec!r})")
    report = circuit_report(target, tok, task, int(length), int(n))
    sys.stdout.write(json.dumps({"task": task, "length": int(length), **report}, indent=1) + "\n")
    return 0


def train_tiny_main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: build the tokenizer, train target and draft, save them, run a quick evaluation."""
    args = _parse(argv)
    # how many follow-up curricula run alone (--polish-only, --continuation-only, ...)
    n_only = sum(map(bool, (args.continuation_only, args.polish_only, args.keymatch_only, args.retrieval_only)))
    stage_steps = None
    if args.stage_steps is not None:
        if n_only != 1:
            raise ValueError("--stage-steps requires exactly one of --polish-only, --continuation-only, "
                             f"--keymatch-only, --retrieval-only (got --stage-steps {args.stage_steps!r} without)")
        try:
            stage_steps = [int(x) for x in args.stage_steps.split(",")]
        except ValueError:
            raise ValueError(f"--stage-steps requires comma-separated integers (got {args.stage_steps!r})") from None
    if args.insert_layer is not None and not args.init_from:
        raise ValueError(f"--insert-layer requires --init-from (a trained model to grow; got --insert-layer "
                         f"{args.insert_layer} without)")
    widen = None
    if args.widen is not None:
        parts = args.widen.split(",")
        if not args.init_from or len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
            raise ValueError("--widen requires --init-from and HIDDEN,INTERMEDIATE (two integers, e.g. 256,768; "
                             f"got --widen {args.widen!r}, --init-from {args.init_from!r})")
        widen = tuple(int(x) for x in parts)
    if args.digit_init == "first" and (args.digit_groups == 1 or not args.init_from):
        raise ValueError("--digit-init first requires --digit-groups 2..4 and --init-from (a trained model whose "
                         f"embeddings grow; got --digit-groups {args.digit_groups}, --init-from {args.init_from!r})")
    if args.hard_keys is not None and not 0.0 <= args.hard_keys <= 1.0:
        raise ValueError(f"--hard-keys requires a probability in [0, 1] (got {args.hard_keys})")
    mix = None
    if args.mix is not None:
        if not n_only:
            raise ValueError("--mix requires one of --polish-only, --continuation-only, --keymatch-only, "
                             f"--retrieval-only (got --mix {args.mix!r} without)")
        mix = parse_mix(args.mix)
    handlers = [logging.StreamHandler()]
    if args.log_file:
        handlers.append(logging.FileHandler(args.log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers, force=True)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = [n for n in args.models.split(",") if n]
    for n in names:
        if n not in MODEL_CONFIGS:
            raise ValueError(f"train-tiny requires --models from {sorted(MODEL_CONFIGS)} (got {n!r})")
    if args.average:
        for n in names:
            average_checkpoints([Path(x) for x in args.average.split(",") if x], out, n)
    if args.eval_only or args.average:
        tok = AutoTokenizer.from_pretrained(out / "tiny-target")
        target = AutoModelForCausalLM.from_pretrained(out / "tiny-target").eval().to(device)
        if args.circuit_report:
            return _print_circuit_report(target, tok, args.circuit_report)
        draft = (AutoModelForCausalLM.from_pretrained(out / "tiny-draft").eval().to(device)
                 if (out / "tiny-draft").exists() else None)
    else:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        essay = load_essay_words()
        if args.init_from:
            # the tokenizer travels with the checkpoint, so --seed only changes the data streams
            tok = AutoTokenizer.from_pretrained(Path(args.init_from) / f"tiny-{names[0]}")
            models = {n: AutoModelForCausalLM.from_pretrained(Path(args.init_from) / f"tiny-{n}") for n in names}
            logger.info("initialised %s (and the tokenizer) from %s", names, args.init_from)
            if args.insert_layer is not None:
                for n, m in models.items():
                    insert_identity_layer(m, args.insert_layer)
                    logger.info("tiny-%s grown to %d layers (identity layer at %d, --insert-layer)", n,
                                m.config.num_hidden_layers, args.insert_layer)
            if widen is not None:
                for n, m in models.items():
                    widen_model(m, *widen, seed=args.seed)
                    logger.info("tiny-%s widened to hidden %d, intermediate %d (--widen)", n, *widen)
            if args.split_uuid_hex and not splits_uuid_hex(tok):
                split_uuid_hex(tok)
                logger.info("the tokenizer now spells uuid letters one per token (--split-uuid-hex)")
            if args.word_tokens:
                tok = add_word_tokens(tok, WORD_TOKEN_LISTS[args.word_tokens])
                for n, m in models.items():
                    added = grow_embeddings(m, len(tok), seed=args.seed)
                    logger.info("tiny-%s: %d whole-word tokens added (--word-tokens %s), vocabulary %d", n, added,
                                args.word_tokens, len(tok))
            if args.digit_groups > 1:
                tok = group_digits(tok, args.digit_groups)
                near = None
                if args.digit_init == "first":  # each new group token starts at its first digit
                    old_size = len(models[names[0]].get_input_embeddings().weight)
                    groups = tok.convert_ids_to_tokens(range(old_size, len(tok)))
                    near = [tok.convert_tokens_to_ids(t[0]) for t in groups]
                for n, m in models.items():
                    added = grow_embeddings(m, len(tok), seed=args.seed + 1, near=near)
                    logger.info("tiny-%s: %d digit-group tokens added (--digit-groups %d), vocabulary %d", n, added,
                                args.digit_groups, len(tok))
        else:
            tok = build_tokenizer(seed=args.seed, essay_words=essay, split_uuid_hex=args.split_uuid_hex)
            if args.word_tokens:
                tok = add_word_tokens(tok, WORD_TOKEN_LISTS[args.word_tokens])
            if args.digit_groups > 1:
                tok = group_digits(tok, args.digit_groups)
            models = {n: build_model(MODEL_CONFIGS[n], tok, args.seed + (n == "draft")) for n in names}
        models = {n: m.to(device) for n, m in models.items()}
        def scaled(stages, first_weight=None, stage_steps=None, mix=None):
            return configure_stages(stages, args.steps_scale, args.retrieval_weight, args.retrieval_roles, first_weight,
                                    stage_steps, mix, args.hard_keys, args.gather_spread or None)

        curriculum = scaled(CURRICULUM)[args.from_stage:]
        probes = {n: PrevTokenProbes(m.config.hidden_size) for n, m in models.items()}
        logger.info("vocab %d %s curriculum %s lr %g", len(tok),
                    {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
                    [dataclasses.asdict(s) for s in curriculum], args.lr)
        t0 = time.time()

        def checkpoint(si):
            for n, m in models.items():
                save_model(m, tok, out / f"tiny-{n}")
            logger.info("stage %d checkpoint after %.1f min (stage end or --save-every); saved to %s", si,
                        (time.time() - t0) / 60, out)

        if not n_only:
            train(models, tok, curriculum, seed=args.seed + args.from_stage, lr=args.lr, autocast=args.autocast,
                  essay_words=essay, on_stage_end=checkpoint, save_every=args.save_every, probes=probes, warmup=30,
                  stop_after_stage=args.stop_after_stage)
        # follow-up curricula: each a fresh optimizer at half the learning rate and its own seeded stream
        follow_ups = [
            ("continuation", CONTINUATION, 100, args.continuation or args.continuation_only),
            ("polish", POLISH, 200,
             (args.polish and not n_only) or args.polish_only),
            ("keymatch", KEYMATCH, 300, args.keymatch or args.keymatch_only),
            ("retrieval", RETRIEVAL, 400, args.retrieval or args.retrieval_only),
        ]
        for name, stages, seed_offset, wanted in follow_ups:
            if not wanted:
                continue
            stages = scaled(stages, args.first_weight, stage_steps, mix)
            logger.info("%s %s lr %g", name, [dataclasses.asdict(s) for s in stages], args.lr / 2)
            train(models, tok, stages, seed=args.seed + seed_offset, lr=args.lr / 2, autocast=args.autocast,
                  essay_words=essay, on_stage_end=checkpoint, save_every=args.save_every, warmup=20)
        logger.info("training took %.1f min", (time.time() - t0) / 60)
        target, draft = models.get("target"), models.get("draft")
        if target is None:
            return 0
    lengths = [int(x) for x in args.eval_lengths.split(",") if x]
    if lengths:
        agree = [int(x) for x in args.agreement_lengths.split(",") if x]
        res = evaluate(target, tok, args.eval_tasks.split(","), lengths, args.eval_samples, draft=draft,
                       agreement_lengths=agree)
        sys.stdout.write(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(train_tiny_main())
