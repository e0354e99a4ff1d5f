// Additive-codebook weights (AQLM) with bf16 activations: decode-sized batches build each 8-weight tile in a
// register; larger ones decode one 16-output column tile at a time into the packed bf16 GEMM layout and multiply it
// by the rows there (AMX tiles where granted), so no call dequantizes the whole matrix or keeps a dense copy.
#pragma once

#include "cpu_amx.h"
#include "cpu_common.h"
#include "cpu_gemm.h"

namespace {

constexpr int64_t kCodebookGroup = 8;    // inputs per code (AQLM's in_group_size this kernel takes)
constexpr int64_t kCodebookMaxRows = 16;  // larger batches take codebook_gemm_tiles

#if defined(__AVX512F__)
// Entry `code` of codebook b (books float16 [num_books, book_size, 8]): its 8 float16 values.
inline __m128i codebook_entry(const uint16_t* books, int64_t book_size, int b, int64_t code) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(books + (b * book_size + code) * kCodebookGroup));
}

constexpr int64_t kTableEntries = 256;  // codebooks of up to this many entries (2x8, 1x8 …) take the table kernel

// One row of x against codebooks of at most 256 entries: each input group's dot product with every entry is
// tabulated first (table[i][b][e] = x[8i .. 8i+7] . books[b][e], 1 KiB per group and book, from the books
// transposed to [b][input][entry] so that sixteen entries take eight multiply-adds), then each output sums NB table
// loads per group — its codes' entries — and is scaled once. Building each 8-weight tile per output instead took
// ~6.5 cycles a group per core; the table costs 2 KiB of multiply-adds per group, shared by all n outputs.
template <bool F32Out, int NB>
void codebook_gemv_table(void* y, const bf16_t* x, const uint16_t* codes, const uint16_t* books, const float* scales,
                         int64_t n, int64_t k, int64_t book_size, int num_threads) {
  const int64_t groups = k / kCodebookGroup;
  // The calling thread's buffers, kept between calls (zeroing a fresh table cost as much as a tenth of the call).
  static thread_local aligned_vector<float> books_t, table;
  books_t.assign(static_cast<size_t>(NB * kCodebookGroup * kTableEntries), 0.f);
  if (table.size() < static_cast<size_t>(groups * NB * kTableEntries))
    table.resize(static_cast<size_t>(groups * NB * kTableEntries));
  float* const books_tp = books_t.data();  // the team reaches them through these: thread_local names are per thread
  float* const tablep = table.data();
  for (int b = 0; b < NB; ++b)
    for (int64_t e = 0; e < book_size; ++e) {
      alignas(32) float v[kCodebookGroup];
      _mm256_store_ps(v, _mm256_cvtph_ps(codebook_entry(books, book_size, b, e)));
      for (int d = 0; d < kCodebookGroup; ++d) books_tp[(b * kCodebookGroup + d) * kTableEntries + e] = v[d];
    }
#pragma omp parallel num_threads(num_threads)
  {
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
    for (int64_t i = groups * tid / team; i < groups * (tid + 1) / team; ++i) {
      __m512 xd[kCodebookGroup];
      for (int d = 0; d < kCodebookGroup; ++d) xd[d] = _mm512_set1_ps(bf16_to_f32(x[i * kCodebookGroup + d]));
      for (int b = 0; b < NB; ++b) {
        const float* bt = books_tp + b * kCodebookGroup * kTableEntries;
        float* out = tablep + (i * NB + b) * kTableEntries;
        for (int64_t e = 0; e < kTableEntries; e += 16) {
          __m512 acc = _mm512_mul_ps(xd[0], _mm512_load_ps(bt + e));
          for (int d = 1; d < kCodebookGroup; ++d)
            acc = _mm512_fmadd_ps(xd[d], _mm512_load_ps(bt + d * kTableEntries + e), acc);
          _mm512_store_ps(out + e, acc);
        }
      }
    }
#pragma omp barrier
    const float* tb = tablep;
    for (int64_t o = n * tid / team; o < n * (tid + 1) / team; ++o) {
      const uint16_t* c = codes + o * groups * NB;
      float a[4] = {0.f, 0.f, 0.f, 0.f};  // four groups in flight
      auto group = [&](int64_t i) {
        float v = tb[i * NB * kTableEntries + c[i * NB]];
        for (int b = 1; b < NB; ++b) v += tb[(i * NB + b) * kTableEntries + c[i * NB + b]];
        return v;
      };
      int64_t i = 0;
      for (; i + 4 <= groups; i += 4)
        for (int u = 0; u < 4; ++u) a[u] += group(i + u);
      for (; i < groups; ++i) a[0] += group(i);
      const float v = scales[o] * ((a[0] + a[1]) + (a[2] + a[3]));
      if constexpr (F32Out) static_cast<float*>(y)[o] = v;
      else static_cast<bf16_t*>(y)[o] = f32_to_bf16(v);
    }
  }
}

