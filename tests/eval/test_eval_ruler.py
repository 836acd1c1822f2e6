"""RULER: generated samples follow the official format and sizing rule on a small BPE tokenizer."""

from __future__ import annotations

import json
import re

import pytest

from longctx.eval import ruler as rl
from longctx.eval import ruler_synthetic as syn

NIAH_HEAD_SINGULAR = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n"
)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _n(tok, text: str) -> int:
    return len(tok.tokenize(text))


def _check_length_rule(tok, samples, L, min_fill=0.75):
    for s in samples:
        tokens = _n(tok, s["input"] + s["answer_prefix"]) + s["meta"]["tokens_to_generate"]
        assert tokens == s["meta"]["tokens"] <= L
        assert tokens > min_fill * L, f"{s['id']}: {tokens} tokens fill too little of {L}"


@pytest.fixture(scope="module")
def essay_file(tmp_path_factory):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    sents = [
        f"{words[i % 11].capitalize()} {words[(i * 7) % 11]} {words[(i * 3) % 11]} went home at {i}."
        for i in range(900)
    ]
    path = tmp_path_factory.mktemp("essay") / "PaulGrahamEssays.json"
    path.write_text(json.dumps({"text": "  ".join(sents)}))
    return str(path)


def test_niah_single_noise_format_and_length(eval_tokenizer):
    tok = eval_tokenizer
    L = 1024
    samples = rl.generate_task("niah_single_1", L, tok, 3)
    _check_length_rule(tok, samples, L)
    for i, s in enumerate(samples):
        assert s["id"] == f"niah_single_1/{L}/{i}" and s["max_new_tokens"] == 128 and s["metric"] == "string_match_all"
        (value,) = s["outputs"]
        assert re.fullmatch(r"\d{7}", value)
        key = re.search(
            r"What is the special magic number for (\S+) mentioned in the provided text\?$", s["input"]
        ).group(1)
        assert re.fullmatch(r"[^\s-]+(-[^\s-]+)*", key) and "-" in key  # adjective-noun word key
        assert s["input"].startswith(NIAH_HEAD_SINGULAR)
        assert s["answer_prefix"] == f" The special magic number for {key} mentioned in the provided text is"
        # the needle is a line of its own among the noise lines
        lines = s["input"][len(NIAH_HEAD_SINGULAR) :].split("\n")[:-1]
        needle = f"One of the special magic numbers for {key} is: {value}."
        assert lines.count(needle) == 1 and set(lines) == {NOISE, needle}
        assert s["meta"]["answer_char_index"] == s["input"].find(value)


def test_niah_needle_haystack_uuid_keys_at_4k(eval_tokenizer):
    tok = eval_tokenizer
    samples = rl.generate_task("niah_multikey_3", 4096, tok, 1)
    _check_length_rule(tok, samples, 4096)
    s = samples[0]
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid, s["outputs"][0])
    assert re.fullmatch(rf" The special magic uuid for {uuid} mentioned in the provided text is", s["answer_prefix"])
    lines = s["input"].split("\n")[2:-1]
    assert all(re.fullmatch(rf"One of the special magic uuids for {uuid} is: {uuid}\.", ln) for ln in lines)


def test_niah_essay_multikey_multivalue_multiquery(eval_tokenizer, essay_file):
    tok = eval_tokenizer
    src = rl.RulerSources(essay=essay_file)
    mk = rl.generate_task("niah_multikey_1", 4096, tok, 1, sources=src)[0]
    _check_length_rule(tok, [mk], 4096, min_fill=0.5)
    assert len(re.findall(r"One of the special magic numbers for \S+ is: \d{7}\.", mk["input"])) == 4
    assert mk["input"].startswith(NIAH_HEAD_SINGULAR)  # q*v == 1: singular wording
    mv = rl.generate_task("niah_multivalue", 4096, tok, 1, sources=src)[0]
    assert mv["input"].startswith("Some special magic numbers are hidden within the following text.")
    assert re.search(r"What are all the special magic numbers for \S+ mentioned in the provided text\?$", mv["input"])
    assert mv["answer_prefix"].endswith("mentioned in the provided text are") and len(mv["outputs"]) == 4
    mq = rl.generate_task("niah_multiquery", 4096, tok, 1, sources=src)[0]
    m = re.search(r"numbers for (\S+), (\S+), (\S+), and (\S+) mentioned in the provided text\?$", mq["input"])
    assert m and len(mq["outputs"]) == 4
    for key, value in zip(m.groups(), mq["outputs"]):
        assert f"One of the special magic numbers for {key} is: {value}." in mq["input"]


