// Attention-aware ANNS index for RetrievalAttention (arXiv 2409.10516), built the RoarGraph way
// (Chen et al., VLDB 2024). Two kinds of edges are walked by one best-first beam search:
//
// - projection edges, one set per query head: the exact query->key kNN lists of the head's
//   prefill (training) queries are projected onto the keys by linking each list's top-1 key
//   (the pivot) to the list's other keys. Default: in the query's rank order, no pruning;
//   `proj_prune` applies RoarGraph's occlusion pruning (inner product) with reverse edges.
// - key-key base edges, one set per KV head and shared by the G query heads of the group
//   (RoarGraph's connectivity enhancement, which is query independent): every key is linked by
//   a key->key search with L2 occlusion pruning and reverse edges, and keys unreachable from
//   the entries are attached (NSG's repair). Keys inserted after the build join this layer.
//
// Keys stay owned by Python: a float32 view [Hkv, N, D] (any head/row stride, contiguous rows)
// is passed to every call and never copied. With `half_keys` (default) the index keeps an fp16
// copy that decode searches score (half the bytes per scored key; they are bound by memory
// reads); the build and the exact attention read the fp32 keys. Work is parallel
// over KV heads (base build, insertion), query heads (projection) and (head, query) pairs
// (search) with OpenMP; no Python runs inside and the GIL is released. Scores are inner
// products (maximum inner product search); "closer" means a larger q.k.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__F16C__)
// gcc 12 flags the _mm*_undefined_* placeholders inside its own AVX-512 headers
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bindings.h"

namespace py = pybind11;

