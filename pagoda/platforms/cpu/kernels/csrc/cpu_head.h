// The greedy LM head's argmax, screened by an int8 copy of the head: exact, from about half the bytes and products.
//
// A greedy head multiplies the whole [n, k] bf16 matrix to find one column per row: bound by memory at a few rows, by
// the multiply-adds at a decode batch. Here an int8 copy (codes per column, symmetric, scale amax / 127: cpu_int8.h's
// packing) is multiplied instead, by the input quantized to int8 per row, except its largest channels (kScreenOutliers
// chosen per call where they stand out, as final hidden states' few huge activations do): those are multiplied in
// float by the exact bf16 weights, so they add neither to the input's int8 step nor to the weights' error. Each
// column's screened value s~ then differs from the exact product by at most
//   B = |x_in| e + |x| f + |w~| (|x_in - x~_in| + 12u |x~_in|) + tiny + 2^-21 |s~|,
// e = |w - w~| and f = (g_k + 16u) |w| (g_k = k u / (1 - k u): the float32 summation bound of the exact kernel; 16u the
// outliers' float sums), computed per column by Python and rounded up; u = 2^-24, norms Euclidean, x_in the input
// without its outlier channels. Every column whose upper bound s~ + B reaches the largest lower bound s~ - B of the
// row (over all threads' columns) is a candidate; the argmax lies among them, so only their tiles are multiplied
// exactly, by the bf16 kernel the full pass uses (same instructions, same order: the same floats), and ties and the
// first-index rule come out as in the full pass. Rows the screen can't bound (a non-finite input, or too many
// candidates) are left to the full pass.
#pragma once

#include <algorithm>

#include "cpu_gemm.h"
#include "cpu_int8.h"

