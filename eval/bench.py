"""``longctx bench``: per-backend cost on one attention layer of a named model shape.

For every (backend, context length) it builds one backend layer with random inputs,
times the prefill (cache build) and the decode step (median of repeats, warm-up
excluded), and reports KV bytes per tier and the backend's stats. Every registered
backend appears without changes here: the bench only talks to the backend contract.

Prefill by default uses the last 64 prompt queries (``--prefill-queries 64``): the cache
(SVD factors, indexes, landmarks) is built over all T keys, but no quadratic attention
over T queries is paid, which would not fit a CPU at 128K. ``--prefill-queries all`` runs
the full causal prefill.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import statistics
import time
from typing import Any, Optional

import torch

from longctx.backends import LayerContext, list_backends, make_layer
from longctx.config import parse_opts

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Shape:
    """Attention shape of one model layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 500000.0


SHAPES: dict[str, Shape] = {
    "llama-3.1-8b": Shape(32, 8, 128, 500000.0),
    "llama-3-8b": Shape(32, 8, 128, 500000.0),
    "llama-2-7b": Shape(32, 32, 128, 10000.0),
    "mistral-7b": Shape(32, 8, 128, 1000000.0),
    "qwen2.5-7b": Shape(28, 4, 128, 1000000.0),
    "qwen3-8b": Shape(32, 8, 128, 1000000.0),
    "tiny": Shape(4, 2, 32, 10000.0),
}


class StandardRope:
    """Llama-style RoPE at arbitrary positions (the bench has no model to borrow one from)."""

    def __init__(self, head_dim: int, theta: float):
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))

    def rotary_emb(self, x: torch.Tensor, positions: torch.Tensor):
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def bench_context(shape: Shape, layer_idx: int = 3, num_layers: int = 32) -> LayerContext:
    """A LayerContext for ``shape`` with a standard RoPE helper (middle layer by default)."""
    from longctx.models import RotaryHelper

    rope = StandardRope(shape.head_dim, shape.rope_theta)
    return LayerContext(
        layer_idx=layer_idx,
        num_layers=num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        rotary=RotaryHelper(rope.rotary_emb),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_inputs(shape: Shape, T: int, B: int, Sq: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Random post-RoPE q (last Sq queries), k, v with a few sink-like and planted keys, and positions."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = torch.randn(B, shape.num_kv_heads, T, shape.head_dim, generator=g)
    v = torch.randn(B, shape.num_kv_heads, T, shape.head_dim, generator=g)
    q = torch.randn(B, shape.num_heads, Sq, shape.head_dim, generator=g)
    positions = torch.arange(T).unsqueeze(0).expand(B, -1)
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), positions.to(device))


def _time_ms(fn, repeats: int, warmup: int, device: torch.device) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    # median = the typical step; mean includes periodic work (HiP mask refreshes, re-retrieval)
    return statistics.median(times), statistics.fmean(times)


