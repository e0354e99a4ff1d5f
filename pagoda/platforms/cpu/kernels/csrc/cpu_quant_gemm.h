// GEMMs on block-quantized weights (the layouts of cpu_quant_layout.h) with bf16 activations, on AVX512-BF16 and on
// AMX tiles.
#pragma once

#include "cpu_amx.h"
#include "cpu_common.h"
#include "cpu_gemm.h"
#include "cpu_quant_layout.h"

namespace {

#if defined(__AVX512BF16__)
// ahead: the tile this thread multiplies next (or null), prefetched a group at a time meanwhile: at decode sizes
// the kernel streams its codes from memory, and the hardware prefetchers stop at page boundaries.
template <int Bits, int MR, bool F32Out>
inline void quant_tile(void* y, int64_t ldy, const bf16_t* x, const float* xsum, int64_t k, const uint8_t* tile,
                       int64_t col, int64_t n, const uint8_t* ahead = nullptr) {
  constexpr int64_t G = QLayout<Bits>::group;
  const int64_t groups = k / G;
  const int64_t sum_groups = k / QLayout<Bits>::sum_width;  // xsum: sums of 32 (of G for the affine kinds)
  constexpr int D = QLayout<Bits>::decoder;
  const DecodeTables<D> tables;
  __m512 out[MR], part[MR];
  for (int r = 0; r < MR; ++r) out[r] = part[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* blk = tile + g * QLayout<Bits>::block_bytes;
    if (ahead != nullptr)
      for (int64_t b = 0; b < QLayout<Bits>::block_bytes; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + g * QLayout<Bits>::block_bytes + b), _MM_HINT_T0);
    if constexpr (!QLayout<Bits>::uniform)
      for (int r = 0; r < MR; ++r) part[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < G / 2; ++p) {
      const __m512bh w = (__m512bh)decode_pairs<D>(blk, p, tables.t);
      for (int r = 0; r < MR; ++r) {
        uint32_t pair;
        std::memcpy(&pair, x + r * k + g * G + 2 * p, 4);
        part[r] = _mm512_dpbf16_ps(part[r], (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)), w);
      }
    }
    const uint8_t* params = blk + QLayout<Bits>::code_bytes;
    if constexpr (QLayout<Bits>::uniform) {  // scaled once, after the last group
      if (g == groups - 1) {
        const __m512 sc = _mm512_loadu_ps(reinterpret_cast<const float*>(params));
        for (int r = 0; r < MR; ++r) out[r] = _mm512_mul_ps(part[r], sc);
      }
    } else if constexpr (Bits == 4 || QLayout<Bits>::affine) {  // one activation sum per group
      const __m512 sc = _mm512_loadu_ps(reinterpret_cast<const float*>(params));
      const __m512 of = _mm512_loadu_ps(reinterpret_cast<const float*>(params + 64));
      for (int r = 0; r < MR; ++r)
        out[r] = _mm512_fmadd_ps(of, _mm512_set1_ps(xsum[r * sum_groups + g]), _mm512_fmadd_ps(part[r], sc, out[r]));
    } else if constexpr (QLayout<Bits>::zero) {
      constexpr int64_t per = G / kGroup;  // sums of 32 in this group
      const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params)));
      const __m512 zr = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params + 32)));
      for (int r = 0; r < MR; ++r) {
        float xs = 0.f;
        for (int64_t j = 0; j < per; ++j) xs += xsum[r * sum_groups + g * per + j];
        out[r] = _mm512_fmadd_ps(_mm512_fnmadd_ps(zr, _mm512_set1_ps(xs), part[r]), sc, out[r]);
      }
    } else if constexpr (Bits == kE4M3) {
      const __m512 sc = _mm512_loadu_ps(reinterpret_cast<const float*>(params));
      for (int r = 0; r < MR; ++r) out[r] = _mm512_fmadd_ps(part[r], sc, out[r]);
    } else {
      const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params)));
      for (int r = 0; r < MR; ++r) out[r] = _mm512_fmadd_ps(part[r], sc, out[r]);
    }
  }
  const __mmask16 mask = tile_columns(n, col);
  for (int r = 0; r < MR; ++r) {
    if constexpr (F32Out) {
      _mm512_mask_storeu_ps(static_cast<float*>(y) + r * ldy + col, mask, out[r]);
    } else {
      _mm256_mask_storeu_epi16(static_cast<bf16_t*>(y) + r * ldy + col, mask, (__m256i)_mm512_cvtneps_pbh(out[r]));
    }
  }
}

