// The greedy LM head's entry points (cpu_head.h), a translation unit of their own: the argmax of x @ W^T without
// the logits, and that argmax screened by an int8 copy of a bf16 head. Compiled and called as cpu_kernels.cpp is.

#include "cpu_gemm.h"
#include "cpu_head.h"
#include "cpu_quant_gemm.h"

extern "C" {

// out[r] = argmax over n of (x @ W^T)[r, :] without writing the logits out. Each thread takes a contiguous range
// of columns and computes it 240 columns at a time into a buffer that stays in cache, keeping each row's first
// maximum (a NaN wins, as in torch's argmax); the threads' winners are merged at the end.
// kind 0: W packed by pagoda_pack_bf16; otherwise block-quantized as for pagoda_quant_gemm. allowed: null, or a
// token bitmask per row ([m, ceil(n / 32)] int32 words, bit j of word i: column 32 i + j allowed) — the argmax then
// runs over the allowed columns only (a grammar-constrained greedy row), so no logits are written for it either.
// -1 if not built.
int pagoda_linear_argmax(int kind, const void* x, const void* w, int64_t m, int64_t n, int64_t k, int64_t* out,
                         int num_threads, int amx, const int32_t* allowed) {
#if defined(__AVX512BF16__)
  if (kind != 0 && quant_tile_bytes(kind, k) == 0) return -1;
  constexpr int64_t kCols = 5 * kNT * kTile;  // 240 columns: whole micro-kernel tile groups
  const int64_t slices = (n + kCols - 1) / kCols;
  std::vector<float> best(static_cast<size_t>(num_threads * m), -INFINITY);
  std::vector<int64_t> where(static_cast<size_t>(num_threads * m), -1);
  const bf16_t* xb = static_cast<const bf16_t*>(x);
  const bf16_t* w_end = static_cast<const bf16_t*>(w) + (n + kTile - 1) / kTile * packed_k2(k) * kTile * 2;
  const int64_t sum_width = quant_sum_width(kind);
  const std::vector<float> xsum = kind == 0 || k % sum_width ? std::vector<float>()
                                                             : group_sums(xb, m, k, sum_width);  // once
  TaskShares shares(slices, num_threads);
#pragma omp parallel num_threads(num_threads)
  {
    const int t = omp_get_thread_num();
    std::vector<float> buf(static_cast<size_t>(m * kCols));
    float* tb = best.data() + t * m;
    int64_t* tw = where.data() + t * m;
    for (int64_t sl; (sl = shares.next(t)) >= 0;) {
      const int64_t c0 = sl * kCols, cols = n - c0 < kCols ? n - c0 : kCols, tile0 = c0 / kTile;
      if (kind == 0) {
        const bf16_t* wb = static_cast<const bf16_t*>(w) + tile0 * packed_k2(k) * kTile * 2;
#if defined(PAGODA_HAS_AMX)
        if (bf16_on_amx(amx, m, k)) gemm_packed_amx<true>(buf.data(), cols, xb, wb, nullptr, m, cols, k, 1);
        else
#endif
        gemm_packed_serial<true>(buf.data(), cols, xb, wb, m, cols, k, w_end);
      } else {
        const uint8_t* wb = static_cast<const uint8_t*>(w) + tile0 * quant_tile_bytes(kind, k);
        quant_gemm_kind<true>(kind, buf.data(), xb, wb, m, cols, k, 1, xsum.empty() ? nullptr : xsum.data(),
                              amx != 0);
      }
      for (int64_t r = 0; r < m; ++r) {  // a thread may also take slices of others' shares
        float* row = buf.data() + r * cols;
        if (allowed != nullptr) {  // forbidden columns drop out of the argmax
          const uint32_t* words = reinterpret_cast<const uint32_t*>(allowed) + r * ((n + 31) / 32);
          for (int64_t j = 0; j < cols; ++j)
            if (!((words[(c0 + j) >> 5] >> ((c0 + j) & 31)) & 1u)) row[j] = -INFINITY;
        }
        const int64_t i = argmax_f32(row, cols);
        if (argmax_before(row[i], c0 + i, tb[r], tw[r])) {
          tb[r] = row[i];
          tw[r] = c0 + i;
        }
      }
    }
  }
  for (int64_t r = 0; r < m; ++r) {  // the threads' winners, in the same order
    int64_t at = -1;
    float v = 0.f;
    for (int t = 0; t < num_threads; ++t) {
      const int64_t i = where[t * m + r];
      if (i >= 0 && argmax_before(best[t * m + r], i, v, at)) {
        at = i;
        v = best[t * m + r];
      }
    }
    out[r] = at < 0 ? 0 : at;
  }
  return 0;
#else
  (void)kind; (void)x; (void)w; (void)m; (void)n; (void)k; (void)out; (void)num_threads; (void)amx; (void)allowed;
  return -1;
#endif
}

// pagoda_linear_argmax's answer for bf16 weights packed by pagoda_pack_bf16 (w), screened by their int8 copy
// (screen: pagoda_int8_gemm's buffer; err, qnorm, sum_err, max_col_norm: each column's bound terms) so that only
// candidate columns are multiplied exactly: cpu_head.h. Rows the screen can't bound take the full pass, and so does
// the whole call where the full pass would run on AMX tiles (amx, as for pagoda_linear_argmax), whose sums the
// screen's exact products (the AVX512-BF16 kernel's) need not match. -1 if not built.
int pagoda_screened_argmax(const void* x, const void* w, const void* screen, const float* err, const float* qnorm,
                           const float* sum_err, float max_col_norm, int64_t m, int64_t n, int64_t k, int64_t* out,
                           int num_threads, int amx, const int32_t* allowed) {
#if defined(PAGODA_HAS_SCREENED_HEAD)
#if defined(PAGODA_HAS_AMX)
  if (bf16_on_amx(amx, m, k)) return pagoda_linear_argmax(0, x, w, m, n, k, out, num_threads, 1, allowed);
#endif
  std::vector<uint8_t> full(static_cast<size_t>(m));
  const bf16_t* xb = static_cast<const bf16_t*>(x);
  screened_head_argmax(xb, static_cast<const bf16_t*>(w), static_cast<const int8_t*>(screen), err, qnorm,
                       sum_err, max_col_norm, m, n, k, out, full.data(), num_threads, allowed);
  // The rows the screen left (rare) take the full pass together: one sweep of the head, not one per row.
  std::vector<int64_t> left;
  for (int64_t r = 0; r < m; ++r)
    if (full[r]) left.push_back(r);
  if (left.empty()) return 0;
  const int64_t nl = static_cast<int64_t>(left.size()), words = (n + 31) / 32;
  std::vector<bf16_t> xl(static_cast<size_t>(nl * k));
  std::vector<int32_t> al(allowed ? static_cast<size_t>(nl * words) : 0);
  std::vector<int64_t> ol(static_cast<size_t>(nl));
  for (int64_t i = 0; i < nl; ++i) {
    std::memcpy(xl.data() + i * k, xb + left[i] * k, static_cast<size_t>(k) * sizeof(bf16_t));
    if (allowed) std::memcpy(al.data() + i * words, allowed + left[i] * words, static_cast<size_t>(words) * 4);
  }
  const int rc = pagoda_linear_argmax(0, xl.data(), w, nl, n, k, ol.data(), num_threads, 0,
                                      allowed ? al.data() : nullptr);
  for (int64_t i = 0; i < nl; ++i) out[left[i]] = ol[i];
  return rc;
#else
  (void)x; (void)w; (void)screen; (void)err; (void)qnorm; (void)sum_err; (void)max_col_norm; (void)m; (void)n;
  (void)k; (void)out; (void)num_threads; (void)amx; (void)allowed;
  return -1;
#endif
}

}  // extern "C"
