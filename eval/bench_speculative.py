"""``longctx bench --speculative``: TriForce vs autoregressive decoding vs transformers' assisted generation.

One long prompt (a RULER NIAH prompt for the bundled tiny models, sized to ``--context``; by
default ``niah_multiquery``: four 7-digit values to answer, which the bundled target writes out in
full where it often stops after one of ``niah_multivalue``'s),
greedy by default; every method generates from the same prompt and the table reports, per
method, decode milliseconds per token (prefill excluded), the speedup over the fastest
autoregressive decoding of the target in the run (and over transformers' own ``generate``), the
acceptance rates, tokens per full-target verification, forwards per token and milliseconds per
forward of each level, prefill seconds and whether the output equals the target's own greedy
output. For TriForce rows it also reports the **ceiling**: the speedup TriForce would reach if its
draft and middle levels cost nothing (fastest autoregressive ms/token × tokens per full
verification / ms per full verification), i.e. what the full-cache verifications alone allow.

Methods:

- ``autoregressive`` — ``target.generate`` as transformers runs it (SDPA, DynamicCache);
- ``autoregressive-dense`` — the same under ``longctx.patch(target, "dense")``;
- ``autoregressive-loop`` — a plain greedy loop (one ``target(...)`` forward + argmax per token)
  over longctx's dense cache: no ``generate`` machinery, the way TriForce's levels call the model,
  so the fastest dense decoding on the device;
- ``assisted`` — ``target.generate(assistant_model=draft)`` (transformers' speculative decoding,
  the draft with a full cache);
- ``triforce[<middle>]`` — :func:`longctx.speculative.triforce_generate` with each middle backend.

Every method is prefilled once (TriForce's dense top level and draft cache are shared by
all its middle backends; each middle cache is built as ``triforce_generate`` builds it, by
one target forward over the prompt through a full cache, whose time is the row's prefill
with the draft's) and then decodes ``--repeats`` times, interleaved across methods
so that load from other processes hits all alike, restoring its caches to the prompt after
each round (rollback through the contract); the table reports the median. Decode time per
token: for the ``generate`` methods, the time between the first and the last
stopping-criteria call divided by the tokens added in between (the first round of assisted
generation, which prefills its draft, is excluded); for TriForce, its decode time after
the first token (which the prefill gives) divided by the tokens after it. Wall and process
CPU time are both reported: on a shared machine CPU time is the steadier of the two.

Usage (options after ``--``, which keeps them away from ``longctx bench``'s own)::

    longctx bench --speculative -- --model tiny --draft tiny-draft --context 16384
    python -m longctx.eval.bench_speculative --random-models --context 4096   # without the bundled models
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Any, Optional, Sequence

import torch

from longctx.compat import CACHE_KWARG

logger = logging.getLogger(__name__)

DEFAULT_MIDDLES = ("triforce_retrieval", "triforce_retrieval:retrieval_interval=1", "shadowkv", "retrieval", "hip")


class _Clock:
    """A stopping criterion that never stops; records (wall time, CPU time, length) at every call."""

    def __init__(self):
        self.marks: list[tuple[float, float, int]] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        self.marks.append((time.perf_counter(), time.process_time(), input_ids.shape[1]))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def per_token(self) -> tuple[float, float]:
        """(wall ms, CPU ms) per token between the first and the last call."""
        (t0, c0, n0), (t1, c1, n1) = self.marks[0], self.marks[-1]
        n = max(n1 - n0, 1)
        return 1000.0 * (t1 - t0) / n, 1000.0 * (c1 - c0) / n


def _generate(model, ids, max_new, eos, **kwargs) -> tuple[torch.Tensor, dict[str, Any]]:
    """Greedy ``model.generate`` timed per token between the first and last stopping-criteria calls."""
    from transformers import StoppingCriteriaList

    clock = _Clock()
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                         pad_token_id=eos if eos is not None else 0, stopping_criteria=StoppingCriteriaList([clock]),
                         **kwargs)
    wall, cpu = clock.per_token()
    decode_s = clock.marks[-1][0] - clock.marks[0][0]
    return out, {"ms_per_token": wall, "cpu_ms_per_token": cpu, "new_tokens": out.shape[1] - ids.shape[1],
                 "decode_s": decode_s}


def _random_pair(vocab: int = 1024):
    """Random models with the bundled tiny target / draft shapes (development without the trained weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(hidden, layers, heads, kv, inter):
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv, head_dim=32, rope_theta=1e8,
                           max_position_embeddings=65536, tie_word_embeddings=True, attn_implementation="sdpa")

    torch.manual_seed(0)
    target = LlamaForCausalLM(config(128, 4, 4, 2, 384)).eval()
    draft = LlamaForCausalLM(config(64, 2, 2, 1, 192)).eval()
    return target, draft


