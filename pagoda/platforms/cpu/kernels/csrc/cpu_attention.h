// Paged attention over the KV cache, read in place through the block table: decode (one query row per sequence), and
// the writes of new key and value rows.
#pragma once

#include <algorithm>
#include <type_traits>

#include "cpu_common.h"

namespace {

// Stores token t's key and value rows (row_bytes each, rows key_stride / value_stride bytes apart) in cache slot
// slot_mapping[t]: row s % block_size of block s / block_size (block_stride, token_stride: bytes).
inline void write_kv_rows(void* k_cache, void* v_cache, const void* key, int64_t key_stride, const void* value,
                          int64_t value_stride, const int64_t* slot_mapping, int64_t tokens, int64_t row_bytes,
                          int64_t block_size, int64_t block_stride, int64_t token_stride, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (tokens > 64)
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;  // padding
    const int64_t at = (slot / block_size) * block_stride + (slot % block_size) * token_stride;
    std::memcpy(static_cast<char*>(k_cache) + at, static_cast<const char*>(key) + t * key_stride, row_bytes);
    std::memcpy(static_cast<char*>(v_cache) + at, static_cast<const char*>(value) + t * value_stride, row_bytes);
  }
}

// One sequence of a decode batch: every query head attends to the sequence's cached tokens, read in place from
// the paged cache through the block table. A token's keys (and values) for all kv heads are one contiguous row,
// so the sequence is read as a few long runs with the next rows prefetched: the kernel is bound by how fast the
// cache streams in, and per-head passes over the same rows left the prefetcher idle.
template <typename T>
void decode_one(T* out, const T* q, const T* k_cache, const T* v_cache, const int32_t* blocks, int64_t seq_len,
                int64_t num_heads, int64_t num_kv_heads, int64_t head_size, int64_t block_size, int64_t block_stride,
                int64_t token_stride, float scale, int64_t window, float soft_cap, std::vector<float>& scratch) {
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
  for (int64_t h = 0; h < num_heads; ++h) {
    soft_cap_scores(scores + h * n, n, soft_cap);
    softmax(scores + h * n, n);
  }
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


#if defined(__AVX512BF16__)
// Sixteen vectors to one: lane j of the result is the sum of x[j]'s lanes (a transposing add tree, 15 adds and
// 30 shuffles where sixteen horizontal sums would take ~130 operations).
inline __m512 reduce16(const __m512* x) {
  __m512 c[8], d[4];
  for (int i = 0; i < 8; ++i)
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(c[2 * i]), b = _mm512_castps_pd(c[2 * i + 1]);
    d[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(d[2], d[3], 0x88), _mm512_shuffle_f32x4(d[2], d[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

// bf16 decode scores: scores[h * ns + i] = scale * q_h . k_(start + i) for every head h, ns = n rounded up to 16.
// Sixteen tokens at a time, all kv heads of a token together (the cache streams in order, the next sixteen rows
// prefetched): each (token, head) dot product is NC / 2 vdpbf16ps on the raw
// bf16 rows, and reduce16 turns sixteen tokens' partial sums into one vector of scores.
template <int NC, int G, typename RowFn>
void decode_scores_bf16(float* scores, int64_t ns, const bf16_t* q, int64_t start, int64_t seq_len,
                        int64_t num_kv_heads, float scale, RowFn row, bool values_too) {
  constexpr int64_t D = 16 * NC;
  constexpr int NB = NC / 2;  // 32 bf16 per vector
  const int64_t row_bytes = num_kv_heads * D * 2;
  const __m512 sv = _mm512_set1_ps(scale);
  auto prefetch_row = [&](const bf16_t* r) {
    const char* p = reinterpret_cast<const char*>(r);
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
  };
  for (int64_t t = start; t < start + 16 && t < seq_len; ++t) prefetch_row(row(0, t));  // the first sixteen
  // The next sixteen rows' lines are requested a few at a time between the dot products: issued all at once, most
  // of them were dropped (more than the L2 can have in flight), and the next group started on misses. With
  // values_too, this group's value rows are requested the same way, for the value pass that follows.
  const int64_t row_lines = row_bytes / 64, group_lines = 16 * row_lines;
  const int64_t all_lines = values_too ? 2 * group_lines : group_lines;
  const int64_t per_dot = (all_lines + 16 * num_kv_heads * G - 1) / (16 * num_kv_heads * G);
  for (int64_t t0 = start; t0 < seq_len; t0 += 16) {
    const bf16_t* k[16];
    const char* next[32];  // the next group's key rows, then this group's value rows
    for (int j = 0; j < 16; ++j) {
      const int64_t t = t0 + j < seq_len ? t0 + j : seq_len - 1;  // past the end: a repeat, its lanes unused
      k[j] = row(0, t);
      next[j] = t0 + 16 + j < seq_len ? reinterpret_cast<const char*>(row(0, t0 + 16 + j)) : nullptr;
      next[16 + j] = values_too && t0 + j < seq_len ? reinterpret_cast<const char*>(row(1, t0 + j)) : nullptr;
    }
    int64_t line = 0;
    for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
      for (int g = 0; g < G; ++g) {
        const bf16_t* qh = q + (kvh * G + g) * D;
        __m512bh qv[NB];
        for (int b = 0; b < NB; ++b) qv[b] = (__m512bh)_mm512_loadu_si512(qh + 32 * b);
        __m512 x[16];
        for (int j = 0; j < 16; ++j) {
          for (int64_t e = 0; e < per_dot && line < all_lines; ++e, ++line) {
            const char* r = next[line / row_lines];
            if (r != nullptr) _mm_prefetch(r + (line % row_lines) * 64, _MM_HINT_T1);
          }
          const bf16_t* kr = k[j] + kvh * D;
          __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(kr), qv[0]);
          for (int b = 1; b < NB; ++b) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(kr + 32 * b), qv[b]);
          x[j] = a;
        }
        _mm512_storeu_ps(scores + (kvh * G + g) * ns + (t0 - start), _mm512_mul_ps(reduce16(x), sv));
      }
    }
  }
}
#endif

#if defined(__AVX512F__)
// float32 decode scores of kv head kvh's G query heads: scores[g * ns + i] = scale * q_g . k_(start + i), with the
// query rows held in registers and each key row loaded (and widened) once for the group.
template <typename T, int NC, int G, typename RowFn>
void decode_scores_f32(float* scores, int64_t ns, const T* q, int64_t start, int64_t seq_len, int64_t kvh,
                       float scale, RowFn at) {
  constexpr int64_t D = 16 * NC;
  constexpr int64_t kAhead = 6;
  __m512 qv[G][NC];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < NC; ++c)
      qv[g][c] = _mm512_mul_ps(load16(q + (kvh * G + g) * D + 16 * c), _mm512_set1_ps(scale));
  for (int64_t t = start; t < seq_len; ++t) {
    if (t + kAhead < seq_len) {
      const char* p = reinterpret_cast<const char*>(at(0, t + kAhead) + kvh * D);
      for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
    }
    const T* k = at(0, t) + kvh * D;
    __m512 kv[NC];
    for (int c = 0; c < NC; ++c) kv[c] = load16(k + 16 * c);
    for (int g = 0; g < G; ++g) {
      __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(qv[g][c], kv[c], a);
      scores[g * ns + (t - start)] = _mm512_reduce_add_ps(a);
    }
  }
}

// The same computation for head_size = 16 * NC and groups of G query heads per kv head, with a kv head's query
// rows and output accumulators held in registers: each cached row of a kv head is loaded (and widened) once for
// the whole group, and nothing round-trips through memory per token. bf16 scores every head in one pass over the
// keys (decode_scores_bf16); float32 per kv head. The values are then walked one kv head at a time, the first
// head's pass prefetching whole rows so that the later passes find them in L2.
// With `partial` set, only part `part` of `parts` equal token ranges is attended, and each head's unnormalised
// output (D floats), its largest score and its sum of exponentials go to partial[h * (D + 2)] instead of out:
// merge_partials combines the parts (a sequence split over threads when there are fewer sequences than threads).
template <typename T, int NC, int G>
void decode_one_fast(T* out, const T* q, const T* k_cache, const T* v_cache, const int32_t* blocks, int64_t seq_len,
                     int64_t num_kv_heads, int64_t block_size, int64_t block_stride, int64_t token_stride,
                     float scale, int64_t window, std::vector<float>& scratch, float* partial, int64_t part,
                     int64_t parts) {
  constexpr int64_t D = 16 * NC;
  constexpr int64_t kValuesAhead = 16;
  // A sequence's value rows up to this size are requested during the key pass, so the value pass finds them in L2
  // (its own requests, one row a token in the first head's pass, come too fast for the L2 to keep them all). On the
  // AMD EPYC Zen 4, OPT-125m's shape (12 KV heads of 64), 64 sequences of 160 tokens over 12 layers' caches:
  // 17.6-18.8 -> 12.7-14.3 ms with the key rows' requests spread out as well; SmolLM2's shape (3 KV heads) unchanged.
  constexpr int64_t kValuesInL2 = 512 * 1024;
  int64_t start = (window > 0 && seq_len > window) ? seq_len - window : 0;
  if (partial != nullptr) {  // this part's token range [start, seq_len)
    const int64_t len = seq_len - start, lo = start + len * part / parts, hi = start + len * (part + 1) / parts;
    start = lo;
    seq_len = hi;
  }
  const int64_t n = seq_len - start;
  const int64_t ns = (n + 15) / 16 * 16;
  const int64_t row_bytes = num_kv_heads * D * static_cast<int64_t>(sizeof(T));
  // Row t of the keys (which = 0) or values (1), all kv heads.
  auto at = [&](int which, int64_t t) {
    return (which ? v_cache : k_cache) + blocks[t / block_size] * block_stride + (t % block_size) * token_stride;
  };
#if defined(__AVX512BF16__)
  constexpr bool all_heads_first = std::is_same_v<T, bf16_t>;
#else
  constexpr bool all_heads_first = false;
#endif
  scratch.resize(static_cast<size_t>((all_heads_first ? num_kv_heads * G : G) * ns));
#if defined(__AVX512BF16__)
  if constexpr (all_heads_first) {
    decode_scores_bf16<NC, G>(scratch.data(), ns, q, start, seq_len, num_kv_heads, scale, at,
                              n * row_bytes <= kValuesInL2);
    for (int64_t h = 0; h < num_kv_heads * G; ++h)
      softmax(scratch.data() + h * ns, n, partial == nullptr ? nullptr : partial + h * (D + 2) + D);
  }
#endif
  for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
    float* scores = scratch.data() + (all_heads_first ? kvh * G * ns : 0);  // [G, ns]
    if constexpr (!all_heads_first) {
      decode_scores_f32<T, NC, G>(scores, ns, q, start, seq_len, kvh, scale, at);
      for (int g = 0; g < G; ++g)
        softmax(scores + g * ns, n, partial == nullptr ? nullptr : partial + (kvh * G + g) * (D + 2) + D);
    }
    __m512 acc[G][NC];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_setzero_ps();
    // The first head's pass requests every head's rows kValuesAhead tokens ahead, into L2, as the score pass does
    // for the keys (the later heads' passes find them there): on the AMD EPYC Zen 4, 64 sequences of 192 tokens
    // (3 KV heads of 64) took 405-455 us a layer against 605-640 with rows requested 6 tokens ahead into L1, over
    // 16 layers' caches (nothing left in L3). (Written out twice: a lambda called in this loop was not inlined, and
    // the call spilled the accumulators.)
    if (kvh == 0)
      for (int64_t t = start; t < start + kValuesAhead && t < seq_len; ++t) {
        const char* p = reinterpret_cast<const char*>(at(1, t));
        for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
      }
    for (int64_t t = start; t < seq_len; ++t) {
      if (kvh == 0 && t + kValuesAhead < seq_len) {
        const char* p = reinterpret_cast<const char*>(at(1, t + kValuesAhead));
        for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
      }
      const T* v = at(1, t) + kvh * D;
      __m512 vv[NC];
      for (int c = 0; c < NC; ++c) vv[c] = load16(v + 16 * c);
      for (int g = 0; g < G; ++g) {
        const __m512 w = _mm512_set1_ps(scores[g * ns + (t - start)]);
        for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_fmadd_ps(w, vv[c], acc[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < NC; ++c) {
        if (partial != nullptr) _mm512_storeu_ps(partial + (kvh * G + g) * (D + 2) + 16 * c, acc[g][c]);
        else store16(out + (kvh * G + g) * D + 16 * c, acc[g][c]);
      }
  }
}

// out [num_heads, head_size] of one sequence from its `parts` partial results (decode_one_fast's layout).
template <typename T>
void merge_partials(T* out, const float* partial, int64_t parts, int64_t num_heads, int64_t head_size) {
  const int64_t stride = num_heads * (head_size + 2);
  std::vector<float> weight(static_cast<size_t>(parts));
  for (int64_t h = 0; h < num_heads; ++h) {
    const float* ph = partial + h * (head_size + 2);  // part p's: ph + p * stride
    float m = -INFINITY, total = 0.f;
    for (int64_t p = 0; p < parts; ++p) m = std::max(m, ph[p * stride + head_size]);
    for (int64_t p = 0; p < parts; ++p) {
      weight[p] = std::exp(ph[p * stride + head_size] - m);
      total += weight[p] * ph[p * stride + head_size + 1];
    }
    for (int64_t p = 0; p < parts; ++p) weight[p] /= total;
    for (int64_t i = 0; i < head_size; ++i) {
      float v = 0.f;
      for (int64_t p = 0; p < parts; ++p) v += weight[p] * ph[p * stride + i];
      store(out, h * head_size + i, v);
    }
  }
}

// The fast variant for this shape, or null: head sizes 64 and 128, up to 8 query heads per kv head.
template <typename T>
using DecodeFn = void (*)(T*, const T*, const T*, const T*, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                          int64_t, float, int64_t, std::vector<float>&, float*, int64_t, int64_t);
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

constexpr int64_t kMinSplitTokens = 64;  // the shortest token range a sequence is split into (measured)

template <typename T>
void decode_attention(void* out, const void* q, const void* k_cache, const void* v_cache, const int32_t* block_table,
                      int64_t table_stride, const int32_t* seq_lens, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_size, int64_t block_size, int64_t block_stride,
                      int64_t token_stride, float scale, int64_t window, int num_threads, int64_t q_stride = -1,
                      float soft_cap = 0.f) {
  if (q_stride < 0) q_stride = num_heads * head_size;  // rows of q: contiguous unless a fused QKV row is given
#if defined(__AVX512F__)
  const DecodeFn<T> fast = pick_fast<T>(head_size, num_heads / num_kv_heads);
  // Fewer sequences than threads (single-stream decode): each sequence is split into token ranges, one per thread,
  // whose partial results are merged after, instead of one thread attending while the others wait.
  int64_t parts = 0;  // token ranges per sequence; each at least kMinSplitTokens long
  if (num_seqs > 0 && num_seqs < num_threads) {
    int64_t shortest = INT64_MAX;
    for (int64_t s = 0; s < num_seqs; ++s)
      shortest = std::min<int64_t>(shortest, window > 0 && seq_lens[s] > window ? window : seq_lens[s]);
    parts = std::min<int64_t>(num_threads / num_seqs, shortest / kMinSplitTokens);
  }
  if (fast && soft_cap <= 0.f && parts > 1) {
    std::vector<float> partial(static_cast<size_t>(num_seqs * parts * num_heads * (head_size + 2)));
    const int64_t stride = num_heads * (head_size + 2);
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<float> scratch;
#pragma omp for schedule(static, 1)
      for (int64_t task = 0; task < num_seqs * parts; ++task) {
        const int64_t s = task / parts;
        fast(nullptr, static_cast<const T*>(q) + s * q_stride, static_cast<const T*>(k_cache),
             static_cast<const T*>(v_cache), block_table + s * table_stride, seq_lens[s], num_kv_heads, block_size,
             block_stride, token_stride, scale, window, scratch, partial.data() + task * stride, task % parts, parts);
      }
#pragma omp for schedule(static)
      for (int64_t s = 0; s < num_seqs; ++s)
        merge_partials<T>(static_cast<T*>(out) + s * num_heads * head_size, partial.data() + s * parts * stride,
                          parts, num_heads, head_size);
    }
    return;
  }
#endif
  // One sequence (a short one, unsplit) runs on the calling thread: no team to start and join per layer.
#pragma omp parallel num_threads(num_threads) if (num_seqs > 1)
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < num_seqs; ++s) {
      T* o = static_cast<T*>(out) + s * num_heads * head_size;
      const T* qs = static_cast<const T*>(q) + s * q_stride;
#if defined(__AVX512F__)
      if (fast && soft_cap <= 0.f) {  // soft-capped logits take the generic loop
        fast(o, qs, static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), block_table + s * table_stride,
             seq_lens[s], num_kv_heads, block_size, block_stride, token_stride, scale, window, scratch, nullptr, 0, 1);
        continue;
      }
#endif
      decode_one<T>(o, qs, static_cast<const T*>(k_cache), static_cast<const T*>(v_cache),
                    block_table + s * table_stride, seq_lens[s], num_heads, num_kv_heads, head_size, block_size,
                    block_stride, token_stride, scale, window, soft_cap, scratch);
    }
  }
}

}  // namespace
