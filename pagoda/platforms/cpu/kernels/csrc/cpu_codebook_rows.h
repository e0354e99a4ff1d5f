// AQLM weights against a few rows of activations with each 8-weight tile built in a register, in float32 throughout.
#pragma once

#include "cpu_codebook_weight.h"

namespace {

#if defined(__AVX512F__)
// Rows r0 .. r0 + M - 1 of x (float32 in xf, [k / 8][M][8]) against outputs o0 .. o0 + P - 1 (those below n): each
// output's 8-weight tiles are built in a register from its shard's books and multiplied into the M rows. The P
// outputs' tiles are independent, so their entry loads overlap and the multiply-adds make P * M chains instead of M:
// a book of 65536 entries (1 MB in float16) is read at random from L2 and beyond, and the overlap is what sets the
// speed. Linear (codes_linear holds): the codes and book are found from o0's by constant steps, not kept per output
// (the compiler would keep 2 P pointers out of registers).
template <bool F32Out, typename CodeT, int NB, int M, int P, bool Linear>
void codebook_rows_pass(void* y, const float* xf, const CodebookWeight& w,
                        const typename CodebookEntries<CodeT>::T* entries, int64_t o0, int64_t r0) {
  const int64_t n = w.n, k = w.k, groups = k / kCodebookGroup, num_books = NB ? NB : w.num_books;
  const int64_t step = group_step<CodeT>(w);
  const typename CodebookEntries<CodeT>::T* books[P];
  int64_t outs[P];
  for (int p = 0; p < P; ++p) {
    outs[p] = o0 + p < n ? o0 + p : o0;  // past n: a copy of o0, computed and not stored
    books[p] = books_of(w, entries, Linear ? o0 : outs[p]);
  }
  const bool cold = books_cold(w, o0);
  __m256 acc[P][M];
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < M; ++r) acc[p][r] = _mm256_setzero_ps();
  for (int64_t i0 = 0; i0 < groups; i0 += kCodeBlock) {
    const int64_t width = groups - i0 < kCodeBlock ? groups - i0 : kCodeBlock;
    const int64_t output_step = sizeof(CodeT) == 2 ? num_books : width * num_books;
    if (i0 + 2 * kCodeBlock < groups) {  // the codes two blocks on
      const char* ahead = reinterpret_cast<const char*>(block_codes<CodeT>(w, o0, i0 + 2 * kCodeBlock));
      for (int64_t b = 0; b < P * kCodeBlock * num_books * static_cast<int64_t>(sizeof(CodeT)); b += 64)
        _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    if (Linear && cold && i0 + 3 * kCodeBlock <= groups)
      prefetch_block_entries<P, CodeT>(w, books[0], o0, i0 + 2 * kCodeBlock);
    const CodeT* const base = block_codes<CodeT>(w, o0, i0);
    const CodeT* code[P];
    if (!Linear)
      for (int p = 0; p < P; ++p) code[p] = block_codes<CodeT>(w, outs[p], i0);
    for (int64_t g = 0; g < width; ++g) {
      const float* xg = xf + (i0 + g) * M * kCodebookGroup;
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const CodeT* c = (Linear ? base + p * output_step : code[p]) + g * step;
        const auto* book = Linear ? books[0] : books[p];
        __m256 wv = codebook_entry(book, w.book_size, 0, c[0]);
        for (int b = 1; b < num_books; ++b) wv = _mm256_add_ps(wv, codebook_entry(book, w.book_size, b, c[b]));
#pragma GCC unroll 8
        for (int r = 0; r < M; ++r) acc[p][r] = _mm256_fmadd_ps(wv, _mm256_load_ps(xg + r * kCodebookGroup), acc[p][r]);
      }
    }
  }
  for (int p = 0; p < P && o0 + p < n; ++p)
    for (int r = 0; r < M; ++r) {
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[p][r]), _mm256_extractf128_ps(acc[p][r], 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      const float v = w.scales[o0 + p] * _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
      const int64_t at = (r0 + r) * n + o0 + p;
      if constexpr (F32Out) static_cast<float*>(y)[at] = v;
      else static_cast<bf16_t*>(y)[at] = f32_to_bf16(v);
    }
}

// y [m, n] = x [m, k] . W^T where row o, inputs 8i .. 8i+7 of W are scale[o] * sum_b books[b][code(o, i, b)], in
// float32 throughout (the weights exact). Rows go in passes of up to 8, each over P outputs at a time (16 / M
// rounded down to a power of two: at most 16 accumulators, and P outputs within one column tile), so each code is
// read once per pass.
template <bool F32Out, typename CodeT>
void codebook_gemm(void* y, const bf16_t* x, const CodebookWeight& w, const typename CodebookEntries<CodeT>::T* entries,
                   int64_t m, int num_threads) {
  const int64_t k = w.k;
  static thread_local aligned_vector<float> x_rows;  // the calling thread's, kept between calls
  if (x_rows.size() < static_cast<size_t>((m < 8 ? m : 8) * k)) x_rows.resize(static_cast<size_t>((m < 8 ? m : 8) * k));
  float* const xf = x_rows.data();  // the team reaches it through this: thread_local names are per thread
  for (int64_t r0 = 0; r0 < m; r0 += 8) {
    const int64_t rows = m - r0 < 8 ? m - r0 : 8;
    for (int64_t r = 0; r < rows; ++r)  // the pass's rows as float32, [groups][rows][8]
      for (int64_t i = 0; i < k; ++i) xf[(i / 8 * rows + r) * 8 + i % 8] = bf16_to_f32(x[(r0 + r) * k + i]);
    auto pass = [&](auto rows_c, auto outs_c) {
      constexpr int M = decltype(rows_c)::value, P = decltype(outs_c)::value;
      share_tasks((w.n + P - 1) / P, num_threads, [&](int64_t task) {
        const int64_t o0 = task * P;
        if (!codes_linear<CodeT>(w, o0, P))
          codebook_rows_pass<F32Out, CodeT, 0, M, P, false>(y, xf, w, entries, o0, r0);
        else if (w.num_books == 1) codebook_rows_pass<F32Out, CodeT, 1, M, P, true>(y, xf, w, entries, o0, r0);
        else if (w.num_books == 2) codebook_rows_pass<F32Out, CodeT, 2, M, P, true>(y, xf, w, entries, o0, r0);
        else codebook_rows_pass<F32Out, CodeT, 0, M, P, true>(y, xf, w, entries, o0, r0);
      });
    };
    using std::integral_constant;
    switch (rows) {
      case 1: pass(integral_constant<int, 1>(), integral_constant<int, 16>()); break;
      case 2: pass(integral_constant<int, 2>(), integral_constant<int, 8>()); break;
      case 3: pass(integral_constant<int, 3>(), integral_constant<int, 4>()); break;
      case 4: pass(integral_constant<int, 4>(), integral_constant<int, 4>()); break;
      case 5: pass(integral_constant<int, 5>(), integral_constant<int, 2>()); break;
      case 6: pass(integral_constant<int, 6>(), integral_constant<int, 2>()); break;
      case 7: pass(integral_constant<int, 7>(), integral_constant<int, 2>()); break;
      default: pass(integral_constant<int, 8>(), integral_constant<int, 2>()); break;
    }
  }
}
#endif  // __AVX512F__

}  // namespace
