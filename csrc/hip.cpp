// HiP on the CPU: hierarchical top-k mask estimation and block-sparse causal attention.
//
// Same semantics as longctx.ops.hip.hip_mask_ref / hip_attention_ref (the torch reference is
// the truth); the geometry (query-block bounds, local-region starts) is computed once in
// Python and passed in. Queries arrive pre-scaled by the softmax scale (the official HiP
// convention). Each entry point is one OpenMP region over (batch, mask head, query block)
// work items, so nothing is materialised beyond per-thread tiles and no torch op runs per
// iteration of the tree search.
//
// Both kernels keep a tile of RT query rows transposed, Qt [D][RT]: scoring a key is then a
// vector FMA over rows for each head-dim element (no horizontal sums), two keys at a time.
//
// Inputs are fp32 / int64 numpy arrays (zero-copy views of contiguous CPU torch tensors).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <omp.h>
#if defined(__AVX512F__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "bindings.h"

namespace py = pybind11;

namespace longctx {
namespace {

using FArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kKeyTile = 64;  // keys per attention tile: P [kKeyTile][RT] stays in L1
constexpr int64_t kPrefetchKeys = 8;  // gathered rows are random: fetch this many keys ahead
// Below this many (query row x key) products a call runs on one thread: waking a second
// thread costs more than it saves at decode, and far more on a loaded machine.
constexpr int64_t kParallelWork = int64_t(1) << 22;

// s0[r] = <q_r, k0>, s1[r] = <q_r, k1> for the RT rows of qt ([D][RT]); each q element feeds 2 FMAs.
template <int RT>
inline void score_pair(const float* __restrict qt, int64_t D, const float* __restrict k0, const float* __restrict k1,
                       float* __restrict s0, float* __restrict s1) {
  float a0[RT], a1[RT];
  for (int r = 0; r < RT; ++r) a0[r] = a1[r] = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float* qd = qt + d * RT;
    const float x0 = k0[d], x1 = k1[d];
#pragma omp simd
    for (int r = 0; r < RT; ++r) {
      a0[r] += qd[r] * x0;
      a1[r] += qd[r] * x1;
    }
  }
  for (int r = 0; r < RT; ++r) {
    s0[r] = a0[r];
    s1[r] = a1[r];
  }
}

// Gathered rows are random: fetch a row ahead of its use (16 floats = one 64 B line).
inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(row + d, 0, 1);
}

// acc[d][r] += p0[r] * v0[d] + p1[r] * v1[d]  (acc: [D][RT])
template <int RT>
inline void accumulate_pair(float* __restrict acc, int64_t D, const float* __restrict p0, const float* __restrict p1,
                            const float* __restrict v0, const float* __restrict v1) {
  for (int64_t d = 0; d < D; ++d) {
    float* ad = acc + d * RT;
    const float x0 = v0[d], x1 = v1[d];
#pragma omp simd
    for (int r = 0; r < RT; ++r) ad[r] += p0[r] * x0 + p1[r] * x1;
  }
}

// acc[d][r] += p[r] * v[d]
template <int RT>
inline void accumulate_one(float* __restrict acc, int64_t D, const float* __restrict p, const float* __restrict v) {
  for (int64_t d = 0; d < D; ++d) {
    float* ad = acc + d * RT;
    const float x = v[d];
#pragma omp simd
    for (int r = 0; r < RT; ++r) ad[r] += p[r] * x;
  }
}

// x[i] = exp(x[i] - shift[i % RT]) for n = rows * RT values laid out [rows][RT]; exp(-inf) = 0.
#if defined(__AVX512F__)
inline __m512 exp512(__m512 x) {
  // Cephes expf: 2^n * p(r), r = x - n ln2; |rel err| < 2e-7 on [-87, 0]; 0 below -87.3 (and -inf)
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GT_OQ);
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.37626f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(y, _mm512_castsi512_ps(e)));
}

