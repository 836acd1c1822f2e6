"""RULER (arXiv 2404.06654): the 13 tasks, their templates, sizing and scoring, offline.

Templates, answer prefixes, task parameters, tokens to generate and metrics are those of
NVIDIA/RULER (``scripts/data/synthetic/constants.py``, ``scripts/synthetic.yaml``,
``scripts/eval/synthetic/constants.py``); the generators are in :mod:`.ruler_synthetic`.

A sample's prompt is ``input + answer_prefix``: ``input`` ends with the chat template's
assistant header, and the answer prefix follows it, as in RULER's ``call_api.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

from . import ruler_synthetic as syn

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- RULER's TASKS constants
BASE_TASKS: dict[str, dict[str, Any]] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": (
            "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
        ),
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
            "Question: Find all variables that are assigned the value {query} in the text above."
        ),
        "answer_prefix": (
            " Answer: According to the chain(s) of variable assignment in the text above, "
            "{num_v} variables are assigned the value {query}, they are: "
        ),
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n{context}\n"
            "Question: What are the 10 most common words in the above list?"
        ),
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": (
            "Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words. {context}\n"
            "Question: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?"
        ),
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": (
            "Answer the question based on the given documents. Only give me the answer and do not output any "
            "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
            "the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
        ),
        "answer_prefix": " Answer:",
    },
}


def _niah(haystack: str, k_type: str, v_type: str, k: int = 1, v: int = 1, q: int = 1) -> dict[str, Any]:
    return dict(
        type_haystack=haystack,
        type_needle_k=k_type,
        type_needle_v=v_type,
        num_needle_k=k,
        num_needle_v=v,
        num_needle_q=q,
    )


# --------------------------------------------------------------------------- scripts/synthetic.yaml
TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "niah_single_1": ("niah", _niah("noise", "words", "numbers")),
    "niah_single_2": ("niah", _niah("essay", "words", "numbers")),
    "niah_single_3": ("niah", _niah("essay", "words", "uuids")),
    "niah_multikey_1": ("niah", _niah("essay", "words", "numbers", k=4)),
    "niah_multikey_2": ("niah", _niah("needle", "words", "numbers")),
    "niah_multikey_3": ("niah", _niah("needle", "uuids", "uuids")),
    "niah_multivalue": ("niah", _niah("essay", "words", "numbers", v=4)),
    "niah_multiquery": ("niah", _niah("essay", "words", "numbers", q=4)),
    "vt": ("variable_tracking", dict(num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
METRICS = {
    "niah": "string_match_all",
    "variable_tracking": "string_match_all",
    "common_words_extraction": "string_match_all",
    "freq_words_extraction": "string_match_all",
    "qa": "string_match_part",
}
SEQ_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)

# --------------------------------------------------------------------------- scripts/data/template.py
MODEL_TEMPLATES: dict[str, str] = {
    "base": "{task_template}",
    "meta-chat": "[INST] {task_template} [/INST]",
    "vicuna-chat": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: {task_template} ASSISTANT:"
    ),
    "lwm-chat": "You are a helpful assistant. USER: {task_template} ASSISTANT: ",
    "Phi3": "<|user|>\n{task_template}<|end|>\n<|assistant|>\n",
    "meta-llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task_template}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}
_SENTINEL = "\u2063LONGCTX_TASK_TEMPLATE\u2063"


def chat_template_for(tokenizer: Any, mode: str = "auto") -> tuple[str, str]:
    """The model template (a string with ``{task_template}``) and its name.

    ``auto`` uses the tokenizer's own chat template when it has one (a single user turn
    plus the generation prompt, cut around the task text) and ``base`` otherwise; any
    other value names one of RULER's templates (:data:`MODEL_TEMPLATES`) or ``model``.
    """
    if mode == "auto":
        mode = "model" if getattr(tokenizer, "chat_template", None) else "base"
    if mode == "model":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat template 'model' requires a tokenizer with a chat_template (this one has none)")
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        before, after = rendered.split(_SENTINEL)
        # literal braces must survive two .format calls (model template, then task fields)
        esc = lambda s: s.replace("{", "{{{{").replace("}", "}}}}")  # noqa: E731
        return esc(before) + "{task_template}" + esc(after), "model"
    if mode not in MODEL_TEMPLATES:
        raise ValueError(f"chat template requires 'auto', 'model' or one of {sorted(MODEL_TEMPLATES)} (got {mode!r})")
    return MODEL_TEMPLATES[mode], mode


# --------------------------------------------------------------------------- local sources
@dataclasses.dataclass
class RulerSources:
    """Local files for the tasks that need external text (all optional).

    Parameters
    ----------
    essay : RULER's ``PaulGrahamEssays.json``, a text file or a folder of ``.txt`` essays.
    squad : SQuAD v2 ``dev-v2.0.json`` (qa_1).
    hotpotqa : HotpotQA ``hotpot_dev_distractor_v1.json`` (qa_2).
    cwe_words : RULER's ``english_words.json``; cwe needs it only past ~8.5K distinct words (~128K tokens).
    """

    essay: Optional[str] = None
    squad: Optional[str] = None
    hotpotqa: Optional[str] = None
    cwe_words: Optional[str] = None

    @classmethod
    def from_dir(cls, data_dir: Optional[str], **explicit: Optional[str]) -> "RulerSources":
        """Explicit paths win; otherwise look in ``data_dir`` for RULER's usual file names."""
        names = {
            "essay": ("PaulGrahamEssays.json", "PaulGrahamEssays"),
            "squad": ("squad.json", "dev-v2.0.json"),
            "hotpotqa": ("hotpotqa.json", "hotpot_dev_distractor_v1.json"),
            "cwe_words": ("english_words.json",),
        }
        found = {}
        for field, candidates in names.items():
            if explicit.get(field):
                found[field] = explicit[field]
            elif data_dir:
                for c in candidates:
                    if os.path.exists(os.path.join(data_dir, c)):
                        found[field] = os.path.join(data_dir, c)
                        break
        return cls(**found)

    def to_dict(self) -> dict[str, Optional[str]]:
        return dataclasses.asdict(self)


