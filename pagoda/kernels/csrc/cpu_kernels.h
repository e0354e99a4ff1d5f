// Kernel templates shared by pagoda's native CPU library (cpu_kernels.cpp: the per-op C API; cpu_decode.cpp: the
// fused decode step). Internal linkage: each translation unit instantiates what it uses.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef uint16_t bf16_t;

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
inline __m512 load16(const bf16_t* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

#if defined(__AVX512F__)
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(bf16_t* p, __m512 v) {
  // Round to nearest even (as f32_to_bf16), without relying on AVX512-BF16.
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
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

// In-place softmax of s[0..n); float32.
inline void softmax(float* s, int64_t n) {
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

// One sequence of a decode batch: every query head attends to the sequence's cached tokens, read in place from
// the paged cache through the block table. A token's keys (and values) for all kv heads are one contiguous row,
// so the sequence is read as a few long runs with the next rows prefetched: the kernel is bound by how fast the
// cache streams in, and per-head passes over the same rows left the prefetcher idle.
template <typename T>
void decode_one(T* out, const T* q, const T* k_cache, const T* v_cache, const int32_t* blocks, int64_t seq_len,
                int64_t num_heads, int64_t num_kv_heads, int64_t head_size, int64_t block_size, int64_t block_stride,
                int64_t token_stride, float scale, int64_t window, std::vector<float>& scratch) {
  const int64_t start = (window > 0 && seq_len > window) ? seq_len - window : 0;
  const int64_t n = seq_len - start;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row_bytes = num_kv_heads * head_size * static_cast<int64_t>(sizeof(T));
  constexpr int64_t kAhead = 4;  // tokens prefetched ahead
  scratch.resize(static_cast<size_t>(num_heads * (n + 2 * head_size)));
  float* scores = scratch.data();            // [heads, n]
  float* qf = scores + num_heads * n;        // [heads, head_size], pre-scaled
  float* acc = qf + num_heads * head_size;   // [heads, head_size]
  for (int64_t i = 0; i < num_heads * head_size; ++i) qf[i] = load(q, i) * scale;
  auto row = [&](const T* cache, int64_t t) {
    return cache + blocks[t / block_size] * block_stride + (t % block_size) * token_stride;
  };
  auto prefetch = [&](const T* cache, int64_t t) {
    if (t >= seq_len) return;
    const char* p = reinterpret_cast<const char*>(row(cache, t));
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(p + b);
  };
  for (int64_t t = start; t < start + kAhead; ++t) prefetch(k_cache, t);
  for (int64_t t = start; t < seq_len; ++t) {
    prefetch(k_cache, t + kAhead);
    const T* k = row(k_cache, t);
    for (int64_t h = 0; h < num_heads; ++h)
      scores[h * n + (t - start)] = dot(qf + h * head_size, k + (h / group) * head_size, head_size);
  }
  for (int64_t h = 0; h < num_heads; ++h) softmax(scores + h * n, n);
  std::memset(acc, 0, sizeof(float) * num_heads * head_size);
  for (int64_t t = start; t < start + kAhead; ++t) prefetch(v_cache, t);
  for (int64_t t = start; t < seq_len; ++t) {
    prefetch(v_cache, t + kAhead);
    const T* v = row(v_cache, t);
    for (int64_t h = 0; h < num_heads; ++h)
      axpy(acc + h * head_size, scores[h * n + (t - start)], v + (h / group) * head_size, head_size);
  }
  for (int64_t i = 0; i < num_heads * head_size; ++i) store(out, i, acc[i]);
}


#if defined(__AVX512F__)
// The same computation for head_size = 16 * NC and groups of G query heads per kv head, with a kv head's query
// rows and output accumulators held in registers: each cached row of a kv head is loaded (and widened) once for
// the whole group, and nothing round-trips through memory per token. Rows are walked one kv head at a time, so
// the next rows of that head are prefetched.
template <typename T, int NC, int G>
void decode_one_fast(T* out, const T* q, const T* k_cache, const T* v_cache, const int32_t* blocks, int64_t seq_len,
                     int64_t num_kv_heads, int64_t block_size, int64_t block_stride, int64_t token_stride,
                     float scale, int64_t window, std::vector<float>& scratch) {
  constexpr int64_t D = 16 * NC;
  constexpr int64_t kAhead = 6;
  const int64_t start = (window > 0 && seq_len > window) ? seq_len - window : 0;
  const int64_t n = seq_len - start;
  scratch.resize(static_cast<size_t>(G * n));
  float* scores = scratch.data();  // [G, n], reused per kv head
  auto at = [&](const T* cache, int64_t t, int64_t kvh) {
    return cache + blocks[t / block_size] * block_stride + (t % block_size) * token_stride + kvh * D;
  };
  auto prefetch = [&](const T* cache, int64_t t, int64_t kvh) {
    if (t >= seq_len) return;
    const char* p = reinterpret_cast<const char*>(at(cache, t, kvh));
    for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
  };
  for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
    __m512 qv[G][NC];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < NC; ++c)
        qv[g][c] = _mm512_mul_ps(load16(q + (kvh * G + g) * D + 16 * c), _mm512_set1_ps(scale));
    for (int64_t t = start; t < seq_len; ++t) {
      prefetch(k_cache, t + kAhead, kvh);
      const T* k = at(k_cache, t, kvh);
      __m512 kv[NC];
      for (int c = 0; c < NC; ++c) kv[c] = load16(k + 16 * c);
      for (int g = 0; g < G; ++g) {
        __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
        for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(qv[g][c], kv[c], a);
        scores[g * n + (t - start)] = _mm512_reduce_add_ps(a);
      }
    }
    for (int g = 0; g < G; ++g) softmax(scores + g * n, n);
    __m512 acc[G][NC];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t t = start; t < seq_len; ++t) {
      prefetch(v_cache, t + kAhead, kvh);
      const T* v = at(v_cache, t, kvh);
      __m512 vv[NC];
      for (int c = 0; c < NC; ++c) vv[c] = load16(v + 16 * c);
      for (int g = 0; g < G; ++g) {
        const __m512 w = _mm512_set1_ps(scores[g * n + (t - start)]);
        for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_fmadd_ps(w, vv[c], acc[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < NC; ++c) store16(out + (kvh * G + g) * D + 16 * c, acc[g][c]);
  }
}

// The fast variant for this shape, or null: head sizes 64 and 128, up to 8 query heads per kv head.
template <typename T>
using DecodeFn = void (*)(T*, const T*, const T*, const T*, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                          int64_t, float, int64_t, std::vector<float>&);
template <typename T, int NC>
DecodeFn<T> pick_group(int64_t group) {
  switch (group) {
    case 1: return decode_one_fast<T, NC, 1>;
    case 2: return decode_one_fast<T, NC, 2>;
    case 3: return decode_one_fast<T, NC, 3>;
    case 4: return decode_one_fast<T, NC, 4>;
    case 5: return decode_one_fast<T, NC, 5>;
    case 6: return decode_one_fast<T, NC, 6>;
    case 7: return decode_one_fast<T, NC, 7>;
    case 8: return decode_one_fast<T, NC, 8>;
    default: return nullptr;
  }
}
template <typename T>
DecodeFn<T> pick_fast(int64_t head_size, int64_t group) {
  if (head_size == 64) return pick_group<T, 4>(group);
  if (head_size == 128) return pick_group<T, 8>(group);
  return nullptr;
}
#endif

template <typename T>
void decode_attention(void* out, const void* q, const void* k_cache, const void* v_cache, const int32_t* block_table,
                      int64_t table_stride, const int32_t* seq_lens, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_size, int64_t block_size, int64_t block_stride,
                      int64_t token_stride, float scale, int64_t window, int num_threads, int64_t q_stride = -1) {
  if (q_stride < 0) q_stride = num_heads * head_size;  // rows of q: contiguous unless a fused QKV row is given
#if defined(__AVX512F__)
  const DecodeFn<T> fast = pick_fast<T>(head_size, num_heads / num_kv_heads);
#endif
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < num_seqs; ++s) {
      T* o = static_cast<T*>(out) + s * num_heads * head_size;
      const T* qs = static_cast<const T*>(q) + s * q_stride;
#if defined(__AVX512F__)
      if (fast) {
        fast(o, qs, static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), block_table + s * table_stride,
             seq_lens[s], num_kv_heads, block_size, block_stride, token_stride, scale, window, scratch);
        continue;
      }
#endif
      decode_one<T>(o, qs, static_cast<const T*>(k_cache), static_cast<const T*>(v_cache),
                    block_table + s * table_stride, seq_lens[s], num_heads, num_kv_heads, head_size, block_size,
                    block_stride, token_stride, scale, window, scratch);
    }
  }
}


