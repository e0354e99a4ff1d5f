// A whole decode step of a pre-norm decoder stack in one call, for bf16 models whose every layer already runs on
// this library's kernels. At batch sizes of one to a few requests the step's arithmetic is ~10 ms of weight
// streaming, and calling ~12 kernels per layer from Python cost another ~6 ms; here the layer loop is C++ and
// the kernels are the same ones the per-op path calls, so the two paths compute the same numbers.
//
// Three layer recipes (Plan::recipe):
// - Llama's: RMSNorm, rotary on a fused QKV (Qwen3: after per-head q/k norms), a gated activation (SiLU or tanh
//   GELU) on a fused gate/up projection;
// - GPT-style (OPT, GPT-2): LayerNorm with a bias, no rotary (the positions were embedded), a plain activation
//   between the two MLP projections, biases in the projections' packed weights;
// - Gemma's: Llama's with RMSNorm scaling by 1 + w, and in Gemma 2/3 a norm after attention and after the MLP too
//   (before each residual add), Gemma 3's per-head q/k norms and a rotary table per layer type.
// In Llama's, a layer may route each token to its top-k experts in place of the MLP (Mixtral, Qwen3-MoE), plus a
// shared expert every token takes (Qwen2-MoE).
// Every recipe may interleave sliding-window layers with global ones: each layer has its own window.

#include "cpu_kernels.h"

namespace {

// One weight: packed bf16 (kind 0), block-quantized (the kinds of pagoda_quant_gemm), W8A8 int8 packed as in
// cpu_int8.h, activations quantized per token (or by a static scale) here: on AMX-INT8 tiles (kInt8AmxKind) or with
// VNNI (kInt8VnniKind), or AQLM codes (kCodebookKind: data is a CodebookWeight, cpu_codebook_weight.h).
constexpr int64_t kInt8AmxKind = 200, kInt8VnniKind = 201, kCodebookKind = 300;
struct Linear {
  int64_t kind;
  const void* data;
  const float* bias;  // float32 [n] or null
  int64_t n, k;
  const int64_t* input_order;  // GPTQ act-order: the weight multiplies x[:, input_order] (int64 [k]), or null
  float input_scale;  // W8A8 INT8 with a static activation scale (0: activations quantized per token)
};

struct Layer {
  const bf16_t* input_norm;  // null: a LayerNorm without elementwise affine
  const bf16_t* post_norm;   // before the MLP (Gemma 2/3: the norm of the attention's output)
  const bf16_t* input_norm_bias;  // LayerNorm recipes: the norms' biases, or null
  const bf16_t* post_norm_bias;
  const bf16_t* pre_mlp_norm;   // Gemma 2/3: the norm before the MLP (after the residual add), else null
  const bf16_t* post_mlp_norm;  // Gemma 2/3: the norm of the MLP's output, else null
  const bf16_t* q_norm;  // Qwen3, Gemma 3: each query head's and key head's norm, else null
  const bf16_t* k_norm;
  Linear qkv, o, gate_up, down;  // gate_up: the MLP's first projection (gate and up fused where it is gated)
  bf16_t* k_cache;  // [blocks, block_size, kv_heads, head_size]
  bf16_t* v_cache;
  int64_t window;      // this layer's sliding window, 0: none
  int64_t rope_table;  // which of the step's cos/sin tables rotates this layer
  const LoRASlots* lora[4];  // adapter slots of qkv, o, gate_up, down (cpu_lora.h), or null
  const struct Experts* experts;  // routed experts in place of the MLP (gate_up and down unused), or null
};

// A layer's mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): the router's projection, each token's top-k experts
// (moe_topk) and the fused MLP over them (fused_moe; cpu_moe.h), as the per-op path's moe_topk and fused_moe ops
// compute them; Qwen2-MoE's shared expert added as its SparseMoeBlock adds it.
struct Experts {
  Linear router;
  const bf16_t* w13;  // every expert's packed gate/up weight, then ...
  const bf16_t* w2;   // ... its down weight, one expert after another
  int64_t num_experts, inter, top_k;
  int64_t renormalize, round_weights, amx;  // amx: the fused_moe op's (AMX tiles from kAmxMinRows rows an expert)
  // The shared expert every token takes (shared_inter 0: none): a gated MLP of shared_inter with the step's
  // activation, its output scaled by sigmoid of the one-output shared_gate; its MLP's adapter slots, or null.
  Linear shared_gate_up, shared_down, shared_gate;
  int64_t shared_inter;
  const LoRASlots* shared_lora[2];
  const MoELoRASlots* lora;  // the routed experts' adapter slots (cpu_moe_lora.h), or null
};

enum Recipe : int64_t { kLlamaRecipe = 0, kGptRecipe = 1, kGemmaRecipe = 2 };

struct Plan {
  int64_t recipe;      // Recipe
  int64_t activation;  // the MLP's: GatedActivation (Llama, Gemma) or Activation (GPT; cpu_gpt_layers.h)
  int64_t num_layers, hidden, num_heads, num_kv_heads, head_size, inter, rot_dim;
  int64_t block_size, block_stride, token_stride, amx;  // amx: bf16 GEMMs may use AMX tiles
  int64_t lora_amx;  // the LoRA shrink/expand may use AMX tiles (as the per-op path's implementation does)
  float eps, scale, soft_cap;  // soft_cap: the attention logits' (Gemma 2), 0: none
  const Layer* layers;
  double* phase_seconds;  // null, or kPhases sums the step adds each phase's wall time to (profiling)
};

// The phases of a layer that phase_seconds times (fused_decode.py's PHASES, in this order).
enum Phase : int { kNorms, kQKV, kHeadNorms, kRotary, kKVWrite, kAttention, kOutProj, kMlpIn, kActivation, kMlpOut,
                   kExperts, kLoRA, kPhases };

// Adds the time since the previous lap to a phase, when the plan asks for phase times (a clock read a phase). A
// phase a layer doesn't have is not lapped: it stays at zero.
class PhaseClock {
 public:
  explicit PhaseClock(double* sums) : sums_(sums), last_(sums ? omp_get_wtime() : 0.0) {}
  void lap(Phase phase) {
    if (sums_ == nullptr) return;
    const double now = omp_get_wtime();
    sums_[phase] += now - last_;
    last_ = now;
  }

