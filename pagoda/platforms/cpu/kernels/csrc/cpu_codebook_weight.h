// The AQLM weight descriptor the codebook kernels share, the layout of its codes and how its books' entries are read.
#pragma once

#include "cpu_common.h"

namespace {

constexpr int64_t kCodebookGroup = 8;     // inputs per code (AQLM's in_group_size this kernel takes)
constexpr int64_t kCodebookMaxRows = 16;  // the most float32-output rows codebook_gemm (tiles in registers) takes
constexpr int64_t kCodeBlock = 4;         // input groups per block of the codes' layout
constexpr int64_t kTableEntries = 256;    // books of up to this many entries (2x8, 1x8 …): 8-bit codes, table kernel

// An AQLM weight as kernels/cpu_quant_ops.py's PackedCodebook holds it. A merged layer (q/k/v, gate/up) is one
// weight whose shards each have their own books. The codes' layout: see block_codes.
struct CodebookWeight {
  const void* codes;          // uint8 where book_size <= kTableEntries, else uint16 (unsigned values)
  const uint16_t* books;      // float16 [shards][num_books][book_size][8], for books of more than kTableEntries
  const float* books_t;       // float32 [shards][num_books][8][book_stride]: books of up to kTableEntries by input
                              // (book_stride: book_size rounded up to 16), which the one-row table is built from
  const float* scales;        // float32 [n]
  const int64_t* shard_rows;  // [shards + 1]: shard s holds outputs shard_rows[s] .. shard_rows[s + 1] - 1
  int64_t shards, num_books, book_size, book_stride, n, k;
};

// Where output o's codes of the block of kCodeBlock input groups from i0 start; group_step: from one group's codes
// to the next within a block. 8-bit codes are blocked by input groups, [blocks][n][block's groups][books] (the last
// block may be narrower), so that the one-row table kernel's pass over every output reads a block in order. 16-bit
// codes are tiled by 16 outputs, [tiles][groups][16][books] (outputs past n code 0), so that a column tile's codes
// are one stream: blocked, consecutive blocks of one output lay n * 8 bytes apart (88 KB at 11008 outputs), and
// the kernels that walk k per output ran at 1.7 ns an entry against 1.05 tiled (Zen 4, a random book of 65536).
template <typename CodeT>
inline const CodeT* block_codes(const CodebookWeight& w, int64_t o, int64_t i0) {
  const CodeT* const codes = static_cast<const CodeT*>(w.codes);
  const int64_t groups = w.k / kCodebookGroup;
  if constexpr (sizeof(CodeT) == 2) {
    return codes + (((o >> 4) * groups + i0) * 16 + (o & 15)) * w.num_books;
  } else {
    const int64_t width = groups - i0 < kCodeBlock ? groups - i0 : kCodeBlock;
    return codes + (i0 * w.n + o * width) * w.num_books;
  }
}
template <typename CodeT>
inline int64_t group_step(const CodebookWeight& w) { return sizeof(CodeT) == 2 ? 16 * w.num_books : w.num_books; }

// The books' entries a kernel reads for a code type: small books (8-bit codes) as float32, built per call from
// books_t (a transpose, no conversion); larger ones as the weight's float16.
template <typename CodeT> struct CodebookEntries { using T = float; };
template <> struct CodebookEntries<uint16_t> { using T = uint16_t; };

// The shard output o belongs to.
inline int64_t shard_of(const CodebookWeight& w, int64_t o) {
  int64_t s = 0;
  while (o >= w.shard_rows[s + 1]) ++s;
  return s;
}

// Output o's books (entries [num_books][book_size][8] of `books`): its shard's.
template <typename E>
inline const E* books_of(const CodebookWeight& w, const E* books, int64_t o) {
  return books + shard_of(w, o) * w.num_books * w.book_size * kCodebookGroup;
}

#if defined(__AVX512F__)
// Entry `code` of book b: its 8 values as float32.
inline __m256 codebook_entry(const float* books, int64_t book_size, int b, int64_t code) {
  return _mm256_loadu_ps(books + (b * book_size + code) * kCodebookGroup);
}
inline __m256 codebook_entry(const uint16_t* books, int64_t book_size, int b, int64_t code) {
  return _mm256_cvtph_ps(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(books + (b * book_size + code) * kCodebookGroup)));
}
// Two entries (code0 of books0, code1 of books1, book b of each) side by side, as float32.
inline __m512 codebook_entry_pair(const float* books0, int64_t code0, const float* books1, int64_t code1,
                                  int64_t book_size, int b) {
  return _mm512_insertf32x8(
      _mm512_castps256_ps512(_mm256_loadu_ps(books0 + (b * book_size + code0) * kCodebookGroup)),
      _mm256_loadu_ps(books1 + (b * book_size + code1) * kCodebookGroup), 1);
}
inline __m512 codebook_entry_pair(const uint16_t* books0, int64_t code0, const uint16_t* books1, int64_t code1,
                                  int64_t book_size, int b) {
  auto half = [&](const uint16_t* books, int64_t code) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(books + (b * book_size + code) * kCodebookGroup));
  };
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(half(books0, code0)), half(books1, code1), 1));
}

// Whether a call reads the books of output o's shard mostly where they are not yet in cache: fewer than 8 lookups an
// entry (the shard's outputs times k / 8). Then the kernels prefetch each block's entries two blocks ahead: at
// SmolLM2-135M's shapes (0.2-1.7 lookups an entry, books of 65536) 1, 4 and 64 rows ran 1.3-1.8x, 1.5x and 1.4x as
// fast; at Llama-2-7B's (32-86) prefetching made one row 1.35x slower (Zen 4).
inline bool books_cold(const CodebookWeight& w, int64_t o) {
  const int64_t s = shard_of(w, o);
  return (w.shard_rows[s + 1] - w.shard_rows[s]) * (w.k / kCodebookGroup) < 8 * w.book_size;
}

// Prefetch, to L2, the entries that outputs o0 .. o0 + P - 1 (codes_linear holds) pick in the full block of input
// groups from i0.
template <int P, typename CodeT, typename E>
inline void prefetch_block_entries(const CodebookWeight& w, const E* books, int64_t o0, int64_t i0) {
  const CodeT* const codes = block_codes<CodeT>(w, o0, i0);
  const int64_t output_step = sizeof(CodeT) == 2 ? w.num_books : kCodeBlock * w.num_books;
  const int64_t step = group_step<CodeT>(w);
  for (int b = 0; b < w.num_books; ++b)
    for (int g = 0; g < kCodeBlock; ++g)
      for (int p = 0; p < P; ++p) {
        const int64_t code = codes[p * output_step + g * step + b];
        // As an asm statement: GCC 12 at -O2 and up dropped these _mm_prefetch calls when inlined here.
        asm volatile("prefetcht1 %0" : : "m"(*reinterpret_cast<const char*>(books + (b * w.book_size + code) * 8)));
      }
}
#endif  // __AVX512F__

// Whether outputs o0 .. o0 + count - 1 lie below n, in one shard and, for tiled (16-bit) codes, in one column
// tile: then output o0 + p's codes are output o0's plus p * output_step, and one book serves them all.
template <typename CodeT>
inline bool codes_linear(const CodebookWeight& w, int64_t o0, int64_t count) {
  const int64_t last = o0 + count - 1;
  if (last >= w.n || (sizeof(CodeT) == 2 && (o0 >> 4) != (last >> 4))) return false;
  return last < w.shard_rows[shard_of(w, o0) + 1];
}

}  // namespace
