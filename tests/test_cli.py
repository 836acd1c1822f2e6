"""The longctx command: bench table/JSON, options routing and clear errors."""
from __future__ import annotations

import json

import pytest

from longctx.cli import main


def test_bench_prints_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--shape", "tiny", "--context", "256,512", "--backend", "dense", "--repeats", "2",
               "--warmup", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| dense | 256 |" in text and "| dense | 512 |" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["context"] for r in rows] == [256, 512]
    r = rows[1]
    assert r["dense_kv_bytes"] == 2 * 2 * 512 * 32 * 4  # K+V, Hkv=2, D=32, fp32
    assert r["device_bytes"] == 2 * 2 * (512 + 3) * 32 * 4  # + 3 decoded tokens
    assert r["decode_ms"] > 0 and r["decode_speedup"] == 1.0


def test_bench_all_backends_run(tmp_path, capsys):
    import longctx

    rc = main(["bench", "--shape", "tiny", "--context", "1024", "--backend", "all", "--repeats", "1",
               "--warmup", "0", "--json", str(tmp_path / "b.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == set(longctx.list_backends())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--shape", "gpt-9"], "--shape requires one of"),
        (["bench", "--shape", "tiny", "--backend", "nope"], "--backend requires names from"),
        (["bench", "--shape", "tiny", "--context", "abc"], "--context requires comma-separated ints"),
        (["bench", "--shape", "tiny", "--context", "64", "--opt", "dense.offload=maybe"], "requires a bool"),
        (["bench", "--shape", "tiny", "--context", "64", "--opt", "dense.nope=1"], "unknown option"),
        (["bench", "--shape", "tiny", "--context", "64", "--opt", "novalue"], "--opt requires key=value"),
        (["bench", "--shape", "tiny", "--context", "64", "--opt", "hip.k=64", "--opt", "hip.k=32"],
         "--opt hip.k given twice"),
    ],
)
def test_bench_bad_input(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for cmd in ("generate", "bench", "diagnose", "demo"):
        assert cmd in text


@pytest.mark.parametrize("argv", [["train-tiny", "--help"], ["train-tiny", "--", "--help"]])
def test_train_tiny_passes_its_options_to_the_script(argv, capsys):
    """`longctx train-tiny --threads 2 ...` as the README and model card write it: every option
    reaches the training script's parser (argparse's REMAINDER used to reject a leading option)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--threads" in text and "--keymatch" in text


def test_train_tiny_rejects_unknown_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train-tiny", "--no-such-option"])
    assert exc.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err
