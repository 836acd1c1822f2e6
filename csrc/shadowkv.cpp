// ShadowKV CPU kernels: the hot steps of a decode step, fused so that each byte is touched once.
//
//   shadowkv_scores   landmark scoring. For every row (= batch b, KV head hkv) the GS query rows of
//                     the group score the N chunk landmarks (logit = scale * q . L + bias), each row
//                     is softmax-normalised over the chunks, and a chunk's score is the max over the
//                     rows. The landmarks are stored in tiles of 64 chunks ([rows, NB, D, 64]: one
//                     tile is one contiguous run of memory, so the hardware prefetcher streams it)
//                     and are read once, kScoreBlock chunks per work item.
//   shadowkv_rebuild  for every selected chunk that missed the device cache (entries j < counts[row]):
//                     gather its C rows of U, multiply by the KV head's SV (one SV per in-chunk offset
//                     when the offset rotation is folded into SV), apply RoPE (x cos + rotate_half(x)
//                     sin on the first R dims), write the C keys into the chunk's slot, and copy the
//                     chunk's values from the host tier into the same slot. No temporaries.
//
// Same semantics as longctx.backends.shadowkv.landmark_scores and ShadowKVLayer._fill_torch.
// fp32 numpy arrays that are zero-copy views of CPU torch tensors; the outputs of shadowkv_rebuild
// are strided views of the device buffer, written in place. OpenMP over (row, block / chunk tile).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>
#include <omp.h>
#if defined(__AVX512F__)
#pragma GCC diagnostic push
// gcc 12 flags the _mm*_undefined_* placeholders inside its own AVX-512 headers
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "bindings.h"

namespace py = pybind11;

namespace longctx {
namespace {

constexpr int64_t kScoreBlock = 512;  // landmarks per work item: a [GS, 512] fp32 logit tile stays in L1
constexpr int64_t kChunkTile = 8;     // chunks per work item of the rebuild
constexpr int64_t kSelectSample = 1024;  // scores sampled per row for the top-K threshold
constexpr int64_t kLandmarkTile = 64;   // chunks per landmark tile ([D, 64] contiguous)
constexpr int64_t kPrefetchTiles = 2;   // landmark tiles read ahead by the scorer
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using FArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using StridedFArray = py::array_t<float, py::array::forcecast>;  // any strides, last dim contiguous
using IArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

int resolve_threads(int num_threads) { return num_threads > 0 ? num_threads : omp_get_max_threads(); }

// ---------------------------------------------------------------------------------------------
// Register-blocked micro-kernels (AVX-512 when built for it; setup.py passes -march=native), with
// plain loops for other CPUs and ragged sizes. Accumulators stay in registers: the memory traffic
// is one read of each landmark / SV element per tile.

// Landmarks are fp32, or bf16 passed as uint16 bit patterns (bf16 -> fp32 is a 16-bit left shift).
inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

// lg[g * ldo + n] (n < 64) = sum_d qs[g * D + d] * L[d * 64 + n]   for g < NR  (qs already scaled; L one tile)
// pf (optional): a later tile, fetched into the cache line by line alongside (the loads of one tile
// alone leave the memory bus idle between its lines' latencies).
template <int NR, typename T>
void score_tile64(const float* qs, const T* L, int64_t D, float* lg, int64_t ldo, const T* pf) {
#if defined(__AVX512F__)
  __m512 acc[NR][4];
  for (int g = 0; g < NR; ++g)
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_setzero_ps();
  constexpr int64_t kLineElems = 64 / sizeof(T);
  for (int64_t d = 0; d < D; ++d) {
    const T* ld = L + d * kLandmarkTile;
    if (pf)
      for (int64_t e = 0; e < kLandmarkTile; e += kLineElems) __builtin_prefetch(pf + d * kLandmarkTile + e, 0, 2);
    const __m512 l0 = load16(ld), l1 = load16(ld + 16), l2 = load16(ld + 32), l3 = load16(ld + 48);
    for (int g = 0; g < NR; ++g) {
      const __m512 qv = _mm512_set1_ps(qs[g * D + d]);
      acc[g][0] = _mm512_fmadd_ps(qv, l0, acc[g][0]);
      acc[g][1] = _mm512_fmadd_ps(qv, l1, acc[g][1]);
      acc[g][2] = _mm512_fmadd_ps(qv, l2, acc[g][2]);
      acc[g][3] = _mm512_fmadd_ps(qv, l3, acc[g][3]);
    }
  }
  for (int g = 0; g < NR; ++g)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(lg + g * ldo + 16 * j, acc[g][j]);
#else
  (void)pf;
  float acc[NR][64] = {};
  for (int64_t d = 0; d < D; ++d) {
    const T* ld = L + d * kLandmarkTile;
    for (int g = 0; g < NR; ++g) {
      const float qv = qs[g * D + d];
#pragma omp simd
      for (int n = 0; n < 64; ++n) acc[g][n] += qv * to_f32(ld[n]);
    }
  }
  for (int g = 0; g < NR; ++g) std::copy(acc[g], acc[g] + 64, lg + g * ldo);
#endif
}

#if defined(__AVX512F__)
// e^x for 16 lanes: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p a degree-6 Taylor polynomial
// (relative error < 2e-7, below fp32 rounding of the logits). -inf (and x < -87.3) gives exactly 0.
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 zero = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.72283f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~zero), _mm512_scalef_ps(p, n));
}
#endif

// sum_n exp(x[n] - m) (m finite)
float sum_exp_shifted(const float* x, int64_t len, float m) {
  float l = 0.f;
  int64_t n = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(m);
  for (; n + 16 <= len; n += 16) acc = _mm512_add_ps(acc, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + n), mv)));
  l = _mm512_reduce_add_ps(acc);