namespace {

#if defined(PAGODA_HAS_VNNI_INT8)
#define PAGODA_HAS_SCREENED_HEAD 1

constexpr int64_t kScreenCols = 5 * kInt8NT * 16;  // 240 columns a slice: whole int8 micro-kernel tile groups
constexpr int64_t kScreenCap = 4096;                // a row's candidates per thread before the full pass takes it
constexpr int kScreenOutliers = 8;                  // input channels multiplied in float, the same for every row
constexpr float kOutlierGain = 0.6f;                 // ... where setting them aside cuts the rows' peak below this

struct ScreenRow {      // one input row's bound terms
  float x_norm, in_norm, resid;  // |x|, |x_in| and |x_in - x~_in| + 12u |x~_in|, rounded up
  float tiny;           // flush-to-zero and denormal slack of the exact kernel
  bool ok;              // finite: the screen applies
};

// The channels multiplied in float: the kScreenOutliers largest relative to their row's norm (finite rows only), or
// none where the next channel is within kOutlierGain of the largest. Final hidden states keep a few huge channels,
// whose removal shrinks the int8 scale of the rest several times over; rows without them (random weights) gain
// little, and each channel costs a scattered read of the bf16 head per 16 columns: a tenth of the screen at one row.
inline std::vector<int64_t> screen_outliers(const bf16_t* x, int64_t m, int64_t k) {
  std::vector<float> score(static_cast<size_t>(k), 0.f);
  for (int64_t r = 0; r < m; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < k; ++i) ss += double(bf16_to_f32(x[r * k + i])) * bf16_to_f32(x[r * k + i]);
    if (!std::isfinite(ss) || ss == 0) continue;
    const float inv = static_cast<float>(1.0 / std::sqrt(ss));
    for (int64_t i = 0; i < k; ++i) score[i] = std::max(score[i], std::fabs(bf16_to_f32(x[r * k + i])) * inv);
  }
  std::vector<int64_t> order(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) order[i] = i;
  const int64_t keep = std::min<int64_t>(kScreenOutliers, k);
  std::partial_sort(order.begin(), order.begin() + std::min<int64_t>(keep + 1, k), order.end(),
                    [&](int64_t a, int64_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
  const bool worth = keep == k || score[order[keep]] < kOutlierGain * score[order[0]];
  order.resize(static_cast<size_t>(worth ? keep : 0));
  return order;
}

// Row r's int8 form without the outlier channels (VNNI's offset codes, zero there) and its scale, the outliers'
// values (xo), and the row's bound terms.
inline ScreenRow screen_quantize(const bf16_t* xr, const std::vector<int64_t>& outliers, uint8_t* xu, float* xscale,
                                 float* xo, int64_t k, int64_t kp, float max_col_norm) {
  std::vector<bf16_t> inliers(xr, xr + k);
  for (size_t o = 0; o < outliers.size(); ++o) {
    xo[o] = bf16_to_f32(xr[outliers[o]]);
    inliers[outliers[o]] = 0;
  }
  quantize_row_int8(inliers.data(), reinterpret_cast<int8_t*>(xu), xscale, k, kp, 0.f, true);
  const double s = *xscale;
  double xx = 0, ii = 0, dd = 0, qq = 0;
  for (int64_t i = 0; i < k; ++i) {
    const double xi = bf16_to_f32(xr[i]), xin = bf16_to_f32(inliers[i]), q = s * (int(xu[i]) - 128);
    xx += xi * xi;
    ii += xin * xin;
    dd += (xin - q) * (xin - q);
    qq += q * q;
  }
  ScreenRow row;
  const double x_norm = std::sqrt(xx), up = 1.0 + 1e-6;
  const double resid = std::sqrt(dd) + 12.0 * std::ldexp(1.0, -24) * std::sqrt(qq);
  // Past 1e30 the screened sums could overflow float: the full pass takes the row.
  row.ok = std::isfinite(x_norm) && x_norm * (1.0 + max_col_norm) < 1e30;
  row.x_norm = static_cast<float>(x_norm * up);
  row.in_norm = static_cast<float>(std::sqrt(ii) * up);
  row.resid = static_cast<float>(resid * up);
  row.tiny = static_cast<float>(double(k) * std::ldexp(1.0, -120) *
                                (1.0 + x_norm * std::sqrt(double(k)) + max_col_norm));
  return row;
}

// The cache lines add_outliers reads from a slice's bf16 tiles (one per outlier channel and tile, scattered over the
// matrix: the hardware prefetchers don't see them coming), fetched into L2 a slice ahead.
inline void prefetch_outliers(const bf16_t* tiles, int64_t cols, const int64_t* outliers, int64_t n_out, int64_t k) {
  const int64_t tile_elems = packed_k2(k) * kTile * 2;
  for (int64_t t = 0; t * 16 < cols; ++t)
    for (int64_t o = 0; o < n_out; ++o)
      _mm_prefetch(reinterpret_cast<const char*>(tiles + t * tile_elems + (outliers[o] / 2) * kTile * 2), _MM_HINT_T1);
}

// y [rows, cols] += each row's outlier values . the exact bf16 weights of those channels (the packed bf16 tiles of
// the slice, `tiles`: packed_k2(k) pairs of 16 columns each).
inline void add_outliers(float* y, int64_t rows, int64_t cols, const float* xo, int64_t n_out,
                         const int64_t* outliers, const bf16_t* tiles, int64_t k) {
  alignas(64) float weights[kScreenOutliers][16];
  const int64_t tile_elems = packed_k2(k) * kTile * 2;
  for (int64_t t = 0; t * 16 < cols; ++t) {
    for (int64_t o = 0; o < n_out; ++o) {  // half i % 2 of each column's pair i / 2: the bf16 bits, as float
      const int64_t i = outliers[o];
      const __m512i pair = _mm512_loadu_si512(tiles + t * tile_elems + (i / 2) * kTile * 2);
      const __m512i bits = i % 2 ? _mm512_and_si512(pair, _mm512_set1_epi32(static_cast<int>(0xffff0000u)))
                                 : _mm512_slli_epi32(pair, 16);
      _mm512_store_ps(weights[o], _mm512_castsi512_ps(bits));
    }
    const __mmask16 mask = tile_columns(cols, t * 16);
    for (int64_t r = 0; r < rows; ++r) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t o = 0; o < n_out; ++o)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(xo[r * kScreenOutliers + o]), _mm512_load_ps(weights[o]), acc);
      float* yr = y + r * cols + t * 16;
      _mm512_mask_storeu_ps(yr, mask, _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, yr)));
    }
  }
}

struct ScreenHit {
  int64_t row, col;
  float upper;
};

