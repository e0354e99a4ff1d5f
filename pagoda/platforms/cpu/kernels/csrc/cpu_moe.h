// The fused mixture-of-experts MLP (bf16) on expert weights packed one expert after another in the layout the
// packed GEMMs read (cpu_gemm.h).
//
// A step's (token, slot) pairs are grouped by expert (a counting sort) and each expert's rows gathered into one
// block, so every expert that received tokens streams its weights once for all of them. The two matmuls are each
// one parallel loop over (expert, group of column tiles) tasks — at decode, with a couple of rows per expert, the
// work is reading the chosen experts' weights, and this spreads that over every thread at once instead of one
// expert after another. Blocks of 8 rows and more take AMX tiles where the process may use them. The weighted
// sum of a token's experts is taken in float32 from the down projection's float32 outputs and rounded once.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "cpu_amx.h"
#include "cpu_common.h"
#include "cpu_elementwise.h"
#include "cpu_gemm.h"
#include "cpu_moe_lora.h"

namespace {

// A router's choice for each of T tokens: the softmax of its E logits (bf16) in float32, the k largest
// probabilities in descending order (ties: the lower expert first) with their expert ids, divided by their sum when
// `renormalize`, rounded to bf16 (and kept as float32) when `round_bf16`. Outside the AVX-512 guard: plain C++.
inline void moe_topk(float* weights, int64_t* ids, const bf16_t* logits, int64_t T, int64_t E, int64_t k,
                     bool renormalize, bool round_bf16) {
  std::vector<float> probs(E);
  std::vector<char> taken(E);
  for (int64_t t = 0; t < T; ++t) {
    const bf16_t* l = logits + t * E;
    float max = bf16_to_f32(l[0]);
    for (int64_t e = 1; e < E; ++e) max = std::max(max, bf16_to_f32(l[e]));
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += probs[e] = std::exp(bf16_to_f32(l[e]) - max);
    for (int64_t e = 0; e < E; ++e) probs[e] /= sum;
    std::fill(taken.begin(), taken.end(), 0);
    float* w = weights + t * k;
    int64_t* id = ids + t * k;
    float chosen = 0.f;
    for (int64_t s = 0; s < k; ++s) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || probs[e] > probs[best])) best = e;
      taken[best] = 1;
      id[s] = best;
      chosen += w[s] = probs[best];
    }
    for (int64_t s = 0; s < k; ++s) {
      if (renormalize) w[s] /= chosen;
      if (round_bf16) w[s] = bf16_to_f32(f32_to_bf16(w[s]));
    }
  }
}

#if defined(__AVX512BF16__)

// Elements of one expert's packed [n, k] weight.
inline int64_t packed_matrix_elems(int64_t n, int64_t k) { return (n + kTile - 1) / kTile * packed_k2(k) * kTile * 2; }

// y [rows, n] (rows ldy apart) = x [rows, k] @ W^T for the column tiles [tile0, tile0 + nt) of one expert's
// packed W, on the calling thread.
template <bool F32Out>
inline void expert_columns(void* y, int64_t ldy, const bf16_t* x, int64_t rows, int64_t k, const bf16_t* wp,
                           int64_t n, int64_t tile0, int64_t nt, bool amx) {
#if defined(PAGODA_HAS_AMX)
  if (bf16_on_amx(amx, rows, k)) {
    const int64_t col = tile0 * kTile, cols = (n - col) < nt * kTile ? (n - col) : nt * kTile;
    void* yc = static_cast<char*>(y) + col * (F32Out ? 4 : 2);
    gemm_packed_amx<F32Out>(yc, ldy, x, wp + tile0 * packed_k2(k) * kTile * 2, nullptr, rows, cols, k, 1);
    return;
  }
#else
  (void)amx;
#endif
  switch (nt) {
    case 3: rows_kernel<3, F32Out>(rows, y, ldy, x, k, wp, tile0, n, nullptr, nullptr); break;
    case 2: rows_kernel<2, F32Out>(rows, y, ldy, x, k, wp, tile0, n, nullptr, nullptr); break;
    default: rows_kernel<1, F32Out>(rows, y, ldy, x, k, wp, tile0, n, nullptr, nullptr); break;
  }
}

