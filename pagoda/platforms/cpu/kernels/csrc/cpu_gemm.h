// GEMMs on bf16 weights packed once after loading, and the row argmax (block-quantized weights: cpu_quant_gemm.h).
#pragma once

#include "cpu_amx.h"
#include "cpu_common.h"

namespace {

#if defined(__AVX512BF16__)
// ---- bf16 GEMM on packed weights ---------------------------------------------------------------------------------
// Weights are packed once after loading into tiles of 16 output columns in the pair-interleaved order vdpbf16ps
// consumes: packed[tile][k / 2][column][k % 2], zero-padded to whole tiles and an even K. One instruction then
// multiplies a broadcast pair x[m, k:k+2] by a tile's 16 columns and accumulates 16 float32 outputs.
constexpr int64_t kTile = 16;
constexpr int64_t kBlockM = 128;  // rows of x kept hot in L2 while a group of tiles streams past them
constexpr int kNT = 3;            // tiles per micro-kernel (48 output columns)
constexpr int kMR = 8;            // rows per micro-kernel: 8 x 3 accumulators + 3 weight vectors fit 32 registers,
                                  // and a 64-row decode batch is 8 whole passes

inline int64_t packed_k2(int64_t k) { return (k + 1) / 2; }
// A pass streams its tile group's weights through L1 (a 3-tile group is 55 KB at K = 576), so the next pass over the
// same group starts on L1 misses until the hardware prefetcher catches up again; the last kRestart steps of a pass
// that has a successor fetch the next one's first steps (and its input rows) into L1. 2048-row GEMMs at K = 576:
// 375-390 -> 400-415 GFLOP/s on a Zen 4 core pair.
constexpr int64_t kRestart = 16;

// A micro-kernel's MR x NT tiles of sums to y (columns from tile0 * kTile, masked at n): each column's sum times
// col_scale (or null) plus bias (or null), in float32 or rounded to bf16.
template <int MR, int NT, bool F32Out>
inline void store_micro_tile(void* y, int64_t ldy, const __m512 (&acc)[MR][NT], int64_t tile0, int64_t n,
                             const float* bias, const float* col_scale) {
  for (int t = 0; t < NT; ++t) {
    const int64_t col = (tile0 + t) * kTile;
    const __mmask16 mask = tile_columns(n, col);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    const __m512 sv = col_scale ? _mm512_maskz_loadu_ps(mask, col_scale + col) : _mm512_set1_ps(1.f);
    for (int r = 0; r < MR; ++r) {
      const __m512 v = col_scale ? _mm512_fmadd_ps(acc[r][t], sv, bv) : _mm512_add_ps(acc[r][t], bv);
      if constexpr (F32Out) {
        _mm512_mask_storeu_ps(static_cast<float*>(y) + r * ldy + col, mask, v);
      } else {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16(static_cast<bf16_t*>(y) + r * ldy + col, mask, h);
      }
    }
  }
}

// ``col_scale`` (or null): each column's sum is multiplied by it before the bias (weights decoded from codes with one
// scale per column). ``ahead`` / ``ahead_bytes``: a slice of the weights this thread reads next, fetched into L2 while
// this pass computes. The hardware prefetchers stop at page boundaries, so a weight matrix larger than the caches (an
// LM head) otherwise arrives one miss at a time; spreading the prefetches over all the passes of a tile group keeps the
// number in flight small enough not to be dropped. ``next_rows``: the rows of the pass over the same weights that
// follows this one (0: none).
template <int MR, int NT, bool F32Out>
inline void micro_kernel(void* y, int64_t ldy, const bf16_t* x, int64_t k, const bf16_t* wp, int64_t tile0,
                         int64_t n, const float* bias, const char* ahead, int64_t ahead_bytes,
                         const float* col_scale, int64_t next_rows) {
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
    if (next_rows > 0 && p >= k2 - kRestart) {  // the next pass's first weight lines and input rows, back into L1
      const int64_t q = p - (k2 - kRestart);
      for (int t = 0; t < NT; ++t)
        _mm_prefetch(reinterpret_cast<const char*>(w0 + t * tile_elems + q * kTile * 2), _MM_HINT_T0);
      if (q < next_rows) _mm_prefetch(reinterpret_cast<const char*>(x + (MR + q) * k), _MM_HINT_T0);
    }
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
  store_micro_tile<MR, NT, F32Out>(y, ldy, acc, tile0, n, bias, col_scale);
}

// Rows of x in passes of MR (kMR, or 6 with groups of 4 tiles: 24 accumulators either way).
template <int NT, bool F32Out, int MR = kMR>
inline void rows_kernel(int64_t rows, void* y, int64_t ldy, const bf16_t* x, int64_t k, const bf16_t* wp,
                        int64_t tile0, int64_t n, const float* bias, const bf16_t* ahead,
                        const float* col_scale = nullptr) {
  const int64_t esz = F32Out ? 4 : 2;
  row_passes<MR>(rows, ahead, NT * packed_k2(k) * kTile * 2 * 2, [&](auto mr, int64_t r, const char* pa, int64_t pl) {
    const int64_t left = rows - r - decltype(mr)::value;  // rows after this pass
    micro_kernel<decltype(mr)::value, NT, F32Out>(static_cast<char*>(y) + r * ldy * esz, ldy, x + r * k, k, wp, tile0,
                                                  n, bias, pa, pl, col_scale, left < MR ? left : MR);
  });
}

// ``amx``: take AMX tiles where they apply (the caller has AMX's permission; k a multiple of 32, enough rows).
template <bool F32Out>
void gemm_packed(void* y, int64_t ldy, const bf16_t* x, const bf16_t* wp, const float* bias, int64_t m, int64_t n,
                 int64_t k, int num_threads, bool amx = false) {
#if defined(PAGODA_HAS_AMX)
  if (bf16_on_amx(amx, m, k)) {
    gemm_packed_amx<F32Out>(y, ldy, x, wp, bias, m, n, k, num_threads);
    return;
  }
#else
  (void)amx;
#endif
  const int64_t tiles = (n + kTile - 1) / kTile, esz = F32Out ? 4 : 2;
  share_gemm_tasks(m, tiles, kNT, kBlockM, 2 * kMR, num_threads,
                   [&](int64_t r0, int64_t rows, int64_t tile0, int64_t nt, bool next_group) {
    void* yb = static_cast<char*>(y) + r0 * ldy * esz;
    const bf16_t* xb = x + r0 * k;
    // This thread's next task is usually the next one of its share, the next group: prefetch its weights (a full
    // group of kNT tiles is valid memory whenever a next group exists).
    const bf16_t* ahead = next_group ? wp + (tile0 + kNT) * packed_k2(k) * kTile * 2 : nullptr;
    switch (nt) {
      case 4: rows_kernel<4, F32Out>(rows, yb, ldy, xb, k, wp, tile0, n, bias, ahead); break;
      case 3: rows_kernel<3, F32Out>(rows, yb, ldy, xb, k, wp, tile0, n, bias, ahead); break;
      case 2: rows_kernel<2, F32Out>(rows, yb, ldy, xb, k, wp, tile0, n, bias, ahead); break;
      default: rows_kernel<1, F32Out>(rows, yb, ldy, xb, k, wp, tile0, n, bias, ahead); break;
    }
  });
}

// y [m, n] = x [m, k] . packed weights, on the calling thread (for kernels that parallelise over other work), in
// column groups of GroupTiles tiles: kNT (8-row passes), or 4 (6-row passes) for small operands whose column count
// is usually a multiple of 64 (attention: head sizes, chunks of keys), so no group is left with a lone,
// broadcast-bound tile. With wp_end (the end of the packed matrix wp points into), each tile group prefetches the
// next group's weights. col_scale: as for micro_kernel.
template <bool F32Out, int GroupTiles = kNT>
void gemm_packed_serial(void* y, int64_t ldy, const bf16_t* x, const bf16_t* wp, int64_t m, int64_t n, int64_t k,
                        const bf16_t* wp_end = nullptr, const float* col_scale = nullptr) {
  static_assert(GroupTiles >= 1 && GroupTiles <= 4, "micro-kernels exist for 1 to 4 tiles");
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t group_elems = GroupTiles * packed_k2(k) * kTile * 2;
  for (int64_t tile0 = 0; tile0 < tiles; tile0 += GroupTiles) {
    const bf16_t* next = wp + (tile0 + GroupTiles) * packed_k2(k) * kTile * 2;
    const bf16_t* ahead = wp_end && next + group_elems <= wp_end ? next : nullptr;
    switch (tiles - tile0 < GroupTiles ? tiles - tile0 : GroupTiles) {
      case 4: rows_kernel<4, F32Out, 6>(m, y, ldy, x, k, wp, tile0, n, nullptr, ahead, col_scale); break;
      case 3: rows_kernel<3, F32Out>(m, y, ldy, x, k, wp, tile0, n, nullptr, ahead, col_scale); break;
      case 2: rows_kernel<2, F32Out>(m, y, ldy, x, k, wp, tile0, n, nullptr, ahead, col_scale); break;
      default: rows_kernel<1, F32Out>(m, y, ldy, x, k, wp, tile0, n, nullptr, ahead, col_scale); break;
    }
  }
}

#endif  // __AVX512BF16__

// Whether the value v at index i comes before (best, at) in torch's argmax order: a NaN before any number, the
// lower index among NaNs and among equal values, else the larger value. at < 0: nothing yet.
inline bool argmax_before(float v, int64_t i, float best, int64_t at) {
  if (at < 0) return true;
  const bool nan = v != v, best_nan = best != best;
  if (nan != best_nan) return nan;
  if (nan || v == best) return i < at;
  return v > best;
}

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
