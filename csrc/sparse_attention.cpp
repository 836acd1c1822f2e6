// Sparse (gathered) attention on the CPU: gather + softmax + weighted sum fused in one pass.
//
// Same semantics as longctx.ops.reference.sparse_attention_ref. For every (batch b, KV head
// hkv) the G*S query rows of the group (row r = query head hkv*G + r / S, position r % S)
// attend over the keys indices[b, hkv, :] (entries < 0 are padding) or over all T keys.
// Keys are visited in blocks of kBlockN; each block is scored for a tile of up to kRowTile
// rows at once (so every gathered K/V row is read from memory once per tile, not once per
// query head), folded into a max-shifted online softmax, and accumulated into fp32 outputs.
// OpenMP parallelises over (b, hkv, row tile, key split); key splits only appear when there
// are fewer (b, hkv, tile) items than threads, and are merged by log-sum-exp at the end.
//
// Inputs are fp32 / int64 numpy arrays (zero-copy views of CPU torch tensors; K/V may be strided,
// e.g. a [:, :, :T] slice of a preallocated cache, as long as each row of D floats is contiguous);
// outputs are new numpy arrays handed back to torch with torch.from_numpy.
// The inner loops use AVX-512 or AVX2+FMA when built for such a CPU (setup.py passes
// -march=native), else plain loops the compiler vectorises; `_C.sparse_attention_isa` says which.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
// gcc 12 flags the _mm*_undefined_* placeholders inside its own AVX-512 headers
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "bindings.h"

namespace py = pybind11;

namespace longctx {
namespace {

constexpr int64_t kBlockN = 64;          // keys per block: a [kRowTile, kBlockN] score tile stays in L1
constexpr int64_t kRowTile = 16;         // query rows per work item (decode: G*S = 4..8 rows, one tile)
constexpr int64_t kMinKeysPerSplit = 2048;  // below this a key split costs more in merging than it saves
constexpr int kPrefetchRows = 8;          // gathered rows are random: prefetch a few rows ahead
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using FArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using StridedFArray = py::array_t<float, py::array::forcecast>;  // K/V: any strides, rows contiguous
using IArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(row + d, 0, 1);  // 16 floats = one 64 B line
}

// ---------------------------------------------------------------------------------------------
// Block primitives, written once over a small vector type `Simd` (AVX-512 or AVX2+FMA, picked
// at compile time; setup.py builds with -march=native) plus plain loops for other CPUs.
//   score_rows4:  scores of 4 query rows against one K row (the K row is loaded once)
//   row_max / exp_row: one row of the score tile -> exp(s - max) in place, returning the sum
//   accumulate:   acc[r, :] += sum_j p[r, j] * v_j for all rows of the tile over the whole block
// ---------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
#define LONGCTX_SIMD 1
constexpr const char* kIsa = "avx512";
struct Simd {
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t W = 16;
  static constexpr int kChunks = 4;  // 4 rows x 4 vectors of accumulators = 16 of the 32 registers
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static M tail(int64_t left) { return left >= W ? static_cast<M>(0xFFFF) : static_cast<M>((1u << left) - 1); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }  // masked-off lanes read 0
  static V load_or(M m, const float* p, float fill) { return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), m, p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V keep(M m, V v) { return _mm512_maskz_mov_ps(m, v); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  // horizontal sum / max (gcc 12's _mm512_reduce_* trip -Wmaybe-uninitialized): 128-bit lanes
  // (0+2, 1+3) go to the low half, then the AVX2 reduction
  static float hsum(V v) {
    return hsum8(_mm512_castps512_ps256(_mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)))));
  }
  static float hmax(V v) {
    return hmax8(_mm512_castps512_ps256(_mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)))));
  }
  static float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // y * 2^n; scalef underflows cleanly to 0
  static V ldexp(V y, V n, V x) { (void)x; return _mm512_scalef_ps(y, n); }
  static constexpr float kExpMin = -104.f;  // exp(-104) underflows to 0 through scalef
};
#elif defined(__AVX2__) && defined(__FMA__)
#define LONGCTX_SIMD 1
constexpr const char* kIsa = "avx2";
struct Simd {
  using V = __m256;
  using M = __m256i;
  static constexpr int64_t W = 8;
  static constexpr int kChunks = 2;  // 4 rows x 2 vectors of accumulators = 8 of the 16 registers
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static M tail(int64_t left) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, W))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(M m, const float* p) { return _mm256_maskload_ps(p, m); }
  static V load_or(M m, const float* p, float fill) {
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, M m, V v) { _mm256_maskstore_ps(p, m, v); }
  static V keep(M m, V v) { return _mm256_and_ps(v, _mm256_castsi256_ps(m)); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float hmax(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // y * 2^n by building the float 2^n from its exponent bits (n >= -126 after the clamp below);
  // lanes whose input was below the clamp are flushed to 0, as exp would underflow there
  static V ldexp(V y, V n, V x) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const V r = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_and_ps(r, _mm256_cmp_ps(x, _mm256_set1_ps(kExpMin), _CMP_GT_OQ));
  }
  static constexpr float kExpMin = -87.3f;  // 2^-126 is the smallest normal float
};
#endif

