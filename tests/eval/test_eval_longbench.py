"""LongBench v1: scorer values on hand-made cases for all 21 datasets, prompts, truncation, data errors.

Expected values are worked out by hand from the official formulas (metrics.py / eval.py):
token F1 after normalisation, pltrdy ROUGE-L over unique words, fuzzywuzzy ratio, the
classification rule with its remove-while-iterating quirk, the first-line rule, and
``round(100 * mean, 2)``.
"""

from __future__ import annotations

import json
import math

import pytest

from longctx.eval import longbench as lb
from longctx.eval.jsonl import JsonlError

# dataset -> (predictions, answers, all_classes, expected score)
CASES = {
    # "the cat sat" vs "a cat sat on mat": P=1, R=1/2 -> F1 2/3; "no" in ["yes","no"] -> 1; mean 5/6
    "narrativeqa": (["The cat sat.", "no"], [["a cat sat on mat"], ["yes", "no"]], None, 83.33),
    "qasper": (["unanswerable"], [["Unanswerable"]], None, 100.0),
    # [paris, france] vs [paris]: P=1/2, R=1 -> 2/3
    "multifieldqa_en": (["Paris, France"], [["Paris"]], None, 66.67),
    # jieba tokens, Chinese punctuation dropped: identical -> 1; disjoint -> 0
    "multifieldqa_zh": (["北京。", "上海"], [["北京"], ["北京"]], None, 50.0),
    "hotpotqa": (["the Eiffel Tower"], [["Eiffel Tower"]], None, 100.0),
    "2wikimqa": ([""], [["x"]], None, 0.0),
    # [1990, and, 1991] vs [1991]: P=1/3, R=1 -> 1/2
    "musique": (["1990 and 1991"], [["1991"]], None, 50.0),
    # identical: ROUGE-L f = 2/(2+1e-8), rounds to 100
    "dureader": (["今天天气很好"], [["今天天气很好"]], None, 100.0),
    # unique words {the,cat,sat,on,mat} vs {the,cat,is,on,mat}; LCS words {the,cat,on,mat}: P=R=4/5
    "gov_report": (["the cat sat on the mat"], [["the cat is on the mat"]], None, 80.0),
    # empty hypothesis -> rouge raises -> 0; identical -> 1
    "qmsum": (["", "Budget was approved."], [["Budget was approved."], ["Budget was approved."]], None, 50.0),
    "multi_news": (["A b. C d."], [["A b. C d."]], None, 100.0),
    "vcsum": ([""], [["会议讨论了预算"]], None, 0.0),
    # first line "Type: Human being" -> [Human, Human being] -> Human dropped -> 1;
    # quirk: [a, ab, abc] with gt "abc": "a" removed, "ab" skipped -> [ab, abc] -> 1/2
    "trec": (
        ["Type: Human being\nLocation", "abc"],
        [["Human being"], ["abc"]],
        ["Human", "Human being", "Location", "a", "ab", "abc"],
        75.0,
    ),
    # first line only: "Paris" -> 1 (the full text would give 2/3)
    "triviaqa": (["\nParis\nLondon"], [["Paris"]], None, 100.0),
    "samsum": (["Tom will come.\nDialogue: more"], [["Tom will come."]], None, 100.0),
    "lsht": (["体育\n财经"], [["体育"]], ["体育", "财经"], 100.0),
    # numbers [5, 5] -> 1; [3, 5] -> 1/2
    "passage_count": (["There are 5 unique paragraphs, 5", "3 or 5"], [["5"], ["5"]], None, 75.0),
    # [12] -> 1; [1, 12] -> 1/2; none -> 0
    "passage_retrieval_en": (["Paragraph 12", "Paragraph 1 and 12", "none"], [["Paragraph 12"]] * 3, None, 50.0),
    "passage_retrieval_zh": (["段落3"], [["段落3"]], None, 100.0),
    # first line without #, ` or // is "x = foo(1)" -> ratio 100; no qualifying line -> "" -> 0
    "lcc": (["\n# comment\nx = foo(1)\n", "```"], [["x = foo(1)"], ["x = foo(1)"]], None, 50.0),
    # one substitution in 12 chars: ratio = round(100 * 22/24) = 92
    "repobench-p": (["return a + b", "return a - b"], [["return a + b"], ["return a + b"]], None, 96.0),
}


def test_cases_cover_all_21_datasets():
    assert sorted(CASES) == sorted(lb.DATASETS) and len(lb.DATASETS) == 21


@pytest.mark.parametrize("dataset", lb.DATASETS)
def test_scorer_matches_official_values(dataset):
    preds, answers, classes, expected = CASES[dataset]
    assert lb.scorer(dataset, preds, answers, classes) == expected


def test_scorer_rounding_and_unknown_dataset():
    assert lb.scorer("qasper", ["yes", "no", "no"], [["yes"], ["yes"], ["yes"]], None) == 33.33
    with pytest.raises(ValueError, match="narrativeqa"):
        lb.scorer("nope", ["x"], [["x"]], None)


