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
// Inputs are fp32 / int64 numpy arrays (zero-copy views of contiguous CPU torch tensors);
// outputs are new numpy arrays handed back to torch with torch.from_numpy.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
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
constexpr int kPrefetchRows = 4;         // gathered rows are random: prefetch a few rows ahead
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using FArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(row + d, 0, 1);  // 16 floats = one 64 B line
}

// scores[r * kBlockN + j] = <q_r, k_j> for 4 query rows at once: each k element is loaded once
// and feeds 4 FMAs. q rows are pre-scaled by the softmax scale. The lane sums are reduced with
// explicit vector code: the compiler's `omp simd reduction` ends in 16 scalar adds per row,
// which costs more than the FMAs at D = 128.
#if defined(__AVX512F__)
inline void score_rows4(const float* q, int64_t D, const float* krow, float* scores, int64_t j) {
  const float* q0 = q;
  const float* q1 = q + D;
  const float* q2 = q + 2 * D;
  const float* q3 = q + 3 * D;
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m512 kd = _mm512_loadu_ps(krow + d);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + d), kd, a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q1 + d), kd, a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q2 + d), kd, a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q3 + d), kd, a3);
  }
  float s0 = _mm512_reduce_add_ps(a0), s1 = _mm512_reduce_add_ps(a1);
  float s2 = _mm512_reduce_add_ps(a2), s3 = _mm512_reduce_add_ps(a3);
  for (; d < D; ++d) {
    s0 += q0[d] * krow[d];
    s1 += q1[d] * krow[d];
    s2 += q2[d] * krow[d];
    s3 += q3[d] * krow[d];
  }
  scores[j] = s0;
  scores[kBlockN + j] = s1;
  scores[2 * kBlockN + j] = s2;
  scores[3 * kBlockN + j] = s3;
}

inline float dot(const float* a, const float* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}
#else
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
#endif