// ---- Elementwise layers ------------------------------------------------------------------------------------------
// torch's bf16 CPU kernels for these run at a few hundred million elements per second; at prefill sizes they cost
// more than the attention. Each is one pass, float32 inside, one rounding on output.


// The value as the reference implementation holds it between two bf16 operations (identity for float32).
template <typename T> inline float load_rounded(float v) { return v; }
template <> inline float load_rounded<bf16_t>(float v) { return bf16_to_f32(f32_to_bf16(v)); }
#if defined(__AVX512F__)
template <typename T> inline __m512 round_like(__m512 v) { return v; }
template <> inline __m512 round_like<bf16_t>(__m512 v) {
  alignas(64) bf16_t tmp[16];
  store16(tmp, v);
  return load16(tmp);
}
#endif

// residual_out = x + residual (rounded to T, as torch's add); out = residual_out * rsqrt(mean(sq) + eps) * weight,
// with the normalised value rounded to T before the weight multiplies it, where the reference implementation
// (transformers' LlamaRMSNorm: weight * hidden.to(input_dtype)) rounds it: bf16 models are tuned to those
// rounding points, and greedy choices at near-ties followed them. Without a residual: out = rms_norm(x).
template <typename T>
void rms_norm(T* out, T* residual_out, const T* x, const T* residual, const T* weight, int64_t rows, int64_t hidden,
              float eps, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> buf(hidden);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * hidden;
      float sq = 0.f;
      for (int64_t i = 0; i < hidden; ++i) {
        float v = load(xr, i);
        if (residual) {
          v += load(residual + r * hidden, i);
          store(residual_out + r * hidden, i, v);
          v = load(residual_out + r * hidden, i);  // the rounded sum, which the next layer also sees
        }
        buf[i] = v;
        sq += v * v;
      }
      const float inv = 1.f / std::sqrt(sq / static_cast<float>(hidden) + eps);
      T* o = out + r * hidden;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 iv = _mm512_set1_ps(inv);
      for (; i + 16 <= hidden; i += 16)
        store16(o + i, _mm512_mul_ps(round_like<T>(_mm512_mul_ps(_mm512_loadu_ps(buf.data() + i), iv)),
                                     load16(weight + i)));
#endif
      for (; i < hidden; ++i) store(o, i, load_rounded<T>(buf[i] * inv) * load(weight, i));
    }
  }
}

