"""RULER's sample generators (NIAH, variable tracking, CWE, FWE, QA), offline.

Each generator follows NVIDIA/RULER ``scripts/data/synthetic/*.py`` (main, 2025: binary
search sizing) step for step, so that with the same tokenizer, seed and source files it
draws the same random numbers in the same order and produces the same samples:

- one ``random.Random(seed)`` plays the role of the scripts' seeded global ``random``,
  one ``np.random.RandomState(seed)`` the role of ``np.random``, both fresh per task;
- the ``random.Random(seed).shuffle`` calls on a fresh instance are kept as such;
- the haystack size is the largest unit count (lines, words, documents) whose prompt
  satisfies ``len(tokenizer.tokenize(prompt)) + tokens_to_generate <= max_seq_length``,
  found by the official binary search; a sample that overflows is redrawn with
  ``incremental`` fewer units.

Deliberate differences, none of which changes a sample that the official code produces:
a sample that cannot be made to fit raises instead of looping forever, and the essay
sentence splitter falls back to a regular expression when NLTK's punkt data is missing
(recorded in the run's config).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import os
import random
import re
import string
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"

NOISE_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# RULER's insertion depths for essay haystacks: 40 evenly spaced percentages
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]
# Tries at the smallest haystack size before giving up (the official loop would spin forever)
_MAX_FLOOR_TRIES = 200


class MissingDataError(FileNotFoundError):
    """A task needs a local file that was not given; the message says which and how to pass it."""


class SampleDoesNotFitError(RuntimeError):
    """Even the smallest haystack overflows ``max_seq_length``."""


# ----------------------------------------------------------------------------- word lists
def _read_word_list(name: str) -> list[str]:
    """One word per line with trailing whitespace stripped, as wonderwords reads its assets."""
    with open(DATA_DIR / name, "r", encoding="utf-8") as f:
        return [w.rstrip() for w in f.readlines()]


@lru_cache(maxsize=None)
def wonderwords_lists() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``(nouns, adjectives, verbs)`` from the vendored wonderwords 3.0.1 lists."""
    return (
        tuple(_read_word_list("wonderwords_nounlist.txt")),
        tuple(_read_word_list("wonderwords_adjectivelist.txt")),
        tuple(_read_word_list("wonderwords_verblist.txt")),
    )


class AdjNounWords(Sequence):
    """``sorted(set(f"{adj}-{noun}" for adj in adjs for noun in nouns))`` without building it.

    The full list has ~6.2M strings (RULER builds it at import). All strings of one
    adjective share the prefix ``adj + "-"``, so the sorted list is a sequence of blocks,
    one per prefix, in prefix order -- except where one prefix starts another
    (``"blue-"`` / ``"blue-eyed-"``); those few clusters are materialised and sorted.
    Indexing gives exactly the element of the real list, so ``rng.choice(words)`` draws
    the same word with the same random number.
    """

    def __init__(self, adjectives: Sequence[str], nouns: Sequence[str]):
        self._nouns = sorted(set(nouns))
        prefixes = sorted({a + "-" for a in adjectives})
        self._blocks: list[Any] = []  # str prefix (a plain block) or a sorted list (a cluster)
        i = 0
        while i < len(prefixes):
            root, j = prefixes[i], i + 1
            while j < len(prefixes) and prefixes[j].startswith(root):
                j += 1
            if j == i + 1:
                self._blocks.append(root)
            else:
                self._blocks.append(sorted({p + n for p in prefixes[i:j] for n in self._nouns}))
            i = j
        sizes = [len(self._nouns) if isinstance(b, str) else len(b) for b in self._blocks]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, idx: int) -> str:
        if not isinstance(idx, int):
            raise TypeError(f"AdjNounWords indices must be int (got {type(idx).__name__})")
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        b = bisect.bisect_right(self._starts, idx) - 1
        block, off = self._blocks[b], idx - self._starts[b]
        return block + self._nouns[off] if isinstance(block, str) else block[off]


@lru_cache(maxsize=None)
def niah_words() -> AdjNounWords:
    nouns, adjs, _ = wonderwords_lists()
    return AdjNounWords(adjs, nouns)


