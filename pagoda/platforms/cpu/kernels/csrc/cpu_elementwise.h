// Elementwise layers: RMSNorm (+ residual add), SiLU-and-mul, rotary embedding.
#pragma once

#include "cpu_common.h"

namespace {

// ---- Elementwise layers ------------------------------------------------------------------------------------------
// torch's bf16 CPU kernels for these run at a few hundred million elements per second; at prefill sizes they cost
// more than the attention. Each is one pass, float32 inside, one rounding on output, with the rows shared out
// between the threads kRowChunk at a time (enough to outweigh claiming them).
constexpr int64_t kRowChunk = 8;

// body(r) for every row r in [0, rows).
template <class Body>
inline void share_rows(int64_t rows, int num_threads, const Body& body) {
  share_tasks((rows + kRowChunk - 1) / kRowChunk, num_threads, [&](int64_t chunk) {
    const int64_t end = (chunk + 1) * kRowChunk < rows ? (chunk + 1) * kRowChunk : rows;
    for (int64_t r = chunk * kRowChunk; r < end; ++r) body(r);
  });
}

// The value as the reference implementation holds it between two bf16 operations (identity for float32).
template <typename T> inline float load_rounded(float v) { return v; }
template <> inline float load_rounded<bf16_t>(float v) { return bf16_to_f32(f32_to_bf16(v)); }
#if defined(__AVX512F__)
template <typename T> inline __m512 round_like(__m512 v) { return v; }
template <> inline __m512 round_like<bf16_t>(__m512 v) { return _mm512_castsi512_ps(bf16_bits_hi(v)); }
#endif

// residual_out = x + residual (rounded to T, as torch's add); out = residual_out * rsqrt(mean(sq) + eps) * weight,
// with the normalised value rounded to T before the weight multiplies it, where the reference implementation
// (transformers' LlamaRMSNorm: weight * hidden.to(input_dtype)) rounds it: bf16 models are tuned to those
// rounding points, and greedy choices at near-ties followed them. Without a residual: out = rms_norm(x).
// unit_offset (Gemma): the scale is (1 + weight), multiplied in float32 before the one rounding to T, as
// transformers' GemmaRMSNorm computes it.
template <typename T>
void rms_norm(T* out, T* residual_out, const T* x, const T* residual, const T* weight, int64_t rows, int64_t hidden,
              float eps, int num_threads, bool unit_offset = false) {
  share_tasks((rows + kRowChunk - 1) / kRowChunk, num_threads, [&](int64_t chunk) {
    std::vector<float> buf(hidden);
    const int64_t end = (chunk + 1) * kRowChunk < rows ? (chunk + 1) * kRowChunk : rows;
    for (int64_t r = chunk * kRowChunk; r < end; ++r) {
      const T* xr = x + r * hidden;
      float sq = 0.f;
      int64_t i = 0;
#if defined(__AVX512F__)
      __m512 sqv = _mm512_setzero_ps();
      for (; i + 16 <= hidden; i += 16) {
        __m512 v = load16(xr + i);
        if (residual) {
          v = round_like<T>(_mm512_add_ps(v, load16(residual + r * hidden + i)));
          store16(residual_out + r * hidden + i, v);  // the rounded sum, which the next layer also sees
        }
        _mm512_storeu_ps(buf.data() + i, v);
        sqv = _mm512_fmadd_ps(v, v, sqv);
      }
      sq = _mm512_reduce_add_ps(sqv);
#endif
      for (; i < hidden; ++i) {
        float v = load(xr, i);
        if (residual) {
          v += load(residual + r * hidden, i);
          store(residual_out + r * hidden, i, v);
          v = load(residual_out + r * hidden, i);  // the rounded sum, which the next layer also sees
        }
        buf[i] = v;
        sq += v * v;
      }
      const float inv = 1.f / std::sqrt(sq / static_cast<float>(hidden) + eps);
      T* o = out + r * hidden;
      i = 0;
#if defined(__AVX512F__)
      const __m512 iv = _mm512_set1_ps(inv);
      if (unit_offset) {
        const __m512 one = _mm512_set1_ps(1.f);
        for (; i + 16 <= hidden; i += 16)
          store16(o + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(buf.data() + i), iv),
                                       _mm512_add_ps(load16(weight + i), one)));
      } else {
        for (; i + 16 <= hidden; i += 16)
          store16(o + i, _mm512_mul_ps(round_like<T>(_mm512_mul_ps(_mm512_loadu_ps(buf.data() + i), iv)),
                                       load16(weight + i)));
      }
#endif
      for (; i < hidden; ++i)
        store(o, i, unit_offset ? buf[i] * inv * (1.f + load(weight, i))
                                : load_rounded<T>(buf[i] * inv) * load(weight, i));
    }
  });
}