// out [rows, inter] = silu(x[:, :inter]) * x[:, inter:]
template <typename T>
void silu_and_mul(T* out, const T* x, int64_t rows, int64_t inter, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = x + r * 2 * inter;
    const T* u = g + inter;
    T* o = out + r * inter;
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= inter; i += 16) {
      const __m512 gv = load16(g + i);
      const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
      store16(o + i, _mm512_mul_ps(_mm512_mul_ps(gv, sig), load16(u + i)));
    }
#endif
    for (; i < inter; ++i) {
      const float gv = load(g, i);
      store(o, i, gv / (1.f + std::exp(-gv)) * load(u, i));
    }
  }
}

// Rotate-half rotary embedding in place on x [tokens, heads, head_size] (rows row_stride apart), first rot_dim
// dims of each head: x1' = x1 cos1 + x2 sin1, x2' = x2 cos2 + x1 sin2, where sin carries rotate-half's sign.
// cos/sin are float32 rows: a rotation by bf16-rounded angles' sines was a measurable share of a bf16 model's error.
template <typename T>
void rope(T* x, int64_t row_stride, int64_t tokens, int64_t heads, int64_t head_size, const float* cos, const float* sin,
          int64_t rot_dim, int num_threads) {
  const int64_t half = rot_dim / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cos + t * rot_dim;
    const float* s = sin + t * rot_dim;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + t * row_stride + h * head_size;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= half; i += 16) {
        const __m512 a = load16(v + i), b = load16(v + half + i);
        store16(v + i, _mm512_fmadd_ps(a, load16(c + i), _mm512_mul_ps(b, load16(s + i))));
        store16(v + half + i, _mm512_fmadd_ps(b, load16(c + half + i), _mm512_mul_ps(a, load16(s + half + i))));
      }
