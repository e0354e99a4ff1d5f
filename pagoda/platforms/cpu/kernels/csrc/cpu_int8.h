// W8A8: int8 weights times int8 activations quantized per token, on AMX-INT8 tiles or with AVX512-VNNI.
//
// Weights are packed once, their inputs zero-padded to kp (k rounded up to 64), as AMX's int8 B-tile layout: [tile of
// 16 columns][kp / 4][16][4], so sixteen consecutive k-quads of a column tile are one 16-row x 64-byte tile (64
// inputs), and one k-quad of a column tile is the 64-byte vector vpdpbusd multiplies. After the tiles come the float32
// scale per column and the int32 sum of each column's codes (both padded to whole tiles). Activations are quantized per
// row (symmetric, scale = amax / 127, round half to even: the same numbers as the torch reference) into int8 rows that
// the A tiles read in place. Products accumulate exactly in int32 and each output is scaled once by its row's and its
// column's scale. As in cpu_amx.h, each thread holds its tile configuration for a call's tasks (AmxTiles).
//
// vpdpbusd multiplies unsigned by signed bytes, so the VNNI path stores activations offset by 128 (q + 128, 0..255)
// and subtracts 128 x the column's code sum: sum((q + 128) w) - 128 sum(w) = sum(q w), the same exact integers.
#pragma once

#include <algorithm>

#include "cpu_amx.h"
#include "cpu_common.h"

namespace {

// x [m, k] bf16 -> q [m, k] int8 and scale [m] with x ~ q * scale; a fixed scale when static_scale > 0. The same
// float32 operations as the reference: amax, scale = max(amax, 1e-10) / 127, round(x / scale) half to even.
// offset: store q + 128 as unsigned bytes (the VNNI path's activations) instead of q. q has kp >= k codes: those past
// k are zero (they meet the weights' zero padding).
inline void quantize_row_int8(const bf16_t* xr, int8_t* q, float* scale, int64_t k, int64_t kp, float static_scale,
                              bool offset) {
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
  const __m128i flip = _mm_set1_epi8(offset ? static_cast<char>(0x80) : 0);  // x ^ 0x80 = x + 128 as unsigned
  for (; i + 16 <= k; i += 16) {
    const __m512 v = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_div_ps(load16(xr + i), vs)));
    const __m128i c = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm_xor_si128(c, flip));
  }
#endif
  for (; i < k; ++i) {
    const float v = std::nearbyint(bf16_to_f32(xr[i]) / s);  // round half to even (the default rounding mode)
    const int c = static_cast<int>(std::min(127.0f, std::max(-128.0f, v)));
    q[i] = static_cast<int8_t>(offset ? static_cast<uint8_t>(c + 128) : c);
  }
  std::memset(q + k, offset ? 0x80 : 0, static_cast<size_t>(kp - k));
}

inline void quantize_rows_int8(const bf16_t* x, int8_t* q, float* scale, int64_t m, int64_t k, int64_t kp,
                               float static_scale, int num_threads, bool offset) {
  share_tasks(m, m >= 16 ? num_threads : 1, [&](int64_t r) {
    quantize_row_int8(x + r * k, q + r * kp, scale + r, k, kp, static_scale, offset);
  });
}

#if defined(__AVX512BF16__)
// One output vector of 16 columns from its int32 sums: sums * row scale * column scales (+ bias), stored as bf16 or
// float32 under the mask of valid columns. The AMX and VNNI paths both end here, so they give the same numbers.
template <bool F32Out>
inline void store_int8_outputs(void* y, int64_t at, __m512i sums, float xscale, __m512 ws, __m512 bv, __mmask16 mask) {
  const __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(xscale)), ws, bv);
  if constexpr (F32Out) {
    _mm512_mask_storeu_ps(static_cast<float*>(y) + at, mask, v);
  } else {
    _mm256_mask_storeu_epi16(static_cast<bf16_t*>(y) + at, mask, (__m256i)_mm512_cvtneps_pbh(v));
  }
}
#endif  // __AVX512BF16__

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
    for (int64_t r = 0; r < rows; ++r)
      store_int8_outputs<F32Out>(y, (r0 + r) * n + col, _mm512_load_si512(acc + r * 16), xscale[r0 + r], ws, bv, mask);
  });
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#define PAGODA_HAS_VNNI_INT8 1

constexpr int kInt8MR = 8;  // rows per micro-kernel: 8 x 3 accumulators + 3 weight vectors fit 32 registers
constexpr int kInt8NT = 3;  // column tiles per micro-kernel (48 outputs)

