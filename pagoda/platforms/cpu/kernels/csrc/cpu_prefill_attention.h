// Paged causal prefill attention (several query rows per sequence) over the KV cache, read in place through the
// block table; its scores and values are small packed GEMMs.
#pragma once

#include <algorithm>

#include "cpu_gemm.h"

namespace {

#if defined(__AVX512BF16__)
// Per-thread buffers of one prefill work item.
struct PrefillScratch {
  std::vector<bf16_t> q, kp, vp, p;
  std::vector<float> s, o, tmp, m, l;
};

// One work item of a bf16 prefill: query tokens [q0, q0 + qn) of one sequence (positions pos0 + i) and the G query
// heads of kv head kvh, against the keys [0, pos0 + q0 + qn) read in place from the paged cache. Flash-style: the
// keys come in chunks of kChunk; each chunk's keys are packed (transposed) into the GEMM's weight layout, the
// scores are a packed GEMM, the running softmax is rescaled per row, and the exponentials, rounded to bf16 as
// torch's CPU flash attention rounds them, multiply the chunk's values (packed in pairs of tokens) in a second
// GEMM. Rows are (token, head) pairs: row r is token q0 + r / G, head kvh * G + r % G.
template <int G>
void prefill_item(bf16_t* out, const bf16_t* q, int64_t q_stride, int64_t pos0, int64_t q0, int64_t qn, int64_t kvh,
                  int64_t num_heads, int64_t D, float scale, int64_t window, float soft_cap, const bf16_t* k_cache,
                  const bf16_t* v_cache, const int32_t* blocks, int64_t block_size, int64_t block_stride,
                  int64_t token_stride, PrefillScratch& w) {
  constexpr int64_t kChunk = 256;
  const int64_t R = qn * G, dtiles = D / kTile;
  w.q.resize(R * D);
  w.s.resize(R * kChunk);
  w.p.resize(R * kChunk);
  w.kp.resize(kChunk * D);
  w.vp.resize(kChunk * D);
  w.o.assign(R * D, 0.f);
  w.tmp.resize(R * D);
  w.m.assign(R, -INFINITY);
  w.l.assign(R, 0.f);
  for (int64_t r = 0; r < R; ++r)
    std::memcpy(w.q.data() + r * D, q + (q0 + r / G) * q_stride + (kvh * G + r % G) * D, D * sizeof(bf16_t));
  auto at = [&](const bf16_t* cache, int64_t t) {
    return cache + blocks[t / block_size] * block_stride + (t % block_size) * token_stride + kvh * D;
  };
  const int64_t last = pos0 + q0 + qn - 1;  // position of the last query token
  const int64_t kbeg = window > 0 ? std::max<int64_t>(0, pos0 + q0 - window + 1) : 0;
  for (int64_t c0 = kbeg; c0 <= last; c0 += kChunk) {
    const int64_t nk = std::min<int64_t>(kChunk, last + 1 - c0), nk2 = (nk + 1) / 2 * 2;
    const int64_t ktiles = (nk + kTile - 1) / kTile;
    // Keys, transposed into tiles of 16 tokens: kp[tile][d / 2][token % 16][d % 2] (zero past the chunk).
    uint32_t* kp = reinterpret_cast<uint32_t*>(w.kp.data());
    if (nk % kTile) std::memset(kp + (ktiles - 1) * kTile * (D / 2), 0, kTile * (D / 2) * 4);
    for (int64_t t = 0; t < nk; ++t) {
      const uint32_t* row = reinterpret_cast<const uint32_t*>(at(k_cache, c0 + t));
      uint32_t* dst = kp + (t / kTile) * kTile * (D / 2) + t % kTile;
      for (int64_t p = 0; p < D / 2; ++p) dst[p * kTile] = row[p];
    }
    // Values, in pairs of tokens: vp[d tile][t / 2][d % 16][t % 2].
    for (int64_t t = 0; t < nk2; t += 2) {
      const bf16_t* a = at(v_cache, c0 + t);
      const bf16_t* b = t + 1 < nk ? at(v_cache, c0 + t + 1) : nullptr;
      for (int64_t dt = 0; dt < dtiles; ++dt) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + dt * kTile)));
        const __m512i hi = b ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + dt * kTile)))
                             : _mm512_setzero_si512();
        _mm512_storeu_si512(w.vp.data() + (dt * (nk2 / 2) + t / 2) * 2 * kTile,
                            _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
    gemm_packed_serial<true, 4>(w.s.data(), kChunk, w.q.data(), w.kp.data(), R, nk, D);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t pos = pos0 + q0 + r / G;
      const int64_t hi = std::min<int64_t>(nk, pos - c0 + 1);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1 - c0) : 0;
      bf16_t* pr = w.p.data() + r * nk2;
      std::memset(pr, 0, nk2 * sizeof(bf16_t));
      if (hi <= lo) continue;  // nothing visible to this row in this chunk
      float* sr = w.s.data() + r * kChunk;
      // Soft-capped logits (Gemma 2) replace the raw scores, already scaled: the steps below then scale by 1.
      float sc = scale;
      if (soft_cap > 0.f) {
        for (int64_t t = lo; t < hi; ++t) sr[t] *= scale;
        soft_cap_scores(sr + lo, hi - lo, soft_cap);
        sc = 1.f;
      }
      // Row maximum (of the scaled scores) over the visible columns.
      __m512 mxv = _mm512_set1_ps(-INFINITY);
      int64_t j = lo;
      for (; j + 16 <= hi; j += 16) mxv = _mm512_max_ps(mxv, _mm512_loadu_ps(sr + j));
      float mx = _mm512_reduce_max_ps(mxv);
      for (; j < hi; ++j) mx = std::max(mx, sr[j]);
      mx *= sc;  // sc > 0: the maximum of the scaled scores
      const float mnew = std::max(w.m[r], mx);
      const float alpha = std::exp(w.m[r] - mnew);  // 0 for the first visible chunk (m = -inf)
      float sum = 0.f;
      j = lo;
      const __m512 sv = _mm512_set1_ps(sc), mv = _mm512_set1_ps(mnew);
      __m512 acc = _mm512_setzero_ps();
      for (; j + 16 <= hi; j += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(sr + j), sv), mv));
        acc = _mm512_add_ps(acc, e);
        store16(pr + j, e);
      }
      sum = _mm512_reduce_add_ps(acc);
      for (; j < hi; ++j) {
        const float e = std::exp(sr[j] * sc - mnew);
        sum += e;
        pr[j] = f32_to_bf16(e);
      }
      w.l[r] = w.l[r] * alpha + sum;
      w.m[r] = mnew;
      if (alpha != 1.f)
        for (int64_t d = 0; d < D; d += 16)
          _mm512_storeu_ps(w.o.data() + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(w.o.data() + r * D + d),
                                                                  _mm512_set1_ps(alpha)));
    }
    gemm_packed_serial<true, 4>(w.tmp.data(), D, w.p.data(), w.vp.data(), R, D, nk2);
    for (int64_t i = 0; i < R * D; i += 16)
      _mm512_storeu_ps(w.o.data() + i, _mm512_add_ps(_mm512_loadu_ps(w.o.data() + i), _mm512_loadu_ps(w.tmp.data() + i)));
  }
  for (int64_t r = 0; r < R; ++r) {
    bf16_t* o = out + (q0 + r / G) * num_heads * D + (kvh * G + r % G) * D;
    const float inv = w.l[r] > 0.f ? 1.f / w.l[r] : 0.f;
    for (int64_t d = 0; d < D; d += 16)
      store16(o + d, _mm512_mul_ps(_mm512_loadu_ps(w.o.data() + r * D + d), _mm512_set1_ps(inv)));
  }
}

