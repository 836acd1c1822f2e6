"""Training-only retrieval supervision for the bundled tiny models (issue 7).

The tiny target learnt to copy *a* needle's value but not to pick the needle whose key was asked:
on ``niah_multikey_2`` (a haystack made of needles) its retrieval head spread its attention evenly
over all needles, so its answers were another key's value. Answer-token loss alone did not teach
the key match in the steps we can afford on 2 cores. This module supervises the circuit directly:

- ``gather`` (a head of the second layer): at every value token of a needle, attend to that
  needle's key tokens; at every answer position that predicts a value token, attend to the key
  asked for (its last mention). Both ends then carry the key.
- ``match`` (a last-layer head): at the position that predicts a value's first token, attend to
  that token in the needle holding the value; ``copy`` (another last-layer head, other KV head):
  the same for the value's other tokens (induction inside the right needle).
- :func:`contrast_loss`: the gathering head's output at the answer must be closer (cosine) to its
  output at the right needle than at any other needle; :class:`KeyProbe`: the gathering layer's
  output must name the key's tokens. Without the contrastive term the gathering head attended
  perfectly but wrote nearly the same vector for every key, and the matching head stayed at
  chance (the model card lists each trial).

Attention losses are ``-log(mass)`` of one head's softmax attention on its targets. The saved
model is a plain Llama: the capture is an ``AttentionInterface`` function that runs SDPA and keeps
each layer's post-RoPE q/k and per-head outputs for the losses; it is installed only while
training.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
from typing import Iterator, Optional, Sequence, Union

import torch

from longctx.compat import register_attention

CAPTURE_NAME = "longctx_tiny_capture"
# layer_idx -> (query [B, H, S, D], key [B, Hkv, S, D], scaling) and ("out", layer_idx) -> per-head
# outputs [B, S, H, D]; None when nobody is capturing
_CAPTURED: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("longctx_tiny_captured", default=None)


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that also records this layer's post-RoPE ``query``/``key`` when capturing."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    store = _CAPTURED.get()
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if store is not None:
        scaling = kwargs.get("scaling")
        store[module.layer_idx] = (query, key, scaling if scaling is not None else query.shape[-1] ** -0.5)
        store[("out", module.layer_idx)] = out[0]  # [B, S, H, D] per-head outputs (before o_proj)
    return out


@contextlib.contextmanager
def capturing(model) -> Iterator[dict]:
    """Run ``model`` with the capturing attention; yields the store: ``layer_idx -> (q, k, scaling)``
    (post-RoPE ``[B, H, S, D]`` / ``[B, Hkv, S, D]``) and ``("out", layer_idx) ->`` per-head outputs
    ``[B, S, H, D]``.

    The model's attention implementation is restored on exit.
    """
    from transformers.masking_utils import sdpa_mask

    register_attention(CAPTURE_NAME, _capture_attention, sdpa_mask)
    orig = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    store: dict = {}
    token = _CAPTURED.set(store)
    try:
        yield store
    finally:
        _CAPTURED.reset(token)
        model.set_attn_implementation(orig)


def _tokens_in(ends: Sequence[int], starts: Sequence[int], lo: int, hi: int) -> range:
    """Token indices whose character spans overlap ``[lo, hi)``."""
    return range(bisect.bisect_right(ends, lo), bisect.bisect_left(starts, hi))


def answer_targets(text: str, offsets: Sequence[tuple[int, int]], prompt_chars: int, values: Sequence[str],
                   keys: Sequence[str]) -> dict[str, list[tuple[int, int, int]]]:
    """Attention targets ``(t, s0, s1)`` (query position, first and last target token) for one sequence.

    Parameters
    ----------
    text : prompt followed by the answer (the training sequence as text).
    offsets : character offsets of each token of ``text`` (``return_offsets_mapping``).
    prompt_chars : ``len(prompt)``; values are searched in the answer, needles in the prompt.
    values, keys : each value of the answer in order, and the key it answers.

    Returns
    -------
    ``{"match", "copy", "gather", "gather_tail", "needles", "contrast"}`` lists. ``match``: for the first token
    of every value found, the position that predicts it and the same token in the needle holding
    the value (the token a key-matching head must read); ``copy``: the same for the value's other
    tokens (what an induction head restricted to that needle reads). ``gather``: at each position
    that predicts a value token, the key's tokens in its last mention before it (the question); at
    each value token of the needle, the needle's key tokens (what a head must collect so that the
    two ends can be matched). ``gather_tail``: the same positions, one target token each: the
    second token after the key's first ``-`` (its last token when there is none or the key ends
    sooner), for a second gathering head that reads the key's second part (the first head ends up
    reading the key's first tokens, so keys that start alike look alike; see ``circuit_report``).
    ``needles``: the first value token of every needle in the prompt; ``contrast``: ``(t, i)``
    per ``match`` target, ``i`` the index of its needle in ``needles`` (for :func:`contrast_loss`).
    Values whose tokens differ between the needle and the answer are skipped.
    """
    starts, ends = [a for a, _ in offsets], [e for _, e in offsets]
    match, copy, gather, tail = [], [], [], []
    # the first value token of every needle of the prompt (the candidates a key match chooses from)
    needles, c = [], text.find(" is: ", 0, prompt_chars)
    while c >= 0:
        needles.append(bisect.bisect_right(ends, c + 5))
        c = text.find(" is: ", c + 5, prompt_chars)
    cursor = prompt_chars
    for val, key in zip(values, keys):
        ca = text.find(val, cursor)
        cp = text.find(" " + key + " is: " + val, 0, prompt_chars)
        if ca < 0 or cp < 0:
            continue
        cursor = ca + len(val)
        cv = cp + len(key) + 6  # the value in the needle
        src = _tokens_in(ends, starts, cv, cv + len(val))
        dst = _tokens_in(ends, starts, ca, ca + len(val))
        if len(src) != len(dst) or not len(src):
            continue
        match.append((dst.start - 1, src.start, src.start))
        copy += [(d - 1, s, s) for s, d in zip(src[1:], dst[1:])]
        needle_key = _tokens_in(ends, starts, cp + 1, cp + 1 + len(key))
        gather += [(s, needle_key.start, needle_key.stop - 1) for s in src]
        j = _tail_token(ends, key, cp + 1, needle_key)
        tail += [(s, j, j) for s in src]
        cq = text.rfind(key, cv + len(val), ca)
        if cq >= 0:
            asked = _tokens_in(ends, starts, cq, cq + len(key))
            gather += [(d - 1, asked.start, asked.stop - 1) for d in dst]
            j = _tail_token(ends, key, cq, asked)
            tail += [(d - 1, j, j) for d in dst]
    # contrast: (t, index of the right needle in ``needles``) for each match target
    contrast = [(t, needles.index(s0)) for t, s0, _ in match if s0 in needles]
    return {"match": match, "copy": copy, "gather": gather, "gather_tail": tail, "contrast": contrast,
            "needles": needles}


def _tail_token(ends: Sequence[int], key: str, c0: int, key_tokens: range) -> int:
    """The token ``gather_tail`` reads for a key written at character ``c0`` over ``key_tokens``:
    the second token after the key's first ``-``, clipped to the key's last token."""
    last = key_tokens.stop - 1
    dash = key.find("-")
    if dash < 0:
        return last
    dash_token = bisect.bisect_right(ends, c0 + dash)  # the token holding the dash
    return min(dash_token + 2, last)


def _head_scores(store: dict, layer: int, head: int, b: int, t: torch.Tensor) -> torch.Tensor:
    """Causal attention scores ``[N, S]`` of one head at query positions ``t`` ``[N]`` of batch row ``b``
    (``-inf`` after each query), from the capture of :func:`capturing`."""
    q, k, scaling = store[layer]
    kv_head = head // (q.shape[1] // k.shape[1])
    t = t.to(q.device)
    scores = (q[b, head, t].float() @ k[b, kv_head].float().T) * scaling
    pos = torch.arange(k.shape[2], device=q.device)
    return scores.masked_fill(pos[None] > t[:, None], float("-inf"))


def retrieval_loss(store: dict, spans: Sequence[Sequence[tuple[int, int, int]]], layer: int, head: int,
                   spread: bool = False) -> torch.Tensor:
    """``-log`` of one head's attention mass on its target tokens, averaged over all targets; with
    ``spread``, ``KL(uniform over the targets || attention)`` instead.

    The mass loss is met by attending to any one target token. For the gathering head that is not
    enough: the shipped C3 target put 93-100% of its gathering attention on the key's *second*
    token (``'i'`` of ``'Ġwh','i','m','s','ic','al','-',...``), so the gathered key named only the
    first pieces of the first word, and multikey answers came from needles whose keys start alike.
    ``spread`` asks for every token of the key (``-mean_j log p_j - log n``, zero only for uniform
    attention on the ``n`` targets).

    Parameters
    ----------
    store : ``layer_idx -> (q [B, H, S, D], k [B, Hkv, S, D], scaling)`` from :func:`capturing`.
    spans : per batch row, ``(t, s0, s1)`` targets (one role of :func:`answer_targets`).
    layer, head : the supervised head.
    spread : the uniform-target loss instead of the mass loss.

    Returns
    -------
    A scalar (0 when there is no target).
    """
    losses = []
    for b, row in enumerate(spans):
        if not row:
            continue
        t = torch.tensor([r[0] for r in row])
        logp = torch.log_softmax(_head_scores(store, layer, head, b, t), dim=-1)  # [N, S]
        pos = torch.arange(logp.shape[-1], device=logp.device)
        inside = (pos[None] >= torch.tensor([r[1] for r in row], device=logp.device)[:, None]) & (
            pos[None] <= torch.tensor([r[2] for r in row], device=logp.device)[:, None])
        if spread:
            n = inside.sum(-1)
            losses.append(-(logp.masked_fill(~inside, 0.0)).sum(-1) / n - torch.log(n.float()))
        else:
            losses.append(-torch.logsumexp(logp.masked_fill(~inside, float("-inf")), dim=-1))
    if not losses:
        return torch.zeros(())  # a 0-dim CPU tensor adds to a loss on any device
    return torch.cat(losses).mean()


class KeyProbe(torch.nn.Module):
    """Training-only probe: the gathering layer's output at each ``gather`` target must name the key.

    Supervising where the gathering head looks is not enough: what it writes (its value/output
    maps) was trained only through the matching head's loss two layers up, and in a trial the
    matching head stayed at chance (attention ~1/needles on the right needle). This probe (linear
    map, the model's final norm, the tied unembedding) gives the gathering layer a direct loss for
    predicting the key's tokens (cross-entropy against the uniform distribution over them), as
    :class:`longctx.tiny.PrevTokenProbes` does for previous-token heads. Not part of the saved model.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, hidden_size)

    def loss(self, model, hidden: torch.Tensor, ids: torch.Tensor,
             spans: Sequence[Sequence[tuple[int, int, int]]]) -> torch.Tensor:
        """Mean over targets of ``-mean_j log p(key token j)`` read at ``t``.

        Parameters
        ----------
        hidden : ``[B, S, h]`` output of the gathering layer.
        ids : ``[B, S]`` token ids.
        spans : per batch row, the ``gather`` targets ``(t, s0, s1)`` (``s0..s1`` are the key).
        """
        rows = [(b, t, s0, s1) for b, row in enumerate(spans) for t, s0, s1 in row]
        if not rows:
            return hidden.new_zeros(())
        b = torch.tensor([r[0] for r in rows], device=hidden.device)
        t = torch.tensor([r[1] for r in rows], device=hidden.device)
        emb = model.get_input_embeddings().weight
        logp = torch.log_softmax((model.model.norm(self.proj(hidden[b, t])) @ emb.T).float(), dim=-1)  # [N, V]
        losses = [-logp[i, ids[bi, s0:s1 + 1]].mean() for i, (bi, _, s0, s1) in enumerate(rows)]
        return torch.stack(losses).mean()


