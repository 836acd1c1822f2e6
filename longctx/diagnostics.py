"""Fidelity of a backend against dense attention, per layer and per decode step.

Two measurements on the same model and prompt:

1. **Teacher-forced, per layer.** Every layer runs the dense backend and the candidate
   backend side by side on identical q/k/v (the model continues with the dense output, so
   errors do not compound). For each call: attention-output relative error, key recall
   (share of the dense top-k keys the candidate attended) and attention-mass recall
   (dense softmax mass on the keys the candidate attended). Backends say what they
   attended through the contract (``record_attended`` / ``attended``, see
   :class:`longctx.backends.base.BackendLayer`); ``None`` means every causal key.
2. **End to end.** The candidate alone runs the model on the dense greedy continuation;
   the KL divergence ``KL(p_dense || p_backend)`` of the next-token distributions is
   reported per decode step.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Union

import torch

from longctx.backends import BackendConfig, BackendLayer, LayerContext, resolve_config
from longctx.backends.dense import DenseLayer
from longctx.cache import LongCtxCache
from longctx.compat import CACHE_KWARG
from longctx.config import DenseConfig, parse_backend_entry, split_options
from longctx.patch import patch

logger = logging.getLogger(__name__)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal softmax ``[B, H, S, T]`` for the last S of T keys (q ``[B,H,S,D]``, k ``[B,Hkv,T,D]``)."""
    B, H, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = H // Hkv
    scores = torch.matmul(q.float().reshape(B, Hkv, G * S, D), k.float().transpose(-1, -2)) * scale
    scores = scores.reshape(B, H, S, T)
    qi = torch.arange(S, device=q.device).unsqueeze(1) + (T - S)
    causal = torch.arange(T, device=q.device).unsqueeze(0) <= qi
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` over the whole tensor."""
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def recall_metrics(probs: torch.Tensor, attended: Optional[torch.Tensor], top_k: int) -> tuple[float, float]:
    """Key recall of the dense top-k and attention-mass recall of an ``attended`` mask.

    Parameters
    ----------
    probs : ``[B, H, S, T]`` dense attention probabilities.
    attended : ``[B, H, S, T']`` bool (``T' <= T``, padded with False), or ``None`` = all keys.
    top_k : int
        k of the dense top-k for key recall (capped at T).

    Returns
    -------
    (key_recall, mass_recall), both in [0, 1].
    """
    if attended is None:
        return 1.0, 1.0
    T = probs.shape[-1]
    att = attended.to(probs.device).bool()
    if att.shape[-1] < T:
        att = torch.nn.functional.pad(att, (0, T - att.shape[-1]))
    att = att[..., -probs.shape[2] :, :T] if att.shape[2] >= probs.shape[2] else att
    k = min(top_k, T)
    top = probs.topk(k, dim=-1).indices
    key_recall = float(att.gather(-1, top).float().mean())
    mass = float((probs * att).sum(-1).mean())
    return key_recall, mass


class CompareLayer(BackendLayer):
    """Runs dense and a candidate backend on the same inputs; returns the dense output.

    Parameters
    ----------
    candidate : BackendLayer
        The backend under test (``record_attended`` is switched on).
    ctx : LayerContext
    top_k : int
        k for key recall.
    max_queries : int
        Metrics at prefill use the last ``max_queries`` prompt queries only.
    """

    name = "compare"

    def __init__(self, candidate: BackendLayer, ctx: LayerContext, top_k: int = 64, max_queries: int = 32):
        super().__init__(DenseConfig(), ctx)
        self.dense = DenseLayer(DenseConfig(), ctx)
        self.candidate = candidate
        self.candidate.record_attended = True
        self.candidate.record_attended_rows = max_queries  # _measure reads the last max_queries rows only
        self.top_k = top_k
        self.max_queries = max_queries
        self.records: list[dict[str, float]] = []

    def _measure(self, phase: str, q, ref, out) -> None:
        keys = self.dense.kv.keys()
        Sq = min(q.shape[2], self.max_queries)
        probs = attention_probs(q[:, :, -Sq:], keys, self.ctx.scale)
        att = self.candidate.attended
        if att is not None:
            att = att[:, :, -Sq:]
        key_recall, mass = recall_metrics(probs, att, self.top_k)
        self.records.append(
            {
                "phase": phase,
                "rel_err": relative_error(out[:, :, -Sq:], ref[:, :, -Sq:]),
                "key_recall": key_recall,
                "mass_recall": mass,
            }
        )

    def prefill(self, q, k, v, positions):
        ref = self.dense.prefill(q, k, v, positions)
        out = self.candidate.prefill(q, k, v, positions)
        self._measure("prefill", q, ref, out)
        return ref

    def decode(self, q, k, v, positions):
        ref = self.dense.decode(q, k, v, positions)
        out = self.candidate.decode(q, k, v, positions)
        self._measure("decode", q, ref, out)
        return ref

    def rollback(self, n_tokens):
        self.dense.rollback(n_tokens)
        self.candidate.rollback(n_tokens)

    def memory(self):
        return self.candidate.memory()

    def stats(self):
        return self.candidate.stats()

    @property
    def seq_length(self):
        return self.dense.seq_length


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _greedy(model, input_ids: torch.Tensor, cache: LongCtxCache, steps: int
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefill ``input_ids`` into ``cache``, then feed back ``steps`` greedy tokens: the last-position
    logits ``[B, V]`` of the prefill and of every step, and the fed-back tokens ``[B, 1]``."""
    logits = [model(input_ids, **{CACHE_KWARG: cache}).logits[:, -1]]
    tokens: list[torch.Tensor] = []
    for _ in range(steps):
        tokens.append(logits[-1].argmax(-1, keepdim=True))
        logits.append(model(tokens[-1], **{CACHE_KWARG: cache}).logits[:, -1])
    return logits, tokens


class _CaptureLayer(DenseLayer):
    """Dense attention that keeps the queries it is given (the last ``prompt_queries`` of the prompt)."""

    def __init__(self, ctx: LayerContext, prompt_queries: Optional[int]):
        super().__init__(DenseConfig(), ctx)
        self.prompt_queries = prompt_queries
        self.queries: list[torch.Tensor] = []

    def prefill(self, q, k, v, positions):
        n = q.shape[2] if self.prompt_queries is None else min(self.prompt_queries, q.shape[2])
        self.queries.append(q[:, :, q.shape[2] - n:].clone())
        return super().prefill(q, k, v, positions)

    def decode(self, q, k, v, positions):
        self.queries.append(q.clone())
        return super().decode(q, k, v, positions)


@dataclasses.dataclass
class AttentionCapture:
    """Post-RoPE attention inputs of every layer from a dense greedy run (:func:`capture_attention`).

    Attributes
    ----------
    queries : list of torch.Tensor
        Per layer ``[B, H, Q, D]``: the last ``prompt_queries`` prompt queries, then the query of
        each generated token that was fed back (all but the last).
    keys, values : list of torch.Tensor
        Per layer ``[B, Hkv, T, D]``: the prompt's and the fed-back tokens' (``T = prompt + Q_gen``).
    query_positions : torch.Tensor
        ``[Q]`` token index of each query (the key it is aligned with is ``keys[..., p, :]``).
    tokens : torch.Tensor
        ``[B, new_tokens]`` the greedy continuation.
    contexts : list of LayerContext
        Per layer shapes, softmax ``scale`` and the model's rotary helper.
    """

    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    query_positions: torch.Tensor
    tokens: torch.Tensor
    contexts: list[LayerContext]

    @property
    def scale(self) -> float:
        """Softmax scale of the attention (the same in every layer of the supported models)."""
        return self.contexts[0].scale

    def probs(self, layer: int) -> torch.Tensor:
        """Dense causal attention probabilities ``[B, H, Q, T]`` of ``layer``'s captured queries."""
        q, k = self.queries[layer], self.keys[layer]
        scores = torch.matmul(q.float().reshape(q.shape[0], k.shape[1], -1, q.shape[-1]),
                              k.float().transpose(-1, -2)) * self.contexts[layer].scale
        scores = scores.reshape(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        future = torch.arange(k.shape[2], device=q.device)[None] > self.query_positions.to(q.device)[:, None]
        return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


@torch.no_grad()
def capture_attention(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int = 1,
                      prompt_queries: Optional[int] = 1) -> AttentionCapture:
    """Run ``model`` with dense attention on ``input_ids``, decode ``new_tokens`` greedily, and keep
    every layer's post-RoPE queries, keys and values (what a backend is handed).

    Parameters
    ----------
    model : transformers causal LM of a supported type.
    input_ids : ``[B, P]`` prompt.
    new_tokens : tokens to generate greedily (``>= 1``); the first ``new_tokens - 1`` are fed back,
        so their queries and keys are captured.
    prompt_queries : how many of the last prompt queries to keep (``None``: all ``P``; a 32K
        prompt's queries are ``P x H x D`` floats per layer).

    Returns
    -------
    AttentionCapture
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids requires shape [B, P] with P >= 1 (got {tuple(input_ids.shape)})")
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens requires an int >= 1 (got {new_tokens!r})")
    if prompt_queries is not None and (not isinstance(prompt_queries, int) or prompt_queries < 1):
        raise ValueError(f"prompt_queries requires None or an int >= 1 (got {prompt_queries!r})")
    layers: list[_CaptureLayer] = []

    def factory(ctx: LayerContext) -> BackendLayer:
        layers.append(_CaptureLayer(ctx, prompt_queries))
        return layers[-1]

    with patch(model, "dense") as handle:
        contexts = handle.contexts
        logits, _ = _greedy(model, input_ids, LongCtxCache(factory, contexts), new_tokens - 1)
    tokens = [step.argmax(-1, keepdim=True) for step in logits]
    P = input_ids.shape[1]
    n_prompt = P if prompt_queries is None else min(prompt_queries, P)
    positions = torch.arange(P - n_prompt, P + new_tokens - 1)
    return AttentionCapture(
        queries=[torch.cat(layer.queries, dim=2) for layer in layers],
        keys=[layer.kv.keys().clone() for layer in layers],
        values=[layer.kv.values().clone() for layer in layers],
        query_positions=positions,
        tokens=torch.cat(tokens, dim=1),
        contexts=list(contexts),
    )


@torch.no_grad()
def compare_backend(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    backend: Union[str, BackendConfig],
    options: Optional[dict[str, Any]] = None,
    decode_steps: int = 8,
    top_k: int = 64,
) -> dict[str, Any]:
    """Fidelity report of one backend vs dense on ``model`` and ``input_ids`` (batch 1).

    Parameters
    ----------
    model : transformers causal LM of a supported type.
    input_ids : ``[1, T]`` prompt.
    backend : name or config of the candidate.
    options : config fields when ``backend`` is a name.
    decode_steps : greedy decode steps measured after the prompt.
    top_k : k for key recall.

    Returns
    -------
    dict with ``per_layer`` (prefill/decode rel. error, key and mass recall per layer),
    ``per_step`` (KL and mean rel. error per decode step) and ``summary``.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids requires shape [1, T] (got {tuple(input_ids.shape)})")
    if decode_steps < 1:
        raise ValueError(f"decode_steps requires an int >= 1 (got {decode_steps})")
    spec, config = resolve_config(backend, options)

    with patch(model, "dense") as handle:
        contexts = handle.contexts
        compare_layers: list[CompareLayer] = []

        def factory(ctx: LayerContext) -> BackendLayer:
            layer = CompareLayer(spec.layer_cls(config, ctx), ctx, top_k=top_k)
            compare_layers.append(layer)
            return layer

        dense_logits, tokens = _greedy(model, input_ids, LongCtxCache(factory, contexts), decode_steps)

    with patch(model, config) as handle:
        cache = handle.new_cache()
        cand_logits = [model(input_ids, **{CACHE_KWARG: cache}).logits[:, -1]]
        for nxt in tokens:
            cand_logits.append(model(nxt, **{CACHE_KWARG: cache}).logits[:, -1])
        stats = cache.stats()

    per_layer = []
    for layer in compare_layers:
        pre = [r for r in layer.records if r["phase"] == "prefill"]
        dec = [r for r in layer.records if r["phase"] == "decode"]
        per_layer.append(
            {
                "layer": layer.ctx.layer_idx,
                "prefill_rel_err": _mean([r["rel_err"] for r in pre]),
                "decode_rel_err": _mean([r["rel_err"] for r in dec]),
                "key_recall": _mean([r["key_recall"] for r in dec] or [r["key_recall"] for r in pre]),
                "mass_recall": _mean([r["mass_recall"] for r in dec] or [r["mass_recall"] for r in pre]),
            }
        )
    per_step = []
    for step, (p, q) in enumerate(zip(dense_logits, cand_logits)):
        lp, lq = torch.log_softmax(p.float(), -1), torch.log_softmax(q.float(), -1)
        kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
        errs = [layer.records[step]["rel_err"] for layer in compare_layers if step < len(layer.records)]
        per_step.append({"step": step, "kl": kl, "rel_err": _mean(errs), "argmax_agree": bool((p.argmax(-1) == q.argmax(-1)).all())})
    return {
        "backend": spec.name,
        "config": config.to_dict(),
        "prompt_tokens": int(input_ids.shape[1]),
        "per_layer": per_layer,
        "per_step": per_step,
        "summary": {
            "mean_rel_err": _mean([r["decode_rel_err"] for r in per_layer]),
            "mean_key_recall": _mean([r["key_recall"] for r in per_layer]),
            "mean_mass_recall": _mean([r["mass_recall"] for r in per_layer]),
            "mean_kl": _mean([s["kl"] for s in per_step]),
            "argmax_agreement": _mean([float(s["argmax_agree"]) for s in per_step]),
        },
        "stats": stats,
    }


def compare_backends(model, input_ids, backends: list[str], options: Optional[dict[str, Any]] = None,
                     **kwargs) -> list[dict]:
    """:func:`compare_backend` for several backends.

    Parameters
    ----------
    backends : entries ``"NAME"`` or ``"NAME:key=value,..."`` (one backend with its own
        options; the same backend may appear with different options).
    options : for every entry except dense (``key``) or for one backend (``NAME.key``; NAME must be
        among the entries); an entry's own options win.
    **kwargs : :func:`compare_backend`'s ``decode_steps`` and ``top_k``.

    Returns
    -------
    One report per entry, its ``backend`` field the entry as given.
    """
    entries = [entry.strip() for entry in backends]
    repeated = sorted({entry for entry in entries if entries.count(entry) > 1})
    if repeated:
        raise ValueError(f"compare_backends requires each entry once (got {repeated} more than once in {entries})")
    parsed = [parse_backend_entry(entry, what="backend entry") for entry in entries]
    common, targeted = split_options(options, [name for name, _ in parsed], what="options")
    reports = []
    for entry, (name, inline) in zip(entries, parsed):
        opts = {**({} if name == "dense" else common), **targeted.get(name, {}), **inline}
        report = compare_backend(model, input_ids, name, opts, **kwargs)
        report["backend"] = entry
        reports.append(report)
    return reports


def format_report(reports: list[dict]) -> str:
    """Markdown summary: one row per backend and layer."""
    lines = ["| backend | layer | prefill rel err | decode rel err | key recall | mass recall |", "|---|---|---|---|---|---|"]
    for rep in reports:
        for row in rep["per_layer"]:
            lines.append(
                f"| {rep['backend']} | {row['layer']} | {row['prefill_rel_err']:.2e} | {row['decode_rel_err']:.2e} | "
                f"{row['key_recall']:.3f} | {row['mass_recall']:.3f} |"
            )
    lines.append("")
    lines.append("| backend | mean KL per step | greedy agreement |")
    lines.append("|---|---|---|")
    for rep in reports:
        s = rep["summary"]
        lines.append(f"| {rep['backend']} | {s['mean_kl']:.3e} | {s['argmax_agreement']:.2f} |")
    return "\n".join(lines)
