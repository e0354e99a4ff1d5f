// Additive-codebook weights (AQLM) with bf16 activations: one or two rows against books of up to 256 entries sum
// tabulated dot products; float32 logits of up to 16 rows build each 8-weight tile in a register; other batches
// decode one 16-output column tile at a time into the packed bf16 GEMM layout and multiply it by the rows there (AMX
// tiles where granted), so no call dequantizes the whole matrix or keeps a dense copy.
#pragma once

#include "cpu_amx.h"
#include "cpu_common.h"
#include "cpu_gemm.h"

namespace {

constexpr int64_t kCodebookGroup = 8;     // inputs per code (AQLM's in_group_size this kernel takes)
constexpr int64_t kCodebookMaxRows = 16;  // the most rows codebook_gemm (tiles built in registers) takes
constexpr int64_t kCodeBlock = 4;         // input groups per block of the codes' layout
constexpr int64_t kTableEntries = 256;    // books of up to this many entries (2x8, 1x8 …): 8-bit codes, table kernel

// An AQLM weight as kernels/cpu_quant_ops.py's PackedCodebook holds it. A merged layer (q/k/v, gate/up) is one
// weight whose shards each have their own books. The codes are blocked by kCodeBlock input groups, so that a pass
// over every output reads a block's codes in order ([blocks][n][block's groups][num_books]; the last block may be
// narrower).
struct CodebookWeight {
  const void* codes;          // uint8 where book_size <= kTableEntries, else uint16 (unsigned values)
  const uint16_t* books;      // float16 [shards][num_books][book_size][8], for books of more than kTableEntries
  const float* books_t;       // float32 [shards][num_books][8][book_stride]: books of up to kTableEntries by input
                              // (book_stride: book_size rounded up to 16), which the one-row table is built from
  const float* scales;        // float32 [n]
  const int64_t* shard_rows;  // [shards + 1]: shard s holds outputs shard_rows[s] .. shard_rows[s + 1] - 1
  int64_t shards, num_books, book_size, book_stride, n, k;
};

// Where output o's codes of input group i start in the blocked layout (`groups` = k / 8).
inline int64_t code_offset(int64_t o, int64_t i, int64_t n, int64_t groups, int64_t num_books) {
  const int64_t b0 = i - i % kCodeBlock, width = groups - b0 < kCodeBlock ? groups - b0 : kCodeBlock;
  return (b0 * n + o * width + (i - b0)) * num_books;
}

// The books' entries a kernel reads for a code type: small books (8-bit codes) as float32, built per call from
// books_t (a transpose, no conversion); larger ones as the weight's float16.
template <typename CodeT> struct CodebookEntries { using T = float; };
template <> struct CodebookEntries<uint16_t> { using T = uint16_t; };

// Output o's books (entries [num_books][book_size][8] of `books`): its shard's.
template <typename E>
inline const E* books_of(const CodebookWeight& w, const E* books, int64_t o) {
  int64_t s = 0;
  while (o >= w.shard_rows[s + 1]) ++s;
  return books + s * w.num_books * w.book_size * kCodebookGroup;
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

// sums[o] = the table entries that outputs o0 .. o1 - 1's codes of one block (`width` groups) pick, summed. Kept
// scalar: vectorized across outputs (as the compiler otherwise does) each vector gathers from the table element by
// element, ~3x slower here.
template <int NB>
__attribute__((optimize("no-tree-vectorize"))) void table_sums(float* sums, const uint8_t* block_codes,
                                                              const float* table, int64_t o0, int64_t o1,
                                                              int64_t width) {
  if (width == kCodeBlock && NB == 2) {
    // An output's 8 codes in one load, taken apart in registers: ~0.75 cycles a lookup, against ~0.88 loading
    // each code (two loads a lookup).
    for (int64_t o = o0; o < o1; ++o) {
      uint64_t word;
      std::memcpy(&word, block_codes + o * 8, 8);
      const uint32_t lo = static_cast<uint32_t>(word), hi = static_cast<uint32_t>(word >> 32);
      const float* t = table;
      const float g0 = t[lo & 255] + t[kTableEntries + ((lo >> 8) & 255)];
      const float g1 = t[2 * kTableEntries + ((lo >> 16) & 255)] + t[3 * kTableEntries + (lo >> 24)];
      const float g2 = t[4 * kTableEntries + (hi & 255)] + t[5 * kTableEntries + ((hi >> 8) & 255)];
      const float g3 = t[6 * kTableEntries + ((hi >> 16) & 255)] + t[7 * kTableEntries + (hi >> 24)];
      sums[o] = (g0 + g1) + (g2 + g3);
    }
    return;
  }
  if (width == kCodeBlock) {
    for (int64_t o = o0; o < o1; ++o) {
      const uint8_t* c = block_codes + o * kCodeBlock * NB;
      float a[4] = {0.f, 0.f, 0.f, 0.f};  // four chains of adds
#pragma GCC unroll 8
      for (int j = 0; j < kCodeBlock * NB; ++j) a[j & 3] += table[j * kTableEntries + c[j]];
      sums[o] = (a[0] + a[1]) + (a[2] + a[3]);
    }
    return;
  }
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* c = block_codes + o * width * NB;
    float a = 0.f;
    for (int64_t j = 0; j < width * NB; ++j) a += table[j * kTableEntries + c[j]];
    sums[o] = a;
  }
}

// One row of x against books of at most 256 entries (8-bit codes). Each thread takes a share of the code blocks;
// per block and shard, the block's groups' dot products with every entry are tabulated (table[g][b][e] =
// x[8i .. 8i+7] . books[b][e], 1 KiB a group and book, from books_t so that sixteen entries take eight
// multiply-adds), and every output of the shard then sums its codes' entries from the table while it is in L1.
// Each block's sums go to their own row of `partial`, summed in block order at the end, so the result does not
// depend on the thread count. Walking all of k per output instead read the whole table (groups * NB KiB) from L2 at
// ~1.7 cycles a lookup (~0.9 this way); building each 8-weight tile per output took ~6.5 cycles a group.
template <bool F32Out, int NB>
void codebook_gemv_table(void* y, const bf16_t* x, const CodebookWeight& w, int num_threads) {
  const int64_t n = w.n, groups = w.k / kCodebookGroup, blocks = (groups + kCodeBlock - 1) / kCodeBlock;
  const uint8_t* const codes = static_cast<const uint8_t*>(w.codes);
  static thread_local aligned_vector<float> partial_rows;  // the calling thread's, kept between calls
  if (partial_rows.size() < static_cast<size_t>(blocks * n)) partial_rows.resize(static_cast<size_t>(blocks * n));
  float* const partial = partial_rows.data();  // the team reaches it through this: thread_local names are per thread
#pragma omp parallel num_threads(num_threads)
  {
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
    alignas(64) float table[kCodeBlock * NB * kTableEntries];
    for (int64_t blk = blocks * tid / team; blk < blocks * (tid + 1) / team; ++blk) {
      const int64_t i0 = blk * kCodeBlock, width = groups - i0 < kCodeBlock ? groups - i0 : kCodeBlock;
      const uint8_t* const block_codes = codes + i0 * n * NB;
      float* const sums = partial + blk * n;
      for (int64_t s = 0; s < w.shards; ++s) {
        const float* bt = w.books_t + s * NB * kCodebookGroup * w.book_stride;
        for (int64_t g = 0; g < width; ++g) {
          __m512 xd[kCodebookGroup];
          for (int d = 0; d < kCodebookGroup; ++d)
            xd[d] = _mm512_set1_ps(bf16_to_f32(x[(i0 + g) * kCodebookGroup + d]));
          for (int b = 0; b < NB; ++b) {
            const float* book = bt + b * kCodebookGroup * w.book_stride;
            float* out = table + (g * NB + b) * kTableEntries;
            for (int64_t e = 0; e < w.book_size; e += 16) {
              auto entries = [&](int d) {  // input d of entries e .. e + 15
                return _mm512_loadu_ps(book + d * w.book_stride + e);
              };
              __m512 acc = _mm512_mul_ps(xd[0], entries(0));
              for (int d = 1; d < kCodebookGroup; ++d) acc = _mm512_fmadd_ps(xd[d], entries(d), acc);
              _mm512_store_ps(out + e, acc);
            }
          }
        }
        table_sums<NB>(sums, block_codes, table, w.shard_rows[s], w.shard_rows[s + 1], width);
      }
    }
#pragma omp barrier
    const int64_t o0 = n * tid / team, o1 = n * (tid + 1) / team;
    for (int64_t blk = 1; blk < blocks; ++blk)  // block 0's row collects the sums
      for (int64_t o = o0; o < o1; ++o) partial[o] += partial[blk * n + o];
    for (int64_t o = o0; o < o1; ++o) {
      const float v = w.scales[o] * partial[o];
      if constexpr (F32Out) static_cast<float*>(y)[o] = v;
      else static_cast<bf16_t*>(y)[o] = f32_to_bf16(v);
    }
  }
}

// y [m, n] = x [m, k] . W^T where row o, inputs 8i .. 8i+7 of W are scale[o] * sum_b books[b][code(o, i, b)].
// Each tile of 8 weights is built in a register from its shard's books (which stay in cache: 2x8 books are 16 KB as
// float32, 1x16 ones 1 MB) and multiplied into every row of x, so each code is read once per call.
template <bool F32Out, typename CodeT>
void codebook_gemm(void* y, const bf16_t* x, const CodebookWeight& w, const typename CodebookEntries<CodeT>::T* entries,
                   int64_t m, int num_threads) {
  const int64_t n = w.n, k = w.k, groups = k / kCodebookGroup, num_books = w.num_books;
  const CodeT* const codes = static_cast<const CodeT*>(w.codes);
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) xf[i] = bf16_to_f32(x[i]);
  constexpr int64_t kRowsPerTask = 16;
  share_tasks((n + kRowsPerTask - 1) / kRowsPerTask, num_threads, [&](int64_t task) {
    const int64_t n_end = (task + 1) * kRowsPerTask < n ? (task + 1) * kRowsPerTask : n;
    for (int64_t row = task * kRowsPerTask; row < n_end; ++row) {
      const auto* books = books_of(w, entries, row);
      __m256 acc[kCodebookMaxRows];
      for (int64_t r = 0; r < m; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t i0 = 0; i0 < groups; i0 += kCodeBlock) {
        const int64_t i1 = i0 + kCodeBlock < groups ? i0 + kCodeBlock : groups;
        const CodeT* c = codes + code_offset(row, i0, n, groups, num_books);
        for (int64_t i = i0; i < i1; ++i, c += num_books) {
          __m256 wv = codebook_entry(books, w.book_size, 0, c[0]);
          for (int b = 1; b < num_books; ++b)
            wv = _mm256_add_ps(wv, codebook_entry(books, w.book_size, b, c[b]));
          for (int64_t r = 0; r < m; ++r)
            acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xf.data() + r * k + i * kCodebookGroup), acc[r]);
        }
      }
      for (int64_t r = 0; r < m; ++r) {
        const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        const float v = w.scales[row] * _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
        if constexpr (F32Out) static_cast<float*>(y)[r * n + row] = v;
        else static_cast<bf16_t*>(y)[r * n + row] = f32_to_bf16(v);
      }
    }
  });
}
#endif  // __AVX512F__

#if defined(__AVX512BF16__)
// Column tile t of the weights (outputs 16 t .. 16 t + 15, all of k) into wt in the packed layout [k / 2][16][2]:
// each weight scale[o] * sum_b books[b][code] in float32, rounded once to bf16 — the same bf16 weight a dense matmul
// of the dequantized matrix multiplies by. Outputs past n are zero. Per group of 8 inputs, two outputs' entries
// share a vector; the 16 outputs' 4 input pairs each are then transposed into 4 rows of the tile (a 64-byte row
// holds one input pair of all 16 outputs).
// The next tile's codes in each block (16 outputs' worth, side by side) are prefetched as the block starts.
// NB: the number of books, where known at compile time (0: w.num_books).
template <typename CodeT, int NB>
void decode_codebook_tile(bf16_t* wt, const CodebookWeight& w, const typename CodebookEntries<CodeT>::T* entries,
                          int64_t t) {
  const int64_t n = w.n, groups = w.k / kCodebookGroup, num_books = NB ? NB : w.num_books, book_size = w.book_size;
  const CodeT* const codes = static_cast<const CodeT*>(w.codes);
  const int64_t next_rows = n - (t + 1) * 16 < 16 ? n - (t + 1) * 16 : 16;  // rows of the next tile (<= 0: none)
  const typename CodebookEntries<CodeT>::T* books[16];
  __m512 scale[8];
  for (int c = 0; c < 16; ++c) books[c] = books_of(w, entries, t * 16 + c < n ? t * 16 + c : 0);
  for (int c = 0; c < 16; c += 2) {
    const float s0 = t * 16 + c < n ? w.scales[t * 16 + c] : 0.f;
    const float s1 = t * 16 + c + 1 < n ? w.scales[t * 16 + c + 1] : 0.f;
    scale[c / 2] = _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);
  }
  // Output pair row j of a group takes dword 4 c + j of the [16 outputs][4 pairs] dwords z0 .. z3 hold (outputs 0-7
  // in z0, z1; 8-15 in z2, z3), assembled in registers: staging them through memory stalled each 64-byte load on
  // the two 32-byte stores it spans.
  const __m512i lane = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
  for (int64_t i0 = 0; i0 < groups; i0 += kCodeBlock) {
    const int64_t width = groups - i0 < kCodeBlock ? groups - i0 : kCodeBlock, row_codes = width * num_books;
    const CodeT* const block = codes + code_offset(0, i0, n, groups, num_books);
    if (next_rows > 0) {
      const char* next = reinterpret_cast<const char*>(block + (t + 1) * 16 * row_codes);
      for (int64_t b = 0; b < next_rows * row_codes * static_cast<int64_t>(sizeof(CodeT)); b += 64)
        _mm_prefetch(next + b, _MM_HINT_T0);
    }
    const CodeT* code[16];
    for (int c = 0; c < 16; ++c) code[c] = block + (t * 16 + c < n ? t * 16 + c : 0) * row_codes;
    for (int64_t g = 0; g < width; ++g) {
      const int64_t i = i0 + g;
      __m256i rounded[8];  // outputs c and c + 1's 4 input pairs each, for c = 0, 2, … 14
      for (int c = 0; c < 16; c += 2) {
        const CodeT* c0 = code[c] + g * num_books;
        const CodeT* c1 = code[c + 1] + g * num_books;
        auto pair = [&](int b) {  // book b's entries of outputs c and c + 1
          return codebook_entry_pair(books[c], c0[b], books[c + 1], c1[b], book_size, b);
        };
        __m512 v = pair(0);
        for (int b = 1; b < num_books; ++b) v = _mm512_add_ps(v, pair(b));
        rounded[c / 2] = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(v, scale[c / 2]));
      }
      auto join = [&](int a) { return _mm512_inserti64x4(_mm512_castsi256_si512(rounded[a]), rounded[a + 1], 1); };
      const __m512i z0 = join(0), z1 = join(2), z2 = join(4), z3 = join(6);
      for (int j = 0; j < kCodebookGroup / 2; ++j) {
        const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(j));
        const __m512i lo = _mm512_permutex2var_epi32(z0, idx, z1), hi = _mm512_permutex2var_epi32(z2, idx, z3);
        _mm512_store_si512(wt + (i * kCodebookGroup / 2 + j) * 32, _mm512_mask_blend_epi32(0xFF00, lo, hi));
      }
    }
  }
}

// A thread's buffer for one decoded column tile, and its AMX tile configuration.
struct CodebookTileState {
  aligned_vector<bf16_t> wt;
#if defined(PAGODA_HAS_AMX)
  AmxTiles tiles;
#endif
};

// codebook_gemm for batches of any size: tasks are (chunk of rows, group of column tiles), row-chunk major; each
// decodes its tiles and multiplies the chunk's rows by them: on AMX tiles in 64-row passes, one tile a task, where
// `amx` (k a multiple of 32); else with the AVX512-BF16 micro-kernels, kNT tiles a task (their widest form: one tile
// alone is bound by its broadcasts). Chunks of decoded_chunk_rows.
template <bool F32Out, typename CodeT>
void codebook_gemm_tiles(void* y, const bf16_t* x, const CodebookWeight& w,
                         const typename CodebookEntries<CodeT>::T* entries, int64_t m, int num_threads, bool amx) {
  const int64_t n = w.n, k = w.k;
#if defined(PAGODA_HAS_AMX)
  amx = amx && k % 32 == 0;
#else
  amx = false;
#endif
  const int64_t group = amx ? 1 : kNT, tiles = (n + 15) / 16, groups = (tiles + group - 1) / group;
  const int64_t chunk_rows = decoded_chunk_rows(m, groups, num_threads);
  const int64_t chunks = (m + chunk_rows - 1) / chunk_rows, esz = F32Out ? 4 : 2;
  share_tasks_with<CodebookTileState>(chunks * groups, num_threads, [&](int64_t task, CodebookTileState& state) {
    const int64_t t0 = task % groups * group, c0 = task / groups * chunk_rows;
    const int64_t c1 = c0 + chunk_rows < m ? c0 + chunk_rows : m;
    const int64_t t1 = t0 + group < tiles ? t0 + group : tiles, col = t0 * 16;
    state.wt.resize(static_cast<size_t>(group * k * 16));
    bf16_t* wt = state.wt.data();
    for (int64_t t = t0; t < t1; ++t) {
      bf16_t* tile = wt + (t - t0) * k * 16;
      if (w.num_books == 1) decode_codebook_tile<CodeT, 1>(tile, w, entries, t);
      else if (w.num_books == 2) decode_codebook_tile<CodeT, 2>(tile, w, entries, t);
      else decode_codebook_tile<CodeT, 0>(tile, w, entries, t);
    }
    if (!amx) {
      gemm_packed_serial<F32Out>(static_cast<char*>(y) + (c0 * n + col) * esz, n, x + c0 * k, wt, c1 - c0,
                                 n - col < group * 16 ? n - col : group * 16, k);
      return;
    }
#if defined(PAGODA_HAS_AMX)
    const __mmask16 mask = tile_columns(n, col);
    alignas(64) float acc[64 * 16];
    for (int64_t r0 = c0; r0 < c1; r0 += 64) {
      const int64_t rows = c1 - r0 < 64 ? c1 - r0 : 64;
      const int row_tiles = static_cast<int>((rows + 15) / 16);
      state.tiles.configure(row_tiles, static_cast<int>(rows - (row_tiles - 1) * 16));
      amx_tile_pass_rows(row_tiles, acc, x + r0 * k, k, wt, nullptr, 0);
      store_tile_rows<F32Out>(static_cast<char*>(y) + r0 * n * esz, n, col, mask, acc, rows,
                              [](__m512 v) { return v; });
    }
#endif
  });
}
#endif  // __AVX512BF16__

// Small books by entry, float32 [shards][num_books][book_size][8], from books_t (the weight keeps only that form):
// the calling thread's buffer, rebuilt per call for the kernels that take whole entries (batches of two rows and
// more; a small share of their work).
inline const float* books_by_entry(const CodebookWeight& w) {
  static thread_local aligned_vector<float> books;
  const int64_t pairs = w.shards * w.num_books;
  books.resize(static_cast<size_t>(pairs * w.book_size * kCodebookGroup));
  for (int64_t p = 0; p < pairs; ++p) {
    const float* src = w.books_t + p * kCodebookGroup * w.book_stride;
    float* dst = books.data() + p * w.book_size * kCodebookGroup;
    for (int64_t e = 0; e < w.book_size; ++e)
      for (int d = 0; d < kCodebookGroup; ++d) dst[e * kCodebookGroup + d] = src[d * w.book_stride + e];
  }
  return books.data();
}

// y [m, n] = x [m, k] (bf16) . W^T for an AQLM weight, as both the linear_codebook op and the fused decode step run
// it. Books of up to 256 entries (one or two of them): one and two rows take the table, row by row. Other bf16
// outputs multiply bf16-rounded column tiles (on AMX tiles where `amx`): building each 8-weight tile in a register
// per row ran 3x slower at 8 rows (Zen 4); float32 outputs (logits) of up to kCodebookMaxRows rows keep the exact
// float32 weights that way. False where this build can't (no AVX-512; no AVX512-BF16 above kCodebookMaxRows rows).
template <bool F32Out>
bool codebook_linear(void* y, const bf16_t* x, const CodebookWeight& w, int64_t m, int num_threads, bool amx) {
#if defined(__AVX512F__)
  const bool bytes = w.book_size <= kTableEntries;
  if (m <= 2 && bytes && (w.num_books == 1 || w.num_books == 2)) {
    for (int64_t r = 0; r < m; ++r) {
      void* row = static_cast<char*>(y) + r * w.n * (F32Out ? 4 : 2);
      if (w.num_books == 1) codebook_gemv_table<F32Out, 1>(row, x + r * w.k, w, num_threads);
      else codebook_gemv_table<F32Out, 2>(row, x + r * w.k, w, num_threads);
    }
    return true;
  }
#if defined(__AVX512BF16__)
  if (m > kCodebookMaxRows || !F32Out) {
    if (bytes) codebook_gemm_tiles<F32Out, uint8_t>(y, x, w, books_by_entry(w), m, num_threads, amx);
    else codebook_gemm_tiles<F32Out, uint16_t>(y, x, w, w.books, m, num_threads, amx);
    return true;
  }
#endif
  if (m > kCodebookMaxRows) return false;
  if (bytes) codebook_gemm<F32Out, uint8_t>(y, x, w, books_by_entry(w), m, num_threads);
  else codebook_gemm<F32Out, uint16_t>(y, x, w, w.books, m, num_threads);
  return true;
#else
  (void)y; (void)x; (void)w; (void)m; (void)num_threads; (void)amx;
  return false;
#endif
}

}  // namespace