// gelu_tanh(x) = 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), computed as x * sigmoid(2u), the
// same function with one exp.
constexpr float kGeluTanh2 = 2.f * 0.7978845608028654f;  // 2 sqrt(2/pi)
inline float gelu_tanh1(float v) { return v / (1.f + std::exp(-kGeluTanh2 * (v + 0.044715f * v * v * v))); }
#if defined(__AVX512F__)
inline __m512 gelu_tanh16(__m512 v) {
  const __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(v, v), v), _mm512_set1_ps(0.044715f), v);
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_mul_ps(inner, _mm512_set1_ps(-kGeluTanh2)))));
}
#endif

// The gated MLP activations: out [rows, inter] = act(x[:, :inter]) * x[:, inter:].
enum GatedActivation { kSiluAndMul = 0, kGeluTanhAndMul = 1 };

// silu: one rounding, of the product. gelu_tanh: the activation rounded to T before the multiply, as torch computes
// gelu(gate) * up on T tensors (the reference Gemma's GeGLU numbers follow).
template <typename T>
void gated_activation(T* out, const T* x, int64_t rows, int64_t inter, int kind, int num_threads) {
  share_rows(rows, num_threads, [&](int64_t r) {
    const T* g = x + r * 2 * inter;
    const T* u = g + inter;
    T* o = out + r * inter;
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= inter; i += 16) {
      const __m512 gv = load16(g + i);
      const __m512 a = kind == kSiluAndMul
          ? _mm512_mul_ps(gv, _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)))))
          : round_like<T>(gelu_tanh16(gv));
      store16(o + i, _mm512_mul_ps(a, load16(u + i)));
    }
#endif
    for (; i < inter; ++i) {
      const float gv = load(g, i);
      store(o, i, (kind == kSiluAndMul ? gv / (1.f + std::exp(-gv)) : load_rounded<T>(gelu_tanh1(gv))) * load(u, i));
    }
  });
}

// Rotate-half rotary embedding in place on x [tokens, heads, head_size] (rows row_stride apart), first rot_dim
// dims of each head: x1' = x1 cos1 + x2 sin1, x2' = x2 cos2 + x1 sin2, where sin carries rotate-half's sign.
// cos/sin are float32 rows: a rotation by bf16-rounded angles' sines was a measurable share of a bf16 model's error.
template <typename T>
void rope(T* x, int64_t row_stride, int64_t tokens, int64_t heads, int64_t head_size, const float* cos, const float* sin,
          int64_t rot_dim, int num_threads) {
  const int64_t half = rot_dim / 2;
  share_rows(tokens, num_threads, [&](int64_t t) {
    const float* c = cos + t * rot_dim;
    const float* s = sin + t * rot_dim;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + t * row_stride + h * head_size;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= half; i += 16) {
        const __m512 a = load16(v + i), b = load16(v + half + i);
        store16(v + i, _mm512_fmadd_ps(a, load16(c + i), _mm512_mul_ps(b, load16(s + i))));
        store16(v + half + i, _mm512_fmadd_ps(b, load16(c + half + i), _mm512_mul_ps(a, load16(s + half + i))));
      }
#endif
      for (; i < half; ++i) {
        const float a = load(v, i), b = load(v, half + i);
        store(v, i, a * load(c, i) + b * load(s, i));
        store(v, half + i, b * load(c, half + i) + a * load(s, half + i));
      }
    }
  });
}

}  // namespace
