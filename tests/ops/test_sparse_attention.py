"""ops: sparse_attention and merge_states, torch reference vs C++ vs SDPA, dispatch and bad input.

The Triton kernels run under ``TRITON_INTERPRET=1`` in a subprocess
(``sparse_attention_triton_cases.py``): Triton decides between compiling and interpreting
when a kernel is decorated, so the variable must be set before the kernel modules load.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longctx import ops
from longctx.ops import merge_states, sparse_attention, sparse_attention_ref

HAS_CPP = ops.cpp_available()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="longctx._C is not built")
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def impls():
    """The implementations that run in this process (Triton: see the subprocess test)."""
    return ["ref", "cpp"] if HAS_CPP else ["ref"]


def make_qkv(seed, B, H, Hkv, S, T, D, dtype=torch.float32, q_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=gen) * q_scale  # [B, H, S, D]
    k = torch.randn(B, Hkv, T, D, generator=gen)  # [B, Hkv, T, D]
    v = torch.randn(B, Hkv, T, D, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), gen


def ragged_indices(gen, B, Hkv, T, K, pad_frac=0.3):
    """[B, Hkv, K] int64 random key positions, about ``pad_frac`` of them -1 padding."""
    idx = torch.randint(0, T, (B, Hkv, K), generator=gen)
    pad = torch.rand(B, Hkv, K, generator=gen) < pad_frac
    return idx.masked_fill(pad, -1)


def covering_indices(gen, B, Hkv, T, n_pad):
    """[B, Hkv, T + n_pad]: a permutation of all T keys with -1 padding mixed in."""
    rows = []
    for _ in range(B * Hkv):
        row = torch.cat([torch.randperm(T, generator=gen), torch.full((n_pad,), -1)])
        rows.append(row[torch.randperm(T + n_pad, generator=gen)])
    return torch.stack(rows).reshape(B, Hkv, T + n_pad)


def dense_lse(q, k, scale=None):
    """[B, H, S] float32 log-sum-exp of all scores (GQA by repeating k)."""
    G = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kk = k.float().repeat_interleave(G, dim=1)
    return torch.logsumexp(q.float() @ kk.transpose(-1, -2) * scale, dim=-1)


shapes = st.fixed_dictionaries(
    {
        "B": st.integers(1, 2),
        "Hkv": st.integers(1, 2),
        "G": st.sampled_from([1, 4, 8]),
        "S": st.integers(1, 5),
        "T": st.integers(1, 90),
        "D": st.sampled_from([32, 64, 128]),
        "seed": st.integers(0, 2**31 - 1),
    }
)


# ----------------------------------------------------------------------------- vs dense SDPA
@SETTINGS
@given(shape=shapes, covering=st.booleans(), n_pad=st.integers(0, 7))
def test_all_impls_match_sdpa_when_every_key_is_attended(shape, covering, n_pad):
    B, Hkv, G, S, T, D = (shape[x] for x in ("B", "Hkv", "G", "S", "T", "D"))
    q, k, v, gen = make_qkv(shape["seed"], B, G * Hkv, Hkv, S, T, D)
    indices = covering_indices(gen, B, Hkv, T, n_pad) if covering else None
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    expected_lse = dense_lse(q, k)
    for impl in impls():
        out, lse = sparse_attention(q, k, v, indices, impl=impl)
        assert out.shape == (B, G * Hkv, S, D) and out.dtype == q.dtype
        assert lse.shape == (B, G * Hkv, S) and lse.dtype == torch.float32
        torch.testing.assert_close(out, expected, **TOL[torch.float32], msg=impl)
        torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5, msg=impl)


# ----------------------------------------------------------------------------- sparse, ragged, dtypes
@SETTINGS
@given(shape=shapes, K=st.integers(1, 40), pad_frac=st.sampled_from([0.0, 0.3, 0.9]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), scale=st.sampled_from([None, 0.05, 1.0]))
def test_cpp_matches_reference_on_ragged_selections(shape, K, pad_frac, dtype, scale):
    B, Hkv, G, S, T, D = (shape[x] for x in ("B", "Hkv", "G", "S", "T", "D"))
    q, k, v, gen = make_qkv(shape["seed"], B, G * Hkv, Hkv, S, T, D, dtype)
    indices = ragged_indices(gen, B, Hkv, T, K, pad_frac)
    ref_out, ref_lse = sparse_attention_ref(q, k, v, indices, scale)
    for impl in impls():
        out, lse = sparse_attention(q, k, v, indices, scale, impl=impl)
        assert out.dtype == dtype and lse.dtype == torch.float32
        torch.testing.assert_close(out, ref_out, **TOL[dtype], msg=impl)
        # -inf rows (no valid key) must agree exactly; assert_close treats equal infs as close
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5, msg=impl)
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isinf(lse), empty)
        assert (out[empty] == 0).all()


@needs_cpp
@pytest.mark.parametrize("D", [1, 8, 40, 72, 100])
def test_cpp_odd_head_dims(D):
    q, k, v, gen = make_qkv(D, 1, 6, 2, 3, 70, D)
    for indices in (None, ragged_indices(gen, 1, 2, 70, 33)):
        out, lse = ops.sparse_attention(q, k, v, indices, impl="cpp")
        ref_out, ref_lse = sparse_attention_ref(q, k, v, indices)
        torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@needs_cpp
def test_cpp_strided_cache_slice_int32_indices_and_key_splits():
    from longctx.ops.cpp import sparse_attention_cpp

    q, k_buf, v_buf, gen = make_qkv(7, 1, 8, 2, 2, 5000, 32)
    k, v = k_buf[:, :, :4600], v_buf[:, :, :4600]  # a slice of a preallocated cache: read in place
    assert not k.is_contiguous()
    indices = ragged_indices(gen, 1, 2, 4600, 4500).to(torch.int32)
    for idx in (None, indices):
        ref_out, ref_lse = sparse_attention_ref(q, k, v, idx)
        for threads in (1, 8):  # 8 threads on 2 (b, hkv): the keys are split and merged by LSE
            out, lse = sparse_attention_cpp(q, k, v, idx, num_threads=threads)
            torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
            torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", impls())
def test_rows_without_keys_and_large_scores(impl):
    q, k, v, gen = make_qkv(3, 2, 8, 2, 3, 50, 64, q_scale=300.0)  # scores ~ 1e3: exp() would overflow unshifted
    indices = ragged_indices(gen, 2, 2, 50, 20)
    indices[1, 0] = -1  # batch 1, KV head 0: no key at all
    out, lse = sparse_attention(q, k, v, indices, impl=impl)
    ref_out, ref_lse = sparse_attention_ref(q, k, v, indices)
    assert torch.isfinite(out).all()
    assert torch.isinf(lse[1, :4]).all() and (lse[1, :4] < 0).all() and (out[1, :4] == 0).all()
    assert torch.isfinite(lse[0]).all() and lse[0].abs().max() > 100
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-5)
    # near-one-hot softmax at this magnitude: outputs agree to the conditioning of fp32 scores
    torch.testing.assert_close(out, ref_out, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- merge_states
@SETTINGS
@given(shape=shapes, q_scale=st.sampled_from([1.0, 30.0, 1000.0]), split=st.sampled_from(["random", "all_a", "all_b"]))
def test_merge_states_of_a_key_split_equals_dense(shape, q_scale, split):
    B, Hkv, G, S, T, D = (shape[x] for x in ("B", "Hkv", "G", "S", "T", "D"))
    q, k, v, gen = make_qkv(shape["seed"], B, G * Hkv, Hkv, S, T, D, q_scale=q_scale)
    in_a = {"random": torch.rand(B, Hkv, T, generator=gen) < 0.5,
            "all_a": torch.ones(B, Hkv, T, dtype=torch.bool),
            "all_b": torch.zeros(B, Hkv, T, dtype=torch.bool)}[split]
    pos = torch.arange(T).expand(B, Hkv, T)
    idx_a = torch.where(in_a, pos, -1)  # [B, Hkv, T], disjoint selections, -1 padded
    idx_b = torch.where(~in_a, pos, -1)
    out_a, lse_a = sparse_attention_ref(q, k, v, idx_a)
    out_b, lse_b = sparse_attention_ref(q, k, v, idx_b)
    full_out, full_lse = sparse_attention_ref(q, k, v)
    for impl in impls():
        out, lse = merge_states(out_a, lse_a, out_b, lse_b, impl=impl)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        tol = dict(atol=2e-5, rtol=1e-4) if q_scale == 1.0 else dict(atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(out, full_out, **tol)
        torch.testing.assert_close(lse, full_lse, atol=1e-4 * q_scale, rtol=1e-5)
        # merging is symmetric
        out_ba, lse_ba = merge_states(out_b, lse_b, out_a, lse_a, impl=impl)
        torch.testing.assert_close(out_ba, out, atol=1e-6, rtol=1e-6)


def test_merge_states_empty_rows_and_huge_lse():
    gen = torch.Generator().manual_seed(11)
    out_a, out_b = torch.randn(2, 4, 3, 16, generator=gen), torch.randn(2, 4, 3, 16, generator=gen)
    lse_a = torch.randn(2, 4, 3, generator=gen) * 1e4  # exp() of these overflows fp32 without the shift
    lse_b = lse_a + torch.randn(2, 4, 3, generator=gen)
    lse_a[0, 0, 0] = float("-inf")  # a empty: result is b
    lse_b[0, 0, 1] = float("-inf")  # b empty: result is a
    lse_a[0, 0, 2] = lse_b[0, 0, 2] = float("-inf")  # both empty: 0 and -inf
    for impl in impls():
        out, lse = merge_states(out_a, lse_a, out_b, lse_b, impl=impl)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[0, 0, 0], out_b[0, 0, 0])
        torch.testing.assert_close(out[0, 0, 1], out_a[0, 0, 1])
        assert (out[0, 0, 2] == 0).all() and lse[0, 0, 2] == float("-inf")
        assert lse[0, 0, 0] == lse_b[0, 0, 0] and lse[0, 0, 1] == lse_a[0, 0, 1]
        exact = torch.logaddexp(lse_a.double(), lse_b.double()).float()
        torch.testing.assert_close(lse, exact, atol=0, rtol=1e-6)
        out_bf16, _ = merge_states(out_a.bfloat16(), lse_a, out_b.bfloat16(), lse_b, impl=impl)
        assert out_bf16.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- dispatch
def test_pick_impl_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("LONGCTX_OPS", raising=False)
    monkeypatch.setattr(ops, "cpp_isa", lambda: "avx512")
    assert ops.pick_impl(cpu, rows=4096, sparse=False) == "cpp"
    assert ops.pick_impl(cpu) == "cpp"
    monkeypatch.setattr(ops, "cpp_isa", lambda: "portable")
    assert ops.pick_impl(cpu, rows=ops.CPP_PORTABLE_MAX_ROWS, sparse=True) == "cpp"
    assert ops.pick_impl(cpu, rows=ops.CPP_PORTABLE_MAX_ROWS + 1, sparse=True) == "ref"
    assert ops.pick_impl(cpu, rows=4, sparse=False) == "ref"
    monkeypatch.setattr(ops, "cpp_isa", lambda: None)
    assert ops.pick_impl(cpu, rows=4, sparse=True) == "ref"
    assert ops.pick_impl(cpu, impl="cpp") == "cpp"
    monkeypatch.setenv("LONGCTX_OPS", "ref")
    assert ops.pick_impl(cpu, rows=4, sparse=True) == "ref"
    monkeypatch.setenv("LONGCTX_OPS", "fast")
    with pytest.raises(ValueError, match=r"LONGCTX_OPS requires one of .*'fast'"):
        ops.pick_impl(cpu)
    with pytest.raises(ValueError, match=r"impl requires one of .*'gpu'"):
        ops.pick_impl(cpu, impl="gpu")


@needs_cpp
def test_forced_cpp_via_environment(monkeypatch):
    monkeypatch.setenv("LONGCTX_OPS", "cpp")
    monkeypatch.setattr(ops, "cpp_isa", lambda: "portable")  # the rule would pick ref; the override wins
    q, k, v, _ = make_qkv(5, 1, 4, 1, 40, 30, 32)
    out, lse = sparse_attention(q, k, v)
    torch.testing.assert_close(out, sparse_attention_ref(q, k, v)[0], **TOL[torch.float32])


# ----------------------------------------------------------------------------- bad input
def _qkv():
    return torch.randn(1, 4, 2, 32), torch.randn(1, 2, 10, 32), torch.randn(1, 2, 10, 32)


BAD = [
    # (argument overrides, exception, fragments the message must contain: argument, value, what is accepted)
    (dict(q=torch.ones(1, 4, 2, 32, dtype=torch.int64)), TypeError, ["q", "torch.int64", "torch.float32"]),
    (dict(k=torch.randn(1, 2, 10, 32).double()), TypeError, ["k", "torch.float64", "torch.float32"]),
    (dict(v=torch.randn(1, 2, 10, 32).bfloat16()), TypeError, ["v", "torch.bfloat16", "dtype of q"]),
    (dict(q=[[1.0]]), TypeError, ["q", "list", "torch.Tensor"]),
    (dict(q=torch.randn(4, 2, 32)), ValueError, ["q", "(4, 2, 32)", "4 dims"]),
    (dict(k=torch.randn(1, 2, 10, 16), v=torch.randn(1, 2, 10, 16)), ValueError, ["k", "(1, 2, 10, 16)", "D=32"]),
    (dict(v=torch.randn(1, 2, 11, 32)), ValueError, ["(1, 2, 11, 32)", "same shape"]),
    (dict(k=torch.randn(1, 3, 10, 32), v=torch.randn(1, 3, 10, 32)), ValueError, ["multiple", "3"]),
    (dict(indices=torch.zeros(1, 2, 3)), TypeError, ["indices", "torch.float32", "int64"]),
    (dict(indices=torch.zeros(1, 3, 3, dtype=torch.int64)), ValueError, ["indices", "(1, 3, 3)", "Hkv=2"]),
    (dict(indices=torch.tensor([[[0, 10, -1]] * 2])), ValueError, ["indices", "got max 10", "< T=10"]),
    (dict(scale=-0.5), ValueError, ["scale", "-0.5", "> 0"]),
    (dict(scale=float("nan")), ValueError, ["scale", "nan", "finite"]),
]


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_names_argument_value_and_what_is_accepted(case, impl):
    overrides, exc, fragments = BAD[case]
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v, indices=None, scale=None)
    args.update(overrides)
    with pytest.raises(exc) as err:
        sparse_attention(**args, impl=impl)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_merge_states_bad_input():
    out, lse = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match=r"out_a and out_b require the same shape .*\(1, 2, 3, 9\)"):
        merge_states(out, lse, torch.randn(1, 2, 3, 9), lse)
    with pytest.raises(ValueError, match=r"lse tensors require shape \(1, 2, 3\) .*\(1, 2\)"):
        merge_states(out, lse, out, torch.randn(1, 2))
    with pytest.raises(TypeError, match=r"lse_b requires dtype in .*torch.int64"):
        merge_states(out, lse, out, torch.zeros(1, 2, 3, dtype=torch.int64))


@needs_cpp
def test_extension_checks_its_own_inputs():
    from longctx import _C

    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"indices must be < T=10 \(got 12\)"):
        _C.sparse_attention(q.numpy(), k.numpy(), v.numpy(), torch.tensor([[[12]] * 2]).numpy(), 0.1, 1)
    with pytest.raises(ValueError, match=r"q requires 4 dims .*\(4, 2, 32\)"):
        _C.sparse_attention(q[0].numpy(), k.numpy(), v.numpy(), None, 0.1, 1)
    with pytest.raises(ValueError, match=r"contiguous last dim"):
        kt = k.transpose(2, 3).contiguous().transpose(2, 3)
        _C.sparse_attention(q.numpy(), kt.numpy(), kt.numpy(), None, 0.1, 1)


# ----------------------------------------------------------------------------- Triton (interpreter, subprocess)
def test_triton_kernels_in_interpreter():
    """Triton kernels vs the reference under TRITON_INTERPRET=1 in a fresh interpreter."""
    pytest.importorskip("triton")
    cases = Path(__file__).with_name("sparse_attention_triton_cases.py")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("LONGCTX_OPS", None)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider", str(cases)],
        cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, res.stdout[-2000:]