#endif
      for (; i < half; ++i) {
        const float a = load(v, i), b = load(v, half + i);
        store(v, i, a * load(c, i) + b * load(s, i));
        store(v, half + i, b * load(c, half + i) + a * load(s, half + i));
      }
    }
  }
}

#if defined(__AVX512BF16__)
// ---- bf16 GEMM on packed weights ---------------------------------------------------------------------------------
// Weights are packed once after loading into tiles of 16 output columns in the pair-interleaved order vdpbf16ps
// consumes: packed[tile][k / 2][column][k % 2], zero-padded to whole tiles and an even K. One instruction then
// multiplies a broadcast pair x[m, k:k+2] by a tile's 16 columns and accumulates 16 float32 outputs.
constexpr int64_t kTile = 16;
constexpr int64_t kBlockM = 128;  // rows of x kept hot in L2 while a group of tiles streams past them
constexpr int kNT = 4;            // tiles per micro-kernel (64 output columns)
constexpr int kMR = 6;            // rows per micro-kernel: 6 x 4 accumulators + 4 weight vectors fit 32 registers

inline int64_t packed_k2(int64_t k) { return (k + 1) / 2; }

// ``ahead`` / ``ahead_bytes``: a slice of the weights this thread reads next, fetched into L2 while this pass
// computes. The hardware prefetchers stop at page boundaries, so a weight matrix larger than the caches (an LM
// head) otherwise arrives one miss at a time; spreading the prefetches over all the passes of a tile group keeps
// the number in flight small enough not to be dropped.
template <int MR, int NT, bool F32Out>
inline void micro_kernel(void* y, int64_t ldy, const bf16_t* x, int64_t k, const bf16_t* wp, int64_t tile0,
                         int64_t n, const float* bias, const char* ahead, int64_t ahead_bytes) {
  const int64_t k2 = packed_k2(k), full = k / 2;
  const int64_t tile_elems = k2 * kTile * 2;
  const int64_t ahead_lines = ahead_bytes / 64, lines_per_step = (ahead_lines + k2 - 1) / k2;
  __m512 acc[MR][NT];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  const bf16_t* w0 = wp + tile0 * tile_elems;
  for (int64_t p = 0; p < k2; ++p) {
    __m512bh b[NT];
    for (int t = 0; t < NT; ++t)
      b[t] = (__m512bh)_mm512_loadu_si512(w0 + t * tile_elems + p * kTile * 2);
    for (int64_t l = p * lines_per_step; l < (p + 1) * lines_per_step && l < ahead_lines; ++l)
      _mm_prefetch(ahead + l * 64, _MM_HINT_T1);
    for (int r = 0; r < MR; ++r) {
      uint32_t pair;
      if (p < full) {
        std::memcpy(&pair, x + r * k + 2 * p, 4);
      } else {
        pair = x[r * k + 2 * p];  // odd K: the last element pairs with the packed zero
      }
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], a, b[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    const int64_t col = (tile0 + t) * kTile;
    const int64_t valid = n - col < kTile ? n - col : kTile;
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      const __m512 v = _mm512_add_ps(acc[r][t], bv);
      if constexpr (F32Out) {
        _mm512_mask_storeu_ps(static_cast<float*>(y) + r * ldy + col, mask, v);
      } else {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16(static_cast<bf16_t*>(y) + r * ldy + col, mask, h);
      }
    }
  }
}

