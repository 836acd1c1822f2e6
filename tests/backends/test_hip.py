"""HiP backend: exactness vs dense, the tree search vs a loop reference, complexity, fidelity, errors.

The C++ path (``impl="cpp"``) is compared with the torch reference wherever ``longctx._C`` has
the HiP kernels; the Triton kernels run under ``TRITON_INTERPRET=1`` in a subprocess
(``hip_triton_cases.py``).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longctx
from longctx.backends import LayerContext, list_backends, make_layer
from longctx.config import HiPConfig
from longctx.diagnostics import attention_probs, recall_metrics
from longctx.ops.hip import (
    _cpp_module,
    attended_mask,
    block_geometry,
    hip_attention,
    hip_mask,
    hip_mask_ref,
    num_iterations,
)
from longctx.ops.reference import causal_attention_ref
from tests.conftest import tiny_model

ATOL, RTOL = 2e-5, 1e-4
IMPLS = ["ref"] + (["cpp"] if _cpp_module() is not None else [])
SMALL = dict(block_size_q=8, block_size_k=2, sink=4, window=16, dense_layers=0)


def _ctx(H=4, Hkv=2, D=16, layer_idx=0, num_layers=1):
    return LayerContext(layer_idx=layer_idx, num_layers=num_layers, num_heads=H, num_kv_heads=Hkv, head_dim=D)


def _qkv(gen, B, H, Hkv, S, D):
    return (
        torch.randn(B, H, S, D, generator=gen),
        torch.randn(B, Hkv, S, D, generator=gen),
        torch.randn(B, Hkv, S, D, generator=gen),
    )


# ----------------------------------------------------------------------------- config and registry
def test_registered_and_exported():
    assert "hip" in list_backends()
    assert longctx.HiPConfig is HiPConfig
    cfg = HiPConfig()
    assert (cfg.k, cfg.block_size_q, cfg.block_size_k, cfg.sink, cfg.window) == (512, 32, 2, 16, 256)
    assert (cfg.dense_layers, cfg.refresh_interval, cfg.mask_blocks, cfg.sink_blocks) == (3, 8, 256, 8)
    assert HiPConfig.from_options({"k": "64", "offload": "true"}) == HiPConfig(k=64, offload=True)


@pytest.mark.parametrize(
    "opts, match",
    [
        (dict(k=511), "k requires a positive multiple of block_size_k=2"),
        (dict(k=30, block_size_k=4), "k requires a positive multiple of block_size_k=4"),
        (dict(k=0), "HiPConfig.k requires"),
        (dict(block_size_q=0), "block_size_q requires a positive int"),
        (dict(block_size_k=-2), "block_size_k requires a positive int"),
        (dict(refresh_interval=0), "refresh_interval requires an int >= 1"),
        (dict(block_stride_q=64), r"block_stride_q requires an int in \[1, 32\]"),
        (dict(block_stride_k=0), r"block_stride_k requires an int in \[1, 2\]"),
        (dict(window=-1), "window requires a non-negative int"),
        (dict(offload=1), "offload requires a bool"),
        (dict(dense_prefill=2), "dense_prefill requires a bool"),
        (dict(k=True), "HiPConfig.k requires"),
    ],
)
def test_bad_config_errors(opts, match):
    with pytest.raises(ValueError, match=match):
        HiPConfig(**opts)
    with pytest.raises(ValueError, match=match):
        make_layer("hip", _ctx(), **opts)


def test_bad_inputs(gen):
    layer = make_layer("hip", _ctx(), **SMALL)
    q, k, v = _qkv(gen, 1, 4, 2, 10, 16)
    with pytest.raises(RuntimeError, match="before prefill"):
        layer.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], None)
    with pytest.raises(ValueError, match="HiP requires q"):
        layer.prefill(q[:, :2], k, v, None)  # wrong head count
    with pytest.raises(ValueError, match="HiP requires q"):
        layer.prefill(q, k[..., :8], v[..., :8], None)
    layer.prefill(q, k, v, None)
    with pytest.raises(RuntimeError, match="called twice"):
        layer.prefill(q, k, v, None)
    q2, k2, v2 = _qkv(gen, 2, 4, 2, 1, 16)
    with pytest.raises(ValueError, match="batch size"):
        layer.decode(q2, k2, v2, None)
    with pytest.raises(ValueError, match="at most the 0 tokens"):
        layer.rollback(1)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shared", [True, False])
def test_exact_when_k_covers_everything(gen, monkeypatch, impl, shared):
    """k >= T: every block of every search region is kept, so HiP is dense causal attention."""
    monkeypatch.setenv("LONGCTX_OPS", impl)
    B, H, Hkv, D, P = 2, 4, 2, 16, 203  # prompt not a multiple of b_q or b_k
    cfg = dict(SMALL, k=256, refresh_interval=3, gqa_shared_mask=shared)
    layer = make_layer("hip", _ctx(H, Hkv, D), **cfg)
    q, k, v = _qkv(gen, B, H, Hkv, P + 13, D)
    out = layer.prefill(q[:, :, :P], k[:, :, :P], v[:, :, :P], None)
    ref, _ = causal_attention_ref(q[:, :, :P], k[:, :, :P], v[:, :, :P], scale=D**-0.5)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    t = P
    for S in (1, 1, 3, 1, 1, 1, 4, 1):  # single steps and verification chunks
        out = layer.decode(q[:, :, t : t + S], k[:, :, t : t + S], v[:, :, t : t + S], None)
        t += S
        ref, _ = causal_attention_ref(q[:, :, :t], k[:, :, :t], v[:, :, :t], scale=D**-0.5)
        torch.testing.assert_close(out, ref[:, :, -S:], atol=ATOL, rtol=RTOL)
    st = layer.stats()
    assert st["decode_steps"] == 8 and st["mask_refreshes"] == 1 + 2  # prefill, then every 3rd step
    assert st["keys_attended_per_query"] == t  # the last step's query sees every key
    assert not st["dense"]


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_of_the_last_queries_only(gen, monkeypatch, impl):
    """Prefill may pass only the last S queries of a T-token prompt (as ``longctx bench`` does).

    Query blocks are consecutive runs of b_q queries from the first one given: when that
    query starts a block of the full prompt too, the masks and outputs are the same."""
    monkeypatch.setenv("LONGCTX_OPS", impl)
    q, k, v = _qkv(gen, 1, 4, 2, 152, 16)
    for cfg, exact in ((dict(SMALL, k=256), True), (dict(SMALL, k=16), False)):
        layer = make_layer("hip", _ctx(), **cfg)
        out = layer.prefill(q[:, :, -24:], k, v, None)  # 152 - 24 = 128, a multiple of b_q = 8
        full = make_layer("hip", _ctx(), **cfg).prefill(q, k, v, None)
        torch.testing.assert_close(out, full[:, :, -24:], atol=ATOL, rtol=RTOL)
        if exact:
            ref, _ = causal_attention_ref(q[:, :, -21:], k, v, scale=16**-0.5)
            torch.testing.assert_close(make_layer("hip", _ctx(), **cfg).prefill(q[:, :, -21:], k, v, None), ref,
                                       atol=ATOL, rtol=RTOL)
        assert layer.seq_length == 152


def test_dense_layers_and_sliding_window_stay_dense(gen):
    q, k, v = _qkv(gen, 1, 4, 2, 120, 16)
    ref, _ = causal_attention_ref(q, k, v, scale=16**-0.5)
    layer = make_layer("hip", _ctx(layer_idx=1, num_layers=4), **dict(SMALL, k=8, dense_layers=2))
    torch.testing.assert_close(layer.prefill(q, k, v, None), ref, atol=ATOL, rtol=RTOL)
    assert layer.stats()["dense"] and layer.stats()["mask_refreshes"] == 0
    sparse = make_layer("hip", _ctx(layer_idx=2, num_layers=4), **dict(SMALL, k=8, dense_layers=2))
    assert (sparse.prefill(q, k, v, None) - ref).abs().max() > 1e-3  # k=8 of 120 keys really prunes
    assert sparse.stats()["mask_refreshes"] == 1


def test_dense_prefill_attends_the_prompt_densely_and_prunes_decode(gen):
    q, k, v = _qkv(gen, 1, 4, 2, 121, 16)
    ref, _ = causal_attention_ref(q[:, :, :120], k[:, :, :120], v[:, :, :120], scale=16**-0.5)
    cfg = dict(SMALL, k=8, dense_prefill=True)
    layer = make_layer("hip", _ctx(), **cfg)
    torch.testing.assert_close(layer.prefill(q[:, :, :120], k[:, :, :120], v[:, :, :120], None), ref,
                               atol=ATOL, rtol=RTOL)
    assert layer.stats()["mask_refreshes"] == 0 and not layer.stats()["fallback_dense"]
    out = layer.decode(q[:, :, 120:], k[:, :, 120:], v[:, :, 120:], None)
    assert layer.stats()["mask_refreshes"] == 1  # the first decode step estimates the first mask
    hcfg = HiPConfig(**cfg)
    qs = q[:, :, 120:] * 16**-0.5
    mask = hip_mask(qs, k, 120, hcfg)
    want, _ = hip_attention(qs, k, v, mask.blocks, mask.local_start, 120, hcfg, return_lse=False)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL)
    dense_step, _ = causal_attention_ref(q, k, v, scale=16**-0.5)
    assert (out - dense_step[:, :, 120:]).abs().max() > 1e-3  # k=8 of 121 keys really prunes at decode

# ----------------------------------------------------------------------------- the tree search
def _loop_mask(q, k, q_offset, cfg):
    """Per (batch, mask head, query block) loops: the algorithm as written in the paper."""
    B, H, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = H // Hkv
    Gm = G if cfg.gqa_shared_mask else 1
    M, K, b_k = H // Gm, cfg.mask_blocks, cfg.block_size_k
    starts, ends, local = block_geometry(S, q_offset, cfg, q.device)
    blocks = torch.full((B, M, len(starts), K), -1, dtype=torch.int64)
    reads = torch.zeros(len(starts), dtype=torch.int64)
    for b in range(B):
        for m in range(M):
            heads = list(range(m * Gm, (m + 1) * Gm))
            kk = k[b, heads[0] // G]
            for n in range(len(starts)):
                qs, qe = int(starts[n]), int(ends[n])
                pos = [min(qs + i, qe - 1) for i in range(0, min(cfg.block_size_q, S), cfg.block_stride_q)]
                rows = q[b, heads][:, [p - q_offset for p in pos]].reshape(-1, D)
                n_blocks = int(local[n]) // b_k - cfg.sink_blocks
                ranges = [(j * n_blocks // K, (j + 1) * n_blocks // K) for j in range(K)]  # [lo, hi)
                for _ in range(num_iterations(n_blocks, K)):
                    halves, scores = [], []
                    for side in (0, 1):
                        for lo, hi in ranges:
                            mid = lo + (hi - lo + 1) // 2
                            half = (lo, mid) if side == 0 else (mid, hi)
                            halves.append(half)
                            if half[1] == half[0]:
                                scores.append(float("-inf"))
                                continue
                            if hi - lo > 1:
                                reads[n] += len(range(0, b_k, cfg.block_stride_k))
                            rep = cfg.sink_blocks + half[0] + (half[1] - half[0]) // 2
                            keys = kk[[rep * b_k + j for j in range(0, b_k, cfg.block_stride_k)]]
                            scores.append(float((rows @ keys.T).max()))
                    top = torch.tensor(scores).topk(K).indices.tolist()
                    ranges = [halves[i] for i in top]
                found = sorted(lo + cfg.sink_blocks for lo, hi in ranges if hi - lo == 1)
                blocks[b, m, n, : len(found)] = torch.tensor(found, dtype=torch.int64)
    return blocks.sort(dim=-1).values, reads


@pytest.mark.parametrize(
    "cfg",
    [
        HiPConfig(k=16, block_size_q=8, block_size_k=2, sink=4, window=16, dense_layers=0),
        HiPConfig(k=12, block_size_q=6, block_size_k=3, block_stride_q=3, block_stride_k=2, sink=5, window=7,
                  gqa_shared_mask=False, dense_layers=0),
    ],
)
def test_vectorised_search_matches_loop_reference(gen, cfg):
    B, H, Hkv, D, T = 2, 4, 2, 16, 160
    q = torch.randn(B, H, T, D, generator=gen) * D**-0.5
    k = torch.randn(B, Hkv, T, D, generator=gen)
    for S in (T, 5):  # prefill, and a decode chunk at the end of the cache
        want_blocks, want_reads = _loop_mask(q[:, :, T - S :], k, T - S, cfg)
        for impl in IMPLS:
            got = hip_mask(q[:, :, T - S :], k, T - S, cfg, impl=impl)
            assert torch.equal(got.blocks, want_blocks), impl
            assert torch.equal(got.reads, want_reads), impl
        assert int(want_reads.sum()) > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_attention_is_dense_attention_over_the_attended_keys(gen, impl):
    """The block-sparse attention equals a dense softmax restricted to ``attended_mask``."""
    cfg = HiPConfig(k=16, block_size_q=8, block_size_k=2, sink=4, window=16, dense_layers=0)
    B, H, Hkv, D, T = 2, 4, 2, 16, 200
    q = torch.randn(B, H, T, D, generator=gen) * D**-0.5
    k, v = torch.randn(B, Hkv, T, D, generator=gen), torch.randn(B, Hkv, T, D, generator=gen)
    for S in (T, 3):
        qs = q[:, :, T - S :]
        mask = hip_mask_ref(qs, k, T - S, cfg)
        out, lse = hip_attention(qs, k, v, mask.blocks, mask.local_start, T - S, cfg, impl=impl)
        att = attended_mask(mask.blocks, mask.local_start, T - S, S, T, H, cfg)  # [B, H, S, T]
        scores = torch.einsum("bhsd,bhtd->bhst", qs, k.repeat_interleave(H // Hkv, 1)).masked_fill(~att, float("-inf"))
        want = torch.einsum("bhst,bhtd->bhsd", scores.softmax(-1), v.repeat_interleave(H // Hkv, 1))
        torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(lse, scores.logsumexp(-1), atol=ATOL, rtol=RTOL)
        assert bool((att.sum(-1) < torch.arange(T - S, T) + 1).any())  # really sparse
        for rows in (1, 5, S + 3):  # the diagnostics' bounded mask: the last rows of the full one
            torch.testing.assert_close(attended_mask(mask.blocks, mask.local_start, T - S, S, T, H, cfg, rows=rows),
                                       att[:, :, -min(rows, S):], atol=0, rtol=0)


# ----------------------------------------------------------------------------- complexity
def test_keys_scored_per_query_grows_logarithmically(gen):
    """Reads of the search for the newest query block at T = 4K, 16K, 64K (paper defaults, 1 head)."""
    cfg = HiPConfig(dense_layers=0)  # k=512, b_q=32, b_k=2
    D, reads = 16, {}
    k_all = torch.randn(1, 1, 65536, D, generator=gen)
    for T in (4096, 16384, 65536):
        q = torch.randn(1, 1, 32, D, generator=gen) * D**-0.5
        mask = hip_mask(q, k_all[:, :, :T], T - 32, cfg)
        reads[T] = int(mask.reads.sum())
        assert int((mask.blocks >= 0).sum()) == cfg.mask_blocks  # always k keys kept
    for T, n in reads.items():
        # each halving iteration reads at most 2K centre blocks (2k keys); ceil(log2(T / k)) iterations at most
        assert n <= 2 * cfg.k * math.ceil(math.log2(T / cfg.k)), (T, n)
    assert reads[16384] - reads[4096] <= 1.1 * 2 * 2 * cfg.k  # ~2 more iterations per 4x, i.e. + O(k) per doubling
    assert reads[65536] / reads[4096] < 3.0  # while T grew 16x
    assert reads[65536] < 65536 / 8


def test_decode_keys_per_step_is_sublinear(gen):
    """The layer's counter: keys read per decode step (search + attention) at 4K vs 16K."""
    ctx = _ctx(H=2, Hkv=1, D=16)
    per_step = {}
    for T in (4096, 16384):
        layer = make_layer("hip", ctx, dense_layers=0, refresh_interval=2)
        q, k, v = _qkv(gen, 1, 2, 1, T + 2, 16)
        layer.prefill(q[:, :, :T], k[:, :, :T], v[:, :, :T], None)
        layer.decode(q[:, :, T : T + 1], k[:, :, T : T + 1], v[:, :, T : T + 1], None)  # reuse
        reuse = layer.stats()["keys_per_step"]
        layer.decode(q[:, :, T + 1 :], k[:, :, T + 1 :], v[:, :, T + 1 :], None)  # refresh
        per_step[T] = layer.stats()["keys_per_step"]
        assert reuse < 16 + 512 + 256 + 32 + 4 and per_step[T] > reuse
    assert per_step[16384] / per_step[4096] < 1.6  # T grew 4x


