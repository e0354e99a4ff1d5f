// GEMMs on block-quantized weights packed once after loading: 4- and 8-bit codes (GGUF, AWQ, GPTQ,
// compressed-tensors) and FP8 e4m3, with bf16 activations, on AVX512-BF16 and on AMX tiles.
#pragma once

#include "cpu_amx.h"
#include "cpu_common.h"
#include "cpu_gemm.h"

namespace {

#if defined(__AVX512BF16__)
// ---- Block-quantized weights (GGUF Q4_0 / Q4_1 / Q4_K / Q8_0; AWQ / GPTQ; FP8) with bf16 activations -----------
// w[n, k] = code[n, k] * scale[n, g] + offset[n, g] for groups g of 32 consecutive k (64 for FP8). Codes (0..15,
// -128..127, or FP8 e4m3 values) are exact in bf16, so the pairwise bf16 dot product of codes and activations is
// exact too; each group's partial sum is then scaled in float32: out += scale * sum(code * x) + offset * sum(x).
// Packed per (tile of 16 rows n, group): group / 2 pair steps of codes, then the 16 rows' scales (and offsets):
//   int4: one byte per (pair, n): low nibble k = 2p, high nibble k = 2p + 1; float32 scales and offsets
//         (Q4_K's products of scales are not exact in float16)                          -> 384 bytes
//   int8: per pair, 16 bytes of k = 2p then 16 bytes of k = 2p + 1 (signed); float16 scales, no offset
//         (Q8_0's own scale type, so the packed form is no larger than the file)       -> 544 bytes
//   e4m3: per pair, 32 FP8 bytes interleaved (column n's k = 2p, k = 2p + 1), groups of 64 and float32 scales
//         (1.06 bytes a weight)                                                         -> 1088 bytes
//   int4 with zero points (kind kZeroKind + G, G = 32, 64 or 128): as int4 in groups of G, then float16 scales and
//         float16 zeros: w = (code - zero) * scale, the form of AWQ / GPTQ / compressed-tensors checkpoints, at
//         their own group size (0.53 to 0.63 bytes a weight)                                 -> 8 G + 64 bytes
//   int8 affine (kind kAffineKind + G, G = 16 or 32): int8 codes as for int8 in groups of G, then float32 scales and
//         float32 offsets: w = code * scale + offset, GGUF's Q2_K / Q5_K / Q6_K (sub-blocks of 16 or 32 values with
//         a scale and min each; their products are not exact in float16; 1.25 or 1.5 bytes a weight) -> 16 G + 128
constexpr int64_t kGroup = 32;
constexpr int kE4M3 = 9;  // the "bits" value that selects FP8 e4m3 codes
constexpr int kZeroKind = 100;
constexpr int kAffineKind = 300;  // above every kZeroKind + G
constexpr int kQMR = 8;

template <int Bits> struct QLayout {
  static constexpr bool zero = Bits > kZeroKind && Bits < kAffineKind;  // 4-bit codes, float16 scale and zero
  static constexpr bool affine = Bits > kAffineKind;  // int8 codes, float32 scale and offset per group
  static constexpr bool nibbles = Bits == 4 || zero;
  static constexpr int decoder = nibbles ? 4 : affine ? 8 : Bits;  // which decode_pairs reads the codes
  static constexpr int64_t group = affine ? Bits - kAffineKind : zero ? Bits - kZeroKind : Bits == kE4M3 ? 64 : kGroup;
  static constexpr int64_t code_bytes = nibbles ? group * 8 : group * 16;
  static constexpr int64_t block_bytes =
      code_bytes + (Bits == 4 || affine ? 2 * 16 * 4 : Bits == 8 ? 16 * 2 : 16 * 4);
  static constexpr bool sums = nibbles || affine;  // whether the kernel reads the activations' group sums
  // inputs per activation sum: 32, or the group of the affine kinds (their offsets change every 16 inputs)
  static constexpr int64_t sum_width = affine ? group : kGroup;
};

// The inputs per activation sum (xsum) the kind reads.
inline int64_t quant_sum_width(int kind) { return kind > kAffineKind ? kind - kAffineKind : kGroup; }

// bf16 encodings of the 128 e4m3 magnitudes (sign bit clear), for vpermt2w lookups: normal numbers move their
// exponent from bias 7 to bias 127; subnormals (exponent 0: m * 2^-9) are listed.
struct E4m3Table {
  alignas(64) uint16_t v[128];
};
constexpr E4m3Table make_e4m3_table() {
  E4m3Table t{};
  constexpr uint16_t subnormal[8] = {0, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};
  for (int em = 0; em < 128; ++em) {
    const int e = em >> 3, m = em & 7;
    t.v[em] = e ? static_cast<uint16_t>(((e + 120) << 7) | (m << 4)) : subnormal[m];
  }
  return t;
}
constexpr E4m3Table kE4m3Table = make_e4m3_table();

// The decode tables a kind needs, loaded into registers once per kernel call: the bf16 encodings of 0..15 for
// 4-bit codes, the four quarters of kE4m3Table for FP8.
template <int Bits> struct DecodeTables {
  __m512i t[4];
  DecodeTables() {
    if constexpr (Bits == 4) {
      alignas(64) uint16_t v[32];
      for (int i = 0; i < 32; ++i) v[i] = f32_to_bf16(static_cast<float>(i));
      t[0] = _mm512_load_si512(v);
    } else if constexpr (Bits == kE4M3) {
      for (int i = 0; i < 4; ++i) t[i] = _mm512_load_si512(kE4m3Table.v + 32 * i);
    }
  }
};

// 32 FP8 e4m3 bytes -> their 32 bf16 encodings: two 64-entry table lookups on the magnitude, then the sign.
inline __m512i e4m3_to_bf16_32(__m256i bytes, const __m512i* t) {
  const __m512i b = _mm512_cvtepu8_epi16(bytes);
  const __m512i em = _mm512_and_si512(b, _mm512_set1_epi16(0x7F));
  const __m512i low = _mm512_permutex2var_epi16(t[0], em, t[1]);   // magnitudes 0..63 (index bit 5 picks the table)
  const __m512i high = _mm512_permutex2var_epi16(t[2], em, t[3]);  // 64..127
  const __m512i mag = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(em, _mm512_set1_epi16(0x40)), low, high);
  return _mm512_or_si512(mag, _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x80)), 8));
}