#endif
  for (; n < len; ++n) l += std::exp(x[n] - m);
  return l;
}

// x[n] = exp(x[n]) in place
void exp_inplace(float* x, int64_t len) {
  int64_t n = 0;
#if defined(__AVX512F__)
  for (; n + 16 <= len; n += 16) _mm512_storeu_ps(x + n, exp16(_mm512_loadu_ps(x + n)));
#endif
  for (; n < len; ++n) x[n] = std::exp(x[n]);
}

// Logits of GS rows for the tiles [t0, t1) of one row's landmarks (rows of the group 4 at a time); lg has
// row stride ldo (a multiple of 64: the padding columns of the last tile are computed and never read).
template <typename T>
void score_tiles(const float* qs, int64_t GS, const T* L, int64_t D, int64_t t0, int64_t t1, float* lg, int64_t ldo,
                 int64_t NB) {
  for (int64_t t = t0; t < t1; ++t) {
    const T* tile = L + t * D * kLandmarkTile;
    // the first group's pass prefetches kPrefetchTiles ahead (within the row's landmarks)
    const T* pf = t + kPrefetchTiles < NB ? tile + kPrefetchTiles * D * kLandmarkTile : nullptr;
    for (int64_t g0 = 0; g0 < GS; g0 += 4) {
      const float* qg = qs + g0 * D;
      float* out = lg + g0 * ldo + t * kLandmarkTile;
      const T* p = g0 == 0 ? pf : nullptr;
      switch (std::min<int64_t>(4, GS - g0)) {
        case 1: score_tile64<1, T>(qg, tile, D, out, ldo, p); break;
        case 2: score_tile64<2, T>(qg, tile, D, out, ldo, p); break;
        case 3: score_tile64<3, T>(qg, tile, D, out, ldo, p); break;
        default: score_tile64<4, T>(qg, tile, D, out, ldo, p); break;
      }
    }
  }
}

#if defined(__AVX512F__)
// Register tile shared by both rebuild GEMMs: for every 64-wide column block d0, NT x 4 accumulators
// start at zero, accumulate(c, d0) runs the k loop into them, and the tile is stored to acc.
template <int NT, typename Accumulate>
inline void tile_columns64(int64_t D, float* acc, Accumulate&& accumulate) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __m512 c[NT][4];
    for (int i = 0; i < NT; ++i)
      for (int j = 0; j < 4; ++j) c[i][j] = _mm512_setzero_ps();
    accumulate(c, d0);
    for (int i = 0; i < NT; ++i)
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + i * D + d0 + 16 * j, c[i][j]);
  }
}
#endif

// Portable path of both: S's element (k, d) is S[k_offset(k) + d * d_stride].
template <int NT, typename T, typename KOffset>
void gemm_rows_plain(const T* const* a, const T* S, int64_t r, int64_t D, int64_t d_stride, KOffset k_offset,
                     float* acc) {
  std::fill(acc, acc + NT * D, 0.f);
  for (int64_t k = 0; k < r; ++k) {
    const T* sk = S + k_offset(k);
    for (int i = 0; i < NT; ++i) {
      const float av = to_f32(a[i][k]);
      float* ai = acc + i * D;
      for (int64_t d = 0; d < D; ++d) ai[d] += av * to_f32(sk[d * d_stride]);
    }
  }
}

// acc[i * D + d] = sum_k a[i][k] * S[k * D + d] for i < NT tokens (a[i] = U rows), D % 64 == 0 on the fast path
template <int NT>
void gemm_rows(const float* const* a, const float* S, int64_t r, int64_t D, float* acc) {
#if defined(__AVX512F__)
  if (D % 64 == 0) {
    tile_columns64<NT>(D, acc, [&](__m512 (&c)[NT][4], int64_t d0) {
      for (int64_t k = 0; k < r; ++k) {
        const float* sk = S + k * D + d0;
        const __m512 s0 = _mm512_loadu_ps(sk), s1 = _mm512_loadu_ps(sk + 16), s2 = _mm512_loadu_ps(sk + 32),
                     s3 = _mm512_loadu_ps(sk + 48);
        for (int i = 0; i < NT; ++i) {
          const __m512 av = _mm512_set1_ps(a[i][k]);
          c[i][0] = _mm512_fmadd_ps(av, s0, c[i][0]);
          c[i][1] = _mm512_fmadd_ps(av, s1, c[i][1]);
          c[i][2] = _mm512_fmadd_ps(av, s2, c[i][2]);
          c[i][3] = _mm512_fmadd_ps(av, s3, c[i][3]);
        }
      }
    });
    return;
  }
#endif
  gemm_rows_plain<NT>(a, S, r, D, 1, [D](int64_t k) { return k * D; }, acc);
}

// bf16 factors: acc[i * D + d] = sum_k a[i][k] * S[k][d], with a[i] r bf16 values (r even) and S stored
// pair-interleaved as S2[k / 2][d][k % 2] (bf16), the layout of AVX512-BF16's dot product of pairs.
template <int NT>
void gemm_rows(const uint16_t* const* a, const uint16_t* S2, int64_t r, int64_t D, float* acc) {
#if defined(__AVX512BF16__)
  if (D % 64 == 0) {
    tile_columns64<NT>(D, acc, [&](__m512 (&c)[NT][4], int64_t d0) {
      for (int64_t k2 = 0; k2 < r / 2; ++k2) {
        const uint16_t* sk = S2 + (k2 * D + d0) * 2;
        __m512bh s[4];
        for (int j = 0; j < 4; ++j) s[j] = (__m512bh)_mm512_loadu_si512(sk + 32 * j);
        for (int i = 0; i < NT; ++i) {
          int32_t pair;
          std::memcpy(&pair, a[i] + 2 * k2, sizeof(pair));
          const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
          for (int j = 0; j < 4; ++j) c[i][j] = _mm512_dpbf16_ps(c[i][j], av, s[j]);
        }
      }
    });
    return;
  }
#endif
  gemm_rows_plain<NT>(a, S2, r, D, 2, [D](int64_t k) { return (k / 2) * D * 2 + (k % 2); }, acc);
}

