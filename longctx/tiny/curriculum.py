"""The training curricula: :class:`Stage`, the main curriculum and the follow-up ones (continuation,
polish, key matching, retrieval supervision), and how ``train-tiny`` configures them."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from longctx.tiny.data import TRAIN_TASKS

# "basic": the copying head (every value token) and the gathering head only; "full": separate
# matching head for a value's first token, the key probe and the contrastive gathering loss;
# "two_gather": "full" with a second gathering head on the key's second part, the contrastive loss
# on both gathering heads' outputs together
RETRIEVAL_ROLES = ("basic", "full", "two_gather")


@dataclasses.dataclass
class Stage:
    """One curriculum stage: ``steps`` optimizer steps on sequences of ``min_len..max_len`` tokens.

    ``pose_prob``: share of sequences whose position ids skip ahead once (PoSE);
    ``extra_questions``: further question/answer turns per NIAH sample; ``copy_only``: copy text
    only (the induction warm-up); ``aux_weight``: weight of the :class:`PrevTokenProbes` loss;
    ``mix``: this stage's (task, weight) pairs instead of the run's mixture; ``final_weight``: loss
    weight of the last token of every copied span, ``first_weight``: of the first digit of every
    value (see :func:`final_token_weights`); ``retrieval_weight``: weight of the retrieval
    supervision (:mod:`longctx.tiny.retrieval`), ``retrieval_roles``: which of its parts
    (``RETRIEVAL_ROLES``); ``hard_keys``: chance of a near-miss key per distractor (:func:`niah_sample`);
    ``gather_spread``: the gathering head is trained to attend to every key token evenly
    (:func:`longctx.tiny.retrieval.retrieval_loss` with ``spread``) rather than to any of them.
    """

    steps: int
    min_len: int
    max_len: int
    batch_size: int
    pose_prob: float = 0.0
    extra_questions: int = 0
    copy_only: bool = False
    aux_weight: float = 0.0
    mix: Optional[tuple] = None
    final_weight: float = 1.0
    first_weight: float = 1.0
    retrieval_weight: float = 0.0
    retrieval_roles: str = "full"
    hard_keys: float = 0.0
    gather_spread: bool = False

    def __post_init__(self):
        if not 0.0 <= self.pose_prob <= 1.0:
            raise ValueError(f"Stage requires pose_prob in [0, 1] (got {self.pose_prob!r})")
        if not 0.0 <= self.hard_keys <= 1.0:
            raise ValueError(f"Stage requires hard_keys in [0, 1] (got {self.hard_keys!r})")
        if self.retrieval_roles not in RETRIEVAL_ROLES:
            raise ValueError(f"Stage requires retrieval_roles in {RETRIEVAL_ROLES} (got {self.retrieval_roles!r})")


# The recipe (third attempt, issue 7, on an idle 2-core CPU, ~30 min): (0) copy text only, with
# the previous-token probes, until the induction circuit forms (~320 steps in the trial); (1)
# RULER NIAH answers + copy text at short contexts (PoSE skips on a fifth of the sequences, so
# relative distances up to 32K are seen), probes at a lower weight; (2-4) a length curriculum to
# 16K tokens. One cosine learning-rate schedule spans all stages.
CURRICULUM = [
    Stage(steps=500, min_len=96, max_len=224, batch_size=24, copy_only=True, aux_weight=1.0),
    Stage(steps=1200, min_len=128, max_len=320, batch_size=12, pose_prob=0.2, extra_questions=4, aux_weight=0.3,
          final_weight=5.0),
    Stage(steps=400, min_len=512, max_len=1024, batch_size=4, pose_prob=0.2, extra_questions=3, final_weight=5.0),
    Stage(steps=250, min_len=1024, max_len=4096, batch_size=1, extra_questions=2, final_weight=5.0),
    Stage(steps=40, min_len=4096, max_len=16384, batch_size=1, extra_questions=1, final_weight=5.0),
]

# Continuation (a second optimizer and schedule, started from the end of CURRICULUM): after it
# the model retrieved in noise haystacks but mixed up keys among distractor needles, so more
# steps at 256-768 tokens weighted to the multi-key/value/query tasks, then 1-4K tokens.
CONTINUATION_MIX = (
    ("niah_single_1", 1.0), ("niah_single_2", 0.5), ("niah_multikey_1", 0.5), ("niah_multikey_2", 2.0),
    ("niah_multikey_3", 1.5), ("niah_multivalue", 1.5), ("niah_multiquery", 1.5), ("copy", 1.0),
)
CONTINUATION = [
    Stage(steps=900, min_len=256, max_len=768, batch_size=6, pose_prob=0.2, extra_questions=3, mix=CONTINUATION_MIX),
    Stage(steps=200, min_len=1024, max_len=4096, batch_size=1, extra_questions=1, mix=CONTINUATION_MIX),
]

# Polish (a second optimizer and schedule, started from the end of CURRICULUM): NIAH answers only,
# with the last digit of every value weighted 10x. The main curriculum leaves an induction
# circuit that copies a value's first six digits and guesses the seventh (see
# final_token_weights); these steps teach the model to finish the value.
POLISH_MIX = (
    ("niah_single_1", 1.5), ("niah_single_2", 0.5), ("niah_multikey_1", 0.5), ("niah_multikey_2", 1.5),
    ("niah_multikey_3", 1.0), ("niah_multivalue", 1.0), ("niah_multiquery", 1.0),
)
POLISH = [
    Stage(steps=400, min_len=128, max_len=384, batch_size=12, pose_prob=0.2, extra_questions=2, mix=POLISH_MIX,
          final_weight=10.0),
    Stage(steps=100, min_len=1024, max_len=4096, batch_size=1, extra_questions=2, mix=POLISH_MIX, final_weight=10.0),
]

# Key matching (a follow-up after the polish, issue 7; tried, not shipped): the polished model copies
# a whole value but picks the needle at random among distractors (multikey_2: the value of another
# key, 9 of 10 prompts at 1K). Short prompts (few needles), the tasks with distractor keys, and the
# first digit of every value (the one token that depends on the key) weighted 10x. Multikey_2 at 1K
# went 0 -> 10 (5 with 3x the steps): still chance among ~26 needles (model card).
KEYMATCH_MIX = (
    ("niah_single_1", 0.5), ("niah_multikey_1", 1.0), ("niah_multikey_2", 2.0), ("niah_multikey_3", 1.0),
    ("niah_multivalue", 1.0), ("niah_multiquery", 1.5),
)
KEYMATCH = [
    Stage(steps=600, min_len=128, max_len=512, batch_size=8, pose_prob=0.2, extra_questions=2, mix=KEYMATCH_MIX,
          final_weight=10.0, first_weight=10.0),
    Stage(steps=100, min_len=1024, max_len=4096, batch_size=1, extra_questions=2, mix=KEYMATCH_MIX,
          final_weight=10.0, first_weight=10.0),
]


# Retrieval supervision (issue 7, fifth session; the shipped target's last two runs): the polished
# model's retrieval head spread its attention evenly over a haystack of needles (multikey_2), so it
# answered with a random needle's value. These steps add the losses of longctx.tiny.retrieval
# (gathering, matching and copying heads, key probe, contrastive gathering loss) on NIAH weighted to
# the tasks with several keys, with each value's first digit (the key-dependent token) weighted 5x.
RETRIEVAL_MIX = (
    ("niah_single_1", 1.0), ("niah_single_2", 0.5), ("niah_multikey_1", 0.5), ("niah_multikey_2", 2.0),
    ("niah_multikey_3", 1.0), ("niah_multivalue", 1.0), ("niah_multiquery", 1.5),
)
RETRIEVAL = [
    Stage(steps=500, min_len=128, max_len=512, batch_size=8, pose_prob=0.2, extra_questions=2, mix=RETRIEVAL_MIX,
          final_weight=10.0, first_weight=5.0, retrieval_weight=1.0),
    Stage(steps=100, min_len=1024, max_len=4096, batch_size=1, extra_questions=2, mix=RETRIEVAL_MIX,
          final_weight=10.0, first_weight=5.0, retrieval_weight=1.0),
]


LONG_STAGE_FACTOR = 4  # the appended long stage of --stage-steps: 1-4K -> 4-16K tokens


def long_stage(last: Stage) -> Stage:
    """``last`` at ``LONG_STAGE_FACTOR`` times its lengths (from its ``max_len`` up), one extra question."""
    return dataclasses.replace(last, min_len=last.max_len, max_len=last.max_len * LONG_STAGE_FACTOR,
                               extra_questions=min(last.extra_questions, 1))


def configure_stages(stages: Sequence[Stage], steps_scale: float = 1.0, retrieval_weight: float = 0.0,
                     retrieval_roles: str = "full", first_weight: Optional[float] = None,
                     stage_steps: Optional[Sequence[int]] = None,
                     mix: Optional[Sequence[tuple[str, float]]] = None,
                     hard_keys: Optional[float] = None, gather_spread: Optional[bool] = None,
                     pose_prob: Optional[float] = None) -> list[Stage]:
    """The stages as ``train-tiny`` runs them: step counts times ``steps_scale`` (at least 1), or
    ``stage_steps`` (one count per stage) when given; ``retrieval_weight`` (when non-zero) on every
    stage but the copy warm-up; ``retrieval_roles`` on all; ``first_weight`` (when given)
    replacing each stage's; ``mix`` (when given, (task, weight) pairs from :func:`parse_mix`)
    replacing the task mixture of every stage but the copy warm-up; ``hard_keys`` and
    ``gather_spread`` (when given) replacing each stage's; ``pose_prob`` (when given) replacing
    that of every stage but the copy warm-up.

    One more count than there are stages appends a long stage (:func:`long_stage`: the last
    stage at ``LONG_STAGE_FACTOR`` times its lengths) with that many steps."""
    if stage_steps is not None:
        n = len(stages)
        if len(stage_steps) not in (n, n + 1) or any(k < 1 for k in stage_steps):
            raise ValueError(f"stage_steps requires {n} step counts >= 1, one per stage, or {n + 1} "
                             f"(the last for an appended long stage) (got {list(stage_steps)})")
        if len(stage_steps) == n + 1:
            stages = [*stages, long_stage(stages[-1])]
        counts = list(stage_steps)
    else:
        counts = [max(1, round(s.steps * steps_scale)) for s in stages]
    out = [dataclasses.replace(s, steps=n, retrieval_roles=retrieval_roles) for s, n in zip(stages, counts)]
    if retrieval_weight:
        out = [s if s.copy_only else dataclasses.replace(s, retrieval_weight=retrieval_weight) for s in out]
    if first_weight is not None:
        out = [dataclasses.replace(s, first_weight=first_weight) for s in out]
    if mix is not None:
        out = [s if s.copy_only else dataclasses.replace(s, mix=tuple(mix)) for s in out]
    if hard_keys is not None:
        out = [dataclasses.replace(s, hard_keys=hard_keys) for s in out]
    if gather_spread is not None:
        out = [dataclasses.replace(s, gather_spread=gather_spread) for s in out]
    if pose_prob is not None:
        out = [s if s.copy_only else dataclasses.replace(s, pose_prob=pose_prob) for s in out]
    return out


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """``"task:weight,task:weight"`` -> (task, weight) pairs, tasks from ``TRAIN_TASKS``, weights > 0."""
    pairs = []
    for item in (x.strip() for x in text.split(",")):
        task, sep, weight = item.partition(":")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or task not in TRAIN_TASKS or not (math.isfinite(w) and w > 0):
            raise ValueError(f"--mix requires comma-separated task:weight pairs with a task from {list(TRAIN_TASKS)} "
                             f"and a finite weight > 0 (got {item!r} in {text!r})")
        pairs.append((task, w))
    if len({t for t, _ in pairs}) != len(pairs):
        raise ValueError(f"--mix requires each task once (got {text!r})")
    return tuple(pairs)