def test_vt_chain_and_icl_example(eval_tokenizer):
    tok = eval_tokenizer
    s = rl.generate_task("vt", 1024, tok, 1)[0]
    _check_length_rule(tok, [s], 1024)
    names = s["outputs"]
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = re.search(r"assigned the value (\d{5}), they are: $", s["answer_prefix"]).group(1)
    assert s["answer_prefix"] == (
        " Answer: According to the chain(s) of variable assignment in the text above, "
        f"5 variables are assigned the value {value}, they are: "
    )
    assert f"VAR {names[0]} = {value}" in s["input"]
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}" in s["input"]
    # one in-context example with 3-letter names comes first, answered, then the real task
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    assert s["input"].startswith(head) and s["input"].count(head) == 2
    example = s["input"][: s["input"].index(head, 1)]
    # RULER: example + " " + answers + "\n", then "\n" before the task (the prefix ends in a space)
    assert re.search(r"they are:  [A-Z]{3}( [A-Z]{3}){4}\n\n$", example)


def test_cwe_and_fwe_answers(eval_tokenizer):
    tok = eval_tokenizer
    c = rl.generate_task("cwe", 2048, tok, 1)[0]
    _check_length_rule(tok, [c], 2048, min_fill=0.6)
    assert c["answer_prefix"] == " Answer: The top 10 words that appear most often in the list are:"
    assert c["max_new_tokens"] == 120 and len(c["outputs"]) == 10
    main = c["input"].rsplit("Below is a numbered list of words.", 1)[1]
    listed = re.findall(r"\d+\. (\S+)", main.split("\nQuestion:")[0])
    for w in c["outputs"]:
        assert listed.count(w) == 6  # < 4096 tokens: common words 6 times, others once
    assert c["input"].count("Question: What are the 10 most common words in the above list?") == 2  # one example

    f = rl.generate_task("fwe", 1024, tok, 2)
    _check_length_rule(tok, f, 1024, min_fill=0.6)
    for s in f:
        words = s["input"].split("coded words. ", 1)[1].split("\nQuestion:")[0].split(" ")
        counts = {w: words.count(w) for w in set(words)}
        top = sorted((w for w in counts if w != "..."), key=lambda w: -counts[w])[:3]
        assert set(top) == set(s["outputs"]) and counts["..."] > max(counts[w] for w in top)


def test_qa_tasks_from_local_files(tmp_path, eval_tokenizer):
    tok = eval_tokenizer
    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": f"Paragraph {a}-{p} tells about topic {a * 10 + p} in some detail.",
                        "qas": [
                            {
                                "question": f"What is topic {a}-{p}?",
                                "answers": [{"text": f"topic {a * 10 + p}"}],
                                "is_impossible": p == 2,
                            }
                        ],
                    }
                    for p in range(3)
                ]
            }
            for a in range(40)
        ]
    }
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    hotpot = [
        {
            "question": f"Q{i}?",
            "answer": f"ans{i}",
            "context": [[f"T{i}-{j}", [f"Sentence {i} {j}. ", "More."]] for j in range(3)],
        }
        for i in range(30)
    ]
    (tmp_path / "hotpotqa.json").write_text(json.dumps(hotpot))
    src = rl.RulerSources.from_dir(str(tmp_path))
    q1 = rl.generate_task("qa_1", 1024, tok, 2, sources=src)
    _check_length_rule(tok, q1, 1024, min_fill=0.5)
    assert q1[0]["answer_prefix"] == " Answer:" and q1[0]["metric"] == "string_match_part"
    assert q1[0]["input"].endswith("Question: What is topic 0-0?") and q1[0]["outputs"] == ["topic 0"]
    assert q1[1]["input"].endswith("Question: What is topic 0-1?")  # questions in file order, impossible ones dropped
    assert "Document 1:\n" in q1[0]["input"] and "Paragraph 0-0 tells" in q1[0]["input"]
    q2 = rl.generate_task("qa_2", 1024, tok, 1, sources=src)[0]
    assert (
        q2["input"].endswith("Question: Q0?")
        and q2["outputs"] == ["ans0"]
        and "T0-2\nSentence 0 2. More." in q2["input"]
    )


