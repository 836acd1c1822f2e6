"""Needle in a haystack: grid, insertion depth, length rule, substring scoring and the heatmap."""

from __future__ import annotations

import pytest

from longctx.eval import niah as nh


def test_grid_depths_and_length_rule(eval_tokenizer, tmp_path):
    tok = eval_tokenizer
    hay = tmp_path / "essays"
    hay.mkdir()
    (hay / "a.txt").write_text("First essay sentence one. Sentence two is here. " * 40)
    (hay / "b.txt").write_text("Second essay talks about startups. It has sentences too. " * 40)
    samples = nh.build_samples(tok, [512, 1024], depths=[0, 50, 100], rounds=2, haystack=str(hay), max_new_tokens=16)
    assert len(samples) == 2 * 3 * 2
    assert [s["id"] for s in samples[:3]] == ["depth_000/512/0", "depth_000/512/1", "depth_050/512/0"]
    for s in samples:
        add = s["add_special_tokens"]
        n = len(tok(s["input"], add_special_tokens=add).input_ids)
        assert n == s["meta"]["tokens"] and n + 16 <= s["length"] and n > s["length"] - 16 - 40
        (answer,) = s["outputs"]
        needle = f"The special magic number is: {answer}."
        assert s["input"].count(needle) == 1
        assert s["input"].endswith("Keep your response short and direct. Answer: ")
        ctx = s["input"].split("(some of which might be irrelevant).\n", 1)[1].split("\n\nQuestion:")[0]
        pos = ctx.index(needle) / len(ctx)
        d = s["meta"]["depth"]
        if d == 0:
            assert ctx.lstrip().startswith(needle)
        elif d == 100:
            assert ctx.rstrip().endswith(needle)
        else:
            assert 0.3 < pos <= 0.5 and ctx[: ctx.index(needle)].rstrip().endswith(".")  # moved back to a sentence end
    # each cell's needle is fixed by (seed, length, depth, round)
    again = nh.build_samples(tok, [1024], depths=[50], rounds=1, haystack=str(hay), max_new_tokens=16)
    assert again[0]["outputs"] == [s for s in samples if s["id"] == "depth_050/1024/0"][0]["outputs"]


def test_noise_haystack_scoring_and_heatmap(eval_tokenizer, tmp_path):
    samples = nh.build_samples(eval_tokenizer, [600], depths=[25], haystack="noise", needle_style="sandwich")
    assert "The grass is green." in samples[0]["input"] and "Dolores Park" in samples[0]["input"]
    assert samples[0]["outputs"] == ["eat a sandwich and sit in Dolores Park"]
    assert nh.substring_score(" They EAT A SANDWICH and sit in Dolores Park.", samples[0]["outputs"]) == 1.0
    assert nh.score_cell(["1234567", "no", "x 1234567"], [["1234567"]] * 3) == 66.67
    out = nh.plot_heatmap(
        {"depth_000": {"1024": 100.0, "2048": 50.0}, "depth_100": {"1024": 0.0, "2048": 100.0}}, tmp_path / "h.png", "t"
    )
    assert out and (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs(eval_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="number"):
        nh.build_samples(eval_tokenizer, [1024], needle_style="nope")
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        nh.build_samples(eval_tokenizer, [1024], depths=[120])
    with pytest.raises(FileNotFoundError, match="noise"):
        nh.build_samples(eval_tokenizer, [1024], haystack=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="too short"):
        nh.build_samples(eval_tokenizer, [40])
