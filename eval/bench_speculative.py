"""``longctx bench --speculative``: TriForce vs autoregressive decoding vs transformers' assisted generation.

One long prompt (a RULER NIAH prompt for the bundled tiny models, sized to ``--context``),
greedy by default; every method generates from the same prompt and the table reports, per
method, decode milliseconds per token (prefill excluded), the speedup over autoregressive
decoding of the target, the acceptance rates, tokens per full-target verification,
full-target forwards per token, prefill seconds and whether the output equals the
target's own greedy output.

Methods:

- ``autoregressive`` — ``target.generate`` as transformers runs it (SDPA, DynamicCache);
- ``autoregressive-dense`` — the same under ``longctx.patch(target, "dense")``;
- ``assisted`` — ``target.generate(assistant_model=draft)`` (transformers' speculative decoding,
  the draft with a full cache);
- ``triforce[<middle>]`` — :func:`longctx.speculative.triforce_generate` with each middle backend.

Decode time per token: for the ``generate`` methods, the time between the first and the last
stopping-criteria call divided by the tokens added in between (so the prefill, and for
assisted generation its first round, are excluded); for TriForce, its decode time after the
first token (which the prefill gives) divided by the tokens after it.

Usage (options after ``--``, which keeps them away from ``longctx bench``'s own)::

    longctx bench --speculative -- --model tiny --draft tiny-draft --context 16384
    python -m longctx.eval.bench_speculative --random-models --context 4096   # without the bundled models
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from typing import Any, Optional, Sequence

import torch

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


def _generate(model, ids, max_new, eos, clock_prefill: bool = True, **kwargs) -> tuple[torch.Tensor, dict[str, Any]]:
    from transformers import StoppingCriteriaList

    clock = _Clock()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
                         stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
    total = time.perf_counter() - t0
    wall, cpu = clock.per_token()
    row = {"ms_per_token": wall, "cpu_ms_per_token": cpu, "prefill_s": clock.marks[0][0] - t0, "total_s": total,
           "new_tokens": out.shape[1] - ids.shape[1]}
    return out, row


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
    p.add_argument("--random-models", action="store_true", help="random models of the bundled shapes (no weights needed)")
    p.add_argument("--context", type=int, default=16384, help="prompt + generation length (RULER sizing rule)")
    p.add_argument("--task", default="niah_multivalue", help="RULER NIAH task of the prompt (longctx.tiny)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--middle", default=",".join(DEFAULT_MIDDLES),
                   help="comma-separated middle backends, each NAME[:KEY=VALUE...] (unregistered ones skipped)")
    p.add_argument("--opt", action="append", help="option for every variant of a middle backend, BACKEND:KEY=VALUE")
    p.add_argument("--gamma", type=int, default=None, help="tokens per full-target verification (TriForce default 6)")
    p.add_argument("--draft-gamma", type=int, default=None, help="draft tokens per middle verification (default 2)")
    p.add_argument("--draft-sinks", type=int, default=16)
    p.add_argument("--draft-window", type=int, default=240)
    p.add_argument("--skip", default="", help="comma-separated methods to skip: autoregressive-dense,assisted")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on a shared machine)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows and the setup to this file")
    return p


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run every method; returns ``(setup, rows)``."""
    import longctx
    from longctx.speculative import check_pair, triforce_generate

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
    setup = {"prompt_tokens": ids.shape[1], "context": args.context, "max_new_tokens": args.max_new_tokens,
             "task": "random" if args.random_models else args.task, "threads": args.threads,
             "machine": f"{platform.machine()} {torch.get_num_threads()} thread(s), torch {torch.__version__}",
             "model": "random" if args.random_models else args.model, "draft": "random" if args.random_models else args.draft}
    rows: list[dict[str, Any]] = []
    logger.info("prompt %d tokens", ids.shape[1])

    ref, row = _generate(target, ids, args.max_new_tokens, eos)
    rows.append({"method": "autoregressive", **row})
    gen = ref[0, ids.shape[1]:]
    if "autoregressive-dense" not in skip:
        with longctx.patch(target, "dense"):
            out, row = _generate(target, ids, args.max_new_tokens, eos)
        rows.append({"method": "autoregressive-dense", **row, "same_output": torch.equal(out, ref)})
    if "assisted" not in skip:
        out, row = _generate(target, ids, args.max_new_tokens, eos, assistant_model=draft)
        rows.append({"method": "assisted", **row, "same_output": torch.equal(out, ref)})
    tf_kwargs: dict[str, Any] = {"draft_cache": {"sinks": args.draft_sinks, "window": args.draft_window}}
    if args.gamma is not None:
        tf_kwargs["gamma"] = args.gamma
    if args.draft_gamma is not None:
        tf_kwargs["draft_gamma"] = args.draft_gamma
    for middle, opts in middles:
        t0 = time.perf_counter()
        out, st = triforce_generate(target, draft, ids, args.max_new_tokens, middle=middle, middle_options=opts or None,
                                    eos_token_id=eos, **tf_kwargs)
        total = time.perf_counter() - t0
        same = out.shape == ref.shape and torch.equal(out, ref)
        label = middle + "".join(f" {k}={v}" for k, v in opts.items())
        d = st.as_dict()
        rows.append({"method": f"triforce[{label}]", "ms_per_token": st.ms_per_token, "cpu_ms_per_token": st.cpu_ms_per_token,
                     "prefill_s": st.prefill_s, "total_s": total, "new_tokens": st.new_tokens, "same_output": same,
                     "acceptance_middle": st.acceptance_middle, "acceptance_top": st.acceptance_top,
                     "tokens_per_verification": st.mean_accepted_length,
                     "target_forwards_per_token": st.target_forwards_per_token,
                     "forwards_per_token": (d["draft_forwards_per_token"], d["middle_forwards_per_token"],
                                            st.target_forwards_per_token),
                     "options": opts, "stats": d})
    base, base_cpu = rows[0]["ms_per_token"], rows[0]["cpu_ms_per_token"]
    for r in rows:
        r["speedup"] = base / r["ms_per_token"] if r["ms_per_token"] > 0 else float("nan")
        r["cpu_speedup"] = base_cpu / r["cpu_ms_per_token"] if r["cpu_ms_per_token"] > 0 else float("nan")
    rows[0]["same_output"] = True
    setup["generated_tokens"] = int(gen.numel())
    return setup, rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """One markdown table: wall and CPU ms/token with speedups, acceptance per level, forwards per token, ..."""
    def f(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = ["| method | ms/token | speedup | CPU ms/token | CPU speedup | accept middle | accept top | tokens/verif "
             "| fwd/token draft/middle/target | prefill s | same output |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in rows:
        fwd = r.get("forwards_per_token")
        fwd_s = "-" if fwd is None else "/".join(f"{x:.2f}" for x in fwd)
        lines.append(
            f"| {r['method']} | {r['ms_per_token']:.2f} | {r['speedup']:.2f}x | {r['cpu_ms_per_token']:.2f} | "
            f"{r['cpu_speedup']:.2f}x | {f(r.get('acceptance_middle'), '.3f')} | {f(r.get('acceptance_top'), '.3f')} | "
            f"{f(r.get('tokens_per_verification'), '.2f')} | {fwd_s} | {r['prefill_s']:.1f} | "
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
    print(json.dumps(setup))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"setup": setup, "rows": rows}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
