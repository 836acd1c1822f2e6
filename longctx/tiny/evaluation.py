"""Quick RULER-format evaluation: greedy answers scored with string_match_all, and the draft/target agreement."""
from __future__ import annotations

import json
import logging
import random
import re
from typing import Optional, Sequence

import torch

from longctx.tiny.text import RULER_NIAH_TASKS, Sample, load_essay_words, niah_sample

logger = logging.getLogger(__name__)


def ruler_postprocess(pred: str) -> str:
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's niah metric (scripts/eval/synthetic/constants.py), in percent."""
    s = sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs))
    return round(100 * s / len(preds), 2)


def sized_niah_samples(tokenizer, task: str, max_seq_length: int, n: int, seed: int,
                       essay_words: Optional[Sequence[str]] = None, tokens_to_generate: int = 128) -> list[Sample]:
    """``n`` prompts sized by RULER's rule: ``len(tokenize(prompt)) + tokens_to_generate <= max_seq_length``."""
    essay_words = essay_words if essay_words is not None else load_essay_words()
    rng = random.Random(seed)
    budget = max_seq_length - tokens_to_generate
    probe = niah_sample(random.Random(seed + 1), task, 100 if RULER_NIAH_TASKS[task][0] == "essay" else 10, essay_words)
    n0 = 100 if RULER_NIAH_TASKS[task][0] == "essay" else 10
    per_unit = (len(tokenizer.tokenize(probe.prompt)) - 60) / n0
    units = max(1, int((budget - 60) / per_unit))
    out = []
    for _ in range(n):
        state = rng.getstate()
        while True:
            rng.setstate(state)
            s = niah_sample(rng, task, units, essay_words)
            if len(tokenizer.tokenize(s.prompt)) <= budget or units <= 1:
                break
            units -= max(1, units // 100)
        out.append(s)
    return out


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, list[int]]:
    """Greedy completion of ``prompt``; returns the decoded text and the generated ids."""
    dev = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(dev)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    gen = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(gen, skip_special_tokens=True), gen


def _answer_budget(task: str) -> int:
    _, _, tv, k, v, q = RULER_NIAH_TASKS[task]
    per = 40 if tv == "uuids" else 10
    return per * max(v, q) + 4


def evaluate(model, tokenizer, tasks: Sequence[str], lengths: Sequence[int], n: int, seed: int = 42,
             draft=None, agreement_lengths: Optional[Sequence[int]] = None) -> dict:
    """Greedy RULER-format NIAH scores (string_match_all) per task and length.

    With ``draft``, also the greedy agreement at ``agreement_lengths`` (default: all): fraction of
    positions over the target's answer span (teacher-forced on the target's greedy output) where
    draft argmax == target argmax.
    """
    results = {}
    for L in lengths:
        drf = draft if agreement_lengths is None or L in agreement_lengths else None
        for task in tasks:
            samples = sized_niah_samples(tokenizer, task, L, n, seed)
            preds, agree, total = [], 0, 0
            for s in samples:
                text, gen = greedy_answer(model, tokenizer, s.prompt, _answer_budget(task))
                preds.append(ruler_postprocess(text))
                if drf is not None and gen:
                    a, t = draft_agreement(model, drf, tokenizer, s.prompt, gen)
                    agree, total = agree + a, total + t
            rec = {"score": string_match_all(preds, [s.outputs for s in samples]), "n": n, "example": preds[0][:80]}
            if drf is not None:
                rec["draft_agreement"] = round(agree / max(1, total), 4)
            results[f"{task}@{L}"] = rec
            logger.info("eval %s@%d %s", task, L, json.dumps(rec))
    return results


@torch.no_grad()
def draft_agreement(target, draft, tokenizer, prompt: str, gen: list[int]) -> tuple[int, int]:
    """Positions over the answer span where draft and target greedy predictions coincide."""
    dev = next(target.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(dev)
    full = torch.cat([ids, torch.tensor([gen], device=dev)], dim=1)
    P = ids.shape[1]
    lt = target(full).logits[0, P - 1: full.shape[1] - 1].argmax(-1)
    ld = draft(full).logits[0, P - 1: full.shape[1] - 1].argmax(-1)
    return int((lt == ld).sum()), int(lt.numel())