ESSAY_TASKS = tuple(t for t, (b, a) in TASKS.items() if b == "niah" and a["type_haystack"] == "essay")
# the shipped stand-in for the Paul Graham essays (synthetic English-like text, eval/data/README.md):
# RulerSources(essay=SYNTHETIC_ESSAYS) runs the essay tasks offline, scores not comparable to RULER's
SYNTHETIC_ESSAYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "synthetic_essays.json")


def missing_reason(task: str, sources: RulerSources) -> Optional[str]:
    """A one-line reason why ``task`` cannot run with these sources, or ``None``."""
    need = {
        "qa_1": ("squad", "SQuAD v2 dev (--squad dev-v2.0.json)"),
        "qa_2": ("hotpotqa", "HotpotQA dev-distractor (--hotpotqa hotpot_dev_distractor_v1.json)"),
    }
    if task in ESSAY_TASKS:
        need[task] = ("essay", "the Paul Graham essays (--essay PaulGrahamEssays.json)")
    if task in need:
        field, what = need[task]
        path = getattr(sources, field)
        if not path:
            return f"{task}: skipped, needs {what}"
        if not os.path.exists(path):
            return f"{task}: skipped, {field} file {path} does not exist"
    return None


@lru_cache(maxsize=4)
def _essay_words(path: str) -> list[str]:
    return syn.load_essay_words(path)


@lru_cache(maxsize=4)
def _qa_data(dataset: str, path: str) -> tuple[list[dict], list[str]]:
    return syn.read_squad(path) if dataset == "squad" else syn.read_hotpotqa(path)


@lru_cache(maxsize=2)
def _english_words(path: str) -> list[str]:
    return syn.load_english_words(path)


