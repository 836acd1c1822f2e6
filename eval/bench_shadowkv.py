"""ShadowKV vs dense decode on one attention layer, plus the cost and accuracy of the key factorisation.

Usage::

    python -m longctx.eval.bench_shadowkv --context 131072 --repeats 7 --threads 2
    python -m longctx.eval.bench_shadowkv --context 32768 --factorisation-only

Shapes default to one Llama-3.1-8B layer (H=32, Hkv=8, D=128, RoPE base 500000), batch 1,
fp32. The prompt keys are structured like real ones: rank-64 pre-RoPE keys plus 10% noise,
rotated, with 4 sink tokens; values are Gaussian. The cache is built with
``ShadowKVLayer.compress`` (no quadratic prefill attention, which a CPU cannot afford at
128K) and the dense layer from the same K/V.

Decode steps of the three contenders run interleaved (one of each per round, median of
``--repeats``), so that load from other processes hits them alike:

- ``shadowkv``: :class:`~longctx.backends.shadowkv.ShadowKVLayer` ``.decode`` (defaults:
  budget 2048, rank 160, chunk 8, 48 outlier chunks, 32 local tokens, bf16 landmarks, factors in the
  keys' dtype);
- ``dense``: :class:`~longctx.backends.dense.DenseLayer` ``.decode`` (append + attention);
- ``dense-matmul``: grouped matmul + softmax + matmul over the contiguous prompt K/V, no
  append (the fastest plain-torch dense decode: a lower bound for dense).

Wall time is the headline (``decode_ms``); process CPU time (``decode_cpu_ms``) is also
reported, as it is less sensitive to other processes on a shared machine. ``--phases`` adds
the median wall time of each part of a ShadowKV step (``phases_ms``; C++ path).

Two query regimes: ``random`` draws every decode query afresh (nearly no chunk survives
from one step to the next: the worst case for ShadowKV's reuse), ``walk`` moves the query
a little each step (``q ← 0.95 q + 0.31 ε``, as consecutive decode queries do), so selected
chunks are reused. The hit rate of each regime is printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from typing import Any

import torch

from longctx.backends import LayerContext, make_layer
from longctx.backends.shadowkv import LlamaRopeEmb, key_basis
from longctx.eval.bench_ops import dense_grouped_matmul
from longctx.models import RotaryHelper

logger = logging.getLogger(__name__)


def structured_keys(T: int, Hkv: int, D: int, rotary: RotaryHelper, gen: torch.Generator, rank: int = 64):
    """Post-RoPE keys ``[1, Hkv, T, D]`` built from rank-``rank`` pre-RoPE keys + 10% noise, 4 sinks; positions."""
    basis = torch.randn(rank, Hkv * D, generator=gen) / rank**0.5
    pre = torch.empty(1, Hkv, T, D)
    block = 16384
    for s in range(0, T, block):  # blocks bound the temporaries
        e = min(T, s + block)
        x = torch.randn(e - s, rank, generator=gen) @ basis + 0.1 * torch.randn(e - s, Hkv * D, generator=gen)
        pre[0, :, s:e] = x.view(e - s, Hkv, D).transpose(0, 1)
    pos = torch.arange(T).unsqueeze(0)
    k = torch.empty_like(pre)
    for s in range(0, T, block):
        e = min(T, s + block)
        k[:, :, s:e] = rotary.apply(pre[:, :, s:e], pos[:, s:e])
    k[:, :, :4] *= 4.0  # attention sinks
    return k, pre, pos


def factorisation_table(pre: torch.Tensor, rank: int, methods: list[str]) -> list[dict[str, Any]]:
    """Time and relative Frobenius error of each ``svd_method`` on pre-RoPE keys ``[1, Hkv, T, D]``."""
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        _, err = key_basis(pre[0], rank, method)
        rows.append({"method": method, "seconds": round(time.perf_counter() - t0, 2), "rel_error": round(err, 6)})
    return rows


PHASES = ("_append", "_scores_cpp", "_select_cpp", "_fill_cpp")  # the decode step's parts on the C++ path


class PhaseTimer:
    """Wall time of a ShadowKV layer's decode phases, per step (``--phases``).

    Wraps the named methods of one layer instance (and the module's ``sparse_attention``, the
    attention over the held keys) with timers; :meth:`close` restores them. ``_select_cpp``
    includes ``_fill_cpp`` (the rebuild of the missed chunks runs inside the selection).
    """

    def __init__(self, layer):
        from longctx.backends import shadowkv as skv_module

        self.times: dict[str, list[float]] = {}
        self._layer, self._module = layer, skv_module
        self._attention = skv_module.sparse_attention
        for name in PHASES:
            setattr(layer, name, self._timed(name, getattr(layer, name)))
        skv_module.sparse_attention = self._timed("attention", self._attention)

    def _timed(self, name, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.times.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
            return out

        return timed

    def medians(self, skip: int) -> dict[str, float]:
        return {name: round(statistics.median(ts[skip:]), 3) for name, ts in self.times.items() if len(ts) > skip}

    def close(self) -> None:
        for name in PHASES:
            self._layer.__dict__.pop(name, None)
        self._module.sparse_attention = self._attention


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    H, Hkv, D, T = args.num_heads, args.num_kv_heads, args.head_dim, args.context
    gen = torch.Generator().manual_seed(args.seed)
    rotary = RotaryHelper(LlamaRopeEmb(D, args.rope_theta))
    ctx = LayerContext(layer_idx=3, num_layers=32, num_heads=H, num_kv_heads=Hkv, head_dim=D, rotary=rotary)
    k, pre, pos = structured_keys(T, Hkv, D, rotary, gen)
    result: dict[str, Any] = {
        "shape": {"H": H, "Hkv": Hkv, "D": D, "context": T, "batch": 1, "dtype": "float32"},
        "threads": torch.get_num_threads(),
    }
    if args.factorisation_only:
        result["factorisation"] = factorisation_table(pre, args.rank, ["gram", "svd", "lowrank"])
        return result
    del pre
    v = torch.randn(1, Hkv, T, D, generator=gen)
    opts = dict(sparse_budget=args.sparse_budget, rank=args.rank, svd_method=args.svd_method)
    for name in ("landmark_dtype", "factor_dtype"):  # given: that dtype ('keys' = None); else the config's
        value = getattr(args, name)
        if value is not None:
            opts[name] = None if value == "keys" else value
    sk = make_layer("shadowkv", ctx, **opts)
    t0 = time.perf_counter()
    sk.compress(k, v, pos)
    result["compress_s"] = round(time.perf_counter() - t0, 2)
    dense = make_layer("dense", ctx)
    dense.prefill(torch.randn(1, H, 1, D, generator=gen), k, v, pos)  # last prompt query only: builds the cache

    result["options"] = {**opts, "landmark_dtype": sk.config.landmark_dtype, "factor_dtype": sk.config.factor_dtype}
    for regime in args.queries:
        state = {"q": torch.randn(1, H, 1, D, generator=gen)}

        def next_query():
            if regime == "walk":
                state["q"] = 0.95 * state["q"] + 0.31 * torch.randn(1, H, 1, D, generator=gen)
            else:
                state["q"] = torch.randn(1, H, 1, D, generator=gen)

        timer = PhaseTimer(sk) if args.phases else None
        times: dict[str, list[float]] = {"shadowkv": [], "dense": [], "dense-matmul": []}
        cpu: dict[str, list[float]] = {name: [] for name in times}
        for step in range(args.warmup + args.repeats):
            next_query()
            qs = state["q"]
            kn, vn = torch.randn(1, Hkv, 1, D, generator=gen), torch.randn(1, Hkv, 1, D, generator=gen)
            p = torch.full((1, 1), sk.seq_length)
            calls = {
                "shadowkv": lambda: sk.decode(qs, kn, vn, p),
                "dense": lambda: dense.decode(qs, kn, vn, torch.full((1, 1), dense.seq_length)),
                "dense-matmul": lambda: dense_grouped_matmul(qs, k, v),
            }
            for name, fn in calls.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                if step >= args.warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    cpu[name].append((time.process_time() - c0) * 1e3)
        if timer is not None:
            timer.close()
            result[f"phases_ms[{regime}]"] = timer.medians(args.warmup)
            logger.info("%s queries, decode phases (median ms): %s", regime, result[f"phases_ms[{regime}]"])
        st = sk.stats()
        med = {name: round(statistics.median(ts), 2) for name, ts in times.items()}
        result[f"decode_ms[{regime}]"] = med
        cpu_med = {name: round(statistics.median(ts), 2) for name, ts in cpu.items()}
        result[f"decode_cpu_ms[{regime}]"] = cpu_med
        result[f"speedup[{regime}]"] = {
            "vs_dense_layer": round(med["dense"] / med["shadowkv"], 2),
            "vs_dense_matmul": round(med["dense-matmul"] / med["shadowkv"], 2),
            "cpu_time_vs_dense_layer": round(cpu_med["dense"] / cpu_med["shadowkv"], 2),
        }
        result[f"last_hit_rate[{regime}]"] = round(st["last_hit_rate"], 3)
        logger.info("%s queries: %s ms, hit rate %.3f", regime, med, st["last_hit_rate"])
    dense_kv = 2 * Hkv * T * D * 4  # the prompt's K/V in fp32
    mem = sk.memory()  # after decoding: includes the generated tokens and the offset-rotated SV
    result["memory"] = {
        "dense_kv_bytes": dense_kv,
        "shadowkv_device_bytes": mem["device"],
        "shadowkv_host_bytes": mem["host"],
        "device_fraction": round(mem["device"] / dense_kv, 4),
    }
    result["stats"] = {k_: v_ for k_, v_ in sk.stats().items() if k_ not in ("decode_steps",)}
    if args.factorisation_context:
        Tf = min(args.factorisation_context, T)
        _, pre_f, _ = structured_keys(Tf, Hkv, D, rotary, torch.Generator().manual_seed(args.seed))
        rows = factorisation_table(pre_f, args.rank, ["gram", "svd", "lowrank"])
        result["factorisation"] = {"context": Tf, "rows": rows}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rope-theta", type=float, default=500000.0)
    p.add_argument("--sparse-budget", type=int, default=2048)
    p.add_argument("--rank", type=int, default=160)
    p.add_argument("--svd-method", default="gram", choices=["gram", "svd", "lowrank"])
    dtypes = ["float32", "bfloat16", "float16", "keys"]
    p.add_argument("--landmark-dtype", default=None, choices=dtypes,
                   help="landmark storage (default: ShadowKVConfig's, bfloat16; 'keys': the keys' dtype)")
    p.add_argument("--factor-dtype", default=None, choices=dtypes,
                   help="U/SV storage (default: ShadowKVConfig's, the keys' dtype)")
    p.add_argument("--queries", default="random,walk", type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated query regimes: random, walk")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--factorisation-context", type=int, default=0,
                   help="also time gram/svd/lowrank on this many tokens (0: skip)")
    p.add_argument("--factorisation-only", action="store_true", help="only the factorisation table, at --context")
    p.add_argument("--phases", action="store_true",
                   help="also time the decode step's phases (scoring, selection + rebuild, rebuild, attention)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bad = [r for r in args.queries if r not in ("random", "walk")]
    if bad:
        p.error(f"--queries requires random and/or walk (got {bad})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    text = json.dumps(result, indent=1)
    sys.stdout.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
