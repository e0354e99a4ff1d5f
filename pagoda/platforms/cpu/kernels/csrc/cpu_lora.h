// Many LoRA adapters in one batch (the lora_shrink_expand op), as punica's SGMV kernels do it: a step's tokens are
// grouped by adapter slot once per step, and each layer runs, per group of rows of one slot, one shrink
// (x A_s^T, scaled) and one expand per shard of the layer (B_i), added into the base layer's output. A and each
// B_i are packed per slot as pagoda_pack_bf16 packs a weight, so both products are the packed bf16 GEMM's
// micro-kernels, or AMX tiles where the caller may use them (groups of 8 rows or more); B is kept per shard (a
// merged q/k/v layer's B is block-diagonal: only the shard's own rank columns feed its outputs), so neither memory
// nor arithmetic is spent on the zeros.
#pragma once

#include "cpu_gemm.h"

namespace {

constexpr int kLoRAMaxShards = 4;

// One layer's adapter slots. Slot s: A [shards * rank, in] packed at a + s * a_stride (shard i's rows at
// i * rank, zero rows past an adapter's own rank); shard i's B_i [out_size[i], rank] packed at
// b + s * b_stride + b_offset[i].
struct LoRASlots {
  const bf16_t* a;
  int64_t a_stride;
  const bf16_t* b;
  int64_t b_stride;
  int64_t in, rank, shards;
  int64_t out_offset[kLoRAMaxShards], out_size[kLoRAMaxShards], b_offset[kLoRAMaxShards];
};

// A step's tokens grouped by slot: order lists the tokens that have an adapter, slot by slot (counts[s] of slot s).
struct LoRAGroups {
  const int64_t* order;
  const int64_t* counts;
  int64_t num_slots;
};

#if defined(__AVX512BF16__)
constexpr int64_t kLoRARows = 64;      // rows per task; a task's rows are all of one slot
constexpr int64_t kLoRAColumns = 192;  // output columns per expand task (12 tiles)

struct LoRARowChunk {
  int64_t slot, start, rows;  // grouped rows [start, start + rows)
};

// y rows [MR] (pointers) += z [MR, k] (rows kz apart, k even) . the NT tiles from tile0 of B packed [n, k], added
// to the bf16 rows in float32 and rounded once: the packed GEMM's micro-kernel with its accumulators loaded from y.
template <int MR, int NT>
inline void lora_expand_kernel(bf16_t* const* yrows, const bf16_t* z, int64_t kz, int64_t k, const bf16_t* bp,
                               int64_t tile0, int64_t n) {
  const int64_t k2 = k / 2, tile_elems = k2 * kTile * 2;
  __m512 acc[MR][NT];
  __mmask16 mask[NT];
  for (int t = 0; t < NT; ++t) {
    const int64_t col = (tile0 + t) * kTile;
    mask[t] = tile_columns(n, col);
    for (int r = 0; r < MR; ++r) acc[r][t] = load16(yrows[r] + col, mask[t]);
  }
  const bf16_t* w0 = bp + tile0 * tile_elems;
  for (int64_t p = 0; p < k2; ++p) {
    __m512bh b[NT];
    for (int t = 0; t < NT; ++t) b[t] = (__m512bh)_mm512_loadu_si512(w0 + t * tile_elems + p * kTile * 2);
    for (int r = 0; r < MR; ++r) {
      uint32_t pair;
      std::memcpy(&pair, z + r * kz + 2 * p, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], a, b[t]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < MR; ++r)
      _mm256_mask_storeu_epi16(yrows[r] + (tile0 + t) * kTile, mask[t], (__m256i)_mm512_cvtneps_pbh(acc[r][t]));
}

// lora_expand_kernel over `rows` rows (passes of kMR) and the tiles [tile0, tile0 + tiles) in groups of kNT.
template <int NT>
inline void lora_expand_rows(int64_t rows, bf16_t* const* yrows, const bf16_t* z, int64_t kz, int64_t k,
                             const bf16_t* bp, int64_t tile0, int64_t n) {
  auto pass = [&](auto mr, int64_t r) {
    lora_expand_kernel<decltype(mr)::value, NT>(yrows + r, z + r * kz, kz, k, bp, tile0, n);
  };
  int64_t r = 0;
  for (; r + kMR <= rows; r += kMR) pass(std::integral_constant<int, kMR>{}, r);
  remainder_pass<1, kMR>(rows - r, r, pass);
}

#if defined(PAGODA_HAS_AMX)
// The expand on AMX tiles: y rows [rows <= 64] (pointers) += z [rows, k] . the column tiles [tile0, tile0 + tiles)
// of B packed [n, k], for k of 16 or a multiple of 32 (z's rows k apart). Each 16-column tile's products for up to
// four 16-row tiles are summed in float32 tiles (the AMX GEMM's tile pass), then added to the bf16 rows.
inline void lora_expand_amx(int64_t rows, bf16_t* const* yrows, const bf16_t* z, int64_t k, const bf16_t* bp,
                            int64_t tile0, int64_t tiles, int64_t n) {
  const int64_t b_tile = k / 2 * kTile * 2;
  const int row_tiles = static_cast<int>((rows + 15) / 16), last_rows = static_cast<int>(rows - (row_tiles - 1) * 16);
  amx_configure(row_tiles, last_rows, static_cast<int>(k < 32 ? k : 32));
  alignas(64) float acc[64 * 16];
  for (int64_t t = tile0; t < tile0 + tiles; ++t) {
    amx_tile_pass_rows(row_tiles, acc, z, k, bp + t * b_tile, nullptr, 0);
    const int64_t col = t * kTile;
    const __mmask16 m = tile_columns(n, col);
    for (int64_t r = 0; r < rows; ++r) {
      bf16_t* yr = yrows[r] + col;
      const __m512 sum = _mm512_add_ps(load16(yr, m), _mm512_load_ps(acc + r * 16));
      _mm256_mask_storeu_epi16(yr, m, (__m256i)_mm512_cvtneps_pbh(sum));
    }
  }
  _tile_release();
}
#endif

// Asks for [p, p + bytes) in L2 before a task reads it: an adapter's matrices are a few kB to a few tens of kB
// each, too short for the hardware prefetchers to ramp up, and otherwise arrive one miss at a time.
inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
}

template <typename T>
T* grown(std::vector<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// z [rows, rank_all] (float32) = xg [rows, in] . slot A^T, prefetching `ahead` (the next task's A, the same size) into
// L2 meanwhile; on AMX tiles where the caller may use them and the shape suits them.
inline void lora_shrink_rows(float* z, const bf16_t* xg, const bf16_t* a, int64_t rows, int64_t rank_all, int64_t in,
                             const bf16_t* ahead, bool amx) {
#if defined(PAGODA_HAS_AMX)
  if (amx && rows >= kAmxMinRows && in % 32 == 0) {
    if (ahead) prefetch_lines(ahead, (rank_all + kTile - 1) / kTile * packed_k2(in) * kTile * 2 * sizeof(bf16_t));
    gemm_packed_amx<true>(z, rank_all, xg, a, nullptr, rows, rank_all, in, 1);
    return;
  }
#else
  (void)amx;
#endif
  const int64_t tiles = (rank_all + kTile - 1) / kTile, group = kNT * packed_k2(in) * kTile * 2;
  for (int64_t t = 0; t < tiles; t += kNT) {
    const bf16_t* next = ahead ? ahead + (t / kNT) * group : nullptr;  // this group's part of the next A
    switch (tiles - t < kNT ? tiles - t : kNT) {
      case 3: rows_kernel<3, true>(rows, z, rank_all, xg, in, a, t, rank_all, nullptr, next); break;
      case 2: rows_kernel<2, true>(rows, z, rank_all, xg, in, a, t, rank_all, nullptr, next); break;
      default: rows_kernel<1, true>(rows, z, rank_all, xg, in, a, t, rank_all, nullptr, next); break;
    }
  }
}

// y[t] += bf16(((x[t] A_s^T) * scales[s]) B_s^T) for every grouped token t of slot s, the sum rounded once;
// x [T, in] and y [T, out] rows ldx / ldy elements apart. Other rows of y are not touched. amx: the shrink may use
// AMX tiles (the caller holds the permission).
inline void lora_shrink_expand(const LoRASlots& L, const LoRAGroups& G, const float* scales, bf16_t* y, int64_t ldy,
                               const bf16_t* x, int64_t ldx, int num_threads, bool amx) {
  static thread_local std::vector<LoRARowChunk> chunks;
  static thread_local std::vector<bf16_t> gathered_buf, shrunk_buf;
  static thread_local std::vector<bf16_t*> yrows_buf;
  chunks.clear();
  int64_t grouped = 0;
  for (int64_t s = 0; s < G.num_slots; ++s) {
    for (int64_t r = 0; r < G.counts[s]; r += kLoRARows)
      chunks.push_back({s, grouped + r, G.counts[s] - r < kLoRARows ? G.counts[s] - r : kLoRARows});
    grouped += G.counts[s];
  }
  if (grouped == 0) return;
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  // The shrunk rows, shard by shard ([shard][grouped row][rank2]), each row padded to an even length (rank2) with
  // a zero so the expand reads whole pairs.
  const int64_t rank = L.rank, rank2 = (rank + 1) / 2 * 2, rank_all = L.shards * rank, in = L.in;
  bf16_t* gathered = grown(gathered_buf, static_cast<size_t>(grouped * in));
  bf16_t* shrunk = grown(shrunk_buf, static_cast<size_t>(L.shards * grouped * rank2));
  bf16_t** yrows = grown(yrows_buf, static_cast<size_t>(grouped));
  for (int64_t r = 0; r < grouped; ++r) yrows[r] = y + G.order[r] * ldy;
  const LoRARowChunk* ch = chunks.data();
  // Adapters stream from memory (a step reads every active slot's matrices once): each task prefetches what its
  // thread's next task reads while it computes.
  share_tasks(num_chunks, num_threads, [&](int64_t c) {
    static thread_local std::vector<float> f32_buf;
    const LoRARowChunk& k = ch[c];
    bf16_t* xg = gathered + k.start * in;
    for (int64_t r = 0; r < k.rows; ++r)
      std::memcpy(xg + r * in, x + G.order[k.start + r] * ldx, sizeof(bf16_t) * in);
    float* z = grown(f32_buf, static_cast<size_t>(k.rows * rank_all));
    const bool next_slot = c + 1 < num_chunks && ch[c + 1].slot != k.slot;
    lora_shrink_rows(z, xg, L.a + k.slot * L.a_stride, k.rows, rank_all, in,
                     next_slot ? L.a + ch[c + 1].slot * L.a_stride : nullptr, amx);
    prefetch_lines(L.b + k.slot * L.b_stride, L.b_stride * sizeof(bf16_t));  // for the expand
    const float scale = scales[k.slot];
    for (int64_t i = 0; i < L.shards; ++i)
      for (int64_t r = 0; r < k.rows; ++r) {
        bf16_t* zr = shrunk + (i * grouped + k.start + r) * rank2;
        for (int64_t j = 0; j < rank; ++j) zr[j] = f32_to_bf16(z[r * rank_all + i * rank + j] * scale);
        if (rank2 != rank) zr[rank] = 0;
      }
  });
  // Expand tasks: (chunk, shard, block of kLoRAColumns output columns), chunk-major.
  int64_t blocks[kLoRAMaxShards + 1] = {0};  // prefix sums of each shard's column blocks
  for (int64_t i = 0; i < L.shards; ++i) blocks[i + 1] = blocks[i] + (L.out_size[i] + kLoRAColumns - 1) / kLoRAColumns;
  const int64_t per_chunk = blocks[L.shards];
  share_tasks(num_chunks * per_chunk, num_threads, [&](int64_t task) {
    static thread_local std::vector<bf16_t*> rows_buf;
    const LoRARowChunk& k = ch[task / per_chunk];
    const int64_t block = task % per_chunk;
    int64_t i = 0;
    while (block >= blocks[i + 1]) ++i;
    const int64_t col0 = (block - blocks[i]) * kLoRAColumns, n = L.out_size[i];
    const int64_t tiles = ((n - col0 < kLoRAColumns ? n - col0 : kLoRAColumns) + kTile - 1) / kTile;
    // This shard's columns of the chunk's rows of y, and its B from the slot.
    bf16_t** yr = grown(rows_buf, static_cast<size_t>(k.rows));
    for (int64_t r = 0; r < k.rows; ++r) yr[r] = yrows[k.start + r] + L.out_offset[i];
    const bf16_t* bp = L.b + k.slot * L.b_stride + L.b_offset[i];
    const bf16_t* z = shrunk + (i * grouped + k.start) * rank2;
    const int64_t tile0 = col0 / kTile;
#if defined(PAGODA_HAS_AMX)
    if (amx && k.rows >= kAmxMinRows && (rank2 == 16 || rank2 % 32 == 0)) {
      lora_expand_amx(k.rows, yr, z, rank2, bp, tile0, tiles, n);
      return;
    }
#endif
    for (int64_t t = 0; t < tiles; t += kNT) {
      switch (tiles - t < kNT ? tiles - t : kNT) {
        case 3: lora_expand_rows<3>(k.rows, yr, z, rank2, rank2, bp, tile0 + t, n); break;
        case 2: lora_expand_rows<2>(k.rows, yr, z, rank2, rank2, bp, tile0 + t, n); break;
        default: lora_expand_rows<1>(k.rows, yr, z, rank2, rank2, bp, tile0 + t, n); break;
      }
    }
  });
}
#endif  // __AVX512BF16__

}  // namespace
