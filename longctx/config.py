"""One ``@dataclass`` per method, validated at construction.

Every config derives from :class:`BackendConfig`, which gives them a common way to be
built from ``**options`` or CLI ``k=v`` strings with a clear error for unknown keys.
Sections below are one per method; keep each method's config in its own section.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Optional


def _require(cond: bool, cls: str, name: str, expected: str, value: Any) -> None:
    """Raise ``ValueError("Cls.name requires <expected> (got <value>)")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"{cls}.{name} requires {expected} (got {value!r})")


def _coerce(value: Any, annotation: Any, cls: str, name: str) -> Any:
    """Convert a CLI string to the field's declared type (int, float, bool, str, Optional[...])."""
    if not isinstance(value, str):
        return value
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(
            annotation.replace("Optional[", "").rstrip("]"), str
        )
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        annotation = args[0] if args else str
    try:
        if annotation is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float):
            return annotation(value)
    except ValueError:
        raise ValueError(f"{cls}.{name} requires a {annotation.__name__} (got {value!r})") from None
    return value


def parse_backend_entry(entry: str, what: str = "--backend") -> tuple[str, dict[str, str]]:
    """``"NAME"`` or ``"NAME:key=value,..."`` -> ``(NAME, {key: value})`` (values stay strings).

    The command-line form of one backend with inline options, as ``longctx eval`` and
    ``longctx diagnose`` take it; configs coerce the strings (:meth:`BackendConfig.from_options`).
    ``what`` names the argument in error messages.
    """
    name, _, inline = entry.partition(":")
    if not name.strip():
        raise ValueError(f"{what} requires a backend name (got {entry!r})")
    options = {}
    for item in filter(None, (x.strip() for x in inline.split(","))):
        if "=" not in item:
            raise ValueError(f"{what} {name.strip()}: requires key=value items (got {item!r})")
        key, value = item.split("=", 1)
        options[key.strip()] = value.strip()
    return name.strip(), options


def parse_opts(items: Optional[list[str]]) -> dict[str, str]:
    """``--opt`` items ``["k=v", "NAME.k=v", ...]`` -> ``{"k": "v", "NAME.k": "v"}`` (values stay strings;
    configs coerce them). A key given twice with different values is an error."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--opt requires key=value or NAME.key=value (got {item!r})")
        key, value = item.split("=", 1)
        key, value = key.strip(), value.strip()
        if key in out and out[key] != value:
            raise ValueError(
                f"--opt {key} given twice ({out[key]!r} and {value!r}); give each option once "
                f"(to compare two settings of one backend, run once per setting)"
            )
        out[key] = value
    return out


def split_options(options: Optional[dict[str, Any]], names: list[str], what: str = "--opt"
                  ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Options ``key`` (for every backend) and ``NAME.key`` (for backend NAME only) ->
    ``(common, {NAME: {key: value}})``; a NAME not among ``names`` is an error (``what`` names the
    argument)."""
    common: dict[str, Any] = {}
    targeted: dict[str, dict[str, Any]] = {}
    for key, value in (options or {}).items():
        if "." not in key:
            common[key] = value
            continue
        name, field = key.split(".", 1)
        if name not in names:
            raise ValueError(f"{what} {key}={value} targets backend {name!r}, which is not among {names}")
        targeted.setdefault(name, {})[field] = value
    return common, targeted


