"""Training data: the task mixture and the seeded stream of tokenised training sequences and batches."""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch

from longctx.tiny.text import RULER_NIAH_TASKS, Sample, niah_sample, vt_sample

# (task, weight). Word-valued and essay variants broaden the mechanism beyond the judged tasks.
# "copy" (dense induction text, loss on every repeated token) carries most of the early signal:
# answer-only supervision alone never formed an induction head in the first attempt.
TRAIN_MIX = [
    ("niah_single_1", 1.5), ("niah_single_2", 0.5), ("niah_multikey_1", 0.5),
    ("niah_multikey_2", 1.5), ("niah_multikey_3", 1.0), ("niah_multivalue", 1.0), ("niah_multiquery", 1.0),
    ("copy", 3.0),
]
# every task a SampleStream can draw (the NIAH variants, variable tracking, copy text)
TRAIN_TASKS = (*RULER_NIAH_TASKS, "vt", "copy")
_UNIT_TOKENS = {"noise": 25.0, "needle_numbers": 30.0, "needle_uuids": 88.0, "essay": 1.35, "vt": 25.0}


class SampleStream:
    """Seeded stream of tokenised training sequences of about a requested token length."""

    def __init__(self, tokenizer, seed: int, essay_words: Sequence[str],
                 mix: Optional[Sequence[tuple[str, float]]] = None):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.essay = essay_words
        self.set_mix(TRAIN_MIX if mix is None else mix)
        specials = set(tokenizer.all_special_ids)
        self.plain_ids = [i for i in range(len(tokenizer)) if i not in specials]
        self.digit_ids = sorted(i for t, i in tokenizer.get_vocab().items() if t.isascii() and t.isdigit())
        self.last_tasks: list[str] = []
        self.copy_only = False  # a stage of pure copy text (the induction warm-up)
        self.want_spans = False  # record retrieval targets (tiny.retrieval.answer_targets) per sample
        self.last_spans: list[dict] = []
        self.hard_keys = 0.0  # near-miss distractor keys (niah_sample), set per stage

    def set_mix(self, mix: Sequence[tuple[str, float]]) -> None:
        """Draw tasks from ``mix`` ((task, weight) pairs) from now on."""
        self.tasks = [t for t, _ in mix]
        self.weights = [w for _, w in mix]

    def _units(self, task: str, n_tokens: int) -> int:
        if task == "vt":
            return max(1, int(n_tokens / _UNIT_TOKENS["vt"]))
        hay, tk, tv = RULER_NIAH_TASKS[task][:3]
        key = "needle_uuids" if "uuids" in (tk, tv) and hay == "needle" else ("needle_numbers" if hay == "needle" else hay)
        return max(1, int(n_tokens / _UNIT_TOKENS[key]))

    def _copy(self, n_tokens: int) -> tuple[list[int], list[int]]:
        # Dense induction text: random spans (plain tokens or digit strings) of which about half
        # repeat an earlier span at a random distance; every token of a repeat after its first is
        # predictable and carries loss. Digit spans repeat digits, so a single previous token is
        # ambiguous and the copy must match longer prefixes (as when copying a 7-digit value).
        rng = self.rng
        ids, labels, spans = [self.tok.bos_token_id], [-100], []
        while len(ids) < n_tokens:
            if spans and rng.random() < 0.5:
                span = rng.choice(spans)
                lab = [-100] + span[1:]
            else:
                pool = self.digit_ids if rng.random() < 0.3 else self.plain_ids
                span = [rng.choice(pool) for _ in range(rng.randint(4, 24))]
                spans.append(span)
                lab = [-100] * len(span)
            ids += span
            labels += lab
        return ids[:n_tokens], labels[:n_tokens]

    def _spans(self, s: Sample, prompt_enc, answer_enc) -> dict[str, list[tuple[int, int, int]]]:
        from longctx.tiny.retrieval import answer_targets

        n = len(s.prompt)
        offsets = list(prompt_enc["offset_mapping"]) + [(x + n, y + n) for x, y in answer_enc["offset_mapping"]]
        return answer_targets(s.prompt + s.answer, offsets, n, s.answer_values, s.answer_keys)

    def sample(self, n_tokens: int, extra_questions: int = 0) -> tuple[list[int], list[int]]:
        """Return ``(input_ids, labels)`` of at most ``n_tokens`` tokens; labels are -100 off the answers."""
        rng = self.rng
        task = rng.choices(self.tasks, self.weights)[0]
        if self.copy_only:  # drawn anyway: the random stream does not depend on the stage kind
            task = "copy"
        self.last_tasks.append(task)
        self.last_spans.append({})
        if task == "copy":
            return self._copy(n_tokens)
        # extra question turns take ~45 tokens each: leave room so the first draw usually fits
        extra_questions = min(extra_questions, max(0, (n_tokens - 120) // 50))
        units = self._units(task, n_tokens - 60 - 45 * extra_questions)
        chat = rng.random() < 0.25
        while True:
            state = rng.getstate()
            if task == "vt":
                s = vt_sample(rng, units)
            else:
                s = niah_sample(rng, task, units, self.essay, extra_questions=extra_questions, chat=chat,
                                hard_keys=self.hard_keys)
            spans = self.want_spans and task != "vt"  # offsets only when the retrieval targets are wanted
            p_enc = self.tok(s.prompt, return_offsets_mapping=spans)
            a_enc = self.tok(s.answer, add_special_tokens=False, return_offsets_mapping=spans)
            p = p_enc["input_ids"]
            a = a_enc["input_ids"] + [self.tok.eos_token_id]
            n = len(p) + len(a)
            if n > 1.5 * n_tokens and units <= 1 and extra_questions == 0 and "uuids" in RULER_NIAH_TASKS[task][1:3]:
                # even the smallest prompt of this task is far too long (uuids at short lengths):
                # use copy text instead so that the batch is not padded to its length
                self.last_tasks[-1] = "copy"
                return self._copy(n_tokens)
            if n <= n_tokens or (units <= 1 and extra_questions == 0):
                if spans:
                    self.last_spans[-1] = self._spans(s, p_enc, a_enc)
                return p + a, [-100] * len(p) + a
            rng.setstate(state)
            if units > 1:
                units = max(1, min(units - 1, int(units * n_tokens / n * 0.97)))
            else:  # even one haystack unit is too long: ask fewer extra questions
                extra_questions -= 1


def make_batch(stream: SampleStream, batch_size: int, min_len: int, max_len: int, pose_prob: float,
               max_position: int, pad_id: int, extra_questions: int = 0):
    """Pad a batch on the right; with probability ``pose_prob`` a sample's position ids skip ahead
    once (PoSE) so that relative distances up to ``max_position`` are seen at short lengths."""
    rng = stream.rng
    stream.last_tasks = []
    stream.last_spans = []
    seqs = [stream.sample(rng.randint(min_len, max_len), extra_questions) for _ in range(batch_size)]
    L = max(len(s[0]) for s in seqs)
    ids = torch.full((batch_size, L), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, L), -100, dtype=torch.long)
    pos = torch.arange(L).repeat(batch_size, 1)
    for b, (x, y) in enumerate(seqs):
        ids[b, : len(x)] = torch.tensor(x)
        labels[b, : len(y)] = torch.tensor(y)
        if rng.random() < pose_prob and max_position > L:
            cut = rng.randint(1, len(x) - 1)
            pos[b, cut:] += rng.randint(0, max_position - L)
    return ids, labels, pos