# ----------------------------------------------------------------------------- external text
def load_essay_words(path: os.PathLike) -> list[str]:
    """The essay haystack as RULER splits it: ``re.sub(r'\\s+', ' ', text).split(' ')``.

    ``path`` is RULER's ``PaulGrahamEssays.json`` (``{"text": ...}``), a text file, or a
    folder of ``.txt`` files (concatenated in sorted order with no separator).
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise MissingDataError(f"essay folder {p} has no .txt files")
        text = "".join(f.read_text(encoding="utf-8") for f in files)
    elif p.suffix == ".json":
        with open(p, "r", encoding="utf-8") as f:
            obj = json.load(f)
        if not isinstance(obj, dict) or "text" not in obj:
            raise ValueError(f"{p}: expected a JSON object with a 'text' field (RULER's PaulGrahamEssays.json)")
        text = obj["text"]
    else:
        text = p.read_text(encoding="utf-8")
    return re.sub(r"\s+", " ", text).split(" ")


_SENT_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")


def _regex_sent_tokenize(text: str) -> list[str]:
    """Approximate punkt: split after . ! ? (plus closing quotes) before an upper-case start."""
    return [s for s in _SENT_RE.split(text) if s]


@lru_cache(maxsize=None)
def sentence_splitter() -> tuple[Callable[[str], list[str]], str]:
    """``(sent_tokenize, name)``: NLTK's punkt when installed with its data, else a regex."""
    try:
        import nltk

        nltk.sent_tokenize("One. Two.")
        return nltk.sent_tokenize, f"nltk {nltk.__version__} punkt"
    except Exception:  # ImportError, or LookupError when punkt data is absent
        logger.warning("NLTK punkt is not available: essay haystacks use a regex sentence splitter")
        return _regex_sent_tokenize, "regex (nltk punkt unavailable)"


