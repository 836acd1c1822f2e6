"""Tiny long-context Llama models (target + draft + tokenizer) trained on synthetic retrieval text.

The ``longctx train-tiny`` command line (``python -m longctx.tiny``): the first line above is its
``--help`` description. Builds or loads the tokenizer and models, trains them through the
curricula, saves them and runs a quick evaluation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from longctx.tiny.curriculum import (
    CONTINUATION, CURRICULUM, KEYMATCH, POLISH, RETRIEVAL, RETRIEVAL_ROLES, configure_stages, parse_mix,
)
from longctx.tiny.evaluation import evaluate
from longctx.tiny.model import (
    MODEL_CONFIGS, average_checkpoints, build_model, grow_embeddings, insert_identity_layer, save_model, set_rope,
    widen_model,
)
from longctx.tiny.paths import MODELS_DIR
from longctx.tiny.text import DONE_WHEN_TASKS, WORD_TOKEN_LISTS, load_essay_words
from longctx.tiny.tokenizer import add_word_tokens, build_tokenizer, group_digits, split_uuid_hex, splits_uuid_hex
from longctx.tiny.training import PrevTokenProbes, train

logger = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """``--device`` as a ``torch.device``, or a ValueError naming what is available.

    Parameters
    ----------
    spec : a torch device string: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    """
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device requires a torch device such as 'cpu' or 'cuda:0' (got {spec!r})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec!r} requires a CUDA GPU; torch sees none here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec!r} requires a GPU index below {torch.cuda.device_count()}")
    elif device.type != "cpu":
        raise ValueError(f"--device requires 'cpu' or a CUDA device (got {spec!r})")
    return device


def _parse(argv):
    p = argparse.ArgumentParser(prog="longctx train-tiny", description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=str(MODELS_DIR), help="writes <out-dir>/tiny-target and tiny-draft")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the tokenizer, the initial weights and the data streams (with --init-from: the data only)")
    p.add_argument("--device", default="cpu",
                   help="where to train and evaluate (a torch device: 'cpu', 'cuda', 'cuda:1'); checkpoints are "
                        "saved the same either way")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a shared 2-core machine 1 thread was ~7x faster than 2")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--models", default="target,draft",
                   help="which models to train ('target', 'draft' or both): they see the same seeded batches, "
                        "so training them in two processes gives the same weights as one")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count")
    p.add_argument("--stage-steps", default=None,
                   help="comma-separated step counts, one per stage of the one follow-up curriculum run "
                        "with --polish-only / --continuation-only / --keymatch-only / --retrieval-only "
                        "(replaces --steps-scale there), e.g. 1000,1000; one more count appends a stage at 4x "
                        "the last stage's lengths (e.g. 400,800,300: 4-16K tokens after 1-4K)")
    p.add_argument("--average", default=None, metavar="DIR,DIR[,...]",
                   help="no training: average the --models of these train-tiny output folders (uniform weights) "
                        "into --out-dir, then evaluate as --eval-only")
    p.add_argument("--autocast", action="store_true", help="train under bf16 autocast (default fp32)")
    p.add_argument("--log-file", default=None, help="also append the log to this file")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0 = per stage)")
    p.add_argument("--init-from", default=None,
                   help="continue from the checkpoint folders (tiny-target/, tiny-draft/) in this folder")
    p.add_argument("--continuation", action="store_true",
                   help="after the main curriculum, run the continuation curriculum (tried; scored lower)")
    p.add_argument("--polish", action=argparse.BooleanOptionalAction, default=True,
                   help="after the main curriculum, run the polish curriculum (default; the shipped weights)")
    p.add_argument("--polish-only", action="store_true",
                   help="run only the polish curriculum (with --init-from the end of the main one)")
    p.add_argument("--continuation-only", action="store_true",
                   help="run only the continuation curriculum (with --init-from the end of the main one)")
    p.add_argument("--keymatch", action="store_true",
                   help="after the polish, run the key-matching curriculum (first value digit weighted; "
                        "tried, not shipped: multikey stayed near chance, see the model card)")
    p.add_argument("--keymatch-only", action="store_true",
                   help="run only the key-matching curriculum (with --init-from the polished models)")
    p.add_argument("--retrieval", action="store_true",
                   help="after the polish, run the retrieval-supervision curriculum (longctx.tiny.retrieval)")
    p.add_argument("--retrieval-only", action="store_true",
                   help="run only the retrieval-supervision curriculum (with --init-from the polished models)")
    p.add_argument("--retrieval-weight", type=float, default=0.0,
                   help="weight of the retrieval supervision (longctx.tiny.retrieval) in every stage after the "
                        "copy warm-up, main curriculum and polish")
    p.add_argument("--retrieval-roles", choices=RETRIEVAL_ROLES, default="full",
                   help="parts of the retrieval supervision: 'basic' (copying + gathering heads), 'full' (also "
                        "a matching head for a value's first token, the key probe and the contrastive loss) or "
                        "'two_gather' ('full' with a second gathering head on the key's second part)")
    p.add_argument("--mix", default=None, metavar="TASK:W,...",
                   help="task mixture of the follow-up curriculum (--*-only runs), e.g. "
                        "niah_multikey_2:3,niah_multivalue:1 (replaces the curriculum's own)")
    p.add_argument("--hard-keys", type=float, default=None, metavar="P",
                   help="in every stage, the chance that a distractor needle's word key is a near miss of the "
                        "asked key (same adjective, or same first letters); e.g. 0.5")
    p.add_argument("--pose-prob", type=float, default=None, metavar="P",
                   help="in every stage but the copy warm-up, the share of sequences whose position ids skip "
                        "ahead once (PoSE), so that distances up to --pose-max-position are seen at short lengths")
    p.add_argument("--pose-max-position", type=int, default=32768, metavar="N",
                   help="the largest position id a PoSE skip reaches (default 32768)")
    p.add_argument("--insert-layer", type=int, default=None, metavar="AT",
                   help="with --init-from: grow each model by one decoder layer at index AT that starts as the "
                        "identity (longctx.tiny.insert_identity_layer), then train")
    p.add_argument("--rope", default=None, metavar="JSON",
                   help="with --init-from: read and train the models with these RoPE parameters "
                        "(longctx.tiny.set_rope: transformers' rope_parameters keys over a default RoPE at the "
                        "checkpoint's base), e.g. "
                        "'{\"rope_theta\": 1e9}' or '{\"rope_type\": \"yarn\", \"factor\": 10, "
                        "\"original_max_position_embeddings\": 4096, \"attention_factor\": 1}'")
    p.add_argument("--widen", default=None, metavar="HIDDEN,INTERMEDIATE",
                   help="with --init-from: widen each model's residual stream and MLP to these sizes without "
                        "changing its outputs (longctx.tiny.widen_model), then train; e.g. 256,768")
    p.add_argument("--split-uuid-hex", action="store_true",
                   help="tokenizer spells uuid hex letters one per token (from scratch: built so; with "
                        "--init-from: added to the checkpoint's tokenizer, vocabulary unchanged)")
    p.add_argument("--word-tokens", choices=sorted(WORD_TOKEN_LISTS), default=None,
                   help="make RULER key words single tokens: nouns = the word after the hyphen, keys = both words "
                        "(longctx.tiny.add_word_tokens; with --init-from the embeddings grow, "
                        "longctx.tiny.grow_embeddings)")
    p.add_argument("--digit-groups", type=int, choices=(1, 2, 3, 4), default=1,
                   help="spell numbers outside uuids in groups of up to this many digits (1234567 -> 123 456 7 for "
                        "3; longctx.tiny.group_digits; with --init-from the embeddings grow). Default 1: single "
                        "digits, the shipped tokenizer")
    p.add_argument("--digit-init", choices=("random", "first"), default="random",
                   help="with --init-from --digit-groups: new digit-group embeddings start random (the trained "
                        "rows' statistics) or at their first digit's row plus noise (longctx.tiny.grow_embeddings)")
    p.add_argument("--gather-spread", action="store_true",
                   help="train the key-gathering head to attend to every key token evenly (uniform-target "
                        "loss) instead of to any of them (attention-mass loss)")
    p.add_argument("--first-weight", type=float, default=None,
                   help="override the loss weight of each value's first digit in the follow-up curricula")
    p.add_argument("--stop-after-stage", type=int, default=3,
                   help="end the main curriculum after this stage; its learning-rate schedule still spans all "
                        "stages (default 3, then the polish: the shipped checkpoint; 4 adds the 4-16K stage, "
                        "which scored lower)")
    p.add_argument("--from-stage", type=int, default=0, help="start at this curriculum stage (with --init-from)")
    p.add_argument("--eval-lengths", default="4096", help="comma-separated lengths for the final quick eval ('' = none)")
    p.add_argument("--eval-samples", type=int, default=20)
    p.add_argument("--eval-tasks", default=",".join(DONE_WHEN_TASKS), help="comma-separated RULER NIAH tasks")
    p.add_argument("--agreement-lengths", default="4096", help="lengths at which draft agreement is measured")
    p.add_argument("--eval-only", action="store_true", help="evaluate the models already in --out-dir")
    p.add_argument("--circuit-report", default=None, metavar="TASK:LENGTH:N",
                   help="with --eval-only: how the target's supervised heads behave on N training-format "
                        "prompts of TASK at LENGTH tokens (longctx.tiny.retrieval.circuit_report), as JSON; with "
                        "--retrieval-roles two_gather also the second gathering head")
    return p.parse_args(argv)


def _print_circuit_report(target, tok, spec: str, roles: str = "full") -> int:
    from longctx.tiny.retrieval import circuit_report

    task, _, rest = spec.partition(":")
    length, _, n = rest.partition(":")
    if not (length.isdigit() and n.isdigit()):
        raise ValueError(f"--circuit-report requires TASK:LENGTH:N, e.g. niah_multikey_2:4096:8 (got {spec!r})")
    report = circuit_report(target, tok, task, int(length), int(n), roles=roles)
    sys.stdout.write(json.dumps({"task": task, "length": int(length), **report}, indent=1) + "\n")
    return 0


def train_tiny_main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: build the tokenizer, train target and draft, save them, run a quick evaluation."""
    args = _parse(argv)
    # how many follow-up curricula run alone (--polish-only, --continuation-only, ...)
    n_only = sum(map(bool, (args.continuation_only, args.polish_only, args.keymatch_only, args.retrieval_only)))
    stage_steps = None
    if args.stage_steps is not None:
        if n_only != 1:
            raise ValueError("--stage-steps requires exactly one of --polish-only, --continuation-only, "
                             f"--keymatch-only, --retrieval-only (got --stage-steps {args.stage_steps!r} without)")
        try:
            stage_steps = [int(x) for x in args.stage_steps.split(",")]
        except ValueError:
            raise ValueError(f"--stage-steps requires comma-separated integers (got {args.stage_steps!r})") from None
    if args.insert_layer is not None and not args.init_from:
        raise ValueError(f"--insert-layer requires --init-from (a trained model to grow; got --insert-layer "
                         f"{args.insert_layer} without)")
    widen = None
    if args.widen is not None:
        parts = args.widen.split(",")
        if not args.init_from or len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
            raise ValueError("--widen requires --init-from and HIDDEN,INTERMEDIATE (two integers, e.g. 256,768; "
                             f"got --widen {args.widen!r}, --init-from {args.init_from!r})")
        widen = tuple(int(x) for x in parts)
    rope = None
    if args.rope is not None:
        try:
            rope = json.loads(args.rope)
        except json.JSONDecodeError:
            rope = None
        if not args.init_from or not isinstance(rope, dict):
            raise ValueError("--rope requires --init-from and a JSON object of RoPE parameters, e.g. "
                             f"'{{\"rope_theta\": 1e9}}' (got --rope {args.rope!r}, --init-from {args.init_from!r})")
    if args.digit_init == "first" and (args.digit_groups == 1 or not args.init_from):
        raise ValueError("--digit-init first requires --digit-groups 2..4 and --init-from (a trained model whose "
                         f"embeddings grow; got --digit-groups {args.digit_groups}, --init-from {args.init_from!r})")
    if args.hard_keys is not None and not 0.0 <= args.hard_keys <= 1.0:
        raise ValueError(f"--hard-keys requires a probability in [0, 1] (got {args.hard_keys})")
    if args.pose_prob is not None and not 0.0 <= args.pose_prob <= 1.0:
        raise ValueError(f"--pose-prob requires a probability in [0, 1] (got {args.pose_prob})")
    if args.pose_max_position < 2:
        raise ValueError(f"--pose-max-position requires an int >= 2 (got {args.pose_max_position})")
    mix = None
    if args.mix is not None:
        if not n_only:
            raise ValueError("--mix requires one of --polish-only, --continuation-only, --keymatch-only, "
                             f"--retrieval-only (got --mix {args.mix!r} without)")
        mix = parse_mix(args.mix)
    handlers = [logging.StreamHandler()]
    if args.log_file:
        handlers.append(logging.FileHandler(args.log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers, force=True)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = [n for n in args.models.split(",") if n]
    for n in names:
        if n not in MODEL_CONFIGS:
            raise ValueError(f"train-tiny requires --models from {sorted(MODEL_CONFIGS)} (got {n!r})")
    if args.average:
        for n in names:
            average_checkpoints([Path(x) for x in args.average.split(",") if x], out, n)
    if args.eval_only or args.average:
        tok = AutoTokenizer.from_pretrained(out / "tiny-target")
        target = AutoModelForCausalLM.from_pretrained(out / "tiny-target").eval().to(device)
        if args.circuit_report:
            return _print_circuit_report(target, tok, args.circuit_report, args.retrieval_roles)
        draft = (AutoModelForCausalLM.from_pretrained(out / "tiny-draft").eval().to(device)
                 if (out / "tiny-draft").exists() else None)
    else:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        essay = load_essay_words()
        if args.init_from:
            # the tokenizer travels with the checkpoint, so --seed only changes the data streams
            tok = AutoTokenizer.from_pretrained(Path(args.init_from) / f"tiny-{names[0]}")
            models = {n: AutoModelForCausalLM.from_pretrained(Path(args.init_from) / f"tiny-{n}") for n in names}
            logger.info("initialised %s (and the tokenizer) from %s", names, args.init_from)
            if args.insert_layer is not None:
                for n, m in models.items():
                    insert_identity_layer(m, args.insert_layer)
                    logger.info("tiny-%s grown to %d layers (identity layer at %d, --insert-layer)", n,
                                m.config.num_hidden_layers, args.insert_layer)
            if rope is not None:
                for n, m in models.items():
                    logger.info("tiny-%s RoPE %s (--rope)", n, set_rope(m, rope))
            if widen is not None:
                for n, m in models.items():
                    widen_model(m, *widen, seed=args.seed)
                    logger.info("tiny-%s widened to hidden %d, intermediate %d (--widen)", n, *widen)
            if args.split_uuid_hex and not splits_uuid_hex(tok):
                split_uuid_hex(tok)
                logger.info("the tokenizer now spells uuid letters one per token (--split-uuid-hex)")
            if args.word_tokens:
                tok = add_word_tokens(tok, WORD_TOKEN_LISTS[args.word_tokens])
                for n, m in models.items():
                    added = grow_embeddings(m, len(tok), seed=args.seed)
                    logger.info("tiny-%s: %d whole-word tokens added (--word-tokens %s), vocabulary %d", n, added,
                                args.word_tokens, len(tok))
            if args.digit_groups > 1:
                tok = group_digits(tok, args.digit_groups)
                near = None
                if args.digit_init == "first":  # each new group token starts at its first digit
                    old_size = len(models[names[0]].get_input_embeddings().weight)
                    groups = tok.convert_ids_to_tokens(range(old_size, len(tok)))
                    near = [tok.convert_tokens_to_ids(t[0]) for t in groups]
                for n, m in models.items():
                    added = grow_embeddings(m, len(tok), seed=args.seed + 1, near=near)
                    logger.info("tiny-%s: %d digit-group tokens added (--digit-groups %d), vocabulary %d", n, added,
                                args.digit_groups, len(tok))
        else:
            tok = build_tokenizer(seed=args.seed, essay_words=essay, split_uuid_hex=args.split_uuid_hex)
            if args.word_tokens:
                tok = add_word_tokens(tok, WORD_TOKEN_LISTS[args.word_tokens])
            if args.digit_groups > 1:
                tok = group_digits(tok, args.digit_groups)
            models = {n: build_model(MODEL_CONFIGS[n], tok, args.seed + (n == "draft")) for n in names}
        models = {n: m.to(device) for n, m in models.items()}
        def scaled(stages, first_weight=None, stage_steps=None, mix=None):
            return configure_stages(stages, args.steps_scale, args.retrieval_weight, args.retrieval_roles, first_weight,
                                    stage_steps, mix, args.hard_keys, args.gather_spread or None, args.pose_prob)

        curriculum = scaled(CURRICULUM)[args.from_stage:]
        probes = {n: PrevTokenProbes(m.config.hidden_size) for n, m in models.items()}
        logger.info("vocab %d %s curriculum %s lr %g", len(tok),
                    {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
                    [dataclasses.asdict(s) for s in curriculum], args.lr)
        t0 = time.time()

        def checkpoint(si):
            for n, m in models.items():
                save_model(m, tok, out / f"tiny-{n}")
            logger.info("stage %d checkpoint after %.1f min (stage end or --save-every); saved to %s", si,
                        (time.time() - t0) / 60, out)

        if not n_only:
            train(models, tok, curriculum, seed=args.seed + args.from_stage, lr=args.lr, autocast=args.autocast,
                  essay_words=essay, on_stage_end=checkpoint, save_every=args.save_every, probes=probes, warmup=30,
                  stop_after_stage=args.stop_after_stage, max_position=args.pose_max_position)
        # follow-up curricula: each a fresh optimizer at half the learning rate and its own seeded stream
        follow_ups = [
            ("continuation", CONTINUATION, 100, args.continuation or args.continuation_only),
            ("polish", POLISH, 200,
             (args.polish and not n_only) or args.polish_only),
            ("keymatch", KEYMATCH, 300, args.keymatch or args.keymatch_only),
            ("retrieval", RETRIEVAL, 400, args.retrieval or args.retrieval_only),
        ]
        for name, stages, seed_offset, wanted in follow_ups:
            if not wanted:
                continue
            stages = scaled(stages, args.first_weight, stage_steps, mix)
            logger.info("%s %s lr %g", name, [dataclasses.asdict(s) for s in stages], args.lr / 2)
            train(models, tok, stages, seed=args.seed + seed_offset, lr=args.lr / 2, autocast=args.autocast,
                  essay_words=essay, on_stage_end=checkpoint, save_every=args.save_every, warmup=20,
                  max_position=args.pose_max_position)
        logger.info("training took %.1f min", (time.time() - t0) / 60)
        target, draft = models.get("target"), models.get("draft")
        if target is None:
            return 0
    lengths = [int(x) for x in args.eval_lengths.split(",") if x]
    if lengths:
        agree = [int(x) for x in args.agreement_lengths.split(",") if x]
        res = evaluate(target, tok, args.eval_tasks.split(","), lengths, args.eval_samples, draft=draft,
                       agreement_lengths=agree)
        sys.stdout.write(json.dumps(res, indent=1) + "\n")
    return 0
