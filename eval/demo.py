"""``longctx demo``: the out-of-the-box job run by ``make demo``.

With the bundled tiny model and the RULER harness available, it runs the synthetic NIAH
tasks at the requested lengths with dense and every registered backend and prints the
comparison table (score, prefill, decode ms/token, memory per tier) and writes plots.
Otherwise it runs the patching check: greedy generation under every backend on a tiny
random Llama, compared token by token with the unpatched model.
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)


def patching_demo(max_new_tokens: int = 16, prompt_len: int = 256, seed: int = 0) -> list[dict[str, Any]]:
    """Generate with every registered backend on a tiny random Llama vs the unpatched model.

    Returns one row per backend: tokens that agree with the unpatched greedy output, time,
    and KV bytes per tier.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    import longctx

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 256, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    ref = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)[0, prompt_len:]
    rows = []
    for name in longctx.list_backends():
        if name.startswith("_"):
            continue
        with longctx.patch(model, name) as handle:
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)[0, prompt_len:]
            elapsed = time.perf_counter() - t0
            mem = handle.memory()
        agree = int((out == ref).long().cumprod(0).sum())
        rows.append({"backend": name, "agree": agree, "of": max_new_tokens, "seconds": elapsed, **mem})
    return rows


def format_patching_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["| backend | greedy tokens equal to unpatched | time s | device KB | host KB |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['agree']}/{r['of']} | {r['seconds']:.2f} | {r['device'] / 1024:.0f} | {r['host'] / 1024:.0f} |")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace, emit=logger.info) -> int:
    """Entry of ``longctx demo``; ``emit`` receives the report lines (the CLI passes ``print``)."""
    harness = _ruler_demo_available()
    if harness is not None and not args.patching_only:
        return harness(args, emit)
    emit("longctx demo: greedy generation on a tiny random Llama (256-token prompt), every backend at its defaults")
    emit("(backends whose budget covers the whole prompt fall back to dense and must agree exactly)")
    rows = patching_demo(max_new_tokens=args.max_new_tokens or 16)
    emit(format_patching_rows(rows))
    dense = next(r for r in rows if r["backend"] == "dense")
    if dense["agree"] != dense["of"]:
        emit("ERROR: dense backend disagrees with the unpatched model")
        return 1
    return 0


def _ruler_demo_available():
    """The RULER demo runner when the bundled model and the harness are installed, else ``None``."""
    try:
        from longctx.eval.ruler_demo import run_ruler_demo
        from longctx.hub import resolve_model_path  # noqa: F401
    except ImportError:
        return None
    return run_ruler_demo


def add_demo_subparser(sub) -> None:
    p = sub.add_parser("demo", help="the out-of-the-box demo (make demo)")
    p.add_argument("--lengths", default="4096,16384", help="RULER context lengths")
    p.add_argument("--samples", type=int, default=2,
                   help="samples per task and length (2 keeps a fresh 'make demo', set-up included, under 10 "
                        "minutes on 2 idle cores: 3 took 11.4; raise it for real scores)")
    p.add_argument("--output", default="runs/demo", help="results folder")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens generated per sample (default: 48 for RULER — a uuid answer fits —, 16 for the patching check)")
    p.add_argument("--patching-only", action="store_true", help="only the tiny random-model patching check")
    p.set_defaults(func=run_demo)
