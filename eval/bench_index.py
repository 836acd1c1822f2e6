"""``longctx bench --index-recall``: recall@k of each key index vs the fraction of keys scanned.

Reproduces RetrievalAttention's index comparison (arXiv 2409.10516, §2.4 and Fig. 3/6): for
out-of-distribution decode queries, how many keys must each index score to find the exact
top-k by inner product? Two sources of keys and queries:

- ``synthetic``: :func:`longctx.index.synthetic.ood_dataset`, queries offset far from the
  keys (the Mahalanobis ratio is reported) along directions where keys hardly vary;
- ``model``: post-RoPE Q/K captured from a forward pass of a real model over a RULER-style
  prompt: the bundled tiny target (``longctx/models_data/tiny-target``) when present,
  otherwise a small random Llama. Keys are the prompt tokens a retrieval layer offloads
  (after the sinks, before the last ``n_test`` tokens); training queries are the prompt's
  queries; test queries are those of the last ``n_test`` tokens (the "decode" queries).

Each index is built once and its search width swept (beam width / efSearch / nprobe); a row
per setting gives recall@k and the mean fraction of keys scored per query.

Run ``python -m longctx.eval.bench_index --help``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from longctx.index import (
    INDEX_TYPES,
    IndexParams,
    exact_topk,
    mahalanobis_ratio,
    make_index,
    recall_at_k,
    scan_fraction,
)

logger = logging.getLogger(__name__)

#: the search width swept per index type: (IndexParams field, values)
DEFAULT_SWEEPS: dict[str, tuple[str, list[int]]] = {
    "attention_aware": ("ef_search", [100, 128, 160, 200, 300, 400, 600, 1000]),
    "ivf": ("nprobe", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]),
    "hnsw": ("ef_search", [100, 200, 400, 800, 1600, 3200]),
    "flat": ("ef_search", [100]),
}


def synthetic_source(n_keys: int, num_heads: int, num_kv_heads: int, head_dim: int, n_train: int, n_test: int,
                     seed: int) -> dict[str, Any]:
    """Keys, training and test queries from :func:`~longctx.index.synthetic.ood_dataset`."""
    from longctx.index.synthetic import ood_dataset

    data = ood_dataset(num_heads, num_kv_heads, n_keys, head_dim, n_train=n_train, n_test=n_test,
                       content_dim=min(32, head_dim // 4), seed=seed)
    return {"name": "synthetic", "sets": [(data.keys, data.train_queries, data.test_queries)], "model": None}


def _capture_qk(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE ``(q [1, H, T, D], k [1, Hkv, T, D])`` of every layer, from one forward pass.

    Registers a recording attention function for this call only and restores the model's
    attention implementation afterwards.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, query, key, value, attention_mask, **kwargs):
        captured.append((query.detach().float().cpu(), key.detach().float().cpu()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("longctx_capture", record)
    previous = model.config._attn_implementation
    model.set_attn_implementation("longctx_capture")
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return captured


def model_source(context: int, n_train: int, n_test: int, n_sink: int, model_name: Optional[str], seed: int
                 ) -> dict[str, Any]:
    """Q/K of every layer of a real model over one RULER NIAH prompt of ``context`` tokens."""
    from longctx.hub import load_tiny, resolve_model_path

    name = model_name or "tiny"
    try:
        resolve_model_path(name)
        model, tokenizer = load_tiny(name)
        from longctx.tiny import sized_niah_samples

        budget = context
        for _ in range(3):  # the sizing rule estimates tokens per word; correct it until the prompt is long enough
            sample = sized_niah_samples(tokenizer, "niah_multikey_1", budget, 1, seed, tokens_to_generate=0)[0]
            ids = tokenizer(sample.prompt, return_tensors="pt")["input_ids"]
            if ids.shape[1] >= 0.95 * context:
                break
            budget = int(budget * context / ids.shape[1] * 1.02)
        ids = ids[:, -context:]
        label = f"model:{name}"
    except (FileNotFoundError, OSError) as err:
        logger.warning("bundled model %r unavailable (%s): using a small random Llama", name, err)
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
        model = LlamaForCausalLM(cfg).eval()
        ids = torch.randint(3, 512, (1, context), generator=torch.Generator().manual_seed(seed))
        label = "model:random-llama"
    T = ids.shape[1]
    t0 = time.perf_counter()
    layers = _capture_qk(model, ids)
    logger.info("captured Q/K of %d layers over %d tokens in %.1fs", len(layers), T, time.perf_counter() - t0)
    split = T - n_test
    sets = []
    for q, k in layers:
        keys = np.ascontiguousarray(k[0, :, n_sink:split].numpy())
        train = q[0, :, :split]
        if train.shape[1] > n_train:
            rows = torch.linspace(0, train.shape[1] - 1, n_train).round().long()
            train = train[:, rows]
        sets.append((keys, np.ascontiguousarray(train.numpy()), np.ascontiguousarray(q[0, :, split:].numpy())))
    return {"name": label, "sets": sets, "model": label, "context": T}


def sweep_index(kind: str, sets, k: int, values: Sequence[int], field: str, base: IndexParams) -> list[dict[str, Any]]:
    """Build ``kind`` on every (keys, train, test) set and sweep ``field`` over ``values``."""
    built, truths = [], []
    build_s = 0.0
    for keys, train, test in sets:
        H, Hkv, D = train.shape[0], keys.shape[0], keys.shape[2]
        index = make_index(kind, H, Hkv, D, IndexParams(**{**base.__dict__}))
        t0 = time.perf_counter()
        index.build(keys, train)
        build_s += time.perf_counter() - t0
        built.append(index)
        truths.append(exact_topk(test, keys, k))
    rows = []
    for value in values:
        recalls, fracs, scanned, secs, nq = [], [], [], 0.0, 0
        for index, truth, (keys, _, test) in zip(built, truths, sets):
            setattr(index.params, field, value)
            t0 = time.perf_counter()
            res = index.search(test, keys, k)
            secs += time.perf_counter() - t0
            nq += test.shape[0] * test.shape[1]
            recalls.append(recall_at_k(res.ids, truth))
            fracs.append(scan_fraction(res.scanned, keys.shape[1]))
            scanned.append(float(res.scanned.mean()))
        rows.append({
            "index": kind,
            "param": field if kind != "flat" else "-",
            "value": value if kind != "flat" else None,
            f"recall@{k}": round(float(np.mean(recalls)), 4),
            "scan_fraction": round(float(np.mean(fracs)), 5),
            "keys_scanned": round(float(np.mean(scanned)), 1),
            "build_s": round(build_s, 2),
            "search_ms_per_query": round(1e3 * secs / max(nq, 1), 3),
        })
    return rows


def run_index_recall(
    sources: Sequence[str] = ("synthetic", "model"),
    index_types: Sequence[str] = INDEX_TYPES,
    *,
    k: int = 100,
    n_keys: int = 131072,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 128,
    context: int = 32768,
    model: Optional[str] = None,
    n_train: int = 4096,
    n_test: int = 100,
    n_sink: int = 128,
    sweeps: Optional[dict[str, tuple[str, list[int]]]] = None,
    params: Optional[IndexParams] = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Recall@k vs fraction of keys scanned for each index type and search width.

    Parameters
    ----------
    sources : {"synthetic", "model"}
        Where keys and queries come from (see the module docstring).
    index_types : sequence of str
        Any of :data:`longctx.index.INDEX_TYPES`.
    k : int
        Top-k whose recall is measured (the paper's 100).
    n_keys, num_heads, num_kv_heads, head_dim : int
        Synthetic source: keys per KV head and the head layout.
    context : int
        Model source: prompt tokens.
    model : str, optional
        Model source: a bundled name or path; if not provided, the tiny target.
    n_train, n_test : int
        Training (prefill) queries per head used to build the index, and test queries.
    n_sink : int
        Model source: first tokens left out of the keys (they stay on the device).
    sweeps : dict, optional
        ``{index type: (IndexParams field, values)}``; defaults to :data:`DEFAULT_SWEEPS`.
    params : IndexParams, optional
        Base build/search parameters (``max_train_queries`` is raised to ``n_train``).

    Returns
    -------
    list of dict
        One row per (source, index, setting): ``source``, ``index``, ``param``, ``value``,
        ``recall@k``, ``scan_fraction``, ``keys_scanned``, ``n_keys``, ``build_s``,
        ``search_ms_per_query``, ``mahalanobis_ratio``.
    """
    unknown = [t for t in index_types if t not in INDEX_TYPES]
    if unknown:
        raise ValueError(f"index_types requires names from {list(INDEX_TYPES)} (got {unknown})")
    sweeps = {**DEFAULT_SWEEPS, **(sweeps or {})}
    base = params or IndexParams()
    base = IndexParams(**{**base.__dict__, "max_train_queries": max(base.max_train_queries, n_train)})
    rows: list[dict[str, Any]] = []
    for source in sources:
        if source == "synthetic":
            src = synthetic_source(n_keys, num_heads, num_kv_heads, head_dim, n_train, n_test, seed)
        elif source == "model":
            src = model_source(context, n_train, n_test, n_sink, model, seed)
        else:
            raise ValueError(f"sources requires 'synthetic' and/or 'model' (got {source!r})")
        keys0, _, test0 = src["sets"][0]
        ratio = float(np.mean([mahalanobis_ratio(test[0], keys[0]) for keys, _, test in src["sets"]]))
        n = int(keys0.shape[1])
        logger.info("%s: %d key sets of %d keys, Mahalanobis ratio %.1f", src["name"], len(src["sets"]), n, ratio)
        for kind in index_types:
            field, values = sweeps[kind]
            t0 = time.perf_counter()
            for row in sweep_index(kind, src["sets"], k, values, field, base):
                rows.append({"source": src["name"], "n_keys": n, "mahalanobis_ratio": round(ratio, 1), **row})
            logger.info("%s / %s done in %.1fs", src["name"], kind, time.perf_counter() - t0)
    return rows


