// Native CPU kernels for pagoda, compiled on first use (see pagoda/kernels/cpu.py) and called through
// ctypes with raw pointers: no torch headers, so a build takes a few seconds. The templates live in cpu_kernels.h.
//
// Threads come from OpenMP. torch ships its own libgomp with the same soname, so once torch is imported this
// library binds to torch's runtime and shares its thread pool instead of starting a second one.
//
// dtype codes: 0 = float32, 1 = bfloat16. Math is float32 throughout; bf16 results are rounded once at the end.

#include "cpu_kernels.h"

extern "C" {

int pagoda_kernels_abi_version() { return 6; }

// Paged decode attention: out/q [num_seqs, num_heads, head_size]; caches [blocks, block_size, kv_heads, head_size]
// addressed by block_stride/token_stride (elements); block_table int32 [num_seqs, table_stride]; seq_lens int32.
int pagoda_decode_attention(int dtype, void* out, const void* q, const void* k_cache, const void* v_cache,
                            const int32_t* block_table, int64_t table_stride, const int32_t* seq_lens,
                            int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_size,
                            int64_t block_size, int64_t block_stride, int64_t token_stride, float scale,
                            int64_t window, int num_threads) {
  if (dtype == 0)
    decode_attention<float>(out, q, k_cache, v_cache, block_table, table_stride, seq_lens, num_seqs, num_heads,
                            num_kv_heads, head_size, block_size, block_stride, token_stride, scale, window, num_threads);
  else if (dtype == 1)
    decode_attention<bf16_t>(out, q, k_cache, v_cache, block_table, table_stride, seq_lens, num_seqs, num_heads,
                             num_kv_heads, head_size, block_size, block_stride, token_stride, scale, window,
                             num_threads);
  else
    return -1;
  return 0;
}

int pagoda_rms_norm(int dtype, void* out, void* residual_out, const void* x, const void* residual, const void* weight,
                    int64_t rows, int64_t hidden, float eps, int num_threads) {
  if (dtype == 0)
    rms_norm<float>(static_cast<float*>(out), static_cast<float*>(residual_out), static_cast<const float*>(x),
                    static_cast<const float*>(residual), static_cast<const float*>(weight), rows, hidden, eps,
                    num_threads);
  else if (dtype == 1)
    rms_norm<bf16_t>(static_cast<bf16_t*>(out), static_cast<bf16_t*>(residual_out), static_cast<const bf16_t*>(x),
                     static_cast<const bf16_t*>(residual), static_cast<const bf16_t*>(weight), rows, hidden, eps,
                     num_threads);
  else
    return -1;
  return 0;
}

int pagoda_silu_and_mul(int dtype, void* out, const void* x, int64_t rows, int64_t inter, int num_threads) {
  if (dtype == 0) silu_and_mul<float>(static_cast<float*>(out), static_cast<const float*>(x), rows, inter, num_threads);
  else if (dtype == 1)
    silu_and_mul<bf16_t>(static_cast<bf16_t*>(out), static_cast<const bf16_t*>(x), rows, inter, num_threads);
  else return -1;
  return 0;
}

int pagoda_rope(int dtype, void* x, int64_t row_stride, int64_t tokens, int64_t heads, int64_t head_size,
                const void* cos, const void* sin, int64_t rot_dim, int num_threads) {
  if (dtype == 0)
    rope<float>(static_cast<float*>(x), row_stride, tokens, heads, head_size, static_cast<const float*>(cos),
                static_cast<const float*>(sin), rot_dim, num_threads);  // cos/sin are float32 for both dtypes
  else if (dtype == 1)
    rope<bf16_t>(static_cast<bf16_t*>(x), row_stride, tokens, heads, head_size, static_cast<const float*>(cos),
                 static_cast<const float*>(sin), rot_dim, num_threads);
  else return -1;
  return 0;
}

// 1 when this build has the packed bf16 GEMM (the CPU has AVX512-BF16), else 0.
int pagoda_has_packed_bf16() {
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

// Packs w [n, k] bf16 into dst [ceil(n/16)][ceil(k/2)][16][2] (zero padding), the layout pagoda_gemm_packed reads.
void pagoda_pack_bf16(uint16_t* dst, const uint16_t* w, int64_t n, int64_t k) {
  const int64_t tiles = (n + 15) / 16, k2 = (k + 1) / 2;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t p = 0; p < k2; ++p)
      for (int64_t c = 0; c < 16; ++c)
        for (int64_t e = 0; e < 2; ++e) {
          const int64_t row = t * 16 + c, col = 2 * p + e;
          dst[((t * k2 + p) * 16 + c) * 2 + e] = (row < n && col < k) ? w[row * k + col] : 0;
        }
}

// y [m, n] (rows ldy elements apart) = x [m, k] @ W^T + bias with W packed by pagoda_pack_bf16; bias is float32
// (or null); y is float32 when out_f32 else bf16. Returns -1 when this build lacks the kernel.
int pagoda_gemm_packed(int out_f32, void* y, int64_t ldy, const void* x, const void* wp, const float* bias, int64_t m,
                       int64_t n, int64_t k, int num_threads) {
#if defined(__AVX512BF16__)
  const bf16_t* xb = static_cast<const bf16_t*>(x);
  const bf16_t* wb = static_cast<const bf16_t*>(wp);
  if (out_f32) gemm_packed<true>(y, ldy, xb, wb, bias, m, n, k, num_threads);
  else gemm_packed<false>(y, ldy, xb, wb, bias, m, n, k, num_threads);
  return 0;
#else
  (void)out_f32; (void)y; (void)ldy; (void)x; (void)wp; (void)bias; (void)m; (void)n; (void)k; (void)num_threads;
  return -1;
#endif
}

// y [m, n] = x [m, k] (bf16) @ W^T for block-quantized W packed as described above (bits 4 or 8, k a multiple of
// 32); y float32 when out_f32 else bf16. Returns -1 when this build lacks AVX512-BF16 or bits is not 4 or 8.
int pagoda_quant_gemm(int bits, int out_f32, void* y, const void* x, const void* packed, int64_t m, int64_t n,
                      int64_t k, int num_threads) {
#if defined(__AVX512BF16__)
  const bf16_t* xb = static_cast<const bf16_t*>(x);
  const uint8_t* pb = static_cast<const uint8_t*>(packed);
  if (k % kGroup) return -1;
  if (bits == 4 && out_f32) quant_gemm<4, true>(y, xb, pb, m, n, k, num_threads);
  else if (bits == 4) quant_gemm<4, false>(y, xb, pb, m, n, k, num_threads);
  else if (bits == 8 && out_f32) quant_gemm<8, true>(y, xb, pb, m, n, k, num_threads);
  else if (bits == 8) quant_gemm<8, false>(y, xb, pb, m, n, k, num_threads);
  else return -1;
  return 0;
#else
  (void)bits; (void)out_f32; (void)y; (void)x; (void)packed; (void)m; (void)n; (void)k; (void)num_threads;
  return -1;
#endif
}

}  // extern "C"