// The 16 (pair of codes) lanes of pair step p as bf16 pairs.
template <int Bits> inline __m512i decode_pairs(const uint8_t* codes, int64_t p, const __m512i* tables);
template <> inline __m512i decode_pairs<4>(const uint8_t* codes, int64_t p, const __m512i* tables) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + p * 16)));
  const __m512i pairs = _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(0xF)),
                                        _mm512_slli_epi32(_mm512_srli_epi32(d, 4), 16));
  return _mm512_permutexvar_epi16(pairs, tables[0]);  // 0..15 -> their bf16 encodings
}
template <> inline __m512i decode_pairs<8>(const uint8_t* codes, int64_t p, const __m512i*) {
  const __m128i* c = reinterpret_cast<const __m128i*>(codes + p * 32);
  // int8 -> float32 is exact; a float32 with at most 8 significant bits is its own bf16 in the high half.
  const __m512i lo = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c))));
  const __m512i hi = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c + 1))));
  return _mm512_or_si512(_mm512_srli_epi32(lo, 16), _mm512_and_si512(hi, _mm512_set1_epi32(0xFFFF0000)));
}
template <> inline __m512i decode_pairs<kE4M3>(const uint8_t* codes, int64_t p, const __m512i* tables) {
  // Packed pair-interleaved (column n's k = 2p, then its k = 2p + 1): the 32 bf16 values are the 16 pairs as they are.
  return e4m3_to_bf16_32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + p * 32)), tables);
}

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
  __m512 out[MR];
  for (int r = 0; r < MR; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* blk = tile + g * QLayout<Bits>::block_bytes;
    if (ahead != nullptr)
      for (int64_t b = 0; b < QLayout<Bits>::block_bytes; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + g * QLayout<Bits>::block_bytes + b), _MM_HINT_T0);
    __m512 part[MR];
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
    if constexpr (Bits == 4 || QLayout<Bits>::affine) {  // one activation sum per group
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
  const int64_t valid = n - col < 16 ? n - col : 16;
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  for (int r = 0; r < MR; ++r) {
    if constexpr (F32Out) {
      _mm512_mask_storeu_ps(static_cast<float*>(y) + r * ldy + col, mask, out[r]);
    } else {
      _mm256_mask_storeu_epi16(static_cast<bf16_t*>(y) + r * ldy + col, mask, (__m256i)_mm512_cvtneps_pbh(out[r]));
    }
  }
}

