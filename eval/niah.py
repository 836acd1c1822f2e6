"""Needle in a haystack: a depth x length grid, substring scoring and the usual heatmap.

The haystack is a local text (a file, a folder of ``.txt`` files such as the Paul Graham
essays, or RULER's ``PaulGrahamEssays.json``) or RULER's noise sentence repeated.
Insertion follows gkamradt/LLMTest_NeedleInAHaystack at token level: the context is cut
to its token budget, and the needle goes at ``depth`` percent of it, moved back to just
after a sentence end (a token whose text ends with ``.``); depth 100 appends it. Scoring
is MInference's substring rule (the answer appears in the output), case-insensitive,
after RULER's prediction clean-up. The heatmap follows the usual convention: context
length on x, depth on y with 0 at the top, a red-yellow-green colour map.

Each cell's needle carries a fresh 7-digit number (``--needle-style number``, default), so
a model cannot answer from memory; ``--needle-style sandwich`` uses gkamradt's
San Francisco needle, scored on "eat a sandwich and sit in Dolores Park".
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Optional, Sequence

from .ruler import postprocess_pred
from .ruler_synthetic import NOISE_LINE

logger = logging.getLogger(__name__)

PROMPT = (
    "Write a high-quality answer for the given question using only the provided search results (some of which "
    "might be irrelevant).\n{context}\n\nQuestion: {question} Don't give information outside the document or "
    "repeat your findings. Keep your response short and direct. Answer: "
)
NEEDLE_STYLES: dict[str, dict[str, str]] = {
    "number": {
        "needle": "\nThe special magic number is: {answer}.\n",
        "question": "What is the special magic number mentioned in the provided text?",
        "answer": "{answer}",
    },
    "sandwich": {
        "needle": "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n",
        "question": "What is the best thing to do in San Francisco?",
        "answer": "eat a sandwich and sit in Dolores Park",
    },
}
DEFAULT_DEPTHS = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
DEFAULT_MAX_NEW_TOKENS = 32
HEATMAP_COLORS = ["#F0496E", "#EBB839", "#0CD79F"]


def depth_task(depth: float) -> str:
    """Task label of one depth row, e.g. ``depth_050``."""
    return f"depth_{int(round(depth)):03d}"


def load_haystack(source: str) -> str:
    """``"noise"`` (RULER's noise sentence, one per line), a text file, a ``{"text"}`` JSON, or a folder of ``.txt``."""
    if source == "noise":
        return "\n".join([NOISE_LINE] * 64) + "\n"
    p = Path(source)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"haystack folder {p} has no .txt files")
        return "".join(f.read_text(encoding="utf-8") for f in files)
    if not p.is_file():
        raise FileNotFoundError(f"haystack {source!r} is neither 'noise' nor an existing file or folder")
    if p.suffix == ".json":
        with open(p, "r", encoding="utf-8") as f:
            obj = json.load(f)
        if not isinstance(obj, dict) or "text" not in obj:
            raise ValueError(f"{p}: expected a JSON object with a 'text' field")
        return obj["text"]
    return p.read_text(encoding="utf-8")


class _Inserter:
    """Token-level needle insertion (gkamradt's ``insert_needle``) for one tokenizer and haystack."""

    def __init__(self, tokenizer: Any, haystack: str):
        self.tok = tokenizer
        self.unit = tokenizer.encode(haystack, add_special_tokens=False)
        if not self.unit:
            raise ValueError("haystack text is empty")
        self._period: dict[int, bool] = {}

    def context_tokens(self, n: int) -> list[int]:
        reps = n // len(self.unit) + 1
        return (self.unit * reps)[:n]

    def _is_period(self, tid: int) -> bool:
        if tid not in self._period:
            self._period[tid] = self.tok.decode([tid]).rstrip(" ").endswith(".")
        return self._period[tid]

    def insert(self, context: list[int], needle: list[int], depth: float) -> list[int]:
        if depth >= 100:
            return context + needle
        pos = int(len(context) * (depth / 100))
        while pos > 0 and not self._is_period(context[pos - 1]):
            pos -= 1
        return context[:pos] + needle + context[pos:]