// Dispatch on the tile height; T picks the fp32 or the bf16 overload of gemm_rows.
template <typename T>
void gemm_rows_n(int nt, const T* const* a, const T* S, int64_t r, int64_t D, float* acc) {
  switch (nt) {
    case 1: gemm_rows<1>(a, S, r, D, acc); break;
    case 2: gemm_rows<2>(a, S, r, D, acc); break;
    case 3: gemm_rows<3>(a, S, r, D, acc); break;
    default: gemm_rows<4>(a, S, r, D, acc); break;
  }
}

// ------------------------------------------------------------------------------------ scores
template <typename T>
py::array_t<float> scores_impl(const FArray& q, const T* lp, int64_t N, int64_t NB, const std::optional<FArray>& bias,
                               double scale, int num_threads) {
  const int64_t rows = q.shape(0), GS = q.shape(1), D = q.shape(2);
  if (bias && (bias->ndim() != 2 || bias->shape(0) != rows || bias->shape(1) != N))
    throw py::value_error("shadowkv_scores: bias requires [rows, N] (got " + shape_of(*bias) + ")");
  py::array_t<float> out({rows, N});
  if (rows == 0 || N == 0) return out;
  const int64_t Np = NB * kLandmarkTile;           // logit row stride (whole tiles)
  const int64_t tiles_per_block = kScoreBlock / kLandmarkTile;
  const int64_t nb = (N + kScoreBlock - 1) / kScoreBlock;
  std::vector<float> logits(static_cast<size_t>(rows * GS * Np));
  std::vector<float> part_m(static_cast<size_t>(rows * GS * nb)), part_l(part_m.size()), lse(static_cast<size_t>(rows * GS));
  const float* qp = q.data();
  const float* bp = bias ? bias->data() : nullptr;
  float* op = out.mutable_data();
  const float fscale = static_cast<float>(scale);
  std::vector<float> qscaled(static_cast<size_t>(rows * GS * D));
  for (size_t i = 0; i < qscaled.size(); ++i) qscaled[i] = qp[i] * fscale;
  const int threads = resolve_threads(num_threads);
  {
    py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
    {
      // -- phase 1: logits of one block for all GS rows, and the block's softmax state per row
#pragma omp for schedule(static)
      for (int64_t item = 0; item < rows * nb; ++item) {
        const int64_t row = item / nb, blk = item % nb;
        const int64_t n0 = blk * kScoreBlock, len = std::min(kScoreBlock, N - n0);
        const int64_t t0 = blk * tiles_per_block, t1 = std::min(NB, t0 + tiles_per_block);
        float* lrow = logits.data() + row * GS * Np;
        score_tiles(qscaled.data() + row * GS * D, GS, lp + row * NB * D * kLandmarkTile, D, t0, t1, lrow, Np, NB);
        for (int64_t g = 0; g < GS; ++g) {
          float* lgg = lrow + g * Np + n0;
          if (bp) {
            const float* bb = bp + row * N + n0;
#pragma omp simd
            for (int64_t n = 0; n < len; ++n) lgg[n] += bb[n];
          }
          float m = kNegInf;
          for (int64_t n = 0; n < len; ++n) m = std::max(m, lgg[n]);
          const float l = m != kNegInf ? sum_exp_shifted(lgg, len, m) : 0.f;
          part_m[(row * GS + g) * nb + blk] = m;
          part_l[(row * GS + g) * nb + blk] = l;
        }
      }
      // -- each row's log-sum-exp over all blocks
#pragma omp for schedule(static)
      for (int64_t rg = 0; rg < rows * GS; ++rg) {
        float m = kNegInf;
        for (int64_t b = 0; b < nb; ++b) m = std::max(m, part_m[rg * nb + b]);
        float l = 0.f;
        if (m != kNegInf)
          for (int64_t b = 0; b < nb; ++b) l += part_l[rg * nb + b] * std::exp(part_m[rg * nb + b] - m);
        lse[rg] = l > 0.f ? m + std::log(l) : std::numeric_limits<float>::quiet_NaN();  // NaN: no chunk left
      }
      // -- phase 2: score = exp(max over rows of (logit - lse)); a row with no chunk contributes 0
#pragma omp for schedule(static)
      for (int64_t item = 0; item < rows * nb; ++item) {
        const int64_t row = item / nb, blk = item % nb;
        const int64_t n0 = blk * kScoreBlock, len = std::min(kScoreBlock, N - n0);
        float* dst = op + row * N + n0;
        std::fill(dst, dst + len, kNegInf);
        for (int64_t g = 0; g < GS; ++g) {
          const float s = lse[row * GS + g];
          if (std::isnan(s)) continue;
          const float* lgg = logits.data() + (row * GS + g) * Np + n0;
#pragma omp simd
          for (int64_t n = 0; n < len; ++n) dst[n] = std::max(dst[n], lgg[n] - s);
        }
        exp_inplace(dst, len);
      }
    }
  }
  return out;
}

