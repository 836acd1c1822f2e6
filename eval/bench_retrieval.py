"""RetrievalAttention speed on one layer: decode step vs dense, index build time vs prefill.

One Llama-3.1-8B-shaped attention layer (H=32, Hkv=8, D=128, fp32, batch 1 by default) at
a long context. Keys and queries come from :func:`longctx.index.synthetic.ood_dataset`
(queries out of distribution with the keys, as in real heads; random values), so the index
does realistic work. The retrieval layer is filled with :meth:`RetrievalLayer.ingest` (the
prompt's K/V plus its training queries: the index build is timed on its own), the dense
layer with the same K/V; then both decode the same steps and the medians are compared.

The dense prefill of such a layer is not run at the full context (its attention is
quadratic: hours on a laptop CPU); it is timed at ``--prefill-context`` tokens and scaled by
the square of the context ratio, which is what the index build is compared with.

Run ``python -m longctx.eval.bench_retrieval --help``.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from longctx.backends import LayerContext, make_layer
from longctx.index import exact_topk, recall_at_k
from longctx.index.synthetic import ood_dataset
from longctx.ops import sparse_attention

logger = logging.getLogger(__name__)


def _median_ms(times: list[float]) -> float:
    return round(1e3 * statistics.median(times), 2)


def dense_prefill_ms(ctx: LayerContext, T: int, seed: int = 0) -> float:
    """Wall time of a dense causal prefill over ``T`` tokens (all T queries) of one layer."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, ctx.num_heads, T, ctx.head_dim, generator=g)
    k = torch.randn(1, ctx.num_kv_heads, T, ctx.head_dim, generator=g)
    v = torch.randn(1, ctx.num_kv_heads, T, ctx.head_dim, generator=g)
    layer = make_layer("dense", ctx)
    t0 = time.perf_counter()
    layer.prefill(q, k, v, None)
    return 1e3 * (time.perf_counter() - t0)


