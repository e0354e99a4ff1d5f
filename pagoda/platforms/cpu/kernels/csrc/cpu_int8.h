// W8A8: int8 weights times int8 activations quantized per token, on AMX-INT8 tiles.
//
// Weights are packed once as AMX's int8 B-tile layout: [tile of 16 columns][k / 4][16][4], so sixteen
// consecutive k-quads of a column tile are one 16-row x 64-byte tile (64 inputs). Activations are quantized per
// row (symmetric, scale = amax / 127, round half to even: the same numbers as the torch reference) into int8 rows
// that the A tiles read in place. Products accumulate exactly in int32 and each output is scaled once by its row's
// and its column's scale. As in cpu_amx.h, each thread holds its tile configuration for a call's tasks (AmxTiles).
#pragma once

#include <algorithm>

#include "cpu_amx.h"
#include "cpu_common.h"

namespace {

// x [m, k] bf16 -> q [m, k] int8 and scale [m] with x ~ q * scale; a fixed scale when static_scale > 0. The same
// float32 operations as the reference: amax, scale = max(amax, 1e-10) / 127, round(x / scale) half to even.
inline void quantize_row_int8(const bf16_t* xr, int8_t* q, float* scale, int64_t k, float static_scale) {
  float s = static_scale;
  if (s <= 0.f) {
    float amax = 0.f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 vmax = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(xr + i)));
    amax = _mm512_reduce_max_ps(vmax);
#endif
    for (; i < k; ++i) amax = std::max(amax, std::fabs(bf16_to_f32(xr[i])));
    s = std::max(amax, 1e-10f) / 127.0f;
  }
  *scale = s;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
  for (; i + 16 <= k; i += 16) {
    const __m512 v = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_div_ps(load16(xr + i), vs)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
#endif
  for (; i < k; ++i) {
    const float v = std::nearbyint(bf16_to_f32(xr[i]) / s);  // round half to even (the default rounding mode)
    q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, v)));
  }
}

inline void quantize_rows_int8(const bf16_t* x, int8_t* q, float* scale, int64_t m, int64_t k, float static_scale,
                               int num_threads) {
  share_tasks(m, m >= 16 ? num_threads : 1, [&](int64_t r) {
    quantize_row_int8(x + r * k, q + r * k, scale + r, k, static_scale);
  });
}

#if defined(PAGODA_HAS_AMX) && defined(__AMX_INT8__)
#define PAGODA_HAS_AMX_INT8 1

// acc [RT * 16 rows][16] int32 = q [RT row tiles, k] . one packed column tile.
template <int RT>
inline void amx_int8_pass(int32_t* acc, const int8_t* q, int64_t k, const int8_t* wt) {
  _tile_zero(0);
  if constexpr (RT > 1) _tile_zero(1);
  if constexpr (RT > 2) _tile_zero(2);
  if constexpr (RT > 3) _tile_zero(3);
  const int64_t steps = k / 64;
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(6, wt + s * 16 * 64, 64);
    const int8_t* xs = q + s * 64;
    if constexpr (RT == 1) {
      _tile_loadd(7, xs, k);
      _tile_dpbssd(0, 7, 6);
    } else {
      _tile_loadd(4, xs, k);
      _tile_dpbssd(0, 4, 6);
    }
    if constexpr (RT == 2) {
      _tile_loadd(7, xs + 16 * k, k);
      _tile_dpbssd(1, 7, 6);
    } else if constexpr (RT > 2) {
      _tile_loadd(5, xs + 16 * k, k);
      _tile_dpbssd(1, 5, 6);
    }
    if constexpr (RT == 3) {
      _tile_loadd(7, xs + 32 * k, k);
      _tile_dpbssd(2, 7, 6);
    } else if constexpr (RT > 3) {
      _tile_loadd(4, xs + 32 * k, k);
      _tile_dpbssd(2, 4, 6);
    }
    if constexpr (RT == 4) {
      _tile_loadd(7, xs + 48 * k, k);
      _tile_dpbssd(3, 7, 6);
    }
  }
  _tile_stored(0, acc, 64);
  if constexpr (RT > 1) _tile_stored(1, acc + 16 * 16, 64);
  if constexpr (RT > 2) _tile_stored(2, acc + 32 * 16, 64);
  if constexpr (RT > 3) _tile_stored(3, acc + 48 * 16, 64);
}

// y [m, n] = (q [m, k] . W^T) * xscale[r] * wscale[c] (+ bias) for W packed as above; k a multiple of 64.
template <bool F32Out>
void gemm_int8_amx(void* y, const int8_t* q, const float* xscale, const int8_t* wp, const float* wscale,
                   const float* bias, int64_t m, int64_t n, int64_t k, int num_threads) {
  constexpr int64_t kRows = 64;
  const int64_t tiles = (n + 15) / 16, tile_bytes = k * 16;
  const int64_t mblocks = (m + kRows - 1) / kRows;
  share_tasks_with<AmxTiles>(mblocks * tiles, num_threads, [&](int64_t task, AmxTiles& amx) {
    const int64_t mb = task / tiles, t = task % tiles;
    const int64_t r0 = mb * kRows, rows = (m - r0) < kRows ? (m - r0) : kRows;
    const int row_tiles = static_cast<int>((rows + 15) / 16), last_rows = static_cast<int>(rows - (row_tiles - 1) * 16);
    alignas(64) int32_t acc[kRows * 16];
    amx.configure(row_tiles, last_rows);
    const int8_t* wt = wp + t * tile_bytes;
    const int8_t* qb = q + r0 * k;
    switch (row_tiles) {
      case 4: amx_int8_pass<4>(acc, qb, k, wt); break;
      case 3: amx_int8_pass<3>(acc, qb, k, wt); break;
      case 2: amx_int8_pass<2>(acc, qb, k, wt); break;
      default: amx_int8_pass<1>(acc, qb, k, wt); break;
    }
    const int64_t col = t * 16;
    const __mmask16 mask = tile_columns(n, col);
    const __m512 ws = _mm512_maskz_loadu_ps(mask, wscale + col);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 a = _mm512_cvtepi32_ps(_mm512_load_si512(acc + r * 16));
      const __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(a, _mm512_set1_ps(xscale[r0 + r])), ws, bv);
      if constexpr (F32Out) {
        _mm512_mask_storeu_ps(static_cast<float*>(y) + (r0 + r) * n + col, mask, v);
      } else {
        _mm256_mask_storeu_epi16(static_cast<bf16_t*>(y) + (r0 + r) * n + col, mask, (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  });
}
#endif

}  // namespace