// Landmarks in tiles of 64 chunks, [rows, NB, D, 64] (chunk n = tile n / 64, column n % 64; NB = ceil(N / 64)),
// fp32 or bf16 given as int16 bit patterns; N = the number of chunks (the rest of the last tile is padding).
py::array_t<float> shadowkv_scores(const FArray& q, const py::array& lm, int64_t N, const std::optional<FArray>& bias,
                                   double scale, int num_threads) {
  if (q.ndim() != 3) throw py::value_error("shadowkv_scores: q requires [rows, GS, D] (got " + shape_of(q) + ")");
  if (lm.ndim() != 4 || lm.shape(0) != q.shape(0) || lm.shape(2) != q.shape(2) || lm.shape(3) != kLandmarkTile)
    throw py::value_error("shadowkv_scores: landmarks require [rows, NB, D, 64] matching q " + shape_of(q) + " (got " +
                          shape_of(lm) + ")");
  const int64_t NB = lm.shape(1);
  if (N < 0 || (N + kLandmarkTile - 1) / kLandmarkTile != NB)
    throw py::value_error("shadowkv_scores: n_chunks requires ceil(n_chunks / 64) == NB = " + std::to_string(NB) +
                          " (got " + std::to_string(N) + ")");
  if (lm.dtype().itemsize() == 2 && lm.dtype().kind() == 'i') {  // torch bf16 viewed as int16: no copy
    const auto bits = py::array_t<int16_t, py::array::c_style>::ensure(lm);
    if (!bits) throw py::value_error("shadowkv_scores: bf16 landmarks require a C-contiguous int16 view");
    return scores_impl<uint16_t>(q, reinterpret_cast<const uint16_t*>(bits.data()), N, NB, bias, scale, num_threads);
  }
  const auto f32 = FArray::ensure(lm);
  if (!f32) throw py::value_error("shadowkv_scores: landmarks require fp32 or bf16 bits (int16)");
  return scores_impl<float>(q, f32.data(), N, NB, bias, scale, num_threads);
}

// ------------------------------------------------------------------------------------ select
// The K best of N scores (largest first, ties to the lower id; NaN ranks as -inf) into order[0, K),
// unordered. A strided sample of the scores gives a threshold that at least K scores reach (checked;
// else every chunk is a candidate), so the exact selection runs on ~1.5 K candidates instead of N:
// one streaming pass plus a small nth_element, the same set as nth_element over all N.
void top_k_chunks(const float* sc, int64_t N, int64_t K, std::vector<float>& val, std::vector<int32_t>& order) {
  for (int64_t n = 0; n < N; ++n) val[n] = std::isnan(sc[n]) ? kNegInf : sc[n];
  float threshold = kNegInf;
  const int64_t stride = N / kSelectSample;
  if (stride >= 4 && K * 8 <= N) {  // sampling pays off: few winners among many
    std::vector<float> sample(static_cast<size_t>(N / stride));
    for (size_t i = 0; i < sample.size(); ++i) sample[i] = val[i * stride];
    const int64_t S = static_cast<int64_t>(sample.size());
    const int64_t rank = std::min<int64_t>(S - 1, (K * S * 3) / (2 * N) + 8);  // 1.5x the expected rank + slack
    std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<float>());
    threshold = sample[rank];
  }
  order.clear();
  for (int64_t n = 0; n < N; ++n)
    if (val[n] >= threshold) order.push_back(static_cast<int32_t>(n));
  if (static_cast<int64_t>(order.size()) < K) {  // the sample overshot: take every chunk
    order.resize(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) order[n] = static_cast<int32_t>(n);
  }
  std::nth_element(order.begin(), order.begin() + (K - 1), order.end(), [&val](int32_t a, int32_t b) {
    return val[a] > val[b] || (val[a] == val[b] && a < b);
  });
}

// Per row (batch b, KV head): the K best chunks by score (ties to the lower id), then the slot
// bookkeeping of the device cache. slot_of[row * N + c] is the slot holding chunk c of the row (-1:
// none; the array has one extra entry at the end, unused here), slot_ids[row, s] the flat chunk id in
// slot s (-1: empty). Selected chunks already in a slot keep it (hits, when reuse); the misses take
// the slots no longer needed, in increasing slot order. Returns, per row, the misses first:
// chunks[row, j] / slots[row, j] for j < counts[row]; the rest of each row is -1.
py::tuple shadowkv_select(const FArray& scores, int64_t K, py::array_t<int64_t, py::array::c_style> slot_of,
                          py::array_t<int64_t, py::array::c_style> slot_ids, bool reuse, int num_threads) {
  if (scores.ndim() != 2) throw py::value_error("shadowkv_select: scores requires [rows, N] (got " + shape_of(scores) + ")");
  const int64_t rows = scores.shape(0), N = scores.shape(1);
  if (K <= 0 || K > N)
    throw py::value_error("shadowkv_select: K requires 0 < K <= N = " + std::to_string(N) + " (got " + std::to_string(K) + ")");
  if (slot_of.ndim() != 1 || slot_of.shape(0) != rows * N + 1 || !slot_of.writeable())
    throw py::value_error("shadowkv_select: slot_of requires a writable [rows * N + 1] int64 array (got " +
                          shape_of(slot_of) + ")");
  if (slot_ids.ndim() != 2 || slot_ids.shape(0) != rows || slot_ids.shape(1) != K || !slot_ids.writeable())
    throw py::value_error("shadowkv_select: slot_ids requires a writable [rows, K] int64 array (got " +
                          shape_of(slot_ids) + ")");
  py::array_t<int64_t> chunks({rows, K}), slots({rows, K}), counts({rows});
  const float* sp = scores.data();
  int64_t* of = slot_of.mutable_data();
  int64_t* ids = slot_ids.mutable_data();
  int64_t *cp = chunks.mutable_data(), *lp = slots.mutable_data(), *np = counts.mutable_data();
  {
    py::gil_scoped_release release;
#pragma omp parallel num_threads(resolve_threads(num_threads))
    {
      std::vector<float> val(static_cast<size_t>(N));
      std::vector<int32_t> order;
      std::vector<char> held(static_cast<size_t>(K));
#pragma omp for schedule(static)
      for (int64_t row = 0; row < rows; ++row) {
        top_k_chunks(sp + row * N, N, K, val, order);
        int64_t* of_row = of + row * N;
        int64_t* ids_row = ids + row * K;
        std::fill(held.begin(), held.end(), 0);
        int64_t n_miss = 0;
        int64_t* miss = cp + row * K;  // misses' chunk ids collect here first
        for (int64_t j = 0; j < K; ++j) {
          const int64_t c = order[j], s = reuse ? of_row[c] : -1;
          if (s >= 0 && s < K) held[s] = 1;
          else miss[n_miss++] = c;
        }
        int64_t* tgt = lp + row * K;
        for (int64_t s = 0, j = 0; s < K && j < n_miss; ++s)
          if (!held[s]) tgt[j++] = s;
        for (int64_t j = 0; j < n_miss; ++j) {  // evict first (an evicted chunk may be re-selected) ...
          const int64_t old = ids_row[tgt[j]];
          if (old >= 0) of[old] = -1;
        }
        for (int64_t j = 0; j < n_miss; ++j) {  // ... then place
          of_row[miss[j]] = tgt[j];
          ids_row[tgt[j]] = row * N + miss[j];
        }
        std::fill(miss + n_miss, miss + K, -1);
        std::fill(tgt + n_miss, tgt + K, -1);
        np[row] = n_miss;
      }
    }
  }
  return py::make_tuple(chunks, slots, counts);
}