def read_squad(path: os.PathLike) -> tuple[list[dict], list[str]]:
    """SQuAD v2 dev: answerable questions in file order, documents sorted and deduplicated."""
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    doc_id = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        article_docs = [doc_id[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            own = doc_id[p["context"]]
            for qa in p["qas"]:
                if not qa["is_impossible"]:
                    qas.append(
                        {
                            "query": qa["question"],
                            "outputs": [a["text"] for a in qa["answers"]],
                            "context": [own],
                            "more_context": [i for i in article_docs if i != own],
                        }
                    )
    return qas, docs


def read_hotpotqa(path: os.PathLike) -> tuple[list[dict], list[str]]:
    """HotpotQA dev-distractor: each document is ``f"{title}\\n{''.join(sentences)}"``."""
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    doc_id = {c: i for i, c in enumerate(docs)}
    qas = [
        {
            "query": d["question"],
            "outputs": [d["answer"]],
            "context": [doc_id[f"{t}\n{''.join(p)}"] for t, p in d["context"]],
        }
        for d in data
    ]
    return qas, docs


def load_english_words(path: os.PathLike) -> list[str]:
    """RULER's ``english_words.json`` (a ``{key: word}`` object): CWE's vocabulary beyond wonderwords."""
    with open(path, "r", encoding="utf-8") as f:
        return list(json.load(f).values())


# ----------------------------------------------------------------------------- generation context
@dataclasses.dataclass
class GenContext:
    """Everything a generator needs for one task at one length.

    Parameters
    ----------
    count_tokens : callable
        ``len(tokenizer.tokenize(text))`` -- RULER's length measure (no BOS).
    template : str
        The full template: chat template around the task template, plus the answer prefix.
    task_template, answer_prefix : str
        The raw task template and answer prefix (RULER's ``TASKS`` constants).
    max_seq_length : int
        Target length L: prompt tokens + tokens_to_generate must not exceed it.
    tokens_to_generate : int
    num_samples : int
    seed : int
    """

    count_tokens: Callable[[str], int]
    template: str
    task_template: str
    answer_prefix: str
    max_seq_length: int
    tokens_to_generate: int
    num_samples: int
    seed: int = 42

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.np_rng = np.random.RandomState(self.seed)


def _binary_search(
    ctx: GenContext, make: Callable[[int], str], lower: int, upper: int, extra: int = 0
) -> Optional[int]:
    """Largest unit count in [lower, upper] whose prompt fits (``None`` if none does)."""
    best = None
    while lower <= upper:
        mid = (lower + upper) // 2
        total = ctx.count_tokens(make(mid)) + extra + ctx.tokens_to_generate
        logger.debug("haystack size %d -> %d/%d tokens", mid, total, ctx.max_seq_length)
        if total <= ctx.max_seq_length:
            best, lower = mid, mid + 1
        else:
            upper = mid - 1
    return best


def _fit(ctx: GenContext, make: Callable[[int], tuple[str, Any]], size: int, incremental: int, what: str):
    """Redraw with ``incremental`` fewer units until the prompt fits (RULER's per-sample loop)."""
    tries = 0
    while True:
        text, answer = make(size)
        length = ctx.count_tokens(text) + ctx.tokens_to_generate
        if length <= ctx.max_seq_length:
            return text, answer, length
        if size > incremental:
            size -= incremental
        else:
            tries += 1
            if tries >= _MAX_FLOOR_TRIES:
                raise SampleDoesNotFitError(
                    f"{what}: a sample with the smallest haystack ({size} units) still has {length} tokens "
                    f"> max_seq_length {ctx.max_seq_length}; use a longer length"
                )


# ----------------------------------------------------------------------------- NIAH
def _random_value(ctx: GenContext, kind: str) -> str:
    if kind == "numbers":
        return str(ctx.rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return ctx.rng.choice(niah_words())
    if kind == "uuids":
        return str(uuid.UUID(int=ctx.rng.getrandbits(128), version=4))
    raise ValueError(f"needle type requires one of ['numbers', 'words', 'uuids'] (got {kind!r})")


def generate_niah(
    ctx: GenContext,
    num_needle_k: int = 1,
    num_needle_v: int = 1,
    num_needle_q: int = 1,
    type_haystack: str = "essay",
    type_needle_k: str = "words",
    type_needle_v: str = "numbers",
    essay_words: Optional[list[str]] = None,
) -> list[dict]:
    """RULER ``niah.py``: needles ``"One of the special magic ... for {key} is: {value}."`` in a haystack.

    Returns raw samples ``{"input": full prompt incl. answer prefix, "outputs": [...], "length": int}``.
    """
    k = max(num_needle_k, num_needle_q)
    if type_haystack == "essay":
        if essay_words is None:
            raise MissingDataError("essay haystack needs the Paul Graham essays (--essay PaulGrahamEssays.json)")
        sent_tokenize = sentence_splitter()[0]
    elif type_haystack not in ("noise", "needle"):
        raise ValueError(f"type_haystack requires one of ['essay', 'noise', 'needle'] (got {type_haystack!r})")

    def make(num_haystack: int) -> tuple[str, list[str]]:
        keys, values, needles = [], [], []
        for _ in range(k):
            keys.append(_random_value(ctx, type_needle_k))
            value = []
            for _ in range(num_needle_v):
                value.append(_random_value(ctx, type_needle_v))
                needles.append(NEEDLE.format(type_needle_v=type_needle_v, key=keys[-1], value=value[-1]))
            values.append(value)
        random.Random(ctx.seed).shuffle(needles)

        if type_haystack == "essay":
            if num_haystack <= len(essay_words):
                text = " ".join(essay_words[:num_haystack])
            else:
                repeats = (num_haystack + len(essay_words) - 1) // len(essay_words)
                text = " ".join((essay_words * repeats)[:num_haystack])
            sents = sent_tokenize(text.strip())
            cuts = [int(len(sents) * (d / 100)) for d in ctx.rng.sample(DEPTHS, len(needles))]
            bounds = [0] + sorted(cuts) + [len(sents)]
            parts = []
            for i in range(1, len(bounds)):
                parts.append(" ".join(sents[bounds[i - 1] : bounds[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if type_haystack == "noise":
                lines = [NOISE_LINE] * num_haystack
            else:  # every line a distractor needle with a fresh key and value
                lines = [
                    NEEDLE.format(
                        type_needle_v=type_needle_v,
                        key=_random_value(ctx, type_needle_k),
                        value=_random_value(ctx, type_needle_v),
                    )
                    for _ in range(num_haystack)
                ]
            for index, needle in zip(sorted(ctx.rng.sample(range(num_haystack), len(needles)), reverse=True), needles):
                lines.insert(index, needle)
            context = "\n".join(lines)

        indices = ctx.rng.sample(range(k), num_needle_q)
        queries = [keys[i] for i in indices]
        answers = [a for i in indices for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]

        template, type_name = ctx.template, type_needle_v
        if num_needle_q * num_needle_v == 1:
            # singular wording; RULER applies these to the whole template, chat template included
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            template = template.replace("answers", "answer")
            type_name = type_needle_v[:-1]
        return template.format(type_needle_v=type_name, context=context, query=query), answers

    if type_haystack == "essay":
        incremental = 500
    else:
        incremental = 5 if ctx.max_seq_length < 4096 else 25
    probe = ctx.count_tokens(make(incremental)[0])
    estimated = int((ctx.max_seq_length / (probe / incremental)) * 3)
    best = _binary_search(ctx, lambda n: make(n)[0], incremental, max(estimated, incremental * 2))
    num_haystack = best if best is not None else incremental
    logger.info(
        "niah: haystack of %d %s for L=%d",
        num_haystack,
        "words" if type_haystack == "essay" else "lines",
        ctx.max_seq_length,
    )

    out = []
    for _ in range(ctx.num_samples):
        text, answers, length = _fit(ctx, make, num_haystack, incremental, "niah")
        out.append({"input": text, "outputs": answers, "length": length})
    return out


# ----------------------------------------------------------------------------- variable tracking
def generate_vt(ctx: GenContext, num_chains: int = 1, num_hops: int = 4, add_fewshot: bool = True) -> list[dict]:
    """RULER ``variable_tracking.py`` on the noise haystack, with its one in-context example.

    The example is generated first (``max_seq_length=500``, 3-letter names, value 12345,
    no chat template, no generation budget); each real sample gets a copy with fresh
    names and value inserted just before the task template.
    """
    task_full = ctx.task_template + ctx.answer_prefix

    def chains_for(is_icl: bool) -> tuple[list[list[str]], list[list[str]]]:
        k = 3 if is_icl else 5
        hops = min(10, num_hops) if is_icl else num_hops
        names = ["".join(ctx.rng.choices(string.ascii_uppercase, k=k)).upper() for _ in range((hops + 1) * num_chains)]
        while len(set(names)) < num_chains * (hops + 1):
            names.append("".join(ctx.rng.choices(string.ascii_uppercase, k=k)).upper())
        all_vars, all_chains = [], []
        for i in range(0, len(names), hops + 1):
            these = names[i : i + hops + 1]
            all_vars.append(these)
            first = "12345" if is_icl else str(ctx.np_rng.randint(10000, 99999))
            chain = [f"VAR {these[0]} = {first}"]
            for j in range(hops):
                chain.append(f"VAR {these[j + 1]} = VAR {these[j]} ")
            all_chains.append(chain)
        return all_vars, all_chains

    def make(num_noises: int, is_icl: bool) -> tuple[str, list[str]]:
        all_vars, all_chains = chains_for(is_icl)
        value = all_chains[0][0].split("=")[-1].strip()
        lines = [NOISE_LINE] * num_noises
        for chain in all_chains:
            positions = sorted(ctx.rng.sample(range(len(lines)), len(chain)))
            for j, pos in enumerate(positions):
                lines.insert(pos + j, chain[j])
        context = "\n".join(lines).replace(". \n", ".\n")
        template = ctx.template
        if is_icl and template != task_full:
            template = task_full  # the example carries no chat template
        return template.format(context=context, query=value, num_v=num_hops + 1), all_vars[0]

    def randomize_icl(example: str) -> str:
        for item in example.strip().split()[-num_hops - 1 :]:
            example = example.replace(item, "".join(ctx.rng.choices(string.ascii_uppercase, k=len(item))).upper())
        return example.replace("12345", str(ctx.np_rng.randint(10000, 99999)))

    def run(max_seq_length: int, num_samples: int, icl_example: Optional[str]) -> list[dict]:
        budget = ctx.tokens_to_generate if icl_example is not None else 0
        is_icl = add_fewshot and icl_example is None
        if icl_example is not None:
            incremental = 5 if ctx.max_seq_length < 4096 else 10
        else:
            incremental = 5
        example_tokens = ctx.count_tokens(icl_example) if (add_fewshot and icl_example is not None) else 0
        probe = ctx.count_tokens(make(incremental, is_icl)[0])
        estimated = int((max_seq_length / (probe / incremental)) * 3)
        lower, upper, best = incremental, max(estimated, incremental * 2), None
        while lower <= upper:
            mid = (lower + upper) // 2
            total = ctx.count_tokens(make(mid, is_icl)[0]) + example_tokens + budget
            if total <= max_seq_length:
                best, lower = mid, mid + 1
            else:
                upper = mid - 1
        num_noises = best if best is not None else incremental

        out = []
        for _ in range(num_samples):
            used, tries = num_noises, 0
            while True:
                text, answer = make(used, is_icl)
                if add_fewshot and icl_example is not None:
                    cut = text.index(ctx.task_template[:20])
                    text = text[:cut] + randomize_icl(icl_example) + "\n" + text[cut:]
                length = ctx.count_tokens(text) + budget
                if length <= max_seq_length:
                    break
                if used > incremental:
                    used -= incremental
                else:
                    tries += 1
                    if tries >= _MAX_FLOOR_TRIES:
                        raise SampleDoesNotFitError(
                            f"vt: the smallest haystack still has {length} tokens > {max_seq_length}; "
                            "use a longer length"
                        )
            out.append({"input": text, "outputs": answer, "length": length})
        return out

    icl = None
    if add_fewshot:
        example = run(500, 1, None)[0]
        icl = example["input"] + " " + " ".join(example["outputs"]) + "\n"
    return run(ctx.max_seq_length, ctx.num_samples, icl)


# ----------------------------------------------------------------------------- CWE
def generate_cwe(
    ctx: GenContext,
    freq_cw: int = 30,
    freq_ucw: int = 3,
    num_cw: int = 10,
    num_fewshot: int = 1,
    english_words: Optional[list[str]] = None,
) -> list[dict]:
    """RULER ``common_words_extraction.py``: a numbered word list; the answer is the 10 most repeated words."""
    nouns, adjs, verbs = wonderwords_lists()
    words = sorted(set(list(nouns) + list(adjs) + list(verbs)))
    random.Random(ctx.seed).shuffle(words)
    short = ctx.max_seq_length < 4096

    def example(num_words: int, common_repeats: int, uncommon_repeats: int) -> tuple[str, list[str]]:
        if num_words <= len(words):
            chosen = ctx.rng.sample(words, num_words)
        elif english_words is not None:
            chosen = ctx.rng.sample(english_words, num_words)
        else:
            raise MissingDataError(
                f"cwe at L={ctx.max_seq_length} needs {num_words} distinct words, more than the {len(words)} "
                "wonderwords words: give RULER's english_words.json (--cwe-words)"
            )
        common, uncommon = chosen[:num_cw], chosen[num_cw:]
        word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
        random.Random(ctx.seed).shuffle(word_list)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list)), common

    def make(num_words: int) -> tuple[str, list[str]]:
        shots = []
        for _ in range(num_fewshot):
            shots.append(example(20, 3, 1) if short else example(40, 10, 3))
        context, answer = example(num_words, 6, 1) if short else example(num_words, freq_cw, freq_ucw)
        shot_texts = [
            ctx.template.format(num_cw=num_cw, context=c, query="")
            + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(a))
            for c, a in shots
        ]
        return "\n".join(shot_texts) + "\n" + ctx.template.format(num_cw=num_cw, context=context, query=""), answer

    incremental, probe_words = 10, 4096
    per_word = ctx.count_tokens(make(probe_words)[0]) / probe_words
    estimated = int(ctx.max_seq_length // per_word) * 2
    best = _binary_search(ctx, lambda n: make(n)[0], incremental, max(estimated, incremental * 2))
    num_words = best if best is not None else incremental
    logger.info("cwe: %d words for L=%d", num_words, ctx.max_seq_length)
    out = []
    for _ in range(ctx.num_samples):
        text, answer, length = _fit(ctx, make, num_words, incremental, "cwe")
        out.append({"input": text, "outputs": answer, "length": length})
    return out


# ----------------------------------------------------------------------------- FWE
def _zeta(s: float) -> float:
    """Riemann zeta for s > 1 (scipy.special.zeta(s) in RULER); exact closed form at s = 2."""
    if s == 2.0:
        return math.pi**2 / 6
    n = 20  # Euler-Maclaurin: partial sum + tail integral + Bernoulli corrections
    total = sum(k**-s for k in range(1, n))
    total += n ** (1 - s) / (s - 1) + 0.5 * n**-s
    total += s * n ** (-s - 1) / 12 - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720
    return total


def generate_fwe(ctx: GenContext, alpha: float = 2.0, coded_wordlen: int = 6, vocab_size: int = -1) -> list[dict]:
    """RULER ``freq_words_extraction.py``: Zipf-distributed coded words; the answer is ranks 2-4.

    The word count starts at ``max_len // 6`` and grows by ``max_len // 32`` until the prompt
    reaches ``max_len = max_seq_length - tokens_to_generate`` tokens, then steps back once.
    """
    max_len = ctx.max_seq_length - ctx.tokens_to_generate
    vocab_size = max_len // 50 if vocab_size == -1 else vocab_size
    incremental = max_len // 32
    if incremental <= 0 or vocab_size < 4:
        raise SampleDoesNotFitError(f"fwe: max_seq_length {ctx.max_seq_length} is too short for the coded-word text")
    zeta = _zeta(alpha)

    def draw(num_words: int) -> tuple[str, list[str], int]:
        vocab = ["".join(ctx.rng.choices(string.ascii_lowercase, k=coded_wordlen)) for _ in range(vocab_size)]
        while len(set(vocab)) < vocab_size:
            vocab.append("".join(ctx.rng.choices(string.ascii_lowercase, k=coded_wordlen)))
        vocab = sorted(set(vocab))
        random.Random(ctx.seed).shuffle(vocab)
        vocab[0] = "..."  # the top-ranked word is noise

        def text_for(n: int) -> tuple[str, list[str]]:
            ranks = np.arange(1, len(vocab) + 1)
            counts = n * (ranks**-alpha) / zeta
            flat = [w for w, c in zip(vocab, counts.astype(int)) for _ in range(c)]
            random.Random(ctx.seed).shuffle(flat)
            return ctx.template.format(context=" ".join(flat), query=""), vocab[1:4]

        if num_words > 0:
            text, answer = text_for(num_words)
            while ctx.count_tokens(text) > max_len:
                num_words -= incremental
                text, answer = text_for(num_words)
        else:
            num_words = max_len // coded_wordlen
            text, answer = text_for(num_words)
            while ctx.count_tokens(text) < max_len:
                num_words += incremental
                text, answer = text_for(num_words)
            num_words -= incremental
        text, answer = text_for(num_words)
        return text, answer, num_words

    num_words = draw(-1)[2]
    logger.info("fwe: %d words for L=%d", num_words, ctx.max_seq_length)
    out = []
    for _ in range(ctx.num_samples):
        text, answer, _ = draw(num_words)
        out.append({"input": text, "outputs": answer, "length": ctx.count_tokens(text) + ctx.tokens_to_generate})
    return out


# ----------------------------------------------------------------------------- QA
def generate_qa(ctx: GenContext, qas: list[dict], docs: list[str], pre_samples: int = 0) -> list[dict]:
    """RULER ``qa.py``: the gold documents plus distractors, shuffled, as ``"Document {i}:\\n{doc}"``."""
    if len(qas) < pre_samples + ctx.num_samples:
        raise ValueError(
            f"qa: {ctx.num_samples} samples need {pre_samples + ctx.num_samples} questions (file has {len(qas)})"
        )

    def make(index: int, num_docs: int) -> tuple[str, list[str]]:
        qa = qas[index]
        gold, more = qa["context"], qa.get("more_context", [])
        if num_docs < len(docs):
            if num_docs - len(gold) > len(more):
                excluded = set(gold + more)
                extra = [i for i in range(len(docs)) if i not in excluded]
                chosen = gold + more + ctx.rng.sample(extra, max(0, num_docs - len(gold) - len(more)))
            else:
                chosen = gold + ctx.rng.sample(more, num_docs - len(gold))
            texts = [docs[i] for i in chosen]
        else:
            repeats = (num_docs + len(docs) - 1) // len(docs)
            texts = (docs * repeats)[:num_docs]
        random.Random(ctx.seed).shuffle(texts)
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(texts))
        return ctx.template.format(context=context, query=qa["query"]), qa["outputs"]

    incremental = 10
    per_doc = ctx.count_tokens(make(0, incremental)[0]) / incremental
    estimated = int((ctx.max_seq_length / per_doc) * 3)
    best = _binary_search(ctx, lambda n: make(0, n)[0], incremental, max(estimated, incremental * 2))
    num_docs = best if best is not None else incremental
    logger.info("qa: %d documents for L=%d", num_docs, ctx.max_seq_length)
    out = []
    for index in range(ctx.num_samples):
        qi = index + pre_samples
        text, answer, length = _fit(ctx, lambda n: make(qi, n), num_docs, incremental, "qa")
        out.append({"input": text, "outputs": answer, "length": length})
    return out
