// The bf16 GEMM on packed weights with AMX tiles, for CPUs with AMX-BF16 (Sapphire Rapids and later).
//
// The packed layout (cpu_gemm.h: [tile of 16 columns][k / 2][16][2]) is already AMX's B-tile layout: sixteen
// consecutive k-pairs of one column tile are a 16-row x 64-byte tile, 64 bytes apart. So this path needs no other
// copy of the weights. A micro-kernel computes up to 64 rows x 16 columns: four accumulator tiles share each B
// tile (loaded once per k step), and the A tiles (16 rows x 32 k of x, read in place) come from L2. The next
// column tile's weights are prefetched while this one computes: at decode sizes the GEMM streams its weights from
// memory, and the hardware prefetchers stop at page boundaries.
//
// Linux keeps the tile state off until the process asks for it (arch_prctl(ARCH_REQ_XCOMP_PERM)); the caller only
// takes this path once that was granted (pagoda/platforms/cpu/features.py). Each thread loads its tile configuration
// for a kernel call's tasks and releases the tiles when done (AmxTiles), so other AMX users on the same threads
// (oneDNN) are unaffected.
#pragma once

#include "cpu_common.h"

namespace {

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#define PAGODA_HAS_AMX 1

constexpr int64_t kAmxMinRows = 8;  // below this the AVX512-BF16 micro-kernel streams the weights as fast

// Whether a product of m rows by packed bf16 weights of k inputs runs on AMX tiles (amx: the caller may use them)
// rather than on the AVX512-BF16 micro-kernels. The two round differently, so every path that must reproduce another's
// sums (the argmax's against the GEMM's, the screened head's against the full pass) asks here.
inline bool bf16_on_amx(bool amx, int64_t m, int64_t k) { return amx && m >= kAmxMinRows && k % 32 == 0; }

struct alignas(64) AmxTileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tile registers: 0-3 float32 accumulators of row tiles 0-3 (16 columns each); 4-5 the A (x) tiles of full row
// tiles, alternating; 7 the A tile of the last row tile, whose height (1-16 rows) its accumulator shares; 6 the B
// (weight) tile. A tile load reads exactly its configured rows, so x is read in place, never padded. kstep: the k
// each tile step takes (32, or 16 for a K of 16: a LoRA expand).
inline void amx_configure(int row_tiles, int last_rows, int kstep = 32) {
  AmxTileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < row_tiles; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(t == row_tiles - 1 ? last_rows : 16);
    cfg.colsb[t] = 64;
  }
  cfg.rows[4] = cfg.rows[5] = 16;
  cfg.rows[6] = static_cast<uint8_t>(kstep / 2);
  cfg.rows[7] = static_cast<uint8_t>(last_rows);
  cfg.colsb[4] = cfg.colsb[5] = cfg.colsb[7] = static_cast<uint16_t>(kstep * 2);
  cfg.colsb[6] = 64;
  // GCC's _tile_loadconfig (12.x) tells the compiler it reads only the config's first 8 bytes, so where this
  // function is not inlined the other stores were dropped as dead and LDTILECFG faulted on the garbage: this barrier
  // declares the whole struct read.
  __asm__ __volatile__("" : : "m"(cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// The tile configuration one thread holds through one kernel call's tasks: loaded again only when a task's shape
// differs from the last one's (a configuration load and release cost about a fifth of a 64 x 16 x 576 tile pass),
// released when the thread's tasks are done, so other AMX users on the thread (oneDNN) are unaffected.
class AmxTiles {
 public:
  AmxTiles() = default;
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
  ~AmxTiles() {
    if (key_ >= 0) _tile_release();
  }
  void configure(int row_tiles, int last_rows, int kstep = 32) {
    const int key = (row_tiles << 16) | (last_rows << 8) | kstep;
    if (key == key_) return;
    amx_configure(row_tiles, last_rows, kstep);
    key_ = key;
  }

 private:
  int key_ = -1;
};

// acc [RT * 16 rows][16] = x [RT row tiles, k] @ one packed column tile ``wt``, prefetching ``ahead`` meanwhile;
// k a multiple of 32, or 16 (tiles configured with amx_configure's kstep to match).
template <int RT>
inline void amx_tile_pass(float* acc, const bf16_t* x, int64_t k, const bf16_t* wt, const char* ahead,
                          int64_t ahead_bytes) {
  _tile_zero(0);
  if constexpr (RT > 1) _tile_zero(1);
  if constexpr (RT > 2) _tile_zero(2);
  if constexpr (RT > 3) _tile_zero(3);
  const int64_t kstep = k < 32 ? k : 32;
  const int64_t steps = k / kstep, lines = ahead_bytes / 64, per_step = (lines + steps - 1) / steps;
  const int64_t lda = k * 2;
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(6, wt + s * kstep * 16, 64);  // kstep / 2 k-pairs of 16 columns
    for (int64_t l = s * per_step; l < (s + 1) * per_step && l < lines; ++l) _mm_prefetch(ahead + l * 64, _MM_HINT_T1);
    const bf16_t* xs = x + s * kstep;
    if constexpr (RT == 1) {
      _tile_loadd(7, xs, lda);
      _tile_dpbf16ps(0, 7, 6);
    } else {
      _tile_loadd(4, xs, lda);
      _tile_dpbf16ps(0, 4, 6);
    }
    if constexpr (RT == 2) {
      _tile_loadd(7, xs + 16 * k, lda);
      _tile_dpbf16ps(1, 7, 6);
    } else if constexpr (RT > 2) {
      _tile_loadd(5, xs + 16 * k, lda);
      _tile_dpbf16ps(1, 5, 6);
    }
    if constexpr (RT == 3) {
      _tile_loadd(7, xs + 32 * k, lda);
      _tile_dpbf16ps(2, 7, 6);
    } else if constexpr (RT > 3) {
      _tile_loadd(4, xs + 32 * k, lda);
      _tile_dpbf16ps(2, 4, 6);
    }
    if constexpr (RT == 4) {
      _tile_loadd(7, xs + 48 * k, lda);
      _tile_dpbf16ps(3, 7, 6);
    }
  }
  _tile_stored(0, acc, 64);
  if constexpr (RT > 1) _tile_stored(1, acc + 16 * 16, 64);
  if constexpr (RT > 2) _tile_stored(2, acc + 32 * 16, 64);
  if constexpr (RT > 3) _tile_stored(3, acc + 48 * 16, 64);
}

// amx_tile_pass for a row-tile count (1 to 4) chosen at run time.
inline void amx_tile_pass_rows(int row_tiles, float* acc, const bf16_t* x, int64_t k, const bf16_t* wt,
                               const char* ahead, int64_t ahead_bytes) {
  switch (row_tiles) {
    case 4: amx_tile_pass<4>(acc, x, k, wt, ahead, ahead_bytes); break;
    case 3: amx_tile_pass<3>(acc, x, k, wt, ahead, ahead_bytes); break;
    case 2: amx_tile_pass<2>(acc, x, k, wt, ahead, ahead_bytes); break;
    default: amx_tile_pass<1>(acc, x, k, wt, ahead, ahead_bytes); break;
  }
}

// Rows [0, rows) of a tile pass's float32 results acc, each through epilogue(v), into y's columns col.. (masked;
// rows ldy elements apart), as float32 or rounded to bf16.
template <bool F32Out, class Epilogue>
inline void store_tile_rows(void* y, int64_t ldy, int64_t col, __mmask16 mask, const float* acc, int64_t rows,
                            const Epilogue& epilogue) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 v = epilogue(_mm512_load_ps(acc + r * 16));
    if constexpr (F32Out) {
      _mm512_mask_storeu_ps(static_cast<float*>(y) + r * ldy + col, mask, v);
    } else {
      _mm256_mask_storeu_epi16(static_cast<bf16_t*>(y) + r * ldy + col, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// y [m, n] = x [m, k] @ W^T + bias on packed W; k a multiple of 32. Tasks are (block of 64 rows, column tile),
// row-block major, as the AVX512-BF16 path shares them.
template <bool F32Out>
void gemm_packed_amx(void* y, int64_t ldy, const bf16_t* x, const bf16_t* wp, const float* bias, int64_t m,
                     int64_t n, int64_t k, int num_threads) {
  constexpr int64_t kRows = 64;
  const int64_t tiles = (n + 15) / 16, tile_elems = k * 16;  // k / 2 pairs x 16 columns x 2
  const int64_t mblocks = (m + kRows - 1) / kRows;
  const int64_t esz = F32Out ? 4 : 2;
  share_tasks_with<AmxTiles>(mblocks * tiles, num_threads, [&](int64_t task, AmxTiles& amx) {
    const int64_t mb = task / tiles, t = task % tiles;
    const int64_t r0 = mb * kRows, rows = (m - r0) < kRows ? (m - r0) : kRows;
    const int row_tiles = static_cast<int>((rows + 15) / 16), last_rows = static_cast<int>(rows - (row_tiles - 1) * 16);
    alignas(64) float acc[kRows * 16];
    amx.configure(row_tiles, last_rows);
    const bf16_t* wt = wp + t * tile_elems;
    const char* ahead = t + 1 < tiles ? reinterpret_cast<const char*>(wt + tile_elems) : nullptr;
    const int64_t ahead_bytes = ahead ? tile_elems * 2 : 0;
    const bf16_t* xb = x + r0 * k;
    amx_tile_pass_rows(row_tiles, acc, xb, k, wt, ahead, ahead_bytes);
    const int64_t col = t * 16;
    const __mmask16 mask = tile_columns(n, col);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    store_tile_rows<F32Out>(static_cast<char*>(y) + r0 * ldy * esz, ldy, col, mask, acc, rows,
                            [&](__m512 v) { return _mm512_add_ps(v, bv); });
  });
}
#endif

}  // namespace
