// The greedy LM head's argmax, screened by an int8 copy of the head: exact, at about half the bytes read.
//
// A greedy head reads the whole [n, k] bf16 matrix per step to find one column, and at a few rows it is bound by
// memory. Here an int8 copy (codes per column, symmetric, scale amax / 127: cpu_int8.h's packing) is read instead,
// with the input quantized in two levels (its int8 codes, then the int8 codes of what those leave), so each column's
// screened value s~ differs from the exact product by at most
//   B = |x| (e + g_k |w|) + |w~| (|x - x~| + 5u (|x~1| + |x~2|)) + tiny + 2^-21 |s~|,
// e = |w - w~| (Python computes it per column with g_k = k u / (1 - k u), the float32 summation bound of the exact
// kernel, and rounds both per-column terms up), u = 2^-24, norms Euclidean. Every column whose upper bound s~ + B
// reaches the largest lower bound s~ - B of the row is a candidate; the argmax lies among them, so only their tiles
// are multiplied exactly, by the bf16 kernel that the full pass uses (same instructions, same order: the same floats).
// Ties and the first-index rule therefore come out as in the full pass. A row the screen can't bound (a non-finite
// input, or too many candidates) is left to the full pass.
#pragma once

#include <algorithm>

#include "cpu_gemm.h"
#include "cpu_int8.h"

namespace {

#if defined(PAGODA_HAS_VNNI_INT8)
#define PAGODA_HAS_SCREENED_HEAD 1

constexpr int64_t kScreenCols = 5 * kInt8NT * 16;  // 240 columns a slice: whole int8 micro-kernel tile groups
constexpr int64_t kScreenCap = 4096;                // candidates a row may keep per thread before the full pass takes it

struct ScreenRow {  // one input row, quantized in two levels, and its bound terms
  float x_norm, resid;  // |x| and |x - x~| + 5u (|x~1| + |x~2|), both rounded up
  float tiny;           // flush-to-zero and denormal slack of the exact kernel
  bool ok;              // finite: the screen applies
};

// Two-level int8 form of x row r into xu rows 2r, 2r + 1 (VNNI's offset codes) and their scales; the row's terms.
inline ScreenRow screen_quantize(const bf16_t* xr, uint8_t* xu, float* xscale, int64_t k, int64_t kp,
                                 float max_col_norm) {
  int8_t* q1 = reinterpret_cast<int8_t*>(xu);
  quantize_row_int8(xr, q1, xscale, k, kp, 0.f, true);
  const float s1 = xscale[0];
  std::vector<float> res(static_cast<size_t>(k));
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    res[i] = bf16_to_f32(xr[i]) - s1 * static_cast<float>(static_cast<int>(xu[i]) - 128);
    amax = std::max(amax, std::fabs(res[i]));
  }
  const float s2 = amax > 0.f ? amax / 127.0f : 1.f;
  xscale[1] = s2;
  uint8_t* q2 = xu + kp;
  double xx = 0, dd = 0, n1 = 0, n2 = 0;
  for (int64_t i = 0; i < k; ++i) {
    const float c = std::min(127.0f, std::max(-127.0f, std::nearbyint(res[i] / s2)));
    q2[i] = static_cast<uint8_t>(static_cast<int>(c) + 128);
    const double xi = bf16_to_f32(xr[i]), t1 = double(s1) * (int(xu[i]) - 128), t2 = double(s2) * c;
    const double d = xi - t1 - t2;
    xx += xi * xi;
    dd += d * d;
    n1 += t1 * t1;
    n2 += t2 * t2;
  }
  std::memset(q2 + k, 0x80, static_cast<size_t>(kp - k));
  ScreenRow row;
  const double x_norm = std::sqrt(xx), up = 1.0 + 1e-6;
  const double resid = std::sqrt(dd) + 5.0 * std::ldexp(1.0, -24) * (std::sqrt(n1) + std::sqrt(n2));
  // Past 1e30 the screened sums could overflow float: the full pass takes the row.
  row.ok = std::isfinite(x_norm) && x_norm * (1.0 + max_col_norm) < 1e30;
  row.x_norm = static_cast<float>(x_norm * up);
  row.resid = static_cast<float>(resid * up);
  row.tiny = static_cast<float>(double(k) * std::ldexp(1.0, -120) * (1.0 + x_norm * std::sqrt(double(k)) + max_col_norm));
  return row;
}

