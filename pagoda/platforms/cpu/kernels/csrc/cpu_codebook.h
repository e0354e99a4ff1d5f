// Additive-codebook weights (AQLM) with bf16 activations, for decode-sized batches.
#pragma once

#include "cpu_common.h"

namespace {

constexpr int64_t kCodebookGroup = 8;    // inputs per code (AQLM's in_group_size this kernel takes)
constexpr int64_t kCodebookMaxRows = 16;  // larger batches dequantize and use a dense matmul instead

#if defined(__AVX512F__)
// y [m, n] = x [m, k] . W^T where row n, inputs 8i .. 8i+7 of W are scale[n] * sum_b books[b][codes[n, i, b]]:
// codes uint16 [n, k / 8, num_books] (unsigned), books float16 [num_books, book_size, 8], scales float32 [n].
// Each tile of 8 weights is built in a register from the codebooks (which stay in cache: 2x8 codebooks are 8 KB,
// 1x16 ones 1 MB) and multiplied into every row of x, so each code is read once per call.
template <bool F32Out>
void codebook_gemm(void* y, const bf16_t* x, const uint16_t* codes, const uint16_t* books, const float* scales,
                   int64_t m, int64_t n, int64_t k, int num_books, int64_t book_size, int num_threads) {
  const int64_t groups = k / kCodebookGroup;
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) xf[i] = bf16_to_f32(x[i]);
  constexpr int64_t kRowsPerTask = 16;
  share_tasks((n + kRowsPerTask - 1) / kRowsPerTask, num_threads, [&](int64_t task) {
    const int64_t n_end = (task + 1) * kRowsPerTask < n ? (task + 1) * kRowsPerTask : n;
    for (int64_t row = task * kRowsPerTask; row < n_end; ++row) {
      __m256 acc[kCodebookMaxRows];
      for (int64_t r = 0; r < m; ++r) acc[r] = _mm256_setzero_ps();
      const uint16_t* c = codes + row * groups * num_books;
      for (int64_t i = 0; i < groups; ++i, c += num_books) {
        __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(books + c[0] * kCodebookGroup)));
        for (int b = 1; b < num_books; ++b) {
          const uint16_t* entry = books + (b * book_size + c[b]) * kCodebookGroup;
          w = _mm256_add_ps(w, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(entry))));
        }
        for (int64_t r = 0; r < m; ++r)
          acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xf.data() + r * k + i * kCodebookGroup), acc[r]);
      }
      for (int64_t r = 0; r < m; ++r) {
        const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        const float v = scales[row] * _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
        if constexpr (F32Out) static_cast<float*>(y)[r * n + row] = v;
        else static_cast<bf16_t*>(y)[r * n + row] = f32_to_bf16(v);
      }
    }
  });
}
#endif  // __AVX512F__

}  // namespace
