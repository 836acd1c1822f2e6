"""The RULER part of ``longctx demo``: synthetic NIAH on the bundled tiny target, every backend.

Runs through the ordinary harness (:func:`longctx.eval.runner.run_eval`), so its folder,
resume behaviour, comparison table and plots are the same as ``longctx eval ruler``.
Backend options are scaled to the tiny model (few layers, short contexts) so that every
sparse method really runs sparse at 4K–16K instead of falling back to dense; the table
and ``config.json`` record them.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# synthetic NIAH tasks; the essay ones use the shipped stand-in essay text when present
DEMO_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery")

# options that make each method sparse at demo lengths on a model with a handful of layers
DEMO_OPTIONS: dict[str, dict[str, Any]] = {
    "shadowkv": {"sparse_budget": 512},
    "retrieval": {"top_k": 100},
    "hip": {"dense_layers": 0, "k": 256},
}


def _essay_file() -> str | None:
    from longctx.eval.ruler import SYNTHETIC_ESSAYS

    return SYNTHETIC_ESSAYS if Path(SYNTHETIC_ESSAYS).exists() else None


def demo_backends() -> list[Any]:
    """Dense plus every registered backend (test-only names starting with ``_`` excluded)."""
    import longctx
    from longctx.eval.runner import BackendRun

    runs = []
    for name in longctx.list_backends():
        if name.startswith("_"):
            continue
        spec = longctx.get_backend(name)
        fields = set(spec.config_cls.field_names())
        opts = {k: v for k, v in DEMO_OPTIONS.get(name, {}).items() if k in fields}
        runs.append(BackendRun(name, opts))
    return runs


def run_ruler_demo(args: argparse.Namespace, emit=logger.info) -> int:
    """Run the demo; ``emit`` receives the header and comparison table (the CLI passes ``print``)."""
    from longctx.eval.results import comparison_markdown
    from longctx.eval.runner import EvalSpec, run_eval

    lengths = [int(x) for x in str(args.lengths).split(",") if x.strip()]
    essay = _essay_file()
    tasks = [t for t in DEMO_TASKS if essay or t not in ("niah_multivalue", "niah_multiquery")]
    spec = EvalSpec(
        benchmark="ruler",
        model="tiny",
        output=args.output,
        backends=demo_backends(),
        lengths=lengths,
        tasks=tasks,
        samples=args.samples,
        essay=essay,
        max_new_tokens=args.max_new_tokens or 48,
        dtype="float32",
        device="cpu",
        replace_stale=True,  # the demo owns its folder: results of another model (e.g. retrained weights) are redone
    )
    emit(f"longctx demo: RULER {', '.join(tasks)} at {lengths} tokens, {args.samples} samples each, "
          f"bundled tiny target, backends {[b.label for b in spec.backends]}")
    if essay:
        emit(f"(essay tasks use the shipped synthetic stand-in essay text {essay}, not Paul Graham's essays)")
    t0 = time.perf_counter()
    metrics = run_eval(spec)
    emit(comparison_markdown("ruler", metrics))
    emit(f"results and plots in {args.output}/ ({time.perf_counter() - t0:.0f} s)")
    return 0