// acc_r += p[r] * vrow for 4 rows at once (one load of each v element).
inline void accumulate_rows4(float* acc, int64_t D, const float* vrow, const float* p, int64_t j) {
  float* a0 = acc;
  float* a1 = acc + D;
  float* a2 = acc + 2 * D;
  float* a3 = acc + 3 * D;
  const float p0 = p[j], p1 = p[kBlockN + j], p2 = p[2 * kBlockN + j], p3 = p[3 * kBlockN + j];
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const float vd = vrow[d];
    a0[d] += p0 * vd;
    a1[d] += p1 * vd;
    a2[d] += p2 * vd;
    a3[d] += p3 * vd;
  }
}

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
void attend_tile(TileState& st, int64_t nr, int64_t D, const float* kbase, const float* vbase,
                 const int64_t* keys, int64_t lo, int64_t hi) {
  std::fill(st.m.begin(), st.m.begin() + nr, kNegInf);
  std::fill(st.l.begin(), st.l.begin() + nr, 0.f);
  std::fill(st.acc.begin(), st.acc.begin() + nr * D, 0.f);
  float* scores = st.scores.data();
  auto key_at = [&](int64_t i) { return keys ? keys[i] : i; };

  for (int64_t start = lo; start < hi; start += kBlockN) {
    const int64_t nb = std::min(kBlockN, hi - start);
    // -- scores of the block: gather each K row once, score every row of the tile against it
    for (int64_t j = 0; j < nb; ++j) {
      if (keys && j + kPrefetchRows < nb) prefetch_row(kbase + key_at(start + j + kPrefetchRows) * D, D);
      const float* krow = kbase + key_at(start + j) * D;
      int64_t r = 0;
      for (; r + 4 <= nr; r += 4) score_rows4(st.q.data() + r * D, D, krow, scores + r * kBlockN, j);
      for (; r < nr; ++r) scores[r * kBlockN + j] = dot(st.q.data() + r * D, krow, D);
    }
    // -- update m and l; scores become probabilities relative to the new max
    for (int64_t r = 0; r < nr; ++r) {
      float* s = scores + r * kBlockN;
      float mx = st.m[r];
      for (int64_t j = 0; j < nb; ++j) mx = std::max(mx, s[j]);
      const float alpha = std::exp(st.m[r] - mx);  // m = -inf on the first block: alpha = 0
      float sum = 0.f;
      for (int64_t j = 0; j < nb; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
      }
      st.l[r] = st.l[r] * alpha + sum;
      st.m[r] = mx;
      if (alpha != 1.f) {
        float* a = st.acc.data() + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      }
    }
    // -- gather each V row once and accumulate it into every row of the tile
    for (int64_t j = 0; j < nb; ++j) {
      if (keys && j + kPrefetchRows < nb) prefetch_row(vbase + key_at(start + j + kPrefetchRows) * D, D);
      const float* vrow = vbase + key_at(start + j) * D;
      int64_t r = 0;
      for (; r + 4 <= nr; r += 4) accumulate_rows4(st.acc.data() + r * D, D, vrow, scores + r * kBlockN, j);
      for (; r < nr; ++r) axpy(st.acc.data() + r * D, scores[r * kBlockN + j], vrow, D);
    }
  }
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

py::tuple sparse_attention_forward(const FArray& q, const FArray& k, const FArray& v,
                                   const std::optional<IArray>& indices, double scale, int num_threads) {
  if (q.ndim() != 4) throw py::value_error("sparse_attention: q requires 4 dims [B, H, S, D] (got shape " + shape_str(q) + ")");
  if (k.ndim() != 4) throw py::value_error("sparse_attention: k requires 4 dims [B, Hkv, T, D] (got shape " + shape_str(k) + ")");
  const int64_t B = q.shape(0), H = q.shape(1), S = q.shape(2), D = q.shape(3);
  const int64_t Hkv = k.shape(1), T = k.shape(2);
  if (v.ndim() != 4 || v.shape(0) != k.shape(0) || v.shape(1) != Hkv || v.shape(2) != T || v.shape(3) != k.shape(3))
    throw py::value_error("sparse_attention: k and v require the same shape (got " + shape_str(k) + " and " + shape_str(v) + ")");
  if (k.shape(0) != B || k.shape(3) != D)
    throw py::value_error("sparse_attention: k requires shape [B=" + std::to_string(B) + ", Hkv, T, D=" + std::to_string(D) +
                          "] to match q (got " + shape_str(k) + ")");
  if (Hkv <= 0 || H % Hkv != 0)
    throw py::value_error("sparse_attention: q heads (" + std::to_string(H) + ") must be a multiple of k heads (got " +
                          std::to_string(Hkv) + ")");
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
          throw py::value_error("sparse_attention: indices must be < T=" + std::to_string(T) + " (got " + std::to_string(key) + ")");
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
  float* op = out.mutable_data();
  float* lp = lse.mutable_data();
  const float fscale = static_cast<float>(scale);

  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t tiles = (R + kRowTile - 1) / kRowTile;
  const int64_t base_items = B * Hkv * tiles;
  int64_t splits = 1;
  if (base_items > 0 && base_items < 2 * threads)  // too few items to keep every thread busy: split the keys
    splits = std::max<int64_t>(1, std::min<int64_t>((2 * threads + base_items - 1) / base_items, max_keys / kMinKeysPerSplit));
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
        attend_tile(st, nr, D, kp + bh * T * D, vp + bh * T * D, keys, lo, hi);
        if (splits == 1) {
          for (int64_t r = 0; r < nr; ++r) finalize_row(row_offset(b, hkv, r0 + r), st.m[r], st.l[r], st.acc.data() + r * D);
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
  m.def("sparse_attention", &sparse_attention_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("indices"), py::arg("scale"), py::arg("num_threads") = 0,
        R"doc(Sparse attention with its log-sum-exp (fp32, OpenMP), as sparse_attention_ref.

q: [B, H, S, D] float32; k, v: [B, Hkv, T, D] float32; indices: [B, Hkv, K] int64 or None
(entries < 0 are ignored); scale: softmax scale; num_threads: OpenMP threads (0 = default).
Returns (out [B, H, S, D] float32, lse [B, H, S] float32; -inf and 0 where no key is valid).)doc");
}

}  // namespace longctx