def _load(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from longctx.hub import resolve_model_path
    except ImportError:  # the bundled models are optional
        def resolve_model_path(x):
            return x
    path = resolve_model_path(name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


def _prompt(tokenizer, task: str, context: int, seed: int, max_new: int) -> torch.Tensor:
    """A RULER NIAH prompt of about ``context - max_new`` tokens (the sizing rule re-run until it fits)."""
    from longctx.tiny import sized_niah_samples

    want, asked = context - max_new, context
    best = None
    for _ in range(5):
        sample = sized_niah_samples(tokenizer, task, asked, 1, seed, tokens_to_generate=max_new)[0]
        ids = tokenizer(sample.prompt, return_tensors="pt").input_ids
        if ids.shape[1] <= want and (best is None or ids.shape[1] > best.shape[1]):
            best = ids
        if 0.97 * want <= ids.shape[1] <= want:
            break
        asked = max_new + int((asked - max_new) * want / ids.shape[1] * (0.99 if ids.shape[1] > want else 1.0))
    return best if best is not None else ids[:, -want:]


def _parse_middles(spec: str, items: Optional[Sequence[str]]) -> list[tuple[str, dict[str, str]]]:
    """Middle variants: ``"hip,triforce_retrieval:budget=1024:retrieval_interval=1"`` plus ``--opt BACKEND:KEY=VALUE``.

    Returns ``[(backend, options), ...]``; ``--opt`` options apply to every variant of that backend.
    """
    common: dict[str, dict[str, str]] = {}
    for item in items or []:
        if ":" not in item or "=" not in item:
            raise SystemExit(f"--opt requires BACKEND:KEY=VALUE (got {item!r})")
        backend, kv = item.split(":", 1)
        key, value = kv.split("=", 1)
        common.setdefault(backend, {})[key] = value
    out = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, *pairs = entry.split(":")
        opts = dict(common.get(name, {}))
        for pair in pairs:
            if "=" not in pair:
                raise SystemExit(f"--middle entries require NAME[:KEY=VALUE...] (got {entry!r})")
            key, value = pair.split("=", 1)
            opts[key] = value
        out.append((name, opts))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longctx bench --speculative", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="target model (path, hub id, or bundled short name)")
    p.add_argument("--draft", default="tiny-draft", help="draft model sharing the target's tokenizer")
    p.add_argument("--random-models", action="store_true",
                   help="random models of the bundled shapes (no weights needed)")
    p.add_argument("--context", type=int, default=16384, help="prompt + generation length (RULER sizing rule)")
    p.add_argument("--task", default="niah_multiquery",
                   help="RULER NIAH task of the prompt (longctx.tiny; default: a four-value answer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--middle", default=",".join(DEFAULT_MIDDLES),
                   help="comma-separated middle backends, each NAME[:KEY=VALUE...] (unregistered ones skipped)")
    p.add_argument("--opt", action="append", help="option for every variant of a middle backend, BACKEND:KEY=VALUE")
    p.add_argument("--gamma", type=int, default=None, help="tokens per full-target verification (TriForce default 6)")
    p.add_argument("--draft-gamma", type=int, default=None, help="draft tokens per middle verification (default 2)")
    p.add_argument("--draft-sinks", type=int, default=16)
    p.add_argument("--draft-window", type=int, default=240)
    p.add_argument("--skip", default="",
                   help="comma-separated methods to skip: autoregressive-dense,autoregressive-loop,assisted")
    p.add_argument("--repeats", type=int, default=3, help="interleaved decode rounds per method (median reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: stable on a shared machine)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows and the setup to this file")
    return p


class _Method:
    """One row of the table: a prefilled state and a ``round()`` that decodes from it and restores it."""

    def __init__(self, name: str, prefill_s: float, round_fn, extras: Optional[dict[str, Any]] = None):
        self.name, self.prefill_s, self.round_fn = name, prefill_s, round_fn
        self.extras = dict(extras or {})
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.last: dict[str, Any] = {}
        self.output: Optional[torch.Tensor] = None

    def round(self) -> None:
        out, row = self.round_fn()
        self.walls.append(row.pop("ms_per_token"))
        self.cpus.append(row.pop("cpu_ms_per_token"))
        self.last = row
        if self.output is None:
            self.output = out

    def row(self) -> dict[str, Any]:
        return {"method": self.name, "ms_per_token": statistics.median(self.walls),
                "cpu_ms_per_token": statistics.median(self.cpus), "ms_per_token_rounds": self.walls,
                "prefill_s": self.prefill_s, **self.extras, **self.last}


def _restore(cache, length: int) -> None:
    """Drop every token after the first ``length`` (DynamicCache or LongCtxCache)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def _prefill(model, ids, cache) -> float:
    """Fill ``cache`` with the prompt but its last token (each round feeds that token); returns seconds."""
    t0 = time.perf_counter()
    model(ids[:, :-1], use_cache=True, **{CACHE_KWARG: cache})
    return time.perf_counter() - t0


def _hf_method(name, model, ids, max_new, eos, patched: bool = False, prefilled: bool = True, **gen_kwargs) -> _Method:
    """``model.generate``, continuing from a cache prefilled with the prompt but its last token.

    ``prefilled=False`` prefills in every round (assisted generation: transformers 5.24 repeats
    a token when it restarts from a given cache).
    """
    import longctx
    from transformers import DynamicCache

    P = ids.shape[1]
    ctx = (lambda: longctx.patch(model, "dense")) if patched else contextlib.nullcontext
    cache, prefill = None, float("nan")
    if prefilled:
        with ctx() as handle:
            cache = handle.new_cache() if patched else DynamicCache(config=model.config)
            prefill = _prefill(model, ids, cache)

    def round_fn():
        t0 = time.perf_counter()
        with ctx():
            kwargs = dict(gen_kwargs) if cache is None else {CACHE_KWARG: cache, **gen_kwargs}
            out, row = _generate(model, ids, max_new, eos, **kwargs)
        if cache is not None:
            _restore(cache, P - 1)
        else:
            method.prefill_s = min(method.prefill_s, time.perf_counter() - t0 - row["decode_s"])
        return out, row

    method = _Method(name, prefill if prefilled else float("inf"), round_fn)
    return method


def _loop_method(model, ids, max_new, eos) -> _Method:
    """A plain greedy loop over longctx's dense cache, prefilled once with the prompt but its last token."""
    import longctx

    P = ids.shape[1]
    with longctx.patch(model, "dense") as handle:
        cache = handle.new_cache()
        prefill = _prefill(model, ids, cache)

    def round_fn():
        out = ids
        marks = []
        with longctx.patch(model, "dense"), torch.no_grad():
            token = ids[:, -1:]
            for i in range(max_new):
                logits = model(input_ids=token, position_ids=torch.tensor([[P - 1 + i]], device=ids.device),
                               use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache}).logits
                token = logits[:, -1].argmax(-1, keepdim=True)
                out = torch.cat([out, token], 1)
                marks.append((time.perf_counter(), time.process_time()))
                if eos is not None and int(token) == eos:
                    break
        _restore(cache, P - 1)
        n = max(len(marks) - 1, 1)  # tokens after the first, as the clock of the generate rows
        (w0, c0), (w1, c1) = marks[0], marks[-1]
        return out, {"ms_per_token": 1000.0 * (w1 - w0) / n, "cpu_ms_per_token": 1000.0 * (c1 - c0) / n,
                     "new_tokens": out.shape[1] - P, "decode_s": w1 - w0}

    return _Method("autoregressive-loop", prefill, round_fn)


def _triforce_methods(target, draft, ids, args, eos, middles) -> list[_Method]:
    """TriForce per middle backend; the top (dense) and draft caches are prefilled once and shared."""
    import longctx
    from longctx.speculative.triforce import (
        DraftLength, Level, Rules, TokenSequence, TriForceEngine, build_cache, trim_after_eos,
    )

    P, N = ids.shape[1], args.max_new_tokens
    gamma = args.gamma or 6
    room = N + 2 * gamma + 2
    eos_t = None if eos is None else torch.tensor([eos])

    def patched():
        stack = contextlib.ExitStack()
        stack.enter_context(longctx.patch(target, "dense"))
        stack.enter_context(longctx.patch(draft, "dense"))
        return stack

    with patched(), torch.no_grad():
        th, dh = target._longctx_handle, draft._longctx_handle
        seq0 = TokenSequence(ids, None, room)
        top = Level(target, build_cache(th, "dense"))
        first = top.feed(seq0, P, 1)[:, -1].argmax(-1)
        drf = Level(draft, build_cache(dh, "streaming", {"sinks": args.draft_sinks, "window": args.draft_window}))
        t0 = time.perf_counter()
        drf.feed(seq0, P, 1)
        draft_s = time.perf_counter() - t0
        draft_state = copy.deepcopy(drf.cache)
        levels = []
        for middle, opts in middles:
            # as triforce_generate prefills: one target forward over the prompt through a full cache
            # that also builds the middle cache (mirror_prefill); that full cache is a stand-in for
            # the shared `top` so that its time is this row's
            mid = Level(target, build_cache(th, middle, opts or None))
            t0 = time.perf_counter()
            Level(target, build_cache(th, "dense")).feed_prompt_with(mid, seq0, 1)
            levels.append((middle, opts, mid, time.perf_counter() - t0))

    def make_round(mid):
        def round_fn():
            with patched(), torch.no_grad():
                top.truncate(P)
                mid.truncate(P)
                drf.cache, drf.cached = copy.deepcopy(draft_state), P
                seq = TokenSequence(ids, None, room)
                seq.append(first)
                draft_len = DraftLength(args.draft_gamma, gamma)
                engine = TriForceEngine(drf, mid, top, Rules.from_options(), gamma, draft_len)
                out = trim_after_eos(engine.decode(seq, N, eos_t), P, eos_t, None)
            st = engine.stats
            st.committed = out.shape[1] - P - 1
            d = st.as_dict()
            return out, {"ms_per_token": st.ms_per_token, "cpu_ms_per_token": st.cpu_ms_per_token,
                         "new_tokens": out.shape[1] - P, "acceptance_middle": st.acceptance_middle,
                         "acceptance_top": st.acceptance_top, "tokens_per_verification": st.mean_accepted_length,
                         "target_forwards_per_token": st.target_forwards_per_token,
                         "forwards_per_token": (d["draft_forwards_per_token"], d["middle_forwards_per_token"],
                                                st.target_forwards_per_token),
                         "ms_per_forward": tuple(1000.0 * sec / max(n, 1) for sec, n in (
                             (st.draft_s, st.draft_forwards), (st.middle_s, st.middle_forwards),
                             (st.top_s, st.top_forwards))),
                         "stats": d}

        return round_fn

    methods = []
    for middle, opts, mid, mid_s in levels:
        label = middle + "".join(f" {k}={v}" for k, v in opts.items())
        methods.append(_Method(f"triforce[{label}]", draft_s + mid_s, make_round(mid),
                               {"options": opts, "prefill_s_target_with_middle": mid_s, "prefill_s_draft": draft_s}))
    return methods


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Prefill every method once, then decode in ``--repeats`` interleaved rounds; returns ``(setup, rows)``."""
    import longctx
    from longctx.speculative import check_pair

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.random_models:
        target, draft = _random_pair()
        target, draft = target.to(dtype), draft.to(dtype)
        ids = torch.randint(3, target.config.vocab_size, (1, args.context - args.max_new_tokens),
                            generator=torch.Generator().manual_seed(args.seed))
        eos = None
        check_pair(target, draft)
    else:
        target, tok = _load(args.model, dtype)
        draft, dtok = _load(args.draft, dtype)
        check_pair(target, draft, (tok, dtok))
        ids = _prompt(tok, args.task, args.context, args.seed, args.max_new_tokens)
        eos = None if args.ignore_eos else tok.eos_token_id
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    available = set(longctx.list_backends())
    middles = _parse_middles(args.middle, args.opt)
    missing = sorted({m for m, _ in middles if m not in available})
    if missing:
        logger.warning("middle backends not registered here, skipped: %s", missing)
    middles = [(m, o) for m, o in middles if m in available]
    logger.info("prompt %d tokens; prefilling", ids.shape[1])

    N = args.max_new_tokens
    methods = [_hf_method("autoregressive", target, ids, N, eos)]
    if "autoregressive-dense" not in skip:
        methods.append(_hf_method("autoregressive-dense", target, ids, N, eos, patched=True))
    if "autoregressive-loop" not in skip:
        methods.append(_loop_method(target, ids, N, eos))
    if "assisted" not in skip:
        methods.append(_hf_method("assisted", target, ids, N, eos, prefilled=False, assistant_model=draft))
    methods += _triforce_methods(target, draft, ids, args, eos, middles)
    for r in range(args.repeats):
        for m in methods:
            logger.info("round %d: %s", r, m.name)
            m.round()
    ref = methods[0].output
    rows = []
    for m in methods:
        row = m.row()
        row["same_output"] = m.output is not None and m.output.shape == ref.shape and torch.equal(m.output, ref)
        rows.append(row)
    # speedups against the fastest autoregressive decoding of the run (transformers' own or longctx dense)
    ar = [r for r in rows if r["method"].startswith("autoregressive")]
    base = min(r["ms_per_token"] for r in ar)
    base_cpu = min(r["cpu_ms_per_token"] for r in ar)
    for r in rows:
        r["speedup"] = base / r["ms_per_token"] if r["ms_per_token"] > 0 else float("nan")
        r["cpu_speedup"] = base_cpu / r["cpu_ms_per_token"] if r["cpu_ms_per_token"] > 0 else float("nan")
        r["speedup_vs_transformers"] = rows[0]["ms_per_token"] / r["ms_per_token"] if r["ms_per_token"] > 0 else float("nan")
        if r.get("ms_per_forward") and r["ms_per_forward"][2] > 0:  # TriForce: free draft and middle levels
            r["speedup_ceiling"] = base * r["tokens_per_verification"] / r["ms_per_forward"][2]
    setup = {"prompt_tokens": ids.shape[1], "context": args.context, "max_new_tokens": N,
             "generated_tokens": int(ref.shape[1] - ids.shape[1]), "repeats": args.repeats,
             "task": "random" if args.random_models else args.task, "threads": args.threads,
             "gamma": args.gamma or 6, "draft_gamma": args.draft_gamma or "adaptive",
             "draft_cache": {"sinks": args.draft_sinks, "window": args.draft_window},
             "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s), "
                        f"torch {torch.__version__}",
             "model": "random" if args.random_models else args.model,
             "draft": "random" if args.random_models else args.draft}
    return setup, rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """One markdown table: wall and CPU ms/token with speedups, acceptance per level, forwards per token, ..."""
    def f(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = ["| method | ms/token | speedup | vs transformers | CPU ms/token | CPU speedup | accept middle | accept top "
             "| tokens/verif | fwd/token draft/middle/target | ms/fwd draft/middle/target | ceiling | prefill s "
             "| same output |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"]

    def triple(values, fmt):
        return "-" if values is None else "/".join(format(x, fmt) for x in values)

    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ms_per_token']:.2f} | {r['speedup']:.2f}x | {r['speedup_vs_transformers']:.2f}x | "
            f"{r['cpu_ms_per_token']:.2f} | {r['cpu_speedup']:.2f}x | {f(r.get('acceptance_middle'), '.3f')} | "
            f"{f(r.get('acceptance_top'), '.3f')} | {f(r.get('tokens_per_verification'), '.2f')} | "
            f"{triple(r.get('forwards_per_token'), '.2f')} | {triple(r.get('ms_per_forward'), '.1f')} | "
            f"{f(r.get('speedup_ceiling'), '.2f')}{'x' if 'speedup_ceiling' in r else ''} | {r['prefill_s']:.1f} | "
            f"{'yes' if r.get('same_output') else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``longctx bench --speculative``; prints the setup and the table."""
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "--":  # `longctx bench --speculative -- --context 16384 ...`
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    setup, rows = run(args)
    sys.stdout.write(json.dumps(setup) + "\n" + format_table(rows) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"setup": setup, "rows": rows}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