def build_samples(
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    rounds: int = 1,
    haystack: str = "noise",
    needle_style: str = "number",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 42,
    chat: str = "auto",
) -> list[dict[str, Any]]:
    """One sample per (length, depth, round), each with ``prompt tokens + max_new_tokens <= length``.

    Raises
    ------
    ValueError
        Unknown needle style, a depth outside [0, 100], or a length too short for the prompt.
    """
    if needle_style not in NEEDLE_STYLES:
        raise ValueError(f"needle style requires one of {sorted(NEEDLE_STYLES)} (got {needle_style!r})")
    bad = [d for d in depths if not 0 <= d <= 100]
    if bad:
        raise ValueError(f"NIAH depths require values in [0, 100] (got {bad})")
    if chat not in ("auto", "model", "none"):
        raise ValueError(f"NIAH chat mode requires one of ['auto', 'model', 'none'] (got {chat!r})")
    style = NEEDLE_STYLES[needle_style]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "model" and not has_template:
        raise ValueError("chat template 'model' requires a tokenizer with a chat_template (this one has none)")
    use_chat = chat != "none" and has_template
    bos = getattr(tokenizer, "bos_token", None)
    ins = _Inserter(tokenizer, load_haystack(haystack))

    def render(context: str) -> str:
        text = PROMPT.format(context=context, question=style["question"])
        if use_chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def n_tokens(text: str) -> int:
        add = not (bos and text.startswith(bos))
        return len(tokenizer(text, add_special_tokens=add).input_ids)

    overhead = n_tokens(render(""))
    out = []
    for L in lengths:
        for d in depths:
            for r in range(rounds):
                # one generator per cell: a cell's needle does not depend on the grid around it
                answer = str(random.Random(f"{seed}/{L}/{d}/{r}").randint(10**6, 10**7 - 1))
                needle = style["needle"].format(answer=answer)
                needle_ids = tokenizer.encode(needle, add_special_tokens=False)
                budget = int(L) - overhead - len(needle_ids) - max_new_tokens
                if budget <= 0:
                    raise ValueError(
                        f"NIAH length {L} is too short: the prompt and needle alone take "
                        f"{overhead + len(needle_ids)} tokens"
                    )
                for _ in range(8):  # decode/re-encode can shift the count by a few tokens
                    ids = ins.insert(ins.context_tokens(budget), needle_ids, d)
                    prompt = render(tokenizer.decode(ids, skip_special_tokens=True))
                    total = n_tokens(prompt)
                    if total + max_new_tokens <= L:
                        break
                    budget -= total + max_new_tokens - int(L)
                out.append(
                    {
                        "id": f"{depth_task(d)}/{L}/{r}",
                        "task": depth_task(d),
                        "length": int(L),
                        "index": r,
                        "input": prompt,
                        "answer_prefix": "",
                        "outputs": [style["answer"].format(answer=answer)],
                        "max_new_tokens": max_new_tokens,
                        "metric": "substring",
                        "add_special_tokens": not (bos and prompt.startswith(bos)),
                        "meta": {"depth": d, "tokens": total, "needle": needle.strip()},
                    }
                )
    return out


def substring_score(pred: str, answers: Sequence[str]) -> float:
    """1.0 when any answer occurs in the cleaned prediction (case-insensitive), else 0.0."""
    p = postprocess_pred(pred).lower()
    return 1.0 if any(a.lower() in p for a in answers) else 0.0


def score_cell(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Percentage of samples whose prediction contains the answer, 2 d.p."""
    return round(100 * sum(substring_score(p, r) for p, r in zip(preds, refs)) / len(preds), 2)


def plot_heatmap(scores: dict[str, dict[str, float]], path: os.PathLike, title: str = "") -> Optional[str]:
    """Draw ``scores[depth_task][str(length)]`` (0-100) as the usual NIAH heatmap PNG.

    Returns the path written, or ``None`` when there is nothing to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    rows = sorted(scores, key=lambda t: int(t.split("_")[1]))
    cols = sorted({L for t in rows for L in scores[t]}, key=int)
    if not rows or not cols:
        return None
    grid = np.full((len(rows), len(cols)), np.nan)
    for i, t in enumerate(rows):
        for j, L in enumerate(cols):
            if L in scores[t] and scores[t][L] is not None:
                grid[i, j] = scores[t][L]
    cmap = LinearSegmentedColormap.from_list("custom_cmap", HEATMAP_COLORS)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cols) + 3), max(4, 0.45 * len(rows) + 2)))
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), [_k(int(L)) for L in cols])
    ax.set_yticks(range(len(rows)), [str(int(t.split("_")[1])) for t in rows])
    ax.set_xticks(np.arange(-0.5, len(cols), 1), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows), 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("Context Length")
    ax.set_ylabel("Depth Percent (%)")
    avg = float(np.nanmean(grid))
    ax.set_title(f"{title}  (average {avg:.1f})" if title else f"average {avg:.1f}")
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else (f"{n / 1000:.0f}K" if n >= 1000 else str(n))