def run_decode_speed(
    context: int = 131072,
    *,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    batch: int = 1,
    options: Optional[dict[str, Any]] = None,
    repeats: int = 9,
    warmup: int = 2,
    prefill_context: int = 8192,
    thread_counts: Sequence[int] = (2, 1),
    seed: int = 0,
) -> dict[str, Any]:
    """Time a retrieval layer's decode step against dense attention over the same cache.

    Returns
    -------
    dict
        Per thread count (``threads``): ``dense_decode_ms`` (DenseLayer.decode), the dense
        attention alone on contiguous K/V with the torch reference (grouped matmuls) and the
        C++ kernel, ``retrieval_decode_ms``, ``speedup`` (vs the fastest dense number),
        ``search_ms`` / ``retrieved_attention_ms`` per step and ``keys_scanned``; then
        ``recall@top_k`` of the retrieved keys, ``index_build_s`` (and its kNN / graph parts),
        ``dense_prefill_attention_s_estimate``, the load average and the memory per tier.
    """
    options = {"top_k": 100, "index": "attention_aware", **(options or {})}
    load_start = os.getloadavg()[0]
    ctx = LayerContext(layer_idx=0, num_layers=1, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    n_steps = repeats + warmup
    thread_counts = list(thread_counts)
    t0 = time.perf_counter()
    n_train = int(options.get("max_train_queries", 4096))
    n_test = n_steps * batch * len(thread_counts)
    data = ood_dataset(num_heads, num_kv_heads, context, head_dim, n_train=n_train, n_test=n_test, seed=seed)
    k = torch.from_numpy(data.keys).unsqueeze(0).expand(batch, -1, -1, -1)  # [B, Hkv, T, D]
    g = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(batch, num_kv_heads, context, head_dim, generator=g)
    train = torch.from_numpy(data.train_queries).unsqueeze(0).expand(batch, -1, -1, -1)
    test = torch.from_numpy(data.test_queries).reshape(num_heads, -1, batch, head_dim)
    logger.info("data generated in %.1fs", time.perf_counter() - t0)

    # -- retrieval layer: store + index build, timed
    ret = make_layer("retrieval", ctx, **options)
    t0 = time.perf_counter()
    ret.ingest(k, v, train)
    ingest_s = time.perf_counter() - t0
    index0 = ret.indexes[0]
    logger.info("retrieval ingest %.1fs", ingest_s)

    # -- dense layer over the same cache (one prompt query: no quadratic prefill)
    dense = make_layer("dense", ctx)
    dense.prefill(train[:, :, -1:].contiguous(), k.contiguous(), v, None)
    del train
    gc.collect()

    # the dense attention alone, on contiguous K/V (grouped matmuls: torch reference and C++ kernel)
    k_c, v_c = k.contiguous(), v.contiguous()
    threads_before = torch.get_num_threads()
    per_threads: dict[int, dict[str, Any]] = {}
    recalls: list[float] = []
    step = 0
    for n_threads in thread_counts:
        torch.set_num_threads(n_threads)  # the index and the C++ kernels follow torch's setting
        times = {"dense": [], "dense_attn_ref": [], "dense_attn_cpp": [], "retrieval": []}
        search, attn, scanned = [], [], []
        for i in range(n_steps):
            q1 = test[:, step].permute(1, 0, 2).unsqueeze(2).contiguous()  # [B, H, 1, D]
            step += 1
            k1 = torch.randn(batch, num_kv_heads, 1, head_dim, generator=g)
            v1 = torch.randn(batch, num_kv_heads, 1, head_dim, generator=g)
            # one step of each contender per round, so load changes hit them alike
            t0 = time.perf_counter()
            dense.decode(q1, k1, v1, None)
            t1 = time.perf_counter()
            sparse_attention(q1, k_c, v_c, None, ctx.scale, impl="ref")
            t2 = time.perf_counter()
            sparse_attention(q1, k_c, v_c, None, ctx.scale, impl="cpp")
            t3 = time.perf_counter()
            ret.decode(q1, k1, v1, None)
            t4 = time.perf_counter()
            if i < warmup:
                continue
            for name, dt in (("dense", t1 - t0), ("dense_attn_ref", t2 - t1), ("dense_attn_cpp", t3 - t2),
                             ("retrieval", t4 - t3)):
                times[name].append(dt)
            st = ret.stats()
            search.append(st["search_s_last"])
            attn.append(st["retrieved_attention_s_last"])
            scanned.append(st["keys_scanned_last"])
            if not recalls:
                # recall of the retrieved keys against the exact top-k (one step; keys of sequence 0)
                res = index0.search(q1[0].numpy(), ret._keys_view(0), ret.config.top_k)
                truth = exact_topk(q1[0].numpy(), ret._keys_view(0), ret.config.top_k)
                recalls.append(recall_at_k(res.ids, truth))
                logger.info("recall@%d over %d offloaded keys: %.3f", ret.config.top_k, ret.n_offloaded, recalls[-1])
        med = {name: _median_ms(t) for name, t in times.items()}
        dense_best = min(med["dense"], med["dense_attn_ref"], med["dense_attn_cpp"])
        per_threads[n_threads] = {
            "dense_decode_ms": med["dense"],
            "dense_attention_ref_ms": med["dense_attn_ref"],
            "dense_attention_cpp_ms": med["dense_attn_cpp"],
            "retrieval_decode_ms": med["retrieval"],
            "speedup": round(dense_best / med["retrieval"], 2),
            "search_ms": _median_ms(search),
            "retrieved_attention_ms": _median_ms(attn),
            "keys_scanned": round(float(np.median(scanned)), 1),
        }
        logger.info("%d threads: %s", n_threads, per_threads[n_threads])
    # decode on until a block of tokens leaves the window: the cost of inserting it into the index
    torch.set_num_threads(thread_counts[0])
    before, inserted = ret.stats()["insert_s_total"], ret.n_offloaded
    for _ in range(ret.config.insert_block + ret.config.window):
        if ret.n_offloaded > inserted:
            break
        ret.decode(torch.randn(batch, num_heads, 1, head_dim, generator=g),
                   torch.randn(batch, num_kv_heads, 1, head_dim, generator=g),
                   torch.randn(batch, num_kv_heads, 1, head_dim, generator=g), None)
    insert_ms = 1e3 * (ret.stats()["insert_s_total"] - before)
    torch.set_num_threads(threads_before)
    prefill_ms = dense_prefill_ms(ctx, prefill_context)
    scale = (context / prefill_context) ** 2
    stats = ret.stats()
    row = {
        "context": context,
        "shape": f"H={num_heads} Hkv={num_kv_heads} D={head_dim} fp32 batch {batch}",
        "options": options,
        "repeats": repeats,
        "threads": per_threads,
        "scan_fraction": round(per_threads[thread_counts[0]]["keys_scanned"] / stats["n_offloaded"], 5),
        f"recall@{options['top_k']}": round(float(np.mean(recalls)), 4),
        "index_build_s": round(ret.build_seconds, 1),
        "knn_s": round(sum(getattr(i, "knn_seconds", 0.0) for i in ret.indexes), 1),
        "graph_s": round(sum(getattr(i, "graph_seconds", 0.0) for i in ret.indexes), 1),
        "ingest_s": round(ingest_s, 1),
        "insert_block_ms": round(insert_ms, 1),
        "insert_ms_per_step": round(insert_ms / ret.config.insert_block, 2),
        "train_queries_per_head": n_train,
        f"dense_prefill_s_at_{prefill_context}": round(prefill_ms / 1e3, 2),
        "dense_prefill_attention_s_estimate": round(prefill_ms * scale / 1e3, 1),
        "load_average_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "retrieval_memory": ret.memory(),
        "dense_memory": dense.memory(),
    }
    return row


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m longctx.eval.bench_retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--heads", default="32,8", help="query heads,KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="RetrievalConfig option (repeatable)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prefill-context", type=int, default=8192, help="context of the timed dense prefill")
    p.add_argument("--threads", default="2,1",
                   help="comma-separated thread counts timed in turn (the build uses the first)")
    p.add_argument("--json", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    thread_counts = [int(t) for t in args.threads.split(",") if t]
    torch.set_num_threads(thread_counts[0])
    H, Hkv = (int(x) for x in args.heads.split(","))
    opts = dict(item.split("=", 1) for item in args.opt or [])
    from longctx.config import RetrievalConfig

    options = RetrievalConfig.from_options(opts).to_dict()
    options = {key: options[key] for key in opts}
    row = run_decode_speed(args.context, num_heads=H, num_kv_heads=Hkv, head_dim=args.head_dim, batch=args.batch,
                           options=options, repeats=args.repeats, warmup=args.warmup,
                           prefill_context=args.prefill_context, thread_counts=thread_counts, seed=args.seed)
    sys.stdout.write(json.dumps(row, indent=1) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