template <int RT>
inline void exp_shifted(float* x, int64_t rows, const float* shift) {
  static_assert(RT % 16 == 0, "row tiles are whole AVX-512 vectors");
  for (int64_t j = 0; j < rows; ++j) {
    for (int r = 0; r < RT; r += 16) {
      float* p = x + j * RT + r;
      _mm512_storeu_ps(p, exp512(_mm512_sub_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(shift + r))));
    }
  }
}
#else
template <int RT>
inline void exp_shifted(float* x, int64_t rows, const float* shift) {
  for (int64_t j = 0; j < rows; ++j)
    for (int r = 0; r < RT; ++r) x[j * RT + r] = std::exp(x[j * RT + r] - shift[r]);
}
#endif

struct MaskArgs {
  const float* q;
  const float* k;
  const int64_t* starts;
  const int64_t* ends;
  const int64_t* local_start;
  int64_t* blocks;
  int64_t* reads;
  int64_t B, H, S, D, Hkv, T, M, Gm, G, N;
  int64_t q_offset, num_kept, block_size_k, stride_q, stride_k, rows_per_block, sink_blocks;
};

// One (b, m, n) work item of the tree search; bufs are per-thread scratch.
template <int RT>
void mask_item(const MaskArgs& a, int64_t item, std::vector<float>& qt, std::vector<int64_t>& ibuf,
               std::vector<float>& fbuf, std::vector<const float*>& kptr, std::vector<int64_t>& owner) {
  const int64_t n = item % a.N, m = (item / a.N) % a.M, b = item / (a.N * a.M);
  const int64_t K = a.num_kept;
  int64_t* out = a.blocks + item * K;
  std::fill(out, out + K, int64_t(-1));
  a.reads[item] = 0;
  const int64_t n_blocks = a.local_start[n] / a.block_size_k - a.sink_blocks;  // search-region length
  if (n_blocks <= 0) return;

  // -- query rows (g, i): head m*Gm + g, query min(start + i*stride_q, end - 1); transposed into qt
  const int64_t nq = (a.rows_per_block + a.stride_q - 1) / a.stride_q;
  const int64_t R = a.Gm * nq;
  const int64_t tiles = (R + RT - 1) / RT;
  const int64_t D = a.D;
  for (int64_t c = 0; c < tiles * RT; ++c) {
    const int64_t r = c < R ? c : 0;  // padding repeats row 0: the max over rows is unchanged
    const int64_t g = r / nq, i = r % nq;
    const int64_t pos = std::min(a.starts[n] + i * a.stride_q, a.ends[n] - 1) - a.q_offset;
    const float* src = a.q + ((b * a.H + m * a.Gm + g) * a.S + pos) * D;
    float* dst = qt.data() + (c / RT) * D * RT + (c % RT);
    for (int64_t d = 0; d < D; ++d) dst[d * RT] = src[d];
  }
  const float* kbase = a.k + (b * a.Hkv + (m * a.Gm) / a.G) * a.T * D;
  const int64_t nk = (a.block_size_k + a.stride_k - 1) / a.stride_k;

  int64_t* start = ibuf.data();
  int64_t* size = start + K;
  int64_t* cs = size + K;       // [2K] candidate starts
  int64_t* cz = cs + 2 * K;     // [2K] candidate sizes
  int64_t* order = cz + 2 * K;  // [2K]
  float* score = fbuf.data();   // [2K]
  float* srow = score + 2 * K;  // [2][RT]
  for (int64_t j = 0; j < K; ++j) {
    start[j] = j * n_blocks / K;
    size[j] = (j + 1) * n_blocks / K - start[j];
  }
  const int64_t longest = (n_blocks + K - 1) / K;
  int64_t iters = 0;
  while ((int64_t(1) << iters) < longest) ++iters;

  for (int64_t it = 0; it < iters; ++it) {
    // -- split every range at its midpoint (left halves first), list the centre keys to score
    int64_t nkeys = 0, reads = 0;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t left = (size[j] + 1) / 2;
      cs[j] = start[j];
      cz[j] = left;
      cs[K + j] = start[j] + left;
      cz[K + j] = size[j] - left;
      if (size[j] > 1) reads += ((cz[j] > 0) + (cz[K + j] > 0)) * nk;
    }
    for (int64_t c = 0; c < 2 * K; ++c) {
      score[c] = kNegInf;
      if (cz[c] == 0) continue;
      const int64_t rep = a.sink_blocks + cs[c] + cz[c] / 2;  // the range's centre block
      for (int64_t j = 0; j < nk; ++j) {
        kptr[nkeys] = kbase + (rep * a.block_size_k + j * a.stride_k) * D;
        owner[nkeys++] = c;
      }
    }
    a.reads[item] += reads;
    // -- score: max over the block's query rows, two keys at a time
    for (int64_t t = 0; t < tiles; ++t) {
      const float* qtile = qt.data() + t * D * RT;
      for (int64_t p = 0; p < nkeys; p += 2) {
        const int64_t p1 = std::min(p + 1, nkeys - 1);
        for (int64_t f = p + kPrefetchKeys; f < std::min(p + kPrefetchKeys + 2, nkeys); ++f) prefetch_row(kptr[f], D);
        score_pair<RT>(qtile, D, kptr[p], kptr[p1], srow, srow + RT);
        float m0 = kNegInf, m1 = kNegInf;
        for (int r = 0; r < RT; ++r) {
          m0 = std::max(m0, srow[r]);
          m1 = std::max(m1, srow[RT + r]);
        }
        score[owner[p]] = std::max(score[owner[p]], m0);
        score[owner[p1]] = std::max(score[owner[p1]], m1);
      }
    }
    // -- keep the top K of the 2K halves (ties: lower candidate index, deterministic)
    std::iota(order, order + 2 * K, int64_t(0));
    std::nth_element(order, order + K, order + 2 * K, [score](int64_t x, int64_t y) {
      return score[x] > score[y] || (score[x] == score[y] && x < y);
    });
    for (int64_t j = 0; j < K; ++j) {
      start[j] = cs[order[j]];
      size[j] = cz[order[j]];
    }
  }
  for (int64_t j = 0; j < K; ++j) out[j] = size[j] == 1 ? start[j] + a.sink_blocks : -1;
  std::sort(out, out + K);
}

