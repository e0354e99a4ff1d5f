// One or two rows of bf16 activations against AQLM books of up to 256 entries (8-bit codes): sums of tabulated
// dot products.
#pragma once

#include "cpu_codebook_weight.h"

namespace {

#if defined(__AVX512F__)
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
#endif  // __AVX512F__

}  // namespace