// Row r of a packed weight (column r % 16 of tile r / 16), dequantized into row i of dst (float32 or bf16).
template <int Bits>
inline void quant_row(void* dst, bool out_f32, int64_t i, const uint8_t* packed, int64_t r, int64_t k) {
  using L = QLayout<Bits>;
  const int64_t groups = k / L::group, col = r % 16;
  const uint8_t* tile = packed + (r / 16) * groups * L::block_bytes;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* blk = tile + g * L::block_bytes;
    const uint8_t* params = blk + L::code_bytes;
    float scale, offset = 0.f;
    if constexpr (Bits == 8) {
      uint16_t h;
      std::memcpy(&h, params + 2 * col, 2);
      scale = _cvtsh_ss(h);
    } else {
      std::memcpy(&scale, params + 4 * col, 4);
      std::memcpy(&offset, params + 64 + 4 * col, 4);
    }
    for (int64_t j = 0; j < L::group; ++j) {  // input g * group + j: pair j / 2, element j % 2
      float code;
      if constexpr (Bits == 4) {
        const uint8_t byte = blk[(j / 2) * 16 + col];
        code = static_cast<float>(j % 2 ? byte >> 4 : byte & 0xF);
      } else {
        code = static_cast<float>(static_cast<int8_t>(blk[(j / 2) * 32 + (j % 2) * 16 + col]));
      }
      const float product = code * scale;  // two roundings, as the reference's code * scale + offset
      const float w = Bits == 8 ? product : product + offset;
      const int64_t at = i * k + g * L::group + j;
      if (out_f32) static_cast<float*>(dst)[at] = w;
      else static_cast<bf16_t*>(dst)[at] = f32_to_bf16(w);
    }
  }
}

// The sum of x [m, k] over each group of `width` columns, per row ([m, k / width]): what the offsets multiply.
inline std::vector<float> group_sums(const bf16_t* x, int64_t m, int64_t k, int64_t width = kGroup) {
  const int64_t groups = k / width;
  std::vector<float> xsum(static_cast<size_t>(m * groups));
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t i = 0; i < width; ++i) s += bf16_to_f32(x[r * k + g * width + i]);
      xsum[r * groups + g] = s;
    }
  return xsum;
}

// y [m, n] = x . W^T for W packed as above; xsum: group_sums(x, m, k, quant_sum_width(kind)), for callers that run several column ranges
// of one x (computed here when null).
template <int Bits, bool F32Out>
void quant_gemm_amx(void* y, const bf16_t* x, const uint8_t* packed, int64_t m, int64_t n, int64_t k,
                    int num_threads, const float* xsum);

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
      quant_gemm_amx<Bits, F32Out>(y, x, packed, m, n, k, num_threads, xsum);
      return;
    }
  }
#else
  (void)amx;