 private:
  double* sums_;
  double last_;
};

#if defined(__AVX512BF16__)
void linear(const Linear& w, bf16_t* y, const bf16_t* x, int64_t m, int nt, bool amx) {
  if (w.input_order) {  // the inputs in the weight's order first, as the per-op path's index_select
    static thread_local std::vector<bf16_t> ordered;
    ordered.resize(static_cast<size_t>(m * w.k));
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < w.k; ++i) ordered[r * w.k + i] = x[r * w.k + w.input_order[i]];
    Linear inner = w;
    inner.input_order = nullptr;
    linear(inner, y, ordered.data(), m, nt, amx);
    return;
  }
  if (w.kind == 0) {
    gemm_packed<false>(y, w.n, x, static_cast<const bf16_t*>(w.data), w.bias, m, w.n, w.k, nt, amx);
    return;
  }
  const uint8_t* p = static_cast<const uint8_t*>(w.data);
  if (w.kind == kInt8AmxKind || w.kind == kInt8VnniKind)
    gemm_int8<false>(y, x, reinterpret_cast<const int8_t*>(p), nullptr, m, w.n, w.k, w.input_scale,
                     w.kind == kInt8AmxKind, nt);
  else if (w.kind == kCodebookKind)
    codebook_linear<false>(y, x, *static_cast<const CodebookWeight*>(w.data), m, nt, amx);
  else
    quant_gemm_kind<false>(static_cast<int>(w.kind), y, x, p, m, w.n, w.k, nt, nullptr, amx);
  if (w.bias)  // the per-op path adds a quantized layer's bias in bf16 after the matmul: same here
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < w.n; ++i)
        y[r * w.n + i] = f32_to_bf16(bf16_to_f32(y[r * w.n + i]) + bf16_to_f32(f32_to_bf16(w.bias[i])));
}

// out = norm(x + residual) with residual_out = x + residual (no residual: norm(x)), as the recipe normalizes.
void norm(const Plan& p, bf16_t* out, bf16_t* residual_out, const bf16_t* x, const bf16_t* residual,
          const bf16_t* weight, const bf16_t* bias, int64_t tokens, int nt) {
  if (p.recipe == kGptRecipe)
    layer_norm<bf16_t>(out, residual_out, x, residual, weight, bias, tokens, p.hidden, p.eps, nt);
  else
    rms_norm<bf16_t>(out, residual_out, x, residual, weight, tokens, p.hidden, p.eps, nt, p.recipe == kGemmaRecipe);
}

