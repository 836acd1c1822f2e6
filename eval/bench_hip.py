"""HiP vs dense on one attention layer: full causal prefill and decode steps, same run.

``python -m longctx.eval.bench_hip --contexts 8192,16384,32768,65536 --threads 2``

For every context length T it draws random ``q [1, H, T, D]``, ``k, v [1, Hkv, T, D]`` of a
Llama-3.1-8B layer (H=32, Hkv=8, D=128, fp32) and times, as medians of repeats:

- prefill: HiP (mask estimation over all T queries + block-sparse attention, through the
  backend layer) vs dense ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``;
- decode: a HiP step, averaged over whole refresh cycles (one mask re-estimation every
  ``refresh_interval`` steps, reuse in between; the refresh and reuse steps are also reported
  apart) vs the dense layer's step (grouped matmuls, the fast dense path on CPU; on 2 threads
  and on 1, the speedup uses the faster) and dense SDPA over the full cache.

Decode caches are built from the same K/V directly (no quadratic dense prefill is paid to
fill them). Prints a markdown table; ``--json`` also writes the rows.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from longctx.backends import LayerContext, make_layer
from longctx.backends.dense import DenseLayer, GrowingKV
from longctx.config import DenseConfig, HiPConfig

SHAPE = dict(num_heads=32, num_kv_heads=8, head_dim=128)  # Llama-3.1-8B


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(_timed(fn) for _ in range(repeats))


def _hip_layer(ctx: LayerContext, cfg: HiPConfig):
    return make_layer(cfg, ctx)


def bench_context(T: int, cfg: HiPConfig, repeats: int, dense_repeats: int, decode_cycles: int, seed: int) -> dict:
    """Times for one context length (seconds); see the module docstring."""
    H, Hkv, D = SHAPE["num_heads"], SHAPE["num_kv_heads"], SHAPE["head_dim"]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, T, D, generator=gen)
    k = torch.randn(1, Hkv, T, D, generator=gen)
    v = torch.randn(1, Hkv, T, D, generator=gen)
    # a layer past the dense ones: HiP is sparse here
    ctx = LayerContext(layer_idx=cfg.dense_layers, num_layers=32, **SHAPE)
    row: dict[str, Any] = {"context": T}

    # -- prefill
    def hip_prefill():
        _hip_layer(ctx, cfg).prefill(q, k, v, None)

    row["hip_prefill_s"] = _median(hip_prefill, repeats)
    gc.collect()
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    row["sdpa_prefill_s"] = _median(sdpa, dense_repeats)
    gc.collect()

    # -- decode: caches filled with the same K/V
    hip = _hip_layer(ctx, cfg)
    hip.kv, hip.prompt_len = GrowingKV(k, v, k.device, reserve=4096), T
    dense = DenseLayer(DenseConfig(), ctx)
    dense.kv, dense.prompt_len = GrowingKV(k, v, k.device, reserve=4096), T
    del q
    gc.collect()
    steps = cfg.refresh_interval * decode_cycles
    new = [
        (torch.randn(1, H, 1, D, generator=gen), torch.randn(1, Hkv, 1, D, generator=gen),
         torch.randn(1, Hkv, 1, D, generator=gen))
        for _ in range(steps + 1)
    ]
    hip.decode(*new[0], None)  # first step re-estimates: the timed steps start a cycle
    hip_steps = []
    for step in range(1, steps + 1):
        hip_steps.append(_timed(lambda: hip.decode(*new[step], None)))
    stats = hip.stats()
    cycles = [sum(hip_steps[c * cfg.refresh_interval : (c + 1) * cfg.refresh_interval]) / cfg.refresh_interval
              for c in range(decode_cycles)]
    row["hip_decode_s"] = statistics.median(cycles)
    refresh_at = [i for i in range(steps) if (i + 1) % cfg.refresh_interval == 0]  # step 8, 16, ... re-estimate
    row["hip_refresh_step_s"] = statistics.median(hip_steps[i] for i in refresh_at)
    row["hip_reuse_step_s"] = statistics.median(t for i, t in enumerate(hip_steps) if i not in refresh_at)
    row["hip_keys_per_step"] = stats["keys_attended_per_query"]
    row["hip_keys_scored_per_refresh"] = stats["keys_scored_per_block"]
    dense.decode(*new[0], None)
    decode_repeats = max(7, repeats)
    row["dense_decode_s"] = _median(lambda: dense.decode(*new[1], None), decode_repeats)
    # HiP decode calls run their kernels on one thread (too little work to wake a second one): also time
    # the dense step on one thread, which is faster than two on a loaded machine, for a conservative ratio
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    row["dense_decode_1t_s"] = _median(lambda: dense.decode(*new[1], None), decode_repeats)
    torch.set_num_threads(threads)
    kk, vv = dense.kv.keys(), dense.kv.values()
    q1 = new[1][0]
    row["sdpa_decode_s"] = _median(
        lambda: torch.nn.functional.scaled_dot_product_attention(q1, kk, vv, enable_gqa=True), decode_repeats
    )
    row["prefill_speedup_vs_sdpa"] = row["sdpa_prefill_s"] / row["hip_prefill_s"]
    row["decode_speedup_vs_dense"] = min(row["dense_decode_s"], row["dense_decode_1t_s"]) / row["hip_decode_s"]
    row["decode_speedup_vs_sdpa"] = row["sdpa_decode_s"] / row["hip_decode_s"]
    return row


def format_table(rows: list[dict]) -> str:
    head = (
        "| context | HiP prefill s | SDPA prefill s | prefill speedup | HiP decode ms/step (refresh / reuse) "
        "| dense decode ms (1 thread) | SDPA decode ms | decode speedup vs dense (vs SDPA) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['hip_prefill_s']:.2f} | {r['sdpa_prefill_s']:.2f} | "
            f"{r['prefill_speedup_vs_sdpa']:.1f}x | {1e3 * r['hip_decode_s']:.1f} "
            f"({1e3 * r['hip_refresh_step_s']:.1f} / {1e3 * r['hip_reuse_step_s']:.1f}) | "
            f"{1e3 * r['dense_decode_s']:.1f} ({1e3 * r['dense_decode_1t_s']:.1f}) | {1e3 * r['sdpa_decode_s']:.1f} | "
            f"{r['decode_speedup_vs_dense']:.1f}x ({r['decode_speedup_vs_sdpa']:.1f}x) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m longctx.eval.bench_hip", description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="8192,16384,32768,65536", help="comma-separated context lengths")
    p.add_argument("--repeats", type=int, default=3, help="HiP prefill repeats (median)")
    p.add_argument("--dense-repeats", type=int, default=1, help="dense SDPA prefill repeats (quadratic: slow)")
    p.add_argument("--decode-cycles", type=int, default=3, help="HiP refresh cycles timed at decode")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (and OpenMP threads of the kernels)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="HiPConfig option, repeatable")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    opts = dict(item.split("=", 1) for item in args.opt)
    cfg = HiPConfig.from_options(opts)
    rows = []
    for T in (int(x) for x in args.contexts.split(",")):
        rows.append(bench_context(T, cfg, args.repeats, args.dense_repeats, args.decode_cycles, args.seed))
        sys.stdout.write(format_table(rows[-1:]).splitlines()[-1] + "\n")
        sys.stdout.flush()
        gc.collect()
    sys.stdout.write(f"\nHiP {cfg}\ntorch {torch.__version__}, {args.threads} threads, fp32, batch 1, "
                     f"H={SHAPE['num_heads']} Hkv={SHAPE['num_kv_heads']} D={SHAPE['head_dim']}\n\n")
    sys.stdout.write(format_table(rows) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg.to_dict(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