@dataclasses.dataclass
class BackendConfig:
    """Base of every method config. Subclasses validate their fields in ``__post_init__``."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> "BackendConfig":
        """Build the config from keyword options (values may be CLI strings).

        Raises
        ------
        ValueError
            For an option the config does not have (the message lists the valid ones) or
            a value that fails validation.
        """
        merged = dict(options or {})
        merged.update(kwargs)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - set(fields))
        if unknown:
            raise ValueError(
                f"{cls.__name__} got unknown option(s) {unknown}; valid options: {sorted(fields) or '(none)'}"
            )
        hints = typing.get_type_hints(cls)
        coerced = {k: _coerce(v, hints.get(k, fields[k].type), cls.__name__, k) for k, v in merged.items()}
        return cls(**coerced)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------- dense
@dataclasses.dataclass
class DenseConfig(BackendConfig):
    """Exact attention over the whole cache (the reference backend).

    Parameters
    ----------
    offload : bool
        Keep K/V on the host tier instead of the device tier (default ``False``).
    """

    offload: bool = False

    def __post_init__(self):
        _require(isinstance(self.offload, bool), "DenseConfig", "offload", "a bool", self.offload)


# ------------------------------------------------------------------------- shadowkv
SHADOWKV_DEFAULT_RANK = 160  # the paper's rank per layer, capped at Hkv·D by the layer
SHADOWKV_SVD_METHODS = ("gram", "svd", "lowrank")
SHADOWKV_STORAGE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class ShadowKVConfig(BackendConfig):
    """ShadowKV: low-rank pre-RoPE keys, offloaded values, sparse chunk selection (arXiv 2410.21465).

    Parameters
    ----------
    sparse_budget : int
        Prompt tokens rebuilt per decode step and KV head, a multiple of ``chunk_size``
        (default 2048, 1.56% of 128K as in the paper).
    rank : int, optional
        Rank r of the per-layer, per-sequence factorisation of the pre-RoPE keys, shared by
        all KV heads. Default ``None``: 160 capped at ``num_kv_heads * head_dim``; an
        explicit value must be in ``[1, num_kv_heads * head_dim]`` (checked by the layer).
    chunk_size : int
        Tokens per chunk C; a landmark is the mean of a chunk's post-RoPE keys (default 8).
    local_window : int
        Last prompt tokens kept exact on the device (default 32, the official 4 chunks of 8;
        the prompt remainder modulo ``chunk_size`` joins it).
    outlier_chunks : int, optional
        Chunks per KV head with the lowest min-cosine to their landmark, kept exact on the
        device. Default ``None``: ``sparse_budget * 24 // 1024`` (48 at 2048), the official
        CPU-class rule of 24 per 1024 budget tokens, applied proportionally below 1024 instead
        of rounding to 0 there (12 at 512, 1 from 48, none below 48 tokens).
    reuse_hits : bool
        Keep chunks selected at the previous step in place instead of rebuilding them
        (default ``True``; the output is identical either way).
    svd_method : {"gram", "svd", "lowrank"}
        How the top-r right singular subspace of the ``[T, Hkv·D]`` keys is found: ``"gram"``
        (default) eigendecomposes the fp64 Gram matrix (exact subspace, streams over T,
        ~5x faster than SVD on CPU), ``"svd"`` runs ``torch.linalg.svd`` as the official
        code does, ``"lowrank"`` runs the randomized ``torch.svd_lowrank``.
    dense_fallback : bool
        When the prompt is shorter than ``sparse_budget``, keep it all exact and attend
        densely (default ``True``; ``stats()["fallback_dense"]`` says so). ``False`` forces
        the sparse path, which then selects every chunk.
    rope_theta : float
        RoPE base used only when the layer has no rotary helper (bench, unit tests outside
        a model); standard Llama rotate-half RoPE (default 10000).
    landmark_dtype : {"bfloat16", "float32", "float16", None}
        Storage dtype of the landmarks, which every decode step reads in full. Default
        ``"bfloat16"``, the official code's dtype (it runs in bf16 throughout): landmarks only
        rank chunks, scores accumulate in fp32, and for an fp32 cache it halves the bytes of
        the step's largest read (at 128K, 6.4x faster than dense decode instead of 5.6x with
        fp32 landmarks; BENCHMARKS.md). ``None``: the keys' dtype.
    factor_dtype : {None, "float32", "bfloat16", "float16"}
        Storage dtype of the key factors U and SV. Default ``None``: the keys' dtype (a
        full-rank fp32 cache then reproduces the keys to fp32 rounding). ``"bfloat16"`` halves
        U's bytes (with bf16 landmarks: device tier 9.7% instead of 16.7% of dense KV at 128K);
        the C++ rebuild then runs on AMX tiles (``rank % 32 == 0``, ``head_dim % 64 == 0``, a CPU
        with AMX) or AVX512-BF16 pair dot products, accumulating in fp32, and the rebuilt keys
        carry bf16 rounding (~0.4% relative, far below the rank truncation error). On the 2-core
        AMX CPU of BENCHMARKS.md, bf16 landmarks + factors are the fastest CPU configuration
        (a decode step at 128K takes 20-35% less time than with all-fp32 storage: 7.3x faster
        than dense decode there, against 5.6x; 6.4x with the default bf16 landmarks alone).
    """

    sparse_budget: int = 2048
    rank: Optional[int] = None
    chunk_size: int = 8
    local_window: int = 32
    outlier_chunks: Optional[int] = None
    reuse_hits: bool = True
    svd_method: str = "gram"
    dense_fallback: bool = True
    rope_theta: float = 10000.0
    landmark_dtype: Optional[str] = "bfloat16"
    factor_dtype: Optional[str] = None

    def __post_init__(self):
        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        name = "ShadowKVConfig"
        _require(is_int(self.chunk_size) and self.chunk_size >= 1, name, "chunk_size", "a positive int", self.chunk_size)
        _require(
            is_int(self.sparse_budget) and self.sparse_budget >= self.chunk_size,
            name,
            "sparse_budget",
            f"an int of at least one chunk (chunk_size={self.chunk_size})",
            self.sparse_budget,
        )
        _require(
            self.sparse_budget % self.chunk_size == 0,
            name,
            "sparse_budget",
            f"a multiple of chunk_size={self.chunk_size}",
            self.sparse_budget,
        )
        _require(self.rank is None or (is_int(self.rank) and self.rank >= 1), name, "rank", "None or an int >= 1", self.rank)
        _require(is_int(self.local_window) and self.local_window >= 0, name, "local_window", "an int >= 0", self.local_window)
        _require(
            self.outlier_chunks is None or (is_int(self.outlier_chunks) and self.outlier_chunks >= 0),
            name,
            "outlier_chunks",
            "None or an int >= 0",
            self.outlier_chunks,
        )
        for flag in ("reuse_hits", "dense_fallback"):
            _require(isinstance(getattr(self, flag), bool), name, flag, "a bool", getattr(self, flag))
        _require(self.svd_method in SHADOWKV_SVD_METHODS, name, "svd_method", f"one of {SHADOWKV_SVD_METHODS}", self.svd_method)
        _require(
            isinstance(self.rope_theta, (int, float)) and not isinstance(self.rope_theta, bool) and self.rope_theta > 0,
            name,
            "rope_theta",
            "a positive number",
            self.rope_theta,
        )
        _require(
            self.landmark_dtype in (None, *SHADOWKV_STORAGE_DTYPES),
            name,
            "landmark_dtype",
            f"None or one of {SHADOWKV_STORAGE_DTYPES}",
            self.landmark_dtype,
        )
        _require(
            self.factor_dtype in (None, *SHADOWKV_STORAGE_DTYPES),
            name,
            "factor_dtype",
            f"None or one of {SHADOWKV_STORAGE_DTYPES}",
            self.factor_dtype,
        )

    @property
    def num_outlier_chunks(self) -> int:
        """Outlier chunks per KV head: ``outlier_chunks`` or 24 per 1024 budget tokens."""
        if self.outlier_chunks is not None:
            return self.outlier_chunks
        return self.sparse_budget * 24 // 1024


# ------------------------------------------------------------------------- retrieval
RETRIEVAL_INDEX_TYPES = ("attention_aware", "flat", "ivf", "hnsw")  # == longctx.index.INDEX_TYPES


@dataclasses.dataclass
class RetrievalConfig(BackendConfig):
    """RetrievalAttention: static sink + window on the device, ANNS over the offloaded rest (arXiv 2409.10516).

    Parameters
    ----------
    n_sink : int
        First prompt tokens kept exact on the device (default 128, the paper's).
    window : int
        Most recent tokens kept exact on the device (default 512, the paper's). Tokens leave
        the window for the host tier and the index in blocks of ``insert_block``.
    top_k : int
        Offloaded keys retrieved per query head and decode query (default 100; the paper
        uses 2000 for KV-retrieval tasks and its budget study).
    index : {"attention_aware", "flat", "ivf", "hnsw"}
        Index over the offloaded keys (default ``"attention_aware"``, the paper's; the faiss
        baselines make its comparison reproducible).
    ef_search : int
        Search width: beam width of the attention-aware graph, ``efSearch`` of HNSW (raised
        to ``top_k`` when smaller; default 160).
    degree : int
        Attention-aware: projection edges per key and query head (default 128).
    base_degree : int
        Attention-aware: key-key edges per key, shared by a GQA group (default 8).
    proj_prune : bool
        Attention-aware: prune the projection edges by RoarGraph's occlusion rule (inner
        product) and add reverse edges, instead of linking each training query's top-1 key
        to the query's other top keys in rank order (default ``False``).
    proj_reverse : bool
        Attention-aware, rank-order projection (``proj_prune=False``): also link each
        neighbour back to its pivot while it has room (default ``True``: without the back
        links a needle key that only a few prefill queries rank first is rarely reached;
        see :class:`longctx.index.IndexParams`).
    num_entry : int
        Attention-aware: entry keys of each head's search, the key nearest the key centroid
        plus the keys most often a training query's top-1 (default 4).
    build_knn : int
        Attention-aware: exact neighbours per training query (RoarGraph's Nq, default 100).
    build_ef : int
        Attention-aware: beam width of the key->key searches that link keys at build time and
        insert keys leaving the window (default 64).
    max_train_queries : int
        Attention-aware: prefill queries per head used for the exact kNN, evenly subsampled
        beyond this (default 4096; the kNN costs ``Nq * T * D`` per head).
    nprobe : int
        IVF: inverted lists probed per query (default 32).
    nlist : int, optional
        IVF: inverted lists; if not provided, ``4 * sqrt(T)``.
    hnsw_m : int
        HNSW: links per node (default 32).
    half_keys : bool
        Attention-aware: searches score candidates on an fp16 copy of the offloaded keys (half
        the memory traffic; +50% of the fp32 key bytes on the host tier). Attention itself
        reads the fp32 keys. Default ``True``.
    insert_block : int
        Tokens moved from the window to the index at once (default 64; the window holds
        between ``window`` and ``window + insert_block - 1`` tokens before a step's new ones).
    num_threads : int
        OpenMP threads of the attention-aware index; 0 follows ``torch.get_num_threads()``
        (default 0).
    """

    n_sink: int = 128
    window: int = 512
    top_k: int = 100
    index: str = "attention_aware"
    ef_search: int = 160
    degree: int = 128
    base_degree: int = 8
    proj_prune: bool = False
    proj_reverse: bool = True
    num_entry: int = 4
    build_knn: int = 100
    build_ef: int = 64
    max_train_queries: int = 4096
    nprobe: int = 32
    nlist: Optional[int] = None
    hnsw_m: int = 32
    half_keys: bool = True
    insert_block: int = 64
    num_threads: int = 0

    def __post_init__(self):
        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        name = "RetrievalConfig"
        _require(is_int(self.top_k) and self.top_k > 0, name, "top_k", "a positive int", self.top_k)
        _require(is_int(self.n_sink) and self.n_sink >= 0, name, "n_sink", "an int >= 0", self.n_sink)
        _require(is_int(self.window) and self.window >= 0, name, "window", "an int >= 0", self.window)
        _require(self.index in RETRIEVAL_INDEX_TYPES, name, "index", f"one of {list(RETRIEVAL_INDEX_TYPES)}", self.index)
        for field in (
            "ef_search", "degree", "num_entry", "build_knn", "build_ef", "max_train_queries", "nprobe", "hnsw_m",
            "insert_block",
        ):
            value = getattr(self, field)
            _require(is_int(value) and value > 0, name, field, "a positive int", value)
        _require(is_int(self.base_degree) and self.base_degree >= 2, name, "base_degree", "an int >= 2", self.base_degree)
        _require(self.nlist is None or (is_int(self.nlist) and self.nlist > 0), name, "nlist", "None or a positive int", self.nlist)
        _require(is_int(self.num_threads) and self.num_threads >= 0, name, "num_threads", "an int >= 0", self.num_threads)
        for field in ("proj_prune", "proj_reverse", "half_keys"):
            _require(isinstance(getattr(self, field), bool), name, field, "a bool", getattr(self, field))

    @property
    def static_size(self) -> int:
        """Tokens of the static set (sink + window)."""
        return self.n_sink + self.window

# ------------------------------------------------------------------------- hip
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass
class HiPConfig(BackendConfig):
    """HiP: hierarchically pruned attention (Lee et al., arXiv 2406.09827).

    Per block of ``block_size_q`` queries, a tree search keeps the top ``k // block_size_k``
    key blocks (halving candidate ranges, scoring each by its centre block); attention runs
    over those blocks plus ``sink`` first tokens and a ``window`` of recent tokens.

    Parameters
    ----------
    k : int
        Keys selected per query block by the mask (default 512, the paper's).
    block_size_q, block_size_k : int
        Query / key block sizes b_q, b_k (defaults 32 and 2, the paper's).
    block_stride_q, block_stride_k : int
        Subsampling strides inside a block when scoring a branch (defaults 2 and 1, the
        official v1.1 defaults).
    sink : int
        Attention sinks: the first tokens, always attended (default 16).
    window : int
        Sliding window of recent tokens, always attended (default 256).
    dense_layers : int
        The first ``dense_layers`` decoder layers stay dense (default 3, the paper's for 7-8B).
    dense_prefill : bool
        Attend the prompt densely and prune only at decode (default ``False``: the prompt is
        pruned too). The paper's RULER / passkey results that keep the effective context are
        for this dense-prefill setting; sparse prefill at long contexts degrades.
    refresh_interval : int
        Decode steps between mask re-estimations; the mask is reused in between (default 8).
    gqa_shared_mask : bool
        One mask per KV head, scored as the max over the G query heads of its group
        (default ``True``: G times cheaper gathers); ``False`` estimates one mask per query head.
    offload : bool
        Keep K/V on the host tier; decode moves only the keys the estimation scores and
        the blocks attention reads (default ``False``).
    """

    k: int = 512
    block_size_q: int = 32
    block_size_k: int = 2
    block_stride_q: int = 2
    block_stride_k: int = 1
    sink: int = 16
    window: int = 256
    dense_layers: int = 3
    dense_prefill: bool = False
    refresh_interval: int = 8
    gqa_shared_mask: bool = True
    offload: bool = False

    def __post_init__(self):
        for name in ("block_size_q", "block_size_k"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, "HiPConfig", name, "a positive int", value)
        _require(
            _is_int(self.k) and self.k > 0 and self.k % self.block_size_k == 0,
            "HiPConfig",
            "k",
            f"a positive multiple of block_size_k={self.block_size_k}",
            self.k,
        )
        for name, size in (("block_stride_q", self.block_size_q), ("block_stride_k", self.block_size_k)):
            value = getattr(self, name)
            _require(_is_int(value) and 1 <= value <= size, "HiPConfig", name, f"an int in [1, {size}]", value)
        for name in ("sink", "window", "dense_layers"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, "HiPConfig", name, "a non-negative int", value)
        _require(
            _is_int(self.refresh_interval) and self.refresh_interval >= 1,
            "HiPConfig",
            "refresh_interval",
            "an int >= 1",
            self.refresh_interval,
        )
        for name in ("dense_prefill", "gqa_shared_mask", "offload"):
            _require(isinstance(getattr(self, name), bool), "HiPConfig", name, "a bool", getattr(self, name))

    @property
    def mask_blocks(self) -> int:
        """Key blocks kept per query block, ``k // block_size_k``."""
        return self.k // self.block_size_k

    @property
    def sink_blocks(self) -> int:
        """Key blocks covering the sink tokens, ``ceil(sink / block_size_k)``."""
        return -(-self.sink // self.block_size_k)

# ------------------------------------------------------------------------- triforce
@dataclasses.dataclass
class StreamingConfig(BackendConfig):
    """StreamingLLM cache: attention sinks plus a recent window (Xiao et al., arXiv 2309.17453).

    TriForce's draft level. Each query attends to the first ``sinks`` tokens and to the
    ``window`` most recent tokens up to itself; positions are re-indexed to cache slots
    (the paper's "positions within the cache"), so RoPE distances never exceed the cache size.

    Parameters
    ----------
    sinks : int
        First tokens always kept (default 16, TriForce's draft).
    window : int
        Recent tokens attended (default 240: TriForce keeps ``256 - 16 - gamma`` recent tokens).
    rollback_reserve : int
        Extra recent tokens held beyond the window so that rolling back up to this many
        tokens still leaves a full window (default 64; larger rollbacks shrink the window).
    slot_positions : bool
        Re-rotate keys and queries to their cache slots (default ``True``). ``False`` keeps
        the original positions (the model's own RoPE); also used when the layer has no
        rotary helper.
    """

    sinks: int = 16
    window: int = 240
    rollback_reserve: int = 64
    slot_positions: bool = True

    def __post_init__(self):
        name = "StreamingConfig"
        _require(_is_int(self.sinks) and self.sinks >= 0, name, "sinks", "a non-negative int", self.sinks)
        _require(_is_int(self.window) and self.window >= 1, name, "window", "an int >= 1", self.window)
        _require(
            _is_int(self.rollback_reserve) and self.rollback_reserve >= 0,
            name,
            "rollback_reserve",
            "a non-negative int",
            self.rollback_reserve,
        )
        _require(isinstance(self.slot_positions, bool), name, "slot_positions", "a bool", self.slot_positions)


@dataclasses.dataclass
class TriForceRetrievalConfig(BackendConfig):
    """TriForce's middle-level retrieval cache (Sun et al., arXiv 2404.11912).

    The prompt is cut into chunks of ``chunk_size`` tokens; each chunk's key is the mean of
    its post-RoPE keys. The last prompt query scores every chunk (softmax per query head,
    max over the G heads sharing a KV head, which for MHA ranks exactly as the official
    raw ``q·chunk_k``); chunk 0 (attention sink) plus the top ``budget / chunk_size - 1``
    chunks are kept per KV head, together with the prompt remainder modulo ``chunk_size``
    and every generated token.

    Parameters
    ----------
    chunk_size : int
        Tokens per chunk C (default 8, the official).
    budget : int
        Prompt tokens kept per KV head, a multiple of ``chunk_size`` (default 4096, the
        official on-chip setting). Prompts that fit the budget are kept whole.
    retrieval_interval : int
        Re-select the chunks every this many decode calls, scored by the last query of the
        call (default 0: built once from the last prompt query, as the official code runs).
        A positive value keeps the whole prompt K/V on the host tier to select from.
    local_window : int
        Last prompt tokens always kept, rounded up to whole chunks and counted in the budget
        (default 0, the official rule; a window helps models whose last query does not
        score the local context highest).
    """

    chunk_size: int = 8
    budget: int = 4096
    retrieval_interval: int = 0
    local_window: int = 0

    def __post_init__(self):
        name = "TriForceRetrievalConfig"
        _require(
            _is_int(self.chunk_size) and self.chunk_size >= 1, name, "chunk_size", "a positive int", self.chunk_size
        )
        _require(
            _is_int(self.budget) and self.budget >= self.chunk_size,
            name,
            "budget",
            f"an int of at least one chunk (chunk_size={self.chunk_size})",
            self.budget,
        )
        _require(
            self.budget % self.chunk_size == 0,
            name,
            "budget",
            f"a multiple of chunk_size={self.chunk_size}",
            self.budget,
        )
        _require(
            _is_int(self.retrieval_interval) and self.retrieval_interval >= 0,
            name,
            "retrieval_interval",
            "a non-negative int",
            self.retrieval_interval,
        )
        _require(
            _is_int(self.local_window) and 0 <= self.local_window < self.budget,
            name,
            "local_window",
            f"an int in [0, budget={self.budget})",
            self.local_window,
        )

    @property
    def num_chunks(self) -> int:
        """Prompt chunks kept per KV head, ``budget // chunk_size`` (chunk 0 included)."""
        return self.budget // self.chunk_size
