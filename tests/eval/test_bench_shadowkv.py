"""The ShadowKV bench script on a small layer: its table, its phase timer, and that it restores the layer."""
from __future__ import annotations

import json

import torch

from longctx.backends import shadowkv as skv_module
from longctx.eval import bench_shadowkv


def test_bench_reports_speed_memory_and_phases(capsys):
    attention = skv_module.sparse_attention
    threads = torch.get_num_threads()
    try:
        rc = bench_shadowkv.main(["--context", "4096", "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "64",
                                  "--sparse-budget", "256", "--rank", "32", "--repeats", "3", "--warmup", "1",
                                  "--threads", "1", "--phases"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    for regime in ("random", "walk"):
        assert set(result[f"decode_ms[{regime}]"]) == {"shadowkv", "dense", "dense-matmul"}
        assert all(v > 0 for v in result[f"decode_ms[{regime}]"].values())
        phases = result[f"phases_ms[{regime}]"]
        assert {"_append", "attention"} <= set(phases) and all(v >= 0 for v in phases.values())
    assert 0 < result["memory"]["device_fraction"] < 1
    assert result["stats"]["fallback_dense"] is False
    assert skv_module.sparse_attention is attention  # the timer put the module's function back