template <int NT, bool F32Out>
inline void rows_kernel(int64_t rows, void* y, int64_t ldy, const bf16_t* x, int64_t k, const bf16_t* wp,
                        int64_t tile0, int64_t n, const float* bias, const bf16_t* ahead) {
  const int64_t esz = F32Out ? 4 : 2;
  const int64_t passes = (rows + kMR - 1) / kMR;
  const int64_t group_bytes = NT * packed_k2(k) * kTile * 2 * 2;
  const int64_t slice = ((group_bytes / passes) + 63) / 64 * 64;
  int64_t r = 0, pass = 0;
  auto ahead_at = [&](int64_t i) { return ahead ? reinterpret_cast<const char*>(ahead) + i * slice : nullptr; };
  auto ahead_len = [&](int64_t i) {
    const int64_t left = group_bytes - i * slice;
    return ahead ? (left < slice ? (left > 0 ? left : 0) : slice) : 0;
  };
  for (; r + kMR <= rows; r += kMR, ++pass)
    micro_kernel<kMR, NT, F32Out>(static_cast<char*>(y) + r * ldy * esz, ldy, x + r * k, k, wp, tile0, n, bias,
                                  ahead_at(pass), ahead_len(pass));
  char* yr = static_cast<char*>(y) + r * ldy * esz;
  const bf16_t* xr = x + r * k;
  const char* pa = ahead_at(pass);
  const int64_t pl = ahead_len(pass);
  switch (rows - r) {
    case 1: micro_kernel<1, NT, F32Out>(yr, ldy, xr, k, wp, tile0, n, bias, pa, pl); break;
    case 2: micro_kernel<2, NT, F32Out>(yr, ldy, xr, k, wp, tile0, n, bias, pa, pl); break;
    case 3: micro_kernel<3, NT, F32Out>(yr, ldy, xr, k, wp, tile0, n, bias, pa, pl); break;
    case 4: micro_kernel<4, NT, F32Out>(yr, ldy, xr, k, wp, tile0, n, bias, pa, pl); break;
    case 5: micro_kernel<5, NT, F32Out>(yr, ldy, xr, k, wp, tile0, n, bias, pa, pl); break;
    default: break;
  }
}

template <bool F32Out>
void gemm_packed(void* y, int64_t ldy, const bf16_t* x, const bf16_t* wp, const float* bias, int64_t m, int64_t n,
                 int64_t k, int num_threads) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t groups = (tiles + kNT - 1) / kNT;
  // Row blocks of kBlockM, halved (down to 2 micro-kernels) while there are too few tasks to balance the
  // threads: a 576-wide layer has 9 tile groups, and 5 + 4 of them on two threads wastes a tenth of the step.
  int64_t block_m = kBlockM;
  while (block_m > 2 * kMR && ((m + block_m - 1) / block_m) * groups < 4 * num_threads) block_m /= 2;
  const int64_t mblocks = (m + block_m - 1) / block_m;
  const int64_t esz = F32Out ? 4 : 2;
  // Tasks are (row block, tile group), row-block major: the threads sweep the weights together over one block
  // of rows at a time.
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t task = 0; task < mblocks * groups; ++task) {
    const int64_t mb = task / groups, g = task % groups;
    const int64_t r0 = mb * block_m, rows = (m - r0) < block_m ? (m - r0) : block_m;
    const int64_t tile0 = g * kNT, nt = (tiles - tile0) < kNT ? (tiles - tile0) : kNT;
    void* yb = static_cast<char*>(y) + r0 * ldy * esz;
    const bf16_t* xb = x + r0 * k;
    // With a static schedule this thread's next task is usually the next group: prefetch its weights (a full
    // group of kNT tiles is valid memory whenever a next group exists).
    const bf16_t* ahead = g + 1 < groups ? wp + (tile0 + kNT) * packed_k2(k) * kTile * 2 : nullptr;
    switch (nt) {
      case 4: rows_kernel<4, F32Out>(rows, yb, ldy, xb, k, wp, tile0, n, bias, ahead); break;
      case 3: rows_kernel<3, F32Out>(rows, yb, ldy, xb, k, wp, tile0, n, bias, ahead); break;
      case 2: rows_kernel<2, F32Out>(rows, yb, ldy, xb, k, wp, tile0, n, bias, ahead); break;
      default: rows_kernel<1, F32Out>(rows, yb, ldy, xb, k, wp, tile0, n, bias, ahead); break;
    }
  }
}

