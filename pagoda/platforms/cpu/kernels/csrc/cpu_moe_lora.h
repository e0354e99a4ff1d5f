// LoRA adapters on a mixture-of-experts block's routed experts, inside the fused expert MLP (cpu_moe.h): after an
// expert's gate-up product, each adapted row gets (x A13^T) B13^T added before the activation, and after its down
// product (act A2^T) B2^T, for the adapter slot of the row's token. The slots are bf16 or float32 with the adapter's
// scaling folded into B, and B is kept transposed ([rank][out]), so the expand is a row of multiply-adds per rank
// entry over contiguous outputs. The products are float32 whatever the slots; a gate-up delta is added to the bf16
// product in float32 and rounded once; a down delta is added to the float32 product before the weighted sum over the
// token's experts.
#pragma once

#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace {

// One experts block's slots (bf16 where `bf16`, else float32): slot s, expert e's A13 [2R][H] at
// a13 + (s * E + e) * 2R * H elements, its B13^T [2R][2I], A2 [R][I] and B2^T [R][H] likewise; adapted[s]: whether
// slot s's adapter adapts this block (else its rows take no delta).
struct MoELoRASlots {
  const void* a13;
  const void* bt13;
  const void* a2;
  const void* bt2;
  const uint8_t* adapted;
  int64_t num_slots, rank, bf16;
};

#if defined(__AVX512F__)
constexpr int kMoELoRAPass = 8;    // rows whose accumulators live in registers together
constexpr int64_t kMoELoRABatch = 32;  // rows of one slot and expert taken together: A and B read once for them

// u [R][r] = X [R][k] (float32, rows k apart) . A [r][k]^T, for R rows (R a compile-time count: the accumulators stay
// in registers).
template <int R, typename W>
inline void moe_lora_shrink(float* u, const W* a, int64_t r, const float* x, int64_t k) {
  for (int64_t j = 0; j < r; ++j) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    const W* aj = a + j * k;
    for (int64_t c = 0; c < k; c += 16) {
      const __mmask16 mask = tile_columns(k, c);
      const __m512 av = load16(aj + c, mask);
      for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(av, load16(x + i * k + c, mask), acc[i]);
    }
    for (int i = 0; i < R; ++i) u[i * r + j] = _mm512_reduce_add_ps(acc[i]);
  }
}

// Columns [c, c + 16) of R rows y[i] += u [R][r] . Bt [r][n], in float32: bf16 rows rounded once, float32 rows in
// place.
template <int R, typename T, typename W>
inline void moe_lora_expand_columns(T* const* y, const float* u, const W* bt, int64_t r, int64_t n, int64_t c) {
  const __mmask16 mask = tile_columns(n, c);
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = load16(y[i] + c, mask);
  for (int64_t j = 0; j < r; ++j) {
    const __m512 b = load16(bt + j * n + c, mask);
    for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(u[i * r + j]), b, acc[i]);
  }
  for (int i = 0; i < R; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_mask_storeu_ps(y[i] + c, mask, acc[i]);
    } else {
      _mm256_mask_storeu_epi16(y[i] + c, mask, (__m256i)_mm512_cvtneps_pbh(acc[i]));
    }
  }
}

// The deltas of a batch of `rows` rows (inputs xs [rows][k] float32, outputs y[i]) through one slot and expert's A
// [r][k] and Bt [r][n], in register passes of up to kMoELoRAPass rows; each pass of the expand reads the column
// chunk of Bt the pass before it left in L1.
template <typename T, typename W>
inline void moe_lora_batch(T* const* y, const float* xs, int64_t rows, int64_t k, const W* a, const W* bt,
                           int64_t r, int64_t n, float* u) {
  for (int64_t i = 0; i < rows; i += kMoELoRAPass) {
    const auto shrink = [&](auto R, int64_t) { moe_lora_shrink<decltype(R)::value>(u + i * r, a, r, xs + i * k, k); };
    if (rows - i >= kMoELoRAPass) shrink(std::integral_constant<int, kMoELoRAPass>{}, 0);
    else remainder_pass<1, kMoELoRAPass>(rows - i, 0, shrink);
  }
  for (int64_t c = 0; c < n; c += 16)
    for (int64_t i = 0; i < rows; i += kMoELoRAPass) {
      const auto expand = [&](auto R, int64_t) {
        moe_lora_expand_columns<decltype(R)::value, T, W>(y + i, u + i * r, bt, r, n, c);
      };
      if (rows - i >= kMoELoRAPass) expand(std::integral_constant<int, kMoELoRAPass>{}, 0);
      else remainder_pass<1, kMoELoRAPass>(rows - i, 0, expand);
    }
}

// For expert e's grouped rows [start, start + count) (row j of the block: slot slot_of[j], input x + j * k, output
// y + j * n): each adapted row's delta through A [r][k] and Bt [r][n] of its (slot, e), a (slot, expert)'s rows
// kMoELoRABatch at a time.
template <typename T>
inline void moe_lora_rows(const MoELoRASlots& L, int64_t e, int64_t E, const int64_t* slot_of, int64_t start,
                          int64_t count, const bf16_t* x, int64_t k, T* y, int64_t n, const void* a,
                          const void* bt, int64_t r) {
  static thread_local std::vector<float> xs, u;  // the calling thread's buffers, kept between calls
  xs.resize(static_cast<size_t>(kMoELoRABatch * k));
  u.resize(static_cast<size_t>(kMoELoRABatch * r));
  std::vector<char> done(static_cast<size_t>(count), 0);
  for (int64_t first = 0; first < count; ++first) {
    const int64_t s = slot_of[start + first];
    if (done[first] || s < 0 || s >= L.num_slots || !L.adapted[s]) continue;
    T* rows_out[kMoELoRABatch];
    int64_t rows = 0;
    for (int64_t j = first; j < count && rows < kMoELoRABatch; ++j) {
      if (done[j] || slot_of[start + j] != s) continue;
      done[j] = 1;
      const bf16_t* xj = x + (start + j) * k;
      for (int64_t c = 0; c < k; ++c) xs[rows * k + c] = bf16_to_f32(xj[c]);
      rows_out[rows++] = y + (start + j) * n;
    }
    const int64_t at = s * E + e;
    if (L.bf16)
      moe_lora_batch<T>(rows_out, xs.data(), rows, k, static_cast<const bf16_t*>(a) + at * r * k,
                        static_cast<const bf16_t*>(bt) + at * r * n, r, n, u.data());
    else
      moe_lora_batch<T>(rows_out, xs.data(), rows, k, static_cast<const float*>(a) + at * r * k,
                        static_cast<const float*>(bt) + at * r * n, r, n, u.data());
  }
}
#endif  // __AVX512F__

}  // namespace