# --------------------------------------------------------------------------- generation
def generate_task(
    task: str,
    max_seq_length: int,
    tokenizer: Any,
    num_samples: int,
    seed: int = 42,
    sources: Optional[RulerSources] = None,
    model_template: str = "{task_template}",
) -> list[dict[str, Any]]:
    """Generate ``num_samples`` samples of one RULER task at one length.

    Parameters
    ----------
    task : one of :data:`TASK_NAMES`.
    max_seq_length : L, prompt tokens (``tokenizer.tokenize``, no BOS) + tokens to generate.
    tokenizer : a Hugging Face tokenizer (its ``tokenize`` measures lengths).
    num_samples, seed : RULER's ``--num_samples`` and ``--random_seed``.
    sources : local files for essay / QA tasks.
    model_template : the chat template with ``{task_template}`` (see :func:`chat_template_for`).

    Returns
    -------
    list of dict
        ``{"id", "task", "length", "index", "input", "answer_prefix", "outputs",
        "max_new_tokens", "metric", "meta": {"tokens": ..., ...}}``; the prompt is
        ``input + answer_prefix``.

    Raises
    ------
    ValueError
        Unknown task (the message lists the valid ones).
    ruler_synthetic.MissingDataError
        The task needs a file that ``sources`` does not give.
    """
    if task not in TASKS:
        raise ValueError(f"RULER task requires one of {list(TASK_NAMES)} (got {task!r})")
    sources = sources or RulerSources()
    reason = missing_reason(task, sources)
    if reason:
        field = "essay" if task in ESSAY_TASKS else "squad" if task == "qa_1" else "hotpotqa"
        hint = (f" (in Python: sources=RulerSources({field}=PATH)"
                + ("; ruler.SYNTHETIC_ESSAYS is a shipped synthetic stand-in" if field == "essay" else "")
                + ")")
        raise syn.MissingDataError(reason + hint)
    base_name, args = TASKS[task]
    base = BASE_TASKS[base_name]
    template = model_template.format(task_template=base["template"]) + base["answer_prefix"]
    ctx = syn.GenContext(
        count_tokens=lambda text: len(tokenizer.tokenize(text)),
        template=template,
        task_template=base["template"],
        answer_prefix=base["answer_prefix"],
        max_seq_length=max_seq_length,
        tokens_to_generate=base["tokens_to_generate"],
        num_samples=num_samples,
        seed=seed,
    )
    if base_name == "niah":
        essay = _essay_words(sources.essay) if args["type_haystack"] == "essay" else None
        raw = syn.generate_niah(ctx, essay_words=essay, **args)
    elif base_name == "variable_tracking":
        raw = syn.generate_vt(ctx, **args)
    elif base_name == "common_words_extraction":
        words = _english_words(sources.cwe_words) if sources.cwe_words else None
        raw = syn.generate_cwe(ctx, english_words=words, **args)
    elif base_name == "freq_words_extraction":
        raw = syn.generate_fwe(ctx, **args)
    else:
        path = sources.squad if args["dataset"] == "squad" else sources.hotpotqa
        qas, docs = _qa_data(args["dataset"], path)
        raw = syn.generate_qa(ctx, qas, docs)

    samples = []
    for i, r in enumerate(raw):
        text = r["input"]
        cut = text.rfind(base["answer_prefix"][:10])  # RULER locates the prefix by its first 10 characters
        meta: dict[str, Any] = {"tokens": r["length"], "tokens_to_generate": base["tokens_to_generate"]}
        inp, prefix = text[:cut], text[cut:]
        if base_name == "niah":
            # RULER stores these two as `index` and `token_position_answer`
            meta["answer_char_index"] = inp.find(r["outputs"][0])
            meta["token_position_answer"] = ctx.count_tokens(inp[: meta["answer_char_index"]])
        samples.append(
            {
                "id": f"{task}/{max_seq_length}/{i}",
                "task": task,
                "length": max_seq_length,
                "index": i,
                "input": inp,
                "answer_prefix": prefix,
                "outputs": list(r["outputs"]),
                "max_new_tokens": base["tokens_to_generate"],
                "metric": METRICS[base_name],
                "meta": meta,
            }
        )
    return samples


# --------------------------------------------------------------------------- scoring
_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(pred: str) -> str:
    """RULER's prediction clean-up: strip, control characters to newlines, strip."""
    return _CONTROL.sub("\n", pred.strip()).strip()


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of references found (case-insensitive) in the prediction, x100, 2 d.p."""
    score = sum(sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref) for p, ref in zip(preds, refs))
    return round(score / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of whether any reference is found in the prediction, x100, 2 d.p."""
    score = sum(max(1.0 if r.lower() in p.lower() else 0.0 for r in ref) for p, ref in zip(preds, refs))
    return round(score / len(preds) * 100, 2)


METRIC_FNS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}


def score_task(task: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's score of one task: post-process the predictions, then the task's metric."""
    if task not in TASKS:
        raise ValueError(f"RULER task requires one of {list(TASK_NAMES)} (got {task!r})")
    metric = METRIC_FNS[METRICS[TASKS[task][0]]]
    return metric([postprocess_pred(p) for p in preds], refs)


def weighted_average(scores_by_length: dict[int, float], increasing: bool = True) -> Optional[float]:
    """RULER's wAvg over lengths sorted ascending: weights 1..n (``increasing``) or n..1."""
    lengths = sorted(scores_by_length)
    if not lengths:
        return None
    n = len(lengths)
    weights = list(range(1, n + 1)) if increasing else list(range(n, 0, -1))
    return sum(w * scores_by_length[L] for w, L in zip(weights, lengths)) / sum(weights)
