"""The training loop: previous-token probes, per-token loss weights, the supervised heads of the
retrieval losses, the loss and :func:`train`."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from longctx.tiny.curriculum import Stage
from longctx.tiny.data import SampleStream, make_batch
from longctx.tiny.text import load_essay_words

logger = logging.getLogger(__name__)


class PrevTokenProbes(torch.nn.Module):
    """Training-only probes: linear maps from the first decoder layer's output to the tokens 1..k back.

    Their loss (through the model's final norm and tied unembedding) gives the first layer a direct
    reason to form previous-token heads. Without it, the induction circuit (previous-token head +
    content match one layer up) sat on its loss plateau for 1,000-2,000 steps in every trial on
    copy text; with it, it formed in ~320 steps. The probes are not part of the saved model.
    """

    def __init__(self, hidden_size: int, k: int = 2):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden_size, hidden_size) for _ in range(k))

    def loss(self, model, hidden: torch.Tensor, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
        """Mean cross-entropy of predicting ``ids[:, t - j]`` at position t, j = 1..k (pads ignored)."""
        emb = model.get_input_embeddings().weight
        total = hidden.new_zeros(())
        for j, head in enumerate(self.heads, start=1):
            logits = model.model.norm(head(hidden[:, j:])) @ emb.T
            target = ids[:, :-j].masked_fill(ids[:, j:] == pad_id, -100)
            total = total + F.cross_entropy(logits.transpose(1, 2).float(), target, ignore_index=-100)
        return total / len(self.heads)


def final_token_weights(target: torch.Tensor, digit_ids: torch.Tensor, weight: float,
                        first_weight: float = 1.0) -> torch.Tensor:
    """``[B, S]`` loss weights: ``weight`` on the last token of each copied span, ``first_weight``
    on the first digit of each value, 1 elsewhere.

    A span ends where the next label is ignored (copy text: the end of a repeat) or where a digit
    is followed by a non-digit (the last digit of a needle's value). The induction circuit these
    models form reads a copied token from the position after it in the source (which sees it as
    its previous token), so a span's last token, whose source successor is arbitrary, was the one
    it failed to copy: the shipped first-attempt models guessed the 7th digit of every value.
    A value's first digit (a digit whose previous label is not one) is the only token that needs
    the right needle; the rest follow from it by induction, so among distractor needles it
    carries the whole key-matching signal.
    """
    nxt = F.pad(target[:, 1:], (0, 1), value=-100)
    prev = F.pad(target[:, :-1], (1, 0), value=-100)
    digit, nxt_digit, prev_digit = (torch.isin(t, digit_ids) for t in (target, nxt, prev))
    final = (target != -100) & ((nxt == -100) | (digit & ~nxt_digit))
    first = digit & ~prev_digit
    return 1.0 + (weight - 1.0) * final.float() + (first_weight - 1.0) * (first & ~final).float()


def supervised_heads(config, roles: str = "full") -> dict[str, tuple[int, int]]:
    """The ``(layer, head)`` trained for each role of :func:`longctx.tiny.retrieval.answer_targets`.

    ``gather`` (collect the key's tokens) is a head of the second layer (the first in a two-layer
    model); ``match`` (read a value's first token from the needle whose gathered key matches) and
    ``copy`` (read the value's next tokens) are heads of the last layer with different KV heads
    where the model has several, so the two kinds of matching do not share keys. With ``roles ==
    "basic"`` there is no ``match`` head: ``copy`` reads every value token. With ``roles ==
    "two_gather"`` the next head of the gathering layer is ``gather_tail``: it reads the key's
    second part (:func:`longctx.tiny.retrieval.answer_targets`).
    """
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    last = n_layers - 1
    gather_layer = 1 if n_layers > 2 else 0
    heads = {"gather": (gather_layer, n_heads // 2), "match": (last, n_heads // 2), "copy": (last, 0)}
    if roles == "basic":
        del heads["match"]
    if roles == "two_gather":
        if n_heads < 2:
            raise ValueError(f"retrieval roles 'two_gather' require a model with >= 2 attention heads "
                             f"(got num_attention_heads={n_heads})")
        heads["gather_tail"] = (gather_layer, (n_heads // 2 + 1) % n_heads)
    return heads


def _role_targets(spans: Sequence[dict], roles: str) -> list[dict]:
    """``answer_targets`` rows for ``roles``: "basic" folds the ``match`` targets into ``copy``."""
    if roles != "basic":  # a role without a head (gather_tail under "full") is simply not read
        return list(spans)
    return [{"copy": row.get("match", []) + row.get("copy", []), "gather": row.get("gather", [])} for row in spans]


def _loss(model, ids, labels, pos, autocast: bool, probes: Optional[PrevTokenProbes] = None, pad_id: int = 0,
          weights_fn=None, spans=None, key_probe=None, roles: str = "full", gather_spread: bool = False):
    """Weighted mean over sequences of each sequence's mean token loss, the probes' loss (0 without
    probes), the retrieval loss (0 without ``spans``; plus ``key_probe``'s loss when given) and the
    per-sequence losses [B]; ``weights_fn(target)`` gives per-token weights; ``spans`` are the
    per-row retrieval targets, ``roles`` which parts of the supervision apply (``RETRIEVAL_ROLES``),
    ``gather_spread`` the uniform-attention loss for the gathering head."""
    from longctx.tiny.retrieval import capturing, contrast_loss, retrieval_loss

    heads = supervised_heads(model.config, roles)
    if spans is not None:
        spans = _role_targets(spans, roles)
    if roles == "basic":
        key_probe = None
    hidden_wanted = probes is not None or (spans is not None and key_probe is not None)
    ctx = capturing(model) if spans is not None else contextlib.nullcontext()
    with ctx as store, torch.autocast(ids.device.type, dtype=torch.bfloat16,
                                      enabled=autocast and ids.device.type in ("cpu", "cuda")):
        # the LM head only where the next token is supervised (answers: a few of 4-16K positions)
        keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)  # [K]
        out = model(input_ids=ids, position_ids=pos, output_hidden_states=hidden_wanted, logits_to_keep=keep)
        aux = probes.loss(model, out.hidden_states[1], ids, pad_id) if probes is not None else out.logits.new_zeros(())
        ret = out.logits.new_zeros(())
        if spans is not None and key_probe is not None:
            gather = [row.get("gather", []) for row in spans]
            ret = ret + key_probe.loss(model, out.hidden_states[heads["gather"][0] + 1], ids, gather)
    if spans is not None:
        ret = ret + sum(retrieval_loss(store, [row.get(role, []) for row in spans], layer, head,
                                       spread=gather_spread and role == "gather")
                        for role, (layer, head) in heads.items())
        if roles != "basic":  # the contrast is on what the gathering head(s) write
            layer, head = heads["gather"]
            tail = [heads["gather_tail"][1]] if "gather_tail" in heads else []
            ret = ret + contrast_loss(store, spans, layer, [head, *tail])
    logits = out.logits.float()  # [B, K, V]
    target = labels[:, 1:][:, keep]  # [B, K]
    tok_loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")  # [B, K]
    mask = (target != -100).to(tok_loss.dtype)
    if weights_fn is not None:
        mask = mask * weights_fn(target)
    n = mask.sum(1)
    per_seq = (tok_loss * mask).sum(1) / n.clamp(min=1)
    return per_seq[n > 0].mean(), aux.float(), ret.float(), per_seq.detach()


def train(
    models: dict,
    tokenizer,
    curriculum: Sequence[Stage],
    seed: int = 0,
    lr: float = 3e-3,
    warmup: int = 50,
    max_position: int = 32768,
    autocast: bool = True,
    log_every: int = 25,
    essay_words: Optional[Sequence[str]] = None,
    on_stage_end=None,
    mix: Optional[Sequence[tuple[str, float]]] = None,
    stop_after_stage: Optional[int] = None,
    save_every: int = 0,
    probes: Optional[dict] = None,
) -> list[dict]:
    """Train every model in ``models`` (name -> LlamaForCausalLM) on the same seeded batches.

    ``on_stage_end(stage_index)`` is called after each curriculum stage (e.g. to checkpoint);
    ``mix`` overrides the (task, weight) mixture ``TRAIN_MIX``; ``stop_after_stage`` ends training
    after that stage (the learning-rate schedule still spans the whole curriculum); with
    ``save_every > 0``, ``on_stage_end(stage_index)`` is also called every ``save_every`` steps;
    ``probes`` (name -> :class:`PrevTokenProbes`)
    adds each model's probe loss times the stage's ``aux_weight``.
    Returns the logged history (one dict per logged step with the losses).
    """
    essay_words = essay_words if essay_words is not None else load_essay_words()
    stream = SampleStream(tokenizer, seed, essay_words, mix)
    base_mix = list(zip(stream.tasks, stream.weights))
    dev = next(next(iter(models.values())).parameters()).device  # batches go where the models are
    digit_ids = torch.tensor(stream.digit_ids, device=dev)
    total = sum(s.steps for s in curriculum)
    probes = probes or {}
    # the key probes (longctx.tiny.retrieval.KeyProbe) come with the retrieval supervision
    key_probes = {}
    if any(s.retrieval_weight > 0 and s.retrieval_roles != "basic" for s in curriculum):
        from longctx.tiny.retrieval import KeyProbe

        key_probes = {n: KeyProbe(m.config.hidden_size).to(dev) for n, m in models.items()}
    probes = {n: p.to(dev) for n, p in probes.items()}
    extra = {n: [p for mod in (probes.get(n), key_probes.get(n)) if mod is not None for p in mod.parameters()]
             for n in models}
    opts = {
        n: torch.optim.AdamW(list(m.parameters()) + extra[n], lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        for n, m in models.items()
    }

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))

    history, step, t0 = [], 0, time.time()
    for m in models.values():
        m.train()
    for si, stage in enumerate(curriculum):
        running = {n: 0.0 for n in models}
        aux_run = {n: 0.0 for n in models}
        ret_run = {n: 0.0 for n in models}
        by_kind = {"copy": [0.0, 0], "niah": [0.0, 0]}  # first model's loss on copy / NIAH sequences
        stream.copy_only = stage.copy_only
        stream.want_spans = stage.retrieval_weight > 0
        stream.set_mix(stage.mix or base_mix)
        stream.hard_keys = stage.hard_keys
        weights_fn = None
        if stage.final_weight != 1.0 or stage.first_weight != 1.0:
            weights_fn = functools.partial(final_token_weights, digit_ids=digit_ids, weight=stage.final_weight,
                                           first_weight=stage.first_weight)
        for _ in range(stage.steps):
            ids, labels, pos = make_batch(stream, stage.batch_size, stage.min_len, stage.max_len, stage.pose_prob,
                                          max_position, tokenizer.pad_token_id, stage.extra_questions)
            ids, labels, pos = ids.to(dev), labels.to(dev), pos.to(dev)
            for n, m in models.items():
                for g in opts[n].param_groups:
                    g["lr"] = lr_at(step)
                pr = probes.get(n) if stage.aux_weight > 0 else None
                spans = stream.last_spans if stage.retrieval_weight > 0 else None
                loss, aux, ret, per_seq = _loss(m, ids, labels, pos, autocast, pr, tokenizer.pad_token_id, weights_fn,
                                                spans, key_probes.get(n), stage.retrieval_roles, stage.gather_spread)
                if n == next(iter(models)):
                    for task, v in zip(stream.last_tasks, per_seq.tolist()):
                        kind = by_kind["copy" if task == "copy" else "niah"]
                        kind[0], kind[1] = kind[0] + v, kind[1] + 1
                (loss + stage.aux_weight * aux + stage.retrieval_weight * ret).backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opts[n].step()
                opts[n].zero_grad(set_to_none=True)
                running[n] += loss.item()
                aux_run[n] += aux.item()
                ret_run[n] += ret.item()
            step += 1
            if step % log_every == 0 or step == total:
                k = (step - 1) % log_every + 1
                rec = {"step": step, "stage": si, "len": ids.shape[1], "elapsed_s": round(time.time() - t0, 1)}
                rec.update({f"loss_{n}": round(v / k, 4) for n, v in running.items()})
                rec.update({f"probe_{n}": round(v / k, 4) for n, v in aux_run.items() if v})
                rec.update({f"retrieval_{n}": round(v / k, 4) for n, v in ret_run.items() if v})
                rec.update({f"{kd}_loss": round(v / c, 4) for kd, (v, c) in by_kind.items() if c})
                history.append(rec)
                logger.info("%s", json.dumps(rec))
                running = {n: 0.0 for n in models}
                aux_run = {n: 0.0 for n in models}
                ret_run = {n: 0.0 for n in models}
                by_kind = {"copy": [0.0, 0], "niah": [0.0, 0]}
            if save_every and step % save_every == 0 and on_stage_end is not None:
                on_stage_end(si)
        if on_stage_end is not None:
            on_stage_end(si)
        if stop_after_stage is not None and si >= stop_after_stage:
            break
    for m in models.values():
        m.eval()
    return history