# ----------------------------------------------------------------------------- fidelity
def _smooth(x, sigma):
    w = torch.exp(-0.5 * (torch.arange(-3 * sigma, 3 * sigma + 1).float() / sigma) ** 2)
    y = torch.nn.functional.conv1d(x.transpose(-1, -2).reshape(-1, 1, x.shape[-2]), (w / w.sum()).view(1, 1, -1),
                                   padding=3 * sigma)
    return y.view(*x.shape[:-2], x.shape[-1], -1).transpose(-1, -2)


def test_attention_mass_recall_vs_oracle_on_structured_inputs(gen):
    """Keys vary smoothly along the sequence (attention is spatially local, HiP's premise) and each
    query block retrieves three distant spans: the mask finds most of the mass the oracle top-k has."""
    B, H, Hkv, D, T, S = 1, 4, 2, 32, 4096, 64
    k = _smooth(torch.randn(B, Hkv, T, D, generator=gen), 8)
    k = k / k.norm(dim=-1, keepdim=True) * D**0.5
    targets = torch.randint(300, T - 600, (B, H, S // 32, 1, 3), generator=gen).expand(-1, -1, -1, 32, -1)
    kh = k.repeat_interleave(H // Hkv, 1)
    idx = targets.reshape(B, H, S * 3)
    q = torch.gather(kh, 2, idx.unsqueeze(-1).expand(-1, -1, -1, D)).view(B, H, S, 3, D).sum(3)
    q = 1.5 * (q + 0.5 * torch.randn(q.shape, generator=gen))
    v = torch.randn(B, Hkv, T, D, generator=gen)
    layer = make_layer("hip", _ctx(H, Hkv, D), k=128, dense_layers=0)
    layer.record_attended = True
    layer.prefill(q.new_zeros(B, H, T - S, D), k[:, :, : T - S], v[:, :, : T - S], None)
    layer.decode(q, k[:, :, T - S :], v[:, :, T - S :], None)  # two query blocks of 32
    att = layer.attended  # [B, H, S, T]
    probs = attention_probs(q, k, D**-0.5)
    _, mass = recall_metrics(probs, att, top_k=64)
    n_keys = att.sum(-1, keepdim=True)
    oracle = float(probs.sort(-1, descending=True).values.cumsum(-1).gather(-1, n_keys - 1).mean())
    _, window_only = recall_metrics(probs, att & (torch.arange(T) >= T - S - 256 - 2), top_k=64)
    assert n_keys.float().mean() < 0.15 * T
    assert oracle > 0.9 and mass / oracle > 0.6, (mass, oracle)
    assert mass > 10 * window_only


# ----------------------------------------------------------------------------- rollback, offload
@pytest.mark.parametrize("impl", IMPLS)
def test_rollback_then_decode_matches_a_cache_that_never_saw_the_tokens(gen, monkeypatch, impl):
    monkeypatch.setenv("LONGCTX_OPS", impl)
    cfg = dict(SMALL, k=24, refresh_interval=1)  # both re-estimate every step: same masks
    q, k, v = _qkv(gen, 2, 4, 2, 170, 16)
    a = make_layer("hip", _ctx(), **cfg)
    b = make_layer("hip", _ctx(), **cfg)
    for layer in (a, b):
        layer.prefill(q[:, :, :150], k[:, :, :150], v[:, :, :150], None)
    a.decode(q[:, :, 150:154], k[:, :, 150:154], v[:, :, 150:154], None)
    a.rollback(3)  # keep token 150 only
    b.decode(q[:, :, 150:151], k[:, :, 150:151], v[:, :, 150:151], None)
    assert a.seq_length == b.seq_length == 151
    for t in range(151, 155):
        oa = a.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], None)
        ob = b.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], None)
        torch.testing.assert_close(oa, ob, atol=0, rtol=0)
    with pytest.raises(ValueError, match="at most the 5 tokens"):
        a.rollback(6)