#endif
  const int64_t mblocks = (m + kBlockM - 1) / kBlockM;
  share_tasks(mblocks * tiles, num_threads, [&](int64_t task) {
    const int64_t mb = task / tiles, t = task % tiles;
    const int64_t r_end = (mb + 1) * kBlockM < m ? (mb + 1) * kBlockM : m;
    const uint8_t* tile = packed + t * tile_bytes;
    // A thread takes its tasks in order: at one row block (decode sizes), its next tile is the following one,
    // prefetched during the first pass over this tile.
    const uint8_t* ahead = mblocks == 1 && t + 1 < tiles ? tile + tile_bytes : nullptr;
    int64_t r = mb * kBlockM;
    for (; r + kQMR <= r_end; r += kQMR, ahead = nullptr)
      quant_tile<Bits, kQMR, F32Out>(static_cast<char*>(y) + r * n * esz, n, x + r * k, xsum + r * groups,
                                     k, tile, t * 16, n, ahead);
    char* yr = static_cast<char*>(y) + r * n * esz;
    const bf16_t* xr = x + r * k;
    const float* sr = xsum + r * groups;
    switch (r_end - r) {
      case 1: quant_tile<Bits, 1, F32Out>(yr, n, xr, sr, k, tile, t * 16, n, ahead); break;
      case 2: quant_tile<Bits, 2, F32Out>(yr, n, xr, sr, k, tile, t * 16, n, ahead); break;
      case 3: quant_tile<Bits, 3, F32Out>(yr, n, xr, sr, k, tile, t * 16, n, ahead); break;
      case 4: quant_tile<Bits, 4, F32Out>(yr, n, xr, sr, k, tile, t * 16, n, ahead); break;
      case 5: quant_tile<Bits, 5, F32Out>(yr, n, xr, sr, k, tile, t * 16, n, ahead); break;
      case 6: quant_tile<Bits, 6, F32Out>(yr, n, xr, sr, k, tile, t * 16, n, ahead); break;
      case 7: quant_tile<Bits, 7, F32Out>(yr, n, xr, sr, k, tile, t * 16, n, ahead); break;
      default: break;
    }
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
      for (int64_t p = 0; p < G / 2; ++p)
        _mm512_store_si512(wt + p * 32, decode_pairs<D>(blk, p, tables.t));
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
    const int64_t col = t * 16, valid = n - col < 16 ? n - col : 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    char* yb = static_cast<char*>(y) + r0 * n * esz;
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 v = _mm512_load_ps(out + r * 16);
      if constexpr (F32Out) {
        _mm512_mask_storeu_ps(reinterpret_cast<float*>(yb) + r * n + col, mask, v);
      } else {
        _mm256_mask_storeu_epi16(reinterpret_cast<bf16_t*>(yb) + r * n + col, mask, (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  });
}
#endif

// Bytes of one tile of 16 rows of a block-quantized weight of `kind` with k inputs; 0 for an unknown kind or a k
// its groups don't divide.
inline int64_t quant_tile_bytes(int kind, int64_t k) {
  auto of = [k](int64_t group, int64_t block) { return k % group ? 0 : k / group * block; };
  switch (kind) {
    case 4: return of(QLayout<4>::group, QLayout<4>::block_bytes);
    case 8: return of(QLayout<8>::group, QLayout<8>::block_bytes);
    case kE4M3: return of(QLayout<kE4M3>::group, QLayout<kE4M3>::block_bytes);
    case kZeroKind + 32: return of(32, QLayout<kZeroKind + 32>::block_bytes);
    case kZeroKind + 64: return of(64, QLayout<kZeroKind + 64>::block_bytes);
    case kZeroKind + 128: return of(128, QLayout<kZeroKind + 128>::block_bytes);
    case kAffineKind + 16: return of(16, QLayout<kAffineKind + 16>::block_bytes);
    case kAffineKind + 32: return of(32, QLayout<kAffineKind + 32>::block_bytes);
    default: return 0;
  }
}

// quant_gemm for a kind chosen at run time; false for a kind (or k) quant_tile_bytes doesn't take.
template <bool F32Out>
bool quant_gemm_kind(int kind, void* y, const bf16_t* x, const uint8_t* packed, int64_t m, int64_t n, int64_t k,
                     int num_threads, const float* xsum = nullptr, bool amx = false) {
  if (quant_tile_bytes(kind, k) == 0) return false;
  switch (kind) {
    case 4: quant_gemm<4, F32Out>(y, x, packed, m, n, k, num_threads, xsum, amx); return true;
    case 8: quant_gemm<8, F32Out>(y, x, packed, m, n, k, num_threads, xsum, amx); return true;
    case kE4M3: quant_gemm<kE4M3, F32Out>(y, x, packed, m, n, k, num_threads, xsum, amx); return true;
    case kZeroKind + 32: quant_gemm<kZeroKind + 32, F32Out>(y, x, packed, m, n, k, num_threads, xsum, amx); return true;
    case kZeroKind + 64: quant_gemm<kZeroKind + 64, F32Out>(y, x, packed, m, n, k, num_threads, xsum, amx); return true;
    case kZeroKind + 128:
      quant_gemm<kZeroKind + 128, F32Out>(y, x, packed, m, n, k, num_threads, xsum, amx);
      return true;
    case kAffineKind + 16:
      quant_gemm<kAffineKind + 16, F32Out>(y, x, packed, m, n, k, num_threads, xsum, amx);
      return true;
    case kAffineKind + 32:
      quant_gemm<kAffineKind + 32, F32Out>(y, x, packed, m, n, k, num_threads, xsum, amx);
      return true;
    default: return false;
  }
}
#endif  // __AVX512BF16__

}  // namespace
