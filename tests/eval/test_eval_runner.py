"""End to end: a tiny random Llama, two backends, the results folder, resume, bad input, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.eval import cli, runner

RULER_ARGS = ["--tasks", "niah_single_1,fwe", "--lengths", "768", "--samples", "1", "--max-new-tokens", "3"]


def _ruler(model, out, *extra):
    return [
        "ruler",
        "--model",
        model,
        "--backend",
        "dense",
        "--backend",
        "dense:offload=true",
        *RULER_ARGS,
        "--output",
        str(out),
        *extra,
    ]


def test_two_backends_write_folder_table_and_resume(tiny_eval_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "res"
    assert cli.main(_ruler(tiny_eval_model, out)) == 0
    printed = capsys.readouterr().out
    assert "| task | length | dense | dense__offload=true |" in printed
    assert "| niah_single_1 | 768 |" in printed and "| **average** | 768 |" in printed
    assert "| dense__offload=true | 768 |" in printed  # cost rows

    model_name = Path(tiny_eval_model).name
    dense = out / f"ruler__{model_name}__dense"
    offl = out / f"ruler__{model_name}__dense__offload=true"
    for d in (dense, offl):
        assert sorted(p.name for p in d.iterdir()) == ["config.json", "metrics.json", "predictions.jsonl", "summary.md"]
        preds = [json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()]
        assert [p["id"] for p in preds] == ["niah_single_1/768/0", "fwe/768/0"]
        assert all(
            p["new_tokens"] <= 3 and p["prefill_s"] > 0 and set(p["memory"]) == {"device", "host"} for p in preds
        )
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["complete"] and set(metrics["scores"]) == {"niah_single_1", "fwe"}
        assert metrics["cost"]["768"]["samples"] == 2 and "wavg_inc" in metrics["ruler"]
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["seed"] == 42 and cfg["chat_template"]["name"] == "base" and cfg["eos_token_ids"] == [2]
        assert cfg["versions"]["torch"] and cfg["versions"]["transformers"] and "commit" in cfg["git"]
        assert cfg["truncation"]["rule"].startswith("none") and cfg["runtime"]["world_size"] == 1
        assert "## Scores" in (d / "summary.md").read_text()
    assert json.loads((offl / "config.json").read_text())["backend"]["config"] == {"offload": True}
    # the offloaded dense cache keeps its K/V on the host tier
    assert json.loads((offl / "metrics.json").read_text())["cost"]["768"]["peak_host_bytes"] > 0
    assert (out / f"comparison__ruler__{model_name}.md").exists() and (
        out / f"score_vs_length__ruler__{model_name}.png"
    ).exists()

    # an identical second run finishes from the saved results: no model is loaded
    monkeypatch.setattr(runner, "_load_model", lambda *a, **k: pytest.fail("model loaded on a complete rerun"))
    before = (dense / "predictions.jsonl").read_bytes()
    assert cli.main(_ruler(tiny_eval_model, out)) == 0
    assert "| niah_single_1 | 768 |" in capsys.readouterr().out
    assert (dense / "predictions.jsonl").read_bytes() == before


def test_interrupted_run_resumes_only_missing(tiny_eval_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "res"
    args = ["ruler", "--model", tiny_eval_model, *RULER_ARGS, "--output", str(out)]
    assert cli.main(args) == 0
    pred = out / f"ruler__{Path(tiny_eval_model).name}__dense" / "predictions.jsonl"
    first, second = pred.read_text().splitlines()
    pred.write_text(first + "\n" + second[: len(second) // 2])  # killed in the middle of the second append
    calls = []
    real = runner.generate_one
    monkeypatch.setattr(runner, "generate_one", lambda *a, **k: calls.append(a[2]["id"]) or real(*a, **k))
    assert cli.main(args) == 0
    assert calls == ["fwe/768/0"]
    lines = pred.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["niah_single_1/768/0", "fwe/768/0"] and lines[0] == first
    # the same folder with another seed is refused instead of mixing runs
    capsys.readouterr()
    assert cli.main(args + ["--seed", "7"]) == 2
    assert "different model (config or weights), backend config, dtype, seed" in capsys.readouterr().err


def test_changed_weights_under_the_same_name_are_not_reused(tiny_eval_model, tmp_path, capsys):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_eval_model, model_dir)
    out = tmp_path / "res"
    args = ["ruler", "--model", str(model_dir), *RULER_ARGS, "--output", str(out)]
    assert cli.main(args) == 0
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(model_dir)  # "retrained": same config, same folder, other weights
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "different model (config or weights)" in capsys.readouterr().err
    spec = runner.EvalSpec(benchmark="ruler", model=str(model_dir), output=str(out), lengths=[768],
                           tasks=["niah_single_1"], samples=1, replace_stale=True)
    pred = out / "ruler__m__dense" / "predictions.jsonl"
    before = pred.read_text()
    runner.run_eval(spec)  # the demo's way: the stale folder is redone
    after = [json.loads(x) for x in pred.read_text().splitlines()]
    assert [r["id"] for r in after] == ["niah_single_1/768/0"] and pred.read_text() != before


def test_longbench_and_niah_runs(tiny_eval_model, tmp_path):
    data = tmp_path / "lb"
    data.mkdir()
    rec = {
        "input": "Dialogue: A: hi\nSummary:",
        "context": "Dialogue: B: yo\nSummary: B greets.",
        "answers": ["A greets."],
        "length": 9,
        "all_classes": None,
        "_id": "s0",
    }
    (data / "samsum.jsonl").write_text(json.dumps(rec) + "\n")
    (data / "passage_count.jsonl").write_text(json.dumps({**rec, "answers": ["2"]}) + "\n")
    out = tmp_path / "res"
    spec = runner.EvalSpec(
        "longbench",
        tiny_eval_model,
        str(out),
        tasks=["samsum", "passage_count"],
        lengths=[64],
        data_dir=str(data),
        max_new_tokens=2,
    )
    m = runner.run_eval(spec)["dense"]
    assert set(m["scores"]) == {"samsum", "passage_count"} and "english_category_average" in m["longbench"]
    cfg = json.loads((out / f"longbench__{Path(tiny_eval_model).name}__dense" / "config.json").read_text())
    assert (
        cfg["truncation"] == {"rule": "head+tail", "max_length": [64]}
        and "samsum" in cfg["chat_template"]["not_applied_to"]
    )

    spec = runner.EvalSpec("niah", tiny_eval_model, str(out), lengths=[256], depths=[0.0, 100.0], max_new_tokens=2)
    m = runner.run_eval(spec)["dense"]
    assert set(m["scores"]) == {"depth_000", "depth_100"}
    assert (out / f"niah__{Path(tiny_eval_model).name}__dense" / "niah_heatmap.png").exists()


def test_bad_input_messages(tiny_eval_model, tmp_path, capsys):
    out = str(tmp_path / "res")
    assert cli.main(["ruler", "--model", tiny_eval_model, "--tasks", "niah_single_1,bogus", "--output", out]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "niah_multikey_3" in err and "qa_2" in err
    assert cli.main(["ruler", "--model", tiny_eval_model, "--backend", "nosuch", "--tasks", "vt", "--output", out]) == 2
    assert "nosuch" in (err := capsys.readouterr().err) and "dense" in err
    assert (
        cli.main(["ruler", "--model", tiny_eval_model, "--opt", "bogus_opt=1", "--tasks", "vt", "--output", out]) == 2
    )
    assert "valid options" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "longbench",
                "--model",
                tiny_eval_model,
                "--data-dir",
                str(tmp_path / "none"),
                "--tasks",
                "qasper,lcc",
                "--output",
                out,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "qasper.jsonl" in err and "lcc.jsonl" in err
    (tmp_path / "qasper.jsonl").write_text('{"input": "q"}\n')
    assert (
        cli.main(
            [
                "longbench",
                "--model",
                tiny_eval_model,
                "--data-dir",
                str(tmp_path),
                "--tasks",
                "qasper",
                "--lengths",
                "64",
                "--output",
                out,
            ]
        )
        == 2
    )
    assert "qasper.jsonl:1: missing field" in capsys.readouterr().err
    assert cli.main(["ruler", "--model", str(tmp_path / "nomodel"), "--output", out]) == 2
    assert "nomodel" in capsys.readouterr().err


def test_parse_backends_precedence():
    runs = cli.parse_backends(["dense", "dense:offload=true", "other"], ["offload=false", "other.k=1"])
    assert [(r.name, r.options) for r in runs] == [
        ("dense", {"offload": "false"}),
        ("dense", {"offload": "true"}),
        ("other", {"offload": "false", "k": "1"}),
    ]
    with pytest.raises(ValueError, match="not among"):
        cli.parse_backends(["dense"], ["x.k=1"])
    with pytest.raises(ValueError, match="--opt other.k given twice"):
        cli.parse_backends(["other"], ["other.k=1", "other.k=2"])
    with pytest.raises(ValueError, match="distinct"):
        runner.EvalSpec("ruler", "m", "o", backends=[runner.BackendRun("dense"), runner.BackendRun("dense")])


@pytest.mark.slow
def test_two_processes_shard_and_merge(tiny_eval_model, tmp_path):
    out = tmp_path / "res"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "longctx.eval",
        "ruler",
        "--model",
        tiny_eval_model,
        "--tasks",
        "niah_single_1",
        "--lengths",
        "512",
        "--samples",
        "3",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
        "--output",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| niah_single_1 | 512 |") == 1  # only rank 0 prints
    d = out / f"ruler__{Path(tiny_eval_model).name}__dense"
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "metrics.json", "predictions.jsonl", "summary.md"]
    ids = [json.loads(x)["id"] for x in (d / "predictions.jsonl").read_text().splitlines()]
    assert ids == [f"niah_single_1/512/{i}" for i in range(3)]
    assert json.loads((d / "config.json").read_text())["runtime"]["world_size"] == 2
    assert json.loads((d / "metrics.json").read_text())["complete"]


def test_cli_and_python_options_share_a_results_folder(tiny_eval_model, tmp_path):
    """The CLI hands options over as strings, Python as values: the same resolved config is one run."""
    kw = dict(benchmark="ruler", model=tiny_eval_model, output=str(tmp_path), tasks=["niah_single_1"], lengths=[768],
              samples=1, max_new_tokens=2)
    runner.run_eval(runner.EvalSpec(backends=[runner.BackendRun("dense", {"offload": True})], **kw))
    pred = next(tmp_path.glob("ruler__*__dense*/predictions.jsonl"))
    before = pred.read_text()
    runner.run_eval(runner.EvalSpec(backends=[runner.BackendRun("dense", {"offload": "true"})], **kw))  # no error
    assert pred.read_text() == before  # and nothing regenerated
    # a folder written before the fingerprint used the resolved config is still recognised
    config = json.loads((pred.parent / "config.json").read_text())
    record = dict(config, backend=dict(config["backend"], options={"offload": True}))
    config["fingerprint"] = runner._fingerprint(record, legacy=True)
    (pred.parent / "config.json").write_text(json.dumps(config))
    runner.run_eval(runner.EvalSpec(backends=[runner.BackendRun("dense", {"offload": True})], **kw))
    assert pred.read_text() == before


def test_stats_merge_over_layers_keeps_settings_sums_counters_averages_rates():
    per_layer = [[{"rank": 128, "keys": 10, "hit_rate": 0.5, "fallback": True, "decode_steps": 4}],
                 [{"rank": 128, "keys": 30, "hit_rate": 0.7, "fallback": False, "decode_steps": 4}]]
    got = runner._merge_stats(per_layer)
    assert got == {"rank": 128, "keys": 40, "hit_rate": pytest.approx(0.6), "fallback": 1, "decode_steps": 4}


def test_base_template_is_no_template_for_every_benchmark(tmp_path):
    spec = runner.EvalSpec(benchmark="niah", model="tiny", output=str(tmp_path), chat_template="base")
    assert spec.chat_template == "none"
