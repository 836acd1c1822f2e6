"""The ``longctx`` command: generate, bench, eval, diagnose, train-tiny, demo."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from typing import Optional

from longctx.config import parse_opts

logger = logging.getLogger("longctx")


def _load_model(path: str, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from longctx.hub import resolve_model_path
    except ImportError:  # the bundled models are optional
        def resolve_model_path(name):
            return name
    real = resolve_model_path(path)
    tok = AutoTokenizer.from_pretrained(real)
    model = AutoModelForCausalLM.from_pretrained(real, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tok


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import longctx

    if args.prompt_file is None and args.prompt is None:
        raise SystemExit("longctx generate requires --prompt-file FILE or --prompt TEXT")
    text = open(args.prompt_file).read() if args.prompt_file else args.prompt
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = _load_model(args.model, args.dtype, device)
    ids = tok(text, return_tensors="pt").input_ids.to(device)
    with longctx.patch(model, args.backend, **parse_opts(args.opt)) as handle:
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature if args.temperature > 0 else None,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        elapsed = time.perf_counter() - t0
        mem = handle.memory()
    new = out[0, ids.shape[1]:]
    print(tok.decode(new, skip_special_tokens=True))
    print(f"[{args.backend}] prompt {ids.shape[1]} tokens, {len(new)} new in {elapsed:.2f}s; "
          f"KV bytes device={mem['device']:,} host={mem['host']:,}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if getattr(args, "index_recall", False):
        from longctx.eval.bench_index import main as index_main

        return index_main(args.rest or []) or 0
    if getattr(args, "speculative", False):
        from longctx.eval.bench_speculative import main as spec_main

        return spec_main(args.rest or []) or 0
    from longctx.eval.bench import format_table, main_bench

    header, rows = main_bench(args)
    print(header)
    print(format_table(rows))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    import torch

    from longctx.diagnostics import compare_backends, format_report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = _load_model(args.model, args.dtype, device)
    text = open(args.prompt_file).read()
    ids = tok(text, return_tensors="pt").input_ids.to(device)
    report = compare_backends(model, ids, args.backend, options=parse_opts(args.opt), decode_steps=args.decode_steps,
                              top_k=args.top_k)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def run_train_tiny(rest: list[str]) -> int:
    """The training script with its own arguments (a ``--`` separator is dropped)."""
    from longctx.tiny import train_tiny_main

    return int(train_tiny_main([a for a in rest if a != "--"]) or 0)


def cmd_train_tiny(args: argparse.Namespace) -> int:
    return run_train_tiny(args.rest)


def _mount_optional(sub, module: str, attr: str) -> None:
    """Mount a subcommand that lives in an optional module (eval harness, training, demo)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # keep the rest of the CLI usable
        logger.debug("subcommand from %s unavailable: %s", module, exc)
        return
    getattr(mod, attr)(sub)


def build_parser() -> argparse.ArgumentParser:
    from longctx.eval.bench import add_bench_arguments

    p = argparse.ArgumentParser(prog="longctx", description="Long-context inference backends for Hugging Face models")
    p.add_argument("-v", "--verbose", action="store_true", help="info-level logging")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate with a patched model")
    g.add_argument("--model", required=True, help="HF model path, or a bundled short name ('tiny')")
    g.add_argument("--backend", default="dense")
    g.add_argument("--opt", action="append", help="backend option key=value (repeatable)")
    g.add_argument("--prompt-file", default=None)
    g.add_argument("--prompt", default=None)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--dtype", default="float32")
    g.add_argument("--device", default=None)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="per-backend prefill/decode cost and memory on one layer")
    add_bench_arguments(b)
    b.add_argument("--index-recall", action="store_true", help="ANNS recall vs keys scanned (RetrievalAttention)")
    b.add_argument("--speculative", action="store_true", help="TriForce vs autoregressive vs assisted generation")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to --index-recall / --speculative")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("diagnose", help="fidelity of backends vs dense on a model and prompt")
    d.add_argument("--model", required=True)
    d.add_argument("--backend", action="append", required=True, metavar="NAME[:k=v,...]",
                   help="backend to compare with dense (repeatable; the same one with other options too)")
    d.add_argument("--opt", action="append", metavar="[NAME.]KEY=VALUE",
                   help="option for every backend but dense, or for one (repeatable)")
    d.add_argument("--prompt-file", required=True)
    d.add_argument("--decode-steps", type=int, default=8)
    d.add_argument("--top-k", type=int, default=64, help="k for key recall")
    d.add_argument("--dtype", default="float32")
    d.add_argument("--device", default=None)
    d.add_argument("--json", default=None)
    d.set_defaults(func=cmd_diagnose)

    _mount_optional(sub, "longctx.eval.cli", "add_eval_subparser")
    t = sub.add_parser("train-tiny", help="train the bundled tiny target/draft models (see longctx/tiny/)",
                       add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the training script (--help for them)")
    t.set_defaults(func=cmd_train_tiny)
    _mount_optional(sub, "longctx.eval.demo", "add_demo_subparser")
    if "demo" in sub.choices:  # the demo reports through ``emit``; on the command line that is stdout
        from longctx.eval.demo import run_demo

        sub.choices["demo"].set_defaults(func=lambda a: run_demo(a, emit=print))
    return p


_BENCH_MODES = {"--speculative": "longctx.eval.bench_speculative", "--index-recall": "longctx.eval.bench_index"}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = next((a for a in argv[1:2] if a in _BENCH_MODES), None) if argv[:1] == ["bench"] else None
    if mode is not None:
        # `longctx bench --speculative ...` / `--index-recall ...`: the rest belongs to that bench's own parser
        rest = [a for a in argv[2:] if a != "--"]
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return int(importlib.import_module(_BENCH_MODES[mode]).main(rest) or 0)
    if argv[:1] == ["train-tiny"]:
        # every later argument belongs to the training script's own parser (argparse's REMAINDER
        # does not take a leading "--option")
        return run_train_tiny(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"longctx {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