// y [m, n] = x . W^T for W packed as cpu_quant_layout.h describes; xsum: group_sums(x, m, k, quant_sum_width(kind)),
// for callers that run several column ranges of one x (computed here when null).
template <int Bits, bool F32Out>
void quant_gemm_amx(void* y, const bf16_t* x, const uint8_t* packed, int64_t m, int64_t n, int64_t k,
                    int num_threads, const float* xsum);
template <int Bits, bool F32Out>
void quant_gemm_amx_uniform(void* y, const bf16_t* x, const uint8_t* packed, int64_t m, int64_t n, int64_t k,
                            int num_threads);
template <int Bits, bool F32Out>
void quant_gemm_uniform_tiles(void* y, const bf16_t* x, const uint8_t* packed, int64_t m, int64_t n, int64_t k,
                              int num_threads);
constexpr int64_t kUniformTileRows = 16;  // from this many rows, one-scale-per-column kinds decode tiles first

// amx: take AMX tiles from kAmxMinRows rows (the caller has AMX's permission).
template <int Bits, bool F32Out>
void quant_gemm(void* y, const bf16_t* x, const uint8_t* packed, int64_t m, int64_t n, int64_t k, int num_threads,
                const float* xsum = nullptr, bool amx = false) {
  const int64_t groups = k / QLayout<Bits>::sum_width, tiles = (n + 15) / 16;
  const int64_t tile_bytes = k / QLayout<Bits>::group * QLayout<Bits>::block_bytes;
  const int64_t esz = F32Out ? 4 : 2;
  std::vector<float> own;
  if (xsum == nullptr && QLayout<Bits>::sums) {  // only offsets and zeros read the group sums
    own = group_sums(x, m, k, QLayout<Bits>::sum_width);
    xsum = own.data();
  }
#if defined(PAGODA_HAS_AMX)
  // A tile product sums 32 inputs: groups of 16 (each with its own scale) stay on the AVX512-BF16 kernel.
  if constexpr (QLayout<Bits>::group >= 32) {
    if (amx && m >= kAmxMinRows) {
      if constexpr (QLayout<Bits>::uniform) quant_gemm_amx_uniform<Bits, F32Out>(y, x, packed, m, n, k, num_threads);
      else quant_gemm_amx<Bits, F32Out>(y, x, packed, m, n, k, num_threads, xsum);
      return;
    }
  }
#else
  (void)amx;
#endif
  if constexpr (QLayout<Bits>::uniform) {
    if (m >= kUniformTileRows) {
      quant_gemm_uniform_tiles<Bits, F32Out>(y, x, packed, m, n, k, num_threads);
      return;
    }
  }
  const int64_t mblocks = (m + kBlockM - 1) / kBlockM;
  share_tasks(mblocks * tiles, num_threads, [&](int64_t task) {
    const int64_t mb = task / tiles, t = task % tiles;
    const int64_t r_end = (mb + 1) * kBlockM < m ? (mb + 1) * kBlockM : m;
    const uint8_t* tile = packed + t * tile_bytes;
    // A thread takes its tasks in order: at one row block (decode sizes), its next tile is the following one,
    // prefetched during the first pass over this tile where that pays (prefetch_next_quant_tile).
    const bool fetch = mblocks == 1 && t + 1 < tiles && prefetch_next_quant_tile();
    const uint8_t* ahead = fetch ? tile + tile_bytes : nullptr;
    int64_t r = mb * kBlockM;
    auto pass = [&](auto rows, int64_t r0) {
      quant_tile<Bits, decltype(rows)::value, F32Out>(static_cast<char*>(y) + r0 * n * esz, n, x + r0 * k,
                                                      xsum + r0 * groups, k, tile, t * 16, n, ahead);
    };
    for (; r + kQMR <= r_end; r += kQMR, ahead = nullptr) pass(std::integral_constant<int, kQMR>{}, r);
    remainder_pass<1, kQMR>(r_end - r, r, pass);
  });
}