// The norms of each query head and key head of the fused QKV rows (Qwen3, Gemma 3), in place, before the rotation.
void head_norms(const Plan& p, const Layer& L, bf16_t* qkv, int64_t qkv_n, int64_t tokens, int nt) {
  const int64_t d = p.head_size;
  const bool unit_offset = p.recipe == kGemmaRecipe;
  share_rows(tokens, nt, [&](int64_t t) {
    bf16_t* q = qkv + t * qkv_n;
    bf16_t* k = q + p.num_heads * d;
    rms_norm<bf16_t>(q, nullptr, q, nullptr, L.q_norm, p.num_heads, d, p.eps, 1, unit_offset);
    rms_norm<bf16_t>(k, nullptr, k, nullptr, L.k_norm, p.num_kv_heads, d, p.eps, 1, unit_offset);
  });
}

// The layer's LoRA delta added to its output y (x its input), when this step has adapter rows and it has slots.
void lora(const LoRASlots* slots, const LoRAGroups* groups, const float* scales, bf16_t* y, int64_t ldy,
          const bf16_t* x, int64_t ldx, int nt, bool amx) {
  if (groups && slots) lora_shrink_expand(*slots, *groups, scales, y, ldy, x, ldx, nt, amx);
}

// y += sigmoid(gate(x)) * mlp(x) for the shared expert, each product and sum rounded to bf16 as the per-op path's
// torch calls round them. Its sigmoid is torch's scalar formula (std::exp in float), the one torch evaluates for a
// batch under 32 rows; from 32 rows torch's vectorised exp may round a last float bit differently.
void shared_expert(const Plan& p, const Experts& X, bf16_t* y, const bf16_t* x, int64_t tokens, int nt, bool amx,
                   const LoRAGroups* groups, const float* lora_scales, bool lora_amx) {
  static thread_local std::vector<bf16_t> gate_up, act, out, gate;
  const int64_t inter = X.shared_inter;
  gate_up.resize(static_cast<size_t>(tokens * 2 * inter));
  act.resize(static_cast<size_t>(tokens * inter));
  out.resize(static_cast<size_t>(tokens * p.hidden));
  gate.resize(static_cast<size_t>(tokens));
  linear(X.shared_gate_up, gate_up.data(), x, tokens, nt, amx);
  lora(X.shared_lora[0], groups, lora_scales, gate_up.data(), 2 * inter, x, p.hidden, nt, lora_amx);
  gated_activation<bf16_t>(act.data(), gate_up.data(), tokens, inter, static_cast<int>(p.activation), nt);
  linear(X.shared_down, out.data(), act.data(), tokens, nt, amx);
  lora(X.shared_lora[1], groups, lora_scales, out.data(), p.hidden, act.data(), inter, nt, lora_amx);
  linear(X.shared_gate, gate.data(), x, tokens, nt, amx);
  // Pointers, not the buffers: a thread_local named in the lambda would be each worker thread's own (empty) one.
  const bf16_t* gates = gate.data();
  const bf16_t* outs = out.data();
  share_rows(tokens, nt, [&](int64_t t) {
    const float g = bf16_to_f32(gates[t]);
    const float s = bf16_to_f32(f32_to_bf16(1.f / (1.f + std::exp(-g))));
    bf16_t* row = y + t * p.hidden;
    const bf16_t* o = outs + t * p.hidden;
    for (int64_t i = 0; i < p.hidden; ++i)
      row[i] = f32_to_bf16(bf16_to_f32(row[i]) + bf16_to_f32(f32_to_bf16(s * bf16_to_f32(o[i]))));
  });
}

// Each token's adapter slot (-1: none) from the step's tokens grouped by slot, as the routed experts' slots take
// it (the calling thread's buffer).
const int64_t* token_slots(const LoRAGroups& G, int64_t tokens) {
  static thread_local std::vector<int64_t> slot;
  slot.assign(static_cast<size_t>(tokens), -1);
  for (int64_t s = 0, at = 0; s < G.num_slots; at += G.counts[s++])
    for (int64_t i = at; i < at + G.counts[s]; ++i) slot[G.order[i]] = s;
  return slot.data();
}