#if defined(LONGCTX_SIMD)
using V = Simd::V;

// exp(x) for x <= 0: Cephes expf (range reduction by ln 2, degree-6 polynomial, ~1 ulp).
inline V exp_nonpos(V x) {
  const V xc = Simd::max(x, Simd::set1(Simd::kExpMin));
  const V n = Simd::round(Simd::fmadd(xc, Simd::set1(1.44269504088896341f), Simd::zero()));
  V r = Simd::fmadd(n, Simd::set1(-0.693359375f), xc);  // ln 2 split in two for exactness
  r = Simd::fmadd(n, Simd::set1(2.12194440e-4f), r);
  V y = Simd::set1(1.9875691500e-4f);
  y = Simd::fmadd(y, r, Simd::set1(1.3981999507e-3f));
  y = Simd::fmadd(y, r, Simd::set1(8.3334519073e-3f));
  y = Simd::fmadd(y, r, Simd::set1(4.1665795894e-2f));
  y = Simd::fmadd(y, r, Simd::set1(1.6666665459e-1f));
  y = Simd::fmadd(y, r, Simd::set1(5.0000001201e-1f));
  y = Simd::fmadd(y, Simd::fmadd(r, r, Simd::zero()), Simd::add(r, Simd::set1(1.f)));
  return Simd::ldexp(y, n, x);
}

inline void score_rows4(const float* q, int64_t D, const float* krow, float* scores, int64_t j) {
  const float* q0 = q;
  const float* q1 = q + D;
  const float* q2 = q + 2 * D;
  const float* q3 = q + 3 * D;
  V a0 = Simd::zero(), a1 = Simd::zero(), a2 = Simd::zero(), a3 = Simd::zero();
  int64_t d = 0;
  for (; d + Simd::W <= D; d += Simd::W) {
    const V kd = Simd::load(krow + d);
    a0 = Simd::fmadd(Simd::load(q0 + d), kd, a0);
    a1 = Simd::fmadd(Simd::load(q1 + d), kd, a1);
    a2 = Simd::fmadd(Simd::load(q2 + d), kd, a2);
    a3 = Simd::fmadd(Simd::load(q3 + d), kd, a3);
  }
  if (d < D) {
    const auto mk = Simd::tail(D - d);
    const V kd = Simd::load(mk, krow + d);
    a0 = Simd::fmadd(Simd::load(mk, q0 + d), kd, a0);
    a1 = Simd::fmadd(Simd::load(mk, q1 + d), kd, a1);
    a2 = Simd::fmadd(Simd::load(mk, q2 + d), kd, a2);
    a3 = Simd::fmadd(Simd::load(mk, q3 + d), kd, a3);
  }
  scores[j] = Simd::hsum(a0);
  scores[kBlockN + j] = Simd::hsum(a1);
  scores[2 * kBlockN + j] = Simd::hsum(a2);
  scores[3 * kBlockN + j] = Simd::hsum(a3);
}

inline float dot(const float* a, const float* b, int64_t D) {
  V acc = Simd::zero();
  int64_t d = 0;
  for (; d + Simd::W <= D; d += Simd::W) acc = Simd::fmadd(Simd::load(a + d), Simd::load(b + d), acc);
  if (d < D) {
    const auto mk = Simd::tail(D - d);
    acc = Simd::fmadd(Simd::load(mk, a + d), Simd::load(mk, b + d), acc);
  }
  return Simd::hsum(acc);
}

