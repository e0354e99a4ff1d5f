// Helpers shared by the kernel headers: work sharing between threads, bf16 conversion, 16-lane loads and stores,
// exp, softmax, dot.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef uint16_t bf16_t;

// An allocator of whole, 64-byte aligned cache lines, for buffers that tile loads read (a 64-byte row that malloc's
// 16-byte alignment splits over two lines costs a second line fill).
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64 + 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <class T>
using aligned_vector = std::vector<T, CacheLineAllocator<T>>;

// Whether a one-row GEMM on block-quantized weights should prefetch the next column tile's codes while it multiplies
// this one. Measured both ways: on the Intel Xeon with AMX it lifts one-row FP8 and GPTQ decode by 35-55 % (the
// hardware prefetchers stop at page boundaries); on the AMD EPYC Zen 4 it costs 5-10 % of one-row Q4_1 and FP8
// decode, whose own prefetchers already stream the codes.
inline bool prefetch_next_quant_tile() {
  static const bool on = !__builtin_cpu_is("amd");
  return on;
}

// Work sharing for loops over independent tasks: each thread of the team owns a contiguous share of the tasks (the
// split of OpenMP's static schedule) and runs it in order, so a kernel can prefetch the data of its own next task;
// a thread whose share is done then takes the others' remaining tasks, one at a time from the end of their shares.
// On idle cores that is a static schedule; where a server's HTTP threads preempt a compute thread, the others finish
// its share instead of waiting for it at the end of the loop.
class TaskShares {
 public:
  TaskShares(int64_t tasks, int parts) : parts_(parts > 0 ? parts : 1), shares_(new Share[parts_]) {
    const int64_t q = tasks / parts_, r = tasks % parts_;
    int64_t begin = 0;
    for (int t = 0; t < parts_; ++t) {
      const int64_t end = begin + q + (t < r ? 1 : 0);
      shares_[t].range.store(pack(begin, end), std::memory_order_relaxed);
      begin = end;
    }
  }
  ~TaskShares() { delete[] shares_; }
  TaskShares(const TaskShares&) = delete;
  TaskShares& operator=(const TaskShares&) = delete;

  // The next task for thread t (its own share first, then the others'), or -1 when none is left.
  int64_t next(int t) {
    if (t < parts_) {
      const int64_t own = claim(t, true);
      if (own >= 0) return own;
    }
    for (int i = 1; i <= parts_; ++i) {
      const int64_t stolen = claim((t + i) % parts_, false);
      if (stolen >= 0) return stolen;
    }
    return -1;
  }

 private:
  // [begin, end) in one word, so the owner (from the front) and the others (from the back) claim with one CAS.
  struct alignas(64) Share {
    std::atomic<uint64_t> range;
  };
  static uint64_t pack(int64_t begin, int64_t end) {
    return static_cast<uint64_t>(begin) | (static_cast<uint64_t>(end) << 32);
  }
  int64_t claim(int s, bool front) {
    uint64_t cur = shares_[s].range.load(std::memory_order_relaxed);
    while (true) {
      const int64_t begin = static_cast<int64_t>(cur & 0xffffffffu), end = static_cast<int64_t>(cur >> 32);
      if (begin >= end) return -1;
      const uint64_t want = front ? pack(begin + 1, end) : pack(begin, end - 1);
      if (shares_[s].range.compare_exchange_weak(cur, want, std::memory_order_relaxed)) return front ? begin : end - 1;
    }
  }
  int parts_;
  Share* shares_;
};

// body(task, state) for every task in [0, tasks) on num_threads threads, shared out as TaskShares describes, with a
// State each thread makes before its first task and destroys after its last: set-up that the tasks of one call share
// (an AMX tile configuration).
template <class State, class Body>
inline void share_tasks_with(int64_t tasks, int num_threads, const Body& body) {
  if (tasks <= 0) return;
  if (num_threads <= 1) {  // e.g. a kernel run per task inside another's parallel loop: no team, no shares
    State state;
    for (int64_t task = 0; task < tasks; ++task) body(task, state);
    return;
  }
  if (num_threads > tasks) num_threads = static_cast<int>(tasks);
  TaskShares shares(tasks, num_threads);
#pragma omp parallel num_threads(num_threads)
  {
    State state;
    const int t = omp_get_thread_num();
    for (int64_t task; (task = shares.next(t)) >= 0;) body(task, state);
  }
}