// ------------------------------------------------------------------------------------ rebuild
struct Strided4 {  // a writable fp32 [A, B, C, D] view with element strides, last dim contiguous
  float* data;
  int64_t s0, s1, s2;
};

Strided4 writable_view(py::array& a, const char* name, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
  if (!a.dtype().is(py::dtype::of<float>()) || !a.writeable() || a.ndim() != 4)
    throw py::value_error(std::string("shadowkv_rebuild: ") + name + " requires a writable fp32 array of 4 dims (got " +
                          shape_of(a) + ")");
  if (a.shape(0) != d0 || a.shape(1) != d1 || a.shape(2) != d2 || a.shape(3) != d3)
    throw py::value_error(std::string("shadowkv_rebuild: ") + name + " requires shape (" + std::to_string(d0) + ", " +
                          std::to_string(d1) + ", " + std::to_string(d2) + ", " + std::to_string(d3) + ") (got " +
                          shape_of(a) + ")");
  if (d3 > 1 && a.strides(3) != static_cast<py::ssize_t>(sizeof(float)))
    throw py::value_error(std::string("shadowkv_rebuild: ") + name + " requires a contiguous last dim");
  for (int i = 0; i < 3; ++i)
    if (a.strides(i) % static_cast<py::ssize_t>(sizeof(float)))
      throw py::value_error(std::string("shadowkv_rebuild: ") + name + " requires float-aligned strides");
  const int64_t f = sizeof(float);
  return {static_cast<float*>(a.mutable_data()), a.strides(0) / f, a.strides(1) / f, a.strides(2) / f};
}

// Everything the rebuild loop needs, validated once (no throwing inside OpenMP).
struct RebuildPlan {
  int64_t rows, M, N, C, D, B, Tc, r, Cs, Cc, R, K;
  bool table;  // cos/sin are [B, N, R/2] tables at every chunk start (rotate-half: both halves equal)
  Strided4 ok, ov;
  const int64_t *cp, *sp, *np;
  const float *csp, *snp, *vp;
  int64_t vs0, vs1, vs2;
  int64_t num_kv_heads;
};