// One group's partial sums `part` (16 columns of one row) scaled into `out` as quant_tile does; xrow: that row's
// sums of 32 inputs (read by the kinds with offsets or zeros).
template <int Bits>
inline __m512 group_epilogue(const uint8_t* params, __m512 part, const float* xrow, int64_t g, __m512 out) {
  if constexpr (Bits == 4 || QLayout<Bits>::affine) {
    const __m512 sc = _mm512_loadu_ps(reinterpret_cast<const float*>(params));
    const __m512 of = _mm512_loadu_ps(reinterpret_cast<const float*>(params + 64));
    return _mm512_fmadd_ps(of, _mm512_set1_ps(xrow[g]), _mm512_fmadd_ps(part, sc, out));
  } else if constexpr (QLayout<Bits>::zero) {
    constexpr int64_t per = QLayout<Bits>::group / kGroup;
    const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params)));
    const __m512 zr = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params + 32)));
    float xs = 0.f;
    for (int64_t j = 0; j < per; ++j) xs += xrow[g * per + j];
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(zr, _mm512_set1_ps(xs), part), sc, out);
  } else if constexpr (Bits == kE4M3) {
    return _mm512_fmadd_ps(part, _mm512_loadu_ps(reinterpret_cast<const float*>(params)), out);
  } else {
    return _mm512_fmadd_ps(part, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params))), out);
  }
}

#if defined(PAGODA_HAS_AMX)
// acc [RT * 16 rows][16] = x [RT row tiles, steps * 32 of its k] @ B tiles wt (steps of 16 pair rows x 64 bytes);
// lda: x's row stride in bytes.
template <int RT>
inline void amx_pass_steps(float* acc, const bf16_t* x, int64_t lda, int64_t steps, const bf16_t* wt) {
  const int64_t row = lda / 2;  // x elements per row
  _tile_zero(0);
  if constexpr (RT > 1) _tile_zero(1);
  if constexpr (RT > 2) _tile_zero(2);
  if constexpr (RT > 3) _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(6, wt + s * 16 * 32, 64);
    const bf16_t* xs = x + s * 32;
    if constexpr (RT == 1) { _tile_loadd(7, xs, lda); _tile_dpbf16ps(0, 7, 6); }
    else { _tile_loadd(4, xs, lda); _tile_dpbf16ps(0, 4, 6); }
    if constexpr (RT == 2) { _tile_loadd(7, xs + 16 * row, lda); _tile_dpbf16ps(1, 7, 6); }
    else if constexpr (RT > 2) { _tile_loadd(5, xs + 16 * row, lda); _tile_dpbf16ps(1, 5, 6); }
    if constexpr (RT == 3) { _tile_loadd(7, xs + 32 * row, lda); _tile_dpbf16ps(2, 7, 6); }
    else if constexpr (RT > 3) { _tile_loadd(4, xs + 32 * row, lda); _tile_dpbf16ps(2, 4, 6); }
    if constexpr (RT == 4) { _tile_loadd(7, xs + 48 * row, lda); _tile_dpbf16ps(3, 7, 6); }
  }
  _tile_stored(0, acc, 64);
  if constexpr (RT > 1) _tile_stored(1, acc + 16 * 16, 64);
  if constexpr (RT > 2) _tile_stored(2, acc + 32 * 16, 64);
  if constexpr (RT > 3) _tile_stored(3, acc + 48 * 16, 64);
}

