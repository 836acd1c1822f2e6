"""``longctx bench --speculative``: runs end to end on random models and prints one table."""
from __future__ import annotations

import json

import pytest

from longctx.cli import main


def test_bench_speculative_table(tmp_path, capsys):
    out = tmp_path / "spec.json"
    rc = main(["bench", "--speculative", "--", "--random-models", "--context", "200", "--max-new-tokens", "6",
               "--middle", "triforce_retrieval:budget=64,streaming:window=32,nope", "--gamma", "3",
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for method in ("| autoregressive |", "| autoregressive-loop |", "| assisted |", "triforce[triforce_retrieval budget=64]"):
        assert method in text
    rows = json.loads(out.read_text())["rows"]
    methods = [r["method"] for r in rows]
    assert methods[-2:] == ["triforce[triforce_retrieval budget=64]", "triforce[streaming window=32]"]
    assert all(r["same_output"] for r in rows)  # greedy: every method returns the target's own output
    assert all(r["ms_per_token"] > 0 and r["speedup"] > 0 for r in rows)
    for r in rows:  # ceiling = speedup with free draft and middle: fastest AR x tokens/verif / ms per verification
        assert ("speedup_ceiling" in r) == r["method"].startswith("triforce")
        if "speedup_ceiling" in r:
            top_ms = r["ms_per_forward"][2]
            assert r["speedup_ceiling"] == pytest.approx(min(x["ms_per_token"] for x in rows
                                                             if x["method"].startswith("autoregressive"))
                                                         * r["tokens_per_verification"] / top_ms)
