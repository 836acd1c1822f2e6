"""Micro-benchmark of ``sparse_attention`` on one attention layer: torch reference, C++ and dense baselines.

Usage::

    python -m longctx.eval.bench_ops --context 131072 --topk 2048 --threads 2

Shapes default to one Llama-3.1-8B layer (H=32, Hkv=8, D=128), batch 1, fp32. For every
query length S (decode: 1) and every selection (``all`` = indices None, or K random keys
per KV head) it reports the median wall time of each implementation, warm-up excluded.
``dense-matmul`` is the fastest plain-torch dense decode (grouped matmul + softmax +
matmul over all T keys), the baseline a sparse method has to beat.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from longctx.ops import cpp_available, cpp_isa, sparse_attention_ref


def dense_grouped_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention over all T keys as grouped matmul + softmax + matmul. q: [B, H, S, D], k/v: [B, Hkv, T, D]."""
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, (H // Hkv) * S, D)  # [B, Hkv, G*S, D]
    probs = torch.softmax(torch.matmul(qg, k.transpose(-1, -2)) * D**-0.5, dim=-1)  # [B, Hkv, G*S, T]
    return torch.matmul(probs, v).reshape(B, H, S, D)


def time_ms(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, float]:
    """Median time in ms of every ``fns[name]()``, warm-up excluded.

    The functions run interleaved (one call of each per round), so that load from other
    processes on a shared machine hits all of them alike. ``clock="cpu"`` measures process
    CPU time (summed over threads: the work done, insensitive to time slicing on a busy
    machine; equal to latency only with one thread).
    """
    now = time.perf_counter if clock == "wall" else time.process_time
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = now()
            fn()
            times[name].append((now() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench(
    context: int,
    topk: list[int],
    query_lens: list[int],
    num_qo_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    repeats: int = 5,
    sdpa: bool = False,
    seed: int = 0,
    clock: str = "wall",
) -> list[dict]:
    """Time every implementation on every (S, selection) case; returns one row per case."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, num_kv_heads, context, head_dim, generator=gen)  # [B, Hkv, T, D]
    v = torch.randn(1, num_kv_heads, context, head_dim, generator=gen)
    rows = []
    for S in query_lens:
        q = torch.randn(1, num_qo_heads, S, head_dim, generator=gen)  # [B, H, S, D]
        for K in [0, *topk]:
            if K:  # K random distinct keys per KV head, sorted (as a top-k selection would be after sorting)
                idx = torch.stack([torch.randperm(context, generator=gen)[:K] for _ in range(num_kv_heads)])
                indices = idx.sort(-1).values.unsqueeze(0)  # [B, Hkv, K]
            else:
                indices = None
            fns: dict[str, Callable[[], object]] = {"ref": lambda: sparse_attention_ref(q, k, v, indices)}
            if cpp_available():
                from longctx.ops.cpp import sparse_attention_cpp

                fns["cpp"] = lambda: sparse_attention_cpp(q, k, v, indices, check=False)
            if indices is None:
                fns["dense-matmul"] = lambda: dense_grouped_matmul(q, k, v)
                if sdpa:
                    fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            row = {"S": S, "selection": K or "all", "T": context, **time_ms(fns, repeats, clock=clock)}
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["S", "selection", "T", "ref", "cpp", "dense-matmul", "sdpa"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=131072, help="T, keys per KV head")
    p.add_argument("--topk", type=str, default="2048", help="comma-separated K values for sparse selections")
    p.add_argument("--query-lens", type=str, default="1", help="comma-separated S values (1 = decode)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sdpa", action="store_true", help="also time F.scaled_dot_product_attention (slow on CPU)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: latency; cpu: process CPU time summed over threads (robust on a shared machine)")
    p.add_argument("--json", type=str, default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = bench(
        args.context,
        [int(x) for x in args.topk.split(",") if x],
        [int(x) for x in args.query_lens.split(",") if x],
        args.heads,
        args.kv_heads,
        args.head_dim,
        args.repeats,
        args.sdpa,
        clock=args.clock,
    )
    sys.stdout.write(f"sparse_attention, median {args.clock} ms over {args.repeats} runs, {args.threads} threads, "
                     f"fp32, H={args.heads} Hkv={args.kv_heads} D={args.head_dim} B=1, "
                     f"C++ kernel: {cpp_isa() or 'not built'}\n")
    sys.stdout.write(format_table(rows) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
