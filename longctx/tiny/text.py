"""Synthetic RULER-shaped text: the NIAH and variable-tracking templates, the stand-in essay
haystack, word keys and values, and the prompts (:class:`Sample`) built from them."""
from __future__ import annotations

import dataclasses
import json
import random
import re
import string
import uuid
from pathlib import Path
from typing import Sequence

from longctx.tiny.paths import ESSAY_PATH, PACKAGE_DIR

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