def test_scorer_e_buckets():
    preds = ["yes", "no", "yes", "yes"]
    answers = [["yes"]] * 4
    out = lb.scorer_e("qasper", preds, answers, [100, 3999, 4000, 9000], None)
    assert out == {"0-4k": 50.0, "4-8k": 100.0, "8k+": 100.0}
    assert math.isnan(lb.scorer_e("qasper", ["yes"], [["yes"]], [10], None)["8k+"])  # empty bucket: nan, as eval.py


def test_prompts_are_the_official_strings():
    assert "asconcisely" in lb.DATASET2PROMPT["narrativeqa"]  # the upstream typo is kept
    assert lb.DATASET2PROMPT["lcc"] == "Please complete the code given below. \n{context}Next line of code:\n"
    assert lb.DATASET2PROMPT["passage_count"].endswith("The final answer is: ")
    assert set(lb.DATASET2PROMPT) == set(lb.DATASETS) == set(lb.DATASET2MAXLEN)
    assert lb.DATASET2MAXLEN["gov_report"] == 512 and lb.DATASET2MAXLEN["hotpotqa"] == 32


def _record(context: str, inp: str = "Who?") -> dict:
    return {
        "input": inp,
        "context": context,
        "answers": ["A"],
        "length": len(context.split()),
        "all_classes": None,
        "_id": "x",
    }


def test_truncation_keeps_head_and_tail(eval_tokenizer):
    tok = eval_tokenizer
    ctx = " ".join(f"w{i}" for i in range(400))
    built = lb.build_prompt(tok, "qasper", _record(ctx), max_length=120, chat="none")
    ids = tok(lb.DATASET2PROMPT["qasper"].format(**_record(ctx)), truncation=False).input_ids
    assert built["truncated"] and built["tokens_before"] == len(ids) > 120
    assert built["prompt"] == tok.decode(ids[:60], skip_special_tokens=True) + tok.decode(
        ids[-60:], skip_special_tokens=True
    )
    assert built["prompt"].startswith("You are given a scientific article") and built["prompt"].endswith("Answer:")
    short = lb.build_prompt(tok, "qasper", _record("tiny"), max_length=5000, chat="none")
    assert not short["truncated"] and short["prompt"] == lb.DATASET2PROMPT["qasper"].format(**_record("tiny"))


def test_chat_template_exceptions(eval_tokenizer):
    import copy

    tok = copy.deepcopy(eval_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<s>[U]{{ m['content'] }}[/U]{% endfor %}{% if add_generation_prompt %}[A]{% endif %}"
    )
    qa = lb.build_prompt(tok, "hotpotqa", _record("ctx"), 5000)
    assert (
        qa["chat_applied"] and qa["prompt"].startswith("<s>[U]Answer the question") and qa["prompt"].endswith("[/U][A]")
    )
    assert qa["add_special_tokens"] is False  # the template writes BOS itself
    for ds in lb.NO_CHAT_TEMPLATE:
        rec = _record("ctx", "Type:")
        built = lb.build_prompt(tok, ds, rec, 5000)
        assert not built["chat_applied"] and built["prompt"] == lb.DATASET2PROMPT[ds].format(**rec)


def test_build_samples_fields(tmp_path, eval_tokenizer):
    path = tmp_path / "samsum.jsonl"
    path.write_text("\n".join(json.dumps(_record(f"ctx {i}", "Dialogue: hi\nSummary:")) for i in range(3)) + "\n")
    samples = lb.build_samples(eval_tokenizer, {"samsum": path}, [256, 512], num_samples=2)
    assert [s["id"] for s in samples] == ["samsum/256/0", "samsum/256/1", "samsum/512/0", "samsum/512/1"]
    s = samples[0]
    assert s["max_new_tokens"] == 128 and s["metric"] == "rouge_score" and s["outputs"] == ["A"]
    assert s["gen"] == {
        "stop_token_ids": [eval_tokenizer.encode("\n", add_special_tokens=False)[-1]],
        "min_new_tokens": 1,
    }


def test_missing_data_dir_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        lb.find_data_files(str(tmp_path / "nope"), ["qasper", "trec"])
    assert "qasper.jsonl" in str(e.value) and "trec.jsonl" in str(e.value)
    (tmp_path / "qasper.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="trec.jsonl"):
        lb.find_data_files(str(tmp_path), ["qasper", "trec"])
    with pytest.raises(FileNotFoundError, match="qasper_e.jsonl"):
        lb.find_data_files(str(tmp_path), ["qasper"], e=True)
    assert lb.find_data_files(str(tmp_path), ["qasper", "trec"], explicit=False) == {
        "qasper": tmp_path / "qasper.jsonl"
    }


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "trec.jsonl"
    good = json.dumps(_record("c"))
    path.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(JsonlError, match=r"trec\.jsonl:3: not valid JSON"):
        lb.load_task(path, "trec")
    path.write_text(good + "\n" + json.dumps({"input": "x"}) + "\n")
    with pytest.raises(JsonlError, match=r"trec\.jsonl:2: missing field"):
        lb.load_task(path, "trec")


def test_unknown_task_lists_valid():
    with pytest.raises(ValueError, match="narrativeqa"):
        lb.resolve_tasks(["qasper", "bogus"])
    assert lb.resolve_tasks(None, e=True) == list(lb.DATASETS_E)