// ---- Block-quantized weights (GGUF Q4_0 / Q4_1 / Q4_K / Q8_0) with bf16 activations ------------------------------
// w[n, k] = code[n, k] * scale[n, g] + offset[n, g] for groups g of 32 consecutive k. Codes (0..15, or -128..127)
// are exact in bf16, so the pairwise bf16 dot product of codes and activations is exact too; each group's partial
// sum is then scaled in float32: out += scale * sum(code * x) + offset * sum(x).
// Packed per (tile of 16 rows n, group): 16 pair steps of codes, then the 16 rows' scales (and offsets):
//   int4: one byte per (pair, n): low nibble k = 2p, high nibble k = 2p + 1; float32 scales and offsets
//         (Q4_K's products of scales are not exact in float16)                          -> 384 bytes
//   int8: per pair, 16 bytes of k = 2p then 16 bytes of k = 2p + 1 (signed); float16 scales, no offset
//         (Q8_0's own scale type, so the packed form is no larger than the file)       -> 544 bytes
constexpr int64_t kGroup = 32;
constexpr int kQMR = 8;

template <int Bits> struct QLayout {
  static constexpr int64_t code_bytes = Bits == 4 ? 256 : 512;
  static constexpr int64_t block_bytes = code_bytes + (Bits == 4 ? 2 * 16 * 4 : 16 * 2);
};

// The 16 (pair of codes) lanes of pair step p as bf16 pairs.
template <int Bits> inline __m512i decode_pairs(const uint8_t* codes, int64_t p, __m512i table);
template <> inline __m512i decode_pairs<4>(const uint8_t* codes, int64_t p, __m512i table) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + p * 16)));
  const __m512i pairs = _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(0xF)),
                                        _mm512_slli_epi32(_mm512_srli_epi32(d, 4), 16));
  return _mm512_permutexvar_epi16(pairs, table);  // 0..15 -> their bf16 encodings
}
template <> inline __m512i decode_pairs<8>(const uint8_t* codes, int64_t p, __m512i) {
  const __m128i* c = reinterpret_cast<const __m128i*>(codes + p * 32);
  // int8 -> float32 is exact; a float32 with at most 8 significant bits is its own bf16 in the high half.
  const __m512i lo = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c))));
  const __m512i hi = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c + 1))));
  return _mm512_or_si512(_mm512_srli_epi32(lo, 16), _mm512_and_si512(hi, _mm512_set1_epi32(0xFFFF0000)));
}

template <int Bits, int MR, bool F32Out>
inline void quant_tile(void* y, int64_t ldy, const bf16_t* x, const float* xsum, int64_t k, const uint8_t* tile,
                       int64_t col, int64_t n) {
  const int64_t groups = k / kGroup;
  __m512i table = _mm512_setzero_si512();
  if constexpr (Bits == 4) {
    alignas(64) uint16_t t[32];
    for (int i = 0; i < 32; ++i) t[i] = f32_to_bf16(static_cast<float>(i));
    table = _mm512_load_si512(t);
  }
  __m512 out[MR];
  for (int r = 0; r < MR; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* blk = tile + g * QLayout<Bits>::block_bytes;
    __m512 part[MR];
    for (int r = 0; r < MR; ++r) part[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kGroup / 2; ++p) {
      const __m512bh w = (__m512bh)decode_pairs<Bits>(blk, p, table);
      for (int r = 0; r < MR; ++r) {
        uint32_t pair;
        std::memcpy(&pair, x + r * k + g * kGroup + 2 * p, 4);
        part[r] = _mm512_dpbf16_ps(part[r], (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)), w);
      }
    }
    const uint8_t* params = blk + QLayout<Bits>::code_bytes;
    if constexpr (Bits == 4) {
      const __m512 sc = _mm512_loadu_ps(reinterpret_cast<const float*>(params));
      const __m512 of = _mm512_loadu_ps(reinterpret_cast<const float*>(params + 64));
      for (int r = 0; r < MR; ++r)
        out[r] = _mm512_fmadd_ps(of, _mm512_set1_ps(xsum[r * groups + g]), _mm512_fmadd_ps(part[r], sc, out[r]));
    } else {
      const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params)));
      for (int r = 0; r < MR; ++r) out[r] = _mm512_fmadd_ps(part[r], sc, out[r]);
    }
  }
  const int64_t valid = n - col < 16 ? n - col : 16;
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  for (int r = 0; r < MR; ++r) {
    if constexpr (F32Out) {
      _mm512_mask_storeu_ps(static_cast<float*>(y) + r * ldy + col, mask, out[r]);
    } else {
      _mm256_mask_storeu_epi16(static_cast<bf16_t*>(y) + r * ldy + col, mask, (__m256i)_mm512_cvtneps_pbh(out[r]));
    }
  }
}