def test_missing_sources_are_skipped_with_a_reason(eval_tokenizer):
    src = rl.RulerSources()
    assert rl.missing_reason("niah_single_1", src) is None
    assert "Paul Graham" in rl.missing_reason("niah_single_2", src)
    assert "SQuAD" in rl.missing_reason("qa_1", src) and "HotpotQA" in rl.missing_reason("qa_2", src)
    with pytest.raises(syn.MissingDataError, match=r"niah_single_3: skipped.*RulerSources\(essay=PATH\)"):
        rl.generate_task("niah_single_3", 1024, eval_tokenizer, 1)
    # the shipped stand-in runs the essay tasks offline
    stand_in = rl.generate_task("niah_single_2", 4096, eval_tokenizer, 1,
                               sources=rl.RulerSources(essay=rl.SYNTHETIC_ESSAYS))
    assert len(stand_in) == 1 and stand_in[0]["outputs"]
    with pytest.raises(ValueError, match="niah_single_1"):
        rl.generate_task("niah_bogus", 1024, eval_tokenizer, 1)


def test_seeded_and_prefix_stable(eval_tokenizer):
    a = rl.generate_task("niah_multikey_2", 1024, eval_tokenizer, 2)
    b = rl.generate_task("niah_multikey_2", 1024, eval_tokenizer, 3)
    assert a == b[:2]
    c = rl.generate_task("niah_multikey_2", 1024, eval_tokenizer, 2, seed=7)
    assert c[0]["input"] != a[0]["input"]


def test_model_chat_template_wraps_task_and_prefix_follows(eval_tokenizer):
    import copy

    tok = copy.deepcopy(eval_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<s>[U]{{ m['content'] }}[/U]{% endfor %}{% if add_generation_prompt %}[A]{% endif %}"
    )
    template, name = rl.chat_template_for(tok, "auto")
    assert name == "model" and template == "<s>[U]{task_template}[/U][A]"
    s = rl.generate_task("vt", 1024, tok, 1, model_template=template)[0]
    assert s["input"].endswith("in the text above.[/U][A]") and s["answer_prefix"].startswith(" Answer: According")
    assert s["input"].count("<s>[U]") == 1  # the in-context example goes after the template's prefix
    assert rl.chat_template_for(eval_tokenizer, "auto") == ("{task_template}", "base")
    assert rl.chat_template_for(eval_tokenizer, "meta-llama3")[0].startswith("<|begin_of_text|><|start_header_id|>user")
    with pytest.raises(ValueError, match="meta-chat"):
        rl.chat_template_for(eval_tokenizer, "nope")


def test_adj_noun_words_equal_sorted_set():
    nouns, adjs, _ = syn.wonderwords_lists()
    assert len(nouns) == 6782 and len(adjs) == 912
    a = list(adjs[:25]) + ["blue", "blue-eyed", "high", "high-pitched", "old", "old-fashioned", "old"]
    n = list(nouns[:200]) + ["x", "eyed-x", "fashioned-y", "y"]  # cross-cluster duplicates: blue-eyed-x twice
    ref = sorted(set(f"{adj}-{noun}" for adj in a for noun in n))
    words = syn.AdjNounWords(a, n)
    assert len(words) == len(ref) and [words[i] for i in range(len(ref))] == ref
    full = syn.niah_words()  # 910 distinct adjectives x 6782 nouns, less the strings two clusters share
    assert 6_100_000 < len(full) <= len(set(adjs)) * len(nouns)
    for i in (0, 1, 777_777, 3_000_000, len(full) - 2):
        assert full[i] < full[i + 1]
    assert full[-1] == full[len(full) - 1]


def test_string_match_metrics():
    preds = ["  ABC def\x01", "x"]
    refs = [["abc", "zzz"], ["x"]]
    assert rl.string_match_all(preds, refs) == 75.0
    assert rl.string_match_part(preds, refs) == 100.0
    assert rl.postprocess_pred(" a\x01b \n") == "a\nb"
    assert rl.score_task("qa_1", ["the answer is Paris"], [["paris", "lyon"]]) == 100.0
    assert rl.score_task("vt", ["AAA BBB"], [["AAA", "BBB", "CCC", "DDD"]]) == 50.0
    assert rl.weighted_average({4096: 90.0, 8192: 60.0}) == pytest.approx((90 + 2 * 60) / 3)