// A row's best lower bound over every thread so far, raised to `lower`. Each thread holds a share of the columns; a
// floor of its own share alone lets through every column near its share's best, thousands of them on a real head
// when the row's best column sits in another share.
inline float raise_floor(std::atomic<float>& floor, float lower) {
  float seen = floor.load(std::memory_order_relaxed);
  while (lower > seen && !floor.compare_exchange_weak(seen, lower, std::memory_order_relaxed)) {
  }
  return std::max(seen, lower);
}

// Drops a thread's hits whose upper bound is below their row's floor now, and counts what is left per row.
inline void drop_beaten_hits(std::vector<ScreenHit>& hits, std::vector<int64_t>& kept,
                             const std::vector<std::atomic<float>>& floor) {
  std::fill(kept.begin(), kept.end(), 0);
  size_t left = 0;
  for (const ScreenHit& h : hits)
    if (h.upper >= floor[h.row].load(std::memory_order_relaxed)) {
      hits[left++] = h;
      ++kept[h.row];
    }
  hits.resize(left);
}

// out[r] for each row not `full`: the argmax over its candidates' exact products. Candidates are grouped by column
// tile, and each tile is multiplied once by all of its candidate rows (at 64 rows a real head's candidates share
// most tiles), by the bf16 kernel the full pass uses: each row's sums are the full pass's floats, whatever the rows
// beside it, and the first-index rule holds whatever the order. A row without candidates (all masked) gets 0.
inline void exact_argmax_of_candidates(std::vector<ScreenHit>& cand, const bf16_t* x, const bf16_t* wp, int64_t m,
                                       int64_t n, int64_t k, const uint8_t* full, int64_t* out, int num_threads) {
  std::sort(cand.begin(), cand.end(), [](const ScreenHit& a, const ScreenHit& b) {
    const int64_t ta = a.col / 16, tb = b.col / 16;
    return ta != tb ? ta < tb : (a.row != b.row ? a.row < b.row : a.col < b.col);
  });
  // Chunks of about equal counts, cut at tile boundaries; each keeps its own best per row, merged below.
  const int64_t total = static_cast<int64_t>(cand.size());
  const int64_t want = total >= 256 ? 4 * num_threads : 1;
  std::vector<int64_t> cuts{0};
  for (int64_t c = 1; c < want; ++c) {
    int64_t at = std::max(total * c / want, cuts.back());
    while (at > 0 && at < total && cand[at].col / 16 == cand[at - 1].col / 16) ++at;
    if (at > cuts.back() && at < total) cuts.push_back(at);
  }
  cuts.push_back(total);
  const int64_t chunks = static_cast<int64_t>(cuts.size()) - 1;
  std::vector<float> best(static_cast<size_t>(chunks * m), 0.f);
  std::vector<int64_t> best_at(static_cast<size_t>(chunks * m), -1);
  const int64_t tile_elems = packed_k2(k) * kTile * 2;
  share_tasks(chunks, chunks > 1 ? num_threads : 1, [&](int64_t c) {
    float* v = best.data() + c * m;
    int64_t* at = best_at.data() + c * m;
    std::vector<bf16_t> rows_in(static_cast<size_t>(m * k));
    std::vector<float> exact(static_cast<size_t>(m * 16));
    std::vector<int64_t> slot(static_cast<size_t>(m));
    for (int64_t i = cuts[c], end; i < cuts[c + 1]; i = end) {
      const int64_t tile = cand[i].col / 16, width = n - tile * 16 < 16 ? n - tile * 16 : 16;
      int64_t rows = 0;  // the tile's candidate rows, gathered: one multi-row call, 8 rows a pass
      for (end = i; end < cuts[c + 1] && cand[end].col / 16 == tile; ++end)
        if (end == i || cand[end].row != cand[end - 1].row) {
          std::memcpy(rows_in.data() + rows * k, x + cand[end].row * k, static_cast<size_t>(k) * sizeof(bf16_t));
          slot[cand[end].row] = rows++;
        }
      gemm_packed_serial<true>(exact.data(), 16, rows_in.data(), wp + tile * tile_elems, rows, width, k);
      for (int64_t j = i; j < end; ++j) {
        const ScreenHit& h = cand[j];
        const float e = exact[slot[h.row] * 16 + (h.col - tile * 16)];
        if (argmax_before(e, h.col, v[h.row], at[h.row])) {
          at[h.row] = h.col;
          v[h.row] = e;
        }
      }
    }
  });
  for (int64_t r = 0; r < m; ++r) {
    if (full[r]) continue;
    float v = 0.f;
    int64_t at = -1;
    for (int64_t c = 0; c < chunks; ++c)
      if (best_at[c * m + r] >= 0 && argmax_before(best[c * m + r], best_at[c * m + r], v, at)) {
        at = best_at[c * m + r];
        v = best[c * m + r];
      }
    out[r] = at < 0 ? 0 : at;
  }
}

