// Block-quantized weights packed once after loading: 4- and 8-bit codes (GGUF, AWQ, GPTQ, compressed-tensors) and
// FP8 e4m3 codes, their packed layout and the decoding of codes to bf16 that the GEMMs (cpu_quant_gemm.h) and the row
// gathers share.
#pragma once

#include <utility>

#include "cpu_common.h"

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
//   e4m3 per channel (kind kE4M3Channel): as e4m3, every group of a column with the same scale (per-channel and
//         per-tensor FP8 checkpoints), so the products of all groups are summed before the one scaling
//   int4 with zero points (kind kZeroKind + G, G = 32, 64 or 128): as int4 in groups of G, then float16 scales and
//         float16 zeros: w = (code - zero) * scale, the form of AWQ / GPTQ / compressed-tensors checkpoints, at
//         their own group size (0.53 to 0.63 bytes a weight)                                 -> 8 G + 64 bytes
//   int8 affine (kind kAffineKind + G, G = 16 or 32): int8 codes as for int8 in groups of G, then float32 scales and
//         float32 offsets: w = code * scale + offset, GGUF's Q2_K / Q5_K / Q6_K (sub-blocks of 16 or 32 values with
//         a scale and min each; their products are not exact in float16; 1.25 or 1.5 bytes a weight) -> 16 G + 128
//   int8 with zero points (kind kZero8Kind + G, G = 32, 64 or 128): int8 codes as for int8 in groups of G, then
//         float16 scales and float16 zeros: w = (code - zero) * scale, 8-bit GPTQ / compressed-tensors W8A16 with
//         zero points (codes and zeros centred on 128; 1.03 to 1.13 bytes a weight)          -> 16 G + 64 bytes
constexpr int64_t kGroup = 32;
constexpr int kE4M3 = 9;  // the "bits" value that selects FP8 e4m3 codes
constexpr int kE4M3Channel = 10;  // FP8 e4m3 codes with one scale per column
constexpr int kZeroKind = 100;
constexpr int kAffineKind = 300;  // above every kZeroKind + G
constexpr int kZero8Kind = 400;  // above every kAffineKind + G
constexpr int kQMR = 8;

template <int Bits> struct QLayout {
  static constexpr bool zero4 = Bits > kZeroKind && Bits < kAffineKind;  // 4-bit codes, float16 scale and zero
  static constexpr bool zero8 = Bits > kZero8Kind;  // int8 codes, float16 scale and zero
  static constexpr bool zero = zero4 || zero8;
  static constexpr bool affine = Bits > kAffineKind && Bits < kZero8Kind;  // int8 codes, float32 scale and offset
  static constexpr bool nibbles = Bits == 4 || zero4;
  static constexpr bool fp8 = Bits == kE4M3 || Bits == kE4M3Channel;
  static constexpr bool uniform = Bits == kE4M3Channel;  // one scale per column: sum every group, then scale once
  // which decode_pairs reads the codes
  static constexpr int decoder = nibbles ? 4 : affine || zero8 ? 8 : fp8 ? kE4M3 : Bits;
  static constexpr int64_t group = affine ? Bits - kAffineKind : zero8 ? Bits - kZero8Kind
                                   : zero4 ? Bits - kZeroKind : fp8 ? 64 : kGroup;
  static constexpr int64_t code_bytes = nibbles ? group * 8 : group * 16;
  static constexpr int64_t block_bytes =
      code_bytes + (Bits == 4 || affine ? 2 * 16 * 4 : Bits == 8 ? 16 * 2 : 16 * 4);
  static constexpr bool sums = nibbles || affine || zero8;  // whether the kernel reads the activations' group sums
  // inputs per activation sum: 32, or the group of the affine kinds (their offsets change every 16 inputs)
  static constexpr int64_t sum_width = affine ? group : kGroup;
};

// The inputs per activation sum (xsum) the kind reads.
inline int64_t quant_sum_width(int kind) {
  return kind > kAffineKind && kind < kZero8Kind ? kind - kAffineKind : kGroup;
}

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

// The same encodings split for vpermt2b lookups: the 128 high bytes, then the 128 low bytes.
struct E4m3ByteTables {
  alignas(64) uint8_t v[256];
};
constexpr E4m3ByteTables make_e4m3_byte_tables() {
  E4m3ByteTables t{};
  for (int i = 0; i < 128; ++i) {
    t.v[i] = static_cast<uint8_t>(kE4m3Table.v[i] >> 8);
    t.v[128 + i] = static_cast<uint8_t>(kE4m3Table.v[i] & 0xFF);
  }
  return t;
}
constexpr E4m3ByteTables kE4m3ByteTables = make_e4m3_byte_tables();

// The decode tables a kind needs, loaded into registers once per kernel call: the bf16 encodings of 0..15 for
// 4-bit codes; for FP8 the four quarters of kE4m3Table, or with AVX512-VBMI its high and low bytes' halves.
template <int Bits> struct DecodeTables {
  __m512i t[4];
  DecodeTables() {
    if constexpr (Bits == 4) {
      alignas(64) uint16_t v[32];
      for (int i = 0; i < 32; ++i) v[i] = f32_to_bf16(static_cast<float>(i));
      t[0] = _mm512_load_si512(v);
    } else if constexpr (Bits == kE4M3) {
#if defined(__AVX512VBMI__)
      for (int i = 0; i < 4; ++i) t[i] = _mm512_load_si512(kE4m3ByteTables.v + 64 * i);
#else
      for (int i = 0; i < 4; ++i) t[i] = _mm512_load_si512(kE4m3Table.v + 32 * i);
#endif
    }
  }
};

