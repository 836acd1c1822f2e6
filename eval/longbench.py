"""LongBench v1 (arXiv 2308.14508): prompts, truncation, generation lengths and metrics, offline.

Everything here reproduces THUDM/LongBench v1 (``LongBench/pred.py``, ``eval.py``,
``metrics.py``, ``config/dataset2prompt.json``, ``config/dataset2maxlen.json``):

- prompts are filled with ``str.format(**sample)``;
- a prompt longer than ``max_length`` tokens (counted with special tokens) keeps its first
  and last ``int(max_length / 2)`` tokens, each half decoded with special tokens skipped;
- the chat template is applied after truncation, except for trec, triviaqa, samsum,
  lsht, lcc and repobench-p;
- samsum also stops at a newline and generates at least one token;
- :func:`scorer` / :func:`scorer_e` return exactly what ``eval.py`` returns, using the
  same metric libraries (``rouge`` 1.0.1, ``fuzzywuzzy``, ``jieba``).

Data: the official ``data/{task}.jsonl`` (and ``{task}_e.jsonl`` for LongBench-E) files,
one object per line with ``input, context, answers, length, all_classes`` (and
``dataset, language, _id``), read from a local folder.
"""

from __future__ import annotations

import logging
import os
import re
import string
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .jsonl import read_jsonl

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- config/dataset2prompt.json
DATASET2PROMPT: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or '
        '"unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on '
        "the above article as concisely as you can, using a single phrase or sentence if possible. If the question "
        'cannot be answered based on the information in the article, write "unanswerable". If the question is a '
        'yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\n'
        "Question: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答："
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
        "etc.\n\nThe answer is: "
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：'
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
DATASET2PROMPT["2wikimqa"] = DATASET2PROMPT["hotpotqa"]
DATASET2PROMPT["musique"] = DATASET2PROMPT["hotpotqa"]

# --------------------------------------------------------------------------- config/dataset2maxlen.json
DATASET2MAXLEN: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "vcsum": 512,
    "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64,
    "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
    "lcc": 64, "repobench-p": 64,
}  # fmt: skip

# pred.py's dataset order
DATASETS: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
    "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)  # fmt: skip
DATASETS_E: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
    "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip
NO_CHAT_TEMPLATE = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum", "lsht")
CATEGORIES: dict[str, tuple[str, ...]] = {
    "Single-Doc QA": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "Multi-Doc QA": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "Summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "Few-shot Learning": ("trec", "triviaqa", "samsum", "lsht"),
    "Synthetic Tasks": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "Code Completion": ("lcc", "repobench-p"),
}
REQUIRED_FIELDS = ("input", "context", "answers", "length", "all_classes")


# --------------------------------------------------------------------------- metrics.py
def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop articles (a/an/the), collapse whitespace."""
    s = s.lower()
    punct = set(string.punctuation)
    s = "".join(ch for ch in s if ch not in punct)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_ZH_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."


def normalize_zh_answer(s: str) -> str:
    """Lower-case, drop ASCII and Chinese punctuation, remove all whitespace."""
    punct = set(string.punctuation + _ZH_PUNCT)
    s = "".join(ch for ch in s.lower() if ch not in punct)
    return "".join(s.split())


def _f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(ground_truth)
    same = sum(common.values())
    if same == 0:
        return 0
    precision = 1.0 * same / len(prediction)
    recall = 1.0 * same / len(ground_truth)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    import jieba

    pred = [normalize_zh_answer(t) for t in jieba.cut(prediction, cut_all=False)]
    gt = [normalize_zh_answer(t) for t in jieba.cut(ground_truth, cut_all=False)]
    return _f1([t for t in pred if t], [t for t in gt if t])


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F of pltrdy ``rouge`` (1.0.1); 0.0 when it raises (e.g. an empty string)."""
    from rouge import Rouge

    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # the official code catches everything here
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    import jieba

    return rouge_score(" ".join(jieba.cut(prediction, cut_all=False)), " ".join(jieba.cut(ground_truth, cut_all=False)))