// y rows [0, MR) x column tiles [tile0, tile0 + NT) = xu (q + 128, rows of k) . W, one k-quad per step: NT weight
// vectors, each row's quad broadcast, MR x NT vpdpbusd. `ahead`: weights this thread reads next, prefetched into L2
// over the pass (as the bf16 micro-kernel does).
template <int MR, int NT, bool F32Out>
inline void int8_vnni_micro_kernel(void* y, int64_t n, const uint8_t* xu, const float* xscale, int64_t k,
                                   const int8_t* wp, const float* wscale, const int32_t* colsum, const float* bias,
                                   int64_t tile0, const char* ahead, int64_t ahead_bytes) {
  const int64_t quads = k / 4, tile_bytes = 16 * k;
  const int64_t ahead_lines = ahead_bytes / 64, lines_per_step = (ahead_lines + quads - 1) / quads;
  // Typed as vpdpbusd's own operands (__v16si): accumulators declared __m512i stay in memory across the loop (GCC 12
  // does not promote the array to registers through the casts the intrinsic makes).
  __v16si acc[MR][NT];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = (__v16si)_mm512_setzero_si512();
  const int8_t* w0 = wp + tile0 * tile_bytes;
  for (int64_t s = 0; s < quads; ++s) {
    __v16si b[NT];
    for (int t = 0; t < NT; ++t) b[t] = (__v16si)_mm512_loadu_si512(w0 + t * tile_bytes + s * 64);
    for (int64_t l = s * lines_per_step; l < (s + 1) * lines_per_step && l < ahead_lines; ++l)
      _mm_prefetch(ahead + l * 64, _MM_HINT_T1);
    for (int r = 0; r < MR; ++r) {
      int32_t quad;
      std::memcpy(&quad, xu + r * k + 4 * s, 4);
      const __v16si a = (__v16si)_mm512_set1_epi32(quad);
      for (int t = 0; t < NT; ++t) acc[r][t] = __builtin_ia32_vpdpbusd_v16si(acc[r][t], a, b[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    const int64_t col = (tile0 + t) * 16;
    const __mmask16 mask = tile_columns(n, col);
    const __m512 ws = _mm512_maskz_loadu_ps(mask, wscale + col);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(colsum + col), 7);  // 128 x the column's code sum
    for (int r = 0; r < MR; ++r)
      store_int8_outputs<F32Out>(y, r * n + col, _mm512_sub_epi32((__m512i)acc[r][t], offset), xscale[r], ws, bv,
                                 mask);
  }
}

// A task's rows in passes of kInt8MR, then the remainder.
template <int NT, bool F32Out>
inline void int8_vnni_rows(int64_t rows, void* y, int64_t n, const uint8_t* xu, const float* xscale, int64_t k,
                           const int8_t* wp, const float* wscale, const int32_t* colsum, const float* bias,
                           int64_t tile0, const int8_t* ahead) {
  const int64_t esz = F32Out ? 4 : 2;
  row_passes<kInt8MR>(rows, ahead, NT * 16 * k, [&](auto mr, int64_t r, const char* pa, int64_t pl) {
    int8_vnni_micro_kernel<decltype(mr)::value, NT, F32Out>(static_cast<char*>(y) + r * n * esz, n, xu + r * k,
                                                            xscale + r, k, wp, wscale, colsum, bias, tile0, pa, pl);
  });
}

// y [m, n] = (q [m, k] . W^T) * xscale[r] * wscale[c] (+ bias) with xu = q + 128 (quantize_rows_int8's offset form)
// and W packed as above; k a multiple of 64. Tasks as in the bf16 GEMM (share_gemm_tasks), kInt8NT tiles a group.
template <bool F32Out>
void gemm_int8_vnni(void* y, const uint8_t* xu, const float* xscale, const int8_t* wp, const float* wscale,
                    const int32_t* colsum, const float* bias, int64_t m, int64_t n, int64_t k, int num_threads) {
  const int64_t esz = F32Out ? 4 : 2;
  share_gemm_tasks(m, (n + 15) / 16, kInt8NT, 128, 2 * kInt8MR, num_threads,
                   [&](int64_t r0, int64_t rows, int64_t tile0, int64_t nt, bool next_group) {
    void* yb = static_cast<char*>(y) + r0 * n * esz;
    const uint8_t* xb = xu + r0 * k;
    const float* xs = xscale + r0;
    const int8_t* ahead = next_group ? wp + (tile0 + kInt8NT) * 16 * k : nullptr;
    switch (nt) {
      case 3: int8_vnni_rows<3, F32Out>(rows, yb, n, xb, xs, k, wp, wscale, colsum, bias, tile0, ahead); break;
      case 2: int8_vnni_rows<2, F32Out>(rows, yb, n, xb, xs, k, wp, wscale, colsum, bias, tile0, ahead); break;
      default: int8_vnni_rows<1, F32Out>(rows, yb, n, xb, xs, k, wp, wscale, colsum, bias, tile0, ahead); break;
    }
  });
}
#endif

// y [m, n] = x [m, k] (bf16, quantized to int8 per row here, or with static_scale > 0) . W^T * wscale (+ bias) for W
// packed as above (wp: the whole buffer, scales and column sums after the tiles); on AMX tiles when amx (the caller
// holds AMX's permission), else with VNNI. Returns false when this build lacks the path.
template <bool F32Out>
bool gemm_int8(void* y, const bf16_t* x, const int8_t* wp, const float* bias, int64_t m, int64_t n, int64_t k,
               float static_scale, bool amx, int num_threads) {
  const int64_t kp = (k + 63) / 64 * 64, cols = (n + 15) / 16 * 16;
  const float* wscale = reinterpret_cast<const float*>(wp + cols * kp);
  aligned_vector<int8_t> q(static_cast<size_t>(m * kp));
  std::vector<float> xscale(static_cast<size_t>(m));
#if defined(PAGODA_HAS_AMX_INT8)
  if (amx) {
    quantize_rows_int8(x, q.data(), xscale.data(), m, k, kp, static_scale, num_threads, false);
    gemm_int8_amx<F32Out>(y, q.data(), xscale.data(), wp, wscale, bias, m, n, kp, num_threads);
    return true;
  }
#endif
#if defined(PAGODA_HAS_VNNI_INT8)
  if (!amx) {
    const int32_t* colsum = reinterpret_cast<const int32_t*>(wscale + cols);
    quantize_rows_int8(x, q.data(), xscale.data(), m, k, kp, static_scale, num_threads, true);
    gemm_int8_vnni<F32Out>(y, reinterpret_cast<const uint8_t*>(q.data()), xscale.data(), wp, wscale, colsum, bias, m,
                           n, kp, num_threads);
    return true;
  }
#endif
  (void)y; (void)x; (void)wp; (void)bias; (void)m; (void)n; (void)static_scale; (void)amx; (void)num_threads;
  (void)wscale;
  return false;
}

}  // namespace
