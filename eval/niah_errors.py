"""Why NIAH answers are wrong: another needle's value, a garbled copy, or neither.

A RULER NIAH score says how often the answer held the right value, not what went wrong when it
did not. Two failures call for different fixes: the model read the **wrong needle** (key matching:
it answered with the value of another key, often one that starts like the asked key) or it read the
right needle but **slipped while copying** the value (it begins like the right value and then
differs). :func:`classify_answer` sorts each missed reference value of a prediction into one of

- ``other_needle_same_word``: the value of another needle whose key has the asked key's first word
  (the part before the first ``-``: ``voiceless-drudgery`` answered with ``voiceless-volunteer``'s);
- ``other_needle_same_start``: ... whose key starts with the same two characters (``hurt-farming``
  with ``humorous-flower``'s);
- ``other_needle``: ... of an unrelated key;
- ``copy_slip``: no needle's value, but one that reads like a miscopied right value (it begins with
  the same two characters, or has the same length and at most a third of the characters different);
- ``repeated``: none of those, and the answer gives one value twice (multivalue: a found value
  again in place of the fourth);
- ``missing``: none of those, and the answer holds fewer values than there are references;
- ``other``: anything else (a value from nowhere).

:func:`error_breakdown` counts them per run, task and length from a results folder written by
``longctx eval ruler`` (predictions joined to the cached prompts by their sha). ``longctx eval
errors RESULTS`` prints the table.

Only the answer's first ``k`` value-shaped strings count for ``k`` references (a model that runs on
into further question turns writes more values after its answer). For tasks with several
references (multivalue, multiquery) a missed reference is matched against each of those that is not
itself a reference, so one wrong string can explain two misses; the counts are a diagnosis, not a
second metric.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .jsonl import read_jsonl
from .runner import prompt_sha

# RULER's needle sentence ("One of the special magic numbers for <key> is: <value>."), its key and value
NEEDLE_RE = re.compile(r"special magic \w+ for (\S+) is: ([\w-]+)\.")
# value-shaped strings in an answer: hyphenated hex (uuids, also garbled ones) and numbers of 3+ digits
# (RULER's NIAH values are 7-digit numbers or uuids)
VALUE_RE = re.compile(r"[0-9a-f]+(?:-[0-9a-f]+)+|\d{3,}")

CATEGORIES = ("right", "other_needle_same_word", "other_needle_same_start", "other_needle", "copy_slip", "repeated",
              "missing", "other")


def needles(prompt: str) -> dict[str, str]:
    """``value -> key`` of every RULER needle sentence in ``prompt`` (the first key if a value repeats)."""
    out: dict[str, str] = {}
    for key, value in NEEDLE_RE.findall(prompt):
        out.setdefault(value, key)
    return out


def _related(key: str, asked: str) -> str:
    if key.split("-")[0] == asked.split("-")[0]:
        return "other_needle_same_word"
    if key[:2] == asked[:2]:
        return "other_needle_same_start"
    return "other_needle"


def _slip(value: str, ref: str) -> bool:
    """``value`` reads like a miscopied ``ref``: its first two characters, or the same length and at
    most a third of the characters different."""
    value, ref = value.lower(), ref.lower()
    if value[:2] == ref[:2]:
        return True
    return len(value) == len(ref) and sum(a != b for a, b in zip(value, ref)) <= len(ref) // 3


def classify_answer(prompt: str, pred: str, references: Sequence[str]) -> list[str]:
    """One category of :data:`CATEGORIES` per reference value.

    Parameters
    ----------
    prompt : the sample's input text (with its needles).
    pred : the model's answer.
    references : the values the answer should contain (RULER's ``outputs``).

    Returns
    -------
    ``len(references)`` category names; ``right`` where RULER's ``string_match_all`` counts the
    reference as found (case-insensitive substring).
    """
    if isinstance(references, str):
        raise ValueError(f"classify_answer requires references as a list of strings (got the string {references!r})")
    values = needles(prompt)
    refs_lower = {r.lower() for r in references}
    # the answer's first len(references) values: what it gave for the references (a model that runs on
    # into further question turns writes more values after them)
    given = VALUE_RE.findall(pred)[:len(references)]
    candidates = [v for v in given if v.lower() not in refs_lower]
    # the same for every missed reference: the first given value that is another needle's, a repeat
    wrong = next((v for v in candidates if v in values), None)
    repeated = len({v.lower() for v in given}) < len(given)
    out = []
    for ref in references:
        if ref.lower() in pred.lower():
            out.append("right")
            continue
        asked = values.get(ref)
        if wrong is not None:
            out.append(_related(values[wrong], asked) if asked is not None else "other_needle")
        elif any(_slip(v, ref) for v in candidates):
            out.append("copy_slip")
        elif repeated:
            out.append("repeated")
        elif len(given) < len(references):
            out.append("missing")
        else:
            out.append("other")
    return out


@dataclasses.dataclass
class Breakdown:
    """Counts of :data:`CATEGORIES` over the references of one run's samples of one task and length."""

    run: str
    task: str
    length: int
    samples: int = 0
    counts: Counter = dataclasses.field(default_factory=Counter)

    @property
    def missed(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "right")


def _prompts(root: Path) -> dict[str, dict]:
    """``prompt sha -> cached sample`` over every sample cache under ``root/_data``."""
    out = {}
    for path in sorted((root / "_data").glob("*/*.jsonl")):
        for row in read_jsonl(path):
            if "input" in row and "answer_prefix" in row:
                out[prompt_sha(row)] = row
    return out


def error_breakdown(results: str | Path, tasks: Optional[Iterable[str]] = None) -> list[Breakdown]:
    """Per run, NIAH task and length of a ``longctx eval ruler`` results folder, the categories of
    the missed references.

    Parameters
    ----------
    results : the ``--output`` folder (holds ``_data/`` and one folder per run with ``predictions.jsonl``).
    tasks : only these tasks (default: every task whose prompts hold RULER needles).

    Returns
    -------
    One :class:`Breakdown` per (run, task, length), sorted.
    """
    root = Path(results)
    runs = sorted(p.parent for p in root.glob("*/predictions.jsonl") if p.parent.name != "_data")
    if not runs:
        raise ValueError(f"error_breakdown requires a `longctx eval ruler` results folder with <run>/predictions.jsonl "
                         f"(got {str(root)!r}, which has none)")
    prompts = _prompts(root)
    wanted = set(tasks) if tasks is not None else None
    out: dict[tuple[str, str, int], Breakdown] = {}
    for run in runs:
        for pred in read_jsonl(run / "predictions.jsonl"):
            if wanted is not None and pred.get("task") not in wanted:
                continue
            sample = prompts.get(pred.get("prompt_sha", ""))
            if sample is None or not NEEDLE_RE.search(sample["input"]):
                continue
            key = (run.name, pred["task"], int(pred["length"]))
            b = out.setdefault(key, Breakdown(*key))
            b.samples += 1
            b.counts.update(classify_answer(sample["input"], pred["pred"], pred["outputs"]))
    return [out[k] for k in sorted(out)]


def breakdown_table(rows: Sequence[Breakdown]) -> str:
    """Markdown table of :func:`error_breakdown`'s rows."""
    head = ["run", "task", "length", "samples", "missed", *CATEGORIES[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for b in rows:
        cells = [b.run, b.task, str(b.length), str(b.samples), str(b.missed), *(str(b.counts[c]) for c in CATEGORIES[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