def test_offload_keeps_kv_on_the_host_tier_and_changes_nothing(gen):
    cfg = dict(SMALL, k=24, refresh_interval=2)
    q, k, v = _qkv(gen, 1, 4, 2, 140, 16)
    outs = []
    for offload in (False, True):
        layer = make_layer("hip", _ctx(), **cfg, offload=offload)
        o = [layer.prefill(q[:, :, :130], k[:, :, :130], v[:, :, :130], None)]
        o += [layer.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], None) for t in range(130, 140)]
        outs.append(torch.cat(o, dim=2))
        mem = layer.memory()
        kv_bytes = 2 * 140 * 2 * 16 * 4
        assert mem["host" if offload else "device"] >= kv_bytes
        assert mem["device" if offload else "host"] < kv_bytes
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


# ----------------------------------------------------------------------------- Hugging Face generate
def test_greedy_generate_equals_dense_when_k_covers_everything(gen):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 70), generator=gen)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    with longctx.patch(model, "hip", k=512, block_size_q=16, sink=4, window=8, dense_layers=0,
                       refresh_interval=3) as handle:
        out = model.generate(ids, **kwargs)
        stats = handle.stats()
    assert torch.equal(ref, out)
    assert all(part["mask_refreshes"] >= 4 and not part["dense"] for layer in stats for part in layer)
    with longctx.patch(model, "hip", k=16, block_size_q=16, sink=4, window=8, dense_layers=1) as handle:
        sparse = model.generate(ids, **kwargs)  # really sparse on layer 1: runs, same length
        assert [part["dense"] for layer in handle.stats() for part in layer] == [True, False]
    assert sparse.shape == ref.shape


# ----------------------------------------------------------------------------- Triton kernels (interpreter)
def test_triton_kernels_in_interpreter():
    """Kernels vs the torch reference under TRITON_INTERPRET=1, in a fresh interpreter (Triton picks
    interpreting vs compiling when ``triton.language`` is first imported)."""
    pytest.importorskip("triton")
    cases = Path(__file__).with_name("hip_triton_cases.py")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("LONGCTX_OPS", None)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider", str(cases)],
        cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, res.stdout[-2000:]