// quant_gemm on AMX tiles, for batches of kAmxMinRows rows and more: per column tile and group, the group's codes
// are decoded into bf16 B tiles (exactly: small integers or e4m3 values), one tile product per 32 inputs sums the
// group for up to 64 rows at once, and the group's scale (offset, zero) is applied in float32 as quant_tile does.
template <int Bits, bool F32Out>
void quant_gemm_amx(void* y, const bf16_t* x, const uint8_t* packed, int64_t m, int64_t n, int64_t k,
                    int num_threads, const float* xsum) {
  constexpr int64_t G = QLayout<Bits>::group, kRows = 64;
  const int64_t groups = k / G, tiles = (n + 15) / 16, sum_groups = k / QLayout<Bits>::sum_width;
  const int64_t tile_bytes = groups * QLayout<Bits>::block_bytes;
  const int64_t mblocks = (m + kRows - 1) / kRows;
  const int64_t esz = F32Out ? 4 : 2;
  share_tasks_with<AmxTiles>(mblocks * tiles, num_threads, [&](int64_t task, AmxTiles& amx) {
    const int64_t mb = task / tiles, t = task % tiles;
    const int64_t r0 = mb * kRows, rows = (m - r0) < kRows ? (m - r0) : kRows;
    const int row_tiles = static_cast<int>((rows + 15) / 16), last_rows = static_cast<int>(rows - (row_tiles - 1) * 16);
    constexpr int D = QLayout<Bits>::decoder;
    const DecodeTables<D> tables;
    alignas(64) bf16_t wt[G * 16];  // the group's codes as bf16 B tiles: G / 2 pair rows of 16 columns
    alignas(64) float part[kRows * 16];
    alignas(64) float out[kRows * 16];
    for (int64_t i = 0; i < rows * 16; ++i) out[i] = 0.f;
    amx.configure(row_tiles, last_rows);
    const uint8_t* tile = packed + t * tile_bytes;
    const bf16_t* xb = x + r0 * k;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* blk = tile + g * QLayout<Bits>::block_bytes;
      for (int64_t p = 0; p < G / 2; p += 2) decode_two_pair_steps<D>(wt + p * 32, blk, p, tables.t);
      switch (row_tiles) {
        case 4: amx_pass_steps<4>(part, xb + g * G, k * 2, G / 32, wt); break;
        case 3: amx_pass_steps<3>(part, xb + g * G, k * 2, G / 32, wt); break;
        case 2: amx_pass_steps<2>(part, xb + g * G, k * 2, G / 32, wt); break;
        default: amx_pass_steps<1>(part, xb + g * G, k * 2, G / 32, wt); break;
      }
      const uint8_t* params = blk + QLayout<Bits>::code_bytes;
      for (int64_t r = 0; r < rows; ++r) {
        const float* xrow = QLayout<Bits>::sums ? xsum + (r0 + r) * sum_groups : nullptr;
        _mm512_store_ps(out + r * 16, group_epilogue<Bits>(params, _mm512_load_ps(part + r * 16), xrow, g,
                                                          _mm512_load_ps(out + r * 16)));
      }
    }
    const int64_t col = t * 16;
    store_tile_rows<F32Out>(static_cast<char*>(y) + r0 * n * esz, n, col, tile_columns(n, col), out, rows,
                            [](__m512 v) { return v; });
  });
}

#endif  // PAGODA_HAS_AMX

// One column tile's codes (all of k, exactly, without its scales) into the bf16 GEMM's packed layout at wt.
template <int Bits>
inline void decode_tile_bf16(bf16_t* wt, const uint8_t* tile, int64_t k) {
  constexpr int64_t G = QLayout<Bits>::group;
  const DecodeTables<QLayout<Bits>::decoder> tables;
  for (int64_t g = 0; g < k / G; ++g)
    for (int64_t p = 0; p < G / 2; p += 2)
      decode_two_pair_steps<QLayout<Bits>::decoder>(wt + (g * G / 2 + p) * 32, tile + g * QLayout<Bits>::block_bytes,
                                                    p, tables.t);
}

// A thread's decoded column tiles (whole cache lines: tile rows are read as 64-byte lines) and their scales.
struct DecodedTiles {
  aligned_vector<bf16_t> wt;
  float scale[kNT * 16];
};