namespace longctx {
namespace {

constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();

// Rows of one key set: row r starts at base + r * stride (floats).
struct KeySet {
  const float* base = nullptr;
  int64_t n = 0;
  int64_t stride = 0;
  int64_t dim = 0;
  const float* row(uint32_t r) const { return base + static_cast<int64_t>(r) * stride; }
};

inline float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline float l2(const float* __restrict a, const float* __restrict b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return s;
}

// Pull a key row into cache before it is scored: graph search is bound by random memory reads.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}
inline void prefetch_row(const float* p, int64_t d) { prefetch_bytes(p, d * static_cast<int64_t>(sizeof(float))); }

// IEEE half precision, scalar (round to nearest even; magnitudes beyond 65504 saturate).
inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t e32 = (x >> 23) & 0xffu;
  uint32_t mant = x & 0x7fffffu;
  if (e32 == 0xffu) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u));
  const int32_t e = static_cast<int32_t>(e32) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7bffu);
  if (e <= 0) {
    if (e < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const uint32_t shift = static_cast<uint32_t>(14 - e);
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  if ((h & 0x7c00u) == 0x7c00u) h = 0x7bffu;  // rounding overflowed: saturate
  return static_cast<uint16_t>(sign | h);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  int32_t e = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu, x;
  if (e == 0) {
    if (mant == 0) {
      x = sign;
    } else {  // subnormal: normalise
      e = 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --e;
      }
      x = sign | (static_cast<uint32_t>(e + 127 - 15) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (e == 31) {
    x = sign | 0x7f800000u | (mant << 13);
  } else {
    x = sign | (static_cast<uint32_t>(e + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// q (fp32) . h (fp16 row)
inline float dot_f16(const float* __restrict q, const uint16_t* __restrict h, int64_t d) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= d; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))), acc);
  s = _mm512_reduce_add_ps(acc);
#elif defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= d; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float v : lanes) s += v;
#endif
  for (; i < d; ++i) s += q[i] * f16_to_f32(h[i]);
  return s;
}

// Row r of a key set converted to fp16 into out[0, d).
inline void to_f16(const float* __restrict r, uint16_t* __restrict out, int64_t d) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 lim = _mm512_set1_ps(65504.f), neg = _mm512_set1_ps(-65504.f);
  for (; i + 16 <= d; i += 16) {
    const __m512 v = _mm512_max_ps(_mm512_min_ps(_mm512_loadu_ps(r + i), lim), neg);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  for (; i < d; ++i) out[i] = f32_to_f16(r[i]);
}

struct Cand {
  float score;
  uint32_t id;
};
// Best first; ties broken by id so duplicates of one id end up adjacent after a sort.
inline bool better(const Cand& a, const Cand& b) { return a.score > b.score || (a.score == b.score && a.id < b.id); }

// Visited set of one search: a bitset, cleared per search (N/8 bytes: 16 KB at 128K keys, so
// it stays in L1/L2 where the random tests of a graph walk are cheap).
class Visited {
 public:
  void reset(size_t n) {
    const size_t words = (n + 63) / 64;
    if (bits_.size() < words) bits_.resize(words);
    std::fill(bits_.begin(), bits_.begin() + words, 0);
  }
  // true if already visited; marks it otherwise
  bool test_set(uint32_t i) {
    uint64_t& w = bits_[i >> 6];
    const uint64_t b = uint64_t{1} << (i & 63);
    if (w & b) return true;
    w |= b;
    return false;
  }

 private:
  std::vector<uint64_t> bits_;
};

// The beam: the best L candidates seen so far, sorted best first, with a cursor on the best
// candidate not yet expanded (NSG / RoarGraph style).
class Beam {
 public:
  void reset(size_t L) {
    cap_ = L;
    c_.clear();
    done_.clear();
    cur_ = 0;
  }
  // Inserts x if it ranks in the top L; returns its position or size_t(-1).
  size_t insert(Cand x) {
    if (c_.size() == cap_ && !better(x, c_.back())) return static_cast<size_t>(-1);
    size_t pos = std::upper_bound(c_.begin(), c_.end(), x, better) - c_.begin();
    c_.insert(c_.begin() + pos, x);
    done_.insert(done_.begin() + pos, 0);
    if (c_.size() > cap_) {
      c_.pop_back();
      done_.pop_back();
    }
    return pos;
  }
  bool has_next() const { return cur_ < c_.size(); }
  // Returns the next node to expand and marks it expanded.
  uint32_t next() {
    done_[cur_] = 1;
    return c_[cur_].id;
  }
  // Moves the cursor to the best unexpanded candidate, given the best position inserted since.
  void advance(size_t min_inserted) {
    if (min_inserted < cur_) cur_ = min_inserted;
    while (cur_ < c_.size() && done_[cur_]) ++cur_;
  }
  // The unexpanded candidate after the cursor (the likely next expansion), or kNone.
  uint32_t peek_after() const {
    for (size_t i = cur_ + 1; i < c_.size(); ++i) {
      if (!done_[i]) return c_[i].id;
    }
    return kNone;
  }
  const std::vector<Cand>& items() const { return c_; }

 private:
  std::vector<Cand> c_;
  std::vector<uint8_t> done_;
  size_t cap_ = 0;
  size_t cur_ = 0;
};

// A growable array in its own mapping, advised to use transparent huge pages (Linux): decode
// searches read rows at random from hundreds of MB, and with 4 KB pages nearly every row is a
// TLB miss on top of the cache miss.
template <class T>
class HugeArray {
 public:
  HugeArray() = default;
  HugeArray(const HugeArray&) = delete;
  HugeArray& operator=(const HugeArray&) = delete;
  HugeArray(HugeArray&& o) noexcept : data_(o.data_), size_(o.size_), cap_(o.cap_) { o.data_ = nullptr; o.size_ = o.cap_ = 0; }
  ~HugeArray() { std::free(data_); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return size_; }
  size_t capacity() const { return cap_; }
  void clear() { size_ = 0; }

  // Keeps the first min(size, n) elements; grows by at least 25%.
  void resize(size_t n) {
    if (n > cap_) {
      size_t cap = std::max(n, cap_ + cap_ / 4);
      constexpr size_t kHuge = size_t{2} << 20;
      const size_t bytes = ((cap * sizeof(T) + kHuge - 1) / kHuge) * kHuge;
      void* p = nullptr;
      if (posix_memalign(&p, kHuge, bytes) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(p, bytes, MADV_HUGEPAGE);  // advisory: ignored where THP is off
#endif
      if (size_) std::memcpy(p, data_, size_ * sizeof(T));
      std::free(data_);
      data_ = static_cast<T*>(p);
      cap_ = bytes / sizeof(T);
    }
    size_ = n;
  }

 private:
  T* data_ = nullptr;
  size_t size_ = 0;
  size_t cap_ = 0;
};

// Per-thread working memory. Aligned and padded to its own cache lines: the vectors' end
// pointers change on every push, and two threads' scratches sharing a line (false sharing)
// made a 2-thread search slower than a 1-thread one.
struct alignas(128) Scratch {
  Visited visited;
  Beam beam;
  std::vector<uint32_t> fresh;
  std::vector<Cand> cands;
  std::vector<Cand> work;
  std::vector<uint32_t> kept;
  std::vector<uint8_t> taken;
  char pad[128];
};

// Fixed-slot adjacency: up to R out-neighbours per node in one flat array.
struct Adjacency {
  uint32_t R = 0;
  uint32_t n = 0;
  HugeArray<uint32_t> adj;  // [n * R]
  HugeArray<uint32_t> deg;  // [n]

  void clear() {
    adj.clear();
    deg.clear();
    n = 0;
  }
  void resize(uint32_t n_new) {
    adj.resize(static_cast<size_t>(n_new) * R);
    deg.resize(n_new);
    if (n_new > n) std::fill(deg.data() + n, deg.data() + n_new, 0u);
    n = n_new;
  }
  uint32_t* nbrs(uint32_t i) { return adj.data() + static_cast<size_t>(i) * R; }
  const uint32_t* nbrs(uint32_t i) const { return adj.data() + static_cast<size_t>(i) * R; }
  uint32_t& degree(uint32_t i) { return deg.data()[i]; }
  uint32_t degree(uint32_t i) const { return deg.data()[i]; }
  // drops nodes >= m and every edge to them
  void truncate(uint32_t m) {
    resize(std::min(m, n));
    for (uint32_t i = 0; i < n; ++i) {
      uint32_t* nb = nbrs(i);
      uint32_t w = 0;
      for (uint32_t j = 0; j < degree(i); ++j) {
        if (nb[j] < m) nb[w++] = nb[j];
      }
      degree(i) = w;
    }
  }
  size_t nbytes() const { return (adj.capacity() + deg.capacity()) * sizeof(uint32_t); }
};

// Compressed rows: the projection edges, fixed once built (keys inserted later get none).
struct Csr {
  HugeArray<uint64_t> off;  // [n + 1] (empty: no rows)
  HugeArray<uint32_t> edges;

  uint32_t n() const { return off.size() ? static_cast<uint32_t>(off.size() - 1) : 0; }
  const uint32_t* row(uint32_t i, uint32_t& d) const {
    if (i >= n()) {
      d = 0;
      return nullptr;
    }
    d = static_cast<uint32_t>(off.data()[i + 1] - off.data()[i]);
    return edges.data() + off.data()[i];
  }
  void prefetch(uint32_t i) const {
    if (i >= n()) return;
    const uint64_t* o = off.data() + i;
    __builtin_prefetch(o, 0, 3);
    prefetch_bytes(edges.data() + o[0], static_cast<int64_t>((o[1] - o[0]) * sizeof(uint32_t)));
  }
  void assign(const Adjacency& a) {
    size_t total = 0;
    for (uint32_t i = 0; i < a.n; ++i) total += a.degree(i);
    edges.resize(total);
    off.resize(static_cast<size_t>(a.n) + 1);
    uint64_t w = 0;
    for (uint32_t i = 0; i < a.n; ++i) {
      off.data()[i] = w;
      std::copy(a.nbrs(i), a.nbrs(i) + a.degree(i), edges.data() + w);
      w += a.degree(i);
    }
    off.data()[a.n] = w;
  }
  // empty rows up to n_new (keys inserted after the build)
  void extend(uint32_t n_new) {
    size_t old = off.size();
    if (old == 0) {
      off.resize(1);
      off.data()[0] = 0;
      old = 1;
    }
    if (n_new + 1 <= old) return;
    off.resize(static_cast<size_t>(n_new) + 1);
    std::fill(off.data() + old, off.data() + n_new + 1, static_cast<uint64_t>(edges.size()));
  }
  // drops rows >= m and every edge to them, in place
  void truncate(uint32_t m) {
    const uint32_t rows = std::min(m, n());
    uint64_t w = 0;
    for (uint32_t i = 0; i < rows; ++i) {
      const uint64_t s0 = off.data()[i], s1 = off.data()[i + 1];
      off.data()[i] = w;
      for (uint64_t j = s0; j < s1; ++j) {
        if (edges.data()[j] < m) edges.data()[w++] = edges.data()[j];
      }
    }
    if (off.size()) {
      off.data()[rows] = w;
      off.resize(static_cast<size_t>(rows) + 1);
    }
    edges.resize(w);
    extend(m);
  }
  size_t nbytes() const { return off.capacity() * sizeof(uint64_t) + edges.capacity() * sizeof(uint32_t); }
};

// How a layer prunes candidate lists: occlusion measured by L2 or by inner product, and
// whether dropped candidates top the list up to R.
struct PruneRule {
  bool l2;
  bool fill;
};

// What one search walks: the key-key base layer of the KV head, optionally a query head's
// projection edges, from a set of entry keys.
struct GraphView {
  const Adjacency* base;
  const Csr* proj;
  const std::vector<uint32_t>* entries;
  uint32_t n;
};

// How a search scores key rows against its query: fp32 rows of the caller's key store, or the
// index's fp16 copy (half the bytes per scored key; decode searches are bound by memory reads).
struct F32Scorer {
  const KeySet* keys;
  const float* q;
  float score(uint32_t id) const { return dot(q, keys->row(id), keys->dim); }
  void prefetch(uint32_t id) const { prefetch_row(keys->row(id), keys->dim); }
};

struct F16Scorer {
  const uint16_t* rows;
  int64_t dim;
  const float* q;
  float score(uint32_t id) const { return dot_f16(q, rows + static_cast<int64_t>(id) * dim, dim); }
  void prefetch(uint32_t id) const {
    prefetch_bytes(rows + static_cast<int64_t>(id) * dim, dim * static_cast<int64_t>(sizeof(uint16_t)));
  }
};

// Best-first beam search of width L for the keys with the largest inner product with the
// scorer's query. `skip` (a node id or kNone) is traversed but left out of the beam. Returns
// the number of keys scored.
template <class Scorer>
int64_t beam_search(const GraphView& g, const Scorer& sc, size_t L, uint32_t skip, Scratch& s) {
  s.visited.reset(g.n);
  s.beam.reset(L);
  int64_t scanned = 0;
  constexpr size_t PF = 8;  // rows prefetched ahead of the one being scored
  auto score_fresh = [&]() {
    const size_t m = s.fresh.size();
    for (size_t j = 0; j < m && j < PF; ++j) sc.prefetch(s.fresh[j]);
    size_t min_pos = static_cast<size_t>(-1);
    for (size_t j = 0; j < m; ++j) {
      if (j + PF < m) sc.prefetch(s.fresh[j + PF]);
      const uint32_t id = s.fresh[j];
      const float score = sc.score(id);
      ++scanned;
      if (id == skip) continue;
      const size_t pos = s.beam.insert({score, id});
      if (pos < min_pos) min_pos = pos;
    }
    return min_pos;
  };
  auto gather = [&](uint32_t node) {
    if (g.proj != nullptr) {
      uint32_t d;
      const uint32_t* nb = g.proj->row(node, d);
      for (uint32_t j = 0; j < d; ++j) {
        if (!s.visited.test_set(nb[j])) s.fresh.push_back(nb[j]);
      }
    }
    const uint32_t* nb = g.base->nbrs(node);
    for (uint32_t j = 0; j < g.base->degree(node); ++j) {
      if (!s.visited.test_set(nb[j])) s.fresh.push_back(nb[j]);
    }
  };
  s.fresh.clear();
  for (uint32_t e : *g.entries) {
    if (e < g.n && !s.visited.test_set(e)) s.fresh.push_back(e);
  }
  score_fresh();
  // the skipped node may be the only entry: start from its neighbours then
  if (!s.beam.has_next() && skip < g.n) {
    s.fresh.clear();
    gather(skip);
    score_fresh();
  }
  // a node's neighbour list is one more dependent miss per expansion: fetch the likely next
  // node's while the current one's rows are scored
  auto prefetch_lists = [&](uint32_t node) {
    if (node >= g.n) return;
    if (g.proj != nullptr) g.proj->prefetch(node);
    prefetch_bytes(g.base->nbrs(node), g.base->R * static_cast<int64_t>(sizeof(uint32_t)));
  };
  s.beam.advance(0);
  while (s.beam.has_next()) {
    const uint32_t cur = s.beam.next();
    s.fresh.clear();
    gather(cur);
    prefetch_lists(s.beam.peek_after());
    s.beam.advance(score_fresh());
  }
  return scanned;
}

int64_t beam_search(const GraphView& g, const KeySet& keys, const float* q, size_t L, uint32_t skip, Scratch& s) {
  return beam_search(g, F32Scorer{&keys, q}, L, skip, s);
}

// Occlusion pruning (RoarGraph / NSG rule). Candidates are ranked by closeness to node x
// (inner product, or -L2 with rule.l2); c is dropped when an already kept r is closer to c
// than x is. With rule.fill, dropped candidates top the list up to R in rank order. Leaves
// the kept ids in s.kept.
void prune(const KeySet& keys, uint32_t x, std::vector<Cand>& cands, uint32_t R, PruneRule rule, Scratch& s) {
  const int64_t D = keys.dim;
  const float* xr = keys.row(x);
  for (auto& c : cands) c.score = rule.l2 ? -l2(xr, keys.row(c.id), D) : dot(xr, keys.row(c.id), D);
  std::sort(cands.begin(), cands.end(), better);
  size_t w = 0;
  for (size_t i = 0; i < cands.size(); ++i) {
    if (cands[i].id == x || (w > 0 && cands[w - 1].id == cands[i].id)) continue;
    cands[w++] = cands[i];
  }
  cands.resize(w);
  s.kept.clear();
  s.taken.assign(cands.size(), 0);
  for (size_t i = 0; i < cands.size() && s.kept.size() < R; ++i) {
    const float* c = keys.row(cands[i].id);
    if (i + 1 < cands.size()) prefetch_row(keys.row(cands[i + 1].id), D);
    bool occluded = false;
    for (uint32_t r : s.kept) {
      const float close = rule.l2 ? -l2(c, keys.row(r), D) : dot(c, keys.row(r), D);
      if (close > cands[i].score) {
        occluded = true;
        break;
      }
    }
    if (!occluded) {
      s.kept.push_back(cands[i].id);
      s.taken[i] = 1;
    }
  }
  if (rule.fill) {
    for (size_t i = 0; i < cands.size() && s.kept.size() < R; ++i) {
      if (!s.taken[i]) s.kept.push_back(cands[i].id);
    }
  }
}

// Adds the edge y -> x. A full list is re-pruned without fill, which leaves free slots behind
// so that later reverse edges are cheap. Returns whether x is in y's list afterwards.
bool add_reverse(Adjacency& a, const KeySet& keys, uint32_t y, uint32_t x, PruneRule rule, Scratch& s) {
  uint32_t* nb = a.nbrs(y);
  uint32_t& d = a.degree(y);
  for (uint32_t j = 0; j < d; ++j) {
    if (nb[j] == x) return true;
  }
  if (d < a.R) {
    nb[d++] = x;
    return true;
  }
  s.work.clear();
  for (uint32_t j = 0; j < d; ++j) s.work.push_back({0.f, nb[j]});
  s.work.push_back({0.f, x});
  prune(keys, y, s.work, a.R, {rule.l2, false}, s);
  d = static_cast<uint32_t>(s.kept.size());
  std::copy(s.kept.begin(), s.kept.end(), nb);
  return std::find(s.kept.begin(), s.kept.end(), x) != s.kept.end();
}

// Forces an edge y -> x, taking y's last slot when y is full. Used while keys are inserted; it
// may remove another node's only in-edge, which repair_reachability (run after every build
// and insertion) puts right.
void force_edge(Adjacency& a, uint32_t y, uint32_t x) {
  uint32_t* nb = a.nbrs(y);
  uint32_t& d = a.degree(y);
  for (uint32_t j = 0; j < d; ++j) {
    if (nb[j] == x) return;
  }
  if (d < a.R) {
    nb[d++] = x;
  } else {
    nb[a.R - 1] = x;
  }
}

// Sets x's out-list to prune(existing ∪ cands) and adds the reverse edges. Returns whether
// some node links back to x.
bool connect(Adjacency& a, const KeySet& keys, uint32_t x, std::vector<Cand>& cands, PruneRule rule, Scratch& s) {
  uint32_t* nb = a.nbrs(x);
  for (uint32_t j = 0; j < a.degree(x); ++j) cands.push_back({0.f, nb[j]});
  prune(keys, x, cands, a.R, rule, s);
  std::vector<uint32_t> out(s.kept);  // s.kept is reused by add_reverse
  a.degree(x) = static_cast<uint32_t>(out.size());
  std::copy(out.begin(), out.end(), nb);
  bool linked = false;
  for (uint32_t y : out) linked = add_reverse(a, keys, y, x, rule, s) || linked;
  return linked;
}

// Projection without pruning: the pivot links to its training query's other neighbours in
// the query's rank order, up to the degree (earlier queries first); with `reverse`, each
// neighbour links back to the pivot while it has room.
void link_ranked(Adjacency& a, uint32_t pivot, const std::vector<Cand>& ranked, bool reverse) {
  uint32_t* nb = a.nbrs(pivot);
  uint32_t& d = a.degree(pivot);
  for (const Cand& c : ranked) {
    if (d >= a.R) break;
    if (c.id != pivot && std::find(nb, nb + d, c.id) == nb + d) nb[d++] = c.id;
  }
  if (!reverse) return;
  for (const Cand& c : ranked) {
    uint32_t* rb = a.nbrs(c.id);
    uint32_t& rd = a.degree(c.id);
    if (c.id != pivot && rd < a.R && std::find(rb, rb + rd, pivot) == rb + rd) rb[rd++] = pivot;
  }
}

// Links key x into the base layer by a key->key search of width L (connectivity
// enhancement at build time, incremental insertion afterwards).
void insert_base(Adjacency& base, std::vector<uint32_t>& entries, const KeySet& keys, uint32_t x, size_t L,
                 PruneRule rule, Scratch& s) {
  if (entries.empty()) {
    entries.push_back(x);
    return;
  }
  if (entries.size() == 1 && entries[0] == x) return;
  GraphView view{&base, nullptr, &entries, base.n};
  beam_search(view, keys, keys.row(x), L, x, s);
  std::vector<Cand> cands(s.beam.items());
  if (cands.empty()) return;
  const uint32_t nearest = cands.front().id;
  if (!connect(base, keys, x, cands, rule, s)) force_edge(base, nearest, x);
}

// Makes every node reachable from the entries over the base layer (NSG's tree repair): a BFS
// from the entries records a spanning tree of the reached nodes (tree[v]: the node v was
// discovered from), then each unreached node u is attached under a reached node found by a
// search for u, and the BFS continues from u. The parent takes u in a free slot, or else in
// the last slot that holds a non-tree edge: base lists are nearly always full (pruning fills
// them to R), and overwriting an arbitrary slot (the old rule: always the last) could remove
// another node's only in-edge, often the edge that had attached an earlier node under the same
// parent, so that node and everything below it went unreachable again. Tree edges are never
// overwritten, so every reached node stays reachable and one pass reaches them all. Returns the
// number of nodes attached.
int64_t repair_reachability(Adjacency& base, std::vector<uint32_t>& entries, const KeySet& keys, size_t L, Scratch& s) {
  if (base.n == 0) return 0;
  if (entries.empty()) entries.push_back(0);
  std::vector<uint8_t> seen(base.n, 0);
  std::vector<uint32_t> tree(base.n, kNone);  // BFS parent (kNone: an entry)
  std::vector<uint32_t> queue;
  queue.reserve(base.n);
  auto bfs_from = [&](uint32_t start) {
    if (seen[start]) return;
    seen[start] = 1;
    size_t head = queue.size();
    queue.push_back(start);
    while (head < queue.size()) {
      const uint32_t u = queue[head++];
      const uint32_t* nb = base.nbrs(u);
      for (uint32_t j = 0; j < base.degree(u); ++j) {
        if (!seen[nb[j]]) {
          seen[nb[j]] = 1;
          tree[nb[j]] = u;
          queue.push_back(nb[j]);
        }
      }
    }
  };
  // The slot of reached node p that may take a new edge: base.R for a free slot, else the last
  // slot whose target was not discovered from p (its edge is not a tree edge), else kNone.
  auto free_slot = [&](uint32_t p) -> uint32_t {
    if (base.degree(p) < base.R) return base.R;
    const uint32_t* nb = base.nbrs(p);
    for (uint32_t j = base.degree(p); j-- > 0;) {
      if (tree[nb[j]] != p) return j;
    }
    return kNone;
  };
  for (uint32_t e : entries) bfs_from(e);
  if (queue.size() == base.n) return 0;
  int64_t attached = 0;
  GraphView view{&base, nullptr, &entries, base.n};
  for (uint32_t u = 0; u < base.n; ++u) {
    if (seen[u]) continue;
    beam_search(view, keys, keys.row(u), L, u, s);
    // the search only walks reached nodes: prefer the nearest with a free slot, then the
    // nearest with a non-tree slot
    uint32_t parent = kNone, slot = kNone;
    for (const Cand& c : s.beam.items()) {
      if (seen[c.id] && base.degree(c.id) < base.R) {
        parent = c.id;
        slot = base.R;
        break;
      }
    }
    for (size_t i = 0; parent == kNone && i < s.beam.items().size(); ++i) {
      const uint32_t c = s.beam.items()[i].id;
      if (seen[c] && (slot = free_slot(c)) != kNone) parent = c;
    }
    // Some reached node always qualifies: the |reached| - 1 tree edges fill fewer than the
    // |reached| * R >= 2 |reached| slots. Take the first in BFS order.
    for (size_t i = 0; parent == kNone && i < queue.size(); ++i) {
      if ((slot = free_slot(queue[i])) != kNone) parent = queue[i];
    }
    uint32_t* nb = base.nbrs(parent);
    if (slot == base.R) {
      nb[base.degree(parent)++] = u;
    } else {
      nb[slot] = u;  // drops a non-tree edge: its target stays reachable through its tree edge
    }
    tree[u] = parent;
    bfs_from(u);
    ++attached;
  }
  return attached;
}

// The key nearest the centroid of the keys (L2): the base layer's entry.
uint32_t centroid_key(const KeySet& ks) {
  const int64_t n = ks.n, D = ks.dim;
  std::vector<double> acc(D, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const float* r = ks.row(static_cast<uint32_t>(i));
    for (int64_t d = 0; d < D; ++d) acc[d] += r[d];
  }
  std::vector<float> c(D);
  for (int64_t d = 0; d < D; ++d) c[d] = static_cast<float>(acc[d] / static_cast<double>(n));
  uint32_t best = 0;
  float best_dist = std::numeric_limits<float>::max();
  for (int64_t i = 0; i < n; ++i) {
    const float dist = l2(ks.row(static_cast<uint32_t>(i)), c.data(), D);
    if (dist < best_dist) {
      best_dist = dist;
      best = static_cast<uint32_t>(i);
    }
  }
  return best;
}

class GraphIndex {
 public:
  GraphIndex(int num_graphs, int group_size, int dim, int degree, int base_degree, int build_ef, bool proj_prune,
             bool proj_reverse, bool half_keys)
      : num_graphs_(num_graphs), group_size_(group_size), dim_(dim), degree_(degree), base_degree_(base_degree),
        build_ef_(build_ef), proj_prune_(proj_prune), proj_reverse_(proj_reverse), half_(half_keys) {
    if (num_graphs <= 0 || group_size <= 0 || num_graphs % group_size)
      throw std::invalid_argument("GraphIndex requires num_graphs > 0 divisible by group_size > 0 (got " +
                                  std::to_string(num_graphs) + ", " + std::to_string(group_size) + ")");
    if (dim <= 0) throw std::invalid_argument("GraphIndex requires dim > 0 (got " + std::to_string(dim) + ")");
    if (degree < 1) throw std::invalid_argument("GraphIndex requires degree >= 1 (got " + std::to_string(degree) + ")");
    if (base_degree < 2)
      throw std::invalid_argument("GraphIndex requires base_degree >= 2 (got " + std::to_string(base_degree) + ")");
    if (build_ef < 1) throw std::invalid_argument("GraphIndex requires build_ef >= 1 (got " + std::to_string(build_ef) + ")");
    base_.resize(num_graphs / group_size);
    base_entries_.resize(base_.size());
    for (auto& b : base_) b.R = static_cast<uint32_t>(base_degree);
    proj_.resize(num_graphs);
    entries_.resize(num_graphs);
    half_keys_.resize(base_.size());
  }

  // keys: [Hkv, N, D] float32; knn: [H, Nq, Kq] int32, the exact top-Kq keys of each training
  // query, best first (-1 = none). Nq may be 0: the index is then the base layer alone.
  void build(const py::array& keys, const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& knn,
             int num_entry, int num_threads) {
    std::vector<KeySet> sets = key_sets(keys);
    const int64_t n = sets[0].n;
    if (knn.ndim() != 3 || knn.shape(0) != num_graphs_)
      throw std::invalid_argument("GraphIndex.build requires knn of shape [H=" + std::to_string(num_graphs_) +
                                  ", Nq, Kq]");
    if (n >= static_cast<int64_t>(kNone)) throw std::invalid_argument("GraphIndex supports fewer than 2^32 - 1 keys");
    const int64_t nq = knn.shape(1), kq = knn.shape(2);
    const int32_t* knn_ptr = knn.data();
    const int num_kv = static_cast<int>(base_.size());
    py::gil_scoped_release release;
    ensure_scratch();
    const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
    std::vector<int64_t> attached(num_kv, 0);
    // 1. the key-key base layer of every KV head (RoarGraph's connectivity enhancement)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int kv = 0; kv < num_kv; ++kv) {
      Scratch& s = scratch_[omp_get_thread_num()];
      Adjacency& base = base_[kv];
      auto& entries = base_entries_[kv];
      base.clear();
      entries.clear();
      base.resize(static_cast<uint32_t>(n));
      sync_half(kv, sets[kv], 0);
      if (n == 0) continue;
      entries.push_back(centroid_key(sets[kv]));
      for (uint32_t x = 0; x < base.n; ++x) insert_base(base, entries, sets[kv], x, build_ef_, base_rule(), s);
      attached[kv] = repair_reachability(base, entries, sets[kv], build_ef_, s);
    }
    // 2. projection edges of every query head from its training queries' kNN lists
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int h = 0; h < num_graphs_; ++h) {
      Scratch& s = scratch_[omp_get_thread_num()];
      const KeySet& ks = sets[h / group_size_];
      Adjacency proj;
      proj.R = static_cast<uint32_t>(degree_);
      proj.resize(static_cast<uint32_t>(n));
      const int32_t* lists = knn_ptr + static_cast<int64_t>(h) * nq * kq;
      for (int64_t i = 0; i < nq && n > 0; ++i) {
        const int32_t* row = lists + i * kq;
        if (row[0] < 0 || row[0] >= n) continue;
        const uint32_t pivot = static_cast<uint32_t>(row[0]);
        std::vector<Cand> cands;
        for (int64_t j = 1; j < kq; ++j) {
          if (row[j] >= 0 && row[j] < n) cands.push_back({0.f, static_cast<uint32_t>(row[j])});
        }
        if (proj_prune_) {
          // RoarGraph's rule: occlusion-pruned (inner product, filled to the degree) + reverse edges
          connect(proj, ks, pivot, cands, {false, true}, s);
        } else {
          link_ranked(proj, pivot, cands, proj_reverse_);
        }
      }
      proj_[h].assign(proj);
      entries_[h] = base_entries_[h / group_size_];
      add_pivot_entries(entries_[h], lists, nq, kq, n, num_entry);
    }
    last_attached_ = 0;
    for (auto a : attached) last_attached_ += a;
  }

  // Inserts rows [n_keys, N) of keys (N = keys.shape[1]) into the base layers; the new keys
  // have no projection edges (no query has seen them yet).
  void add(const py::array& keys, int num_threads) {
    std::vector<KeySet> sets = key_sets(keys);
    const int64_t n = sets[0].n;
    if (n < n_keys()) throw std::invalid_argument("GraphIndex.add requires at least n_keys rows (use truncate to drop keys)");
    if (n >= static_cast<int64_t>(kNone)) throw std::invalid_argument("GraphIndex supports fewer than 2^32 - 1 keys");
    py::gil_scoped_release release;
    ensure_scratch();
    if (n == n_keys()) {
      if (dirty_) repair_all(sets, num_threads);
      return;
    }
    const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
    const int num_kv = static_cast<int>(base_.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int kv = 0; kv < num_kv; ++kv) {
      Scratch& s = scratch_[omp_get_thread_num()];
      Adjacency& base = base_[kv];
      const uint32_t start = base.n;
      sync_half(kv, sets[kv], start);
      base.resize(static_cast<uint32_t>(n));
      for (uint32_t x = start; x < base.n; ++x) insert_base(base, base_entries_[kv], sets[kv], x, build_ef_, base_rule(), s);
      // re-pruning may have cut the last in-edge of some key: attach those again
      repair_reachability(base, base_entries_[kv], sets[kv], build_ef_, s);
    }
    dirty_ = false;
    for (int h = 0; h < num_graphs_; ++h) {
      proj_[h].extend(static_cast<uint32_t>(n));
      if (entries_[h].empty()) entries_[h] = base_entries_[h / group_size_];
    }
  }

  // queries: [H, S, D]. Returns (ids [H, S, k] int64 best first, -1 padded; scanned [H, S] int64).
  py::tuple search(const py::array& keys, const py::array_t<float, py::array::c_style | py::array::forcecast>& queries,
                   int k, int ef, int num_threads) {
    std::vector<KeySet> sets = key_sets(keys);
    if (sets[0].n != n_keys())
      throw std::invalid_argument("GraphIndex.search requires keys with n_keys=" + std::to_string(n_keys()) +
                                  " rows (got " + std::to_string(sets[0].n) + ")");
    if (k <= 0) throw std::invalid_argument("GraphIndex.search requires k > 0 (got " + std::to_string(k) + ")");
    if (queries.ndim() != 3 || queries.shape(0) != num_graphs_ || queries.shape(2) != dim_)
      throw std::invalid_argument("GraphIndex.search requires queries of shape [H=" + std::to_string(num_graphs_) +
                                  ", S, D=" + std::to_string(dim_) + "]");
    const int64_t S = queries.shape(1);
    const int64_t n = sets[0].n;
    py::array_t<int64_t> ids({static_cast<int64_t>(num_graphs_), S, static_cast<int64_t>(k)});
    py::array_t<int64_t> scanned({static_cast<int64_t>(num_graphs_), S});
    int64_t* ids_ptr = ids.mutable_data();
    int64_t* scan_ptr = scanned.mutable_data();
    const float* q_ptr = queries.data();
    const size_t L = static_cast<size_t>(std::max(ef, k));
    {
      py::gil_scoped_release release;
      ensure_scratch();
      if (dirty_) repair_all(sets, num_threads);
      const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
      const int64_t total = static_cast<int64_t>(num_graphs_) * S;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
      for (int64_t t = 0; t < total; ++t) {
        const int h = static_cast<int>(t / S);
        Scratch& s = scratch_[omp_get_thread_num()];
        const KeySet& ks = sets[h / group_size_];
        const float* q = q_ptr + t * dim_;
        int64_t* out = ids_ptr + t * k;
        std::fill(out, out + k, -1);
        if (n == 0) {
          scan_ptr[t] = 0;
          continue;
        }
        if (static_cast<int64_t>(L) >= n) {
          // the beam would hold every key: score them all (exact)
          s.cands.resize(n);
          for (int64_t i = 0; i < n; ++i) s.cands[i] = {dot(q, ks.row(static_cast<uint32_t>(i)), dim_), static_cast<uint32_t>(i)};
          const int64_t m = std::min<int64_t>(k, n);
          std::partial_sort(s.cands.begin(), s.cands.begin() + m, s.cands.end(), better);
          for (int64_t i = 0; i < m; ++i) out[i] = s.cands[i].id;
          scan_ptr[t] = n;
          continue;
        }
        GraphView view{&base_[h / group_size_], &proj_[h], &entries_[h], static_cast<uint32_t>(n)};
        if (half_) {
          scan_ptr[t] = beam_search(view, F16Scorer{half_keys_[h / group_size_].data(), dim_, q}, L, kNone, s);
        } else {
          scan_ptr[t] = beam_search(view, F32Scorer{&ks, q}, L, kNone, s);
        }
        const auto& items = s.beam.items();
        const size_t m = std::min<size_t>(static_cast<size_t>(k), items.size());
        for (size_t i = 0; i < m; ++i) out[i] = items[i].id;
      }
    }
    return py::make_tuple(ids, scanned);
  }

  // Drops keys [n, n_keys) and every edge to them (rollback of inserted tokens).
  void truncate(int64_t n) {
    if (n < 0 || n > n_keys())
      throw std::invalid_argument("GraphIndex.truncate requires 0 <= n <= n_keys=" + std::to_string(n_keys()) +
                                  " (got " + std::to_string(n) + ")");
    const uint32_t m = static_cast<uint32_t>(n);
    py::gil_scoped_release release;
    for (auto& b : base_) b.truncate(m);
    if (half_)
      for (auto& hk : half_keys_) hk.resize(static_cast<size_t>(m) * dim_);
    for (auto& p : proj_) p.truncate(m);
    auto filter = [m](std::vector<uint32_t>& e) {
      e.erase(std::remove_if(e.begin(), e.end(), [m](uint32_t x) { return x >= m; }), e.end());
      if (e.empty() && m > 0) e.push_back(0);
    };
    for (auto& e : base_entries_) filter(e);
    for (auto& e : entries_) filter(e);
    // dropping keys may strand others; reattached at the next search or add (which bring the keys)
    dirty_ = true;
  }

  int64_t n_keys() const { return base_.empty() ? 0 : base_[0].n; }

  int64_t nbytes() const {
    size_t total = 0;
    for (const auto& b : base_) total += b.nbytes();
    for (const auto& p : proj_) total += p.nbytes();
    for (const auto& e : entries_) total += e.capacity() * sizeof(uint32_t);
    for (const auto& hk : half_keys_) total += hk.capacity() * sizeof(uint16_t);
    return static_cast<int64_t>(total);
  }

  // Out-degrees [H, N, 2] int64: (projection edges of head h, base edges of its KV head).
  py::array_t<int64_t> degrees() const {
    const int64_t n = n_keys();
    py::array_t<int64_t> out({static_cast<int64_t>(num_graphs_), n, static_cast<int64_t>(2)});
    int64_t* p = out.mutable_data();
    for (int h = 0; h < num_graphs_; ++h) {
      const Adjacency& b = base_[h / group_size_];
      for (int64_t i = 0; i < n; ++i) {
        uint32_t d;
        proj_[h].row(static_cast<uint32_t>(i), d);
        p[(h * n + i) * 2] = d;
        p[(h * n + i) * 2 + 1] = b.degree(i);
      }
    }
    return out;
  }

  // Out-neighbours of node i in query head h's graph (projection edges, then base edges).
  py::array_t<int64_t> neighbors(int h, int64_t i) const {
    check_graph(h);
    if (i < 0 || i >= n_keys()) throw std::out_of_range("GraphIndex.neighbors: node out of range");
    std::vector<int64_t> out;
    uint32_t d;
    const uint32_t* nb = proj_[h].row(static_cast<uint32_t>(i), d);
    out.insert(out.end(), nb, nb + d);
    const Adjacency& b = base_[h / group_size_];
    out.insert(out.end(), b.nbrs(static_cast<uint32_t>(i)), b.nbrs(static_cast<uint32_t>(i)) + b.degree(i));
    py::array_t<int64_t> arr(static_cast<int64_t>(out.size()));
    std::copy(out.begin(), out.end(), arr.mutable_data());
    return arr;
  }

  py::array_t<int64_t> entries(int h) const {
    check_graph(h);
    const auto& e = entries_[h];
    py::array_t<int64_t> out(static_cast<int64_t>(e.size()));
    std::copy(e.begin(), e.end(), out.mutable_data());
    return out;
  }

  // Nodes reachable from the entries of query head h (tests).
  int64_t reachable(int h) const {
    check_graph(h);
    const int64_t n = n_keys();
    std::vector<uint8_t> seen(n, 0);
    std::vector<uint32_t> queue;
    for (uint32_t e : entries_[h]) {
      if (e < n && !seen[e]) {
        seen[e] = 1;
        queue.push_back(e);
      }
    }
    const Adjacency& b = base_[h / group_size_];
    for (size_t head = 0; head < queue.size(); ++head) {
      const uint32_t u = queue[head];
      uint32_t d;
      const uint32_t* nb = proj_[h].row(u, d);
      for (int pass = 0; pass < 2; ++pass) {
        for (uint32_t j = 0; j < d; ++j) {
          if (!seen[nb[j]]) {
            seen[nb[j]] = 1;
            queue.push_back(nb[j]);
          }
        }
        nb = b.nbrs(u);
        d = b.degree(u);
      }
    }
    return static_cast<int64_t>(queue.size());
  }

  int64_t last_attached() const { return last_attached_; }
  int num_graphs() const { return num_graphs_; }
  int group_size() const { return group_size_; }
  int dim() const { return dim_; }
  int degree() const { return degree_; }
  int base_degree() const { return base_degree_; }
  int build_ef() const { return build_ef_; }
  bool proj_prune() const { return proj_prune_; }
  bool proj_reverse() const { return proj_reverse_; }
  bool half_keys() const { return half_; }

 private:
  // key-key edges: L2 occlusion (keys are in distribution with each other), filled to the degree
  static PruneRule base_rule() { return {true, true}; }

  void check_graph(int h) const {
    if (h < 0 || h >= num_graphs_) throw std::out_of_range("GraphIndex: graph index out of range");
  }

  // Validates a [Hkv, N, D] float32 buffer (any head/row stride, contiguous rows).
  std::vector<KeySet> key_sets(const py::array& keys) const {
    if (keys.dtype().kind() != 'f' || keys.itemsize() != 4) throw std::invalid_argument("GraphIndex requires float32 keys");
    if (keys.ndim() != 3 || keys.shape(0) != static_cast<py::ssize_t>(base_.size()) || keys.shape(2) != dim_)
      throw std::invalid_argument("GraphIndex requires keys of shape [Hkv=" + std::to_string(base_.size()) +
                                  ", N, D=" + std::to_string(dim_) + "]");
    const auto f = static_cast<py::ssize_t>(sizeof(float));
    if (keys.strides(2) != f || keys.strides(1) % f || keys.strides(0) % f)
      throw std::invalid_argument("GraphIndex requires keys with contiguous rows (last stride 4 bytes)");
    std::vector<KeySet> sets(keys.shape(0));
    const float* base = static_cast<const float*>(keys.data());
    for (py::ssize_t i = 0; i < keys.shape(0); ++i) {
      sets[i].base = base + i * (keys.strides(0) / f);
      sets[i].n = keys.shape(1);
      sets[i].stride = keys.strides(1) / f;
      sets[i].dim = dim_;
    }
    return sets;
  }

  // Adds the keys most often a training query's top-1 (where decode queries are likely to
  // land) to the entries, up to num_entry in all.
  static void add_pivot_entries(std::vector<uint32_t>& entries, const int32_t* lists, int64_t nq, int64_t kq, int64_t n,
                                int num_entry) {
    if (nq == 0 || n == 0 || static_cast<int>(entries.size()) >= num_entry) return;
    std::vector<int32_t> hits(n, 0);
    for (int64_t i = 0; i < nq; ++i) {
      const int32_t top = lists[i * kq];
      if (top >= 0 && top < n) ++hits[top];
    }
    std::vector<std::pair<int32_t, uint32_t>> counts;
    for (int64_t i = 0; i < n; ++i) {
      if (hits[i] > 0) counts.push_back({hits[i], static_cast<uint32_t>(i)});
    }
    std::sort(counts.begin(), counts.end(),
              [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
    for (const auto& c : counts) {
      if (static_cast<int>(entries.size()) >= num_entry) break;
      if (std::find(entries.begin(), entries.end(), c.second) == entries.end()) entries.push_back(c.second);
    }
  }

  // Converts rows [start, N) of a key set into the fp16 copy (rows before start are kept).
  void sync_half(int kv, const KeySet& ks, uint32_t start) {
    if (!half_) return;
    auto& hk = half_keys_[kv];
    hk.resize(static_cast<size_t>(ks.n) * dim_);
    for (int64_t i = start; i < ks.n; ++i) to_f16(ks.row(static_cast<uint32_t>(i)), hk.data() + i * dim_, dim_);
  }

  void repair_all(const std::vector<KeySet>& sets, int num_threads) {
    const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
    const int num_kv = static_cast<int>(base_.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int kv = 0; kv < num_kv; ++kv) {
      repair_reachability(base_[kv], base_entries_[kv], sets[kv], build_ef_, scratch_[omp_get_thread_num()]);
    }
    dirty_ = false;
  }

  void ensure_scratch() {
    const size_t want = static_cast<size_t>(std::max(omp_get_max_threads(), omp_get_num_procs()));
    if (scratch_.size() < want) scratch_.resize(want);
  }

  int num_graphs_, group_size_, dim_, degree_, base_degree_, build_ef_;
  bool proj_prune_, proj_reverse_, half_;
  std::vector<HugeArray<uint16_t>> half_keys_;  // [Hkv][N * D] fp16 copy scored by decode searches
  std::vector<Adjacency> base_;                    // [Hkv] key-key layer
  std::vector<std::vector<uint32_t>> base_entries_;  // [Hkv]
  std::vector<Csr> proj_;                          // [H] projection edges
  std::vector<std::vector<uint32_t>> entries_;     // [H]
  std::vector<Scratch> scratch_;
  int64_t last_attached_ = 0;
  bool dirty_ = false;  // keys were dropped since the last reachability repair
};

// Row-wise top-k of a score matrix [m, n] (largest first) -> int32 [m, k]: the selection half
// of the exact kNN (the scores come from one BLAS matmul in torch). A row keeps a min-heap of its
// k best; 16 scores at a time are compared with the heap's minimum, so most are skipped.
py::array_t<int32_t> topk_rows(const py::array_t<float, py::array::c_style | py::array::forcecast>& scores, int k,
                               int num_threads) {
  if (scores.ndim() != 2) throw std::invalid_argument("topk_rows requires scores of shape [m, n]");
  const int64_t m = scores.shape(0), n = scores.shape(1);
  if (k <= 0 || k > n)
    throw std::invalid_argument("topk_rows requires 0 < k <= n=" + std::to_string(n) + " (got " + std::to_string(k) + ")");
  py::array_t<int32_t> out({m, static_cast<int64_t>(k)});
  const float* sp = scores.data();
  int32_t* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
    {
      std::vector<Cand> heap(k);
      auto worse = [](const Cand& a, const Cand& b) { return better(a, b); };  // min-heap on "better"
#pragma omp for schedule(static)
      for (int64_t r = 0; r < m; ++r) {
        const float* row = sp + r * n;
        for (int j = 0; j < k; ++j) heap[j] = {row[j], static_cast<uint32_t>(j)};
        std::make_heap(heap.begin(), heap.end(), worse);
        auto push = [&](int64_t j) {
          const Cand c{row[j], static_cast<uint32_t>(j)};
          if (better(c, heap.front())) {
            std::pop_heap(heap.begin(), heap.end(), worse);
            heap.back() = c;
            std::push_heap(heap.begin(), heap.end(), worse);
          }
        };
        int64_t j = k;
#if defined(__AVX512F__)
        for (; j + 16 <= n; j += 16) {
          const __m512 thr = _mm512_set1_ps(heap.front().score);
          __mmask16 mask = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), thr, _CMP_GE_OQ);
          while (mask) {
            const int bit = __builtin_ctz(mask);
            push(j + bit);
            mask &= mask - 1;
          }
        }
#endif
        for (; j < n; ++j) push(j);
        std::sort_heap(heap.begin(), heap.end(), worse);  // best first
        for (int i = 0; i < k; ++i) op[r * k + i] = static_cast<int32_t>(heap[i].id);
      }
    }
  }
  return out;
}