// y [m, n] = x [m, k] . W^T where row n, inputs 8i .. 8i+7 of W are scale[n] * sum_b books[b][codes[n, i, b]]:
// codes uint16 [n, k / 8, num_books] (unsigned), books float16 [num_books, book_size, 8], scales float32 [n].
// Each tile of 8 weights is built in a register from the codebooks (which stay in cache: 2x8 codebooks are 8 KB,
// 1x16 ones 1 MB) and multiplied into every row of x, so each code is read once per call.
template <bool F32Out>
void codebook_gemm(void* y, const bf16_t* x, const uint16_t* codes, const uint16_t* books, const float* scales,
                   int64_t m, int64_t n, int64_t k, int num_books, int64_t book_size, int num_threads) {
  if (m == 1 && book_size <= kTableEntries) {
    if (num_books == 1) return codebook_gemv_table<F32Out, 1>(y, x, codes, books, scales, n, k, book_size, num_threads);
    if (num_books == 2) return codebook_gemv_table<F32Out, 2>(y, x, codes, books, scales, n, k, book_size, num_threads);
  }
  const int64_t groups = k / kCodebookGroup;
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) xf[i] = bf16_to_f32(x[i]);
  constexpr int64_t kRowsPerTask = 16;
  share_tasks((n + kRowsPerTask - 1) / kRowsPerTask, num_threads, [&](int64_t task) {
    const int64_t n_end = (task + 1) * kRowsPerTask < n ? (task + 1) * kRowsPerTask : n;
    for (int64_t row = task * kRowsPerTask; row < n_end; ++row) {
      __m256 acc[kCodebookMaxRows];
      for (int64_t r = 0; r < m; ++r) acc[r] = _mm256_setzero_ps();
      const uint16_t* c = codes + row * groups * num_books;
      for (int64_t i = 0; i < groups; ++i, c += num_books) {
        __m256 w = _mm256_cvtph_ps(codebook_entry(books, book_size, 0, c[0]));
        for (int b = 1; b < num_books; ++b)
          w = _mm256_add_ps(w, _mm256_cvtph_ps(codebook_entry(books, book_size, b, c[b])));
        for (int64_t r = 0; r < m; ++r)
          acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xf.data() + r * k + i * kCodebookGroup), acc[r]);
      }
      for (int64_t r = 0; r < m; ++r) {
        const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        const float v = scales[row] * _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
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
// The next tile's codes (16 rows of their own) are prefetched meanwhile, a line of each row at a time.
inline void decode_codebook_tile(bf16_t* wt, const uint16_t* codes, const uint16_t* books, const float* scales,
                                 int64_t t, int64_t n, int64_t k, int num_books, int64_t book_size) {
  const int64_t groups = k / kCodebookGroup, per_row = groups * num_books;
  const int64_t line_groups = 32 / num_books > 0 ? 32 / num_books : 1;  // groups whose codes fill a 64-byte line
  const int64_t next_rows = n - (t + 1) * 16 < 16 ? n - (t + 1) * 16 : 16;  // rows of the next tile (<= 0: none)
  const uint16_t* next = codes + (t + 1) * 16 * per_row;
  const uint16_t* code[16];
  __m512 scale[8];
  for (int c = 0; c < 16; ++c) code[c] = codes + (t * 16 + c < n ? t * 16 + c : 0) * per_row;
  for (int c = 0; c < 16; c += 2) {
    const float s0 = t * 16 + c < n ? scales[t * 16 + c] : 0.f, s1 = t * 16 + c + 1 < n ? scales[t * 16 + c + 1] : 0.f;
    scale[c / 2] = _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);
  }
  // Output pair row j of a group takes dword 4 c + j of the staged [16 outputs][4 pairs] dwords: outputs 0-7 from
  // the first 32 dwords, 8-15 from the last 32.
  const __m512i lane = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
  alignas(64) uint32_t staged[64];
  for (int64_t i = 0; i < groups; ++i) {
    if (i % line_groups == 0)
      for (int64_t c = 0; c < next_rows; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(next + c * per_row + i * num_books), _MM_HINT_T0);
    for (int c = 0; c < 16; c += 2) {
      const uint16_t* c0 = code[c] + i * num_books;
      const uint16_t* c1 = code[c + 1] + i * num_books;
      auto pair = [&](int b) {  // book b's entries of outputs c and c + 1, widened to float32
        const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(codebook_entry(books, book_size, b, c0[b])),
                                                     codebook_entry(books, book_size, b, c1[b]), 1);
        return _mm512_cvtph_ps(both);
      };
      __m512 w = pair(0);
      for (int b = 1; b < num_books; ++b) w = _mm512_add_ps(w, pair(b));
      const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(w, scale[c / 2]));
      _mm256_store_si256(reinterpret_cast<__m256i*>(staged + c * 4), rounded);
    }
    const __m512i z0 = _mm512_load_si512(staged), z1 = _mm512_load_si512(staged + 16);
    const __m512i z2 = _mm512_load_si512(staged + 32), z3 = _mm512_load_si512(staged + 48);
    for (int j = 0; j < kCodebookGroup / 2; ++j) {
      const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(j));
      const __m512i lo = _mm512_permutex2var_epi32(z0, idx, z1), hi = _mm512_permutex2var_epi32(z2, idx, z3);
      _mm512_store_si512(wt + (i * kCodebookGroup / 2 + j) * 32, _mm512_mask_blend_epi32(0xFF00, lo, hi));
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

// codebook_gemm for batches of any size: tasks are (chunk of 256 rows, group of column tiles), row-chunk major;
// each decodes its tiles (about 1/64 of their multiply-adds at a full chunk) and multiplies the chunk's rows by
// them: on AMX tiles in 64-row passes, one tile a task, where `amx` (k a multiple of 32); else with the
// AVX512-BF16 micro-kernels, kNT tiles a task (their widest form: one tile alone is bound by its broadcasts).
template <bool F32Out>
void codebook_gemm_tiles(void* y, const bf16_t* x, const uint16_t* codes, const uint16_t* books, const float* scales,
                         int64_t m, int64_t n, int64_t k, int num_books, int64_t book_size, int num_threads,
                         bool amx) {
  constexpr int64_t kChunkRows = 256;
#if defined(PAGODA_HAS_AMX)
  amx = amx && k % 32 == 0;
#else
  amx = false;
#endif
  const int64_t group = amx ? 1 : kNT, tiles = (n + 15) / 16, groups = (tiles + group - 1) / group;
  const int64_t chunks = (m + kChunkRows - 1) / kChunkRows, esz = F32Out ? 4 : 2;
  share_tasks_with<CodebookTileState>(chunks * groups, num_threads, [&](int64_t task, CodebookTileState& state) {
    const int64_t t0 = task % groups * group, c0 = task / groups * kChunkRows;
    const int64_t c1 = c0 + kChunkRows < m ? c0 + kChunkRows : m;
    const int64_t t1 = t0 + group < tiles ? t0 + group : tiles, col = t0 * 16;
    state.wt.resize(static_cast<size_t>(group * k * 16));
    bf16_t* wt = state.wt.data();
    for (int64_t t = t0; t < t1; ++t)
      decode_codebook_tile(wt + (t - t0) * k * 16, codes, books, scales, t, n, k, num_books, book_size);
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

}  // namespace