// u_rows x r: U's shape; sv_count: how many [r, D] SV matrices (rows or rows*C).
RebuildPlan plan_rebuild(int64_t u_rows, int64_t r, int64_t sv_count, int64_t sv_r, int64_t sv_d, const IArray& chunks,
                         const IArray& slots, const IArray& counts, const FArray& cos, const FArray& sin, py::array& out_k,
                         const StridedFArray& v_src, py::array& out_v, int64_t num_kv_heads) {
  if (chunks.ndim() != 2 || slots.ndim() != 2 || slots.shape(0) != chunks.shape(0) || slots.shape(1) != chunks.shape(1))
    throw py::value_error("shadowkv_rebuild: chunks and slots require the same [rows, M] shape (got " + shape_of(chunks) +
                          " and " + shape_of(slots) + ")");
  RebuildPlan p{};
  p.rows = chunks.shape(0);
  p.M = chunks.shape(1);
  p.num_kv_heads = num_kv_heads;
  if (num_kv_heads <= 0 || p.rows % num_kv_heads)
    throw py::value_error("shadowkv_rebuild: rows (" + std::to_string(p.rows) + ") must be a multiple of num_kv_heads (got " +
                          std::to_string(num_kv_heads) + ")");
  if (counts.ndim() != 1 || counts.shape(0) != p.rows)
    throw py::value_error("shadowkv_rebuild: counts requires [rows=" + std::to_string(p.rows) + "] (got " +
                          shape_of(counts) + ")");
  if (v_src.ndim() != 4 || v_src.shape(0) != p.rows)
    throw py::value_error("shadowkv_rebuild: v_src requires [rows, N, C, D] (got " + shape_of(v_src) + ")");
  p.N = v_src.shape(1);
  p.C = v_src.shape(2);
  p.D = v_src.shape(3);
  if (p.D > 1 && v_src.strides(3) != static_cast<py::ssize_t>(sizeof(float)))
    throw py::value_error("shadowkv_rebuild: v_src requires a contiguous last dim");
  p.B = p.rows / num_kv_heads;
  if (p.B == 0 || u_rows % p.B || u_rows / p.B < p.N * p.C)
    throw py::value_error("shadowkv_rebuild: u requires [B*Tc, r] with Tc >= N*C (got " + std::to_string(u_rows) + " rows)");
  p.Tc = u_rows / p.B;
  p.r = r;
  if (sv_r != r || sv_d != p.D || (sv_count != p.rows && sv_count != p.rows * p.C))
    throw py::value_error("shadowkv_rebuild: sv requires [rows or rows*C, r=" + std::to_string(r) + ", D=" +
                          std::to_string(p.D) + "] (got " + std::to_string(sv_count) + " matrices of " +
                          std::to_string(sv_r) + " x " + std::to_string(sv_d) + ")");
  p.Cs = sv_count / p.rows;  // 1: one SV per KV head; C: one per in-chunk offset (folded RoPE)
  if (cos.ndim() == 3) {  // chunk-start tables, indexed by (batch, chunk id)
    if (p.Cs != p.C || cos.shape(0) != p.B || cos.shape(1) != p.N || 2 * cos.shape(2) > p.D || sin.ndim() != 3 ||
        sin.shape(0) != cos.shape(0) || sin.shape(1) != cos.shape(1) || sin.shape(2) != cos.shape(2))
      throw py::value_error("shadowkv_rebuild: cos/sin tables require [B, N, R/2] with 2 * (R/2) <= D and one SV per "
                            "in-chunk offset (got " + shape_of(cos) + " and " + shape_of(sin) + ")");
    p.table = true;
    p.Cc = 1;
    p.R = 2 * cos.shape(2);
  } else if (cos.ndim() != 4 || cos.shape(0) != p.rows || cos.shape(1) != p.M || (cos.shape(2) != 1 && cos.shape(2) != p.C) ||
      cos.shape(3) > p.D || cos.shape(3) % 2 || sin.ndim() != 4 || sin.shape(0) != cos.shape(0) ||
      sin.shape(1) != cos.shape(1) || sin.shape(2) != cos.shape(2) || sin.shape(3) != cos.shape(3))
    throw py::value_error("shadowkv_rebuild: cos and sin require [rows, M, 1 or C, R] with R even and <= D, or "
                          "[B, N, R/2] tables (got " + shape_of(cos) + " and " + shape_of(sin) + ")");
  else {
    p.Cc = cos.shape(2);
    p.R = cos.shape(3);
  }
  p.K = out_k.ndim() == 4 ? out_k.shape(1) : 0;
  p.ok = writable_view(out_k, "out_k", p.rows, p.K, p.C, p.D);
  p.ov = writable_view(out_v, "out_v", p.rows, p.K, p.C, p.D);
  p.cp = chunks.data();
  p.sp = slots.data();
  p.np = counts.data();
  for (int64_t row = 0; row < p.rows; ++row) {
    if (p.np[row] < 0 || p.np[row] > p.M)
      throw py::value_error("shadowkv_rebuild: counts must be in [0, M=" + std::to_string(p.M) + "] (got " +
                            std::to_string(p.np[row]) + ")");
    for (int64_t j = 0; j < p.np[row]; ++j) {
      if (p.cp[row * p.M + j] < 0 || p.cp[row * p.M + j] >= p.N)
        throw py::value_error("shadowkv_rebuild: chunk ids must be in [0, N=" + std::to_string(p.N) + ") (got " +
                              std::to_string(p.cp[row * p.M + j]) + ")");
      if (p.sp[row * p.M + j] < 0 || p.sp[row * p.M + j] >= p.K)
        throw py::value_error("shadowkv_rebuild: slots must be in [0, K=" + std::to_string(p.K) + ") (got " +
                              std::to_string(p.sp[row * p.M + j]) + ")");
    }
  }
  p.csp = cos.data();
  p.snp = sin.data();
  p.vp = v_src.data();
  const int64_t f = sizeof(float);
  p.vs0 = v_src.strides(0) / f;
  p.vs1 = v_src.strides(1) / f;
  p.vs2 = v_src.strides(2) / f;
  return p;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define LONGCTX_AMX 1
// ---------------------------------------------------------------------------------------------
// AMX (Intel Advanced Matrix Extensions) for the bf16 rebuild: a [16 tokens, r] x [r, 64] product
// is r / 32 TDPBF16PS per 16-column tile. Linux hands out the tile state only on request
// (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); when that is refused the AVX512-BF16 path runs.
constexpr int64_t kAmxRows = 16;  // tokens per AMX tile (the hardware maximum)

bool amx_ready() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) AmxTileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tiles 0-3: C [16, 16] fp32; tile 4: A [16 tokens, 32] bf16; tiles 5-6: B [16 k-pairs, 16 columns x 2] bf16
void amx_configure() {
  AmxTileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 7; ++t) {
    cfg.rows[t] = kAmxRows;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// acc[i * D + d] = sum_k A[i * r + k] * S[k][d] for 16 rows i: A is a packed [16, r] bf16 tile buffer,
// S2 the pair-interleaved SV ([r / 2, D, 2] bf16); r % 32 == 0, D % 64 == 0.
void gemm_tile_amx(const uint16_t* A, const uint16_t* S2, int64_t r, int64_t D, float* acc) {
  const int64_t a_stride = r * 2, b_stride = D * 4, c_stride = D * 4;  // bytes
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k0 = 0; k0 < r; k0 += 32) {
      const uint16_t* b = S2 + ((k0 / 2) * D + d0) * 2;
      _tile_loadd(4, A + k0, a_stride);
      _tile_loadd(5, b, b_stride);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, b + 32, b_stride);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(5, b + 64, b_stride);
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(6, b + 96, b_stride);
      _tile_dpbf16ps(3, 4, 6);
    }
    _tile_stored(0, acc + d0, c_stride);
    _tile_stored(1, acc + d0 + 16, c_stride);
    _tile_stored(2, acc + d0 + 32, c_stride);
    _tile_stored(3, acc + d0 + 48, c_stride);
  }
}
#endif