def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """1/len(matches) if the ground truth is among the classes found in the prediction, else 0.

    Classes that are substrings of the ground truth (but not equal to it) are dropped; as in
    the official code the list is edited while it is iterated, so a class right after a
    dropped one is kept.
    """
    matches = [c for c in kwargs["all_classes"] if c in prediction]
    i = 0
    while i < len(matches):  # list.remove during a for-loop: the element after a removed one is skipped
        term = matches[i]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_fraction(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    right = sum(1 for n in numbers if str(n) == str(target))
    return float(0.0 if not numbers else right / len(numbers))


def count_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    return _number_fraction(prediction, ground_truth)


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    return _number_fraction(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    return _number_fraction(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """fuzzywuzzy ratio / 100 against the first line without a backtick, ``#`` or ``//``."""
    from fuzzywuzzy import fuzz

    line = next(
        (ln for ln in prediction.lstrip("\n").split("\n") if "`" not in ln and "#" not in ln and "//" not in ln), ""
    )
    return fuzz.ratio(line, ground_truth) / 100


DATASET2METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score,
    "musique": qa_f1_score, "dureader": rouge_zh_score, "gov_report": rouge_score,
    "qmsum": rouge_score, "multi_news": rouge_score, "vcsum": rouge_zh_score,
    "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "lsht": classification_score, "passage_retrieval_en": retrieval_score,
    "passage_count": count_score, "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}  # fmt: skip


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASET2METRIC:
        raise ValueError(f"LongBench dataset requires one of {list(DATASETS)} (got {dataset!r})")


def sample_score(dataset: str, prediction: str, ground_truths: Sequence[str], all_classes: Any) -> float:
    """One sample: the first-line rule for trec/triviaqa/samsum/lsht, then the max over answers."""
    _check_dataset(dataset)
    if dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    score = 0.0
    for gt in ground_truths:
        score = max(score, DATASET2METRIC[dataset](prediction, gt, all_classes=all_classes))
    return score


def scorer(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]], all_classes: Any) -> float:
    """LongBench ``eval.py`` ``scorer``: ``round(100 * mean sample score, 2)``."""
    _check_dataset(dataset)
    total = 0.0
    for prediction, gts in zip(predictions, answers):
        total += sample_score(dataset, prediction, gts, all_classes)
    return round(100 * total / len(predictions), 2)


def scorer_e(
    dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]], lengths: Sequence[int], all_classes: Any
) -> dict[str, float]:
    """LongBench-E ``scorer_e``: scores per length bucket ``0-4k`` / ``4-8k`` / ``8k+`` (NaN when empty)."""
    _check_dataset(dataset)
    buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for prediction, gts, length in zip(predictions, answers, lengths):
        s = sample_score(dataset, prediction, gts, all_classes)
        buckets["0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"].append(s)
    with warnings.catch_warnings():  # np.mean([]) of an empty bucket is nan, as in the official code
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: round(100 * np.mean(v), 2) for k, v in buckets.items()}


def english_average(task_scores: dict[str, float]) -> Optional[float]:
    """The leaderboard's English Avg: the mean of the 6 category means over English and code tasks."""
    means = []
    for tasks in CATEGORIES.values():
        vals = [
            task_scores[t]
            for t in tasks
            if t in task_scores and not t.endswith("_zh") and t not in ("dureader", "vcsum", "lsht")
        ]
        if vals:
            means.append(sum(vals) / len(vals))
    return sum(means) / len(means) if means else None


# --------------------------------------------------------------------------- data
def expected_files(tasks: Sequence[str], e: bool = False) -> list[str]:
    return [f"{t}_e.jsonl" if e else f"{t}.jsonl" for t in tasks]


def resolve_tasks(tasks: Optional[Sequence[str]], e: bool = False) -> list[str]:
    """Validate task names (default: all 21, or the 13 LongBench-E ones)."""
    valid = DATASETS_E if e else DATASETS
    if not tasks:
        return list(valid)
    bad = [t for t in tasks if t not in valid]
    if bad:
        raise ValueError(f"LongBench{'-E' if e else ''} task(s) {bad} unknown; valid tasks: {list(valid)}")
    return list(tasks)


