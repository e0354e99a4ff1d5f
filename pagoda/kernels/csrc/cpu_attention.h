// Paged attention over the KV cache: decode (one query row per sequence).
#pragma once

#include "cpu_common.h"

namespace {

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

}  // namespace
