"""Results: folder names, the reproducibility record, metrics, summaries, comparison tables and plots.

One folder per (benchmark, model, backend, options) under the output directory holds
``predictions.jsonl`` (one line per sample, appended as it is produced), ``metrics.json``,
``config.json`` and ``summary.md``. Runs of several backends over the same samples are
compared in ``comparison__<benchmark>__<model>.md`` and ``score_vs_length__...png``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

MIB = 1024 * 1024


# --------------------------------------------------------------------------- names
def slug(text: str, max_len: int = 80) -> str:
    """A file-name-safe version of ``text``; long names end in a short hash to stay unique."""
    s = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text).strip("_") or "x"
    if len(s) > max_len:
        s = s[: max_len - 9] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return s


def backend_label(name: str, options: dict[str, Any]) -> str:
    """``name`` or ``name__k=v,k=v`` (options sorted)."""
    if not options:
        return name
    return name + "__" + ",".join(f"{k}={options[k]}" for k in sorted(options))


def run_dir_name(benchmark: str, model_label: str, backend: str, options: dict[str, Any]) -> str:
    return slug(f"{benchmark}__{model_label}__{backend_label(backend, options)}", max_len=160)


# --------------------------------------------------------------------------- reproducibility record
_PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "tokenizers",
    "numpy",
    "rouge",
    "fuzzywuzzy",
    "python-Levenshtein",
    "jieba",
    "nltk",
    "longctx",
)


def versions() -> dict[str, Optional[str]]:
    """Python and library versions (``None`` for a package that is not installed)."""
    out: dict[str, Optional[str]] = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_state(path: Optional[Path] = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the repository holding longctx (``None`` values outside git)."""
    cwd = str(path or Path(__file__).resolve().parent)

    def run(*args: str) -> Optional[str]:
        try:
            r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def file_digest(path: str, full_hash_limit: int = 64 * MIB) -> dict[str, Any]:
    """Identity of a data file: size, and sha256 when it is at most ``full_hash_limit`` bytes."""
    p = Path(path)
    if p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.is_file())
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(p)}:{f.stat().st_size}".encode())
        return {"path": str(p), "files": len(files), "listing_sha256": h.hexdigest()}
    size = p.stat().st_size
    rec: dict[str, Any] = {"path": str(p), "bytes": size}
    if size <= full_hash_limit:
        rec["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    else:
        rec["mtime_ns"] = p.stat().st_mtime_ns
    return rec


# --------------------------------------------------------------------------- aggregation
def _mean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def group_by_task_length(
    samples: Sequence[dict], records: dict[str, dict]
) -> dict[tuple[str, int], list[tuple[dict, dict]]]:
    """``{(task, length): [(sample, prediction record), ...]}`` in sample order, done samples only."""
    groups: dict[tuple[str, int], list[tuple[dict, dict]]] = {}
    for s in samples:
        rec = records.get(s["id"])
        if rec is not None:
            groups.setdefault((s["task"], s["length"]), []).append((s, rec))
    return groups


def cost_summary(pairs: Sequence[tuple[dict, dict]]) -> dict[str, Any]:
    """Mean prefill seconds and decode ms/token; peak bytes per tier over the samples."""
    recs = [r for _, r in pairs]

    def peak(key: str, tier: Optional[str] = None) -> Optional[int]:
        vals = [(r.get(key) or {}).get(tier) if tier else r.get(key) for r in recs]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    return {
        "prefill_s": _mean([r.get("prefill_s") for r in recs]),
        "decode_ms_per_token": _mean([r.get("decode_ms_per_token") for r in recs]),
        "peak_device_bytes": peak("memory", "device"),
        "peak_host_bytes": peak("memory", "host"),
        "peak_device_alloc_bytes": peak("peak_device_alloc"),
        "input_tokens": _mean([r.get("input_tokens") for r in recs]),
        "samples": len(recs),
    }


def compute_metrics(
    benchmark: str,
    samples: Sequence[dict],
    records: dict[str, dict],
    score_group: Callable[[str, list[tuple[dict, dict]]], Any],
    extra: Optional[Callable[[dict], dict]] = None,
) -> dict[str, Any]:
    """Scores per task and length (by ``score_group``), averages per length, and cost per length."""
    groups = group_by_task_length(samples, records)
    wanted: dict[tuple[str, int], int] = {}
    for s in samples:
        wanted[(s["task"], s["length"])] = wanted.get((s["task"], s["length"]), 0) + 1
    scores: dict[str, dict[str, Any]] = {}
    counts: dict[str, dict[str, str]] = {}
    for (task, L), pairs in groups.items():
        scores.setdefault(task, {})[str(L)] = score_group(task, pairs)
        counts.setdefault(task, {})[str(L)] = f"{len(pairs)}/{wanted[(task, L)]}"
    lengths = sorted({L for _, L in wanted})
    average = {}
    for L in lengths:
        vals = [_scalar(scores[t][str(L)]) for t in scores if str(L) in scores[t]]
        average[str(L)] = round(_mean(vals), 2) if _mean(vals) is not None else None
    cost = {}
    for L in lengths:
        pairs = [p for (t, LL), ps in groups.items() if LL == L for p in ps]
        if pairs:
            cost[str(L)] = cost_summary(pairs)
    metrics = {
        "benchmark": benchmark,
        "scores": scores,
        "average": average,
        "overall": round(_mean(list(average.values())), 2) if _mean(list(average.values())) is not None else None,
        "done": counts,
        "complete": all(len(groups.get(k, [])) == n for k, n in wanted.items()),
        "cost": cost,
    }
    if extra is not None:
        metrics.update(extra(metrics))
    return _nan_to_none(metrics)


# --------------------------------------------------------------------------- markdown
def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _mib(x: Optional[int]) -> str:
    return "-" if x is None else f"{x / MIB:.1f}"


def scores_table(metrics: dict[str, Any]) -> str:
    """Markdown: one row per task, one column per length, plus the average row."""
    lengths = sorted({L for t in metrics["scores"].values() for L in t} | set(metrics["average"]), key=int)
    lines = ["| task | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
    for task in sorted(metrics["scores"], key=_task_key):
        row = metrics["scores"][task]
        lines.append(f"| {task} | " + " | ".join(_cell(row.get(L)) for L in lengths) + " |")
    lines.append("| **average** | " + " | ".join(_fmt(metrics["average"].get(L)) for L in lengths) + " |")
    return "\n".join(lines)


def cost_table(metrics: dict[str, Any]) -> str:
    lines = [
        "| length | samples | input tokens | prefill s | decode ms/token "
        "| device MiB (KV) | host MiB (KV) | device peak alloc MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for L, c in sorted(metrics["cost"].items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"| {L} | {c['samples']} | {_fmt(c['input_tokens'], 0)} | {_fmt(c['prefill_s'], 3)} "
            f"| {_fmt(c['decode_ms_per_token'], 1)} "
            f"| {_mib(c['peak_device_bytes'])} | {_mib(c['peak_host_bytes'])} | {_mib(c['peak_device_alloc_bytes'])} |"
        )
    return "\n".join(lines)


def _cell(x: Any) -> str:
    """A score cell; LongBench-E bucket dicts print as ``0-4k/4-8k/8k+``."""
    if isinstance(x, dict):
        return "/".join(_fmt(v) for v in x.values())
    return _fmt(x)


def _scalar(x: Any) -> Any:
    """LongBench-E stores a bucket dict per cell; tables show its mean."""
    if isinstance(x, dict):
        return _mean(list(x.values()))
    return x


def _task_key(task: str) -> tuple:
    return (0, int(task.split("_")[1])) if re.fullmatch(r"depth_\d+", task) else (1, task)


def summary_markdown(title: str, config: dict[str, Any], metrics: dict[str, Any], skipped: Sequence[str]) -> str:
    b, model = config.get("backend", {}), config.get("model", {})
    parts = [
        f"# {title}",
        "",
        f"- model: `{model.get('path')}` ({model.get('model_type')}, {model.get('dtype')})",
        f"- backend: `{b.get('name')}` {b.get('config')}",
        f"- chat template: {config.get('chat_template', {}).get('name')}; seed {config.get('seed')}",
        f"- complete: {metrics.get('complete')}; overall: {_fmt(metrics.get('overall'))}",
        "",
        "## Scores",
        "",
        scores_table(metrics),
        "",
        "## Cost",
        "",
        cost_table(metrics),
    ]
    if skipped:
        parts += ["", "## Skipped", ""] + [f"- {s}" for s in skipped]
    return "\n".join(parts) + "\n"


def comparison_markdown(benchmark: str, runs: dict[str, dict[str, Any]]) -> str:
    """Scores per task x length with one column per backend, then the cost per backend and length."""
    labels = list(runs)
    keys = sorted(
        {(t, L) for m in runs.values() for t, row in m["scores"].items() for L in row},
        key=lambda k: (int(k[1]), _task_key(k[0])),
    )
    lengths = sorted({L for m in runs.values() for L in m["average"]}, key=int)
    lines = [
        f"## {benchmark}: score per task and length",
        "",
        "| task | length | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for t, L in keys:
        lines.append(f"| {t} | {L} | " + " | ".join(_cell(runs[b]["scores"].get(t, {}).get(L)) for b in labels) + " |")
    for L in lengths:
        lines.append(f"| **average** | {L} | " + " | ".join(_fmt(runs[b]["average"].get(L)) for b in labels) + " |")
    lines += [
        "",
        f"## {benchmark}: cost per length (prefill s / decode ms per token / KV MiB device / KV MiB host)",
        "",
        "| backend | length | prefill s | decode ms/token | device MiB | host MiB | device peak alloc MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in labels:
        for L, c in sorted(runs[b]["cost"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {b} | {L} | {_fmt(c['prefill_s'], 3)} | {_fmt(c['decode_ms_per_token'], 1)} "
                f"| {_mib(c['peak_device_bytes'])} "
                f"| {_mib(c['peak_host_bytes'])} | {_mib(c['peak_device_alloc_bytes'])} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots
def plot_score_vs_length(runs: dict[str, dict[str, Any]], path: Path, title: str) -> Optional[str]:
    """Average score against length, one line per backend (log-2 x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for label, m in runs.items():
        pts = sorted((int(L), v) for L, v in m["average"].items() if v is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def python_command() -> str:
    return " ".join([sys.executable] + sys.argv)