// Whether the bf16 rebuild of rank r and head dim D runs on AMX tiles.
bool use_amx(int64_t r, int64_t D) {
#if defined(LONGCTX_AMX)
  return r % 32 == 0 && D % 64 == 0 && amx_ready();
#else
  (void)r;
  (void)D;
  return false;
#endif
}

// The loop of both rebuilds; T = float (fp32 factors) or uint16_t (bf16 U, pair-interleaved bf16 SV).
// The bf16 products run on AMX tiles of 16 tokens where the CPU and the shapes allow.
template <typename T>
void run_rebuild(const RebuildPlan& p, const T* up, const T* svp, int threads) {
  const int64_t C = p.C, D = p.D, r = p.r, R = p.R, h = R / 2, M = p.M;
  const bool amx = std::is_same<T, uint16_t>::value && use_amx(r, D);
  const int64_t tile = amx ? 16 : kChunkTile;  // chunks per work item
  const int64_t tiles = (M + tile - 1) / tile;
  py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> acc(static_cast<size_t>(tile * D));
    std::vector<T> abuf;  // AMX: the tile's U rows, packed [16, r]
#if defined(LONGCTX_AMX)
    if (amx) {
      amx_configure();
      abuf.assign(static_cast<size_t>(kAmxRows * r), T(0));
    }
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < p.rows * tiles; ++item) {
      const int64_t row = item / tiles, j0 = (item % tiles) * tile;
      const int64_t nt = std::min(tile, p.np[row] - j0);
      if (nt <= 0) continue;
      const int64_t b = row / p.num_kv_heads;
      const int64_t* ch = p.cp + row * M + j0;
      const int64_t* sl = p.sp + row * M + j0;
      // values: whole chunks (one contiguous run each side) when the layouts allow, else row by row below;
      // the chunks' U rows are fetched meanwhile (random chunks: the hardware prefetcher cannot guess them)
      const bool whole_chunks = p.vs2 == D && p.ov.s2 == D;
      for (int64_t i = 0; i < nt; ++i) {
        const T* ub = up + (b * p.Tc + ch[i] * C) * r;
        for (int64_t e = 0; e < C * r; e += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(ub + e, 0, 2);
        if (whole_chunks)
          std::memcpy(p.ov.data + row * p.ov.s0 + sl[i] * p.ov.s1, p.vp + row * p.vs0 + ch[i] * p.vs1,
                      static_cast<size_t>(C * D) * sizeof(float));
      }
      for (int64_t c = 0; c < C; ++c) {
        // -- keys of token c of nt chunks: U rows @ SV
        const T* svc = svp + (row * p.Cs + (p.Cs > 1 ? c : 0)) * r * D;
#if defined(LONGCTX_AMX)
        if (amx) {  // rows past nt keep an earlier tile's U rows: their products are never read
          for (int64_t i = 0; i < nt; ++i)
            std::memcpy(abuf.data() + i * r, up + (b * p.Tc + ch[i] * C + c) * r, static_cast<size_t>(r) * sizeof(T));
          gemm_tile_amx(reinterpret_cast<const uint16_t*>(abuf.data()), reinterpret_cast<const uint16_t*>(svc), r, D,
                        acc.data());
        } else
#endif
        {
          for (int64_t i0 = 0; i0 < nt; i0 += 4) {  // 4 tokens per register tile
            const T* a[4];
            const int n4 = static_cast<int>(std::min<int64_t>(4, nt - i0));
            for (int i = 0; i < n4; ++i) a[i] = up + (b * p.Tc + ch[i0 + i] * C + c) * r;
            gemm_rows_n(n4, a, svc, r, D, acc.data() + i0 * D);
          }
        }
        // -- RoPE on the first R dims, then write into the slot
        for (int64_t i = 0; i < nt; ++i) {
          const float* ai = acc.data() + i * D;
          // the second half's angles: the table's only half, or the full row's second half
          const int64_t t = p.table ? (b * p.N + ch[i]) * h : ((row * M + j0 + i) * p.Cc + (p.Cc > 1 ? c : 0)) * R;
          const float* cs = p.csp + t;
          const float* sn = p.snp + t;
          const float* cs2 = p.table ? cs : cs + h;
          const float* sn2 = p.table ? sn : sn + h;
          float* dst = p.ok.data + row * p.ok.s0 + sl[i] * p.ok.s1 + c * p.ok.s2;
#pragma omp simd
          for (int64_t d = 0; d < h; ++d) dst[d] = ai[d] * cs[d] - ai[d + h] * sn[d];
#pragma omp simd
          for (int64_t d = 0; d < h; ++d) dst[h + d] = ai[h + d] * cs2[d] + ai[d] * sn2[d];
          for (int64_t d = R; d < D; ++d) dst[d] = ai[d];
          // -- the chunk's value row c, host tier -> slot
          if (!whole_chunks)
            std::memcpy(p.ov.data + row * p.ov.s0 + sl[i] * p.ov.s1 + c * p.ov.s2,
                      p.vp + row * p.vs0 + ch[i] * p.vs1 + c * p.vs2, static_cast<size_t>(D) * sizeof(float));
        }
      }
    }
#if defined(LONGCTX_AMX)
    if (amx) _tile_release();
#endif
  }
}