// Advises transparent huge pages for the 2 MB-aligned interior of [ptr, ptr + nbytes) (Linux;
// elsewhere, or where THP is off, nothing happens). Meant for large buffers not yet touched.
bool advise_hugepages(uintptr_t ptr, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t lo = (ptr + kHuge - 1) & ~(kHuge - 1), hi = (ptr + nbytes) & ~(kHuge - 1);
  if (hi <= lo) return false;
  return madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#else
  (void)ptr;
  (void)nbytes;
  return false;
#endif
}

}  // namespace

void register_index(py::module_& m) {
  using namespace pybind11::literals;
  m.def("advise_hugepages", &advise_hugepages, "ptr"_a, "nbytes"_a,
        "Advise transparent huge pages for a large, untouched host buffer (Linux); returns whether it applied.");
  m.def("topk_rows", &topk_rows, "scores"_a, "k"_a, "num_threads"_a = 0,
        "Row-wise top-k of scores [m, n] float32 -> int32 ids [m, k], largest first.");
  py::class_<GraphIndex>(m, "GraphIndex", R"doc(
Attention-aware graph index (RoarGraph-style) over the offloaded keys of one sequence.

One graph per query head (H = num_graphs); query head h searches key set h // group_size.
Keys are passed to every call as a float32 array [Hkv, N, D] (rows contiguous, any head/row
stride) and are never copied.
)doc")
      .def(py::init<int, int, int, int, int, int, bool, bool, bool>(), "num_graphs"_a, "group_size"_a, "dim"_a,
           "degree"_a = 128, "base_degree"_a = 8, "build_ef"_a = 64, "proj_prune"_a = false, "proj_reverse"_a = false,
           "half_keys"_a = true)
      .def("build", &GraphIndex::build, "keys"_a, "knn"_a, "num_entry"_a = 4, "num_threads"_a = 0,
           "Build every graph from keys [Hkv, N, D] and the training queries' exact kNN lists knn [H, Nq, Kq] int32.")
      .def("add", &GraphIndex::add, "keys"_a, "num_threads"_a = 0,
           "Insert rows [n_keys, N) of keys [Hkv, N, D] into every graph.")
      .def("search", &GraphIndex::search, "keys"_a, "queries"_a, "k"_a, "ef"_a, "num_threads"_a = 0,
           "Beam search: queries [H, S, D] -> (ids [H, S, k] int64 best first, -1 padded; scanned [H, S] int64).")
      .def("truncate", &GraphIndex::truncate, "n_keys"_a, "Drop keys [n_keys, N) and their edges.")
      .def("nbytes", &GraphIndex::nbytes)
      .def("degrees", &GraphIndex::degrees)
      .def("neighbors", &GraphIndex::neighbors, "graph"_a, "node"_a)
      .def("entries", &GraphIndex::entries, "graph"_a)
      .def("reachable", &GraphIndex::reachable, "graph"_a)
      .def_property_readonly("n_keys", &GraphIndex::n_keys)
      .def_property_readonly("last_attached", &GraphIndex::last_attached)
      .def_property_readonly("num_graphs", &GraphIndex::num_graphs)
      .def_property_readonly("group_size", &GraphIndex::group_size)
      .def_property_readonly("dim", &GraphIndex::dim)
      .def_property_readonly("degree", &GraphIndex::degree)
      .def_property_readonly("base_degree", &GraphIndex::base_degree)
      .def_property_readonly("build_ef", &GraphIndex::build_ef)
      .def_property_readonly("proj_prune", &GraphIndex::proj_prune)
      .def_property_readonly("proj_reverse", &GraphIndex::proj_reverse)
      .def_property_readonly("half_keys", &GraphIndex::half_keys);
}

}  // namespace longctx