py::tuple hip_mask(FArray q, FArray k, IArray starts, IArray ends, IArray local_start, int64_t q_offset,
                   int64_t num_kept, int64_t block_size_k, int64_t stride_q, int64_t stride_k,
                   int64_t rows_per_block, int64_t sink_blocks, bool shared_mask) {
  if (q.ndim() != 4 || k.ndim() != 4) throw std::invalid_argument("hip_mask requires q [B, H, S, D] and k [B, Hkv, T, D]");
  MaskArgs a{};
  a.B = q.shape(0), a.H = q.shape(1), a.S = q.shape(2), a.D = q.shape(3);
  a.Hkv = k.shape(1), a.T = k.shape(2);
  if (k.shape(0) != a.B || k.shape(3) != a.D || a.H % a.Hkv != 0)
    throw std::invalid_argument("hip_mask requires k [B, Hkv, T, D] matching q with H a multiple of Hkv");
  if (num_kept < 1 || block_size_k < 1 || stride_q < 1 || stride_k < 1 || rows_per_block < 1)
    throw std::invalid_argument("hip_mask requires positive num_kept, block sizes and strides");
  a.G = a.H / a.Hkv;
  a.Gm = shared_mask ? a.G : 1;
  a.M = a.H / a.Gm;
  a.N = starts.shape(0);
  if (ends.shape(0) != a.N || local_start.shape(0) != a.N)
    throw std::invalid_argument("hip_mask requires starts, ends and local_start of one length");
  a.q_offset = q_offset, a.num_kept = num_kept, a.block_size_k = block_size_k;
  a.stride_q = stride_q, a.stride_k = stride_k, a.rows_per_block = rows_per_block, a.sink_blocks = sink_blocks;
  IArray blocks({a.B, a.M, a.N, num_kept});
  IArray reads({a.B, a.M, a.N});
  a.q = q.data(), a.k = k.data(), a.starts = starts.data(), a.ends = ends.data(), a.local_start = local_start.data();
  a.blocks = blocks.mutable_data(), a.reads = reads.mutable_data();
  const int64_t nq = (rows_per_block + stride_q - 1) / stride_q;
  const int64_t R = a.Gm * nq;
  const bool small = R <= 16;  // decode: a few rows, 16-row tiles waste less
  const int64_t RT = small ? 16 : 64;
  const int64_t tiles = (R + RT - 1) / RT;
  const int64_t nk = (block_size_k + stride_k - 1) / stride_k;
  const int64_t items = a.B * a.M * a.N;
  int64_t longest = 0;
  for (int64_t i = 0; i < a.N; ++i) longest = std::max(longest, a.local_start[i] / block_size_k - sink_blocks);
  const int64_t work = items * tiles * RT * 2 * num_kept * nk * std::max<int64_t>(1, 64 - __builtin_clzll(longest / num_kept + 1));
  {
    py::gil_scoped_release release;
#pragma omp parallel if (work >= kParallelWork)
    {
      std::vector<float> qt(tiles * RT * a.D);
      std::vector<int64_t> ibuf(8 * num_kept);
      std::vector<float> fbuf(2 * num_kept + 2 * RT);
      std::vector<const float*> kptr(2 * num_kept * nk + 1);
      std::vector<int64_t> owner(2 * num_kept * nk + 1);
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < items; ++item) {
        if (small)
          mask_item<16>(a, item, qt, ibuf, fbuf, kptr, owner);
        else
          mask_item<64>(a, item, qt, ibuf, fbuf, kptr, owner);
      }
    }
  }
  return py::make_tuple(blocks, reads);
}