// y [tokens, hidden] = the layer's routed experts' mixture for x [tokens, hidden], plus its shared expert where it
// has one. token_slot: each token's adapter slot (token_slots), null where the step has no adapter rows. False on an
// expert id out of range.
bool mixture(const Plan& p, const Experts& X, bf16_t* y, const bf16_t* x, int64_t tokens, int nt, bool amx,
             const LoRAGroups* groups, const int64_t* token_slot, const float* lora_scales, bool lora_amx) {
  // The calling thread's buffers, kept between layers and steps.
  static thread_local std::vector<bf16_t> logits;
  static thread_local std::vector<float> weights;
  static thread_local std::vector<int64_t> ids;
  logits.resize(static_cast<size_t>(tokens * X.num_experts));
  weights.resize(static_cast<size_t>(tokens * X.top_k));
  ids.resize(static_cast<size_t>(tokens * X.top_k));
  linear(X.router, logits.data(), x, tokens, nt, amx);
  moe_topk(weights.data(), ids.data(), logits.data(), tokens, X.num_experts, X.top_k, X.renormalize != 0,
           X.round_weights != 0);
  const bool adapted = token_slot != nullptr && X.lora != nullptr;
  if (!fused_moe(y, x, weights.data(), ids.data(), tokens, X.top_k, X.w13, X.w2, X.num_experts, p.hidden, X.inter,
                 nt, X.amx != 0, adapted ? X.lora : nullptr, adapted ? token_slot : nullptr))
    return false;
  if (X.shared_inter) shared_expert(p, X, y, x, tokens, nt, amx, groups, lora_scales, lora_amx);
  return true;
}
#endif

}  // namespace

