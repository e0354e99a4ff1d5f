// Native CPU kernels for pagoda, compiled on first use (see pagoda/kernels/cpu.py) and called through
// ctypes with raw pointers: no torch headers, so a build takes a few seconds. The templates live in cpu_kernels.h.
//
// Threads come from OpenMP. torch ships its own libgomp with the same soname, so once torch is imported this
// library binds to torch's runtime and shares its thread pool instead of starting a second one.
//
// dtype codes: 0 = float32, 1 = bfloat16. Math is float32 throughout; bf16 results are rounded once at the end.

#include "cpu_kernels.h"

extern "C" {

int pagoda_kernels_abi_version() { return 37; }

// Paged decode attention: out/q [num_seqs, num_heads, head_size]; caches [blocks, block_size, kv_heads, head_size]
// addressed by block_stride/token_stride (elements); block_table int32 [num_seqs, table_stride]; seq_lens int32.
int pagoda_decode_attention(int dtype, void* out, const void* q, const void* k_cache, const void* v_cache,
                            const int32_t* block_table, int64_t table_stride, const int32_t* seq_lens,
                            int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_size,
                            int64_t block_size, int64_t block_stride, int64_t token_stride, float scale,
                            int64_t window, float soft_cap, int num_threads) {
  if (dtype == 0)
    decode_attention<float>(out, q, k_cache, v_cache, block_table, table_stride, seq_lens, num_seqs, num_heads,
                            num_kv_heads, head_size, block_size, block_stride, token_stride, scale, window, num_threads,
                            -1, soft_cap);
  else if (dtype == 1)
    decode_attention<bf16_t>(out, q, k_cache, v_cache, block_table, table_stride, seq_lens, num_seqs, num_heads,
                             num_kv_heads, head_size, block_size, block_stride, token_stride, scale, window,
                             num_threads, -1, soft_cap);
  else
    return -1;
  return 0;
}

// Causal prefill attention (bf16): see prefill_attention in cpu_prefill_attention.h. query_start_loc int32 [num_seqs + 1]
// (tokens of q and out), seq_lens int32 [num_seqs]. Returns -1 where the kernel does not apply.
int pagoda_prefill_attention(void* out, const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                             const int32_t* block_table, int64_t table_stride, const int32_t* query_start_loc,
                             const int32_t* seq_lens, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                             int64_t head_size, int64_t block_size, int64_t block_stride, int64_t token_stride,
                             float scale, int64_t window, float soft_cap, int num_threads) {
  return prefill_attention(out, q, q_stride, k_cache, v_cache, block_table, table_stride, query_start_loc, seq_lens,
                           num_seqs, num_heads, num_kv_heads, head_size, block_size, block_stride, token_stride, scale,
                           window, soft_cap, num_threads) ? 0 : -1;
}

// Writes token t's key and value rows (row_bytes each, rows key_stride / value_stride bytes apart) to the cache
// slot slot_mapping[t]: see write_kv_rows.
void pagoda_write_kv(void* k_cache, void* v_cache, const void* key, int64_t key_stride, const void* value,
                     int64_t value_stride, const int64_t* slot_mapping, int64_t tokens, int64_t row_bytes,
                     int64_t block_size, int64_t block_stride, int64_t token_stride, int num_threads) {
  write_kv_rows(k_cache, v_cache, key, key_stride, value, value_stride, slot_mapping, tokens, row_bytes, block_size,
                block_stride, token_stride, num_threads);
}

int pagoda_rms_norm(int dtype, void* out, void* residual_out, const void* x, const void* residual, const void* weight,
                    int64_t rows, int64_t hidden, float eps, int unit_offset, int num_threads) {
  if (dtype == 0)
    rms_norm<float>(static_cast<float*>(out), static_cast<float*>(residual_out), static_cast<const float*>(x),
                    static_cast<const float*>(residual), static_cast<const float*>(weight), rows, hidden, eps,
                    num_threads, unit_offset != 0);
  else if (dtype == 1)
    rms_norm<bf16_t>(static_cast<bf16_t*>(out), static_cast<bf16_t*>(residual_out), static_cast<const bf16_t*>(x),
                     static_cast<const bf16_t*>(residual), static_cast<const bf16_t*>(weight), rows, hidden, eps,
                     num_threads, unit_offset != 0);
  else
    return -1;
  return 0;
}

// out [rows, inter] = act(x[:, :inter]) * x[:, inter:]; kind: GatedActivation (0 silu, 1 tanh gelu).
int pagoda_gated_activation(int dtype, void* out, const void* x, int64_t rows, int64_t inter, int kind,
                            int num_threads) {
  if (kind != kSiluAndMul && kind != kGeluTanhAndMul) return -2;
  if (dtype == 0)
    gated_activation<float>(static_cast<float*>(out), static_cast<const float*>(x), rows, inter, kind, num_threads);
  else if (dtype == 1)
    gated_activation<bf16_t>(static_cast<bf16_t*>(out), static_cast<const bf16_t*>(x), rows, inter, kind,
                             num_threads);
  else return -1;
  return 0;
}

// LayerNorm of x [rows, hidden] (of x + residual, written to residual_out, when residual is given); weight and bias
// may be null.
int pagoda_layer_norm(int dtype, void* out, void* residual_out, const void* x, const void* residual,
                      const void* weight, const void* bias, int64_t rows, int64_t hidden, float eps, int num_threads) {
  if (dtype == 0)
    layer_norm<float>(static_cast<float*>(out), static_cast<float*>(residual_out), static_cast<const float*>(x),
                      static_cast<const float*>(residual), static_cast<const float*>(weight),
                      static_cast<const float*>(bias), rows, hidden, eps, num_threads);
  else if (dtype == 1)
    layer_norm<bf16_t>(static_cast<bf16_t*>(out), static_cast<bf16_t*>(residual_out), static_cast<const bf16_t*>(x),
                       static_cast<const bf16_t*>(residual), static_cast<const bf16_t*>(weight),
                       static_cast<const bf16_t*>(bias), rows, hidden, eps, num_threads);
  else
    return -1;
  return 0;
}

// out[i] = act(x[i]) over n elements; kind 0 = relu, 1 = gelu (tanh approximation).
int pagoda_activation(int dtype, void* out, const void* x, int64_t n, int kind, int num_threads) {
  if (kind != kRelu && kind != kGeluTanh) return -1;
  if (dtype == 0) activation<float>(static_cast<float*>(out), static_cast<const float*>(x), n, kind, num_threads);
  else if (dtype == 1)
    activation<bf16_t>(static_cast<bf16_t*>(out), static_cast<const bf16_t*>(x), n, kind, num_threads);
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
// Whether this build has the AMX GEMM (compiled for a CPU with AMX-BF16).
int pagoda_has_amx() {
#if defined(PAGODA_HAS_AMX)
  return 1;
#else
  return 0;
#endif
}

int pagoda_has_packed_bf16() {
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

// y [T, out] (rows ldy elements apart) += each grouped token's LoRA delta (cpu_lora.h: slots is a LoRASlots,
// groups a LoRAGroups, scales float32 per slot); x [T, in] rows ldx apart; bf16. amx: the caller holds AMX's
// permission. -1 without AVX512-BF16.
int pagoda_lora_shrink_expand(const void* slots, const void* groups, const float* scales, void* y, int64_t ldy,
                              const void* x, int64_t ldx, int num_threads, int amx) {
#if defined(__AVX512BF16__)
  lora_shrink_expand(*static_cast<const LoRASlots*>(slots), *static_cast<const LoRAGroups*>(groups), scales,
                     static_cast<bf16_t*>(y), ldy, static_cast<const bf16_t*>(x), ldx, num_threads, amx != 0);
  return 0;
#else
  (void)slots; (void)groups; (void)scales; (void)y; (void)ldy; (void)x; (void)ldx; (void)num_threads; (void)amx;
  return -1;
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

// dst [m, k] = rows idx [m] (int64) of the [n, k] bf16 weight packed by pagoda_pack_bf16 (an embedding lookup on a
// tied LM head): each row's k-pairs are 64 bytes apart in the packed tiles, so rows are gathered pair by pair.
void pagoda_packed_rows(uint16_t* dst, const uint16_t* packed, const int64_t* idx, int64_t m, int64_t k,
                        int num_threads) {
  const int64_t k2 = (k + 1) / 2;
  share_tasks(m, num_threads, [&](int64_t i) {
    const int64_t r = idx[i];
    const uint16_t* src = packed + ((r / 16) * k2 * 16 + r % 16) * 2;  // pair 0 of row r
    uint16_t* out = dst + i * k;
    for (int64_t p = 0; p < k / 2; ++p) std::memcpy(out + 2 * p, src + p * 32, 4);
    if (k % 2) out[k - 1] = src[(k2 - 1) * 32];
  });
}

// dst [m, k] = rows idx of a weight packed for pagoda_quant_gemm (kinds 4, 8 and the int8 affine ones), dequantized
// as code * scale + offset in float32 (then rounded to bf16 unless out_f32): the embedding lookups of a quantized
// table. Returns -1 for another kind or without this build's block-quantized kernels.
int pagoda_quant_rows(int kind, int out_f32, void* dst, const void* packed, const int64_t* idx, int64_t m, int64_t k,
                      int num_threads) {
#if defined(__AVX512BF16__)
  if (kind != 4 && kind != 8 && kind != kAffineKind + 16 && kind != kAffineKind + 32) return -1;
  share_tasks(m, num_threads, [&](int64_t i) {
    switch (kind) {
      case 4: quant_row<4>(dst, out_f32 != 0, i, static_cast<const uint8_t*>(packed), idx[i], k); break;
      case 8: quant_row<8>(dst, out_f32 != 0, i, static_cast<const uint8_t*>(packed), idx[i], k); break;
      case kAffineKind + 16:
        quant_row<kAffineKind + 16>(dst, out_f32 != 0, i, static_cast<const uint8_t*>(packed), idx[i], k);
        break;
      default: quant_row<kAffineKind + 32>(dst, out_f32 != 0, i, static_cast<const uint8_t*>(packed), idx[i], k);
    }
  });
  return 0;
#else
  (void)kind; (void)out_f32; (void)dst; (void)packed; (void)idx; (void)m; (void)k; (void)num_threads;
  return -1;
#endif
}

// y [m, n] (rows ldy elements apart) = x [m, k] @ W^T + bias with W packed by pagoda_pack_bf16; bias is float32
// (or null); y is float32 when out_f32 else bf16. Returns -1 when this build lacks the kernel.
int pagoda_gemm_packed(int out_f32, void* y, int64_t ldy, const void* x, const void* wp, const float* bias, int64_t m,
                       int64_t n, int64_t k, int num_threads, int amx) {
#if defined(__AVX512BF16__)
  const bf16_t* xb = static_cast<const bf16_t*>(x);
  const bf16_t* wb = static_cast<const bf16_t*>(wp);
  if (out_f32) gemm_packed<true>(y, ldy, xb, wb, bias, m, n, k, num_threads, amx != 0);
  else gemm_packed<false>(y, ldy, xb, wb, bias, m, n, k, num_threads, amx != 0);
  return 0;
#else
  (void)out_f32; (void)y; (void)ldy; (void)x; (void)wp; (void)bias; (void)m; (void)n; (void)k; (void)num_threads;
  (void)amx;
  return -1;
#endif
}

// y [m, n] = x [m, k] (bf16) @ W^T for block-quantized W packed as described above (bits: the kind — 4 or 8, k a
// multiple of 32; kE4M3, k a multiple of 64; kZeroKind + G, kAffineKind + G and kZero8Kind + G, k a multiple of G);
// y float32 when out_f32 else bf16.
// Returns -1 when this build lacks AVX512-BF16 or the kind or k is not one of those.
// amx: AMX tiles from kAmxMinRows rows (only where the process may use them).
int pagoda_quant_gemm(int bits, int out_f32, void* y, const void* x, const void* packed, int64_t m, int64_t n,
                      int64_t k, int num_threads, int amx) {
#if defined(__AVX512BF16__)
  const bf16_t* xb = static_cast<const bf16_t*>(x);
  const uint8_t* pb = static_cast<const uint8_t*>(packed);
  const bool ok = out_f32 ? quant_gemm_kind<true>(bits, y, xb, pb, m, n, k, num_threads, nullptr, amx != 0)
                          : quant_gemm_kind<false>(bits, y, xb, pb, m, n, k, num_threads, nullptr, amx != 0);
  return ok ? 0 : -1;
#else
  (void)bits; (void)out_f32; (void)y; (void)x; (void)packed; (void)m; (void)n; (void)k; (void)num_threads;
  (void)amx;
  return -1;
#endif
}

// y [m, n] = x [m, k] (bf16) @ W^T for an AQLM weight (CodebookWeight, cpu_codebook.h; k a multiple of 8); y float32
// when out_f32 else bf16, by codebook_linear's choice of path (bf16-rounded column tiles on AMX tiles where amx and k
// allow). Returns -1 when this build lacks the path (AVX-512; AVX512-BF16 for column tiles) or the shape is out of
// range.
int pagoda_codebook_gemm(int out_f32, void* y, const void* x, const void* weight, int64_t m, int num_threads,
                         int amx) {
  const CodebookWeight& w = *static_cast<const CodebookWeight*>(weight);
  if (w.k % kCodebookGroup || w.num_books < 1 || w.shards < 1) return -1;
  const bf16_t* xb = static_cast<const bf16_t*>(x);
  const bool ok = out_f32 ? codebook_linear<true>(y, xb, w, m, num_threads, amx != 0)
                          : codebook_linear<false>(y, xb, w, m, num_threads, amx != 0);
  return ok ? 0 : -1;
}

// y [T, H] (bf16) = the mixture of each token's top-k experts (see fused_moe in cpu_moe.h): x [T, H] bf16,
// topk_w float32 and topk_ids int64 [T, k]; w13 / w2 each expert's [2I, H] / [H, I] weight packed by
// pagoda_pack_bf16, one expert after another. amx: AMX tiles from kAmxMinRows rows per expert (only where the
// process may use them). lora (a MoELoRASlots, cpu_moe_lora.h) and token_slot [T] (int64, -1: none), or both
// null: LoRA deltas of the adapted tokens' experts. Returns -1 when this build lacks AVX512-BF16, -2 on an expert id
// out of range.
int pagoda_fused_moe(void* y, const void* x, const float* topk_w, const int64_t* topk_ids, int64_t T, int64_t k,
                     const void* w13, const void* w2, int64_t E, int64_t H, int64_t I, int num_threads, int amx,
                     const void* lora, const int64_t* token_slot) {
#if defined(__AVX512BF16__)
  return fused_moe(static_cast<bf16_t*>(y), static_cast<const bf16_t*>(x), topk_w, topk_ids, T, k,
                   static_cast<const bf16_t*>(w13), static_cast<const bf16_t*>(w2), E, H, I, num_threads, amx != 0,
                   static_cast<const MoELoRASlots*>(lora), token_slot)
             ? 0 : -2;
#else
  (void)y; (void)x; (void)topk_w; (void)topk_ids; (void)T; (void)k; (void)w13; (void)w2; (void)E; (void)H; (void)I;
  (void)num_threads; (void)amx; (void)lora; (void)token_slot;
  return -1;
#endif
}

// A router's top-k experts per token (moe_topk in cpu_moe.h): logits bf16 [T, E] → weights float32 and ids int64
// [T, k]. Returns -2 when k is not in 1..E.
int pagoda_moe_topk(float* weights, int64_t* ids, const void* logits, int64_t T, int64_t E, int64_t k,
                    int renormalize) {
  if (k < 1 || k > E) return -2;
  moe_topk(weights, ids, static_cast<const bf16_t*>(logits), T, E, k, renormalize != 0, false);
  return 0;
}

// Which W8A8 GEMMs this build has: bit 0 AMX-INT8, bit 1 AVX512-VNNI.
int pagoda_int8_paths() {
  int paths = 0;
#if defined(PAGODA_HAS_AMX_INT8)
  paths |= 1;
#endif
#if defined(PAGODA_HAS_VNNI_INT8)
  paths |= 2;
#endif
  return paths;
}

// y [m, n] = x [m, k] (bf16, quantized to int8 per row here, or with static_scale > 0) . W^T * its scales (+ bias),
// W int8 packed as in cpu_int8.h (wp: the whole buffer); y float32 when out_f32 else bf16. amx: on AMX-INT8 tiles (the
// caller holds AMX's permission), else AVX512-VNNI. Returns -1 when this build lacks the path.
int pagoda_int8_gemm(int out_f32, void* y, const void* x, const void* wp, const float* bias, int64_t m, int64_t n,
                     int64_t k, float static_scale, int amx, int num_threads) {
  const bf16_t* xb = static_cast<const bf16_t*>(x);
  const int8_t* w = static_cast<const int8_t*>(wp);
  const bool ok = out_f32 ? gemm_int8<true>(y, xb, w, bias, m, n, k, static_scale, amx != 0, num_threads)
                          : gemm_int8<false>(y, xb, w, bias, m, n, k, static_scale, amx != 0, num_threads);
  return ok ? 0 : -1;
}

}  // extern "C"