template <int G>
void prefill_attention_g(bf16_t* out, const bf16_t* q, int64_t q_stride, const bf16_t* k_cache,
                         const bf16_t* v_cache, const int32_t* block_table, int64_t table_stride,
                         const int32_t* query_start_loc, const int32_t* seq_lens, int64_t num_seqs,
                         int64_t num_heads, int64_t num_kv_heads, int64_t D, int64_t block_size, int64_t block_stride,
                         int64_t token_stride, float scale, int64_t window, float soft_cap, int num_threads) {
  // Work items (sequence, kv head, block of query tokens), sized so a block has about 96 rows.
  const int64_t qb = std::max<int64_t>(1, 96 / G);
  std::vector<int64_t> first(num_seqs + 1, 0);
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t qn = query_start_loc[i + 1] - query_start_loc[i];
    first[i + 1] = first[i] + num_kv_heads * ((qn + qb - 1) / qb);
  }
#pragma omp parallel num_threads(num_threads)
  {
    PrefillScratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < first[num_seqs]; ++item) {
      const int64_t i = std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1;
      const int64_t local = item - first[i], blocks_per_head = (first[i + 1] - first[i]) / num_kv_heads;
      const int64_t kvh = local / blocks_per_head, q0 = (local % blocks_per_head) * qb;
      const int64_t qs = query_start_loc[i], qn_all = query_start_loc[i + 1] - qs;
      const int64_t qn = std::min<int64_t>(qb, qn_all - q0);
      prefill_item<G>(out + qs * num_heads * D, q + qs * q_stride, q_stride, seq_lens[i] - qn_all, q0, qn, kvh,
                      num_heads, D, scale, window, soft_cap, k_cache, v_cache, block_table + i * table_stride, block_size,
                      block_stride, token_stride, scratch);
    }
  }
}
#endif