#if defined(__AVX512VBMI__)
// The first kMR-row pass of quant_gemm_uniform_tiles over FP8 codes: each two pair steps' codes are decoded in
// registers, multiplied at once, and stored into the decoded tiles for the passes after it. Interleaved with the
// multiply-adds the decode's byte shuffles run beside them; as a pass of its own they left FP8 at 64 rows 5-13 %
// behind bf16 on a Zen 4. The same products in the same order as the passes over decoded tiles.
template <int NT, bool F32Out>
inline void fp8_decoding_pass(void* y, int64_t ldy, const bf16_t* x, int64_t k, const uint8_t* codes,
                              int64_t tile_bytes, bf16_t* wt, int64_t n, const float* col_scale) {
  using L = QLayout<kE4M3Channel>;
  const int64_t k2 = k / 2, tile_elems = k2 * kTile * 2;
  const DecodeTables<kE4M3> tables;
  __m512 acc[kMR][NT];
  for (int r = 0; r < kMR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k2; p += 2) {
    const uint8_t* step = codes + p / (L::group / 2) * L::block_bytes + p % (L::group / 2) * 32;
    __m512bh b[NT];
    for (int t = 0; t < NT; ++t) {
      __m512i first, second;
      e4m3_to_bf16_64(step + t * tile_bytes, tables.t, first, second);
      _mm512_storeu_si512(wt + t * tile_elems + p * 32, first);
      _mm512_storeu_si512(wt + t * tile_elems + p * 32 + 32, second);
      b[t] = (__m512bh)first;
    }
    for (int half = 0; half < 2; ++half) {
      if (half) {
        for (int t = 0; t < NT; ++t) b[t] = (__m512bh)_mm512_loadu_si512(wt + t * tile_elems + p * 32 + 32);
      }
      for (int r = 0; r < kMR; ++r) {
        uint32_t pair;
        std::memcpy(&pair, x + r * k + 2 * (p + half), 4);
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], a, b[t]);
      }
    }
  }
  store_micro_tile<kMR, NT, F32Out>(y, ldy, acc, 0, n, nullptr, col_scale);
}
#endif

// quant_gemm with the AVX512-BF16 micro-kernels for the kinds with one scale per column, from kUniformTileRows
// rows: a task decodes kNT column tiles once (exactly) into the bf16 GEMM's packed layout and multiplies a chunk of
// decoded_chunk_rows rows by them, each column scaled once at the end (FP8 codes with AVX512-VBMI: decoded during the
// chunk's first 8-row pass, fp8_decoding_pass). quant_tile instead decodes every code once per 8 rows and multiplies
// one tile per broadcast, which binds it to its broadcasts.
template <int Bits, bool F32Out>
void quant_gemm_uniform_tiles(void* y, const bf16_t* x, const uint8_t* packed, int64_t m, int64_t n, int64_t k,
                              int num_threads) {
  const int64_t tiles = (n + 15) / 16, tile_bytes = k / QLayout<Bits>::group * QLayout<Bits>::block_bytes;
  const int64_t groups = (tiles + kNT - 1) / kNT, chunk_rows = decoded_chunk_rows(m, groups, num_threads);
  const int64_t chunks = (m + chunk_rows - 1) / chunk_rows, esz = F32Out ? 4 : 2;
  share_tasks_with<DecodedTiles>(chunks * groups, num_threads, [&](int64_t task, DecodedTiles& state) {
    const int64_t t0 = task % groups * kNT, c0 = task / groups * chunk_rows;
    const int64_t t1 = t0 + kNT < tiles ? t0 + kNT : tiles, c1 = c0 + chunk_rows < m ? c0 + chunk_rows : m;
    const int64_t col = t0 * 16;
    const int64_t cols = n - col < kNT * 16 ? n - col : kNT * 16;
    state.wt.resize(static_cast<size_t>(kNT * k * 16));
    for (int64_t t = t0; t < t1; ++t)
      std::memcpy(state.scale + (t - t0) * 16, packed + t * tile_bytes + QLayout<Bits>::code_bytes, 16 * 4);
    int64_t r0 = c0;
#if defined(__AVX512VBMI__)
    if (Bits == kE4M3Channel && c1 - c0 >= kMR) {
      char* yb = static_cast<char*>(y) + (c0 * n + col) * esz;
      const bf16_t* xb = x + c0 * k;
      const uint8_t* codes = packed + t0 * tile_bytes;
      bf16_t* wt = state.wt.data();
      switch (t1 - t0) {
        case 3: fp8_decoding_pass<3, F32Out>(yb, n, xb, k, codes, tile_bytes, wt, cols, state.scale); break;
        case 2: fp8_decoding_pass<2, F32Out>(yb, n, xb, k, codes, tile_bytes, wt, cols, state.scale); break;
        default: fp8_decoding_pass<1, F32Out>(yb, n, xb, k, codes, tile_bytes, wt, cols, state.scale); break;
      }
      r0 = c0 + kMR;
    }
#endif
    if (r0 == c0)
      for (int64_t t = t0; t < t1; ++t)
        decode_tile_bf16<Bits>(state.wt.data() + (t - t0) * k * 16, packed + t * tile_bytes, k);
    if (c1 > r0)
      gemm_packed_serial<F32Out>(static_cast<char*>(y) + (r0 * n + col) * esz, n, x + r0 * k, state.wt.data(), c1 - r0,
                                 cols, k, nullptr, state.scale);
  });
}