struct AttnArgs {
  const float* q;
  const float* k;
  const float* v;
  const int64_t* blocks;
  const int64_t* starts;
  const int64_t* ends;
  const int64_t* local_start;
  float* out;
  float* lse;
  int64_t B, H, S, D, Hkv, T, M, Gm, G, N, K;
  int64_t q_offset, block_size_k, rows_per_block, sink_keys;
};

template <int RT>
void attention_item(const AttnArgs& a, int64_t item, std::vector<int64_t>& keys, std::vector<float>& qt,
                    std::vector<float>& acc, std::vector<float>& p, std::vector<float>& stat) {
  const int64_t n = item % a.N, m = (item / a.N) % a.M, b = item / (a.N * a.M);
  const int64_t D = a.D, Rb = a.rows_per_block, Rq = a.Gm * Rb;
  const int64_t qs = a.starts[n], qe = a.ends[n], ls = a.local_start[n];
  // -- the block's keys: sinks, mask blocks, local region [ls, qe)
  int64_t L = 0;
  for (int64_t t = 0; t < a.sink_keys; ++t) keys[L++] = t;
  const int64_t* blk = a.blocks + item * a.K;
  for (int64_t j = 0; j < a.K; ++j)
    if (blk[j] >= 0)
      for (int64_t t = 0; t < a.block_size_k; ++t) keys[L++] = blk[j] * a.block_size_k + t;
  for (int64_t t = ls; t < qe; ++t) keys[L++] = t;
  const int64_t kv = (b * a.Hkv + (m * a.Gm) / a.G) * a.T * D;
  const float* kbase = a.k + kv;
  const float* vbase = a.v + kv;

  float* mrow = stat.data();    // [RT] running max
  float* lrow = mrow + RT;      // [RT] running sum
  float* mnew = lrow + RT;      // [RT]
  float* alpha = mnew + RT;     // [RT]
  float* shift = alpha + RT;    // [RT]
  int64_t* qpos = keys.data() + L;  // [RT] scratch after the key list
  for (int64_t t0 = 0; t0 < Rq; t0 += RT) {
    // -- rows (g, i) of this tile, transposed; padded rows are zeros at the block's last query
    for (int64_t c = 0; c < RT; ++c) {
      const int64_t r = t0 + c, g = r / Rb, i = r % Rb;
      const bool real = r < Rq && qs + i < qe;
      qpos[c] = real ? qs + i : qe - 1;
      const float* src = a.q + ((b * a.H + m * a.Gm + g) * a.S + (qs + i - a.q_offset)) * D;
      for (int64_t d = 0; d < D; ++d) qt[d * RT + c] = real ? src[d] : 0.f;
      mrow[c] = kNegInf;
      lrow[c] = 0.f;
    }
    std::fill(acc.begin(), acc.begin() + D * RT, 0.f);
    for (int64_t j0 = 0; j0 < L; j0 += kKeyTile) {
      const int64_t nb = std::min(kKeyTile, L - j0);
      // -- scores of the tile [nb][RT]; keys after a row's query are masked (causal)
      for (int64_t j = 0; j < nb; j += 2) {
        const int64_t j1 = std::min(j + 1, nb - 1);
        for (int64_t f = j0 + j + kPrefetchKeys; f < std::min(j0 + j + kPrefetchKeys + 2, L); ++f)
          prefetch_row(kbase + keys[f] * D, D);
        prefetch_row(vbase + keys[j0 + j] * D, D);  // V rows of this tile are read after the softmax
        prefetch_row(vbase + keys[j0 + j1] * D, D);
        float* s1 = j1 > j ? p.data() + j1 * RT : p.data() + kKeyTile * RT;  // odd tail: scratch row
        score_pair<RT>(qt.data(), D, kbase + keys[j0 + j] * D, kbase + keys[j0 + j1] * D, p.data() + j * RT, s1);
      }
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t key = keys[j0 + j];
        if (key < qs) continue;  // before every query of the block
        float* pj = p.data() + j * RT;
        for (int c = 0; c < RT; ++c)
          if (key > qpos[c]) pj[c] = kNegInf;
      }
      // -- update m and l; p becomes exp(score - m_new)
      for (int c = 0; c < RT; ++c) mnew[c] = mrow[c];
      for (int64_t j = 0; j < nb; ++j)
        for (int c = 0; c < RT; ++c) mnew[c] = std::max(mnew[c], p[j * RT + c]);
      for (int c = 0; c < RT; ++c) {
        shift[c] = mnew[c] == kNegInf ? 0.f : mnew[c];  // nothing seen yet: exp(-inf - 0) = 0 keeps l, acc at 0
        alpha[c] = std::exp(mrow[c] - shift[c]);
      }
      exp_shifted<RT>(p.data(), nb, shift);
      for (int c = 0; c < RT; ++c) {
        float s = 0.f;
        for (int64_t j = 0; j < nb; ++j) s += p[j * RT + c];
        lrow[c] = lrow[c] * alpha[c] + s;
        mrow[c] = mnew[c];
      }
      for (int64_t d = 0; d < D; ++d) {
        float* ad = acc.data() + d * RT;
#pragma omp simd
        for (int c = 0; c < RT; ++c) ad[c] *= alpha[c];
      }
      for (int64_t j = 0; j + 1 < nb; j += 2)
        accumulate_pair<RT>(acc.data(), D, p.data() + j * RT, p.data() + (j + 1) * RT, vbase + keys[j0 + j] * D,
                            vbase + keys[j0 + j + 1] * D);
      if (nb % 2) accumulate_one<RT>(acc.data(), D, p.data() + (nb - 1) * RT, vbase + keys[j0 + nb - 1] * D);
    }
    // -- normalise and write the real rows
    for (int64_t c = 0; c < RT; ++c) {
      const int64_t r = t0 + c, g = r / Rb, i = r % Rb;
      if (r >= Rq || qs + i >= qe) continue;
      const int64_t row = (b * a.H + m * a.Gm + g) * a.S + (qs + i - a.q_offset);
      const float inv = lrow[c] > 0.f ? 1.f / lrow[c] : 0.f;
      for (int64_t d = 0; d < D; ++d) a.out[row * D + d] = acc[d * RT + c] * inv;
      a.lse[row] = lrow[c] > 0.f ? mrow[c] + std::log(lrow[c]) : kNegInf;
    }
  }
}

