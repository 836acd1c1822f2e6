"""``longctx eval ruler|longbench|niah|errors`` and ``python -m longctx.eval ruler|longbench|niah|errors``.

Examples
--------
Two backends on RULER's synthetic tasks at 4K and 8K, 25 samples each::

    longctx eval ruler --model PATH --backend dense --backend shadowkv --opt shadowkv.rank=160 \\
        --lengths 4096,8192 --samples 25 --output results

The same run sharded over two processes (rank 0 merges)::

    torchrun --nproc_per_node 2 -m longctx.eval ruler --model PATH --backend dense --lengths 4096 --output results

Backend options: ``--backend NAME:key=value,key=value`` for that entry, ``--opt NAME.key=value``
for every entry of that backend, ``--opt key=value`` for all entries (most specific wins).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from longctx.config import parse_backend_entry, parse_opts, split_options

from .runner import BackendRun, EvalSpec, run_eval

logger = logging.getLogger(__name__)


def parse_backends(backends: Optional[list[str]], opts: Optional[list[str]]) -> list[BackendRun]:
    """``--backend`` entries (``NAME`` or ``NAME:k=v,...``) combined with ``--opt`` items."""
    entries = []
    for item in backends or ["dense"]:
        entries.append(parse_backend_entry(item))
    common, targeted = split_options(parse_opts(opts), [n for n, _ in entries], what="--opt")
    return [BackendRun(n, {**common, **targeted.get(n, {}), **inline}) for n, inline in entries]


def _ints(text: Optional[str], what: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} requires comma-separated integers (got {text!r})") from None
    return vals


def _add_common(p: argparse.ArgumentParser, benchmark: str) -> None:
    p.add_argument("--model", required=True, help="model folder (from_pretrained) or a bundled model's short name")
    p.add_argument(
        "--backend", action="append", metavar="NAME[:k=v,...]", help="backend to evaluate (repeatable; default dense)"
    )
    p.add_argument("--opt", action="append", metavar="[NAME.]KEY=VALUE", help="backend option (repeatable)")
    lengths_help = {
        "ruler": "comma-separated total lengths in tokens (default 4096)",
        "longbench": "comma-separated truncation lengths, as model2maxlen (default: model context - 500)",
        "niah": "comma-separated context lengths in tokens (default 1024,2048,4096)",
    }[benchmark]
    p.add_argument("--lengths", default=None, help=lengths_help)
    if benchmark != "niah":
        p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    samples_help = {
        "ruler": "samples per task and length (default 500)",
        "longbench": "first N lines of each task file (default all)",
        "niah": "rounds per (length, depth) cell (default 1)",
    }[benchmark]
    p.add_argument("--samples", type=int, default=None, help=samples_help)
    p.add_argument("--output", default="results", help="results root folder (default ./results)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--chat-template",
        default="auto",
        help="auto (the model's own if any), model, none"
        + (", base, or a RULER template name" if benchmark == "ruler" else ""),
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the official generation lengths")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto: this process's GPU if any, else cpu")


def _add_benchmark_parsers(sub) -> None:
    r = sub.add_parser("ruler", help="RULER's 13 tasks (synthetic ones need no data)")
    _add_common(r, "ruler")
    r.add_argument(
        "--data-dir",
        default=None,
        help="folder with PaulGrahamEssays.json, squad.json, hotpotqa.json, english_words.json",
    )
    r.add_argument(
        "--essay", default=None, help="PaulGrahamEssays.json, a text file or a folder of .txt (essay NIAH tasks)"
    )
    r.add_argument("--squad", default=None, help="SQuAD v2 dev-v2.0.json (qa_1)")
    r.add_argument("--hotpotqa", default=None, help="hotpot_dev_distractor_v1.json (qa_2)")
    r.add_argument("--cwe-words", default=None, help="RULER's english_words.json (cwe beyond ~128K tokens)")
    r.set_defaults(func=run_from_args, benchmark="ruler")

    b = sub.add_parser("longbench", help="LongBench v1 (21 tasks) from local jsonl files")
    _add_common(b, "longbench")
    b.add_argument(
        "--data-dir", default=None, help="folder with the official {task}.jsonl (or data/{task}.jsonl) files"
    )
    b.add_argument(
        "--e",
        "--longbench-e",
        dest="longbench_e",
        action="store_true",
        help="LongBench-E: {task}_e.jsonl, length buckets",
    )
    b.set_defaults(func=run_from_args, benchmark="longbench")

    n = sub.add_parser("niah", help="needle in a haystack: depth x length grid and heatmap")
    _add_common(n, "niah")
    n.add_argument(
        "--haystack", default="noise", help="'noise' (RULER's noise text), a text/JSON file or a folder of .txt"
    )
    n.add_argument("--depths", default=None, help="comma-separated depth percents (default 0,10,...,100)")
    n.add_argument("--needle-style", default="number", choices=["number", "sandwich"])
    n.set_defaults(func=run_from_args, benchmark="niah")

    e = sub.add_parser("errors", help="why NIAH answers of a results folder are wrong (wrong needle or copy slip)")
    e.add_argument("results", help="the --output folder of a `longctx eval ruler` run")
    e.add_argument("--tasks", default=None, help="comma-separated tasks (default: every task with RULER needles)")
    e.set_defaults(func=errors_from_args, benchmark="errors")


def add_eval_subparser(subparsers) -> argparse.ArgumentParser:
    """Mount ``eval`` (with ``ruler``, ``longbench``, ``niah``, ``errors``) on the ``longctx`` command."""
    p = subparsers.add_parser("eval", help="RULER, LongBench and needle-in-a-haystack on patched models")
    sub = p.add_subparsers(dest="benchmark", required=True)
    _add_benchmark_parsers(sub)
    return p


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    depths = getattr(args, "depths", None)
    return EvalSpec(
        benchmark=args.benchmark,
        model=args.model,
        output=args.output,
        backends=parse_backends(args.backend, args.opt),
        lengths=_ints(args.lengths, "--lengths"),
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if getattr(args, "tasks", None) else None,
        samples=args.samples,
        seed=args.seed,
        data_dir=getattr(args, "data_dir", None),
        essay=getattr(args, "essay", None),
        squad=getattr(args, "squad", None),
        hotpotqa=getattr(args, "hotpotqa", None),
        cwe_words=getattr(args, "cwe_words", None),
        longbench_e=getattr(args, "longbench_e", False),
        haystack=getattr(args, "haystack", "noise"),
        depths=[float(d) for d in depths.split(",") if d.strip()] if depths else None,
        needle_style=getattr(args, "needle_style", "number"),
        chat_template=args.chat_template,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        device=args.device,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the evaluation and print the comparison table (rank 0 only)."""
    from . import results as res

    spec = spec_from_args(args)
    metrics = run_eval(spec)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(res.comparison_markdown(spec.bench_label, metrics))
        skipped = next(iter(metrics.values())).get("skipped") or []
        for reason in skipped:
            print(f"skipped: {reason}")
        print(f"results in {spec.output}")
    return 0


def errors_from_args(args: argparse.Namespace) -> int:
    """``longctx eval errors RESULTS``: the table of :func:`eval.niah_errors.error_breakdown`."""
    from .niah_errors import breakdown_table, error_breakdown

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    rows = error_breakdown(args.results, tasks)
    if not rows:
        raise ValueError(f"longctx eval errors found no NIAH predictions in {args.results!r}"
                         + (f" for --tasks {args.tasks!r}" if tasks else ""))
    print(breakdown_table(rows))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m longctx.eval ruler|longbench|niah|errors ...`` (also under torchrun / accelerate launch)."""
    parser = argparse.ArgumentParser(
        prog="python -m longctx.eval", description="RULER, LongBench and NIAH on patched models"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="info-level logging")
    sub = parser.add_subparsers(dest="benchmark", required=True)
    _add_benchmark_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"longctx eval {args.benchmark}: error: {exc}", file=sys.stderr)
        return 2