#if defined(__AVX512VBMI__)
// With byte permutes (AVX512-VBMI) one lookup gives 64 high or low bytes from a 128-entry table, and the index's top
// bit (the sign) is ignored: each decode below is a third to a half of the word-table one's instructions.
constexpr uint32_t kSignOr = 0xF8;  // vpternlog: a | (b & c)

// 32 FP8 e4m3 bytes -> their 32 bf16 encodings: each byte doubled into a word, the low byte looked up in the low-byte
// table and the high one in the high-byte table, then the sign.
inline __m512i e4m3_to_bf16_32(__m256i bytes, const __m512i* t) {
  const __m512i doubled = _mm512_permutexvar_epi8(
      _mm512_set_epi64(0x1F1F1E1E1D1D1C1CLL, 0x1B1B1A1A19191818LL, 0x1717161615151414LL, 0x1313121211111010LL,
                       0x0F0F0E0E0D0D0C0CLL, 0x0B0B0A0A09090808LL, 0x0707060605050404LL, 0x0303020201010000LL),
      _mm512_castsi256_si512(bytes));
  const __m512i words = _mm512_mask_blend_epi8(0xAAAAAAAAAAAAAAAAULL, _mm512_permutex2var_epi8(t[2], doubled, t[3]),
                                               _mm512_permutex2var_epi8(t[0], doubled, t[1]));
  return _mm512_ternarylogic_epi32(words, doubled, _mm512_set1_epi16(static_cast<int16_t>(0x8000)), kSignOr);
}

// 64 FP8 e4m3 bytes (two pair steps) -> their 64 bf16 encodings in order, as two registers: the high and the low
// bytes of all 64 looked up at once, interleaved into words per 128-bit lane, then the lanes put in order.
inline void e4m3_to_bf16_64(const uint8_t* codes, const __m512i* t, __m512i& first, __m512i& second) {
  const __m512i b = _mm512_loadu_si512(codes);
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t[0], b, t[1]), b, _mm512_set1_epi8(
      static_cast<char>(0x80)), kSignOr);
  const __m512i lo = _mm512_permutex2var_epi8(t[2], b, t[3]);
  const __m512i even = _mm512_unpacklo_epi8(lo, hi), odd = _mm512_unpackhi_epi8(lo, hi);  // bytes 0-7, 8-15 of lanes
  first = _mm512_permutex2var_epi64(even, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), odd);
  second = _mm512_permutex2var_epi64(even, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), odd);
}
#else
// 32 FP8 e4m3 bytes -> their 32 bf16 encodings: two 64-entry table lookups on the magnitude, then the sign.
inline __m512i e4m3_to_bf16_32(__m256i bytes, const __m512i* t) {
  const __m512i b = _mm512_cvtepu8_epi16(bytes);
  const __m512i em = _mm512_and_si512(b, _mm512_set1_epi16(0x7F));
  const __m512i low = _mm512_permutex2var_epi16(t[0], em, t[1]);   // magnitudes 0..63 (index bit 5 picks the table)
  const __m512i high = _mm512_permutex2var_epi16(t[2], em, t[3]);  // 64..127
  const __m512i mag = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(em, _mm512_set1_epi16(0x40)), low, high);
  return _mm512_or_si512(mag, _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x80)), 8));
}

inline void e4m3_to_bf16_64(const uint8_t* codes, const __m512i* t, __m512i& first, __m512i& second) {
  first = e4m3_to_bf16_32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)), t);
  second = e4m3_to_bf16_32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32)), t);
}
#endif

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

// Pair steps p and p + 1 of a block as bf16 pairs, stored at dst (64 values): FP8 codes decode both steps at once.
template <int D> inline void decode_two_pair_steps(bf16_t* dst, const uint8_t* codes, int64_t p, const __m512i* t) {
  __m512i first, second;
  if constexpr (D == kE4M3) {
    e4m3_to_bf16_64(codes + p * 32, t, first, second);
  } else {
    first = decode_pairs<D>(codes, p, t);
    second = decode_pairs<D>(codes, p + 1, t);
  }
  _mm512_storeu_si512(dst, first);
  _mm512_storeu_si512(dst + 32, second);
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

// Every kind above: the one list the run-time dispatch (quant_tile_bytes, quant_gemm_kind) walks.
using QuantKinds = std::integer_sequence<int, 4, 8, kE4M3, kE4M3Channel, kZeroKind + 32, kZeroKind + 64,
                                         kZeroKind + 128, kAffineKind + 16, kAffineKind + 32, kZero8Kind + 32,
                                         kZero8Kind + 64, kZero8Kind + 128>;

template <int Kind> constexpr int64_t tile_bytes_of(int64_t k) {
  return k % QLayout<Kind>::group ? 0 : k / QLayout<Kind>::group * QLayout<Kind>::block_bytes;
}

template <int... Kinds>
int64_t quant_tile_bytes_of(std::integer_sequence<int, Kinds...>, int kind, int64_t k) {
  int64_t bytes = 0;
  (void)((kind == Kinds && (bytes = tile_bytes_of<Kinds>(k), true)) || ...);
  return bytes;
}

// Bytes of one tile of 16 rows of a block-quantized weight of `kind` with k inputs; 0 for an unknown kind or a k
// its groups don't divide.
inline int64_t quant_tile_bytes(int kind, int64_t k) { return quant_tile_bytes_of(QuantKinds{}, kind, k); }
#endif  // __AVX512BF16__

}  // namespace