inline float row_max(const float* s, int64_t nb, float init) {
  V mx = Simd::set1(init);
  for (int64_t j = 0; j < nb; j += Simd::W) mx = Simd::max(mx, Simd::load_or(Simd::tail(nb - j), s + j, kNegInf));
  return Simd::hmax(mx);
}

inline float exp_row(float* s, int64_t nb, float mx) {
  const V vmx = Simd::set1(mx);
  V sum = Simd::zero();
  for (int64_t j = 0; j < nb; j += Simd::W) {
    const auto mk = Simd::tail(nb - j);
    const V e = Simd::keep(mk, exp_nonpos(Simd::sub(Simd::load(mk, s + j), vmx)));
    Simd::store(s + j, mk, e);
    sum = Simd::add(sum, e);
  }
  return Simd::hsum(sum);
}

// acc[r, c : c + W*NCH] for NR rows stays in registers over the whole block of V rows: one load
// of each V vector feeds NR FMAs and nothing is stored until the block ends.
template <int NR, int NCH>
inline void accumulate_block(float* acc, int64_t D, const float* const* vrows, const float* p, int64_t nb) {
  for (int64_t c = 0; c < D; c += Simd::W * NCH) {
    V a[NR][NCH];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < NCH; ++i) a[r][i] = Simd::load(acc + r * D + c + Simd::W * i);
    for (int64_t j = 0; j < nb; ++j) {
      V vv[NCH];
      for (int i = 0; i < NCH; ++i) vv[i] = Simd::load(vrows[j] + c + Simd::W * i);
      for (int r = 0; r < NR; ++r) {
        const V pr = Simd::set1(p[r * kBlockN + j]);
        for (int i = 0; i < NCH; ++i) a[r][i] = Simd::fmadd(pr, vv[i], a[r][i]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < NCH; ++i) Simd::store(acc + r * D + c + Simd::W * i, a[r][i]);
  }
}

template <int NR>
inline void accumulate_rows(float* acc, int64_t D, const float* const* vrows, const float* p, int64_t nb) {
  if (D % (Simd::W * Simd::kChunks) == 0) return accumulate_block<NR, Simd::kChunks>(acc, D, vrows, p, nb);
  if (D % Simd::W == 0) return accumulate_block<NR, 1>(acc, D, vrows, p, nb);
  for (int64_t j = 0; j < nb; ++j)  // head dims that are not a multiple of the vector width
    for (int r = 0; r < NR; ++r) {
      const float pr = p[r * kBlockN + j];
      float* a = acc + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += pr * vrows[j][d];
    }
}

inline void accumulate(float* acc, int64_t nr, int64_t D, const float* const* vrows, const float* p, int64_t nb) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) accumulate_rows<4>(acc + r * D, D, vrows, p + r * kBlockN, nb);
  switch (nr - r) {
    case 3: accumulate_rows<3>(acc + r * D, D, vrows, p + r * kBlockN, nb); break;
    case 2: accumulate_rows<2>(acc + r * D, D, vrows, p + r * kBlockN, nb); break;
    case 1: accumulate_rows<1>(acc + r * D, D, vrows, p + r * kBlockN, nb); break;
    default: break;
  }
}
#else
constexpr const char* kIsa = "portable";

inline void score_rows4(const float* q, int64_t D, const float* krow, float* scores, int64_t j) {
  const float* q0 = q;
  const float* q1 = q + D;
  const float* q2 = q + 2 * D;
  const float* q3 = q + 3 * D;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t d = 0; d < D; ++d) {
    const float kd = krow[d];
    s0 += q0[d] * kd;
    s1 += q1[d] * kd;
    s2 += q2[d] * kd;
    s3 += q3[d] * kd;
  }
  scores[j] = s0;
  scores[kBlockN + j] = s1;
  scores[2 * kBlockN + j] = s2;
  scores[3 * kBlockN + j] = s3;
}