template <int Bits, bool F32Out>
void quant_gemm(void* y, const bf16_t* x, const uint8_t* packed, int64_t m, int64_t n, int64_t k, int num_threads) {
  const int64_t groups = k / kGroup, tiles = (n + 15) / 16;
  const int64_t tile_bytes = groups * QLayout<Bits>::block_bytes;
  const int64_t esz = F32Out ? 4 : 2;
  std::vector<float> xsum(static_cast<size_t>(m * groups));  // sum of x per (row, group), for the offsets
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t i = 0; i < kGroup; ++i) s += bf16_to_f32(x[r * k + g * kGroup + i]);
      xsum[r * groups + g] = s;
    }
  const int64_t mblocks = (m + kBlockM - 1) / kBlockM;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t task = 0; task < mblocks * tiles; ++task) {
    const int64_t mb = task / tiles, t = task % tiles;
    const int64_t r_end = (mb + 1) * kBlockM < m ? (mb + 1) * kBlockM : m;
    const uint8_t* tile = packed + t * tile_bytes;
    int64_t r = mb * kBlockM;
    for (; r + kQMR <= r_end; r += kQMR)
      quant_tile<Bits, kQMR, F32Out>(static_cast<char*>(y) + r * n * esz, n, x + r * k, xsum.data() + r * groups,
                                     k, tile, t * 16, n);
    char* yr = static_cast<char*>(y) + r * n * esz;
    const bf16_t* xr = x + r * k;
    const float* sr = xsum.data() + r * groups;
    switch (r_end - r) {
      case 1: quant_tile<Bits, 1, F32Out>(yr, n, xr, sr, k, tile, t * 16, n); break;
      case 2: quant_tile<Bits, 2, F32Out>(yr, n, xr, sr, k, tile, t * 16, n); break;
      case 3: quant_tile<Bits, 3, F32Out>(yr, n, xr, sr, k, tile, t * 16, n); break;
      case 4: quant_tile<Bits, 4, F32Out>(yr, n, xr, sr, k, tile, t * 16, n); break;
      case 5: quant_tile<Bits, 5, F32Out>(yr, n, xr, sr, k, tile, t * 16, n); break;
      case 6: quant_tile<Bits, 6, F32Out>(yr, n, xr, sr, k, tile, t * 16, n); break;
      case 7: quant_tile<Bits, 7, F32Out>(yr, n, xr, sr, k, tile, t * 16, n); break;
      default: break;
    }
  }
}
#endif  // __AVX512BF16__

// First index of the row's maximum; NaN counts as the maximum (torch's rule).
inline int64_t argmax_f32(const float* x, int64_t n) {
#if defined(__AVX512F__)
  // Find the maximum value vectorised, then its first position (a second, short scan).
  __m512 mv = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) {  // a NaN: the first one wins
      for (int64_t k = j; k < j + 16; ++k)
        if (x[k] != x[k]) return k;
    }
    mv = _mm512_max_ps(mv, v);
  }
  float m = _mm512_reduce_max_ps(mv);
  for (int64_t k = j; k < n; ++k) {
    if (x[k] != x[k]) return k;
    if (x[k] > m) m = x[k];
  }
  for (int64_t k = 0; k < n; ++k)
    if (x[k] == m) return k;
  return 0;
#else
  int64_t best = 0;
  float best_v = x[0];
  if (best_v != best_v) return 0;
  for (int64_t i = 1; i < n; ++i) {
    if (x[i] != x[i]) return i;
    if (x[i] > best_v) { best_v = x[i]; best = i; }
  }
  return best;
#endif
}

}  // namespace