#if defined(PAGODA_HAS_AMX)
// A thread's tile configuration and its buffer for one column tile's codes decoded to bf16 (whole cache lines: B
// tile rows are 64-byte loads).
struct AmxDecodeState {
  AmxTiles tiles;
  aligned_vector<bf16_t> wt;
};

// quant_gemm on AMX tiles for the kinds with one scale per column: a task decodes one column tile's codes (all of k,
// exactly) into the bf16 GEMM's packed layout, multiplies up to kChunkRows rows by it in 64-row passes of the bf16
// tile pass, summing all of k in the tiles, and scales each column once. Tasks are row-chunk major, so a thread's
// rows stay in L2 across its column tiles, and a prefill-sized batch decodes each code once per chunk.
template <int Bits, bool F32Out>
void quant_gemm_amx_uniform(void* y, const bf16_t* x, const uint8_t* packed, int64_t m, int64_t n, int64_t k,
                            int num_threads) {
  constexpr int64_t kRows = 64, kChunkRows = 256;
  const int64_t tiles = (n + 15) / 16, tile_bytes = k / QLayout<Bits>::group * QLayout<Bits>::block_bytes;
  const int64_t chunks = (m + kChunkRows - 1) / kChunkRows, esz = F32Out ? 4 : 2;
  share_tasks_with<AmxDecodeState>(chunks * tiles, num_threads, [&](int64_t task, AmxDecodeState& state) {
    const int64_t t = task % tiles, c0 = task / tiles * kChunkRows;
    const int64_t c1 = c0 + kChunkRows < m ? c0 + kChunkRows : m;
    const uint8_t* tile = packed + t * tile_bytes;
    state.wt.resize(static_cast<size_t>(k * 16));
    bf16_t* wt = state.wt.data();
    decode_tile_bf16<Bits>(wt, tile, k);
    const __m512 scale = _mm512_loadu_ps(reinterpret_cast<const float*>(tile + QLayout<Bits>::code_bytes));
    const char* ahead = t + 1 < tiles ? reinterpret_cast<const char*>(tile + tile_bytes) : nullptr;
    const int64_t col = t * 16;
    const __mmask16 mask = tile_columns(n, col);
    alignas(64) float acc[kRows * 16];
    for (int64_t r0 = c0; r0 < c1; r0 += kRows, ahead = nullptr) {
      const int64_t rows = (c1 - r0) < kRows ? (c1 - r0) : kRows;
      const int row_tiles = static_cast<int>((rows + 15) / 16);
      state.tiles.configure(row_tiles, static_cast<int>(rows - (row_tiles - 1) * 16));
      amx_tile_pass_rows(row_tiles, acc, x + r0 * k, k, wt, ahead, ahead ? tile_bytes : 0);
      store_tile_rows<F32Out>(static_cast<char*>(y) + r0 * n * esz, n, col, mask, acc, rows,
                              [&](__m512 v) { return _mm512_mul_ps(v, scale); });
    }
  });
}
#endif

template <bool F32Out, int... Kinds>
bool quant_gemm_of(std::integer_sequence<int, Kinds...>, int kind, void* y, const bf16_t* x, const uint8_t* packed,
                   int64_t m, int64_t n, int64_t k, int num_threads, const float* xsum, bool amx) {
  return ((kind == Kinds && (quant_gemm<Kinds, F32Out>(y, x, packed, m, n, k, num_threads, xsum, amx), true)) || ...);
}

// quant_gemm for a kind chosen at run time; false for a kind (or k) quant_tile_bytes doesn't take.
template <bool F32Out>
bool quant_gemm_kind(int kind, void* y, const bf16_t* x, const uint8_t* packed, int64_t m, int64_t n, int64_t k,
                     int num_threads, const float* xsum = nullptr, bool amx = false) {
  if (quant_tile_bytes(kind, k) == 0) return false;
  return quant_gemm_of<F32Out>(QuantKinds{}, kind, y, x, packed, m, n, k, num_threads, xsum, amx);
}
#endif  // __AVX512BF16__

}  // namespace