extern "C" {

// Runs every layer for `tokens` decode tokens (one per sequence). hidden [tokens, hidden]: the embeddings in,
// the last layer's output out (before the final norm); residual [tokens, hidden]: the residual stream out.
// cos/sin float32 [tables, tokens, rot_dim] (unread without rotary); slot_mapping int64 [tokens]; block_table int32
// rows of table_stride; seq_lens int32.
// scratch: bf16 room for tokens * (hidden + qkv + heads*head_size + 3*inter). lora: the step's tokens grouped by
// adapter slot (null: no row has an adapter), lora_scales each slot's scale. Returns -1 without AVX512-BF16, -2 on
// an expert id out of range.
int pagoda_decode_layers(const Plan* plan, int64_t tokens, void* hidden_io, void* residual_io, const void* cos,
                         const void* sin, const int64_t* slot_mapping, const int32_t* block_table,
                         int64_t table_stride, const int32_t* seq_lens, void* scratch, const void* lora_groups,
                         const float* lora_scales, int num_threads) {
#if defined(__AVX512BF16__)
  const Plan& p = *plan;
  const int64_t q_size = p.num_heads * p.head_size, kv_size = p.num_kv_heads * p.head_size;
  const int64_t qkv_n = q_size + 2 * kv_size;
  const bool gated = p.recipe != kGptRecipe;
  const int64_t up_n = gated ? 2 * p.inter : p.inter;  // the MLP's first projection's width
  bf16_t* hidden = static_cast<bf16_t*>(hidden_io);
  bf16_t* residual = static_cast<bf16_t*>(residual_io);
  bf16_t* normed = static_cast<bf16_t*>(scratch);
  bf16_t* qkv = normed + tokens * p.hidden;
  bf16_t* attn = qkv + tokens * qkv_n;
  bf16_t* gate_up = attn + tokens * q_size;
  bf16_t* act = gate_up + tokens * 2 * p.inter;
  const LoRAGroups* groups = static_cast<const LoRAGroups*>(lora_groups);
  const int64_t* token_slot = nullptr;  // derived once a step, where some layer's routed experts have adapter slots
  for (int64_t l = 0; groups != nullptr && token_slot == nullptr && l < p.num_layers; ++l) {
    const Experts* X = p.layers[l].experts;
    if (X != nullptr && X->lora != nullptr) token_slot = token_slots(*groups, tokens);
  }
  const int nt = num_threads;
  PhaseClock clock(p.phase_seconds);
  // A projection's adapter delta, timed as the LoRA phase, in steps that have adapter rows.
  auto layer_lora = [&](const LoRASlots* slots, bf16_t* y, int64_t ldy, const bf16_t* x, int64_t ldx) {
    if (groups == nullptr) return;
    lora(slots, groups, lora_scales, y, ldy, x, ldx, nt, p.lora_amx != 0);
    clock.lap(kLoRA);
  };
  for (int64_t l = 0; l < p.num_layers; ++l) {
    const Layer& L = p.layers[l];
    if (l == 0) {
      std::memcpy(residual, hidden, sizeof(bf16_t) * tokens * p.hidden);
      norm(p, normed, nullptr, hidden, nullptr, L.input_norm, L.input_norm_bias, tokens, nt);
    } else {
      norm(p, normed, residual, hidden, residual, L.input_norm, L.input_norm_bias, tokens, nt);
    }
    clock.lap(kNorms);
    linear(L.qkv, qkv, normed, tokens, nt, p.amx != 0);
    clock.lap(kQKV);
    layer_lora(L.lora[0], qkv, qkv_n, normed, p.hidden);
    if (L.q_norm) {
      head_norms(p, L, qkv, qkv_n, tokens, nt);
      clock.lap(kHeadNorms);
    }
    // q and k heads sit side by side in each row: one rotary pass over both.
    if (p.rot_dim > 0) {
      const int64_t table = L.rope_table * tokens * p.rot_dim;
      rope<bf16_t>(qkv, qkv_n, tokens, p.num_heads + p.num_kv_heads, p.head_size,
                   static_cast<const float*>(cos) + table, static_cast<const float*>(sin) + table, p.rot_dim, nt);
      clock.lap(kRotary);
    }
    const int64_t e = sizeof(bf16_t);
    write_kv_rows(L.k_cache, L.v_cache, qkv + q_size, qkv_n * e, qkv + q_size + kv_size, qkv_n * e, slot_mapping,
                  tokens, kv_size * e, p.block_size, p.block_stride * e, p.token_stride * e, nt);
    clock.lap(kKVWrite);
    decode_attention<bf16_t>(attn, qkv, L.k_cache, L.v_cache, block_table, table_stride, seq_lens, tokens,
                             p.num_heads, p.num_kv_heads, p.head_size, p.block_size, p.block_stride,
                             p.token_stride, p.scale, L.window, nt, qkv_n, p.soft_cap);
    clock.lap(kAttention);
    linear(L.o, hidden, attn, tokens, nt, p.amx != 0);
    clock.lap(kOutProj);
    layer_lora(L.lora[1], hidden, p.hidden, attn, q_size);
    if (L.pre_mlp_norm) {  // Gemma 2/3: the attention's output normed before it joins the residual stream
      norm(p, hidden, nullptr, hidden, nullptr, L.post_norm, nullptr, tokens, nt);
      norm(p, normed, residual, hidden, residual, L.pre_mlp_norm, nullptr, tokens, nt);
    } else {
      norm(p, normed, residual, hidden, residual, L.post_norm, L.post_norm_bias, tokens, nt);
    }
    clock.lap(kNorms);
    if (L.experts) {
      if (!mixture(p, *L.experts, hidden, normed, tokens, nt, p.amx != 0, groups, token_slot, lora_scales,
                   p.lora_amx != 0))
        return -2;
      clock.lap(kExperts);
    } else {
      linear(L.gate_up, gate_up, normed, tokens, nt, p.amx != 0);
      clock.lap(kMlpIn);
      layer_lora(L.lora[2], gate_up, up_n, normed, p.hidden);
      if (gated)
        gated_activation<bf16_t>(act, gate_up, tokens, p.inter, static_cast<int>(p.activation), nt);
      else
        activation<bf16_t>(act, gate_up, tokens * p.inter, static_cast<int>(p.activation), nt);
      clock.lap(kActivation);
      linear(L.down, hidden, act, tokens, nt, p.amx != 0);
      clock.lap(kMlpOut);
      layer_lora(L.lora[3], hidden, p.hidden, act, p.inter);
    }
    if (L.post_mlp_norm) {
      norm(p, hidden, nullptr, hidden, nullptr, L.post_mlp_norm, nullptr, tokens, nt);
      clock.lap(kNorms);
    }
  }
  return 0;
#else
  (void)plan; (void)tokens; (void)hidden_io; (void)residual_io; (void)cos; (void)sin; (void)slot_mapping;
  (void)block_table; (void)table_stride; (void)seq_lens; (void)scratch; (void)lora_groups; (void)lora_scales;
  (void)num_threads;
  return -1;
#endif
}

}  // extern "C"