py::tuple hip_attention(FArray q, FArray k, FArray v, IArray blocks, IArray starts, IArray ends, IArray local_start,
                        int64_t q_offset, int64_t block_size_k, int64_t rows_per_block, int64_t sink_keys) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || blocks.ndim() != 4)
    throw std::invalid_argument("hip_attention requires q, k, v [B, heads, len, D] and blocks [B, M, N, K]");
  AttnArgs a{};
  a.B = q.shape(0), a.H = q.shape(1), a.S = q.shape(2), a.D = q.shape(3);
  a.Hkv = k.shape(1), a.T = k.shape(2);
  a.M = blocks.shape(1), a.N = blocks.shape(2), a.K = blocks.shape(3);
  for (int dim = 0; dim < 4; ++dim)
    if (k.shape(dim) != v.shape(dim)) throw std::invalid_argument("hip_attention requires k and v of one shape");
  if (k.shape(0) != a.B || k.shape(3) != a.D || a.H % a.Hkv != 0 || a.H % a.M != 0 || blocks.shape(0) != a.B)
    throw std::invalid_argument("hip_attention requires matching batch, head dim and head counts");
  if (starts.shape(0) != a.N || ends.shape(0) != a.N || local_start.shape(0) != a.N)
    throw std::invalid_argument("hip_attention requires starts, ends and local_start with one entry per query block");
  a.G = a.H / a.Hkv;
  a.Gm = a.H / a.M;
  a.q_offset = q_offset, a.block_size_k = block_size_k, a.rows_per_block = rows_per_block, a.sink_keys = sink_keys;
  FArray out({a.B, a.H, a.S, a.D});
  FArray lse({a.B, a.H, a.S});
  a.q = q.data(), a.k = k.data(), a.v = v.data(), a.blocks = blocks.data();
  a.starts = starts.data(), a.ends = ends.data(), a.local_start = local_start.data();
  a.out = out.mutable_data(), a.lse = lse.mutable_data();
  int64_t max_local = 0;
  for (int64_t i = 0; i < a.N; ++i) max_local = std::max(max_local, a.ends[i] - a.local_start[i]);
  const int64_t max_keys = sink_keys + a.K * block_size_k + max_local;
  const bool small = a.Gm * rows_per_block <= 16;
  const int64_t RT = small ? 16 : 64;
  const int64_t items = a.B * a.M * a.N;
  const int64_t work = items * ((a.Gm * rows_per_block + RT - 1) / RT) * RT * max_keys;
  {
    py::gil_scoped_release release;
#pragma omp parallel if (work >= kParallelWork)
    {
      std::vector<int64_t> keys(max_keys + RT);
      std::vector<float> qt(a.D * RT), acc(a.D * RT), p((kKeyTile + 1) * RT), stat(5 * RT);
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < items; ++item) {
        if (small)
          attention_item<16>(a, item, keys, qt, acc, p, stat);
        else
          attention_item<64>(a, item, keys, qt, acc, p, stat);
      }
    }
  }
  return py::make_tuple(out, lse);
}

}  // namespace

void register_hip(py::module_& m) {
  m.def("hip_mask", &hip_mask, py::arg("q"), py::arg("k"), py::arg("starts"), py::arg("ends"), py::arg("local_start"),
        py::arg("q_offset"), py::arg("num_kept"), py::arg("block_size_k"), py::arg("stride_q"), py::arg("stride_k"),
        py::arg("rows_per_block"), py::arg("sink_blocks"), py::arg("shared_mask"),
        "HiP tree-search mask: (blocks [B, M, N, K] int64, reads [B, M, N] int64). q pre-scaled fp32.");
  m.def("hip_attention", &hip_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("blocks"), py::arg("starts"),
        py::arg("ends"), py::arg("local_start"), py::arg("q_offset"), py::arg("block_size_k"),
        py::arg("rows_per_block"), py::arg("sink_keys"),
        "HiP block-sparse causal attention over sinks + mask blocks + local: (out [B, H, S, D], lse [B, H, S]).");
}

}  // namespace longctx