// y [m_e, n] for every active expert e = its rows of x (grouped, starting at start[e]) @ its packed weight, as one
// parallel loop over (expert, group of kNT column tiles).
template <bool F32Out>
void experts_gemm(void* y, const bf16_t* x, const std::vector<int64_t>& active, const std::vector<int64_t>& start,
                  const std::vector<int64_t>& count, const bf16_t* wp, int64_t n, int64_t k, int num_threads,
                  bool amx) {
  const int64_t tiles = (n + kTile - 1) / kTile, groups = (tiles + kNT - 1) / kNT;
  const int64_t expert_elems = packed_matrix_elems(n, k), esz = F32Out ? 4 : 2;
  share_tasks(static_cast<int64_t>(active.size()) * groups, num_threads, [&](int64_t task) {
    const int64_t e = active[task / groups], tile0 = (task % groups) * kNT;
    const int64_t nt = tiles - tile0 < kNT ? tiles - tile0 : kNT;
    expert_columns<F32Out>(static_cast<char*>(y) + start[e] * n * esz, n, x + start[e] * k, count[e], k,
                           wp + e * expert_elems, n, tile0, nt, amx);
  });
}

// y [T, H] = sum_s topk_w[t, s] * expert_{topk_ids[t, s]}(x[t]), expert(x) = (silu(x W_gate^T) * x W_up^T) W_down^T,
// with w13 [E][packed 2I x H] (gate rows, then up rows) and w2 [E][packed H x I]. With lora and token_slot (each
// token's adapter slot, -1: none), each adapted token's experts take their slot's deltas (cpu_moe_lora.h). False on
// an expert id out of range.
inline bool fused_moe(bf16_t* y, const bf16_t* x, const float* topk_w, const int64_t* topk_ids, int64_t T, int64_t k,
                      const bf16_t* w13, const bf16_t* w2, int64_t E, int64_t H, int64_t I, int num_threads,
                      bool amx, const MoELoRASlots* lora = nullptr, const int64_t* token_slot = nullptr) {
  const int64_t pairs = T * k;
  std::vector<int64_t> count(E, 0), start(E, 0), active;
  for (int64_t p = 0; p < pairs; ++p) {
    if (topk_ids[p] < 0 || topk_ids[p] >= E) return false;
    ++count[topk_ids[p]];
  }
  for (int64_t e = 0, at = 0; e < E; ++e) {
    start[e] = at;
    at += count[e];
    if (count[e]) active.push_back(e);
  }
  // row_of[p]: the grouped row of pair p (stable within an expert, as the reference sorts).
  std::vector<int64_t> row_of(pairs), fill(start);
  for (int64_t p = 0; p < pairs; ++p) row_of[p] = fill[topk_ids[p]]++;
  // Every element of these is written before it is read: no zero fill.
  std::unique_ptr<bf16_t[]> xs(new bf16_t[pairs * H]), h(new bf16_t[pairs * 2 * I]), act(new bf16_t[pairs * I]);
  std::unique_ptr<float[]> out(new float[pairs * H]);
  share_tasks(pairs, num_threads, [&](int64_t p) {
    std::memcpy(xs.get() + row_of[p] * H, x + (p / k) * H, H * sizeof(bf16_t));
  });
  std::vector<int64_t> slot_of;  // each grouped row's adapter slot, where the step has adapted tokens
  if (lora && token_slot) {
    slot_of.resize(static_cast<size_t>(pairs));
    for (int64_t p = 0; p < pairs; ++p) slot_of[row_of[p]] = token_slot[p / k];
  }
  const auto lora_deltas = [&](auto* out_rows, const bf16_t* in, int64_t in_n, int64_t out_n, const void* a,
                               const void* bt, int64_t rank) {
    share_tasks(static_cast<int64_t>(active.size()), num_threads, [&](int64_t i) {
      const int64_t e = active[i];
      moe_lora_rows(*lora, e, E, slot_of.data(), start[e], count[e], in, in_n, out_rows, out_n, a, bt, rank);
    });
  };
  experts_gemm<false>(h.get(), xs.get(), active, start, count, w13, 2 * I, H, num_threads, amx);
  if (!slot_of.empty()) lora_deltas(h.get(), xs.get(), H, 2 * I, lora->a13, lora->bt13, 2 * lora->rank);
  gated_activation<bf16_t>(act.get(), h.get(), pairs, I, kSiluAndMul, num_threads);
  experts_gemm<true>(out.get(), act.get(), active, start, count, w2, H, I, num_threads, amx);
  if (!slot_of.empty()) lora_deltas(out.get(), act.get(), I, H, lora->a2, lora->bt2, lora->rank);
  share_tasks(T, num_threads, [&](int64_t t) {
    bf16_t* yt = y + t * H;
    int64_t i = 0;
    for (; i + 16 <= H; i += 16) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t s = 0; s < k; ++s)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(topk_w[t * k + s]), _mm512_loadu_ps(out.get() + row_of[t * k + s] * H + i),
                              acc);
      store16(yt + i, acc);
    }
    for (; i < H; ++i) {
      float acc = 0.f;
      for (int64_t s = 0; s < k; ++s) acc += topk_w[t * k + s] * out[row_of[t * k + s] * H + i];
      yt[i] = f32_to_bf16(acc);
    }
  });
  return true;
}

#endif  // __AVX512BF16__

}  // namespace