inline float dot(const float* a, const float* b, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

inline float row_max(const float* s, int64_t nb, float init) {
  float mx = init;
  for (int64_t j = 0; j < nb; ++j) mx = std::max(mx, s[j]);
  return mx;
}

inline float exp_row(float* s, int64_t nb, float mx) {
  float sum = 0.f;
  for (int64_t j = 0; j < nb; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  return sum;
}

inline void accumulate(float* acc, int64_t nr, int64_t D, const float* const* vrows, const float* p, int64_t nb) {
  for (int64_t j = 0; j < nb; ++j)
    for (int64_t r = 0; r < nr; ++r) {
      const float pr = p[r * kBlockN + j];
      float* a = acc + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += pr * vrows[j][d];
    }
}
#endif

inline void axpy(float* acc, float p, const float* vrow, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += p * vrow[d];
}

// Online-softmax state of one tile of rows over one range of keys.
struct TileState {
  std::vector<float> q;       // [kRowTile, D] scaled queries
  std::vector<float> scores;  // [kRowTile, kBlockN]
  std::vector<float> m;       // [kRowTile] running max
  std::vector<float> l;       // [kRowTile] running sum of exp(score - m)
  std::vector<float> acc;     // [kRowTile, D] unnormalised output
  explicit TileState(int64_t D)
      : q(kRowTile * D), scores(kRowTile * kBlockN), m(kRowTile), l(kRowTile), acc(kRowTile * D) {}
};

// Attend rows [0, nr) of st over keys keys[lo, hi) (or positions lo..hi when keys == nullptr).
// kbase/vbase point at key 0 of one (b, hkv); key t's row starts at kbase + t * k_row (v_row).
void attend_tile(TileState& st, int64_t nr, int64_t D, const float* kbase, int64_t k_row, const float* vbase,
                 int64_t v_row, const int64_t* keys, int64_t lo, int64_t hi) {
  std::fill(st.m.begin(), st.m.begin() + nr, kNegInf);
  std::fill(st.l.begin(), st.l.begin() + nr, 0.f);
  std::fill(st.acc.begin(), st.acc.begin() + nr * D, 0.f);
  float* scores = st.scores.data();
  const float* krows[kBlockN];
  const float* vrows[kBlockN];

  for (int64_t start = lo; start < hi; start += kBlockN) {
    const int64_t nb = std::min(kBlockN, hi - start);
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t key = keys ? keys[start + j] : start + j;
      krows[j] = kbase + key * k_row;
      vrows[j] = vbase + key * v_row;
    }
    // -- scores of the block: gather each K row once, score every row of the tile against it
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t ahead = start + j + kPrefetchRows;  // may run into the next block
      if (ahead < hi) prefetch_row(kbase + (keys ? keys[ahead] : ahead) * k_row, D);
      prefetch_row(vrows[j], D);  // V rows of this block are read right after
      int64_t r = 0;
      for (; r + 4 <= nr; r += 4) score_rows4(st.q.data() + r * D, D, krows[j], scores + r * kBlockN, j);
      for (; r < nr; ++r) scores[r * kBlockN + j] = dot(st.q.data() + r * D, krows[j], D);
    }
    // -- update m and l; scores become probabilities relative to the new max
    for (int64_t r = 0; r < nr; ++r) {
      float* s = scores + r * kBlockN;
      const float mx = row_max(s, nb, st.m[r]);
      const float alpha = std::exp(st.m[r] - mx);  // m = -inf on the first block: alpha = 0
      st.l[r] = st.l[r] * alpha + exp_row(s, nb, mx);
      st.m[r] = mx;
      if (alpha != 1.f) {
        float* a = st.acc.data() + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      }
    }
    // -- accumulate the V rows (prefetched above) into every row of the tile
    accumulate(st.acc.data(), nr, D, vrows, scores, nb);
  }
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

py::tuple sparse_attention_forward(const FArray& q, const StridedFArray& k, const StridedFArray& v,
                                   const std::optional<IArray>& indices, double scale, int num_threads) {
  if (q.ndim() != 4)
    throw py::value_error("sparse_attention: q requires 4 dims [B, H, S, D] (got shape " + shape_str(q) + ")");
  if (k.ndim() != 4)
    throw py::value_error("sparse_attention: k requires 4 dims [B, Hkv, T, D] (got shape " + shape_str(k) + ")");
  const int64_t B = q.shape(0), H = q.shape(1), S = q.shape(2), D = q.shape(3);
  const int64_t Hkv = k.shape(1), T = k.shape(2);
  if (v.ndim() != 4 || v.shape(0) != k.shape(0) || v.shape(1) != Hkv || v.shape(2) != T || v.shape(3) != k.shape(3))
    throw py::value_error("sparse_attention: k and v require the same shape (got " + shape_str(k) + " and " +
                          shape_str(v) + ")");
  if (k.shape(0) != B || k.shape(3) != D)
    throw py::value_error("sparse_attention: k requires shape [B=" + std::to_string(B) + ", Hkv, T, D=" +
                          std::to_string(D) + "] to match q (got " + shape_str(k) + ")");
  if (Hkv <= 0 || H % Hkv != 0)
    throw py::value_error("sparse_attention: q heads (" + std::to_string(H) + ") must be a multiple of k heads (got " +
                          std::to_string(Hkv) + ")");
  // (empty arrays carry arbitrary strides and are never read)
  if (k.size() > 1 && (k.strides(3) != sizeof(float) || v.strides(3) != sizeof(float)))
    throw py::value_error("sparse_attention: k and v require a contiguous last dim (got element strides " +
                          std::to_string(k.strides(3) / 4) + " and " + std::to_string(v.strides(3) / 4) + ")");
  for (int i = 0; i < 3 && k.size() > 1; ++i)
    if (k.strides(i) % sizeof(float) || v.strides(i) % sizeof(float))
      throw py::value_error("sparse_attention: k and v require float-aligned strides");
  const int64_t G = H / Hkv;
  const int64_t R = G * S;  // query rows per (b, hkv)

  // Compact the valid (>= 0) indices of every (b, hkv), checking the range first (no throwing inside OpenMP).
  std::vector<int64_t> sel;
  std::vector<int64_t> n_sel(B * Hkv, T);
  int64_t K = 0;
  if (indices) {
    const IArray& idx = *indices;
    if (idx.ndim() != 3 || idx.shape(0) != B || idx.shape(1) != Hkv)
      throw py::value_error("sparse_attention: indices requires shape [B=" + std::to_string(B) + ", Hkv=" +
                            std::to_string(Hkv) + ", K] (got " + shape_str(idx) + ")");
    K = idx.shape(2);
    const int64_t* ip = idx.data();
    sel.resize(B * Hkv * K);
    for (int64_t bh = 0; bh < B * Hkv; ++bh) {
      int64_t n = 0;
      for (int64_t i = 0; i < K; ++i) {
        const int64_t key = ip[bh * K + i];
        if (key >= T)
          throw py::value_error("sparse_attention: indices must be < T=" + std::to_string(T) + " (got " +
                                std::to_string(key) + ")");
        if (key >= 0) sel[bh * K + n++] = key;
      }
      n_sel[bh] = n;
    }
  }
  const int64_t max_keys = indices ? (n_sel.empty() ? 0 : *std::max_element(n_sel.begin(), n_sel.end())) : T;

  py::array_t<float> out({B, H, S, D});
  py::array_t<float> lse({B, H, S});
  const float* qp = q.data();
  const float* kp = k.data();
  const float* vp = v.data();
  // element strides of K/V: a slice of a preallocated cache ([:, :, :T]) is read in place
  int64_t ks[3], vs[3];
  for (int i = 0; i < 3; ++i) {
    ks[i] = k.strides(i) / static_cast<int64_t>(sizeof(float));
    vs[i] = v.strides(i) / static_cast<int64_t>(sizeof(float));
  }
  float* op = out.mutable_data();
  float* lp = lse.mutable_data();
  const float fscale = static_cast<float>(scale);

  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t tiles = (R + kRowTile - 1) / kRowTile;
  const int64_t base_items = B * Hkv * tiles;
  int64_t splits = 1;
  if (base_items > 0 && base_items < 2 * threads)  // too few items to keep every thread busy: split the keys
    splits = std::max<int64_t>(
        1, std::min<int64_t>((2 * threads + base_items - 1) / base_items, max_keys / kMinKeysPerSplit));
  const int64_t n_items = base_items * splits;
  // per-split partial states (only when splitting): m, l, acc per row
  std::vector<float> part_m, part_l, part_acc;
  if (splits > 1) {
    part_m.resize(n_items * kRowTile);
    part_l.resize(n_items * kRowTile);
    part_acc.resize(n_items * kRowTile * D);
  }

  auto row_offset = [&](int64_t b, int64_t hkv, int64_t r) { return (b * H + hkv * G + r / S) * S + r % S; };

  // Normalise a finished row state into out / lse.
  auto finalize_row = [&](int64_t o, float m, float l, const float* acc) {
    float* dst = op + o * D;
    if (l > 0.f) {
      const float inv = 1.f / l;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] = acc[d] * inv;
      lp[o] = m + std::log(l);
    } else {  // no valid key: zero output, lse = -inf
      std::fill(dst, dst + D, 0.f);
      lp[o] = kNegInf;
    }
  };

  {
    py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
    {
      TileState st(D);
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < n_items; ++item) {
        const int64_t split = item % splits;
        const int64_t tile = (item / splits) % tiles;
        const int64_t bh = item / (splits * tiles);
        const int64_t b = bh / Hkv, hkv = bh % Hkv;
        const int64_t r0 = tile * kRowTile;
        const int64_t nr = std::min(kRowTile, R - r0);
        for (int64_t r = 0; r < nr; ++r) {
          const float* src = qp + row_offset(b, hkv, r0 + r) * D;
          float* dst = st.q.data() + r * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * fscale;
        }
        const int64_t n = n_sel[bh];
        const int64_t per_split = (n + splits - 1) / splits;
        const int64_t lo = std::min(n, split * per_split), hi = std::min(n, lo + per_split);
        const int64_t* keys = indices ? sel.data() + bh * K : nullptr;
        attend_tile(st, nr, D, kp + b * ks[0] + hkv * ks[1], ks[2], vp + b * vs[0] + hkv * vs[1], vs[2], keys, lo, hi);
        if (splits == 1) {
          for (int64_t r = 0; r < nr; ++r)
            finalize_row(row_offset(b, hkv, r0 + r), st.m[r], st.l[r], st.acc.data() + r * D);
        } else {
          std::copy(st.m.begin(), st.m.begin() + nr, part_m.begin() + item * kRowTile);
          std::copy(st.l.begin(), st.l.begin() + nr, part_l.begin() + item * kRowTile);
          std::copy(st.acc.begin(), st.acc.begin() + nr * D, part_acc.begin() + item * kRowTile * D);
        }
      }
      if (splits > 1) {
        // merge the splits of every (b, hkv, tile) by log-sum-exp (max-shifted)
        std::vector<float> acc(D);
#pragma omp for schedule(static)
        for (int64_t base = 0; base < base_items; ++base) {
          const int64_t tile = base % tiles, bh = base / tiles;
          const int64_t b = bh / Hkv, hkv = bh % Hkv;
          const int64_t r0 = tile * kRowTile;
          const int64_t nr = std::min(kRowTile, R - r0);
          for (int64_t r = 0; r < nr; ++r) {
            float m = kNegInf;
            for (int64_t x = 0; x < splits; ++x) m = std::max(m, part_m[(base * splits + x) * kRowTile + r]);
            float l = 0.f;
            std::fill(acc.begin(), acc.end(), 0.f);
            if (m != kNegInf) {
              for (int64_t x = 0; x < splits; ++x) {
                const int64_t slot = (base * splits + x) * kRowTile + r;
                if (part_l[slot] == 0.f) continue;  // empty split (m = -inf)
                const float w = std::exp(part_m[slot] - m);
                l += part_l[slot] * w;
                axpy(acc.data(), w, part_acc.data() + slot * D, D);
              }
            }
            finalize_row(row_offset(b, hkv, r0 + r), m, l, acc.data());
          }
        }
      }
    }
  }
  return py::make_tuple(out, lse);
}

}  // namespace

void register_sparse_attention(py::module_& m) {
  m.attr("sparse_attention_isa") = kIsa;
  m.def("sparse_attention", &sparse_attention_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("indices"), py::arg("scale"), py::arg("num_threads") = 0,
        R"doc(Sparse attention with its log-sum-exp (fp32, OpenMP), as sparse_attention_ref.

q: [B, H, S, D] float32; k, v: [B, Hkv, T, D] float32; indices: [B, Hkv, K] int64 or None
(entries < 0 are ignored); scale: softmax scale; num_threads: OpenMP threads (0 = default).
Returns (out [B, H, S, D] float32, lse [B, H, S] float32; -inf and 0 where no key is valid).)doc");
}

}  // namespace longctx