void shadowkv_rebuild(const FArray& u, const FArray& sv, const IArray& chunks, const IArray& slots, const IArray& counts,
                      const FArray& cos, const FArray& sin, py::array out_k, const StridedFArray& v_src, py::array out_v,
                      int64_t num_kv_heads, int num_threads) {
  if (u.ndim() != 2) throw py::value_error("shadowkv_rebuild: u requires [B*Tc, r] (got " + shape_of(u) + ")");
  if (sv.ndim() != 3) throw py::value_error("shadowkv_rebuild: sv requires [rows or rows*C, r, D] (got " + shape_of(sv) + ")");
  const RebuildPlan p = plan_rebuild(u.shape(0), u.shape(1), sv.shape(0), sv.shape(1), sv.shape(2), chunks, slots, counts,
                                     cos, sin, out_k, v_src, out_v, num_kv_heads);
  run_rebuild<float>(p, u.data(), sv.data(), resolve_threads(num_threads));
}

using HArray = py::array_t<int16_t, py::array::c_style>;  // bf16 bit patterns (numpy has no bf16)

void shadowkv_rebuild_bf16(const HArray& u, const HArray& sv2, const IArray& chunks, const IArray& slots,
                           const IArray& counts, const FArray& cos, const FArray& sin, py::array out_k,
                           const StridedFArray& v_src, py::array out_v, int64_t num_kv_heads, int num_threads) {
  if (u.ndim() != 2 || u.shape(1) % 2)
    throw py::value_error("shadowkv_rebuild_bf16: u requires [B*Tc, r] bf16 bits with r even (got " + shape_of(u) + ")");
  if (sv2.ndim() != 4 || sv2.shape(3) != 2)
    throw py::value_error("shadowkv_rebuild_bf16: sv2 requires [rows or rows*C, r/2, D, 2] bf16 bits (got " +
                          shape_of(sv2) + ")");
  const RebuildPlan p = plan_rebuild(u.shape(0), u.shape(1), sv2.shape(0), 2 * sv2.shape(1), sv2.shape(2), chunks, slots,
                                     counts, cos, sin, out_k, v_src, out_v, num_kv_heads);
  run_rebuild<uint16_t>(p, reinterpret_cast<const uint16_t*>(u.data()), reinterpret_cast<const uint16_t*>(sv2.data()),
                        resolve_threads(num_threads));
}

}  // namespace

void register_shadowkv(py::module_& m) {
  m.def("shadowkv_select", &shadowkv_select, py::arg("scores"), py::arg("k"), py::arg("slot_of"), py::arg("slot_ids"),
        py::arg("reuse"), py::arg("num_threads") = 0,
        "Top-k chunks per row and the slot bookkeeping, in place on slot_of [rows*N + 1] / slot_ids [rows, k].\n"
        "Returns (chunks, slots, counts): per row the chunks that missed the device cache and their new slots\n"
        "first (j < counts[row]), -1 after.");
  m.def("shadowkv_amx", [](int64_t rank, int64_t head_dim) { return use_amx(rank, head_dim); }, py::arg("rank"),
        py::arg("head_dim"), "Whether shadowkv_rebuild_bf16 runs on AMX tiles for this rank and head dim.");
  m.def("shadowkv_scores", &shadowkv_scores, py::arg("q"), py::arg("landmarks"), py::arg("n_chunks"), py::arg("bias"),
        py::arg("scale"), py::arg("num_threads") = 0,
        "ShadowKV chunk scores [rows, N]: max over the GS query rows of softmax_N(scale * q . L + bias).\n"
        "q [rows, GS, D] fp32, landmarks in tiles of 64 chunks [rows, ceil(N / 64), D, 64] fp32 or bf16 bits as\n"
        "int16, n_chunks = N, bias [rows, N] fp32 or None.");
  m.def("shadowkv_rebuild", &shadowkv_rebuild, py::arg("u"), py::arg("sv"), py::arg("chunks"), py::arg("slots"),
        py::arg("counts"), py::arg("cos"), py::arg("sin"), py::arg("out_k"), py::arg("v_src"), py::arg("out_v"),
        py::arg("num_kv_heads"), py::arg("num_threads") = 0,
        "Rebuild missed chunks in place: out_k[row, slot] = RoPE(U[chunk rows] @ SV), out_v[row, slot] = v_src[row, chunk]\n"
        "for entries j < counts[row]. u [B*Tc, r], sv [rows or rows*C, r, D], chunks/slots [rows, M] int64,\n"
        "counts [rows], cos/sin [rows, M, 1 or C, R] or (with one SV per in-chunk offset) [B, N, R/2] tables at\n"
        "every chunk start (rotate-half: the second half repeats the first), out_k/out_v [rows, K, C, D] (strided),\n"
        "v_src [rows, N, C, D].");
  m.def("shadowkv_rebuild_bf16", &shadowkv_rebuild_bf16, py::arg("u"), py::arg("sv2"), py::arg("chunks"), py::arg("slots"),
        py::arg("counts"), py::arg("cos"), py::arg("sin"), py::arg("out_k"), py::arg("v_src"), py::arg("out_v"),
        py::arg("num_kv_heads"), py::arg("num_threads") = 0,
        "shadowkv_rebuild with bf16 factors (AVX512-BF16 dot products where the CPU has them): u [B*Tc, r] and\n"
        "sv2 [rows or rows*C, r/2, D, 2] (SV pair-interleaved over r) as int16 bit patterns; the rest as shadowkv_rebuild.");
}

}  // namespace longctx