def find_data_files(
    data_dir: Optional[str], tasks: Sequence[str], e: bool = False, explicit: bool = True
) -> dict[str, Path]:
    """Map each task to its jsonl file in ``data_dir`` (or ``data_dir/data``).

    Raises
    ------
    FileNotFoundError
        The folder is missing or has none of the files, or (``explicit``) a requested task's
        file is missing; the message names the files expected.
    """
    names = expected_files(tasks, e)
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"LongBench data folder {data_dir!r} does not exist; pass --data-dir with the official jsonl files: "
            + ", ".join(names)
        )
    found, missing = {}, []
    for task, name in zip(tasks, names):
        for cand in (Path(data_dir) / name, Path(data_dir) / "data" / name):
            if cand.is_file():
                found[task] = cand
                break
        else:
            missing.append(name)
    if not found or (missing and explicit):
        raise FileNotFoundError(
            f"LongBench data folder {data_dir} lacks {', '.join(missing)} (expected: {', '.join(names)})"
        )
    for name in missing:
        logger.warning("longbench: skipped, %s not found in %s", name, data_dir)
    return found


def load_task(path: os.PathLike, task: str) -> list[dict[str, Any]]:
    """Read one task file; every line must be an object with the official fields."""
    return read_jsonl(path, required=REQUIRED_FIELDS)


def _has_bos_text(tokenizer: Any, text: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def build_prompt(
    tokenizer: Any, dataset: str, record: dict[str, Any], max_length: int, chat: str = "auto"
) -> dict[str, Any]:
    """The prompt ``pred.py`` sends to the model, and how it was made.

    Parameters
    ----------
    tokenizer : a Hugging Face tokenizer.
    dataset : task name.
    record : one jsonl object.
    max_length : the truncation length (``model2maxlen``), in tokens incl. special tokens.
    chat : ``auto`` (the tokenizer's chat template when it has one), ``model`` or ``none``.

    Returns
    -------
    dict
        ``{"prompt", "truncated", "tokens_before", "chat_applied", "add_special_tokens"}``.
    """
    prompt = DATASET2PROMPT[dataset].format(**record)
    ids = tokenizer(prompt, truncation=False).input_ids
    truncated = len(ids) > max_length
    if truncated:
        half = int(max_length / 2)
        prompt = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
            ids[-half:], skip_special_tokens=True
        )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "model" and not has_template:
        raise ValueError("chat template 'model' requires a tokenizer with a chat_template (this one has none)")
    if chat not in ("auto", "model", "none"):
        raise ValueError(f"LongBench chat mode requires one of ['auto', 'model', 'none'] (got {chat!r})")
    apply = chat != "none" and has_template and dataset not in NO_CHAT_TEMPLATE
    if apply:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return {
        "prompt": prompt,
        "truncated": truncated,
        "tokens_before": len(ids),
        "chat_applied": apply,
        # a chat template that writes BOS itself must not get a second one
        "add_special_tokens": not _has_bos_text(tokenizer, prompt),
    }


def build_samples(
    tokenizer: Any,
    data_files: dict[str, Path],
    max_lengths: Sequence[int],
    num_samples: Optional[int] = None,
    e: bool = False,
    chat: str = "auto",
) -> list[dict[str, Any]]:
    """Samples for every task x truncation length (the first ``num_samples`` lines of each file)."""
    newline_id = tokenizer.encode("\n", add_special_tokens=False)[-1]
    out = []
    for task, path in data_files.items():
        records = load_task(path, task)
        if num_samples is not None:
            records = records[:num_samples]
        for L in max_lengths:
            for i, rec in enumerate(records):
                built = build_prompt(tokenizer, task, rec, L, chat)
                sample = {
                    "id": f"{task}/{L}/{i}",
                    "task": task,
                    "length": int(L),
                    "index": i,
                    "input": built["prompt"],
                    "answer_prefix": "",
                    "outputs": list(rec["answers"]),
                    "all_classes": rec["all_classes"],
                    "max_new_tokens": DATASET2MAXLEN[task],
                    "metric": DATASET2METRIC[task].__name__,
                    "add_special_tokens": built["add_special_tokens"],
                    "meta": {
                        "length": rec["length"],  # words (chars for zh): LongBench-E buckets
                        "truncated": built["truncated"],
                        "tokens_before": built["tokens_before"],
                        "chat_applied": built["chat_applied"],
                        "_id": rec.get("_id"),
                    },
                }
                if task == "samsum":  # pred.py: stop at a newline, generate at least one token
                    sample["gen"] = {"stop_token_ids": [newline_id], "min_new_tokens": 1}
                out.append(sample)
    return out