def summarize(rows: list[dict[str, Any]], k: int = 100, targets: Sequence[float] = (0.9, 0.95)) -> list[dict[str, Any]]:
    """Per (source, index): the smallest scan fraction that reached each target recall (``None`` if none did)."""
    out = []
    key = f"recall@{k}"
    for source in dict.fromkeys(r["source"] for r in rows):
        for index in dict.fromkeys(r["index"] for r in rows if r["source"] == source):
            mine = [r for r in rows if r["source"] == source and r["index"] == index]
            entry = {"source": source, "index": index, "best_recall": max(r[key] for r in mine)}
            for t in targets:
                hits = [r["scan_fraction"] for r in mine if r[key] >= t]
                entry[f"scan@{t}"] = min(hits) if hits else None
            out.append(entry)
    return out


def format_rows(rows: list[dict[str, Any]], k: int = 100) -> str:
    """Markdown table of the sweep rows."""
    key = f"recall@{k}"
    lines = ["| source | index | setting | recall@%d | keys scanned | scan fraction | build s | search ms/query |" % k,
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = "-" if r["value"] is None else f"{r['param']}={r['value']}"
        lines.append(f"| {r['source']} | {r['index']} | {setting} | {r[key]:.3f} | {r['keys_scanned']:.0f} | "
                     f"{100 * r['scan_fraction']:.2f}% | {r['build_s']:.1f} | {r['search_ms_per_query']:.3f} |")
    return "\n".join(lines)


def format_summary(summary: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`summarize`."""
    targets = [c for c in summary[0] if c.startswith("scan@")] if summary else []
    cols = " | ".join(f"min scan for recall >= {t[5:]}" for t in targets)
    lines = [f"| source | index | best recall | {cols} |",
             "|---|---|---|" + "---|" * len(targets)]
    for s in summary:
        cells = ["never" if s[t] is None else f"{100 * s[t]:.2f}%" for t in targets]
        lines.append(f"| {s['source']} | {s['index']} | {s['best_recall']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="longctx bench --index-recall", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="synthetic,model", help="comma-separated: synthetic, model")
    p.add_argument("--index", default=",".join(INDEX_TYPES), help=f"comma-separated subset of {list(INDEX_TYPES)}")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--keys", type=int, default=131072, help="synthetic: keys per KV head")
    p.add_argument("--heads", default="2,1", help="synthetic: query heads,KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--context", type=int, default=32768, help="model: prompt tokens")
    p.add_argument("--model", default=None, help="model: bundled name or path (default: the tiny target)")
    p.add_argument("--train-queries", type=int, default=4096)
    p.add_argument("--test-queries", type=int, default=100)
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="IndexParams field (repeatable)")
    p.add_argument("--sweep", action="append", metavar="INDEX=V1,V2,...", help="override a sweep's values")
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads")
    p.add_argument("--json", default=None, help="also write rows and summary to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    H, Hkv = (int(x) for x in args.heads.split(","))
    opts = {}
    for item in args.opt or []:
        key, value = item.split("=", 1)
        if key not in IndexParams.__dataclass_fields__:
            fields = sorted(IndexParams.__dataclass_fields__)
            raise ValueError(f"--opt requires an IndexParams field {fields} (got {key!r})")
        is_bool = isinstance(getattr(IndexParams(), key), bool)
        opts[key] = value.lower() in ("1", "true", "yes") if is_bool else int(value)
    sweeps = {}
    for item in args.sweep or []:
        kind, values = item.split("=", 1)
        sweeps[kind] = (DEFAULT_SWEEPS[kind][0], [int(v) for v in values.split(",")])
    rows = run_index_recall(
        [s for s in args.source.split(",") if s], [t for t in args.index.split(",") if t], k=args.k, n_keys=args.keys,
        num_heads=H, num_kv_heads=Hkv, head_dim=args.head_dim, context=args.context, model=args.model,
        n_train=args.train_queries, n_test=args.test_queries, sweeps=sweeps, params=IndexParams(**opts), seed=args.seed,
    )
    summary = summarize(rows, args.k)
    for src in dict.fromkeys(r["source"] for r in rows):
        mine = [r for r in rows if r["source"] == src]
        head = f"{mine[0]['n_keys']} keys per head, Mahalanobis ratio (queries vs keys) {mine[0]['mahalanobis_ratio']}"
        sys.stdout.write(f"\n## {src}: {head}\n\n" + format_rows(mine, args.k) + "\n")
    sys.stdout.write("\n## summary\n\n" + format_summary(summary) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