struct ScreenHit {
  int64_t row, col;
  float upper;
};

// out[r] = argmax of row r of x [m, k] . W^T (W bf16, packed for the bf16 GEMM at wp) for the rows whose screen
// holds; full[r] is set for the others (the caller runs the full pass on them). sp: the int8 copy (cpu_int8.h's
// buffer: tiles, scales, code sums); err, qnorm: each column's e + g_k |w| and |w~|, rounded up; max_col_norm: the
// largest |w| and |w~|. allowed: as for pagoda_linear_argmax.
inline void screened_head_argmax(const bf16_t* x, const bf16_t* wp, const int8_t* sp, const float* err,
                                 const float* qnorm, float max_col_norm, int64_t m, int64_t n, int64_t k, int64_t* out,
                                 uint8_t* full, int num_threads, const int32_t* allowed) {
  const int64_t kp = (k + 63) / 64 * 64, cols_padded = (n + 15) / 16 * 16, tile_bytes = 16 * kp;
  const float* wscale = reinterpret_cast<const float*>(sp + cols_padded * kp);
  const int32_t* colsum = reinterpret_cast<const int32_t*>(wscale + cols_padded);
  aligned_vector<uint8_t> xu(static_cast<size_t>(2 * m * kp));
  std::vector<float> xscale(static_cast<size_t>(2 * m));
  std::vector<ScreenRow> rows(static_cast<size_t>(m));
  for (int64_t r = 0; r < m; ++r) {
    rows[r] = screen_quantize(x + r * k, xu.data() + 2 * r * kp, xscale.data() + 2 * r, k, kp, max_col_norm);
    full[r] = rows[r].ok ? 0 : 1;
  }
  const int64_t slices = (n + kScreenCols - 1) / kScreenCols;
  std::vector<float> lower(static_cast<size_t>(num_threads * m), -INFINITY);
  std::vector<std::vector<ScreenHit>> hits(static_cast<size_t>(num_threads));
  std::vector<uint8_t> overflow(static_cast<size_t>(num_threads * m), 0);
  const int8_t* s_end = sp + cols_padded * kp;
  TaskShares shares(slices, num_threads);
#pragma omp parallel num_threads(num_threads)
  {
    const int t = omp_get_thread_num();
    std::vector<float> buf(static_cast<size_t>(2 * m * kScreenCols));
    std::vector<int64_t> kept(static_cast<size_t>(m), 0);
    float* lo = lower.data() + t * m;
    for (int64_t sl; (sl = shares.next(t)) >= 0;) {
      const int64_t c0 = sl * kScreenCols, cols = n - c0 < kScreenCols ? n - c0 : kScreenCols;
      const int8_t* base = sp + (c0 / 16) * tile_bytes;
      for (int64_t g = 0; g * 16 * kInt8NT < cols; ++g) {
        const int64_t tile0 = g * kInt8NT, left = (cols - tile0 * 16 + 15) / 16;
        const int8_t* next = base + (tile0 + kInt8NT) * tile_bytes;
        const int8_t* ahead = next + kInt8NT * tile_bytes <= s_end ? next : nullptr;
        if (left >= 3)
          int8_vnni_rows<3, true>(2 * m, buf.data(), cols, xu.data(), xscale.data(), kp, base, wscale + c0,
                                  colsum + c0, nullptr, tile0, ahead);
        else if (left == 2)
          int8_vnni_rows<2, true>(2 * m, buf.data(), cols, xu.data(), xscale.data(), kp, base, wscale + c0,
                                  colsum + c0, nullptr, tile0, ahead);
        else
          int8_vnni_rows<1, true>(2 * m, buf.data(), cols, xu.data(), xscale.data(), kp, base, wscale + c0,
                                  colsum + c0, nullptr, tile0, ahead);
      }
      for (int64_t r = 0; r < m; ++r) {
        if (!rows[r].ok || overflow[t * m + r]) continue;
        const float* y1 = buf.data() + 2 * r * cols;
        const float* y2 = y1 + cols;
        const __m512 xn = _mm512_set1_ps(rows[r].x_norm), rs = _mm512_set1_ps(rows[r].resid);
        const __m512 tiny = _mm512_set1_ps(rows[r].tiny), rel = _mm512_set1_ps(std::ldexp(1.0f, -21));
        const uint32_t* words = allowed ? reinterpret_cast<const uint32_t*>(allowed) + r * ((n + 31) / 32) : nullptr;
        auto bounds = [&](int64_t j, __mmask16 mask, __m512& s, __m512& b) {
          s = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, y1 + j), _mm512_maskz_loadu_ps(mask, y2 + j));
          b = _mm512_fmadd_ps(rel, _mm512_abs_ps(s), tiny);
          b = _mm512_fmadd_ps(rs, _mm512_maskz_loadu_ps(mask, qnorm + c0 + j), b);
          b = _mm512_fmadd_ps(xn, _mm512_maskz_loadu_ps(mask, err + c0 + j), b);
        };
        auto usable = [&](int64_t j) -> __mmask16 {  // valid columns, and allowed ones where a mask is given
          __mmask16 mask = tile_columns(cols, j);
          if (words) {
            const int64_t c = c0 + j;  // c0 and j are multiples of 16: the 16 bits sit in one word
            mask &= static_cast<__mmask16>(words[c >> 5] >> (c & 31));
          }
          return mask;
        };
        float best = lo[r];
        for (int64_t j = 0; j < cols; j += 16) {
          const __mmask16 mask = usable(j);
          __m512 s, b;
          bounds(j, mask, s, b);
          best = std::max(best, _mm512_mask_reduce_max_ps(mask, _mm512_sub_ps(s, b)));
        }
        lo[r] = best;
        const __m512 floor = _mm512_set1_ps(best);
        for (int64_t j = 0; j < cols; j += 16) {
          __mmask16 mask = usable(j);
          __m512 s, b;
          bounds(j, mask, s, b);
          const __m512 up = _mm512_add_ps(s, b);
          mask = _mm512_mask_cmp_ps_mask(mask, up, floor, _CMP_GE_OQ);
          alignas(64) float ups[16];
          _mm512_store_ps(ups, up);
          for (; mask; mask &= mask - 1, ++kept[r]) {
            const int i = __builtin_ctz(mask);
            hits[t].push_back({r, c0 + j + i, ups[i]});
          }
        }
        if (kept[r] > kScreenCap) overflow[t * m + r] = 1;
      }
    }
  }
  for (int64_t r = 0; r < m; ++r)
    for (int t = 0; t < num_threads; ++t) full[r] |= overflow[t * m + r];
  // The candidates of each row, in column order, multiplied exactly tile by tile.
  std::vector<std::vector<ScreenHit>> per_row(static_cast<size_t>(m));
  for (int t = 0; t < num_threads; ++t)
    for (const ScreenHit& h : hits[t]) per_row[h.row].push_back(h);
  const int64_t tile_elems = packed_k2(k) * kTile * 2;
  share_tasks(m, m >= 4 ? num_threads : 1, [&](int64_t r) {
    if (full[r]) return;
    float floor = -INFINITY;
    for (int t = 0; t < num_threads; ++t) floor = std::max(floor, lower[t * m + r]);
    std::vector<ScreenHit>& c = per_row[r];
    std::sort(c.begin(), c.end(), [](const ScreenHit& a, const ScreenHit& b) { return a.col < b.col; });
    float v = 0.f;
    int64_t at = -1, tile = -1;
    alignas(64) float exact[16];
    for (const ScreenHit& h : c) {
      if (h.upper < floor) continue;
      if (h.col / 16 != tile) {
        tile = h.col / 16;
        const int64_t width = n - tile * 16 < 16 ? n - tile * 16 : 16;
        gemm_packed_serial<true>(exact, 16, x + r * k, wp + tile * tile_elems, 1, width, k);
      }
      const float e = exact[h.col - tile * 16];
      if (argmax_before(e, h.col, v, at)) {
        at = h.col;
        v = e;
      }
    }
    out[r] = at < 0 ? 0 : at;
  });
}
#endif  // PAGODA_HAS_VNNI_INT8

}  // namespace
