"""TriForce: lossless hierarchical speculative decoding over any longctx backend (arXiv 2404.11912).

Three levels, each one model plus one :class:`~longctx.cache.LongCtxCache`:

1. **draft** — a small model with a StreamingLLM cache (``"streaming"`` backend: sinks +
   recent window, slot positions); proposes ``draft_gamma`` tokens at a time (adaptive by
   default, 0 when the draft does not pay for itself, see :class:`DraftLength`);
2. **middle** — the target's weights reading a sparse cache (``"triforce_retrieval"``, the
   paper's chunk retrieval, or any registered backend: ``"shadowkv"``, ``"hip"``, ...);
   verifies the draft's tokens until it holds a block of ``gamma`` tokens;
3. **top** — the target reading its full (dense) cache; verifies the block in one forward.

The target is patched once; its middle and top caches are two LongCtxCaches built on the
same patch handle, and the attention function routes each forward by the cache passed in.
The prompt goes through the target once: the full-cache prefill also builds the middle
cache from the same K/V (:meth:`~longctx.cache.LongCtxCache.mirror_prefill`).
Both verifications use :mod:`longctx.speculative.sampling` (greedy, or accept with
``min(1, p/q)`` and resample from the residual), so every emitted token is distributed as
the target's own sampling, and equals it under greedy decoding, whatever the middle
backend or the draft. Rejected tokens leave every cache through ``cache.rollback(n)``.

Bookkeeping: ``seq`` holds prompt + committed tokens (+ speculative tokens while a level
runs); each level knows how many of its tokens are in its cache (``cached``) and feeds
the rest; the newest committed token is in no cache yet. A rejection truncates ``seq``
and rolls back every level that had cached past the cut.

Batch > 1: every sequence runs its own acceptance test and the batch commits the smallest
accepted length (see :func:`~longctx.speculative.sampling.commit_uniform`, which keeps it
lossless), so the caches roll back uniformly.

Through ``model.generate``: :func:`triforce_decoding` is a ``custom_generate`` callable
(transformers' public extension point for a whole decoding method; a custom candidate
generator cannot be passed to ``generate`` without private API), e.g.
``target.generate(ids, custom_generate=triforce_decoding, draft_model=draft, max_new_tokens=64)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from longctx.backends import resolve_config
from longctx.cache import LongCtxCache
from longctx.compat import CACHE_KWARG
from longctx.config import BackendConfig, StreamingConfig
from longctx.speculative.sampling import (
    commit_uniform,
    greedy_verify,
    sample,
    speculative_verify,
    warp_logits,
)

logger = logging.getLogger(__name__)

DEFAULT_GAMMA = 6  # tokens per full-cache verification: TriForce's on-chip A100 setting

VerifyRule = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------- stats
@dataclasses.dataclass
class TriForceStats:
    """Counters of one TriForce generation (acceptances are averaged over the batch's sequences)."""

    new_tokens: int = 0
    draft_proposed: int = 0  # draft tokens the middle level verified (per sequence)
    draft_accepted: float = 0.0  # ... of which its test accepted
    middle_proposed: int = 0  # block tokens the full-cache target verified (per sequence)
    middle_accepted: float = 0.0
    top_forwards: int = 0  # full-cache target forwards after the prefill
    middle_forwards: int = 0
    draft_forwards: int = 0
    committed: int = 0  # tokens committed by the verifications (every token but the first)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_cpu_s: float = 0.0  # process CPU time of the decode (steadier than wall time on a shared machine)
    draft_s: float = 0.0  # decode wall time inside each level's forwards (host-side timing)
    middle_s: float = 0.0
    top_s: float = 0.0

    @property
    def acceptance_middle(self) -> float:
        """Fraction of draft tokens accepted by the middle level."""
        return self.draft_accepted / max(self.draft_proposed, 1)

    @property
    def acceptance_top(self) -> float:
        """Fraction of middle-level tokens accepted by the full-cache target."""
        return self.middle_accepted / max(self.middle_proposed, 1)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per full-cache verification (accepted + the residual/bonus token)."""
        return self.committed / max(self.top_forwards, 1)

    @property
    def target_forwards_per_token(self) -> float:
        """Full-cache target forwards per generated token (1.0 for autoregressive decoding)."""
        return self.top_forwards / max(self.committed, 1)

    @property
    def ms_per_token(self) -> float:
        """Decode wall time per generated token after the first (which the prefill gives)."""
        return 1000.0 * self.decode_s / max(self.committed, 1)

    @property
    def cpu_ms_per_token(self) -> float:
        """Decode process CPU time per generated token after the first."""
        return 1000.0 * self.decode_cpu_s / max(self.committed, 1)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("acceptance_middle", "acceptance_top", "mean_accepted_length", "target_forwards_per_token",
                     "ms_per_token", "cpu_ms_per_token"):
            out[name] = getattr(self, name)
        out["middle_forwards_per_token"] = self.middle_forwards / max(self.committed, 1)
        out["mean_draft_length"] = self.draft_proposed / max(self.middle_forwards, 1)
        out["draft_forwards_per_token"] = self.draft_forwards / max(self.committed, 1)
        return out


# ----------------------------------------------------------------------------------------- levels
class Level:
    """One model and one cache; ``cached`` tokens of the shared sequence are in the cache."""

    def __init__(self, model: torch.nn.Module, cache: LongCtxCache):
        self.model, self.cache, self.cached, self.forwards, self.seconds = model, cache, 0, 0, 0.0

    def feed(self, seq: "TokenSequence", end: int, keep: int) -> torch.Tensor:
        """Run the model on ``seq[cached:end]``; returns the last ``keep`` positions' logits ``[B, keep, V]``."""
        t0 = time.perf_counter()
        kwargs = {CACHE_KWARG: self.cache, "use_cache": True, "logits_to_keep": keep}
        if seq.mask is not None:
            kwargs["attention_mask"] = seq.mask[:, :end]
        out = self.model(input_ids=seq.ids[:, self.cached : end], position_ids=seq.pos[:, self.cached : end], **kwargs)
        self.cached = end
        self.forwards += 1
        self.seconds += time.perf_counter() - t0
        return out.logits[:, -keep:]

    def feed_prompt_with(self, other: "Level", seq: "TokenSequence", keep: int) -> torch.Tensor:
        """Prefill the whole prompt ``seq`` through this level; the same forward builds ``other``'s cache.

        ``other`` is a level of the same model with an empty cache (``LongCtxCache.mirror_prefill``).
        Returns this level's last ``keep`` logits ``[B, keep, V]``.
        """
        with self.cache.mirror_prefill(other.cache):
            logits = self.feed(seq, len(seq), keep)
        other.cached = len(seq)
        return logits

    def truncate(self, length: int) -> None:
        """Roll the cache back to the first ``length`` tokens of the sequence."""
        if self.cached > length:
            self.cache.rollback(self.cached - length)
            self.cached = length


class TokenSequence:
    """Token ids ``[B, N]`` with their RoPE positions and (left-padded prompts only) the 2D mask."""

    def __init__(self, ids: torch.Tensor, mask: Optional[torch.Tensor], room: int):
        B, P = ids.shape
        if mask is not None and bool(mask.all()):
            mask = None
        if mask is None:
            self.pos = torch.arange(P + room, device=ids.device).expand(B, -1)
        else:
            prompt_pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # transformers' rule for left padding
            gen_pos = prompt_pos[:, -1:] + torch.arange(1, room + 1, device=ids.device)
            self.pos = torch.cat([prompt_pos, gen_pos], 1)
            mask = torch.cat([mask.long(), mask.new_ones(B, room).long()], 1)
        self.ids, self.mask = ids, mask

    def __len__(self) -> int:
        return self.ids.shape[1]

    def append(self, tokens: torch.Tensor) -> None:
        """Append ``[B]`` or ``[B, n]`` tokens."""
        self.ids = torch.cat([self.ids, tokens.reshape(self.ids.shape[0], -1)], 1)

    def cut(self, length: int) -> None:
        self.ids = self.ids[:, :length]


# ----------------------------------------------------------------------------------------- rules
class Rules:
    """Turns logits into proposals and runs the verifications (greedy or stochastic).

    Parameters
    ----------
    greedy : bool
        Argmax proposals and :func:`greedy_verify`; else sampling and ``middle_verify`` /
        ``top_verify`` (default :func:`speculative_verify` at both levels).
    process : callable
        ``process(seq, start, logits)`` maps raw logits ``[B, n, V]`` at positions ``start ..
        start+n-1`` (prefix ``seq.ids[:, :start+i]``) to the scores sampled from (temperature,
        top-k/p, or transformers' logits processors).
    generator : torch.Generator, optional
        Randomness of the proposals, acceptance coins and resampling.
    middle_verify, top_verify : callable
        Verification rule per level, ``rule(tokens, q, p, generator) -> (n_accepted, next_token)``
        (tests swap in the official code's middle-level rule to show it is not lossless).
    """

    def __init__(self, greedy: bool, process: Callable, generator: Optional[torch.Generator] = None,
                 middle_verify: VerifyRule = speculative_verify, top_verify: VerifyRule = speculative_verify):
        self.greedy, self.process, self.generator = greedy, process, generator
        self.middle_verify, self.top_verify = middle_verify, top_verify

    @classmethod
    def from_options(cls, temperature: float = 0.0, top_p: float = 1.0, top_k: Optional[int] = None,
                     generator: Optional[torch.Generator] = None, **rules: VerifyRule) -> "Rules":
        """Greedy at ``temperature == 0``, else sampling from ``warp_logits(logits, temperature, top_p, top_k)``."""
        if temperature == 0:
            return cls(True, lambda seq, start, logits: logits.float(), generator, **rules)
        return cls(False, lambda seq, start, logits: warp_logits(logits, temperature, top_p, top_k), generator, **rules)

    def dist(self, seq: TokenSequence, start: int, logits: torch.Tensor) -> torch.Tensor:
        """Scores (greedy) or probabilities (sampling) ``[B, n, V]``."""
        scores = self.process(seq, start, logits)
        return scores if self.greedy else scores.softmax(-1)

    def pick(self, dist: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` -> ``[B]`` proposed token."""
        return dist.argmax(-1) if self.greedy else sample(dist, self.generator)

    def verify(self, level: str, tokens: torch.Tensor, q: Optional[torch.Tensor], p: torch.Tensor):
        if self.greedy:
            return greedy_verify(tokens, p)
        rule = self.middle_verify if level == "middle" else self.top_verify
        return rule(tokens, q, p, self.generator)


# ----------------------------------------------------------------------------------------- draft length
class DraftLength:
    """How many tokens the draft proposes per middle verification.

    A fixed ``value``, or (``value=None``) the length that maximises the expected tokens per
    second of the middle level: with per-token draft acceptance ``a``, ``g`` draft tokens
    yield ``(1 - a^(g+1)) / (1 - a)`` tokens for ``g·c_draft + c_middle`` seconds (measured
    costs per forward, exponential moving averages). ``g = 0`` lets the middle level propose
    alone when the draft does not pay for itself (e.g. the digits of a retrieved needle,
    which a StreamingLLM draft cannot see); every ``probe_every``-th such step still drafts
    one token to keep the estimate of ``a`` fresh. Any schedule keeps the output lossless:
    the choice only uses tokens already verified.

    Parameters
    ----------
    value : int, optional
        Fixed draft length (>= 1); ``None`` adapts in ``[0, max_len]``.
    max_len : int
        Upper bound of the adaptive length.
    """

    def __init__(self, value: Optional[int], max_len: int, probe_every: int = 8, decay: float = 0.8):
        self.value, self.max_len, self.probe_every, self.decay = value, max_len, probe_every, decay
        self.successes, self.tests = 1.0, 2.0  # prior: a = 0.5
        self.cost_draft: Optional[float] = None
        self.cost_middle: Optional[float] = None
        self._skipped = 0

    @property
    def acceptance(self) -> float:
        return self.successes / self.tests

    def choose(self) -> int:
        if self.value is not None:
            return self.value
        if self.cost_draft is None or self.cost_middle is None:
            return min(2, self.max_len)  # measure both costs first
        a = min(self.acceptance, 0.999)
        rate = [(1 - a ** (g + 1)) / (1 - a) / (g * self.cost_draft + self.cost_middle)
                for g in range(self.max_len + 1)]
        best = max(range(len(rate)), key=rate.__getitem__)
        if best == 0:
            self._skipped += 1
            if self._skipped >= self.probe_every:
                self._skipped, best = 0, 1
        return best

    def update(self, proposed: int, accepted: float, rejected: float, draft_s: float, middle_s: float) -> None:
        """Record one middle step: mean accepted and rejected-test counts over the batch, wall seconds."""
        d = self.decay
        if proposed:
            self.successes = d * self.successes + accepted
            self.tests = d * self.tests + accepted + rejected
            per = draft_s / proposed
            self.cost_draft = per if self.cost_draft is None else d * self.cost_draft + (1 - d) * per
        self.cost_middle = middle_s if self.cost_middle is None else d * self.cost_middle + (1 - d) * middle_s


# ----------------------------------------------------------------------------------------- the loop
class TriForceEngine:
    """The three-level loop over prepared levels (use :func:`triforce_generate`)."""

    def __init__(self, draft: Level, middle: Level, top: Level, rule: Rules, gamma: int, draft_gamma: DraftLength):
        self.draft, self.middle, self.top, self.rule = draft, middle, top, rule
        self.gamma, self.draft_gamma = gamma, draft_gamma
        self.stats = TriForceStats()

    def _truncate(self, length: int) -> None:
        for level in (self.draft, self.middle, self.top):
            level.truncate(length)

    def middle_block(self, seq: TokenSequence, size: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Speculate ``>= size`` tokens distributed as the middle level.

        Returns the tokens ``[B, k]`` and the middle's distributions at them ``[B, k, V]``
        (``None`` when greedy or nothing was proposed).
        """
        st, C = self.stats, len(seq)
        qs = []
        while len(seq) - C < size:
            g1 = min(self.draft_gamma.choose(), size - (len(seq) - C))
            start = len(seq)
            # draft: g1 tokens, one forward each (g1 = 0: the middle level proposes alone)
            t0 = time.perf_counter()
            d = []
            for _ in range(g1):
                dist = self.rule.dist(seq, len(seq), self.draft.feed(seq, len(seq), 1))[:, -1]
                d.append(dist)
                seq.append(self.rule.pick(dist))
            y = seq.ids[:, start:]  # [B, g1]
            # middle: verify all g1 in one forward (+ the distribution after them)
            t1 = time.perf_counter()
            m = self.rule.dist(seq, start, self.middle.feed(seq, len(seq), g1 + 1))  # [B, g1+1, V]
            q = None if self.rule.greedy else (torch.stack(d, 1) if d else m[:, :0])
            n, z = self.rule.verify("middle", y, q, m)
            k, z = commit_uniform(n, z, y)
            t2 = time.perf_counter()
            seq.cut(start + k)
            seq.append(z)
            self.draft.truncate(start + k)
            self.middle.truncate(start + k)
            qs.append(m[:, : k + 1])
            accepted = float(n.float().mean())
            st.draft_proposed += g1
            st.draft_accepted += accepted
            self.draft_gamma.update(g1, accepted, float((n < g1).float().mean()), t1 - t0, t2 - t1)
        block = seq.ids[:, C:]
        seq.cut(C)
        return block, torch.cat(qs, 1) if qs else None

    def step(self, seq: TokenSequence, remaining: int) -> torch.Tensor:
        """One full-cache verification; appends the committed tokens to ``seq`` and returns them ``[B, n]``."""
        st, C = self.stats, len(seq)
        block, q = self.middle_block(seq, min(self.gamma, remaining - 1))
        k = block.shape[1]
        seq.append(block)
        p = self.rule.dist(seq, C, self.top.feed(seq, C + k, k + 1))  # [B, k+1, V]
        if q is None and not self.rule.greedy:
            q = p[:, :0]  # nothing proposed: the "verification" samples from p_1 directly
        n, z = self.rule.verify("top", block, q, p)
        m, z = commit_uniform(n, z, block)
        seq.cut(C + m)
        seq.append(z)
        self._truncate(C + m)
        st.middle_proposed += k
        st.middle_accepted += float(n.float().mean())
        return seq.ids[:, C:]

    def prefill(self, seq: TokenSequence) -> None:
        """Prefill the three caches with the prompt ``seq`` and append the first token (the target's own).

        The target runs over the prompt once: its full-cache forward also builds the middle
        cache from the same K/V (:meth:`LongCtxCache.mirror_prefill`), as the official code
        builds its retrieval cache from the full one.
        """
        P = len(seq)
        t0 = time.perf_counter()
        first = self.rule.dist(seq, P, self.top.feed_prompt_with(self.middle, seq, 1))[:, -1]
        self.draft.feed(seq, P, 1)
        seq.append(self.rule.pick(first))
        self.stats.prefill_s = time.perf_counter() - t0

    def decode(self, seq: TokenSequence, max_new_tokens: int, eos: Optional[torch.Tensor]) -> torch.Tensor:
        """Verify blocks until ``seq`` holds ``max_new_tokens`` after the prompt (or EOS in every row).

        ``seq`` ends with one token that no cache holds yet (the first token after a prefill);
        every level's cache holds ``seq`` up to it.
        """
        st, P = self.stats, len(seq) - 1
        levels = (self.draft, self.middle, self.top)
        forwards0, seconds0 = [lv.forwards for lv in levels], [lv.seconds for lv in levels]
        finished = _hits(seq.ids[:, P:], eos)
        t0, c0 = time.perf_counter(), time.process_time()
        while len(seq) - P < max_new_tokens and not bool(finished.all()):
            new = self.step(seq, max_new_tokens - (len(seq) - P))
            finished |= _hits(new, eos)
        st.decode_s, st.decode_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        st.draft_forwards, st.middle_forwards, st.top_forwards = (lv.forwards - f for lv, f in zip(levels, forwards0))
        st.draft_s, st.middle_s, st.top_s = (lv.seconds - s for lv, s in zip(levels, seconds0))
        seq.cut(P + max_new_tokens)  # the last block may overshoot
        st.new_tokens = len(seq) - P
        st.committed = st.new_tokens - 1
        return seq.ids

    def run(self, seq: TokenSequence, max_new_tokens: int, eos: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`prefill` then :meth:`decode`; returns the ids ``[B, T + n]``."""
        self.prefill(seq)
        return self.decode(seq, max_new_tokens, eos)


def _hits(tokens: torch.Tensor, eos: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B]`` bool: the row contains an EOS token."""
    if eos is None:
        return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    return torch.isin(tokens, eos).any(-1)


def trim_after_eos(ids: torch.Tensor, prompt_len: int, eos: Optional[torch.Tensor], pad: Optional[int]) -> torch.Tensor:
    """As transformers: stop at the last row's first EOS; later tokens of finished rows become ``pad``."""
    if eos is None:
        return ids
    gen = ids[:, prompt_len:]
    is_eos = torch.isin(gen, eos)
    done = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    if bool(is_eos.any(-1).all()):
        first = is_eos.long().argmax(-1)
        gen = gen[:, : int(first.max()) + 1]
        done = done[:, : gen.shape[1]]
    fill = pad if pad is not None else int(eos[0])
    return torch.cat([ids[:, :prompt_len], gen.masked_fill(done, fill)], 1)


# ----------------------------------------------------------------------------------------- setup
def _vocab_size(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_pair(target: torch.nn.Module, draft: torch.nn.Module, tokenizers: Optional[Sequence[Any]] = None) -> None:
    """Check that ``draft`` can speculate for ``target``: the same vocabulary (and tokenizer, when given).

    Raises
    ------
    ValueError
        Different vocabulary sizes or token ids for the same tokens.
    """
    vt, vd = _vocab_size(target), _vocab_size(draft)
    if vt != vd or target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(
            "TriForce requires the draft to share the target's vocabulary "
            f"(got target vocab_size={vt}, draft vocab_size={vd})"
        )
    if tokenizers is not None:
        t_tok, d_tok = tokenizers
        if t_tok.get_vocab() != d_tok.get_vocab():
            raise ValueError("TriForce requires the draft's tokenizer to equal the target's "
                             "(their vocabularies differ)")


def _handle(model: torch.nn.Module, stack: contextlib.ExitStack):
    """The model's patch handle; patches it (restored on exit) when it is not patched yet."""
    from longctx.patch import patch

    handle = getattr(model, "_longctx_handle", None)
    if handle is None:
        handle = stack.enter_context(patch(model, "dense"))
    return handle


def build_cache(
    handle, backend: Union[str, BackendConfig], options: Optional[Mapping[str, Any]] = None
) -> LongCtxCache:
    """A LongCtxCache of ``backend`` for the model of patch ``handle``.

    Several may coexist on one model: each forward routes by the cache passed in.
    """
    spec, config = resolve_config(backend, options)
    return LongCtxCache(lambda ctx: spec.layer_cls(config, ctx), handle.contexts)


def _check_args(input_ids, attention_mask, max_new_tokens, gamma, draft_gamma, temperature, top_p) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        got = getattr(input_ids, "shape", input_ids)
        raise ValueError(f"triforce_generate requires input_ids as an int64 [B, T] tensor (got {got!r})")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"triforce_generate requires attention_mask of shape {tuple(input_ids.shape)} "
                         f"(got {tuple(attention_mask.shape)})")
    for name, value in (("max_new_tokens", max_new_tokens), ("gamma", gamma), ("draft_gamma", draft_gamma)):
        if name == "draft_gamma" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"triforce_generate requires {name} >= 1 (got {value!r})")
    if not temperature >= 0:
        raise ValueError(f"triforce_generate requires temperature >= 0 (got {temperature})")
    if not 0 < top_p <= 1:
        raise ValueError(f"triforce_generate requires top_p in (0, 1] (got {top_p})")


def _build_engine(
    target, draft, stack, *, gamma, draft_gamma, middle, middle_options, draft_cache, rule
) -> TriForceEngine:
    th = _handle(target, stack)
    dh = th if draft is target else _handle(draft, stack)
    dc = draft_cache if draft_cache is not None else StreamingConfig()
    if isinstance(dc, Mapping):
        dc_backend, dc_opts = "streaming", dict(dc)
    else:
        dc_backend, dc_opts = dc, None
    levels = (
        Level(draft, build_cache(dh, dc_backend, dc_opts)),
        Level(target, build_cache(th, middle, middle_options)),
        Level(target, build_cache(th, "dense")),
    )
    return TriForceEngine(*levels, rule=rule, gamma=gamma, draft_gamma=DraftLength(draft_gamma, gamma))


@torch.no_grad()
def triforce_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: Optional[int] = None,
    gamma: int = DEFAULT_GAMMA,
    draft_gamma: Optional[int] = None,
    middle: Union[str, BackendConfig] = "triforce_retrieval",
    middle_options: Optional[Mapping[str, Any]] = None,
    draft_cache: Union[None, str, BackendConfig, Mapping[str, Any]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    _rule: Optional[Rules] = None,  # internal: tests swap the verification rules
) -> tuple[torch.Tensor, TriForceStats]:
    """Generate with TriForce's three-level speculation; lossless with respect to ``target``.

    Parameters
    ----------
    target, draft : transformers.PreTrainedModel
        Causal LMs sharing a vocabulary, of a supported ``model_type`` (MHA or GQA). They are
        patched for the call (and restored) unless already patched; ``draft`` may be
        ``target`` itself (self-speculation with a small draft cache).
    input_ids : torch.Tensor
        ``[B, T]`` int64 prompt (left-padded when B > 1 with ragged lengths).
    max_new_tokens : int
        Tokens to generate (fewer when every row emitted ``eos_token_id``).
    temperature : float
        0 (default) decodes greedily; > 0 samples from ``softmax(logits / temperature)``.
    top_p, top_k : float, int
        Nucleus / top-k truncation of every level's distribution when sampling (default off).
    gamma : int
        Tokens the middle level proposes per full-cache verification (default 6).
    draft_gamma : int, optional
        Tokens the draft proposes per middle verification. Default ``None``: adaptive in
        ``[0, gamma]`` (see :class:`DraftLength`; the official code drafts 1). The adaptive
        length is chosen from measured wall-clock costs, so the statistics (acceptances,
        forwards per token) vary from run to run with the machine's load; the output does
        not. Give an int for reproducible statistics.
    middle : str or BackendConfig
        Middle-level backend: ``"triforce_retrieval"`` (default: chunk 8, budget 4096) or
        any registered backend name / config.
    middle_options : mapping, optional
        Options of a middle backend given by name (``{"budget": 2048}``).
    draft_cache : str, BackendConfig or mapping, optional
        The draft's cache: default ``StreamingConfig()`` (16 sinks + 240 recent); a mapping
        is read as ``"streaming"`` options; any backend name/config works.
    attention_mask : torch.Tensor, optional
        ``[B, T]`` left-padding mask.
    eos_token_id : int or list of int, optional
        Stop a row at its first EOS (as ``generate``; later tokens become ``pad_token_id``).
        Default ``None``: exactly ``max_new_tokens`` tokens.
    pad_token_id : int, optional
        Filler after EOS (default: the first EOS id).
    generator : torch.Generator, optional
        Randomness for sampling, on the model's device.

    Returns
    -------
    sequences : torch.Tensor
        ``[B, T + n]`` prompt and generated tokens.
    stats : TriForceStats
        Acceptance per level, mean accepted length, forwards and wall time per token.

    Raises
    ------
    ValueError
        Mismatched vocabularies, ``gamma``/``draft_gamma``/``max_new_tokens`` < 1, a bad
        temperature/top_p, an unknown middle backend or a bad middle option (e.g. a budget
        below one chunk).
    """
    _check_args(input_ids, attention_mask, max_new_tokens, gamma, draft_gamma, temperature, top_p)
    check_pair(target, draft)
    resolve_config(middle, middle_options)  # validates the middle backend before patching anything
    rule = _rule or Rules.from_options(temperature, top_p, top_k, generator)
    device = next(target.parameters()).device
    input_ids = input_ids.to(device)
    eos = None
    if eos_token_id is not None:
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    with contextlib.ExitStack() as stack:
        engine = _build_engine(target, draft, stack, gamma=gamma, draft_gamma=draft_gamma, middle=middle,
                               middle_options=middle_options, draft_cache=draft_cache, rule=rule)
        seq = TokenSequence(input_ids, None if attention_mask is None else attention_mask.to(device),
                        max_new_tokens + 2 * gamma + 2)
        ids = engine.run(seq, max_new_tokens, eos)
    out = trim_after_eos(ids, input_ids.shape[1], eos, pad_token_id)
    engine.stats.new_tokens = out.shape[1] - input_ids.shape[1]  # tokens after an EOS are not delivered
    engine.stats.committed = engine.stats.new_tokens - 1
    logger.info("triforce: %d tokens, %.2f ms/token, acceptance middle %.3f top %.3f, %.2f tokens/verification",
                engine.stats.new_tokens, engine.stats.ms_per_token, engine.stats.acceptance_middle,
                engine.stats.acceptance_top, engine.stats.mean_accepted_length)
    return out, engine.stats


# ----------------------------------------------------------------------------------------- model.generate
def _hf_process(logits_processor) -> Callable:
    """Apply transformers' logits processors position by position, each with its own prefix."""

    def process(seq: TokenSequence, start: int, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if not logits_processor:
            return logits
        cols = [logits_processor(seq.ids[:, : start + i], logits[:, i]) for i in range(logits.shape[1])]
        return torch.stack(cols, 1)

    return process


@torch.no_grad()
def triforce_decoding(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    draft_model: Optional[torch.nn.Module] = None,
    triforce_options: Optional[Mapping[str, Any]] = None,
    triforce_stats: Optional[TriForceStats] = None,
    **model_kwargs: Any,
):
    """TriForce as a ``custom_generate`` decoding method for ``model.generate``.

    >>> out = target.generate(ids, custom_generate=triforce_decoding, draft_model=draft,   # doctest: +SKIP
    ...                       max_new_tokens=64, do_sample=False, triforce_options={"gamma": 8})

    ``generate`` prepares the logits processors (temperature, top-k/p, repetition penalty,
    ...) and they are applied to every level's logits with the right prefix, so greedy
    output equals ``generate``'s own. ``max_length``/``max_new_tokens`` and EOS stop it; other
    stopping criteria are not consulted. ``triforce_options`` are :func:`triforce_generate`'s
    keywords (``gamma``, ``draft_gamma``, ``middle``, ``middle_options``, ``draft_cache``,
    ``generator``); pass a :class:`TriForceStats` as ``triforce_stats`` to receive the counters.
    """
    if draft_model is None:
        raise ValueError(
            "custom_generate=triforce_decoding requires draft_model=<a small model sharing the vocabulary>"
        )
    gc = generation_config
    if getattr(gc, "num_beams", 1) != 1 or getattr(gc, "num_return_sequences", 1) != 1:
        raise ValueError("triforce_decoding requires num_beams=1 and num_return_sequences=1")
    options = dict(triforce_options or {})
    unknown = set(options) - {"gamma", "draft_gamma", "middle", "middle_options", "draft_cache", "generator"}
    if unknown:
        raise ValueError(f"triforce_options got unknown keys {sorted(unknown)}")
    eos = getattr(gc, "_eos_token_tensor", None)
    eos_ids = None if eos is None else [int(x) for x in eos.reshape(-1)]
    pad = getattr(gc, "_pad_token_tensor", None)
    max_new = int(gc.max_length) - input_ids.shape[1]
    rule = Rules(not gc.do_sample, _hf_process(logits_processor), options.get("generator"))
    sequences, stats = triforce_generate(
        model, draft_model, input_ids, max_new, attention_mask=model_kwargs.get("attention_mask"),
        eos_token_id=eos_ids, pad_token_id=None if pad is None else int(pad), _rule=rule,
        temperature=1.0 if gc.do_sample else 0.0, **options,
    )
    if triforce_stats is not None:
        for f in dataclasses.fields(TriForceStats):
            setattr(triforce_stats, f.name, getattr(stats, f.name))
    if gc.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences
