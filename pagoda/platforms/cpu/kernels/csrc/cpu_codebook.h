// Additive-codebook weights (AQLM) with bf16 activations: one or two rows against books of up to 256 entries sum
// tabulated dot products; one or two rows against larger books, and float32 logits of up to 16 rows, build each
// 8-weight tile in a register; other batches decode one 16-output column tile at a time into the packed bf16 GEMM
// layout and multiply it by the rows there (AMX tiles where granted), so no call dequantizes the whole matrix or
// keeps a dense copy.
#pragma once

#include "cpu_amx.h"
#include "cpu_codebook_rows.h"
#include "cpu_codebook_table.h"
#include "cpu_gemm.h"

namespace {

#if defined(__AVX512BF16__)
// Column tile t of the weights (outputs 16 t .. 16 t + 15, all of k) into wt in the packed layout [k / 2][16][2]:
// each weight scale[o] * sum_b books[b][code] in float32, rounded once to bf16 — the same bf16 weight a dense matmul
// of the dequantized matrix multiplies by. Outputs past n are zero. Per group of 8 inputs, two outputs' entries
// share a vector; the 16 outputs' 4 input pairs each are then transposed into 4 rows of the tile (a 64-byte row
// holds one input pair of all 16 outputs).
// NB: the number of books, where known at compile time (0: w.num_books). Linear: codes_linear holds for the tile.
template <typename CodeT, int NB, bool Linear>
void decode_codebook_tile(bf16_t* wt, const CodebookWeight& w, const typename CodebookEntries<CodeT>::T* entries,
                          int64_t t) {
  const int64_t n = w.n, groups = w.k / kCodebookGroup, num_books = NB ? NB : w.num_books, book_size = w.book_size;
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
  const int64_t step = group_step<CodeT>(w);
  const bool cold = books_cold(w, t * 16);
  for (int64_t i0 = 0; i0 < groups; i0 += kCodeBlock) {
    const int64_t width = groups - i0 < kCodeBlock ? groups - i0 : kCodeBlock;
    // Blocked 8-bit codes: the next tile's in this block (16 outputs' worth, side by side). Tiled 16-bit codes are
    // one stream the hardware prefetches.
    if (sizeof(CodeT) == 1 && next_rows > 0) {
      const char* next = reinterpret_cast<const char*>(block_codes<CodeT>(w, (t + 1) * 16, i0));
      for (int64_t b = 0; b < next_rows * width * num_books; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
    }
    if (Linear && cold && i0 + 3 * kCodeBlock <= groups)
      prefetch_block_entries<16, CodeT>(w, books[0], t * 16, i0 + 2 * kCodeBlock);
    const CodeT* const base = block_codes<CodeT>(w, t * 16, i0);
    const int64_t output_step = sizeof(CodeT) == 2 ? num_books : width * num_books;
    const CodeT* code[16];
    if (!Linear)
      for (int c = 0; c < 16; ++c) code[c] = block_codes<CodeT>(w, t * 16 + c < n ? t * 16 + c : t * 16, i0);
    for (int64_t g = 0; g < width; ++g) {
      const int64_t i = i0 + g;
      __m256i rounded[8];  // outputs c and c + 1's 4 input pairs each, for c = 0, 2, … 14
#pragma GCC unroll 8
      for (int c = 0; c < 16; c += 2) {
        const CodeT* c0 = (Linear ? base + c * output_step : code[c]) + g * step;
        const CodeT* c1 = (Linear ? base + (c + 1) * output_step : code[c + 1]) + g * step;
        auto pair = [&](int b) {  // book b's entries of outputs c and c + 1
          return Linear ? codebook_entry_pair(books[0], c0[b], books[0], c1[b], book_size, b)
                        : codebook_entry_pair(books[c], c0[b], books[c + 1], c1[b], book_size, b);
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
      if (!codes_linear<CodeT>(w, t * 16, 16)) decode_codebook_tile<CodeT, 0, false>(tile, w, entries, t);
      else if (w.num_books == 1) decode_codebook_tile<CodeT, 1, true>(tile, w, entries, t);
      else if (w.num_books == 2) decode_codebook_tile<CodeT, 2, true>(tile, w, entries, t);
      else decode_codebook_tile<CodeT, 0, true>(tile, w, entries, t);
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
// it. One and two rows: books of up to 256 entries (one or two of them) take the table, row by row; larger books
// build each 8-weight tile in a register (Zen 4, Llama-2-7B's shapes, one book of 65536 entries: 2.2x and 1.6x as
// fast as decoding column tiles at one and two rows, even at three, behind from four). Other bf16 outputs multiply
// bf16-rounded column tiles (on AMX tiles where `amx`); float32 outputs (logits) of up to kCodebookMaxRows rows keep
// the exact float32 weights in registers. False where this build can't (no AVX-512; no AVX512-BF16 above
// kCodebookMaxRows rows).
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
  if (m > kCodebookMaxRows || (!F32Out && (bytes || m > 2))) {
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