struct NoState {};

// body(task) for every task in [0, tasks) on num_threads threads, shared out as TaskShares describes.
template <class Body>
inline void share_tasks(int64_t tasks, int num_threads, const Body& body) {
  share_tasks_with<NoState>(tasks, num_threads, [&](int64_t task, NoState&) { body(task); });
}

// Rows per block of a GEMM's (block of rows, group of column tiles) tasks: max_rows, halved (down to min_rows) while
// the m rows and `groups` column groups make fewer than 4 tasks a thread (an uneven split, 5 + 4 tasks on two threads,
// wastes a tenth of the step).
inline int64_t gemm_block_rows(int64_t m, int64_t groups, int64_t max_rows, int64_t min_rows, int num_threads) {
  int64_t block_m = max_rows;
  while (block_m > min_rows && ((m + block_m - 1) / block_m) * groups < 4 * num_threads) block_m /= 2;
  return block_m;
}

// Rows per block for the GEMMs that decode their weights' column tiles once per task (AQLM, per-channel FP8): up to
// 1024, down to 64. Decoding a tile costs about 1/64 of its multiply-adds over 256 rows; on Zen 4, 2048-row products
// ran at 0.93-0.94x the bf16 GEMM's with 256-row blocks against 0.97-0.98x with 1024.
inline int64_t decoded_chunk_rows(int64_t m, int64_t col_groups, int num_threads) {
  return gemm_block_rows(m, col_groups, 1024, 64, num_threads);
}

// The tasks of a GEMM on column tiles: (block of rows, group of group_tiles tiles), row-block major, so the threads
// sweep the weights together over one block of rows at a time; blocks of gemm_block_rows(max_rows, min_rows).
// body(r0, rows, tile0, group_tiles_here, next_group): next_group whether a group follows this one.
template <class Body>
inline void share_gemm_tasks(int64_t m, int64_t tiles, int64_t group_tiles, int64_t max_rows, int64_t min_rows,
                             int num_threads, const Body& body) {
  const int64_t groups = (tiles + group_tiles - 1) / group_tiles;
  const int64_t block_m = gemm_block_rows(m, groups, max_rows, min_rows, num_threads);
  const int64_t mblocks = (m + block_m - 1) / block_m;
  share_tasks(mblocks * groups, num_threads, [&](int64_t task) {
    const int64_t mb = task / groups, g = task % groups;
    const int64_t r0 = mb * block_m, rows = (m - r0) < block_m ? (m - r0) : block_m;
    const int64_t tile0 = g * group_tiles, nt = (tiles - tile0) < group_tiles ? (tiles - tile0) : group_tiles;
    body(r0, rows, tile0, nt, g + 1 < groups);
  });
}

// Calls pass(std::integral_constant<int, R>{}, r) for the last `left` rows (R == left) of a task, 0 < left < MR.
template <int R, int MR, class Pass>
inline void remainder_pass(int64_t left, int64_t r, const Pass& pass) {
  if constexpr (R < MR) {
    if (left == R) pass(std::integral_constant<int, R>{}, r);
    else remainder_pass<R + 1, MR>(left, r, pass);
  }
}

// A GEMM task's rows in micro-kernel passes: pass(mr, r, ahead_slice, slice_bytes) for rows r .. r + mr, with mr a
// std::integral_constant (MR, then the remainder). The group_bytes at `ahead` (the weights this thread reads next,
// or null) are split into equal whole-line slices, one per pass, which that pass prefetches as it computes.
template <int MR, class Pass>
inline void row_passes(int64_t rows, const void* ahead, int64_t group_bytes, const Pass& pass) {
  const int64_t passes = (rows + MR - 1) / MR, slice = ((group_bytes / passes) + 63) / 64 * 64;
  auto run = [&](auto mr, int64_t r) {
    const int64_t i = r / MR, left = group_bytes - i * slice;
    const char* at = ahead ? static_cast<const char*>(ahead) + i * slice : nullptr;
    pass(mr, r, at, ahead ? (left < slice ? (left > 0 ? left : 0) : slice) : int64_t{0});
  };
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) run(std::integral_constant<int, MR>{}, r);
  remainder_pass<1, MR>(rows - r, r, run);
}

