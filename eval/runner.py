"""The evaluation runner: samples -> patched ``model.generate`` -> predictions -> metrics.

``run_eval(spec)`` generates (or reloads) the benchmark's samples once, then for every
backend opens ``longctx.patch(model, name, **options)`` and generates greedily, one sample
at a time, appending each prediction to the backend's results folder as soon as it
exists. A rerun reads what is there and only generates what is missing; when nothing
is missing the model is not even loaded.

Data parallel: under ``torchrun`` / ``accelerate launch`` every process takes a
contiguous share of the missing samples (``PartialState.split_between_processes``) and
writes ``predictions.rank<r>.jsonl``; rank 0 merges them into ``predictions.jsonl`` and
writes the metrics. Processes use their own GPU when there are several, CPU otherwise.
On a machine without a GPU, ``accelerate launch --num_processes N`` starts one process
unless given ``--multi_gpu`` (accelerate's rule); ``torchrun --nproc_per_node N`` starts N.

Timing is taken around ``generate`` by a stopping criterion that timestamps every step:
prefill time is the time to the first new token (prefill forward + first sampling), decode
ms/token the mean gap between later tokens. Memory per tier is ``handle.memory()`` after
the sample (bytes of the backend's cache on the device and host tiers), plus the CUDA
allocator's peak on a GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import longbench as lb
from . import niah as nh
from . import results as res
from . import ruler as rl
from .jsonl import append_jsonl, read_jsonl, repair_tail, write_json, write_jsonl
from .ruler_synthetic import MissingDataError, SampleDoesNotFitError

logger = logging.getLogger(__name__)

BENCHMARKS = ("ruler", "longbench", "niah")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


# ----------------------------------------------------------------------------- the spec
@dataclasses.dataclass
class BackendRun:
    """One backend to evaluate: a registered name and its options (CLI strings or values)."""

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return res.backend_label(self.name, self.options)


@dataclasses.dataclass
class EvalSpec:
    """What to evaluate. Mirrors ``longctx eval <benchmark>`` options.

    Parameters
    ----------
    benchmark : ``ruler``, ``longbench`` or ``niah``.
    model : a model folder (``from_pretrained``) or a bundled model's short name.
    output : the results root folder.
    backends : backends to compare (default: dense).
    lengths : RULER / NIAH: total lengths in tokens; LongBench: truncation lengths
        (``model2maxlen``; default: the model's context minus 500).
    tasks : task names (default: all of the benchmark's tasks).
    samples : samples per task and length (RULER default 500 as upstream; LongBench default
        all lines; NIAH: rounds per cell, default 1).
    seed : RULER's random seed (42) and NIAH's needle seed.
    data_dir : LongBench jsonl folder; for RULER a folder with PaulGrahamEssays.json,
        squad.json / dev-v2.0.json, hotpotqa.json, english_words.json.
    essay, squad, hotpotqa, cwe_words : RULER source files (override ``data_dir``).
    longbench_e : evaluate LongBench-E (``{task}_e.jsonl``, length buckets).
    haystack, depths, needle_style : NIAH grid options.
    chat_template : ``auto`` (model's own if any), ``model``, ``base``/``none``, or a RULER template name.
    max_new_tokens : override every task's generation length (default: the official ones).
    dtype, device : model dtype (``auto`` keeps the checkpoint's) and device (``auto``: the
        process's GPU when there is one, else CPU).
    replace_stale : a results folder written with another model (config or weights) or
        configuration is emptied and recomputed instead of raising (the demo's own folder).
    """

    benchmark: str
    model: str
    output: str
    backends: list[BackendRun] = dataclasses.field(default_factory=lambda: [BackendRun("dense")])
    lengths: Optional[list[int]] = None
    tasks: Optional[list[str]] = None
    samples: Optional[int] = None
    seed: int = 42
    data_dir: Optional[str] = None
    essay: Optional[str] = None
    squad: Optional[str] = None
    hotpotqa: Optional[str] = None
    cwe_words: Optional[str] = None
    longbench_e: bool = False
    haystack: str = "noise"
    depths: Optional[list[float]] = None
    needle_style: str = "number"
    chat_template: str = "auto"
    max_new_tokens: Optional[int] = None
    dtype: str = "auto"
    device: str = "auto"
    replace_stale: bool = False

    def __post_init__(self):
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"EvalSpec.benchmark requires one of {list(BENCHMARKS)} (got {self.benchmark!r})")
        if not self.backends:
            raise ValueError("EvalSpec.backends requires at least one backend (got none)")
        labels = [b.label for b in self.backends]
        if len(set(labels)) != len(labels):
            raise ValueError(f"EvalSpec.backends requires distinct backend/option combinations (got {labels})")
        if self.lengths is not None:
            if not self.lengths or any(not isinstance(L, int) or L <= 0 for L in self.lengths):
                raise ValueError(f"EvalSpec.lengths requires positive ints (got {self.lengths!r})")
        if self.samples is not None and (not isinstance(self.samples, int) or self.samples <= 0):
            raise ValueError(f"EvalSpec.samples requires a positive int (got {self.samples!r})")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ValueError(f"EvalSpec.max_new_tokens requires a positive int (got {self.max_new_tokens!r})")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                f"EvalSpec.dtype requires one of ['auto', 'float32', 'float16', 'bfloat16'] (got {self.dtype!r})"
            )
        if self.tasks:
            valid = self.valid_tasks()
            if valid is not None:
                bad = [t for t in self.tasks if t not in valid]
                if bad:
                    raise ValueError(f"{self.benchmark} task(s) {bad} unknown; valid tasks: {list(valid)}")
        if self.chat_template == "base" and self.benchmark != "ruler":
            self.chat_template = "none"  # RULER's name for "no template"
        chats = ("auto", "model", "none") + (tuple(rl.MODEL_TEMPLATES) if self.benchmark == "ruler" else ())
        if self.chat_template not in chats:
            raise ValueError(f"EvalSpec.chat_template requires one of {list(chats)} (got {self.chat_template!r})")
        if self.benchmark == "niah" and self.tasks:
            raise ValueError("niah has no tasks; choose the grid with lengths and depths (got tasks)")

    def valid_tasks(self) -> Optional[Sequence[str]]:
        if self.benchmark == "ruler":
            return rl.TASK_NAMES
        if self.benchmark == "longbench":
            return lb.DATASETS_E if self.longbench_e else lb.DATASETS
        return None

    @property
    def bench_label(self) -> str:
        return "longbench-e" if self.benchmark == "longbench" and self.longbench_e else self.benchmark


# ----------------------------------------------------------------------------- model and tokenizer
def resolve_model_path(name: str) -> str:
    """A local folder for ``--model``: a folder as is, a bundled model's short name, or a hub id already cached.

    Nothing is downloaded: a hub id resolves only from the local Hugging Face cache.

    Raises
    ------
    FileNotFoundError
        When ``name`` is none of these.
    """
    if os.path.isdir(name):
        return name
    for mod_name in ("longctx.hub", "longctx.models"):
        try:
            mod = __import__(mod_name, fromlist=["resolve_model_path"])
        except ImportError:
            continue
        resolver = getattr(mod, "resolve_model_path", None)
        if resolver is not None:
            path = str(resolver(name))
            if os.path.isdir(path):
                return path
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name, local_files_only=True)
        except Exception:  # not in the local cache (or not a valid repo id)
            pass
    raise FileNotFoundError(f"--model {name!r} is neither a model folder, a bundled model name nor a cached hub model")


def _tokenizer_digest(path: str) -> str:
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        p = Path(path) / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _model_config_digest(path: str) -> Optional[str]:
    p = Path(path) / "config.json"
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_DIGEST_BLOCK = 1 << 16  # bytes read per sampled block


def _model_weights_digest(path: str) -> Optional[str]:
    """A sampled digest of the model folder's weight files: names, sizes and 18 blocks of each.

    Reads ~1 MiB per file whatever its size, so it is cheap for 16 GB checkpoints, and it
    changes when weights are retrained or replaced under the same name and config (a single
    edited value between the sampled blocks goes unnoticed). ``None`` when the folder holds no
    weight file (a hub id resolved elsewhere).
    """
    folder = Path(path)
    if not folder.is_dir():
        return None
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        last = max(size - _DIGEST_BLOCK, 0)  # offset of the last block
        with f.open("rb") as fh:
            for i in range(18):  # the first and the last block and 16 evenly spaced between them
                fh.seek(i * last // 17)
                h.update(fh.read(_DIGEST_BLOCK))
    return h.hexdigest()


def _select_device(spec: EvalSpec, state: Any):
    import torch

    if spec.device != "auto":
        return torch.device(spec.device)
    return state.device if torch.cuda.is_available() else torch.device("cpu")


def _load_model(path: str, dtype: str, device):
    import torch
    from transformers import AutoModelForCausalLM

    return (
        AutoModelForCausalLM.from_pretrained(path, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
        .to(device)
        .eval()
    )


def _eos_ids(model_path: str, model_cfg: Any, tokenizer: Any) -> list[int]:
    """EOS ids as ``generate`` uses them: generation_config.json, else the model config, else the tokenizer."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = getattr(model_cfg, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


# ----------------------------------------------------------------------------- sample store
class SampleStore:
    """Generated samples cached on disk, one jsonl per group (task x length), shared by every backend."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def get(self, key: str, n: Optional[int], build: Callable[[], list[dict]]) -> list[dict]:
        path = self.root / (res.slug(key.replace("/", "__")) + ".jsonl")
        meta_path = path.with_suffix(".meta.json")
        if path.exists() and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("all") or (n is not None and meta.get("count", 0) >= n):
                rows = read_jsonl(path)
                return rows if n is None else rows[:n]
        rows = build()
        self.root.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, rows)
        write_json(meta_path, {"count": len(rows), "all": n is None or len(rows) < n})
        return rows


# ----------------------------------------------------------------------------- benchmark adapters
@dataclasses.dataclass
class Prepared:
    samples: list[dict]
    skipped: list[str]
    record: dict[str, Any]  # data provenance for config.json
    fingerprint_inputs: dict[str, Any]


def _ruler_chat(spec: EvalSpec, tokenizer) -> tuple[str, str]:
    mode = "base" if spec.chat_template == "none" else spec.chat_template
    return rl.chat_template_for(tokenizer, mode)


def _ruler_sources(spec: EvalSpec) -> rl.RulerSources:
    return rl.RulerSources.from_dir(
        spec.data_dir, essay=spec.essay, squad=spec.squad, hotpotqa=spec.hotpotqa, cwe_words=spec.cwe_words
    )


def _data_inputs(spec: EvalSpec, tokenizer, model_path: str) -> dict[str, Any]:
    """What every generated sample depends on (hashed into the data cache folder name).

    Inputs that only some tasks use (RULER's essay / QA files, LongBench's jsonl files)
    go into those tasks' cache keys instead, so adding a source does not invalidate the rest.
    """
    base = {"benchmark": spec.bench_label, "tokenizer": _tokenizer_digest(model_path), "seed": spec.seed}
    if spec.benchmark == "ruler":
        template, name = _ruler_chat(spec, tokenizer)
        base.update(chat=name, template=template)
    elif spec.benchmark == "longbench":
        base.update(chat=spec.chat_template, template=getattr(tokenizer, "chat_template", None))
    else:
        if spec.haystack != "noise" and not os.path.exists(spec.haystack):
            raise FileNotFoundError(f"haystack {spec.haystack!r} is neither 'noise' nor an existing file or folder")
        hay = spec.haystack if spec.haystack == "noise" else res.file_digest(spec.haystack)
        base.update(
            chat=spec.chat_template,
            template=getattr(tokenizer, "chat_template", None),
            haystack=hay,
            depths=list(spec.depths or nh.DEFAULT_DEPTHS),
            needle=spec.needle_style,
            max_new_tokens=spec.max_new_tokens or nh.DEFAULT_MAX_NEW_TOKENS,
        )
    return base


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


_RULER_TASK_SOURCE = {**{t: "essay" for t in rl.ESSAY_TASKS}, "qa_1": "squad", "qa_2": "hotpotqa", "cwe": "cwe_words"}


def prepare_samples(
    spec: EvalSpec, tokenizer, model_path: str, store: SampleStore, model_ctx: Optional[int]
) -> Prepared:
    """Build (or reload) the samples of ``spec`` for this tokenizer."""
    skipped: list[str] = []
    samples: list[dict] = []
    inputs = _data_inputs(spec, tokenizer, model_path)
    if spec.benchmark == "ruler":
        template, chat_name = _ruler_chat(spec, tokenizer)
        sources = _ruler_sources(spec)
        n = spec.samples or 500
        for task in spec.tasks or rl.TASK_NAMES:
            reason = rl.missing_reason(task, sources)
            if reason:
                logger.warning(reason)
                skipped.append(reason)
                continue
            for L in spec.lengths or [4096]:
                try:
                    field = _RULER_TASK_SOURCE.get(task)
                    path = getattr(sources, field) if field else None
                    key = f"{task}/{L}" + (
                        f"/{_digest(res.file_digest(path))}" if path and os.path.exists(path) else ""
                    )
                    rows = store.get(
                        key, n, lambda: rl.generate_task(task, L, tokenizer, n, spec.seed, sources, template)
                    )
                except (MissingDataError, SampleDoesNotFitError) as e:
                    msg = f"{task} at {L}: skipped, {e}"
                    logger.warning(msg)
                    skipped.append(msg)
                    continue
                samples += rows
        record = {
            "sources": sources.to_dict(),
            "sentence_splitter": _splitter_name(spec, sources),
            "chat_template": {"name": chat_name, "template": template},
        }
    elif spec.benchmark == "longbench":
        tasks = lb.resolve_tasks(spec.tasks, spec.longbench_e)
        files = lb.find_data_files(spec.data_dir, tasks, spec.longbench_e, explicit=bool(spec.tasks))
        lengths = spec.lengths or [_default_longbench_length(model_ctx)]
        for task, path in files.items():
            file_tag = _digest(res.file_digest(str(path)))
            for L in lengths:
                samples += store.get(
                    f"{task}/{L}/{file_tag}",
                    spec.samples,
                    lambda: lb.build_samples(
                        tokenizer, {task: path}, [L], spec.samples, spec.longbench_e, spec.chat_template
                    ),
                )
        skipped += [
            f"{t}: skipped, {n} not found"
            for t, n in zip(tasks, lb.expected_files(tasks, spec.longbench_e))
            if t not in files
        ]
        record = {
            "data_files": {t: res.file_digest(str(p)) for t, p in files.items()},
            "truncation": {"rule": "head+tail", "max_length": lengths},
            "chat_template": {
                "name": spec.chat_template,
                "template": getattr(tokenizer, "chat_template", None),
                "not_applied_to": list(lb.NO_CHAT_TEMPLATE),
            },
        }
    else:
        max_new = spec.max_new_tokens or nh.DEFAULT_MAX_NEW_TOKENS
        depths = spec.depths or list(nh.DEFAULT_DEPTHS)
        rounds = spec.samples or 1
        for L in spec.lengths or [1024, 2048, 4096]:
            samples += store.get(
                f"niah/{L}/r{rounds}",
                rounds * len(depths),
                lambda: nh.build_samples(
                    tokenizer,
                    [L],
                    depths,
                    spec.samples or 1,
                    spec.haystack,
                    spec.needle_style,
                    max_new,
                    spec.seed,
                    spec.chat_template,
                ),
            )
        record = {
            "haystack": spec.haystack,
            "depths": depths,
            "needle_style": spec.needle_style,
            "chat_template": {"name": spec.chat_template, "template": getattr(tokenizer, "chat_template", None)},
        }
    if spec.max_new_tokens is not None:
        for s in samples:
            s["max_new_tokens"] = spec.max_new_tokens
    return Prepared(samples, skipped, record, inputs)


def _splitter_name(spec: EvalSpec, sources: rl.RulerSources) -> Optional[str]:
    tasks = spec.tasks or rl.TASK_NAMES
    if sources.essay and any(t in rl.ESSAY_TASKS for t in tasks):
        from .ruler_synthetic import sentence_splitter

        return sentence_splitter()[1]
    return None


def _default_longbench_length(model_ctx: Optional[int]) -> int:
    if not model_ctx:
        raise ValueError(
            "longbench requires --lengths (truncation length) when the model config has no max_position_embeddings"
        )
    return max(256, model_ctx - 500)  # model2maxlen is about the context window minus 500


def score_group(spec: EvalSpec, task: str, pairs: list[tuple[dict, dict]]) -> Any:
    """The official score of one task at one length."""
    preds = [r["pred"] for _, r in pairs]
    refs = [s["outputs"] for s, _ in pairs]
    if spec.benchmark == "ruler":
        return rl.score_task(task, preds, refs)
    if spec.benchmark == "longbench":
        all_classes = pairs[-1][0].get("all_classes")  # eval.py keeps the last line's
        if spec.longbench_e:
            return lb.scorer_e(task, preds, refs, [s["meta"]["length"] for s, _ in pairs], all_classes)
        return lb.scorer(task, preds, refs, all_classes)
    return nh.score_cell(preds, refs)


def sample_score(spec: EvalSpec, sample: dict, pred: str) -> float:
    if spec.benchmark == "ruler":
        return rl.score_task(sample["task"], [pred], [sample["outputs"]])
    if spec.benchmark == "longbench":
        return round(100 * lb.sample_score(sample["task"], pred, sample["outputs"], sample.get("all_classes")), 2)
    return 100 * nh.substring_score(pred, sample["outputs"])


def extra_metrics(spec: EvalSpec, metrics: dict) -> dict:
    if spec.benchmark == "ruler":
        avg = {int(L): v for L, v in metrics["average"].items() if v is not None}
        return {"ruler": {"wavg_inc": rl.weighted_average(avg, True), "wavg_dec": rl.weighted_average(avg, False)}}
    if spec.benchmark == "longbench" and not spec.longbench_e:
        by_len: dict[str, Any] = {}
        for L in metrics["average"]:
            by_len[L] = lb.english_average({t: row[L] for t, row in metrics["scores"].items() if L in row})
        return {"longbench": {"english_category_average": by_len}}
    return {}


# ----------------------------------------------------------------------------- generation
def _timer_criteria(device):
    import torch
    from transformers import StoppingCriteria

    class StepTimer(StoppingCriteria):
        """Timestamps each generation step; never stops generation."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StepTimer()


def prompt_text(sample: dict) -> str:
    return sample["input"] + sample["answer_prefix"]


def prompt_sha(sample: dict) -> str:
    """The sha256 (16 hex digits) of a sample's prompt text; predictions record it as ``prompt_sha``."""
    return hashlib.sha256(prompt_text(sample).encode("utf-8")).hexdigest()[:16]


def generate_one(model, tokenizer, sample: dict, handle: Any, device, eos_ids: list[int]) -> dict[str, Any]:
    """Greedy generation for one sample; returns its prediction record (text, tokens, timing, memory)."""
    import torch
    from transformers import StoppingCriteriaList

    text = prompt_text(sample)
    add = sample.get("add_special_tokens")
    if add is None:
        bos = getattr(tokenizer, "bos_token", None)
        add = not (bos and text.startswith(bos))
    ids = tokenizer(text, add_special_tokens=add, return_tensors="pt").input_ids.to(device)
    gen = sample.get("gen") or {}
    eos = list(eos_ids) + [t for t in gen.get("stop_token_ids", []) if t not in eos_ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    timer = _timer_criteria(device)
    kwargs: dict[str, Any] = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=int(sample["max_new_tokens"]),
        do_sample=False,
        num_beams=1,
        stopping_criteria=StoppingCriteriaList([timer]),
        pad_token_id=pad,
    )
    if eos:
        kwargs["eos_token_id"] = eos
    if gen.get("min_new_tokens"):
        kwargs["min_new_tokens"] = int(gen["min_new_tokens"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
    new = out[0, ids.shape[1] :].tolist()
    n_new = len(new)
    while n_new and new[n_new - 1] == pad and pad not in eos:  # padding after an early stop
        n_new -= 1
    times = timer.times
    prefill = times[0] - t0 if times else None
    decode = (times[-1] - times[0]) / (len(times) - 1) * 1000 if len(times) > 1 else None
    memory = handle.memory() if handle is not None else {}
    stats = _merge_stats(handle.stats()) if handle is not None and hasattr(handle, "stats") else {}
    return {
        "id": sample["id"],
        "task": sample["task"],
        "length": sample["length"],
        "index": sample["index"],
        "pred": tokenizer.decode(new[:n_new], skip_special_tokens=True),
        "outputs": sample["outputs"],
        "input_tokens": int(ids.shape[1]),
        "new_tokens": n_new,
        "prefill_s": prefill,
        "decode_ms_per_token": decode,
        "memory": {k: int(v) for k, v in memory.items()},
        "peak_device_alloc": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "prompt_sha": prompt_sha(sample),
        "stats": stats,
    }


def _warm_up(model, tokenizer, sample: dict, device) -> None:
    """One short untimed generate (first-call allocations, kernel selection) before the timed samples."""
    import torch

    ids = tokenizer(prompt_text(sample)[:1024], return_tensors="pt").input_ids[:, :64].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=pad)


def _merge_stats(per_layer: Any) -> dict[str, Any]:
    """One dict from the backend stats of every layer (and part): a value equal in every dict that has
    it is kept once (settings such as ``rank``, per-call counts such as ``decode_steps``); otherwise
    ints and booleans are summed over layers (counters; a boolean counts the layers where it is
    true) and floats averaged (rates and per-step means: a sum of hit rates would exceed 1)."""
    dicts, stack = [], [per_layer]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            dicts.append(item)
    values: dict[str, list] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, (bool, int, float)):
                values.setdefault(k, []).append(v)
    total: dict[str, Any] = {}
    for k, vs in values.items():
        if all(v == vs[0] and type(v) is type(vs[0]) for v in vs):
            total[k] = vs[0]
        elif all(isinstance(v, (bool, int)) for v in vs):
            total[k] = sum(int(v) for v in vs)
        else:
            total[k] = sum(float(v) for v in vs) / len(vs)
    return total


# ----------------------------------------------------------------------------- results folders
def _load_done(run_dir: Path, samples: Sequence[dict]) -> dict[str, dict]:
    """Predictions already on disk whose prompt matches the current sample (merged and rank files)."""
    want = {s["id"]: prompt_sha(s) for s in samples}
    done: dict[str, dict] = {}
    for path in [run_dir / "predictions.jsonl", *sorted(run_dir.glob("predictions.rank*.jsonl"))]:
        if path.exists():
            for rec in read_jsonl(path, required=("id", "pred"), allow_partial_tail=True):
                if want.get(rec["id"]) == rec.get("prompt_sha"):
                    done[rec["id"]] = rec
    return done


def _merge(run_dir: Path, samples: Sequence[dict]) -> dict[str, dict]:
    """Fold rank files into predictions.jsonl (sample order; records of other samples kept after)."""
    merged: dict[str, dict] = {}
    paths = [run_dir / "predictions.jsonl", *sorted(run_dir.glob("predictions.rank*.jsonl"))]
    for path in paths:
        if path.exists():
            for rec in read_jsonl(path, required=("id", "pred"), allow_partial_tail=True):
                merged[rec["id"]] = rec
    order = {s["id"]: i for i, s in enumerate(samples)}
    rows = sorted(merged.values(), key=lambda r: (order.get(r["id"], len(order)), r["id"]))
    if paths[1:] or not (run_dir / "predictions.jsonl").exists() or _needs_rewrite(paths[0], rows):
        write_jsonl(run_dir / "predictions.jsonl", rows)
        for p in paths[1:]:
            p.unlink()
    want = {s["id"]: prompt_sha(s) for s in samples}
    return {r["id"]: r for r in rows if want.get(r["id"]) == r.get("prompt_sha")}


def _needs_rewrite(path: Path, rows: list[dict]) -> bool:
    data = path.read_bytes()
    return (bool(data) and not data.endswith(b"\n")) or data.count(b"\n") != len(rows)


def _fingerprint(record: dict[str, Any], legacy: bool = False) -> str:
    """What a results folder's predictions depend on. The backend enters by its resolved config, so
    the CLI's ``sparse_budget=256`` (a string) and Python's ``{"sparse_budget": 256}`` match;
    ``legacy``: the fingerprint of folders written before that (raw options included)."""
    keys = ("benchmark", "model", "backend", "generation", "seed")  # prompts are checked per sample (prompt_sha)
    core = {k: record.get(k) for k in keys}
    core["model"] = {k: (record.get("model") or {}).get(k) for k in ("path", "config_sha256", "weights_sha256", "dtype")}
    if not legacy:
        backend = record.get("backend") or {}
        core["backend"] = {"name": backend.get("name"), "config": backend.get("config")}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_compatible(run_dir: Path, fingerprint: str, replace_stale: bool = False,
                      legacy: Optional[str] = None) -> None:
    path = run_dir / "config.json"
    if path.exists():
        previous = json.loads(path.read_text()).get("fingerprint")
        if previous in (None, fingerprint, legacy):
            return
        if not replace_stale:
            raise ValueError(
                f"results folder {run_dir} holds a run with a different model (config or weights), backend config, "
                f"dtype, seed or generation settings (fingerprint {previous} != {fingerprint}); use another --output "
                "(EvalSpec.output) or remove the folder"
            )
        logger.warning("results folder %s holds a run with another model or configuration (fingerprint %s != %s): "
                       "its results are removed and recomputed", run_dir, previous, fingerprint)
        for stale in [path, run_dir / "metrics.json", run_dir / "summary.md", *run_dir.glob("predictions*.jsonl")]:
            stale.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the run
def run_eval(spec: EvalSpec, patcher: Optional[Callable[..., Any]] = None) -> dict[str, dict[str, Any]]:
    """Evaluate every backend of ``spec``; returns ``{backend label: metrics}`` (on every rank).

    Raises
    ------
    ValueError
        Unknown backend or option (the message lists the valid ones), unknown task, or a
        results folder written with a different configuration.
    FileNotFoundError
        Missing model or data (the message names the files expected).
    """
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from longctx.backends import resolve_config

    if patcher is None:
        from longctx.patch import patch as patcher
    configs = {b.label: resolve_config(b.name, b.options) for b in spec.backends}  # validates names and options early
    model_path = resolve_model_path(spec.model)
    model_label = res.slug(Path(model_path.rstrip("/")).name or spec.model)
    state = PartialState(cpu=not torch.cuda.is_available() or spec.device == "cpu")
    rank, world = state.process_index, state.num_processes
    device = _select_device(spec, state)
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model_cfg = AutoConfig.from_pretrained(model_path)
    out_root = Path(spec.output)
    data_inputs = _data_inputs(spec, tokenizer, model_path)
    data_fp = _digest(data_inputs)
    store = SampleStore(out_root / "_data" / f"{spec.bench_label}__{model_label}__{data_fp}")
    with state.main_process_first():  # rank 0 generates; the others then read its files
        prepared = prepare_samples(
            spec, tokenizer, model_path, store, getattr(model_cfg, "max_position_embeddings", None)
        )
    samples = prepared.samples
    if not samples:
        raise ValueError(f"{spec.bench_label}: nothing to evaluate ({'; '.join(prepared.skipped) or 'no samples'})")

    model = None
    eos_ids = _eos_ids(model_path, model_cfg, tokenizer)
    all_metrics: dict[str, dict[str, Any]] = {}
    weights_digest = _model_weights_digest(model_path)
    for b in spec.backends:
        bspec, bconfig = configs[b.label]
        run_dir = out_root / res.run_dir_name(spec.bench_label, model_label, b.name, b.options)
        record = {
            "benchmark": spec.bench_label,
            "model": {
                "path": os.path.abspath(model_path),
                "name": spec.model,
                "model_type": getattr(model_cfg, "model_type", None),
                "config_sha256": _model_config_digest(model_path),
                "weights_sha256": weights_digest,
                "dtype": spec.dtype,
            },
            "backend": {"name": bspec.name, "options": dict(b.options), "config": bconfig.to_dict()},
            "generation": {
                "greedy": True,
                "num_beams": 1,
                "batch_size": 1,
                "max_new_tokens_override": spec.max_new_tokens,
            },
            "seed": spec.seed,
            "data": data_fp,
        }
        fingerprint = _fingerprint(record)
        if state.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            _check_compatible(run_dir, fingerprint, spec.replace_stale, legacy=_fingerprint(record, legacy=True))
            repair_tail(run_dir / "predictions.jsonl")
        state.wait_for_everyone()
        done = _load_done(run_dir, samples)
        pending = [s for s in samples if s["id"] not in done]
        state.wait_for_everyone()  # everyone has read before anyone appends
        if pending:
            if model is None:
                model = _load_model(model_path, spec.dtype, device)
            pred_path = run_dir / ("predictions.jsonl" if world == 1 else f"predictions.rank{rank}.jsonl")
            repair_tail(pred_path)
            with state.split_between_processes(pending) as shard:
                logger.info(
                    "%s: %d of %d samples to generate (rank %d: %d)",
                    b.label,
                    len(pending),
                    len(samples),
                    rank,
                    len(shard),
                )
                with patcher(model, bspec.name, **b.options) as handle:
                    if shard:
                        _warm_up(model, tokenizer, shard[0], device)
                    for s in tqdm(
                        shard,
                        desc=f"{spec.bench_label} {b.label}" + (f" [rank {rank}]" if world > 1 else ""),
                        position=rank,
                        leave=world == 1,
                    ):
                        rec = generate_one(model, tokenizer, s, handle, device, eos_ids)
                        rec["score"] = sample_score(spec, s, rec["pred"])
                        if spec.benchmark == "longbench":
                            rec["answers"], rec["all_classes"], rec["meta_length"] = (
                                s["outputs"],
                                s.get("all_classes"),
                                s["meta"]["length"],
                            )
                        append_jsonl(pred_path, rec)
            state.wait_for_everyone()
        if state.is_main_process:
            records = _merge(run_dir, samples)
            metrics = res.compute_metrics(
                spec.bench_label,
                samples,
                records,
                lambda t, p: score_group(spec, t, p),
                lambda m: extra_metrics(spec, m),
            )
            metrics["backend"], metrics["model"], metrics["skipped"] = b.label, model_label, prepared.skipped
            write_json(run_dir / "metrics.json", metrics)
            config = _config_record(
                run_dir, record, fingerprint, spec, prepared, model_path, tokenizer, model, eos_ids, world, device
            )
            write_json(run_dir / "config.json", config)
            title = f"{spec.bench_label} / {model_label} / {b.label}"
            (run_dir / "summary.md").write_text(
                res.summary_markdown(title, config, metrics, prepared.skipped), encoding="utf-8"
            )
            if spec.benchmark == "niah":
                nh.plot_heatmap(metrics["scores"], run_dir / "niah_heatmap.png", title)
            all_metrics[b.label] = metrics
        state.wait_for_everyone()

    if state.is_main_process:
        stem = f"{spec.bench_label}__{model_label}"
        (out_root / f"comparison__{stem}.md").write_text(
            res.comparison_markdown(spec.bench_label, all_metrics), encoding="utf-8"
        )
        res.plot_score_vs_length(
            all_metrics, out_root / f"score_vs_length__{stem}.png", f"{spec.bench_label}: {model_label}"
        )
    state.wait_for_everyone()
    if not state.is_main_process:  # every rank returns the same metrics
        for b in spec.backends:
            run_dir = out_root / res.run_dir_name(spec.bench_label, model_label, b.name, b.options)
            all_metrics[b.label] = json.loads((run_dir / "metrics.json").read_text())
    return all_metrics


def _config_record(
    run_dir: Path, record, fingerprint, spec, prepared, model_path, tokenizer, model, eos_ids, world, device
) -> dict[str, Any]:
    """The reproducibility record written as config.json (a rerun that loads no model keeps the old runtime)."""
    cfg = dict(record)
    cfg["fingerprint"] = fingerprint
    cfg["spec"] = {k: v for k, v in dataclasses.asdict(spec).items() if k != "backends"}
    cfg["versions"] = res.versions()
    cfg["git"] = res.git_state()
    cfg["command"] = res.python_command()
    cfg["tokenizer"] = {
        "class": type(tokenizer).__name__,
        "sha256": _tokenizer_digest(model_path),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token_id": tokenizer.pad_token_id,
    }
    cfg["eos_token_ids"] = eos_ids
    cfg["chat_template"] = prepared.record.get("chat_template")
    cfg["truncation"] = prepared.record.get("truncation") or {"rule": "none: the haystack is sized to the length"}
    cfg["data_record"] = {k: v for k, v in prepared.record.items() if k not in ("chat_template", "truncation")}
    cfg["data_inputs"] = prepared.fingerprint_inputs
    runtime = (
        {"world_size": world, "device": str(device), "model_dtype": str(next(model.parameters()).dtype)}
        if model is not None
        else None
    )
    old_path = run_dir / "config.json"
    if runtime is None and old_path.exists():
        runtime = json.loads(old_path.read_text()).get("runtime")
    cfg["runtime"] = runtime
    cfg["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return cfg