// out[r] = argmax of row r of x [m, k] . W^T (W bf16, packed for the bf16 GEMM at wp) for the rows whose screen
// holds; full[r] is set for the others (the caller runs the full pass on them). sp: the int8 copy (cpu_int8.h's
// buffer: tiles, scales, code sums); err, qnorm, sum_err: each column's e, |w~| and f, rounded up; max_col_norm: the
// largest |w| and |w~|. allowed: as for pagoda_linear_argmax.
inline void screened_head_argmax(const bf16_t* x, const bf16_t* wp, const int8_t* sp, const float* err,
                                 const float* qnorm, const float* sum_err, float max_col_norm, int64_t m, int64_t n,
                                 int64_t k, int64_t* out, uint8_t* full, int num_threads, const int32_t* allowed) {
  const int64_t kp = (k + 63) / 64 * 64, cols_padded = (n + 15) / 16 * 16, tile_bytes = 16 * kp;
  const float* wscale = reinterpret_cast<const float*>(sp + cols_padded * kp);
  const int32_t* colsum = reinterpret_cast<const int32_t*>(wscale + cols_padded);
  aligned_vector<uint8_t> xu(static_cast<size_t>(m * kp));
  std::vector<float> xscale(static_cast<size_t>(m)), xo(static_cast<size_t>(m * kScreenOutliers));
  std::vector<ScreenRow> rows(static_cast<size_t>(m));
  const std::vector<int64_t> outliers = screen_outliers(x, m, k);
  share_tasks(m, m >= 16 ? num_threads : 1, [&](int64_t r) {
    rows[r] = screen_quantize(x + r * k, outliers, xu.data() + r * kp, xscale.data() + r,
                              xo.data() + r * kScreenOutliers, k, kp, max_col_norm);
    full[r] = rows[r].ok ? 0 : 1;
  });
  const int64_t slices = (n + kScreenCols - 1) / kScreenCols;
  std::vector<std::atomic<float>> floor_of(static_cast<size_t>(m));
  for (auto& f : floor_of) f.store(-INFINITY, std::memory_order_relaxed);
  std::vector<std::vector<ScreenHit>> hits(static_cast<size_t>(num_threads));
  std::vector<uint8_t> overflow(static_cast<size_t>(num_threads * m), 0);
  const int8_t* s_end = sp + cols_padded * kp;
  TaskShares shares(slices, num_threads);
#pragma omp parallel num_threads(num_threads)
  {
    const int t = omp_get_thread_num();
    std::vector<float> buf(static_cast<size_t>(m * kScreenCols));
    std::vector<int64_t> kept(static_cast<size_t>(m), 0);
    for (int64_t sl; (sl = shares.next(t)) >= 0;) {
      const int64_t c0 = sl * kScreenCols, cols = n - c0 < kScreenCols ? n - c0 : kScreenCols;
      const int8_t* base = sp + (c0 / 16) * tile_bytes;
      if (!outliers.empty() && c0 + kScreenCols < n)  // this thread's next slice, usually (contiguous shares)
        prefetch_outliers(wp + (c0 / 16 + kScreenCols / 16) * packed_k2(k) * kTile * 2,
                          std::min(kScreenCols, n - c0 - kScreenCols), outliers.data(),
                          static_cast<int64_t>(outliers.size()), k);
      for (int64_t g = 0; g * 16 * kInt8NT < cols; ++g) {
        const int64_t tile0 = g * kInt8NT, left = (cols - tile0 * 16 + 15) / 16;
        const int8_t* next = base + (tile0 + kInt8NT) * tile_bytes;
        const int8_t* ahead = next + kInt8NT * tile_bytes <= s_end ? next : nullptr;
        if (left >= 3)
          int8_vnni_rows<3, true>(m, buf.data(), cols, xu.data(), xscale.data(), kp, base, wscale + c0,
                                  colsum + c0, nullptr, tile0, ahead);
        else if (left == 2)
          int8_vnni_rows<2, true>(m, buf.data(), cols, xu.data(), xscale.data(), kp, base, wscale + c0,
                                  colsum + c0, nullptr, tile0, ahead);
        else
          int8_vnni_rows<1, true>(m, buf.data(), cols, xu.data(), xscale.data(), kp, base, wscale + c0,
                                  colsum + c0, nullptr, tile0, ahead);
      }
      if (!outliers.empty())
        add_outliers(buf.data(), m, cols, xo.data(), static_cast<int64_t>(outliers.size()), outliers.data(),
                     wp + (c0 / 16) * packed_k2(k) * kTile * 2, k);
      for (int64_t r = 0; r < m; ++r) {
        if (!rows[r].ok || overflow[t * m + r]) continue;
        float* y = buf.data() + r * cols;  // screened values, overwritten by their upper bounds
        const __m512 xn = _mm512_set1_ps(rows[r].x_norm), rs = _mm512_set1_ps(rows[r].resid);
        const __m512 xi = _mm512_set1_ps(rows[r].in_norm);
        const __m512 tiny = _mm512_set1_ps(rows[r].tiny), rel = _mm512_set1_ps(std::ldexp(1.0f, -21));
        const __m512 none = _mm512_set1_ps(-INFINITY);
        const uint32_t* words = allowed ? reinterpret_cast<const uint32_t*>(allowed) + r * ((n + 31) / 32) : nullptr;
        __m512 best_lower = none;
        for (int64_t j = 0; j < cols; j += 16) {
          __mmask16 mask = tile_columns(cols, j);  // valid columns, and allowed ones where a mask is given
          if (words) {
            const int64_t c = c0 + j;  // c0 and j are multiples of 16: the 16 bits sit in one word
            mask &= static_cast<__mmask16>(words[c >> 5] >> (c & 31));
          }
          const __m512 sv = _mm512_maskz_loadu_ps(mask, y + j);
          __m512 b = _mm512_fmadd_ps(rel, _mm512_abs_ps(sv), tiny);
          b = _mm512_fmadd_ps(rs, _mm512_maskz_loadu_ps(mask, qnorm + c0 + j), b);
          b = _mm512_fmadd_ps(xi, _mm512_maskz_loadu_ps(mask, err + c0 + j), b);
          b = _mm512_fmadd_ps(xn, _mm512_maskz_loadu_ps(mask, sum_err + c0 + j), b);
          best_lower = _mm512_mask_max_ps(best_lower, mask, best_lower, _mm512_sub_ps(sv, b));
          const __m512 upper = _mm512_mask_blend_ps(mask, none, _mm512_add_ps(sv, b));
          _mm512_mask_storeu_ps(y + j, tile_columns(cols, j), upper);
        }
        const __m512 floor = _mm512_set1_ps(raise_floor(floor_of[r], _mm512_reduce_max_ps(best_lower)));
        for (int64_t j = 0; j < cols; j += 16) {
          const __mmask16 valid = tile_columns(cols, j);
          const __m512 up = _mm512_maskz_loadu_ps(valid, y + j);
          __mmask16 mask = _mm512_mask_cmp_ps_mask(valid, up, floor, _CMP_GE_OQ);
          for (; mask; mask &= mask - 1, ++kept[r]) {
            const int i = __builtin_ctz(mask);
            hits[t].push_back({r, c0 + j + i, y[j + i]});
          }
        }
        if (kept[r] > kScreenCap) {
          drop_beaten_hits(hits[t], kept, floor_of);
          if (kept[r] > kScreenCap) overflow[t * m + r] = 1;
        }
      }
    }
  }
  for (int64_t r = 0; r < m; ++r)
    for (int t = 0; t < num_threads; ++t) full[r] |= overflow[t * m + r];
  std::vector<ScreenHit> cand;  // the hits still above their row's floor, for the rows the screen holds
  for (int t = 0; t < num_threads; ++t)
    for (const ScreenHit& h : hits[t])
      if (!full[h.row] && h.upper >= floor_of[h.row].load(std::memory_order_relaxed)) cand.push_back(h);
  exact_argmax_of_candidates(cand, x, wp, m, n, k, full, out, num_threads);
}
#endif  // PAGODA_HAS_VNNI_INT8

}  // namespace