inline float bf16_to_f32(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16_t f32_to_bf16(float f) {  // round to nearest even, like torch
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16_t>(u >> 16);
}

template <typename T> inline float load(const T* p, int64_t i);
template <> inline float load<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float load<bf16_t>(const bf16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
template <typename T> inline void store(T* p, int64_t i, float v);
template <> inline void store<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> inline void store<bf16_t>(bf16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
// The lanes of the 16-column tile at col that an n-column output has.
inline __mmask16 tile_columns(int64_t n, int64_t col) {
  const int64_t valid = n - col < 16 ? n - col : 16;
  return static_cast<__mmask16>((1u << valid) - 1u);
}
inline __m512 load16(const bf16_t* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// The lanes of mask (a tile's columns) as float32, the others zero: nothing past them is read.
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const bf16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
#endif

#if defined(__AVX512F__)
// v rounded to the nearest bf16 (ties to even, NaN kept quiet), as the float32 holding it: the same rounding as
// f32_to_bf16, without relying on AVX512-BF16.
inline __m512i bf16_bits_hi(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
  return _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(bf16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits_hi(v), 16)));
}
#endif

#if defined(__AVX512F__)
// exp(x) for 16 lanes: 2^(x log2 e) split into an integer power (applied exactly by scalef) and a degree-6
// polynomial on [-0.5, 0.5] (relative error ~1e-7, float32's own). libm's scalar expf dominated the kernel.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // below this expf is 0 anyway
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147181f));  // f ln2, |.| <= 0.35
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

// Attention logit soft-capping (Gemma 2), in place: s = cap * tanh(s / cap) over s[0..n); off when cap <= 0.
// tanh(x) = 1 - 2 / (exp(2x) + 1), through exp. Kept out of line: inlined into the decode loops, it changed their
// code enough that the AMX GEMMs that follow them faulted (SIGILL at a tile load) on this machine's VMs.
__attribute__((noinline)) void soft_cap_scores(float* s, int64_t n, float cap) {
  if (cap <= 0.f) return;
  const float two_over_cap = 2.f / cap;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 k = _mm512_set1_ps(two_over_cap), one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
  const __m512 capv = _mm512_set1_ps(cap), hi = _mm512_set1_ps(80.f);  // tanh is 1.0f well before exp overflows
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_min_ps(_mm512_mul_ps(_mm512_loadu_ps(s + i), k), hi));
    _mm512_storeu_ps(s + i, _mm512_mul_ps(capv, _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(e, one)))));
  }
#endif
  for (; i < n; ++i) s[i] = cap * (1.f - 2.f / (std::exp(std::fmin(s[i] * two_over_cap, 80.f)) + 1.f));
}

// In-place softmax of s[0..n); float32.
// stats: null to normalise in place; otherwise the exponentials are left unnormalised and stats receives the largest
// score and their sum (for results merged over several token ranges).
inline void softmax(float* s, int64_t n, float* stats = nullptr) {
  float m = -INFINITY;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
  m = _mm512_reduce_max_ps(mv);
#endif
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  float sum = 0.f;
  j = 0;
#if defined(__AVX512F__)
  __m512 sv = _mm512_setzero_ps();
  const __m512 mm = _mm512_set1_ps(m);
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mm));
    _mm512_storeu_ps(s + j, e);
    sv = _mm512_add_ps(sv, e);
  }
  sum = _mm512_reduce_add_ps(sv);
#endif
  for (; j < n; ++j) { s[j] = std::exp(s[j] - m); sum += s[j]; }
  if (stats != nullptr) {
    stats[0] = m;
    stats[1] = sum;
    return;
  }
  const float inv = 1.f / sum;
  for (j = 0; j < n; ++j) s[j] *= inv;
}

// dot(q, k) over d elements; q is float32, k in the cache dtype.
template <typename T> inline float dot(const float* q, const T* k, int64_t d) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < d; ++i) s += q[i] * load(k, i);
  return s;
}

// acc += w * v over d elements.
template <typename T> inline void axpy(float* acc, float w, const T* v, int64_t d) {
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 wv = _mm512_set1_ps(w);
  for (; i + 16 <= d; i += 16) _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(wv, load16(v + i), _mm512_loadu_ps(acc + i)));
#endif
  for (; i < d; ++i) acc[i] += w * load(v, i);
}

}  // namespace
