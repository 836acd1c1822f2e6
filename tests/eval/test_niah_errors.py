"""The NIAH error breakdown (eval/niah_errors.py): each category on handmade answers, and a results folder."""

from __future__ import annotations

import pytest

from longctx.eval import cli, runner
from longctx.eval.niah_errors import CATEGORIES, classify_answer, error_breakdown, needles

PROMPT = (
    "Some noise. One of the special magic numbers for voiceless-drudgery is: 1111111. More noise. "
    "One of the special magic numbers for voiceless-volunteer is: 2222222. "
    "One of the special magic numbers for vocal-tune is: 3333333. "
    "One of the special magic numbers for red-crane is: 4444444. "
    "One of the special magic numbers for voiceless-drudgery is: 5555555.\n"
    "What is the special magic number for voiceless-drudgery mentioned in the provided text?"
)


def test_needles_reads_every_needle_sentence():
    assert needles(PROMPT) == {"1111111": "voiceless-drudgery", "2222222": "voiceless-volunteer",
                               "3333333": "vocal-tune", "4444444": "red-crane", "5555555": "voiceless-drudgery"}


@pytest.mark.parametrize("pred, want", [
    (" 1111111.", "right"),
    (" 2222222.", "other_needle_same_word"),      # same adjective
    (" 3333333.", "other_needle_same_start"),     # same first two letters
    (" 4444444.", "other_needle"),
    (" 1111911.", "copy_slip"),                   # one digit off
    (" 9811111.", "copy_slip"),                   # same length, two of seven different
    (" 9876543.", "other"),
    (" I do not know.", "missing"),
    # a model that runs on into another question turn: only its first value is its answer ...
    (" 3333333.\nWhat is the special magic number for red-crane? 2222222.", "other_needle_same_start"),
    # ... but a reference anywhere is found, as RULER's string_match_all counts it
    (" 2222222.\nWhat is the special magic number for red-crane? 1111111.", "right"),
])
def test_classify_answer_one_reference(pred, want):
    assert classify_answer(PROMPT, pred, ["1111111"]) == [want]


def test_classify_answer_several_references():
    assert classify_answer(PROMPT, "1111111, 1111111.", ["1111111", "5555555"]) == ["right", "repeated"]
    assert classify_answer(PROMPT, "5555555 and 4444444", ["1111111", "5555555"]) == ["other_needle", "right"]
    assert classify_answer(PROMPT, "5555555", ["1111111", "5555555"]) == ["missing", "right"]
    with pytest.raises(ValueError, match="references as a list"):
        classify_answer(PROMPT, "1111111", "1111111")


def test_error_breakdown_counts_every_reference_of_a_results_folder(tiny_eval_model, tmp_path, capsys):
    out = tmp_path / "res"
    spec = runner.EvalSpec("ruler", tiny_eval_model, str(out), tasks=["niah_multikey_2", "niah_single_1"],
                           lengths=[512], samples=2, max_new_tokens=4)
    runner.run_eval(spec)
    rows = error_breakdown(out)
    assert {(r.task, r.length, r.samples) for r in rows} == {("niah_multikey_2", 512, 2), ("niah_single_1", 512, 2)}
    for r in rows:
        assert sum(r.counts.values()) == r.samples  # one reference per sample in these tasks and set(r.counts) <= set(CATEGORIES)
    assert [r.task for r in error_breakdown(out, ["niah_single_1"])] == ["niah_single_1"]
    assert cli.main(["errors", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| niah_multikey_2 | 512 | 2 |" in table and "other_needle_same_word" in table
    assert cli.main(["errors", str(tmp_path)]) == 2
    assert "requires a `longctx eval ruler` results folder" in capsys.readouterr().err
    assert cli.main(["errors", str(out), "--tasks", "niah_multiquery"]) == 2
    assert "found no NIAH predictions" in capsys.readouterr().err