// Causal attention of prefill chunks (bf16): sequence i's query rows are q[query_start_loc[i] .. [i + 1]) (row
// stride q_stride elements), at the last positions of its seq_lens[i] tokens, all of which are already in the
// cache. soft_cap > 0 soft-caps the scaled logits (cap * tanh(s / cap)). out [tokens, heads, head_size]. Returns false where the kernel does not apply (the caller keeps SDPA).
inline bool prefill_attention(void* out, const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                              const int32_t* block_table, int64_t table_stride, const int32_t* query_start_loc,
                              const int32_t* seq_lens, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_size, int64_t block_size, int64_t block_stride, int64_t token_stride,
                              float scale, int64_t window, float soft_cap, int num_threads) {
#if defined(__AVX512BF16__)
  if (head_size % kTile != 0 || num_heads % num_kv_heads != 0) return false;
  auto run = [&](auto fn) {
    fn(static_cast<bf16_t*>(out), static_cast<const bf16_t*>(q), q_stride, static_cast<const bf16_t*>(k_cache),
       static_cast<const bf16_t*>(v_cache), block_table, table_stride, query_start_loc, seq_lens, num_seqs,
       num_heads, num_kv_heads, head_size, block_size, block_stride, token_stride, scale, window, soft_cap,
       num_threads);
    return true;
  };
  switch (num_heads / num_kv_heads) {
    case 1: return run(prefill_attention_g<1>);
    case 2: return run(prefill_attention_g<2>);
    case 3: return run(prefill_attention_g<3>);
    case 4: return run(prefill_attention_g<4>);
    case 5: return run(prefill_attention_g<5>);
    case 6: return run(prefill_attention_g<6>);
    case 7: return run(prefill_attention_g<7>);
    case 8: return run(prefill_attention_g<8>);
    default: return false;
  }
#else
  (void)out; (void)q; (void)q_stride; (void)k_cache; (void)v_cache; (void)block_table; (void)table_stride;
  (void)query_start_loc; (void)seq_lens; (void)num_seqs; (void)num_heads; (void)num_kv_heads; (void)head_size;
  (void)block_size; (void)block_stride; (void)token_stride; (void)scale; (void)window; (void)soft_cap;
  (void)num_threads;
  return false;
#endif
}

}  // namespace