def run_one(
    backend: str,
    options: dict[str, Any],
    shape: Shape,
    T: int,
    *,
    batch: int = 1,
    prefill_queries: Optional[int] = 64,
    repeats: int = 5,
    warmup: int = 1,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure one backend at one context length; returns a result row (a dict)."""
    device = device or torch.device("cpu")
    ctx = bench_context(shape)
    layer = make_layer(backend, ctx, **options)
    Sq = T if prefill_queries is None else min(prefill_queries, T)
    q, k, v, positions = random_inputs(shape, T, batch, Sq, dtype, device, seed)
    _sync(device)
    t0 = time.perf_counter()
    layer.prefill(q, k, v, positions)
    _sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    del q, k, v

    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    step = [T]

    def decode_once():
        q1 = torch.randn(batch, shape.num_heads, 1, shape.head_dim, generator=g).to(device, dtype)
        k1 = torch.randn(batch, shape.num_kv_heads, 1, shape.head_dim, generator=g).to(device, dtype)
        v1 = torch.randn(batch, shape.num_kv_heads, 1, shape.head_dim, generator=g).to(device, dtype)
        pos = torch.full((batch, 1), step[0], dtype=torch.long, device=device)
        layer.decode(q1, k1, v1, pos)
        step[0] += 1

    decode_ms, decode_mean_ms = _time_ms(decode_once, repeats, warmup, device)
    mem = layer.memory()
    dense_kv = 2 * batch * shape.num_kv_heads * T * shape.head_dim * torch.tensor([], dtype=dtype).element_size()
    row = {
        "backend": backend,
        "options": options,
        "context": T,
        "batch": batch,
        "prefill_queries": Sq,
        "prefill_ms": round(prefill_ms, 2),
        "decode_ms": round(decode_ms, 3),
        "decode_mean_ms": round(decode_mean_ms, 3),
        "device_bytes": int(mem.get("device", 0)),
        "host_bytes": int(mem.get("host", 0)),
        "dense_kv_bytes": dense_kv,
        "stats": _jsonable(layer.stats()),
    }
    del layer
    gc.collect()
    return row


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float):
        return round(obj, 4)
    return obj


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Add ``decode_speedup`` (median and mean) / ``device_frac`` vs dense at the same context.

    When dense was measured more than once (``--backend dense,x,dense`` brackets a run on a
    noisy machine), the fastest dense measurement is the baseline.
    """
    dense: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r["backend"] == "dense" and (r["context"] not in dense or r["decode_ms"] < dense[r["context"]]["decode_ms"]):
            dense[r["context"]] = r
    for r in rows:
        d = dense.get(r["context"])
        if d is not None:
            r["decode_speedup"] = round(d["decode_ms"] / max(r["decode_ms"], 1e-9), 2)
            r["decode_speedup_mean"] = round(d["decode_mean_ms"] / max(r["decode_mean_ms"], 1e-9), 2)
        r["device_frac"] = round(r["device_bytes"] / max(r["dense_kv_bytes"], 1), 3)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of bench rows."""
    head = ("| backend | context | prefill ms | decode ms/step (median) | speedup vs dense | decode ms/step (mean) | "
            "speedup (mean) | device MB | host MB | device / dense KV | stats |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        stats = r["stats"]
        brief = ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, (list, dict)))[:90] if isinstance(stats, dict) else ""
        lines.append(
            f"| {r['backend']} | {r['context']} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | "
            f"{r.get('decode_speedup', float('nan')):.2f}x | {r['decode_mean_ms']:.2f} | "
            f"{r.get('decode_speedup_mean', float('nan')):.2f}x | {r['device_bytes'] / 2**20:.1f} | "
            f"{r['host_bytes'] / 2**20:.1f} | {r['device_frac']:.3f} | {brief} |"
        )
    return "\n".join(lines)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``longctx bench``."""
    p.add_argument("--shape", default="llama-3.1-8b", help=f"layer shape, one of {sorted(SHAPES)}")
    p.add_argument("--context", default="8192,32768", help="comma-separated context lengths")
    p.add_argument("--backend", default="dense", help="comma-separated backends (default dense); 'all' = every registered one")
    p.add_argument("--opt", action="append", metavar="BACKEND.KEY=VALUE or KEY=VALUE",
                   help="backend option; prefix with 'name.' to target one backend (repeatable)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill-queries", default="64", help="queries used at prefill: an int or 'all'")
    p.add_argument("--repeats", type=int, default=5, help="decode steps timed (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="decode steps run before timing")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--seed", type=int, default=0)


def _split_options(items: Optional[list[str]], backends: list[str]) -> dict[str, dict[str, str]]:
    per = {b: {} for b in backends}
    for key, value in parse_opts(items).items():
        if "." in key and key.split(".", 1)[0] in per:
            name, field = key.split(".", 1)
            per[name][field] = value
        else:
            for name in backends:
                if name != "dense":
                    per[name][key] = value
    return per


def main_bench(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    """Run the bench described by parsed ``args``; returns ``(header, rows)`` (the CLI prints them)."""
    if args.shape not in SHAPES:
        raise ValueError(f"--shape requires one of {sorted(SHAPES)} (got {args.shape!r})")
    shape = SHAPES[args.shape]
    backends = list_backends() if args.backend == "all" else [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = [b for b in backends if b not in list_backends()]
    if unknown:
        raise ValueError(f"--backend requires names from {list_backends()} (got {unknown})")
    try:
        contexts = [int(c) for c in str(args.context).split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--context requires comma-separated ints (got {args.context!r})") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pq = None if str(args.prefill_queries) == "all" else int(args.prefill_queries)
    per_opts = _split_options(args.opt, backends)
    rows = []
    for T in contexts:
        for b in backends:
            logger.info("bench %s at %d tokens", b, T)
            rows.append(
                run_one(b, per_opts[b], shape, T, batch=args.batch, prefill_queries=pq, repeats=args.repeats,
                        warmup=args.warmup, dtype=getattr(torch, args.dtype), device=device, seed=args.seed)
            )
    add_speedups(rows)
    header = (f"shape {args.shape} (H={shape.num_heads}, Hkv={shape.num_kv_heads}, D={shape.head_dim}), "
              f"batch {args.batch}, {args.dtype}, device {device}, threads {torch.get_num_threads()}, "
              f"prefill queries {args.prefill_queries}, decode median of {args.repeats}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    return header, rows