def gathered_keys(out: torch.Tensor, heads: Union[int, Sequence[int]]) -> torch.Tensor:
    """The gathered key at every position: the given heads' outputs of one sequence concatenated and
    L2-normalised, ``out [S, H, D]`` -> ``[S, len(heads) * D]`` (fp32)."""
    heads = [heads] if isinstance(heads, int) else list(heads)
    return torch.nn.functional.normalize(out[:, heads].float().flatten(1), dim=-1)


def contrast_loss(store: dict, spans: Sequence[dict], layer: int, head: Union[int, Sequence[int]],
                  temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE on the gathering head's outputs: at a position that predicts a value's first token,
    its output must be closer (cosine) to the output at the right needle's value than at any other
    needle's. Gives the gathering head's value/output maps a direct reason to keep the key's
    identity (in a trial its outputs were nearly the same for every key: cosine 0.55-0.75 to
    every needle, the right one not singled out). With several ``head`` s their outputs are
    concatenated: the gathered key is what the heads write together."""
    out = store[("out", layer)]  # [B, S, H, D]
    losses = []
    for b, row in enumerate(spans):
        pairs, needles = row.get("contrast", []), row.get("needles", [])
        if not pairs or len(needles) < 2:
            continue
        g = gathered_keys(out[b], head)  # [S, heads * D]
        t = torch.tensor([p[0] for p in pairs], device=g.device)
        sims = g[t] @ g[torch.tensor(needles, device=g.device)].T / temperature  # [N, n_needles]
        right = torch.tensor([p[1] for p in pairs], device=g.device)
        losses.append(torch.nn.functional.cross_entropy(sims, right, reduction="none"))
    if not losses:
        return out.new_zeros((), dtype=torch.float32)
    return torch.cat(losses).mean()


def circuit_report(model, tokenizer, task: str = "niah_multikey_2", length: int = 4096, n: int = 8,
                   seed: int = 123, roles: str = "full") -> dict[str, float]:
    """How the supervised heads of a trained tiny model behave on ``n`` training-format prompts.

    For each answer value's first token (the token that needs the right needle), with the heads of
    :func:`longctx.tiny.supervised_heads`:

    - ``gather_key_share``: the gathering head's attention on the asked key's tokens (in the
      question), as a share of its whole attention;
    - ``gather_top_token``: the largest share one key token takes of that attention (1 = one token);
    - ``gather_key_tokens``: how many key tokens it effectively reads (``exp`` of the entropy of its
      attention restricted to the key), against ``key_tokens``, the key's length in tokens;
    - ``gather_top1``: the gathering head's output at the answer is closest (cosine) to its output
      at the right needle's value among all needles;
    - ``gather_right_cos`` / ``gather_best_other_cos``: that cosine for the right needle, and the
      largest one over the other needles (``gather_top1`` fails when the second exceeds the first);
    - ``needles``: the number of needles in the prompt (the candidates);
    - ``match_top1``: the matching head attends to the right needle's value more than any other's;
    - ``first_token_right``: the model's greedy next token is the value's first token.

    With ``roles="two_gather"`` (a model trained with a second gathering head) also
    ``tail_share``, that head's attention on its target token (``answer_targets``' ``gather_tail``),
    and ``pair_top1``, ``gather_top1`` for both gathering heads' outputs together.

    Returns the means over all answers, and ``answers`` (their count).
    """
    from longctx.tiny import RULER_NIAH_TASKS, SampleStream, load_essay_words, supervised_heads

    if task not in RULER_NIAH_TASKS:
        raise ValueError(f"circuit_report requires task from {sorted(RULER_NIAH_TASKS)} (got {task!r})")
    if length < 64 or n < 1:
        raise ValueError(f"circuit_report requires length >= 64 and n >= 1 (got length={length}, n={n})")
    stream = SampleStream(tokenizer, seed, load_essay_words(), mix=[(task, 1.0)])
    stream.want_spans = True
    heads = supervised_heads(model.config, roles)
    rows: list[dict[str, float]] = []
    for _ in range(n):
        ids, _ = stream.sample(length)
        spans = stream.last_spans[-1]
        if not spans.get("contrast"):
            continue
        dev = model.get_input_embeddings().weight.device
        with torch.no_grad(), capturing(model) as store:
            logits = model(input_ids=torch.tensor([ids], device=dev)).logits[0]
        needles = torch.tensor(spans["needles"], device=dev)
        gathered = {t: (s0, s1) for t, s0, s1 in spans["gather"]}
        answers = [(t, right) for (t, _, _), (_, right) in zip(spans["match"], spans["contrast"]) if t in gathered]
        if not answers:
            continue
        ts = torch.tensor([t for t, _ in answers], device=dev)
        gather_att = torch.softmax(_head_scores(store, *heads["gather"], 0, ts), dim=-1)  # [N, S]
        match_att = torch.softmax(_head_scores(store, *heads["match"], 0, ts), dim=-1)[:, needles]  # [N, needles]
        gather_out = gathered_keys(store[("out", heads["gather"][0])][0], heads["gather"][1])  # [S, D]
        tail_att = pair_out = None
        if "gather_tail" in heads:
            tails = {t: j for t, j, _ in spans["gather_tail"]}
            tail_att = torch.softmax(_head_scores(store, *heads["gather_tail"], 0, ts), dim=-1)  # [N, S]
            pair_out = gathered_keys(store[("out", heads["gather"][0])][0],
                                     [heads["gather"][1], heads["gather_tail"][1]])  # [S, 2 * D]
        for i, (t, right) in enumerate(answers):
            s0, s1 = gathered[t]
            key = gather_att[i, s0:s1 + 1]
            p = key / key.sum()
            sims = gather_out[t] @ gather_out[needles].T
            others = torch.cat([sims[:right], sims[right + 1:]])
            match = match_att[i]
            rows.append({
                "gather_key_share": key.sum().item(),
                "gather_top_token": p.max().item(),
                "gather_key_tokens": torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item(),
                "key_tokens": float(s1 - s0 + 1),
                "gather_top1": float(sims.argmax().item() == right),
                "gather_right_cos": sims[right].item(),
                "gather_best_other_cos": others.max().item() if len(others) else float("nan"),
                "needles": float(len(needles)),
                "match_top1": float(match.argmax().item() == right),
                "first_token_right": float(logits[t].argmax().item() == ids[t + 1]),
            })
            if tail_att is not None:
                rows[-1]["tail_share"] = tail_att[i, tails[t]].item()
                rows[-1]["pair_top1"] = float((pair_out[t] @ pair_out[needles].T).argmax().item() == right)
    if not rows:
        raise ValueError(f"circuit_report found no supervised answers for task={task!r} at length={length} "
                         f"(needs a NIAH task whose needles hold the asked keys)")
    report = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    report["answers"] = len(rows)
    return report


